"""Recurrences over time: a tensor that reads itself (or reads, through other tensors, itself) at an
earlier time ``t - k``, with a declared initial state.

A recurrent tensor is declared with ``recurrent(H, axis, initial)``: ``axis`` is its time axis and
``initial`` what it holds before ``t = 0`` (``0``, or a parameter or input tensor of its shape without
the time axis, or without the time and batch axes: one learned state shared by every example).
Equations then read it the natural way, ``H[b, t-1, j]``; ``resolve`` rewrites every such *delayed*
read into the explicit definition

    H[b, t-1, j]  ->  { h0[b, j]      if t < 1
                      { H[b, t-1, j]  otherwise

written ``Delayed(h0[b, j], H[b, t-1, j], t-1)``: a function whose partial derivatives are the Iverson
brackets ``[t-1 < 0]`` and ``[t-1 ≥ 0]``, so that differentiation needs no special case (the delta
that ``H[b, t-1, j]`` gives is eliminated with its bracket as a summation limit or a guard), exact
evaluation reads it as the branch, and LaTeX prints it as the plain read ``H_{b, t-1, j}``. The
sequence length stays a symbol.

``schedule`` orders equations into *units*: an equation, or a ``TimeLoop`` of equations that read
each other across time (a strongly connected group of the read graph). A forward recurrence reads
the past (lags < 0) and runs t upward; its adjoint, backpropagation through time, reads the future
(``δ[t+1]``) and runs t downward. Inside one step the equations of a loop run in the order of their
same-time reads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from .deltas import Bracket
from .errors import ShapeError, SpecError, UnsupportedError
from .tensor import Equation, Tensor, shape_str


class Delayed(sp.Function):
    """``Delayed(initial, read, when)``: ``read`` (a read at time ``when``) where ``when ≥ 0``, and the
    initial state ``initial`` before the start (``when < 0``)."""

    nargs = 3

    def fdiff(self, argindex=1):
        when = self.args[2]
        if argindex == 1:
            return Bracket(when, -sp.oo, -1)
        if argindex == 2:
            return Bracket(when, 0, sp.oo)
        return sp.S.Zero                       # an index: no derivative

    def as_piecewise(self):
        initial, read, when = self.args
        return sp.Piecewise((initial, when < 0), (read, True))

    def _latex(self, printer):
        return printer._print(self.args[1])

    def _sympystr(self, printer):
        return printer._print(self.args[1])


def recurrent(tensor: Tensor, axis: int, initial=0) -> Tensor:
    """Declare ``tensor`` recurrent along ``axis``: its reads at ``t - k`` before the start give
    ``initial`` (0, or a parameter or input tensor: see the module docstring)."""
    if not 0 <= axis < tensor.rank:
        raise ShapeError(f"layer {tensor.layer or '?'}: {tensor.name} {shape_str(tensor.shape)} has no axis {axis}")
    if isinstance(initial, Tensor):
        state = [n for k, n in enumerate(tensor.shape) if k != axis]
        if tuple(initial.shape) not in (tuple(state), tuple(state[1:])):
            raise ShapeError(
                f"layer {tensor.layer or '?'}: the initial state {initial.name} {shape_str(initial.shape)} of "
                f"{tensor.name} {shape_str(tensor.shape)} must have the shape of one time step "
                f"{shape_str(tuple(state))} (or {shape_str(tuple(state[1:]))}, shared by every example)")
        if initial.role not in ("param", "input"):
            raise SpecError(f"layer {tensor.layer or '?'}: the initial state of {tensor.name} is a "
                            f"{initial.role} tensor; it must be 0, a parameter or an input")
    elif sp.sympify(initial) != 0:
        raise SpecError(f"layer {tensor.layer or '?'}: the initial state of {tensor.name} must be 0, a "
                        f"parameter or an input tensor, not {initial!r}")
    tensor.meta["time_axis"] = axis
    tensor.meta["initial"] = initial
    return tensor


def initial_value(tensor: Tensor, idx) -> sp.Expr:
    """What ``tensor`` holds before ``t = 0`` at the read index ``idx`` (its time entry ignored)."""
    init = tensor.meta["initial"]
    if not isinstance(init, Tensor):
        return sp.S.Zero
    rest = [e for k, e in enumerate(idx) if k != tensor.meta["time_axis"]]
    return init[tuple(rest)] if init.rank == len(rest) else init[tuple(rest[1:])]


def time_shift(expr, indices) -> tuple | None:
    """``s + c`` with ``s`` one of ``indices`` and ``c`` an integer -> (s, c), else None."""
    expr = sp.expand(sp.sympify(expr))
    free = [s for s in indices if s in expr.free_symbols]
    if len(free) != 1:
        return None
    s = free[0]
    c = expr - s
    return (s, int(c)) if c.is_Integer else None


def _delayed_reads(body, tensors, indices):
    """The reads of declared recurrent tensors at ``t - k`` (k ≥ 1, t an output index) in ``body``."""
    out = []
    for r in body.atoms(sp.Indexed):
        t = tensors.get(str(r.base.label))
        if t is None or "initial" not in t.meta:
            continue
        shift = time_shift(r.indices[t.meta["time_axis"]], indices)
        if shift is not None and shift[1] < 0:
            out.append((r, t, shift))
    return out


def resolve(equations, tensors: dict) -> list[Equation]:
    """Equations whose delayed reads of recurrent tensors give the declared initial state before
    ``t = 0`` (the branch of the module docstring); every other equation unchanged."""
    out = []
    for eq in equations:
        reads = _delayed_reads(eq.body, tensors, eq.indices)
        if not reads:
            out.append(eq)
            continue
        mapping = {}
        for r, t, (s, c) in reads:
            mapping[r] = Delayed(initial_value(t, r.indices), r, s + c)
        new = Equation(eq.out, eq.indices, eq.body.xreplace(mapping), layer=eq.layer, note=eq.note)
        new.declared = eq.body
        out.append(new)
    return out


# -- the read graph across time ----------------------------------------------------------------------------
def _time_index(eq: Equation, time_axis):
    axis = time_axis(eq.out)
    return None if axis is None else eq.indices[axis]


def _lags(eq: Equation, defined: dict, time_axis):
    """(tensor read, lag) for every read of a tensor in ``defined``: the lag is ``c`` of a read at
    ``t + c`` on both tensors' time axes, or None when the read is not aligned in time (a sum over t,
    a tensor without a time axis)."""
    out = []
    t_out = _time_index(eq, time_axis)
    for r in sorted(eq.body.atoms(sp.Indexed), key=sp.default_sort_key):     # (a set: sorted, for
        # one order of the equations within a step in every process, whatever the hash seed)
        name = str(r.base.label)
        if name not in defined:
            continue
        axis = time_axis(defined[name].out)
        lag = None
        if t_out is not None and axis is not None:
            shift = time_shift(r.indices[axis], [t_out])
            if shift is not None:
                lag = shift[1]
        out.append((name, lag))
    for s in eq.body.free_symbols:        # rank-0 tensors
        if s.name in defined and defined[s.name].out.rank == 0 and not s.is_integer:
            out.append((s.name, None))
    return out


@dataclass
class TimeLoop:
    """Equations that read each other across time, computed one time step at a time."""

    equations: list
    direction: int                    # +1: t upward (a forward recurrence); -1: downward (BPTT)
    time_axes: dict = field(default_factory=dict)     # tensor name -> its time axis

    @property
    def names(self):
        return [e.out.name for e in self.equations]


def schedule(equations, time_axis=None) -> list:
    """Equations (in a valid order for everything but the loops) as units: ``Equation`` or
    ``TimeLoop``, each after every unit it reads. ``time_axis(tensor)`` gives a tensor's time axis
    (None: it has none); by default its declared ``meta["time_axis"]``."""
    time_axis = time_axis or (lambda t: t.meta.get("time_axis"))
    defined = {eq.out.name: eq for eq in equations}
    order = [eq.out.name for eq in equations]
    edges = {n: _lags(defined[n], defined, time_axis) for n in order}
    components = _strongly_connected(order, {n: [m for m, _ in edges[n]] for n in order})
    comp_of = {n: k for k, comp in enumerate(components) for n in comp}
    units_by_comp = {}
    for k, comp in enumerate(components):
        loop = len(comp) > 1 or any(m == comp[0] for m, _ in edges[comp[0]])
        if not loop:
            units_by_comp[k] = defined[comp[0]]
            continue
        units_by_comp[k] = _time_loop(comp, defined, edges, time_axis)
    # the components in an order where each comes after those it reads (stable: declaration order)
    done, out = set(), []
    pending = list(range(len(components)))
    while pending:
        for k in pending:
            needs = {comp_of[m] for n in components[k] for m, _ in edges[n]} - {k}
            if needs <= done:
                out.append(units_by_comp[k])
                done.add(k)
                pending.remove(k)
                break
        else:                                    # pragma: no cover - the condensation is acyclic
            raise UnsupportedError("the equations' components read each other in a cycle")
    return out


def _time_loop(comp, defined, edges, time_axis) -> TimeLoop:
    inside = set(comp)
    lags = [(n, m, lag) for n in comp for m, lag in edges[n] if m in inside]
    for n, m, lag in lags:
        if lag is None:
            eq = defined[n]
            raise UnsupportedError(
                f"layer {eq.layer or '?'}: {eq.out.name} reads {m} inside a recurrence, but not at one "
                f"time step (t - k) of its time axis: a recurrence reads its past one step at a time")
    past = [lag for _, _, lag in lags if lag < 0]
    future = [lag for _, _, lag in lags if lag > 0]
    if past and future:
        n, m, lag = next(x for x in lags if x[2] > 0)
        eq = defined[n]
        t = _time_index(eq, time_axis)
        raise UnsupportedError(
            f"layer {eq.layer or '?'}: {eq.out.name} reads {m} at {t}+{lag} (the future) in a causal "
            f"recurrence that reads its past: a recurrence reads only earlier time steps")
    if not past and not future:
        raise UnsupportedError("cycle through " + " -> ".join(comp + [comp[0]]) + " at one time step "
                               "(a recurrence must read its own past, at t-1 or t-k)")
    # the order inside one step: by the same-time reads
    order, state = [], {}

    def visit(n, path):
        if state.get(n) == "done":
            return
        if state.get(n) == "active":
            raise UnsupportedError("cycle through " + " -> ".join(path + [n]) + " at one time step "
                                   "(within a step, the equations of a recurrence must not read each other "
                                   "in a cycle)")
        state[n] = "active"
        for m, lag in edges[n]:
            if m in inside and lag == 0:
                visit(m, path + [n])
        state[n] = "done"
        order.append(n)
    for n in comp:
        visit(n, [])
    return TimeLoop([defined[n] for n in order], 1 if past else -1,
                    {n: time_axis(defined[n].out) for n in order})


def _strongly_connected(nodes, succ) -> list[list]:
    """Tarjan's algorithm (iteratively), components in the order of ``nodes`` within each."""
    index, low, on, stack, comps, counter = {}, {}, set(), [], [], [0]
    pos = {n: k for k, n in enumerate(nodes)}
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter([m for m in succ[root] if m in pos]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            n, it = work[-1]
            for m in it:
                if m not in index:
                    index[m] = low[m] = counter[0]
                    counter[0] += 1
                    stack.append(m)
                    on.add(m)
                    work.append((m, iter([x for x in succ[m] if x in pos])))
                    break
                if m in on:
                    low[n] = min(low[n], index[m])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[n])
                if low[n] == index[n]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on.discard(m)
                        comp.append(m)
                        if m == n:
                            break
                    comps.append(sorted(comp, key=pos.get))
    return comps


