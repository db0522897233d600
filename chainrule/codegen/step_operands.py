"""A backward time loop's gate adjoints, computed once per step and kept as sequences.

Why. The adjoint of a gated recurrence reads, at step ``t``, the previous (later in time) step's
gate adjoints through the recurrent weights: in an LSTM

    d_h[b, t, k] = Σ_o (1 - f[b, t+1, o]) f[b, t+1, o] d_f[b, t+1, o] Uf[o, k] + ...   (one per gate)

and the weight and bias gradients after the loop read the same products over the whole sequence:
``d_Uf[o, j] = Σ_{b,t} (1 - f) f d_f h[b, t-1, j]``, ``d_Wf[o, i] = Σ_{b,t} (1 - f) f d_f x[b, t, i]``,
``d_bf[o] = Σ_{b,t} (1 - f) f d_f``. Lowered as they stand, each of these computes the product
again (in the loop: copies of ``f`` and ``d_f`` at ``t+1`` and an elementwise pass feeding each
gate's ``_matmul``; after it: one pass over the whole sequence per gradient): the LSTM's step
computed each gate's product four times. The product is the adjoint of the gate's pre-activation
(``δ_f = d_f ⊙ σ'``), a value of step ``t+1`` that step ``t+1`` itself can compute.

What. ``share_step_operands`` rewrites the units of a schedule: in a backward time loop, a
product of two or more factors that read one and the same index tuple of sequences at ``t + c``,
at least one of them computed by the loop, times one other read under a sum (the operand of a
contraction, the shape ``Lowerer.materialise_operands`` extracts) becomes a sequence ``P`` of
the loop, defined by that product at ``t`` and computed in the same fused pass as the loop's
other elementwise results; the sum reads ``P[.., t + c, ..]`` (a slice of the step before, or
zeros outside the sequence, like every read across time). Every later equation that computes the
same product (up to the names of its indices) reads ``P`` instead. The equations keep their
values: only a common subexpression gets a name, so the generated code cites the equation each
statement comes from, as before.
"""
from __future__ import annotations

import sympy as sp

from ..derive.recurrence import Delayed, TimeLoop, time_shift
from ..derive.tensor import Equation, Tensor


def share_step_operands(units, lowerer) -> list:
    """The units with each backward time loop's repeated operand products named (see the module
    docstring); the same list when there is nothing to share."""
    out, shared = [], []                     # shared: (key, tensor, axis) of each named product
    for unit in units:
        if isinstance(unit, TimeLoop) and unit.direction < 0:
            unit = _name_loop_operands(unit, lowerer, shared)
        elif shared and isinstance(unit, Equation):
            unit = _read_shared(unit, shared)
        out.append(unit)
    return out


def _name_loop_operands(loop: TimeLoop, lowerer, shared) -> TimeLoop:
    """``loop`` with its operand products as sequences of its own (appended to ``shared``)."""
    inside = set(loop.names)
    equations, added = [], []
    for eq in loop.equations:
        axis = loop.time_axes[eq.out.name]
        t = eq.indices[axis]
        body = sp.sympify(eq.body)
        replace = {}
        for s in sorted(body.atoms(sp.Sum), key=sp.default_sort_key):
            found = _operand_in_sum(s, t, inside, lowerer)
            if found is None:
                continue
            product, own, time_axis = found
            key = _key(product, own)
            seq = next((p for k, p, _ in shared if k == key), None)
            if seq is None:
                seq = _sequence(product, own, time_axis, loop, eq, lowerer)
                shared.append((key, seq.out, time_axis))
                added.append(seq)
                seq = seq.out
            rest = [f for f in sp.Mul.make_args(s.function) if f not in sp.Mul.make_args(product)]
            replace[s] = sp.Sum(sp.Mul(*rest) * seq[own], *s.limits)
        equations.append(eq if not replace else
                         Equation(eq.out, eq.indices, body.xreplace(replace), layer=eq.layer, note=eq.note))
    if not added:
        return loop
    axes = dict(loop.time_axes)
    axes.update({e.out.name: e.out.meta["time_axis"] for e in added})
    # computed at the end of each step, from that step's adjoints; read by the next step (t - 1)
    return TimeLoop(equations + added, loop.direction, axes)


