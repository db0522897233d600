"""Values a recurrence's forward step computes and its backward pass needs again, kept as sequences.

Why. The LSTM's state is ``h = o ⊙ tanh(c)``; its derived adjoints read ``tanh(c)`` again:
``d_o = tanh(c) ⊙ d_h`` and ``d_c = (1 - tanh(c)²) o ⊙ d_h + ...``. Lowered as they stand, the
backward time loop evaluates ``tanh`` twice per element and step, in a loop that also reads a
dozen sequences; measured on the benchmark LSTM (batch 32, 32 steps, 64 units, float32), those two
calls were about half of the backward time loop (2.3 of 4.7 ms), while storing ``tanh(c)`` in the
forward step costs one store per element.

The GRU's is a contraction: its candidate reads ``r ⊙ (Σ_j Un[o, j] h[b, t-1, j] + b_hn)``, and
the derived ``d_r`` reads the same sum again, one more matrix product per backward step.

What. ``keep_forward_values`` rewrites the forward and backward units of a recurrent model: a
value the backward pass evaluates, a scalar function (``tanh``, σ, ``exp``, ...) of one read of a
sequence a forward time loop computes, or a sum reading one, which a forward equation of that
loop evaluates too at its own point (``tanh(c[b, t, k])`` in ``h``'s equation), becomes a sequence
of that loop, ``K[b, t, k] = tanh(c[b, t, k])``, computed just before that equation in the same
step; the forward equation and every backward equation read ``K`` instead of evaluating it. Values are unchanged (the
same function of the same number, evaluated once), and each generated statement still cites the
equation it comes from (``K``'s own equation says what it keeps).
"""
from __future__ import annotations

import sympy as sp

from ..derive.layers import B as BATCH
from ..derive.recurrence import Delayed, TimeLoop, flatten
from ..derive.tensor import Equation, Tensor


def keep_forward_values(forward_units, backward_units, lowerer):
    """(forward units, backward units) with the kept values as sequences (see the module docstring)."""
    owner = {name: loop for loop in forward_units if isinstance(loop, TimeLoop) for name in loop.names}
    if not owner:
        return forward_units, backward_units
    kept = {}                       # key -> (loop, forward equation, its expression, kept tensor)
    for eq in flatten(backward_units):
        for expr in _candidates(eq.body, owner):
            key, _ = _value_key(expr, eq, lowerer)
            if key is not None and key not in kept:
                site = _forward_site(expr, key, owner, lowerer)
                if site is not None:
                    kept[key] = site + (_kept_tensor(site, lowerer),)
    if not kept:
        return forward_units, backward_units
    forward = [_keep_in_loop(u, kept) if isinstance(u, TimeLoop) else u for u in forward_units]
    backward = [TimeLoop([_read_kept(e, kept, lowerer) for e in u.equations], u.direction, dict(u.time_axes))
                if isinstance(u, TimeLoop) else _read_kept(u, kept, lowerer) for u in backward_units]
    return forward, backward


def _candidates(body, owner):
    """The values in ``body`` worth keeping: calls ``f(X[..])`` of a scalar function of one read,
    and sums, that read a sequence of a forward loop."""
    out = []
    for e in sp.preorder_traversal(sp.sympify(body)):
        if isinstance(e, sp.Sum) or (isinstance(e, sp.Function) and not isinstance(e, (Delayed, sp.Piecewise))
                                     and len(e.args) == 1 and isinstance(e.args[0], sp.Indexed)):
            if any(str(r.base.label) in owner for r in e.atoms(sp.Indexed)):
                out.append(e)
    return out


def _value_key(expr, eq, lowerer):
    """(a key equal for two values that compute the same thing: their summed indices renamed in
    order, their free indices by position among ``eq``'s indices, with the extents; those free
    indices), or (None, None) when ``expr`` reads an index that ``eq``'s indices do not give (one
    bound by a sum around it)."""
    free = [i for i in eq.indices if i in expr.free_symbols]
    ints = {x for x in expr.free_symbols if isinstance(x, sp.Symbol) and x.is_integer} - set(lowerer.sizes) - {BATCH}
    bound = []
    for node in sp.preorder_traversal(expr):
        if isinstance(node, sp.Sum):
            bound += [v for v, _, _ in node.limits if v not in bound]
    if not ints - set(bound) <= set(free):
        return None, None
    rename = {v: sp.Symbol(f"·b{k}", integer=True) for k, v in enumerate(bound)}
    rename.update({v: sp.Symbol(f"·f{k}", integer=True) for k, v in enumerate(free)})
    extents = tuple(sp.srepr(eq.out.shape[list(eq.indices).index(i)]) for i in free)
    return (sp.srepr(expr.xreplace(rename)), extents), free


def _forward_site(expr, key, owner, lowerer):
    """(loop, equation, expression) where a forward loop's equation evaluates the value of ``key``
    over all of its own indices; None when none does."""
    loops = {id(owner[str(r.base.label)]): owner[str(r.base.label)]
             for r in expr.atoms(sp.Indexed) if str(r.base.label) in owner}
    for loop in loops.values():
        for eq in loop.equations:
            for e in _candidates(eq.body, owner):
                k, free = _value_key(e, eq, lowerer)
                if k == key and list(free) == list(eq.indices):
                    return loop, eq, e
    return None


def _kept_tensor(site, lowerer) -> Tensor:
    loop, eq, _ = site
    name = lowerer.fresh("kept")
    axis = loop.time_axes[eq.out.name]
    t = Tensor(name, eq.out.shape, role="hidden", layer=eq.layer, meta={"time_axis": axis})
    lowerer.tensors[name], lowerer.names[name] = t, name
    return t


def _keep_in_loop(loop: TimeLoop, kept) -> TimeLoop:
    """``loop`` with each kept value of its equations a sequence, defined just before the
    equation that evaluates it (which then reads it)."""
    mine = [(eq, expr, t) for lp, eq, expr, t in kept.values() if lp is loop]
    if not mine:
        return loop
    equations, axes = [], dict(loop.time_axes)
    for eq in loop.equations:
        replace = {}
        for site_eq, expr, t in mine:
            if site_eq is eq:
                equations.append(Equation(t, eq.indices, expr, layer=eq.layer,
                                          note=f"evaluated by {eq.out.name}'s step and kept for the backward pass"))
                axes[t.name] = loop.time_axes[eq.out.name]
                replace[expr] = t[tuple(eq.indices)]
        body = sp.sympify(eq.body).xreplace(replace)
        equations.append(eq if not replace else Equation(eq.out, eq.indices, body, layer=eq.layer, note=eq.note))
    return TimeLoop(equations, loop.direction, axes)


def _read_kept(eq: Equation, kept, lowerer) -> Equation:
    """``eq`` reading the kept sequences instead of evaluating their values."""
    replace = {}
    body = sp.sympify(eq.body)
    for e in sp.preorder_traversal(body):
        if isinstance(e, sp.Sum) or isinstance(e, sp.Function):
            key, free = _value_key(e, eq, lowerer)
            if key in kept and e not in replace:
                replace[e] = kept[key][3][tuple(free)]
    return eq if not replace else Equation(eq.out, eq.indices, body.xreplace(replace), layer=eq.layer,
                                           note=eq.note)
