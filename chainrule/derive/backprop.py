"""Reverse mode over the equation graph: the chain rule, applied by the engine.

For each equation ``out[idx] = body`` and each tensor ``T`` read in ``body``, the adjoint contribution is

    dT[j] += Σ_idx dOut[idx] · ∂body/∂T[j]

summed over the equation's iteration space. SymPy differentiates the body with the read treated as a
symbol (giving Kronecker deltas), the engine eliminates the deltas (``deltas.py``) and rewrites the result
into textbook form (``rewrites.py``). Every stage is recorded as a ``Step``.

``Gradients.equations`` are the per-tensor adjoint equations; ``Gradients.composed`` inlines the adjoints
of intermediate tensors (activations, losses) so that what remains is the backward recursion a textbook
prints: δ for each pre-activation and the parameter gradients.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import sympy as sp

from .deltas import eliminate_deltas
from .notes import Note
from .graph import Model
from .rewrites import Step, simplify_recorded
from .tensor import Equation, Tensor, index, reads_of as reads, rename_bound, substitute

COST_SEED = sp.S.One        # dC/dC


def adjoint_of(t: Tensor) -> Tensor:
    latex = t.grad_latex or rf"\frac{{\partial C}}{{\partial {t.latex}}}"
    meta = {"of": t.name, "custom_latex": t.grad_latex is not None}
    if "time_axis" in t.meta:                 # a sequence's adjoint runs over the same time axis
        meta["time_axis"] = t.meta["time_axis"]
    return Tensor("d_" + t.name, t.shape, role="adjoint", latex=latex, layer=t.layer, meta=meta)


@dataclass
class AdjointDerivation:
    """How the adjoint of one tensor was derived: its final equation and the steps that led there."""

    tensor: Tensor
    adjoint: Tensor
    equation: Equation
    steps: list[Step] = field(default_factory=list)
    consumers: list[Equation] = field(default_factory=list)
    # a tensor read by several equations: each use's own contribution (consumer, expression), which add
    contributions: list = field(default_factory=list)


class Gradients:
    """The derived backward pass of a model."""

    def __init__(self, model: Model, derivations: dict, kept: set):
        self.model = model
        self.derivations: dict[str, AdjointDerivation] = derivations
        self.kept = kept
        self.adjoints = {name: d.adjoint for name, d in derivations.items()}
        self._composed = None

    @property
    def equations(self) -> list[Equation]:
        """Adjoint equations in evaluation order (reverse topological)."""
        return [d.equation for d in self.derivations.values()]

    def __getitem__(self, name) -> Equation:
        return self.derivations[name].equation

    @property
    def composed(self) -> dict[str, AdjointDerivation]:
        if self._composed is None:
            self._composed = compose(self)
        return self._composed


# -- deriving -------------------------------------------------------------------------------------
def _needs_adjoint(model: Model, wrt) -> list[str]:
    """Tensors on a path from a parameter (or a requested input) to the cost, in reverse order."""
    sources = {p.name for p in model.params} | set(wrt)
    reach = set(sources)
    useful = {model.cost.name}
    for _ in range(2 if not getattr(model, "schedule", None) else len(model.equations) + 1):
        before = (len(reach), len(useful))       # repeated: a recurrence reaches itself across time
        for eq in model.equations:                               # forward reachability
            if any(r in reach for r, _ in eq.reads()):
                reach.add(eq.out.name)
        for eq in reversed(model.equations):                     # backward: feeds the cost
            if eq.out.name in useful:
                useful |= {r for r, _ in eq.reads()}
        if (len(reach), len(useful)) == before:
            break
    order = [eq.out.name for eq in reversed(model.equations)]
    order += [t for t in sorted(sources) if t not in order]
    return [n for n in order if n in reach and n in useful]


def _target_indices(t: Tensor, model: Model) -> tuple:
    """Readable names for the adjoint's indices: the tensor's own, else those its readers use."""
    eq = model.equation_for(t.name)
    names = None
    if eq is not None:
        names = list(eq.indices)
    else:
        for consumer in model.consumers(t.name):
            for name, idx in consumer.reads():
                if name == t.name and all(isinstance(i, sp.Symbol) for i in idx) and len(set(idx)) == len(idx):
                    names = list(idx)
                    break
            if names:
                break
    if not names:
        names = [index(f"j{k}") for k in range(t.rank)]
    out = []
    for n in names:                     # a read like W[i, i] repeats a name: prime the repeat
        while n in out:
            n = index(n.name + "'")
        out.append(n)
    return tuple(out)


def _bound(expr) -> set:
    return {v for e in expr.atoms(sp.Sum) for v, *_ in e.limits}


def derive(model: Model, wrt=()) -> Gradients:
    """Derive the adjoint of every tensor between the parameters (and ``wrt``) and the cost.

    Derived once per model: the explanation and the code generator ask for the same derivation,
    and get the same object (recomputed if the model's equations were replaced meanwhile)."""
    # equations compare by identity (the key holds them, so an id is never reused meanwhile)
    key = (tuple(model.equations), model.cost.name, tuple(p.name for p in model.params),
           tuple(str(w) for w in wrt))
    memo = getattr(model, "_derived", None)
    if memo is not None and memo[0] == key:
        return memo[1]
    grads = _derive(model, wrt)
    try:
        model._derived = (key, grads)
    except AttributeError:                 # a model type without a __dict__: derive every time
        pass
    return grads


def _derive(model: Model, wrt=()) -> Gradients:
    names = _needs_adjoint(model, wrt)
    derivations: dict[str, AdjointDerivation] = {}
    # a recurrence reads its own adjoint (at t+1): every adjoint is named before any is derived
    adjoints = {n: adjoint_of(model.tensors[n]) for n in names if n != model.cost.name}
    for name in names:
        if name == model.cost.name:
            continue
        t = model.tensors[name]
        derivations[name] = _derive_one(model, t, adjoints)
    kept = {n for n in derivations
            if model.tensors[n].role in ("param", "input") or model.tensors[n].grad_latex}
    return Gradients(model, derivations, kept)


def _upstream(model, out: Tensor, adjoints, idx):
    """The adjoint read dOut[idx] (the seed 1 for the cost)."""
    if out.name == model.cost.name:
        return COST_SEED
    return adjoints[out.name][idx]


def _derive_one(model: Model, t: Tensor, adjoints) -> AdjointDerivation:
    adj = adjoints[t.name]
    consumers = [e for e in model.consumers(t.name) if e.out.name == model.cost.name or e.out.name in adjoints]
    j = _target_indices(t, model)
    fresh = tuple(index(f"_t{k}") for k in range(t.rank))       # clash-free during elimination
    target_read = t[fresh] if t.rank else t.read()
    ranges = {f: (sp.S.Zero, n - 1) for f, n in zip(fresh, t.shape)}

    chain, partials = [], []
    for eq in consumers:
        limits = [(i, lo, hi) for i, (lo, hi) in eq.ranges().items()]
        up = _upstream(model, eq.out, adjoints, eq.indices)
        local = sp.diff(eq.body, target_read)
        wrap = (lambda e, lim=limits: sp.Sum(e, *lim) if lim else e)
        chain.append(wrap(up * sp.Derivative(eq.lhs, target_read, evaluate=False)))
        partials.append(wrap(up * local))
    steps = [Step("chain rule", adj[fresh] if t.rank else adj.read(), sp.Add(*chain, evaluate=False),
                  [Note("sum over every element that reads {0}: upstream adjoint times local derivative",
                        target_read)]),
             Step("differentiate", sp.Add(*chain, evaluate=False), sp.Add(*partials),
                  "SymPy differentiates each body; a read of the same tensor gives Kronecker deltas")]
    expr, notes = eliminate_deltas(sp.Add(*partials), ranges)
    contributions = []
    if len(consumers) > 1:          # several uses (a residual connection, shared weights): each one's term
        contributions = [(eq, eliminate_deltas(part, ranges)[0]) for eq, part in zip(consumers, partials)]
    if notes:
        unique = list({(n.fmt, n.args): n for n in notes}.values())
        steps.append(Step("eliminate Kronecker deltas", steps[-1].after, expr, unique))
    expr = simplify_recorded(expr, model, steps)

    # back to readable index names: first prime every other index that would clash with them
    used = set().union(*[s.before.free_symbols | s.after.free_symbols | _bound(s.before) | _bound(s.after)
                         for s in steps])
    clash, taken = {}, used | set(j)
    for v in set(j) & used:
        w = index(v.name + "'")
        while w in taken:
            w = index(w.name + "'")
        clash[v], taken = w, taken | {w}
    rename = dict(zip(fresh, j))
    expr = expr.xreplace(clash).xreplace(rename)
    for s in steps:
        s.xreplace(clash)
        s.xreplace(rename)
    equation = Equation(adj, j, expr, layer=t.layer, note=f"adjoint of {t.name}")
    contributions = [(eq, c.xreplace(clash).xreplace(rename)) for eq, c in contributions]
    return AdjointDerivation(t, adj, equation, steps, consumers, contributions)


# -- composing: the backward recursion --------------------------------------------------------------
def _substitute_adjoint(expr, adj_name: str, eq: Equation):
    """Replace every read of adjoint ``adj_name`` by the body of its equation at the read's indices.

    The inserted body's summation indices are renamed away from every index of ``expr``, so that
    a batch statistic (``Σ_b``) inserted where ``b`` is free cannot capture it."""
    around = {s for s in sp.preorder_traversal(expr) if isinstance(s, sp.Symbol) and s.is_integer}

    def value(read):
        mapping = dict(zip(eq.indices, read.indices))
        return substitute(rename_bound(eq.body, around - set(eq.indices)), mapping)
    if not eq.indices:
        return expr.xreplace({eq.out.read(): rename_bound(eq.body, around)})
    return expr.replace(lambda e: isinstance(e, sp.Indexed) and str(e.base.label) == adj_name, value)


def recomputed_inside_reductions(grads: Gradients) -> set:
    """Adjoints that composing would inline *inside* a reduction of their reader while carrying a
    reduction of their own (the adjoint of a pooled convolution output, read under the argmax sum of
    the pooling): inlined, each would be recomputed once per term of the outer reduction. The code
    generator keeps them as arrays of their own (``compose(grads, keep=...)``)."""
    from .primitives import LogSumExp, MaxOver
    reductions = (sp.Sum, LogSumExp, MaxOver)
    derivs = grads.derivations
    out = set()
    for n, d in derivs.items():
        if not d.equation.body.has(*reductions):
            continue
        name = d.adjoint.name
        for m in derivs.values():
            for r in m.equation.body.atoms(*reductions):
                if any(str(x.base.label) == name for x in r.atoms(sp.Indexed)):
                    out.add(n)
    return out


def compose(grads: Gradients, keep=frozenset()) -> dict[str, AdjointDerivation]:
    """Inline adjoints of intermediates read only once (except those in ``keep``); simplify what
    results, recording steps."""
    model = grads.model
    derivs = grads.derivations
    readers = {n: [m for m in derivs if derivs[n].adjoint.name in {r for r, _ in derivs[m].equation.reads()}]
               for n in derivs}
    # (an adjoint that reads itself, across time, is never inlined: that would not terminate)
    inline = {n for n in derivs if n not in grads.kept and n not in keep and len(readers[n]) == 1
              and readers[n] != [n]}
    out = {}
    for name, d in derivs.items():
        if name in inline:
            continue
        expr, steps = d.equation.body, []
        for _ in range(len(derivs)):
            # in derivation order, not set order: the same steps and the same printed form every run
            hits = [m for m in derivs if m in inline and derivs[m].adjoint.name in {r for r, _ in reads(expr)}]
            if not hits:
                break
            before = expr
            for m in hits:
                expr = _substitute_adjoint(expr, derivs[m].adjoint.name, derivs[m].equation)
            steps.append(Step("substitute", before, expr, [Note(
                "insert " + ", ".join("{%d}" % k for k in range(len(hits))) + " derived above",
                *[sp.Eq(derivs[m].equation.lhs, derivs[m].equation.body, evaluate=False) for m in hits])]))
        if steps:
            expr = simplify_recorded(expr, model, steps)
        eq = Equation(d.adjoint, d.equation.indices, expr, layer=d.equation.layer, note=d.equation.note)
        out[name] = AdjointDerivation(d.tensor, d.adjoint, eq, steps, d.consumers)
    return out

