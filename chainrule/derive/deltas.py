"""Kronecker-delta elimination: from the scatter form SymPy's ``diff`` gives to the gather form.

``diff(x[b, k], x[b', j])`` is ``δ(b, b') δ(k, j)``. Summed over ``b`` and ``k``, each delta fixes one
summation index (``b = b'``, ``k = j``), provided the index map is affine in it. A unit coefficient
solves it outright; a stride or dilation ``h' = s h + d p`` solved for ``h`` gives ``h = (h' - d p)/s``,
which is an index only where ``s`` divides ``h' - d p``: that condition is kept as an Iverson bracket
``[s | h' - d p]`` (``Divides``), and the code generator lowers it to a ``%`` test. What
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
from .tensor import affine_bounds, provably_nonneg, simplified, substitute, vanishes


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
        sides = ([] if lo == -sp.oo else [e >= lo]) + ([] if hi == sp.oo else [e <= hi])
        return sp.Piecewise((1, sp.And(*sides)), (0, True))


class Divides(sp.Function):
    """The Iverson bracket [s | e] (1 if the integer ``s`` divides ``e``, else 0): where a strided or
    dilated index map has a solution at all."""

    nargs = 2

    def _latex(self, printer):
        s, e = (printer._print(a) for a in self.args)
        return rf"\left[{s} \mid {e}\right]"

    def as_condition(self):
        s, e = self.args
        return sp.Eq(sp.Mod(e, s), 0)

    def as_piecewise(self):
        return sp.Piecewise((1, self.as_condition()), (0, True))


GUARDS = (Bracket, Divides)


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
        if isinstance(expr, sp.Piecewise) and _index_branches(expr, ranges) is not None:
            # a branch on an index (a recurrence's initial state): a sum of bracketed terms
            return self._walk(_index_branches(expr, ranges), ranges)
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
            delta, var, solution, divides = found
            (_, lo, hi), = [lim for lim in limits if lim[0] == var]
            limits = [lim for lim in limits if lim[0] != var]
            term = substitute(sp.Mul(*[f for f in sp.Mul.make_args(term) if f is not delta]), {var: solution})
            if divides is None:
                self.notes.append(Note("{0} fixes {1}", delta, sp.Eq(var, solution, evaluate=False)))
            else:
                self.notes.append(Note("{0} fixes {1}, an index only where {2}: that condition is kept",
                                       delta, sp.Eq(var, solution, evaluate=False), divides))
                term = term * divides
            term, limits = self._guard(term, solution, lo, hi, limits, outer)
        for br in [f for f in sp.Mul.make_args(term) if isinstance(f, Bracket)]:
            if br.args[0].free_symbols & {lim[0] for lim in limits}:   # it constrains this sum now
                rest = sp.Mul(*[f for f in sp.Mul.make_args(term) if f is not br])
                term, limits = self._guard(rest, *br.args, limits, outer)
        const, dep = [], []
        limits = [(v, simplified(lo), simplified(hi)) for v, lo, hi in limits]
        bound = {lim[0] for lim in limits}
        for f in sp.Mul.make_args(term):
            (dep if f.free_symbols & bound else const).append(f)
        result = sp.Mul(*const)
        for var, lo, hi in list(limits):         # a sum over one point (t = 0 only) is its term there
            if vanishes(hi - lo) and var in sp.Mul(*dep).free_symbols:
                dep = [substitute(f, {var: lo}) for f in dep]
                limits = [lim for lim in limits if lim[0] != var]
                self.notes.append(Note("the sum over {0} has one term, at {1}", var, sp.Eq(var, lo, evaluate=False)))
                const += [f for f in dep if not (f.free_symbols & {v for v, *_ in limits})]
                dep = [f for f in dep if f.free_symbols & {v for v, *_ in limits}]
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
            if not isinstance(f, KroneckerDelta) or f.has(sp.Indexed):   # a token id: a condition
                continue
            diff = sp.expand(f.args[0] - f.args[1])
            solvable = []
            for var in summed:
                c = diff.coeff(var)
                rest = sp.expand(diff - c * var)
                if c.is_Integer and c != 0 and not rest.has(var):
                    solvable.append((abs(c) != 1, var, c, rest))
            if solvable:                     # a unit coefficient first: no divisibility condition
                _, var, c, rest = min(solvable, key=lambda s: (s[0], summed.index(s[1])))
                return f, var, sp.expand(-rest / c), (None if abs(c) == 1 else Divides(abs(c), sp.expand(-rest)))
            if diff.free_symbols & set(summed):
                raise UnsupportedError(f"cannot solve the index map {f.args[0]} = {f.args[1]} "
                                       f"for a summation index (its coefficients must be nonzero integers)")
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
            if c.is_Integer and c != 0 and not rest.has(w):
                # a stride: lo <= c w + rest <= hi holds for the integers w between two roundings
                m = abs(c)
                new_lo, new_hi = ((sp.ceiling((lo - rest) / m), sp.floor((hi - rest) / m)) if c > 0 else
                                  (sp.ceiling((rest - hi) / m), sp.floor((rest - lo) / m)))
                limits = [(v, sp.Max(a, new_lo), sp.Min(b, new_hi)) if v == w else (v, a, b)
                          for v, a, b in limits]
                self.notes.append(Note("the range guard {0} becomes summation limits on {1} (rounded: "
                                       "{1} steps by 1 while the index steps by {2})", cond, w, m))
                return term, limits
        return term * Bracket(solution, lo, hi), limits


def _is_guard(f) -> bool:
    return (isinstance(f, sp.Piecewise) and len(f.args) == 2 and f.args[0].expr == 1
            and f.args[1].expr == 0 and f.args[1].cond == sp.true)


def fold_guards(expr):
    """``[c] · f`` -> ``f if c else 0``: a condition multiplies nothing it does not guard, so a read
    that exists only where the condition holds (a strided index that must divide, a padded border)
    is never evaluated elsewhere. Folds at each product only, never across a sum's binding (SymPy's
    ``piecewise_fold`` would lift a condition on a summation index out of its sum)."""
    if not expr.args or isinstance(expr, sp.Indexed):
        return expr
    args = [fold_guards(a) for a in expr.args]
    expr = expr.func(*args) if any(a is not b for a, b in zip(args, expr.args)) else expr
    if expr.is_Mul:
        guards = [f for f in expr.args if _is_guard(f)]
        if guards:
            rest = sp.Mul(*[f for f in expr.args if not _is_guard(f)])
            return sp.Piecewise((rest, sp.And(*[g.args[0].cond for g in guards])), (0, True))
    return expr


def _index_condition_bracket(cond, ranges):
    """A comparison of one index with sizes (``t < 1``) as an Iverson bracket over its range, or None."""
    rel = (sp.StrictLessThan, sp.LessThan, sp.StrictGreaterThan, sp.GreaterThan)
    if not isinstance(cond, rel):
        return None
    diff = sp.expand(cond.lhs - cond.rhs)
    var = [v for v in diff.free_symbols if v in ranges and diff.coeff(v) in (1, -1)]
    if len(var) != 1 or (diff.free_symbols - {var[0]}) & set(ranges):
        return None
    v = var[0]
    sign = diff.coeff(v)
    bound = -sp.expand(diff - sign * v) if sign == 1 else sp.expand(diff - sign * v)
    op = {sp.StrictLessThan: "<", sp.LessThan: "<=", sp.StrictGreaterThan: ">", sp.GreaterThan: ">="}[type(cond)]
    if sign == -1:
        op = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}[op]
    lo, hi = ranges[v]
    if op == "<":
        return Bracket(v, lo, bound - 1)
    if op == "<=":
        return Bracket(v, lo, bound)
    if op == ">":
        return Bracket(v, bound + 1, hi)
    return Bracket(v, bound, hi)


def _index_branches(pw, ranges):
    """``{A if c; B otherwise}`` with ``c`` a comparison of one index -> ``[c] A + [not c] B``, or None."""
    if len(pw.args) != 2 or pw.args[1].cond != sp.true:
        return None
    (a, cond), (b, _) = pw.args
    yes, no = _index_condition_bracket(cond, ranges), _index_condition_bracket(cond.negated, ranges)
    if yes is None or no is None:
        return None
    return yes * a + no * b


def _free_deltas_as_conditions(expr, notes):
    """A delta between a free index and a fixed one (a read of the last time step, ``H[b, T-1, o]``)
    fixes no summation index: it is the condition that the two are equal, kept as a branch."""
    deltas = [d for d in expr.atoms(KroneckerDelta)]
    if not deltas:
        return expr
    for d in deltas:
        if d.has(sp.Indexed):
            notes.append(Note("{0}: the rows a token id selects receive its adjoint; the condition {1} "
                              "is kept", d, sp.Eq(d.args[0], d.args[1], evaluate=False)))
            continue
        notes.append(Note("{0} fixes no summation index: the condition {1} is kept", d,
                          sp.Eq(d.args[0], d.args[1], evaluate=False)))
    return expr.xreplace({d: sp.Piecewise((1, sp.Eq(d.args[0], d.args[1])), (0, True)) for d in deltas})


def _implied_sides_dropped(expr, ranges, notes):
    """A bracket's side that the free indices' ranges imply is dropped (a bracket implied on both
    sides is 1): ``[0 ≤ t ≤ ∞]`` for an index ``t`` of a time axis says nothing."""
    repl = {}
    for br in expr.atoms(Bracket):
        e, lo, hi = br.args
        ints = {v for v in e.free_symbols if v.is_integer and not v.is_positive}
        if not ints <= set(ranges):
            continue
        bounds = affine_bounds(e, ranges)
        if bounds is None:
            continue
        lo_ok = lo == -sp.oo or provably_nonneg(bounds[0] - lo)
        hi_ok = hi == sp.oo or provably_nonneg(hi - bounds[1])
        if lo_ok and hi_ok:
            repl[br] = sp.S.One
            notes.append(Note("the range guard {0} holds for every index in range: dropped", br))
        elif lo_ok and lo != -sp.oo:
            repl[br] = Bracket(e, -sp.oo, hi)
        elif hi_ok and hi != sp.oo:
            repl[br] = Bracket(e, lo, sp.oo)
    return expr.xreplace(repl) if repl else expr


def eliminate_deltas(expr, ranges):
    """Return (gather-form expression, notes)."""
    elim = DeltaEliminator(ranges)
    out = elim(expr)
    bound = {v for s in out.atoms(sp.Sum) for v, *_ in s.limits}
    if not any(d.free_symbols & bound and not d.has(sp.Indexed) for d in out.atoms(KroneckerDelta)):
        out = _free_deltas_as_conditions(out, elim.notes)
    out = _implied_sides_dropped(out, ranges, elim.notes)
    for br in out.atoms(Bracket):       # guards no sum could absorb stay explicit conditions
        elim.notes.append(Note("the range guard {0} is kept as a condition", br))
    out = fold_guards(out.replace(lambda e: isinstance(e, GUARDS), lambda e: e.as_piecewise()))
    if out.has(KroneckerDelta):
        raise UnsupportedError(f"a Kronecker delta could not be eliminated from {out}")
    return out, elim.notes
