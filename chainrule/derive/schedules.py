"""Learning-rate schedules, each declared once as a SymPy expression of the epoch e (0-based).

A schedule is called with an epoch and gives the learning rate; ``latex()`` prints its formula.
``warmup`` composes: a linear ramp over the first epochs, then the wrapped schedule.
"""
from __future__ import annotations

import math

import sympy as sp

from .printing import latex

E = sp.Symbol("e", integer=True, nonnegative=True)


def _positive(name, value, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return value


class Schedule:
    """``lr(e) = expr`` for epoch ``e``; ``expr`` a SymPy expression of ``E``."""

    def __init__(self, name, expr, params: dict):
        self.name, self.expr, self.params = name, sp.sympify(expr), dict(params)
        self._fn = sp.lambdify(E, self.expr, modules="math")

    def __call__(self, epoch):
        return float(self._fn(int(epoch)))

    def latex(self) -> str:
        return r"\eta(e) = " + latex(self.expr)

    def __repr__(self):
        return f"Schedule({self.name}: {self.expr})"


def constant(lr):
    return Schedule("constant", sp.Float(_positive("lr", lr)), {"lr": lr})


def step_decay(lr, drop=0.5, every=10):
    """η₀ · drop^⌊e / every⌋."""
    _positive("lr", lr), _positive("drop", drop)
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be an integer >= 1, got {every!r}")
    return Schedule("step", sp.Float(lr) * sp.Float(drop) ** sp.floor(E / every),
                    {"lr": lr, "drop": drop, "every": every})


def exponential_decay(lr, rate=0.9):
    """η₀ · rate^e."""
    _positive("lr", lr), _positive("rate", rate)
    return Schedule("exponential", sp.Float(lr) * sp.Float(rate) ** E, {"lr": lr, "rate": rate})


def cosine_decay(lr, epochs, min_lr=0.0):
    """η_min + (η₀ - η_min)(1 + cos(π e / epochs)) / 2, constant η_min after ``epochs``."""
    _positive("lr", lr), _positive("min_lr", min_lr, allow_zero=True)
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    lo, hi = sp.Float(min_lr), sp.Float(lr)
    expr = sp.Piecewise((lo + (hi - lo) * (1 + sp.cos(sp.pi * E / epochs)) / 2, E < epochs), (lo, True))
    return Schedule("cosine", expr, {"lr": lr, "epochs": epochs, "min_lr": min_lr})


def warmup(schedule, epochs=5):
    """Linear warm-up to the schedule's first rate, η(0)·(e + 1)/epochs for e < epochs, then the
    schedule, started afresh: η(e - epochs)."""
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"warm-up epochs must be an integer >= 1, got {epochs!r}")
    inner = schedule if isinstance(schedule, Schedule) else constant(schedule)
    target = inner.expr.subs(E, 0)
    expr = sp.Piecewise((target * (E + 1) / epochs, E < epochs), (inner.expr.subs(E, E - epochs), True))
    return Schedule(f"warmup+{inner.name}", expr, {"epochs": epochs, **inner.params})