def flatten(units) -> list[Equation]:
    out = []
    for u in units:
        out.extend(u.equations if isinstance(u, TimeLoop) else [u])
    return out


# -- inferring time axes and checking a model's recurrences ---------------------------------------------------
def infer_time_axes(equations, tensors: dict):
    """Give every tensor on a cycle through a recurrent tensor a time axis: the output axis whose
    index its equation uses on the time axis of the recurrent tensors it reads (a gate of an LSTM)."""
    changed = True
    while changed:
        changed = False
        for eq in equations:
            if "time_axis" in eq.out.meta:
                continue
            for r in sorted(eq.body.atoms(sp.Indexed), key=sp.default_sort_key):
                t = tensors.get(str(r.base.label))
                if t is None or "time_axis" not in t.meta:
                    continue
                shift = time_shift(r.indices[t.meta["time_axis"]], eq.indices)
                if shift is not None and shift[0] in eq.indices and _on_cycle(eq, t, equations):
                    eq.out.meta["time_axis"] = eq.indices.index(shift[0])
                    changed = True
                    break


def _on_cycle(eq, t, equations) -> bool:
    """Does ``t`` (read by ``eq``) depend on ``eq.out``?"""
    defined = {e.out.name: e for e in equations}
    seen, stack = set(), [t.name]
    while stack:
        n = stack.pop()
        if n == eq.out.name:
            return True
        if n in seen or n not in defined:
            continue
        seen.add(n)
        stack.extend(m for m, _ in defined[n].reads())
    return False


