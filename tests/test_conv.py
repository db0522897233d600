"""Convolution and pooling: strided/dilated index maps solved by the engine, the layers' derivations
verified exactly at several sizes, their kernels against finite differences and against an
independent forward reference (scipy.signal.correlate, NumPy loops), and the declaration errors."""
from __future__ import annotations

import numpy as np
import pytest
import sympy as sp

from chainrule.derive import (ACTIVATIONS, Activation, Dense, Model, ShapeError, SpecError, build_model,
                              derive, explain_model, index, sequential)
from chainrule.derive.conv import AvgPool, Conv1D, Conv2D, Flatten, GlobalAvgPool, MaxPool
from chainrule.derive.layers import B
from chainrule.derive.tensor import Equation, Tensor, size
from chainrule.derive.verify import verify_model

b, h, p = index("b"), index("h"), index("p")


def _strided_model(stride, dilation):
    """y[b,h] = Σ_p w[p] x[b, s h + d p], then a squared error (written out as a user would)."""
    W, K = size("W"), size("K")
    out = (W - dilation * (K - 1) - 1) / stride + 1
    x, w = Tensor("x", (B, W), role="input"), Tensor("w", (K,), role="param")
    y, t, cost = Tensor("y", (B, out)), Tensor("t", (B, out), role="target"), Tensor("C", (), role="cost")
    eqs = [Equation(y, (b, h), sp.Sum(w[p] * x[b, stride * h + dilation * p], (p, 0, K - 1))),
           Equation(cost, (), sp.Sum(sp.Sum((y[b, h] - t[b, h]) ** 2, (h, 0, out - 1)), (b, 0, B - 1)) / B)]
    return Model(eqs, [x, w, y, t, cost], cost, size_values={W: 9, K: 2}, name=f"s{stride}d{dilation}")


@pytest.mark.parametrize("stride,dilation", [(1, 2), (2, 3), (3, 2)])
def test_a_strided_dilated_map_is_solved_with_a_divisibility_condition(stride, dilation):
    model = _strided_model(stride, dilation)
    grads = derive(model, wrt=["x"])
    eq = grads["x"]
    assert eq.body.has(sp.Mod), eq                       # [s | h' - d p] kept, as a % test
    notes = " ".join(n.fmt for s in grads.derivations["x"].steps for n in getattr(s, "why", [])
                     if hasattr(n, "fmt"))
    assert "an index only where" in notes
    checks = verify_model(model, grads)
    assert {c.name.split("dC/d")[1] for c in checks} == {"w", "x"}
    assert all(checks) and all(c.checked > 0 and len(c.sizes) >= 2 for c in checks)


def test_a_stride_alone_becomes_rounded_summation_limits():
    """s h + p = h': p is solved (unit coefficient) and the range of p bounds h in steps of s."""
    eq = derive(_strided_model(2, 1), wrt=["x"])["x"]
    assert not eq.body.has(sp.Piecewise) and eq.body.has(sp.floor) and eq.body.has(sp.ceiling), eq
    assert all(verify_model(_strided_model(2, 1)))


def _relu():
    return Activation("relu", ACTIVATIONS["relu"])


def test_conv2d_strided_padded_dilated_and_maxpool_verify_exactly_at_several_sizes():
    model = sequential((1, 7, 7), [Conv2D(2, 2, stride=2, padding=1, dilation=2), MaxPool(2, stride=1),
                                   Flatten(), Dense(2)], "mse")
    grads = derive(model, wrt=["x"])
    checks = verify_model(model, grads, points=1)
    assert {c.name.split("dC/d")[1] for c in checks} == {"W1", "b1", "W2", "b2", "x"}
    for c in checks:
        assert c and c.checked > 0 and len(c.sizes) >= 2, str(c)
    # sizes the verifier chose keep every shape whole: (H + 2 - 2(K-1) - 1)/2 + 1
    for a in checks[0].sizes:
        assert (a["H_0"] + 2 - 2 * (a["KH_1"] - 1) - 1) % 2 == 0


