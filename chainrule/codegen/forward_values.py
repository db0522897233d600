"""Values a recurrence's forward step computes and its backward pass needs again, kept as sequences.

Why. The LSTM's state is ``h = o ⊙ tanh(c)``; its derived adjoints read ``tanh(c)`` again:
``d_o = tanh(c) ⊙ d_h`` and ``d_c = (1 - tanh(c)²) o ⊙ d_h + ...``. Lowered as they stand, the
backward time loop evaluates ``tanh`` twice per element and step, in a loop that also reads a
dozen sequences; measured on the benchmark LSTM (batch 32, 32 steps, 64 units, float32), those two
calls were about half of the backward time loop (2.3 of 4.7 ms), while storing ``tanh(c)`` in the
forward step costs one store per element.

What. ``keep_forward_values`` rewrites the forward and backward units of a recurrent model: a
scalar function (``tanh``, σ, ``exp``, ...) of one read of a sequence that a forward time loop
computes, which the backward pass evaluates and the forward loop evaluates too at the step's own
point (``tanh(c[b, t, k])`` in ``h``'s equation), becomes a sequence of that loop, ``K[b, t, k] =
tanh(c[b, t, k])``, computed right after ``c`` in the same fused pass; the forward equation and
every backward equation read ``K`` instead of calling the function. Values are unchanged (the
same function of the same number, evaluated once), and each generated statement still cites the
equation it comes from (``K``'s own equation says what it keeps).
"""
from __future__ import annotations

import sympy as sp

from ..derive.recurrence import Delayed, TimeLoop, flatten
from ..derive.tensor import Equation, Tensor


def keep_forward_values(forward_units, backward_units, lowerer):
    """(forward units, backward units) with the kept values as sequences (see the module docstring)."""
    owner = {name: loop for loop in forward_units if isinstance(loop, TimeLoop) for name in loop.names}
    if not owner:
        return forward_units, backward_units
    kept = {}                                  # (function, tensor name) -> the kept tensor
    for eq in flatten(backward_units):
        for call in _calls(eq.body, owner):
            key = _key(call)
            if key not in kept and _computed_forward(call, owner[key[1]]):
                kept[key] = None
    if not kept:
        return forward_units, backward_units
    forward = [_keep_in_loop(u, kept, lowerer) if isinstance(u, TimeLoop) else u for u in forward_units]
    backward = [_read_kept_loop(u, kept) if isinstance(u, TimeLoop) else _read_kept(u, kept)
                for u in backward_units]
    return forward, backward


def _calls(body, owner):
    """The calls ``f(X[..])`` in ``body`` of a scalar function of one read of a loop's sequence."""
    out = []
    for e in sp.preorder_traversal(sp.sympify(body)):
        if not isinstance(e, sp.Function) or isinstance(e, (Delayed, sp.Piecewise)) or len(e.args) != 1:
            continue
        arg = e.args[0]
        if isinstance(arg, sp.Indexed) and str(arg.base.label) in owner:
            out.append(e)
    return out


def _key(call):
    return call.func, str(call.args[0].base.label)


def _computed_forward(call, loop) -> bool:
    """The loop evaluates the same function of the same tensor at some equation's own point."""
    name = str(call.args[0].base.label)
    for eq in loop.equations:
        for e in _calls(eq.body, {name}):
            if e.func == call.func and tuple(e.args[0].indices) == tuple(eq.indices):
                return True
    return False


def _keep_in_loop(loop: TimeLoop, kept, lowerer) -> TimeLoop:
    """``loop`` with a sequence for each kept value of its tensors, defined right after the
    tensor's own equation, and its equations reading it."""
    mine = {k for k in kept if k[1] in loop.names}
    if not mine:
        return loop
    equations, axes = [], dict(loop.time_axes)
    by_name = {e.out.name: e for e in loop.equations}
    for func, name in sorted(mine, key=lambda k: (k[1], str(k[0]))):
        src = by_name[name]
        t = src.out
        k_name = lowerer.fresh("kept")
        k_t = Tensor(k_name, t.shape, role="hidden", layer=t.layer, meta={"time_axis": loop.time_axes[name]})
        lowerer.tensors[k_name], lowerer.names[k_name] = k_t, k_name
        kept[(func, name)] = k_t
        axes[k_name] = loop.time_axes[name]
    for eq in loop.equations:
        equations.append(_read_kept(eq, kept))
        for (func, name), k_t in kept.items():
            if name == eq.out.name and k_t is not None:
                equations.append(Equation(k_t, eq.indices, func(eq.out[tuple(eq.indices)]), layer=eq.layer,
                                          note=f"{func.__name__}({name}), kept by the forward step for "
                                               f"the backward pass"))
    return TimeLoop(equations, loop.direction, axes)


def _read_kept(eq: Equation, kept) -> Equation:
    """``eq`` reading the kept sequences instead of calling their functions."""
    def is_kept(e):
        return isinstance(e, sp.Function) and len(e.args) == 1 and isinstance(e.args[0], sp.Indexed) \
            and kept.get(_key(e)) is not None

    body = sp.sympify(eq.body)
    new = body.replace(is_kept, lambda e: kept[_key(e)][tuple(e.args[0].indices)])
    return eq if new == body else Equation(eq.out, eq.indices, new, layer=eq.layer, note=eq.note)


def _read_kept_loop(loop: TimeLoop, kept) -> TimeLoop:
    return TimeLoop([_read_kept(e, kept) for e in loop.equations], loop.direction, dict(loop.time_axes))