def explain_cycle(path, defined: dict) -> str:
    """The message for a cycle of reads that is not a declared recurrence."""
    for a, b in zip(path, path[1:]):
        eq = defined[a]
        for name, idx in eq.reads():
            if name != b:
                continue
            for e in idx:
                shift = time_shift(e, eq.indices)
                if shift is None or shift[1] == 0:
                    continue
                s, c = shift
                t = defined[b].out
                if c < 0:
                    return (f"layer {eq.layer or '?'}: {eq.out.name} reads {b}[{', '.join(map(str, idx))}] "
                            f"at {s}{c}, a recurrence, but {b} {shape_str(t.shape)} declares no initial state: "
                            f"declare it with recurrent({b}, axis, initial=0 | a parameter | an input)")
                return (f"layer {eq.layer or '?'}: {eq.out.name} reads {b}[{', '.join(map(str, idx))}] "
                        f"at {s}+{c}, the future, in a causal recurrence: a recurrence reads only earlier "
                        f"time steps")
    return ("cycle through " + " -> ".join(path) +
            " (recurrences need a time index, a read at t-1 and a declared initial state)")


def across_time(eq: Equation, source: Equation, idx) -> bool:
    """Is this read of ``source`` by ``eq`` at another time step (t + k, k ≠ 0)?"""
    a, b = eq.out.meta.get("time_axis"), source.out.meta.get("time_axis")
    if a is None or b is None:
        return False
    shift = time_shift(idx[b], [eq.indices[a]])
    return shift is not None and shift[1] != 0


def ordered_units(equations) -> list:
    """Equations given in any order (the adjoints of a model) as units of ``schedule``: each after
    the equations it reads at the same step; reads across time are a time loop's business."""
    by_name = {eq.out.name: eq for eq in equations}
    order, state = [], {}

    def visit(eq, path):
        name = eq.out.name
        if state.get(name) == "done":
            return
        if state.get(name) == "active":
            raise UnsupportedError("the equations read each other in a cycle at one time step: "
                                   + " -> ".join(path + [name]))
        state[name] = "active"
        for dep, idx in eq.reads():
            if dep in by_name and dep != name and not across_time(eq, by_name[dep], idx):
                visit(by_name[dep], path + [name])
        state[name] = "done"
        order.append(eq)
    for eq in equations:
        visit(eq, [])
    return schedule(order)


__all__ = ["recurrent", "resolve", "schedule", "TimeLoop", "flatten", "infer_time_axes", "time_shift",
           "explain_cycle", "initial_value", "ordered_units", "Delayed"]
