"""Textbook-form rewrites: one decorated function per rewrite, each a justified, recorded step.

A rewrite takes an expression and the model and returns the rewritten expression (the same object
when it does not apply), or ``(expression, justification)`` when it can say exactly what it used. ``simplify_recorded`` runs them to a fixed point and records a ``Step`` for
each one that changed something.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import sympy as sp

from .notes import Note
from .primitives import LogSumExp
from .tensor import Equation, vanishes


@dataclass
class Step:
    """One recorded step of a derivation: ``before`` became ``after`` by ``rule``, because ``why``."""

    rule: str
    before: object
    after: object
    why: list          # of str and Note (a justification that names expressions)

    def __post_init__(self):
        if not isinstance(self.why, list):
            self.why = [self.why]

    def xreplace(self, mapping):
        self.before = self.before.xreplace(mapping)
        self.after = self.after.xreplace(mapping)
        self.why = [w.xreplace(mapping) if isinstance(w, Note) else w for w in self.why]


@dataclass
class Rewrite:
    rule: str
    why: str
    fn: Callable


REWRITES: list[Rewrite] = []


def rewrite(rule: str, why: str):
    def register(fn):
        REWRITES.append(Rewrite(rule, why, fn))
        return fn
    return register


# -- helpers ------------------------------------------------------------------------------------
def _match_forward(expr, eq):
    """If ``expr`` is ``eq.body`` at some indices, return the read of ``eq.out`` at those indices.

    Each output index is found from the reads: where the body reads ``v + c`` (``v`` an output index,
    ``c`` a constant: a recurrence's ``t - 1``) and ``expr`` reads ``e`` at the same place of the same
    tensor, ``v`` is ``e - c``; the candidates are tried until the body at them is ``expr``."""
    import itertools
    from .recurrence import time_shift
    body = eq.body
    if expr.func != body.func or len(expr.args) != len(body.args):
        return None
    own = list(eq.indices)
    options = {v: [] for v in own}
    cands = list(expr.atoms(sp.Indexed))
    for read in body.atoms(sp.Indexed):
        for cand in cands:
            if cand.base != read.base or len(cand.indices) != len(read.indices):
                continue
            for e, c in zip(read.indices, cand.indices):
                shift = time_shift(e, own)
                if shift is not None and sp.expand(c - shift[1]) not in options[shift[0]]:
                    options[shift[0]].append(sp.expand(c - shift[1]))
    if any(not opts for opts in options.values()):
        return None
    combos = itertools.product(*[options[v] for v in own])
    for values in itertools.islice(combos, 64):
        mapping = dict(zip(own, values))
        if body.xreplace(mapping) == expr:
            return eq.out[tuple(mapping[i] for i in own)]
    return None


def _is_trivial(body) -> bool:
    return isinstance(body, (sp.Indexed, sp.Symbol, sp.Number))


# -- the rewrites -------------------------------------------------------------------------------
@rewrite("forward result",
         "re-express the derivative through a value the forward pass already computed")
def forward_results(expr, model):
    eqs = [e for e in model.equations if not _is_trivial(e.body) and e.out.role != "cost"]
    hits = {}                      # subexpression -> (forward equation, read that replaces it)

    def query(e):
        if not isinstance(e, (sp.Function, sp.Add, sp.Mul, sp.Pow, LogSumExp, sp.Sum)):
            return False
        for eq in eqs:
            hit = _match_forward(e, eq)
            if hit is not None:
                hits[e] = (eq, hit)
                return True
        return False

    out = expr.replace(query, lambda e: hits[e][1])
    if out != expr:
        unique = list({id(eq): eq for eq, _ in hits.values()}.values())
        return out, [Note("the forward pass computed " + ", ".join(
            "{%d}" % k for k in range(len(unique))), *[sp.Eq(eq.lhs, eq.body, evaluate=False) for eq in unique], fixed=True)]
    return out


def _masked_equations(model):
    """Forward equations ``M = [lo ≤ x ≤ hi] · value`` (a masked value, e.g. causal attention weights):
    (equation, bracket, value)."""
    from .deltas import Bracket
    out = []
    for eq in model.equations:
        factors = sp.Mul.make_args(eq.body)
        brackets = [f for f in factors if isinstance(f, Bracket)]
        if len(brackets) == 1 and eq.out.role != "cost":
            value = sp.Mul(*[f for f in factors if f is not brackets[0]])
            out.append((eq, brackets[0], value))
    return out


def _nonneg_given(expr, facts: dict, depth=0) -> bool:
    """``expr ≥ 0`` follows from ``facts`` (index -> (lower bounds, upper bounds)) and from every index
    running from 0 upward (as all of the engine's indices do). ``expr`` affine in the indices."""
    expr = sp.expand(expr)
    for var in sorted(expr.free_symbols & set(facts), key=str):
        coeff = expr.coeff(var)
        if not coeff.is_number or depth > 4:
            return False
        lows, highs = facts[var]
        options = lows if coeff > 0 else highs
        if not options and coeff > 0:
            options = [sp.S.Zero]                # every index runs from 0
        return any(_nonneg_given(expr.subs(var, bound), facts, depth + 1) for bound in options)
    rest = expr.subs({s: 0 for s in expr.free_symbols if s.is_integer and not s.is_positive}) \
        if all(expr.coeff(s).is_nonnegative for s in expr.free_symbols if s.is_integer and not s.is_positive) \
        else expr
    return bool(sp.simplify(rest).is_nonnegative)


def _bounds_of(limit_lo, limit_hi):
    split = lambda e, kind: list(e.args) if isinstance(e, kind) else [e]
    return split(sp.sympify(limit_lo), sp.Max), split(sp.sympify(limit_hi), sp.Min)


def _condition_facts(cond, facts):
    """Facts added by a branch condition ``a ≤ b`` (or ``b ≥ a``) on one index with coefficient ±1."""
    if not isinstance(cond, (sp.LessThan, sp.GreaterThan, sp.StrictLessThan, sp.StrictGreaterThan)):
        return facts
    small, big = (cond.lhs, cond.rhs) if isinstance(cond, (sp.LessThan, sp.StrictLessThan)) else (cond.rhs, cond.lhs)
    gap = 0 if isinstance(cond, (sp.LessThan, sp.GreaterThan)) else 1
    out = {k: (list(lo), list(hi)) for k, (lo, hi) in facts.items()}
    for side, other, upper in ((small, big, True), (big, small, False)):
        if isinstance(side, sp.Symbol) and side.is_integer:
            lo, hi = out.setdefault(side, ([], []))
            (hi if upper else lo).append(other - gap if upper else other + gap)
    return out


def _cond_as_nonneg(cond):
    """``a ≤ b`` -> ``b - a`` (≥ 0); None for other conditions."""
    if isinstance(cond, (sp.LessThan, sp.GreaterThan)):
        small, big = (cond.lhs, cond.rhs) if isinstance(cond, sp.LessThan) else (cond.rhs, cond.lhs)
        return big - small
    return None


@rewrite("masked forward result",
         "a value the forward pass computed under a mask is that masked value wherever the mask holds; "
         "a guard that the mask implies adds nothing, since the masked value is zero outside it")
def masked_results(expr, model):
    """Where the forward pass computed ``M = [lo ≤ x ≤ hi] · value`` (causal attention weights
    A = [u ≤ t] exp(S - LSE)), ``value`` at indices where the bracket provably holds (inside a
    ``Σ_{u'=0}^{t}``, or in the branch ``t ≥ u`` of a guard) is the read of ``M``; and a guard
    ``Piecewise((M·X, cond), (0, True))`` whose condition the bracket implies is just ``M·X``."""
    masked = _masked_equations(model)
    if not masked:
        return expr
    used = []

    def replace_values(e, facts):
        for eq, bracket, value in masked:
            hit = _match_forward(e, Equation(eq.out, eq.indices, value))
            if hit is None:
                continue
            at = bracket.xreplace(dict(zip(eq.indices, hit.indices)))
            x, lo, hi = at.args
            if _nonneg_given(x - lo, facts) and _nonneg_given(hi - x, facts):
                used.append(eq)
                return hit
        if isinstance(e, sp.Sum):
            inner = facts
            for var, lo, hi in e.limits:
                inner = {**inner, var: _bounds_of(lo, hi)}
            return _whole_rows(sp.Sum(replace_values(e.function, inner), *e.limits))
        if isinstance(e, sp.Piecewise) and len(e.args) == 2 and e.args[1].expr == 0:
            (value_, cond), _ = e.args
            inside = replace_values(value_, _condition_facts(cond, facts))
            if _implied_by_mask(inside, cond):
                return inside
            return sp.Piecewise((inside, cond), (0, True))
        if not e.args or isinstance(e, (sp.Indexed, LogSumExp)):
            return e
        args = [replace_values(a, facts) for a in e.args]
        return e.func(*args) if any(a is not b for a, b in zip(args, e.args)) else e

    def _implied_by_mask(value_, cond) -> bool:
        """``value_`` is a product with a masked read whose bracket implies ``cond``."""
        gap = _cond_as_nonneg(cond)
        if gap is None:
            return False
        for f in sp.Mul.make_args(value_):
            for eq, bracket, _ in masked:
                if isinstance(f, sp.Indexed) and f.base == eq.out.base:
                    x, lo, hi = bracket.xreplace(dict(zip(eq.indices, f.indices))).args
                    if _nonneg_given(gap, {x: ([lo], [hi])}):
                        return True
        return False

    def _whole_rows(e):
        """``Σ_{u'=0}^{min(t, T-1)} M[t, u'] f`` with ``M = [u' ≤ t] ...`` is the sum over the whole row
        ``u' < T``: the terms it adds are zero (the row sum of a matrix form)."""
        if len(e.limits) != 1:
            return e
        var, lo, hi = e.limits[0]
        if lo != 0:
            return e
        for f in sp.Mul.make_args(e.function):
            for eq, bracket, _ in masked:
                if not (isinstance(f, sp.Indexed) and f.base == eq.out.base and var in f.indices):
                    continue
                axis = list(f.indices).index(var)
                end = eq.out.shape[axis] - 1
                x, blo, bhi = bracket.xreplace(dict(zip(eq.indices, f.indices))).args
                his = list(hi.args) if isinstance(hi, sp.Min) else [hi]
                if x == var and blo == 0 and hi != end and all(vanishes(a - bhi) or vanishes(a - end)
                                                               for a in his):
                    return sp.Sum(e.function, (var, 0, end))
        return e

    out = replace_values(expr, {})
    if out == expr:
        return expr
    unique = list({id(eq): eq for eq in used}.values())
    return out, [Note("the forward pass computed " + ", ".join("{%d}" % k for k in range(len(unique)))
                      + ", which is zero wherever its bracket fails",
                      *[sp.Eq(eq.lhs, eq.body, evaluate=False) for eq in unique], fixed=True)]


@rewrite("factor out of sums", "a factor that does not depend on the summation index moves out of the sum")
def factor_out_of_sums(expr, model):
    def query(e):
        return isinstance(e, sp.Sum) and any(
            not (f.free_symbols & {v for v, *_ in e.limits}) for f in sp.Mul.make_args(e.function))

    def value(e):
        bound = {v for v, *_ in e.limits}
        const = [f for f in sp.Mul.make_args(e.function) if not (f.free_symbols & bound)]
        dep = [f for f in sp.Mul.make_args(e.function) if f.free_symbols & bound]
        return sp.Mul(*const) * sp.Sum(sp.Mul(*dep), *e.limits)

    return expr.replace(query, value)


@rewrite("count terms", "a sum of a term that does not depend on the summation index is the term "
         "times the number of indices")
def count_constant_sums(expr, model):
    def query(e):
        return isinstance(e, sp.Sum) and not (e.function.free_symbols & {v for v, *_ in e.limits})

    def value(e):
        out = e.function
        for _, lo, hi in e.limits:
            out = out * (hi - lo + 1)
        return out

    return expr.replace(query, value)


def _mean_equations(model):
    """Forward equations that are a constant times one sum (a mean μ = (1/N) Σ_b x_b): (eq, sum, c)."""
    out = []
    for eq in model.equations:
        if eq.out.role == "cost":
            continue
        sums = [f for f in sp.Mul.make_args(eq.body) if isinstance(f, sp.Sum)]
        if len(sums) != 1:
            continue
        c = sp.Mul(*[f for f in sp.Mul.make_args(eq.body) if f is not sums[0]])
        if c.has(sp.Indexed, sp.Sum) or c == 0:
            continue
        out.append((eq, sums[0], c))
    return out


@rewrite("forward sum", "a sum the forward pass computed (times a constant) is that forward value")
def forward_sums(expr, model):
    """Σ_b' x_b'i, where the forward pass computed μ_i = c Σ_b x_bi, is μ_i / c: a fact derived from
    the forward equation (it makes deviations from a mean sum to zero: Σ_b (x_b - μ) = B μ - B μ)."""
    means = _mean_equations(model)
    if not means:
        return expr
    hits = {}

    def query(e):
        if not isinstance(e, sp.Sum):
            return False
        for eq, s, c in means:
            if len(e.limits) != len(s.limits):
                continue
            body_vars = [v for v, *_ in s.limits]
            if set(body_vars) & e.free_symbols:
                continue            # renaming would capture a free index
            ren = {v: w for (v, *_), w in zip(e.limits, body_vars)}
            limits = [(ren[v], lo, hi) for v, lo, hi in e.limits]
            if any(not vanishes(lo - lo2) or not vanishes(hi - hi2)
                   for (_, lo, hi), (_, lo2, hi2) in zip(limits, s.limits)):
                continue
            if [v for v, *_ in limits] != body_vars:
                continue
            cand = e.function.xreplace(ren)
            hit = _match_forward(cand, Equation(eq.out, eq.indices, s.function))
            if hit is not None:
                hits[e] = (eq, hit / c)
                return True
        return False

    out = expr.replace(query, lambda e: hits[e][1])
    if out != expr:
        unique = list({id(eq): eq for eq, _ in hits.values()}.values())
        return out, [Note("the forward pass computed " + ", ".join("{%d}" % k for k in range(len(unique))),
                          *[sp.Eq(eq.lhs, eq.body, evaluate=False) for eq in unique], fixed=True)]
    return out


@rewrite("sum of a sum", "a sum of terms splits into a sum per term")
def split_sums(expr, model):
    return expr.replace(lambda e: isinstance(e, sp.Sum) and e.function.is_Add,
                        lambda e: sp.Add(*[sp.Sum(t, *e.limits) for t in e.function.args]))


@rewrite("declared fact", "the target is a probability distribution")
def declared_facts(expr, model):
    simplex = {t.name: t for t in model.tensors.values() if t.simplex_axis is not None}
    applied = []

    def query(e):
        if not (isinstance(e, sp.Sum) and len(e.limits) == 1 and isinstance(e.function, sp.Indexed)):
            return False
        t = simplex.get(str(e.function.base.label))
        var, lo, hi = e.limits[0]
        if t is None:
            return False
        axis = t.simplex_axis % t.rank
        idx = e.function.indices
        return (idx[axis] == var and lo == 0 and vanishes(hi - (t.shape[axis] - 1))
                and not any(var in sp.sympify(i).free_symbols for k, i in enumerate(idx) if k != axis))

    def value(e):
        applied.append(e)
        return sp.S.One

    out = expr.replace(query, value)
    if applied:
        return out, [Note(", ".join("{%d}" % k for k in range(len(applied))) +
                                      " (the target is a probability distribution: its entries sum to one)",
                                      *[sp.Eq(e, 1, evaluate=False) for e in applied])]
    return out


def _normalised_equations(model):
    """Forward equations x̂ = A / sqrt(P) (A and P read tensors): a normalised deviation."""
    out = []
    for eq in model.equations:
        if eq.out.role == "cost" or not eq.body.is_Mul:
            continue
        roots = [f for f in eq.body.args if f.is_Pow and f.exp == sp.Rational(-1, 2) and f.base.has(sp.Indexed)]
        if len(roots) != 1:
            continue
        A = sp.Mul(*[f for f in eq.body.args if f is not roots[0]])
        if A.is_Add and A.has(sp.Indexed):
            out.append((eq, A, roots[0].base))
    return out


@rewrite("normalised forward result",
         "a deviation the forward pass normalised is its normalised value times the scale: A = x̂ √P")
def normalised_results(expr, model):
    """Where the forward pass computed x̂ = A/√P, write A as x̂ √P (at every index where it appears),
    move the scale out of the sums and let the powers of P cancel; kept only when shorter (the
    compact batch-norm form: (x - μ) Σ (x - μ) dx̂ / (v + ε) becomes x̂ Σ x̂ dx̂)."""
    used = []
    out = expr
    for eq, A, P in _normalised_equations(model):
        pseudo = Equation(eq.out, eq.indices, A)
        hits = {}

        def query(e):
            if not e.is_Add:
                return False
            hit = _match_forward(e, pseudo)
            if hit is None:
                return False
            mapping = dict(zip(eq.indices, hit.indices))
            hits[e] = hit * sp.sqrt(P.xreplace(mapping))
            return True

        new = out.replace(query, lambda e: hits[e])
        if new != out:
            out = new
            used.append(eq)
    if not used:
        return expr
    for _ in range(3):
        out = collect_common(factor_out_of_sums(out, model), model)
    if sp.count_ops(out) >= sp.count_ops(expr):
        return expr
    return out, [Note("the forward pass computed " + ", ".join("{%d}" % k for k in range(len(used)))
                      + ", so the deviation is the normalised value times the scale",
                      *[sp.Eq(eq.lhs, eq.body, evaluate=False) for eq in used], fixed=True)]


def _divides_by_a_read(e) -> bool:
    return any(p.is_Pow and p.exp.is_negative and p.base.has(sp.Indexed) for p in sp.preorder_traversal(e))


@rewrite("cancel", "common factors of numerator and denominator cancel")
def cancel_fractions(expr, model):
    """A product that divides by a forward value (BCE's 1/a and 1/(1-a)) times one that supplies it
    (σ' = a(1-a)) cancels: the kernel then never divides by a saturating activation."""
    done = []

    def query(e):
        if not (e.is_Mul or e.is_Add) or e.has(sp.Sum, LogSumExp) or not _divides_by_a_read(e):
            return False
        return not _divides_by_a_read(sp.cancel(e))

    def value(e):
        out = sp.factor_terms(sp.cancel(e))
        done.append((e, out))
        return out

    out = expr.replace(query, value)
    if done:
        text = "; ".join("{%d} = {%d}" % (2 * k, 2 * k + 1) for k in range(len(done)))
        return out, [Note(text + " (the factors the forward pass supplies cancel against the denominators)",
                          *[x for pair in done for x in pair])]
    return out


@rewrite("collect", "expand and collect common factors (kept only when the result is shorter)")
def collect_common(expr, model):
    if not (expr.is_Add or expr.is_Mul):
        return expr
    best = sp.factor_terms(expr) if expr.is_Add else expr
    expanded = sp.factor_terms(sp.expand(expr, power_exp=False, log=False))
    if sp.count_ops(expanded) < sp.count_ops(best):
        best = expanded
    return best


def simplify_recorded(expr, model, steps: list, rules=None, max_rounds=6):
    """Apply the rewrites to a fixed point, appending a Step for each change; return the result."""
    for _ in range(max_rounds):
        changed = False
        for rw in REWRITES:
            if rules is not None and rw.rule not in rules:
                continue
            new, why = rw.fn(expr, model), rw.why
            if isinstance(new, tuple):
                new, why = new
            if new != expr:
                steps.append(Step(rw.rule, expr, new, why))
                expr, changed = new, True
        if not changed:
            break
    return expr


@rewrite("initial state", "before t = 0 a recurrence holds its declared initial state: the first "
         "terms of a sum over t read it, the others read the sequence itself")
def split_at_the_initial_state(expr, model):
    """Σ_{t=0}^{T-1} f(h_{t-k}) = Σ_{t=0}^{k-1} f(h_init) + Σ_{t=k}^{T-1} f(h_{t-k}): where the state is
    0 the first part vanishes (a weight gradient sums from t = k), and the rest reads the sequence
    plainly (a contraction the code generator lowers to one matrix product)."""
    from .recurrence import Delayed, time_shift

    def split(e):
        if not isinstance(e, sp.Sum):
            return None
        for d in e.function.atoms(Delayed):
            for pos, (v, lo, hi) in enumerate(e.limits):
                shift = time_shift(d.args[2], [v])
                if shift is None or shift[1] >= 0 or lo != 0:
                    continue
                k = -shift[1]
                initial, read, _ = d.args
                head = e.function.xreplace({d: initial})
                tail = e.function.xreplace({d: read})
                rest = [lim for lim in e.limits if lim[0] != v]
                parts = [sp.Sum(tail, *rest[:pos], (v, k, hi), *rest[pos:])]
                if head != 0:
                    first = sp.Add(*[head.xreplace({v: sp.Integer(s)}) for s in range(k)])
                    parts.insert(0, sp.Sum(first, *rest) if rest else first)
                return sp.Add(*parts)
        return None

    return expr.replace(lambda e: split(e) is not None, split)
