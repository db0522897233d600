"""The CNN's fast kernels: choices the code generator makes from the equations' shapes, each
checked for the values it computes (an independent NumPy reference, finite differences)."""
import numpy as np
import pytest

from chainrule.derive import build_model


@pytest.fixture(scope="module")
def pool_model(kernel_cache_dir):
    from chainrule.codegen import compile_model
    return compile_model(build_model("2x6x6 -> maxpool(2) -> flatten -> dense(3) -> mse"), "float64",
                         cache_dir=kernel_cache_dir, input_grads=True)


def _first_argmax_mask(x, k):
    """1 at the first largest value (row-major) of each k x k window, 0 elsewhere: NumPy by hand."""
    n, c, h, w = x.shape
    mask = np.zeros_like(x)
    for b in range(n):
        for ch in range(c):
            for i in range(0, h, k):
                for j in range(0, w, k):
                    window = x[b, ch, i:i + k, j:j + k]
                    p, q = np.unravel_index(np.argmax(window), window.shape)   # the first maximum
                    mask[b, ch, i + p, j + q] = 1.0
    return mask


def test_max_pooling_records_each_windows_argmax_in_the_training_forward(pool_model):
    """The training forward writes each window's argmax into an integer array; the adjoint reads it
    instead of searching every window again. Ties (values drawn from {0, 1, 2}, so most windows
    tie) route the adjoint to the first largest position, the tie rule the derivation states."""
    cm = pool_model
    pullback = cm.source[cm.source.index("def input_grads("):]
    assert "recorded for the backward pass" in pullback and "recorded by the forward pass" in pullback
    assert "dtype=np.int8" in pullback and "amax" in pullback
    rng = np.random.default_rng(3)
    x = rng.integers(0, 3, size=(5, 2, 6, 6)).astype(float)
    y = rng.normal(size=(5, 3))
    params = cm.init_params(0)
    _, grads = cm.input_grads(params, x, y)
    dx = grads["x"]
    mask = _first_argmax_mask(x, 2)
    assert np.all(dx[mask == 0] == 0)                  # nothing outside the first maximum
    assert np.count_nonzero(dx) == np.count_nonzero(mask) == 5 * 2 * 3 * 3