def test_pooling_1d_and_global_average_verify():
    model = sequential((2, 8), [Conv1D(3, 3, padding="same"), _relu(), AvgPool(2, dims=1),
                                GlobalAvgPool(), Dense(2)], "softmax_cross_entropy")
    checks = verify_model(model, derive(model, wrt=["x"]), points=1)
    assert len(checks) == 5 and all(checks), [str(c) for c in checks]


def test_the_explanation_names_the_full_correlation_and_the_argmax_routing():
    model = sequential((1, 9, 9), [Conv2D(2, 3, stride=2, padding=1), MaxPool(2, stride=1), Flatten(),
                                   Dense(3)], "softmax_cross_entropy")
    md = explain_model(model, derive(model, wrt=["x"])).to_markdown()
    assert "full correlation of" in md and "flipped kernel" in md
    assert "correlation of $\\tilde{x}^{(1)}$ with" in md          # the kernel gradient
    assert "routes the adjoint to the position of the maximum" in md and "first maximal position" in md
    assert r"\operatorname{argmax}" in md
    avg = build_model("1x8x8 -> avgpool(2) -> flatten -> dense(3) -> softmax_cross_entropy")
    assert "spread evenly over the window" in explain_model(avg, derive(avg, wrt=["x"])).to_markdown()


@pytest.mark.latex
def test_every_equation_of_conv_and_pool_derivations_renders():
    from latex_tools import extract_math, format_katex_errors, katex_errors, need_katex
    need_katex()
    items = []
    for spec in ["1x9x9 -> conv(2, 3, stride=2, padding=1) -> relu -> maxpool(2, stride=1) -> avgpool(2) -> flatten "
                 "-> dense(3) -> softmax_cross_entropy",
                 "1@12 -> conv(2, 2, stride=2, dilation=3) -> global_avgpool -> dense(2) -> mse"]:
        from chainrule.derive import build_model
        model = build_model(spec)
        doc = explain_model(model, derive(model, wrt=["x"]))
        items += extract_math(doc.to_markdown()) + [(eq, True) for eq in doc.equations()]
    errors = katex_errors(items)
    assert not errors, format_katex_errors(errors)


# -- generated kernels -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def conv_kernels(kernel_cache_dir):
    from chainrule.codegen import compile_model
    memo = {}

    def get(key, layers, shape, loss="mse"):
        if key not in memo:
            memo[key] = compile_model(sequential(shape, layers, loss, name=key), cache_dir=kernel_cache_dir)
        return memo[key]
    return get


def _identity_readout(cm, params, x):
    """The flattened output of the layers before the last dense layer: that layer set to the identity."""
    W = [n for n in cm.param_names if n.startswith("W")][-1]
    bias = [n for n in cm.param_names if n.startswith("b")][-1]
    n_out = params[W].shape[0]
    params[W] = np.eye(n_out).reshape(params[W].shape)
    params[bias] = np.zeros(n_out)
    return cm.predict(params, x)


def _conv_reference(x, Wk, bias, stride, pad, dil):
    """An independent 2-D convolution: zero padding, dilated kernel, scipy's correlate, then stride."""
    from scipy.signal import correlate
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    F, C, kh, kw = Wk.shape
    dk = np.zeros((F, C, dil * (kh - 1) + 1, dil * (kw - 1) + 1))
    dk[:, :, ::dil, ::dil] = Wk
    out = np.stack([np.stack([sum(correlate(xp[n, c], dk[f, c], mode="valid") for c in range(C)) + bias[f]
                              for f in range(F)]) for n in range(x.shape[0])])
    return out[:, :, ::stride, ::stride]


def _pool_reference(x, k, s, fn):
    n, c, H, W = x.shape
    Ho, Wo = (H - k) // s + 1, (W - k) // s + 1
    out = np.empty((n, c, Ho, Wo))
    for i in range(Ho):
        for j in range(Wo):
            out[:, :, i, j] = fn(x[:, :, s * i:s * i + k, s * j:s * j + k].reshape(n, c, -1), axis=-1)
    return out


