"""Values a (non-recurrent) training forward computes and its backward pass evaluates again, kept.

Why. The GELU ``a = z (1 + tanh(k(z))) / 2`` has the derived adjoint
``d_z = d_a · (1 + tanh(k(z)) + z (1 - tanh(k(z))²) k'(z)) / 2``: lowered as it stands, the
backward evaluates ``tanh`` (an ``exp`` and a division per element) once more for every element the
forward already evaluated it at. On the GPT benchmark (float32, (16, 64, 256) per layer) that
``tanh`` was about half of each backward GELU loop, while keeping the forward's value costs a store
per element there and a load here.

What. ``keep_forward_values_flat`` looks in the backward equations for calls of a scalar function
(``tanh``, ``exp``, a primitive) of forward tensors at the equation's own indices, which a forward
equation also evaluates over all of its own indices, equal after expansion (the derivative may have
factored the argument: ``k(z) (a z² + 1) z`` is the forward's ``k(z)(a z³ + z)``). Each such value
becomes a tensor of the forward, ``K[idx] = tanh(...)``, defined just before the equation that
evaluates it (which then reads it; the elementwise loop fuses both), and every backward equation
reads ``K`` instead. The backward's value is then the forward's one, equal up to the rounding of
the two spellings of the argument. Recurrent models have their own pass (``forward_values``).
"""
from __future__ import annotations

import sympy as sp

from ..derive.layers import B as BATCH
from ..derive.primitives import IsArgmax, LogSumExp, MaxOver
from ..derive.recurrence import Delayed
from ..derive.tensor import Equation, Tensor


def keep_forward_values_flat(forward, backward, lowerer):
    """(forward equations, backward equations) with the kept values as forward tensors (see the
    module docstring); the same lists when nothing is kept."""
    produced = {e.out.name for e in forward}
    adjoints = {e.out.name for e in backward}
    sites = {}                                 # key -> (forward equation, its expression)
    for eq in forward:
        for expr in _calls(eq.body, produced, adjoints):
            key, free = _value_key(expr, eq, lowerer)
            if key is not None and list(free) == list(eq.indices):
                sites.setdefault(key, (eq, expr))
    kept = {}                                  # key -> (forward equation, expression, tensor)
    for eq in backward:
        for expr in _calls(eq.body, produced, adjoints):
            key, _ = _value_key(expr, eq, lowerer)
            if key in sites and key not in kept:
                site_eq, site_expr = sites[key]
                name = lowerer.fresh("kept")
                t = Tensor(name, site_eq.out.shape, role="hidden", layer=site_eq.layer)
                lowerer.tensors[name], lowerer.names[name] = t, name
                kept[key] = (site_eq, site_expr, t)
    if not kept:
        return forward, backward
    return _keep_in_forward(forward, kept), [_read_kept(e, kept, produced, adjoints, lowerer) for e in backward]


def _calls(body, produced, adjoints):
    """Calls of a scalar function (not a reduction, a branch or a delayed read) that read a tensor
    the forward computes and no tensor the backward computes."""
    out = []
    for e in sp.preorder_traversal(sp.sympify(body)):
        if isinstance(e, sp.Function) and not isinstance(e, (Delayed, sp.Piecewise, LogSumExp, MaxOver, IsArgmax)) \
                and e.args and not e.has(sp.Sum, LogSumExp, MaxOver):
            names = {str(r.base.label) for r in e.atoms(sp.Indexed)}
            if names & produced and not names & adjoints:
                out.append(e)
    return out


def _value_key(expr, eq, lowerer):
    """(a key equal for two calls that compute the same value: expanded, with ``eq``'s indices
    renamed by position and their extents; the indices of ``eq`` that ``expr`` reads), or
    (None, None) when ``expr`` reads an index no output index gives."""
    free = [i for i in eq.indices if i in expr.free_symbols]
    ints = {x for x in expr.free_symbols if isinstance(x, sp.Symbol) and x.is_integer} \
        - set(lowerer.sizes) - {BATCH}
    if not ints <= set(free):
        return None, None
    rename = {v: sp.Symbol(f"·f{k}", integer=True) for k, v in enumerate(free)}
    extents = tuple(sp.srepr(eq.out.shape[list(eq.indices).index(i)]) for i in free)
    return (sp.srepr(sp.expand(expr.xreplace(rename))), extents), free


def _keep_in_forward(forward, kept):
    out = []
    for eq in forward:
        replace = {}
        for site_eq, expr, t in kept.values():
            if site_eq is eq:
                out.append(Equation(t, eq.indices, expr, layer=eq.layer,
                                    note=f"evaluated by {eq.out.name} and kept for the backward pass"))
                replace[expr] = t[tuple(eq.indices)]
        out.append(eq if not replace else
                   Equation(eq.out, eq.indices, sp.sympify(eq.body).xreplace(replace), layer=eq.layer, note=eq.note))
    return out


def _read_kept(eq, kept, produced, adjoints, lowerer):
    """``eq`` reading the kept tensors instead of evaluating their values."""
    replace = {}
    for e in _calls(eq.body, produced, adjoints):
        key, free = _value_key(e, eq, lowerer)
        if key in kept and e not in replace:
            replace[e] = kept[key][2][tuple(free)]
    return eq if not replace else Equation(eq.out, eq.indices, sp.sympify(eq.body).xreplace(replace),
                                           layer=eq.layer, note=eq.note)
