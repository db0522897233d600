"""Numeric verification: generated gradients against central finite differences of the cost."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..derive.errors import ChainruleError
from .compiled import CompiledModel, compile_model

# relative tolerance per dtype (the finite differences of a float32 cost are far coarser)
RTOL = {"float64": 1e-6, "float32": 1e-2}
DEFAULT_EPS = {"float64": 1e-6, "float32": 1e-2}
NOISE_FACTOR = 100.0     # rounding of the cost, in units of the dtype's machine epsilon


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
    model = cm.model
    vocab = model.tensors[cm.input_name].meta.get("vocab")
    if vocab is not None:                     # token ids: integers in the vocabulary
        x = rng.integers(0, int(vocab.subs(model.size_values)), size=x_dims).astype(float)
    else:
        x = rng.normal(size=x_dims)
    if model.tensors[cm.target_name].simplex_axis is not None:
        axis = model.tensors[cm.target_name].simplex_axis
        k = y_dims[axis]
        labels = rng.integers(0, k, size=[n for a, n in enumerate(y_dims) if a != axis])
        y = np.moveaxis(np.eye(k)[labels], -1, axis)
    else:
        y = rng.uniform(0.05, 0.95, size=y_dims)
    return x, y


@dataclass
class GradientCheck:
    """The generated gradient of one parameter against central differences of the generated cost.

    Entry ``j`` agrees when ``|g_j - fd_j| <= atol + rtol * max(|g_j|, |fd_j|)``. ``atol`` is the
    resolution of the finite differences: the rounding of the cost (``NOISE_FACTOR`` machine
    epsilons of ``max(|C|, 1)``) divided by the step ``eps``; so a gradient that is truly 0 (a bias
    before a normalisation) compares as 0 instead of as a relative error of 1.

    ``error = max_j |g_j - fd_j| / (atol / rtol + max(|g_j|, |fd_j|))`` is a relative error in
    which magnitudes below ``atol / rtol`` are measured against that floor; ``ok`` is
    ``error <= rtol``, which is exactly the entrywise test above. Reads as the pair ``(name, error)``.
    """

    name: str
    error: float
    compared: int          # entries compared
    size: int              # entries of the parameter
    rtol: float
    atol: float
    eps: float
    worst: tuple           # (index of the worst entry, generated gradient, finite difference)

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.rtol)

    def __bool__(self):
        return self.ok

    def __iter__(self):
        return iter((self.name, self.error))

    def __getitem__(self, k):
        return (self.name, self.error)[k]

    def __len__(self):
        return 2

    def __repr__(self):
        return (f"GradientCheck({self.name}: {'pass' if self.ok else 'FAIL'}, error {self.error:.2e}, "
                f"{self.compared}/{self.size} entries)")

    def __str__(self):
        idx, g, fd = self.worst
        return (f"{self.name}: {'pass' if self.ok else 'FAIL'}, relative error {self.error:.2e} "
                f"(tolerance {self.rtol:g}, absolute floor {self.atol:.1e}) over {self.compared} of "
                f"{self.size} entries; worst at {idx}: generated {g:.10g}, finite difference {fd:.10g}")


def check_gradients(model, dtype="float64", seed=0, *, batch=5, max_entries=300, eps=None,
                    rtol=None, cache_dir=None, compiled=None) -> list[GradientCheck]:
    """One :class:`GradientCheck` per parameter (in order; each unpacks as ``(name, error)``): the
    generated ``loss_and_grads`` against central differences of the generated cost, over up to
    ``max_entries`` randomly chosen entries of each parameter."""
    cm = compiled if compiled is not None else compile_model(model, dtype=dtype, cache_dir=cache_dir)
    rng = np.random.default_rng(seed)
    params = cm.init_params(seed)
    for name in cm.param_names:          # move off special points (zero biases)
        params[name] += (0.1 * rng.normal(size=params[name].shape)).astype(cm.dtype)
    x, y = sample_batch(cm, batch=batch, seed=seed + 1)
    x = [a.astype(cm.dtype) for a in x] if isinstance(x, list) else x.astype(cm.dtype)
    y = y.astype(cm.dtype)
    cost, grads = cm.loss_and_grads(params, x, y)
    # the cost as loss_and_grads computes it (the forward pass it differentiates): one compiled
    # function per check instead of two (tests compare it with the separate `forward` kernel)
    cost_of = lambda p: cm.loss_and_grads(p, x, y)[0]      # noqa: E731
    eps = DEFAULT_EPS[cm.dtype] if eps is None else float(eps)
    rtol = RTOL[cm.dtype] if rtol is None else float(rtol)
    atol = NOISE_FACTOR * float(np.finfo(cm.dtype).eps) * max(abs(cost), 1.0) / eps
    results = []
    for name in cm.param_names:
        p = params[name]
        flat = p.reshape(-1)                 # a view (the arrays are C-contiguous), also for 0-d
        n = flat.size
        picks = np.arange(n) if n <= max_entries else np.sort(rng.choice(n, size=max_entries, replace=False))
        if len(picks) == 0:
            raise ChainruleError(f"gradient check of {name} compared 0 entries: not a check")
        g = np.asarray(grads[name], dtype=np.float64).reshape(-1)[picks]
        fd = np.empty(len(picks))
        for j, k in enumerate(picks):
            old = flat[k]
            flat[k] = old + eps
            cp = cost_of(params)
            flat[k] = old - eps
            cm_ = cost_of(params)
            flat[k] = old
            fd[j] = (cp - cm_) / (2 * eps)
        scale = atol / rtol + np.maximum(np.abs(g), np.abs(fd))
        rel = np.abs(g - fd) / scale
        w = int(np.argmax(rel))
        where = tuple(int(i) for i in np.unravel_index(picks[w], p.shape)) if p.ndim else ()
        results.append(GradientCheck(name, float(rel[w]), len(picks), n, rtol, atol, eps,
                                     (where, float(g[w]), float(fd[w]))))
    return results