def _operand_in_sum(s, t, inside, lowerer):
    """(the product, its index tuple, the tuple's time position) when ``s`` is ``Σ F · G`` with
    ``F`` a product of at least two factors reading one index tuple that holds ``t + c`` once,
    one of them a sequence the loop computes; else None."""
    if any(isinstance(a, (sp.Sum, Delayed)) for a in sp.preorder_traversal(s.function)
           if a is not s.function):
        return None
    factors = [f for f in sp.Mul.make_args(s.function) if not f.is_number]
    for G in factors:
        if not isinstance(G, sp.Indexed):
            continue
        rest = [f for f in factors if f is not G]
        if len(rest) < 2:
            continue
        reads = [r for f in rest for r in sp.sympify(f).atoms(sp.Indexed)]
        tuples = {tuple(r.indices) for r in reads}
        if len(tuples) != 1:
            continue
        own, = tuples
        at = [k for k, e in enumerate(own) if t in sp.sympify(e).free_symbols]
        if len(at) != 1 or time_shift(own[at[0]], [t]) is None:
            continue
        plain = [e for k, e in enumerate(own) if k != at[0]]
        if not all(isinstance(v, sp.Symbol) for v in plain) or len(set(plain)) != len(plain):
            continue
        if not any(str(r.base.label) in inside for r in reads):
            continue
        if any(lowerer.tensors[str(r.base.label)].meta.get("time_axis") != at[0] for r in reads):
            continue
        indices = {x for f in rest for x in sp.sympify(f).free_symbols
                   if isinstance(x, sp.Symbol) and x.is_integer}
        if indices - set(plain) - {t} - set(lowerer.sizes):
            continue                         # an index bound elsewhere (another sum's)
        return sp.Mul(*rest), own, at[0]
    return None


def _canonical(own):
    """Index symbols standing for the positions of an index tuple (its time entry included)."""
    return tuple(sp.Symbol(f"_q{k}", integer=True) for k in range(len(own)))


def _at(product, own, new):
    """``product`` (whose reads all read ``own``) with every read at ``new`` instead."""
    return product.replace(lambda e: isinstance(e, sp.Indexed) and tuple(e.indices) == tuple(own),
                           lambda e: e.base[tuple(new)])


def _key(product, own):
    return sp.srepr(_at(product, own, _canonical(own)))


def _sequence(product, own, axis, loop, eq, lowerer) -> Equation:
    """The equation of a new sequence of the loop: ``P[own'] = product`` at the step's own time."""
    first = next(iter(sorted(product.atoms(sp.Indexed), key=sp.default_sort_key)))
    model_t = lowerer.tensors[str(first.base.label)]
    name = lowerer.fresh("step_operand")
    seq = Tensor(name, model_t.shape, role="hidden", layer=eq.layer, meta={"time_axis": axis})
    lowerer.tensors[name], lowerer.names[name] = seq, name
    idx = tuple(sp.Symbol(f"_p{k}", integer=True) for k in range(len(own)))
    return Equation(seq, idx, _at(product, own, idx), layer=eq.layer,
                    note=f"a gate adjoint of {eq.out.name}'s step, computed once per step and kept "
                         f"for the next step and the weight gradients")


def _read_shared(eq: Equation, shared) -> Equation:
    """``eq`` reading the named products wherever its body computes one of them."""
    body = sp.sympify(eq.body)

    def swap(e):
        factors = list(sp.Mul.make_args(e))
        by_tuple = {}
        for f in factors:
            reads = sp.sympify(f).atoms(sp.Indexed)
            tuples = {tuple(r.indices) for r in reads}
            if len(tuples) == 1 and not f.is_number:
                by_tuple.setdefault(next(iter(tuples)), []).append(f)
        for own, group in by_tuple.items():
            if len(group) < 2:
                continue
            key = _key(sp.Mul(*group), own)
            for k, seq, _ in shared:
                if k == key:
                    rest = [f for f in factors if f not in group]
                    return sp.Mul(*rest) * seq[own]
        return e
    new = body.replace(lambda e: isinstance(e, sp.Mul), swap)
    return eq if new == body else Equation(eq.out, eq.indices, new, layer=eq.layer, note=eq.note)
