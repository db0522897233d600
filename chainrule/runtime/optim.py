"""Optimisers. ``SGD`` takes the fused path: one generated ``train_step`` (forward, backward and the
update in a single Numba call). Other optimisers subclass :class:`Optimizer` and implement
:meth:`Optimizer.update`, an elementwise update from the gradients of ``loss_and_grads``.
"""
from __future__ import annotations

import numpy as np

__all__ = ["SGD", "Optimizer", "get_optimizer"]


class Optimizer:
    """Base class. ``step`` runs one minibatch and returns its cost; it updates ``params`` in place."""

    name = "optimizer"

    def __init__(self, lr: float):
        self.lr = lr
        self.state: dict = {}

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value):
        """A finite number >= 0 (a schedule may anneal to 0; a negative rate would climb)."""
        import math
        import numbers
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                or value < 0:
            raise ValueError(f"{type(self).__name__}: the learning rate must be a finite number "
                             f">= 0, got {value!r}")
        self._lr = float(value)

    def reset(self):
        """Forget accumulated state (moments, velocities)."""
        self.state = {}

    def step(self, cm, params: dict, x, y) -> float:
        cost, grads = cm.loss_and_grads(params, x, y)
        self.update(params, grads)
        return float(cost)

    def update(self, params: dict, grads: dict):
        raise NotImplementedError(f"{type(self).__name__}.update")

    def config(self) -> dict:
        return {"name": self.name, "lr": self.lr}

    def __repr__(self):
        return f"{type(self).__name__}(lr={self.lr:g})"


class SGD(Optimizer):
    """Plain stochastic gradient descent, θ ← θ - lr ∂C/∂θ, fused into the generated train_step."""

    name = "sgd"

    def __init__(self, lr: float = 0.1):
        super().__init__(lr)

    def step(self, cm, params, x, y):
        return float(cm.train_step(params, x, y, self.lr))

    def update(self, params, grads):          # the unfused equivalent (used by tests/tools)
        for k, g in grads.items():
            params[k] -= np.asarray(self.lr, dtype=params[k].dtype) * g


OPTIMIZERS = {"sgd": SGD}


def get_optimizer(opt, lr=None) -> Optimizer:
    if isinstance(opt, Optimizer):
        if lr is not None:
            opt.lr = float(lr)
        return opt
    if isinstance(opt, str):
        key = opt.lower()
        if key not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {opt!r}; known: {', '.join(OPTIMIZERS)}")
        return OPTIMIZERS[key](lr) if lr is not None else OPTIMIZERS[key]()
    raise TypeError(f"optimizer must be an Optimizer or a name, got {type(opt).__name__}")
