"""Large models: one compiled function per kernel, called in order by plain Python drivers.

Why. A model's ``loss_and_grads`` is one ``@njit`` function holding every kernel. LLVM's passes
over a function are not linear in its size: SROA (one alloca per Numba variable), loop
vectorisation and loop-load elimination walk the whole function for every loop, so doubling the
function about quadruples their time. A 2-block GPT's ``loss_and_grads`` took 130 s of CPU to
compile (1 block: 48 s), and ``train_step``, which calls it, links and optimises all of it again.

Splitting the function does not help by itself: Numba links a callee's LLVM module into its
caller and LLVM inlines a function called once, which rebuilds the giant function (measured:
worse than the monolith). So a large model's kernels are called from *Python*: each kernel is a
small ``@njit(cache=True)`` function compiled (and cached on disk) once, whichever driver calls it,
and the drivers (``forward``, ``loss_and_grads``, ``train_step``, ...) are plain Python that pass
arrays from one kernel to the next. A call costs a few microseconds, which a large model's step
(tens of milliseconds) does not notice; a small model keeps its one fused function, where it does.

The splitting is generic: a block of generated statements becomes a function of the names it
reads that earlier code defined, returning the names that later code reads (found with ``ast``
in the code this package generated, never in user text). Identical blocks share one function.
"""
from __future__ import annotations

import ast
import textwrap

from .lower import IND, comment_text

# a module whose fused loss_and_grads would be longer than this many lines is split
SPLIT_ABOVE_LINES = 600


class DriverCode(str):
    """A step that runs in the Python driver itself (binding flat views of a parameter before the
    shared update kernel), not in a kernel of its own."""


def _names(code: str) -> tuple[list, list]:
    """(names read, names assigned) by a block of generated code, in order of appearance."""
    loads, stores = [], []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name):
            (stores if isinstance(node.ctx, ast.Store) else loads).append(node.id)
    return list(dict.fromkeys(loads)), list(dict.fromkeys(stores))


def _heading(code: str) -> str:
    """The first comment of a block (the equation it implements), for the driver's call site."""
    for line in code.splitlines():
        if line.strip().startswith("#"):
            return line.strip()
    return "# (kernel)"


class KernelSplitter:
    """Collects the blocks of every driver of one module (``add``), then turns each distinct block
    into one kernel function and each driver into calls (``finish``). A block that two drivers
    share (the forward pass of ``forward`` and of ``loss_and_grads``) is one function returning
    what either of them reads later, so it is compiled once."""

    def __init__(self):
        self._drivers: dict = {}                 # driver -> its steps (code)
        self._outs: dict = {}                    # code -> names some driver reads after it
        self._args: dict = {}                    # code -> its arguments

    def add(self, driver: str, blocks: list[str], known: list[str], returned: list[str]):
        """``known``: the names the driver has before its first block (its arguments);
        ``returned``: what it returns after its last."""
        parsed = [_names(b) for b in blocks]
        reads_after, later = [], set(returned)
        for loads, stores in reversed(parsed):
            reads_after.append(set(later))
            later |= set(loads) - set(stores)       # what it reads of earlier code
        reads_after.reverse()
        defined, calls = set(known), []
        for code, (loads, stores), after in zip(blocks, parsed, reads_after):
            calls.append(code)
            if isinstance(code, DriverCode):
                defined |= set(stores)
                continue
            # a name the block assigns is its own (a loop index, an accumulator), never an argument
            args = [n for n in loads if n in defined and n not in stores]
            if self._args.setdefault(code, args) != args:
                raise AssertionError(f"codegen: one block reads different names in two drivers: {args}")
            outs = self._outs.setdefault(code, [])
            outs.extend(n for n in stores if n in after and n not in outs)
            defined |= set(stores)
        self._drivers[driver] = calls

    def finish(self) -> tuple[list[str], dict]:
        """(kernel function sources, ``{driver: its steps}``: a comment line and a call each)."""
        names, functions = {}, []
        for code, args in self._args.items():       # (driver code is never in _args)
            outs = self._outs[code]
            name = f"k{len(names)}_{outs[0] if outs else 'in_place'}"[:40]
            ret = (", ".join(outs) + ("," if len(outs) == 1 else "")) if outs else "None"
            functions.append(f"def {name}({', '.join(args)}):\n{IND}_wide_vectors()\n"
                             f"{textwrap.indent(code, IND)}\n"
                             f"{IND}return {ret}")
            names[code] = name
        drivers = {}
        for driver, calls in self._drivers.items():
            lines = []
            for code in calls:
                if isinstance(code, DriverCode):
                    lines.append(str(code))
                    continue
                outs = self._outs[code]
                call = f"{names[code]}({', '.join(self._args[code])})"
                lines.append(comment_text(_heading(code)) + "\n"
                             + (f"{', '.join(outs)}{',' if len(outs) == 1 else ''} = {call}" if outs else call))
            drivers[driver] = lines
        return functions, drivers


def fused_length(context: dict) -> int:
    """Lines the fused ``loss_and_grads`` of a planned module would have."""
    return sum(len(b.splitlines()) for b in context["forward_train"] + context["backward"])
