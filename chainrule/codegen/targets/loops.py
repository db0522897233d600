"""A recurrence (or its adjoint, backpropagation through time) printed as one loop over t.

The array printer prints an equation as one whole-tensor statement; a ``TimeLoop`` cannot be one,
because step t reads what step t-1 (or, going backward, t+1) wrote. So it is printed the way the
Numba lowering prints it (``Lowerer.time_loop_kernel``): a loop over t whose body computes every
equation of the loop on one time slice, with whole-tensor statements over the other axes:

* the loop's time index t is replaced in every body by the loop variable;
* a read of a sequence at ``t + c`` becomes a read of its time slice, taken at the start of the
  step: a view of the sequence inside it, and outside it the declared initial state (a delayed read,
  ``Delayed(initial, H[.., t-1, ..], t-1)``) or zeros (an adjoint read beyond the last step);
* a read at ``t`` of a tensor the loop computes earlier in the same step is that step's value;
* each result is stored into its whole sequence, which later steps, later equations and the
  backward pass read.

Conditions on t left in a body (``[t = T-1]``: the last step receives the output's gradient;
``[t ≤ T-2]``: a step with a future) are scalar conditions on the loop variable, printed as the
target's conditional. The framework spells the loop itself (``ArrayPrinter.time_loop``): a Python
loop of tensor operations in PyTorch, ``jax.lax.fori_loop`` in JAX (traced once, not unrolled).
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from ...derive.errors import UnsupportedError
from ...derive.recurrence import Delayed, TimeLoop, time_shift
from ...derive.tensor import substitute
from ..lower import comment_text, pretty
from .arrays import identifier


@dataclass
class TimeSlice:
    """The value of sequence ``tensor`` at step ``t + shift``, held in ``ident`` during a step."""

    tensor: str               # the sequence's tensor name
    ident: str                # the slice's identifier in the generated code
    axis: int                 # the sequence's time axis
    shift: int                # c of t + c
    initial: sp.Expr          # what it holds outside the sequence (0 or the declared initial state)
    indices: tuple            # the indices ``initial`` is written in (the slice's axes)


def loop_block(printer, loop: TimeLoop, prepare) -> str:
    """The lines of one time loop: a comment with its equations, then the target's loop.
    ``prepare(eq)`` returns an equation's body ready to print (sizes and constants substituted)."""
    first = loop.equations[0]
    length = int(printer.shapes[first.out.name][loop.time_axes[first.out.name]])
    t = identifier("t", printer.taken)
    ts = sp.Dummy(t, integer=True)            # distinct from every index of the equations
    printer.loop_vars[ts] = t
    slices: dict = {}
    produced: dict = {}
    steps = []
    try:
        for eq in loop.equations:
            axis = loop.time_axes[eq.out.name]
            body = substitute(prepare(eq), {eq.indices[axis]: ts})
            body = _sliced(printer, body, ts, slices, produced)
            now = _register(printer, f"{eq.out.name}@{t}", printer.names[eq.out.name] + "_now",
                            _without(printer.shapes[eq.out.name], axis))
            rest = eq.indices[:axis] + eq.indices[axis + 1:]
            lines = _statement(printer, now, rest, body)
            produced[eq.out.name] = now
            step = [f"# {comment_text(pretty(eq))}, at step {t}"] + lines
            step.append(printer.store(printer.names[eq.out.name], axis, eq.out.rank, t,
                                      printer.names[now]) + f"  # store {comment_text(eq.out.name)} at step {t}")
            steps.append(step)
        slice_lines = []
        for sl in slices.values():
            slice_lines += _slice_lines(printer, sl, t, length)
    finally:
        printer.loop_vars.pop(ts)
    what = ("forward in time (a recurrence)" if loop.direction > 0
            else "backward in time (backpropagation through time)")
    head = [f"# time loop, {what}: " + ", ".join(comment_text(e.out.name) for e in loop.equations)]
    head += [f"#   {comment_text(pretty(e))}" for e in loop.equations]
    sequences = [(printer.names[e.out.name], printer.shape_code_of(printer.shapes[e.out.name]))
                 for e in loop.equations]
    body = slice_lines + [ln for step in steps for ln in step]
    return "\n".join(head + printer.time_loop(ts.name, length, loop.direction, sequences, body))


def _without(shape, axis):
    return tuple(n for k, n in enumerate(shape) if k != axis)


def _register(printer, name, ident, shape) -> str:
    """A step-local tensor (a slice, a step's result) known to the printer by ``name``."""
    if name not in printer.names:
        printer.names[name] = identifier(ident, printer.taken)
        printer.shapes[name] = shape
    return name


