"""Kronecker-delta elimination: from the scatter form SymPy's ``diff`` gives to the gather form.

``diff(x[b, k], x[b', j])`` is ``δ(b, b') δ(k, j)``. Summed over ``b`` and ``k``, each delta fixes one
summation index (``b = b'``, ``k = j``), provided the index map is affine with a unit coefficient. What
the summation range said about the eliminated index becomes a *guard* on the solution: dropped when the
ranges of the other indices already imply it (dense layers), turned into summation limits when it
constrains another summation index (convolutions: ``max(0, h'-K+1) ≤ h ≤ min(H-1, h')``), and kept as an
explicit condition otherwise.
"""
from __future__ import annotations

import sympy as sp
from sympy import KroneckerDelta

from .errors import UnsupportedError
from .primitives import LogSumExp
from .notes import Note
from .tensor import affine_bounds, provably_nonneg, substitute


def split_terms(expr) -> list:
    """Distribute products over sums only where a sum holds a delta, so each term's deltas are factors."""
    if expr.is_Add:
        return [t for a in expr.args for t in split_terms(a)]
    if expr.is_Mul and any(f.is_Add and f.has(KroneckerDelta) for f in expr.args):
        parts = [[]]
        for f in expr.args:
            options = split_terms(f) if (f.is_Add and f.has(KroneckerDelta)) else [f]
            parts = [p + [o] for p in parts for o in options]
        out = []
        for p in parts:
            out.extend(split_terms(sp.Mul(*p)))
        return out
    return [expr]


class Bracket(sp.Function):
    """The Iverson bracket [lo ≤ e ≤ hi] (1 or 0): a range guard waiting for the sum it constrains."""

    nargs = 3

    def _latex(self, printer):
        e, lo, hi = (printer._print(a) for a in self.args)
        return rf"\left[{lo} \le {e} \le {hi}\right]"

    def as_piecewise(self):
        e, lo, hi = self.args
        return sp.Piecewise((1, sp.And(e >= lo, e <= hi)), (0, True))


class DeltaEliminator:
    """Eliminates deltas bottom-up through nested sums; ``notes`` says what each step did."""

    def __init__(self, ranges: dict):
        self.ranges = dict(ranges)      # index -> (lo, hi) for indices free in the expression
        self.notes: list[str] = []

    def __call__(self, expr):
        return self._walk(expr, self.ranges)

    def _walk(self, expr, ranges):
        if not expr.has(KroneckerDelta):
            return expr
        if isinstance(expr, sp.Sum):
            limits = [tuple(lim) for lim in expr.limits]
            inner = {**ranges, **{v: (lo, hi) for v, lo, hi in limits}}
            summand = self._walk(expr.function, inner)
            return sp.Add(*[self._sum_term(t, limits, ranges) for t in split_terms(summand)])
        if isinstance(expr, (LogSumExp, sp.Piecewise)):
            raise UnsupportedError(f"a Kronecker delta inside {type(expr).__name__} (write the definition "
                                   f"with Min/Max/Abs or a primitive instead): {expr}")
        if expr.is_Add or expr.is_Mul or expr.is_Pow or isinstance(expr, sp.Function):
            return expr.func(*[self._walk(a, ranges) for a in expr.args])
        return expr

    def _sum_term(self, term, limits, outer):
        """Σ over ``limits`` of one product ``term``: eliminate what deltas fix, hoist the rest."""
        limits = list(limits)
        while True:
            found = self._solvable_delta(term, limits)
            if found is None:
                break
            delta, var, solution = found
            (_, lo, hi), = [lim for lim in limits if lim[0] == var]
            limits = [lim for lim in limits if lim[0] != var]
            term = substitute(sp.Mul(*[f for f in sp.Mul.make_args(term) if f is not delta]), {var: solution})
            self.notes.append(Note("{0} fixes {1}", delta, sp.Eq(var, solution, evaluate=False)))
            term, limits = self._guard(term, solution, lo, hi, limits, outer)
        for br in [f for f in sp.Mul.make_args(term) if isinstance(f, Bracket)]:
            if br.args[0].free_symbols & {lim[0] for lim in limits}:   # it constrains this sum now
                rest = sp.Mul(*[f for f in sp.Mul.make_args(term) if f is not br])
                term, limits = self._guard(rest, *br.args, limits, outer)
        const, dep = [], []
        bound = {lim[0] for lim in limits}
        for f in sp.Mul.make_args(term):
            (dep if f.free_symbols & bound else const).append(f)
        result = sp.Mul(*const)
        used = [lim for lim in limits if lim[0] in sp.Mul(*dep).free_symbols]
        for var, lo, hi in limits:
            if (var, lo, hi) not in used:          # a summation index no factor uses: count it
                result *= (hi - lo + 1)
        if used:
            result *= sp.Sum(sp.Mul(*dep), *used)
        else:
            result *= sp.Mul(*dep)
        return result

    @staticmethod
    def _solvable_delta(term, limits):
        summed = [lim[0] for lim in limits]
        for f in sp.Mul.make_args(term):
            if not isinstance(f, KroneckerDelta):
                continue
            diff = sp.expand(f.args[0] - f.args[1])
            for var in summed:
                c = diff.coeff(var)
                if c in (1, -1) and not sp.expand(diff - c * var).has(var):
                    return f, var, sp.expand(-(diff - c * var) / c)
            if diff.free_symbols & set(summed):
                raise UnsupportedError(f"cannot solve the index map {f.args[0]} = {f.args[1]} "
                                       f"for a summation index (only unit coefficients are supported)")
        return None

    def _guard(self, term, solution, lo, hi, limits, outer):
        """The eliminated index had range [lo, hi]: keep that as a condition on ``solution``."""
        ranges = {**outer, **{v: (a, b) for v, a, b in limits}}
        bounds = affine_bounds(solution, ranges)
        cond = sp.And(sp.Le(lo, solution, evaluate=False), sp.Le(solution, hi, evaluate=False), evaluate=False)
        if bounds and provably_nonneg(bounds[0] - lo) and provably_nonneg(hi - bounds[1]):
            self.notes.append(Note("the range guard {0} holds for every index in range: dropped", cond))
            return term, limits
        summed = [v for v, _, _ in limits if v in solution.free_symbols]
        if len(summed) == 1:
            w = summed[0]
            c = solution.coeff(w)
            rest = sp.expand(solution - c * w)
            if c in (1, -1) and not rest.has(w):
                new_lo, new_hi = (lo - rest, hi - rest) if c == 1 else (rest - hi, rest - lo)
                limits = [(v, sp.Max(a, new_lo), sp.Min(b, new_hi)) if v == w else (v, a, b)
                          for v, a, b in limits]
                self.notes.append(Note("the range guard {0} becomes summation limits on {1}", cond, w))
                return term, limits
        return term * Bracket(solution, lo, hi), limits


def eliminate_deltas(expr, ranges):
    """Return (gather-form expression, notes)."""
    elim = DeltaEliminator(ranges)
    out = elim(expr)
    for br in out.atoms(Bracket):       # guards no sum could absorb stay explicit conditions
        elim.notes.append(Note("the range guard {0} is kept as a condition", br))
    out = out.replace(lambda e: isinstance(e, Bracket), lambda e: e.as_piecewise())
    if out.has(KroneckerDelta):
        raise UnsupportedError(f"a Kronecker delta could not be eliminated from {out}")
    return out, elim.notes