def test_conv_kernels_match_scipy_correlate(conv_kernels):
    cm = conv_kernels("conv-ref", [Conv2D(3, 3, stride=2, padding=1, dilation=2), Flatten(), Dense(3 * 4 * 4)],
                      (2, 9, 9))
    rng = np.random.default_rng(0)
    params = cm.init_params(0)
    params["b1"] = rng.normal(size=params["b1"].shape)
    x = rng.normal(size=(4, 2, 9, 9))
    got = _identity_readout(cm, params, x)
    want = _conv_reference(x, params["W1"], params["b1"], 2, 1, 2).reshape(4, -1)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pool_kernels_match_numpy_loops(conv_kernels, kind):
    layer = MaxPool(3, stride=2) if kind == "max" else AvgPool(3, stride=2)
    cm = conv_kernels(f"{kind}-ref", [layer, Flatten(), Dense(2 * 3 * 3)], (2, 7, 7))
    x = np.random.default_rng(1).normal(size=(3, 2, 7, 7))
    got = _identity_readout(cm, cm.init_params(0), x)
    want = _pool_reference(x, 3, 2, np.max if kind == "max" else np.mean).reshape(3, -1)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_cnn_kernels_pass_finite_differences(conv_kernels):
    from chainrule.codegen.verify import check_gradients
    cm = conv_kernels("cnn-fd", [Conv2D(3, 2, stride=2, padding=1, dilation=2), Activation("tanh", ACTIVATIONS["tanh"]),
                                 MaxPool(2, stride=1), AvgPool(2, stride=1), Flatten(), Dense(3)],
                      (2, 7, 7), "softmax_cross_entropy")
    results = check_gradients(cm.model, compiled=cm)
    assert [n for n, _ in results] == ["W1", "b1", "W2", "b2"]
    assert all(err < 1e-6 for _, err in results), results


def test_max_pool_ties_route_to_the_first_position(conv_kernels):
    """Two channels, a 1x1 convolution with weights 1: positions 0 and 1 of the window tie in y, but
    channel 0 is 1 at position 0 and 0 at position 1, so dW[0, 0] tells which position got δ."""
    cm = conv_kernels("tie", [Conv2D(1, 1, bias=False), MaxPool(2, dims=2), Flatten(), Dense(1)], (2, 2, 2))
    x = np.zeros((1, 2, 2, 2))
    x[0, 0, 0, 0] = 1.0            # position (0, 0): channel 0
    x[0, 1, 0, 1] = 1.0            # position (0, 1): channel 1 -> y ties at (0, 0) and (0, 1)
    params = {"W1": np.ones((1, 2, 1, 1)), "W2": np.ones((1, 1, 1, 1)), "b2": np.zeros(1)}
    _, grads = cm.loss_and_grads(params, x, np.zeros((1, 1)))
    # δ reaches (0, 0), the first maximal position: dW1[0, 0] = δ x[0,0,0,0] = δ, dW1[0, 1] = δ x[0,1,0,0] = 0
    g = grads["W1"].reshape(2)
    assert g[0] != 0 and g[1] == 0, g
    # the adjoint is lowered in scatter form: each window's argmax searched once (the same loop and
    # strict > as the gather form), δ added at that one position
    assert "each window's argmax found once" in cm.source


def test_a_padded_convolutions_input_gradient_scatters_inside_the_output(conv_kernels):
    """With padding the scatter form's col2im keeps a test: a product of a padded border falls
    outside the input and is dropped; the gradients pass finite differences."""
    from chainrule.codegen.verify import check_gradients
    cm = conv_kernels("conv-pad-scatter", [Conv2D(3, 3), Conv2D(2, 3, padding=1), Flatten(), Dense(3)],
                      (2, 7, 6), "softmax_cross_entropy")
    gradient = cm.source[cm.source.index("# contraction in d_y1: "):]
    gradient = gradient[:gradient.index("\n\n")]
    assert "# col2im: " in gradient and "# inside the output and the summation limits" in gradient
    results = check_gradients(cm.model, compiled=cm)
    assert [n for n, _ in results] == ["W1", "b1", "W2", "b2", "W3", "b3"]
    assert all(err < 1e-6 for _, err in results), results