def _statement(printer, name, indices, body) -> list:
    for i, n in zip(indices, printer.shapes[name]):
        printer.enter(i, 0, n - 1)
    try:
        return printer.statement(printer.names[name], indices, body)
    finally:
        for i in indices:
            printer.leave(i)


def _sliced(printer, body, ts, slices, produced):
    """``body`` at one step: each read of a sequence at ``ts + c`` (and each delayed read of a
    recurrence) replaced by a read of its time slice; a read at ``ts`` of what this step computed
    earlier, by that value."""
    def time_axis(read):
        hits = [k for k, e in enumerate(read.indices) if ts in sp.sympify(e).free_symbols]
        if len(hits) != 1 or time_shift(read.indices[hits[0]], [ts]) is None:
            return None
        return hits[0]

    t = printer.loop_vars[ts]

    def slice_read(read, initial=sp.S.Zero, initial_indices=()):
        name = str(read.base.label)
        axis = time_axis(read)
        if axis is None or name not in printer.shapes:
            return None
        shift = time_shift(read.indices[axis], [ts])[1]
        rest = read.indices[:axis] + read.indices[axis + 1:]
        if shift == 0 and name in produced:
            return sp.IndexedBase(produced[name])[tuple(rest)]
        key = (name, shift, initial)
        if key not in slices:
            tag = "t" if shift == 0 else (f"m{-shift}" if shift < 0 else f"p{shift}")
            at = t if shift == 0 else f"{t}{shift:+d}"
            key_name = f"{name}@{at}" + ("" if initial == 0 else f"|{len(slices)}")
            sl = _register(printer, key_name, f"{printer.names[name]}_{tag}",
                           _without(printer.shapes[name], axis))
            slices[key] = TimeSlice(name, sl, axis, shift, initial, initial_indices)
        return sp.IndexedBase(slices[key].ident)[tuple(rest)]

    def delayed(e):
        initial, read, _ = e.args
        axis = time_axis(read)
        if axis is None:
            raise UnsupportedError(f"export: the delayed read {read} is not at one step t - k of a time loop")
        rest = [v for k, v in enumerate(read.indices) if k != axis]
        if initial != 0 and not all(isinstance(v, sp.Symbol) for v in rest):
            raise UnsupportedError(f"export: the initial state {initial} is read at {read.indices}: "
                                   f"a recurrence's state is read at plain indices")
        fresh = tuple(sp.Symbol(f"s{k}_", integer=True) for k in range(len(rest)))
        init = sp.sympify(initial).xreplace(dict(zip(rest, fresh))) if initial != 0 else sp.S.Zero
        return slice_read(read, init, fresh if initial != 0 else ())

    body = body.replace(lambda e: isinstance(e, Delayed), delayed)
    unsliced = [r for r in body.atoms(sp.Indexed) if ts in r.free_symbols and slice_read(r) is None]
    body = body.replace(lambda e: isinstance(e, sp.Indexed) and ts in e.free_symbols
                        and slice_read(e) is not None, slice_read)
    if unsliced:
        raise UnsupportedError(f"export: the read {unsliced[0]} in a time loop is not at one time step "
                               f"t + c of a sequence")
    return body


def _slice_lines(printer, sl: TimeSlice, t: str, length: int) -> list:
    """Lines setting a slice at the start of a step: a view of the sequence inside it, the initial
    state (or zeros) outside it."""
    seq = printer.names[sl.tensor]
    rank = len(printer.shapes[sl.tensor])
    at = t if sl.shift == 0 else f"{t} {'-' if sl.shift < 0 else '+'} {abs(sl.shift)}"
    ident = printer.names[sl.ident]
    if sl.shift == 0:
        return [f"{ident} = {printer.step_slice(seq, sl.axis, rank, at, length)}"
                f"  # {comment_text(sl.tensor)} at step {t}"]
    inside = f"{at} >= 0" if sl.shift < 0 else f"{at} <= {length - 1}"
    outside = "the initial state before the start" if sl.initial != 0 else "zeros outside the sequence"
    lines = [f"# {comment_text(sl.tensor)} at step {at} ({outside})"]
    init_lines = _statement(printer, sl.ident, sl.indices, sl.initial) if sl.initial != 0 else []
    return lines + printer.slice_or_initial(ident, seq, sl.axis, rank, at, inside, length, init_lines,
                                            printer.shape_code_of(printer.shapes[sl.ident]))
