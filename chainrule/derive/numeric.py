"""Index notation read numerically: an equation's body evaluated element by element with NumPy arrays.

An independent, deliberately plain reading of the notation (a loop per summation index, a read per
``T[e]``), used to check claims the engine makes about an equation in another form (its matrix
form). Sizes must be small: this is a checker, not a kernel.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import sympy as sp
from sympy.core.function import Application

from .errors import ShapeError, UnsupportedError
from .primitives import IsArgmax, LogSumExp, MaxOver, Primitive


def concrete(expr, sizes: dict) -> int:
    value = sp.sympify(expr).xreplace({k: sp.Integer(v) for k, v in sizes.items()})
    if not value.is_Integer:
        raise ShapeError(f"size {expr} has no integer value at {sizes}")
    return int(value)


class IndexEvaluator:
    """``value(expr, at)``: the number ``expr`` denotes when its free indices take the values ``at``."""

    def __init__(self, env: dict, sizes: dict):
        self.env = env                    # tensor name -> ndarray (rank-0 tensors: 0-d arrays)
        self.sizes = {k: sp.Integer(v) for k, v in sizes.items()}

    def value(self, e, at: dict):
        if e.is_Integer or e.is_Rational or e.is_Float:
            return float(e)
        if isinstance(e, sp.Symbol):
            if e in at:
                return at[e]
            if e in self.sizes:
                return int(self.sizes[e])
            if e.name in self.env:
                return float(self.env[e.name])
            raise UnsupportedError(f"no value for {e}")
        if isinstance(e, sp.Indexed):
            idx = tuple(int(self.value(i, at)) for i in e.indices)
            label = e.base.label          # its name without SymPy's printer (this runs per element)
            arr = self.env[label.name if isinstance(label, sp.Symbol) else str(label)]
            if any(i < 0 or i >= n for i, n in zip(idx, arr.shape)):
                raise ShapeError(f"{e} reads index {idx} outside {arr.shape}")
            return float(arr[idx])
        if e.is_Add:
            return sum(self.value(a, at) for a in e.args)
        if e.is_Mul:
            out = 1.0
            for a in e.args:
                out *= self.value(a, at)
            return out
        if e.is_Pow:
            return self.value(e.base, at) ** self.value(e.exp, at)
        if isinstance(e, (sp.Sum, LogSumExp)):
            terms = [self.value(e.function, point) for point in self._points(e.limits, at)]
            if isinstance(e, sp.Sum):
                return sum(terms)
            top = max(terms)
            return top + math.log(sum(math.exp(t - top) for t in terms))
        if isinstance(e, MaxOver):                  # first limit outermost: the tie rule's order
            return max(self.value(e.function, point) for point in self._points(e.limits, at))
        if isinstance(e, IsArgmax):
            m, *where = e.args
            points = self._points(m.limits, at)
            terms = [self.value(m.function, point) for point in points]
            first = points[terms.index(max(terms))]
            return float(all(first[v] == int(self.value(w, at)) for v, w in zip(m.variables, where)))
        if isinstance(e, sp.Piecewise):
            for expr, cond in e.args:
                if cond == sp.true or bool(self.truth(cond, at)):
                    return self.value(expr, at)
            return math.nan
        if isinstance(e, Application):              # exp, log, Max, Abs, primitives, ...
            return self.function(e, at)
        raise UnsupportedError(f"cannot evaluate {type(e).__name__}: {e}")

    def truth(self, cond, at) -> bool:
        if isinstance(cond, sp.And):
            return all(self.truth(c, at) for c in cond.args)
        if isinstance(cond, sp.Or):
            return any(self.truth(c, at) for c in cond.args)
        lhs, rhs = self.value(cond.lhs, at), self.value(cond.rhs, at)
        return {"<": lhs < rhs, "<=": lhs <= rhs, ">": lhs > rhs, ">=": lhs >= rhs,
                "==": lhs == rhs, "!=": lhs != rhs}[cond.rel_op]

    def function(self, e, at):
        if isinstance(e, Primitive):
            return self.value(e.definition(), at)
        if hasattr(e, "as_piecewise"):                  # the Iverson bracket of a range guard
            return self.value(e.as_piecewise(), at)
        args = [sp.Float(self.value(a, at), 30) for a in e.args]
        return float(e.func(*args).evalf(30))          # exp, log, tanh, Max, Abs, ...: SymPy's own value

    def _points(self, limits, at):
        points = [dict(at)]
        for var, lo, hi in limits:
            points = [{**p, var: k} for p in points
                      for k in range(int(self.value(lo, p)), int(self.value(hi, p)) + 1)]
        return points


def evaluate(eq, env: dict, sizes: dict, fixed: dict | None = None) -> np.ndarray:
    """Every element of ``eq.out`` from the arrays in ``env`` (float64); with ``fixed`` (index ->
    value), only the slice at those indices, over the other indices in their order."""
    fixed = fixed or {}
    kept = [(i, n) for i, n in zip(eq.indices, eq.out.shape) if i not in fixed]
    shape = tuple(concrete(n, sizes) for _, n in kept)
    ev = IndexEvaluator(env, sizes)
    out = np.empty(shape)
    for idx in itertools.product(*[range(n) for n in shape]):
        out[idx] = ev.value(eq.body, {**fixed, **dict(zip((i for i, _ in kept), idx))})
    return out