# -- declaration errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("layers,shape,message", [
    ([Conv2D(4, 5)], (1, 4, 4), "the kernel spans 5 along axis 2 but the input has only 4"),
    ([Conv2D(4, 3, stride=0)], (1, 8, 8), "stride must be at least 1"),
    ([Conv2D(4, 3, padding=-1)], (1, 8, 8), "padding must be"),
    ([Conv2D(4, 3, in_channels=3)], (1, 8, 8), "declared for 3 input channels"),
    ([MaxPool(2)], (1, 7, 7), "is not whole"),
    ([AvgPool(3, stride=2)], (1, 8, 8), "is not whole"),
    ([Conv2D(4, 4, padding="same")], (1, 8, 8), "odd kernel"),
    ([Conv1D(4, 3)], (1, 8, 8), "expects a rank-3 input"),
    ([Conv2D(4, 3), Dense(2)], (1, 8, 8), "put a flatten"),
])
def test_declaration_errors_name_the_layer_tensor_and_shapes(layers, shape, message):
    with pytest.raises((ShapeError, SpecError)) as err:
        sequential(shape, layers, "mse")
    text = str(err.value)
    assert message in text and f"layer {len(layers)}:" in text, text


def test_convolutions_lower_to_im2col_gemms_that_pass_finite_differences(conv_kernels):
    """A contraction over channel and kernel offsets with affine reads is lowered as im2col + _matmul
    (the code generator's choice from the equation's shape), for the forward convolution and the
    kernel gradient; the input gradient, whose summation limits move with the output index (a full
    correlation), is lowered in scatter form: one GEMM δ·W, then col2im adds each product at
    h = p + h' (no zero-padded buffer; the limits provably hold there, so no test either). The
    kernels still pass finite differences and agree with scipy's correlate."""
    from chainrule.codegen.verify import check_gradients
    cm = conv_kernels("cnn-gemm", [Conv2D(3, 3), Activation("tanh", ACTIVATIONS["tanh"]), Conv2D(2, 2),
                                   Flatten(), Dense(3)], (2, 7, 6), "softmax_cross_entropy")
    src = cm.source
    for eq in ("y1[b,f,h,w] = Σ_c,p,q", "y2[b,f,h,w] = Σ_c,p,q", "d_W1[f,c,p,q] = Σ_b,h,w",
               "d_W2[f,c,p,q] = Σ_b,h,w", "d_y1[b,f,h,w] = Σ_f',h',w'[W2"):
        assert f"# contraction in {eq.split('[')[0]}: {eq}" in src, eq
    assert src.count("_col = np.empty(") >= 4 and "zero outside the summation limits" not in src
    gradient = src[src.index("# contraction in d_y1: "):]
    gradient = gradient[:gradient.index("\n\n")]
    assert "# scatter form: " in gradient and "# col2im: " in gradient and " if " not in gradient
    # the kernel gradients read the training forward's im2col buffers (x and a1 gathered once each)
    body = src[src.index("def loss_and_grads("):]
    body = body[:body.find("\ndef ", 1) % (len(body) + 1)]
    # (twice in the module: train_step repeats the body of loss_and_grads)
    assert body.count("# gathered by an earlier equation") == 2 and src.count("# gathered by an earlier equation") == 4
    results = check_gradients(cm.model, compiled=cm)
    assert [n for n, _ in results] == ["W1", "b1", "W2", "b2", "W3", "b3"]
    assert all(err < 1e-6 for _, err in results), results
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 2, 7, 6))
    one = conv_kernels("conv-gemm-ref", [Conv2D(3, 3), Flatten(), Dense(3 * 5 * 4)], (2, 7, 6))
    p1 = one.init_params(0)
    p1["b1"] = rng.normal(size=p1["b1"].shape)
    got = _identity_readout(one, p1, x)
    np.testing.assert_allclose(got, _conv_reference(x, p1["W1"], p1["b1"], 1, 0, 1).reshape(3, -1),
                               rtol=1e-12, atol=1e-12)
