"""Numeric verification: generated gradients against central finite differences of the cost."""
from __future__ import annotations

import numpy as np

from .compiled import CompiledModel, compile_model


def sample_batch(cm: CompiledModel, batch=5, seed=0):
    """A random batch of inputs and valid targets (one-hot rows for a probability target,
    values in (0.05, 0.95) otherwise, which suits every loss: MSE, MAE, BCE, ...)."""
    rng = np.random.default_rng(seed)
    if len(cm.input_names) > 1:
        xs = [rng.normal(size=[batch if d is None else d for d in cm._dims[n]]) for n in cm.input_names]
        _, y = sample_batch_one(cm, batch, rng)
        return xs, y
    return sample_batch_one(cm, batch, rng)


def sample_batch_one(cm: CompiledModel, batch, rng):
    x_dims = [batch if d is None else d for d in cm._dims[cm.input_name]]
    y_dims = [batch if d is None else d for d in cm._dims[cm.target_name]]
    x = rng.normal(size=x_dims)
    if cm._y.simplex_axis is not None:
        axis = cm._y.simplex_axis
        k = y_dims[axis]
        labels = rng.integers(0, k, size=[n for a, n in enumerate(y_dims) if a != axis])
        y = np.moveaxis(np.eye(k)[labels], -1, axis)
    else:
        y = rng.uniform(0.05, 0.95, size=y_dims)
    return x, y


def check_gradients(model, dtype="float64", seed=0, *, batch=5, max_entries=300, eps=None,
                    cache_dir=None, compiled=None):
    """``[(param name, relative error)]``: the generated ``loss_and_grads`` against central
    differences of the generated cost, ``‖g - g_fd‖ / max(‖g‖, ‖g_fd‖, tiny)`` over up to
    ``max_entries`` randomly chosen entries of each parameter."""
    cm = compiled if compiled is not None else compile_model(model, dtype=dtype, cache_dir=cache_dir)
    rng = np.random.default_rng(seed)
    params = cm.init_params(seed)
    for name in cm.param_names:          # move off special points (zero biases)
        params[name] += (0.1 * rng.normal(size=params[name].shape)).astype(cm.dtype)
    x, y = sample_batch(cm, batch=batch, seed=seed + 1)
    x = [a.astype(cm.dtype) for a in x] if isinstance(x, list) else x.astype(cm.dtype)
    y = y.astype(cm.dtype)
    _, grads = cm.loss_and_grads(params, x, y)
    if eps is None:
        eps = 1e-6 if cm.dtype == "float64" else 1e-2
    results = []
    for name in cm.param_names:
        p = params[name]
        flat = p.reshape(-1)
        n = flat.size
        picks = np.arange(n) if n <= max_entries else rng.choice(n, size=max_entries, replace=False)
        g = grads[name].reshape(-1)[picks].astype(np.float64)
        fd = np.empty(len(picks))
        for j, k in enumerate(picks):
            old = flat[k]
            flat[k] = old + eps
            cp = cm.cost(params, x, y)
            flat[k] = old - eps
            cm_ = cm.cost(params, x, y)
            flat[k] = old
            fd[j] = (cp - cm_) / (2 * eps)
        denom = max(np.linalg.norm(g), np.linalg.norm(fd), np.finfo(np.float64).tiny)
        results.append((name, float(np.linalg.norm(g - fd) / denom)))
    return results
