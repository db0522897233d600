"""A training step's large temporaries, allocated once per batch size and reused by every step.

Why. Each ``np.empty``/``np.zeros`` of a kernel is a ``malloc``. An array larger than glibc's
mmap threshold (128 KiB at first) gets fresh pages from the operating system, and when a step
frees its temporaries the top of the heap is given back (trimmed) as soon as more than twice the
largest of them is free: the next step faults every page in again, and the kernel zeroes each one.
Measured on the 28x28 CNN (batch 64, float32): 5 700 page faults and 10-12 ms of system time per
step, next to 14-17 ms of computation; PyTorch's step had about 100. With the step's temporaries
allocated once by the caller, the step faults no page at all.

What. ``use_workspace`` rewrites the blocks of generated code of one function (``loss_and_grads``):
every allocation statement ``name = np.empty(shape, dtype=DT)`` (or ``np.zeros``, or an integer
dtype: a recorded argmax) at the top level
of the function (never inside a loop: a time loop's per-step slices stay as they are), of at least
``MIN_BYTES`` at a batch of ``TYPICAL_BATCH``, and whose array the function does not return (found
by following assignments back from the returned names: a gradient is handed to the caller, who may
keep it), becomes ``name = u_ws[k]`` (``np.zeros``: then filled with zeros, as before). The module's
``workspace(n_batch)`` allocates the same arrays with the same shape expressions; the runtime
(``CompiledModel``) keeps one per batch size and passes it to each step. A workspace belongs to
one model and is used by one call at a time (a step is not re-entrant).

The rewriting reads the code this package generated (with ``ast``), never user text.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass

# an array of at least this many bytes at this batch size is reused: below glibc's mmap
# threshold (128 KiB) malloc recycles freed blocks itself, and a small array costs nothing to
# allocate; a tuple element costs about half a microsecond to pass at every call
MIN_BYTES = 128 * 1024
TYPICAL_BATCH = 32
ALLOCATORS = ("empty", "zeros")
INTEGERS = {"int8": 1, "int16": 2, "int32": 4, "int64": 8}


@dataclass
class Allocation:
    """One reused array: the name it is bound to, its allocation (code), whether it starts zeroed."""

    name: str
    code: str
    zeroed: bool


def _allocation(stmt) -> tuple[str, ast.Call] | None:
    """``name = np.empty(shape, dtype=DT)`` or ``np.zeros``: (name, the call), else None."""
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
        return None
    call = stmt.value
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
            and isinstance(call.func.value, ast.Name) and call.func.value.id == "np"
            and call.func.attr in ALLOCATORS and len(call.args) == 1):
        return None
    if len(call.keywords) != 1 or call.keywords[0].arg != "dtype":
        return None
    dtype = call.keywords[0].value        # DT, or an integer type (a recorded argmax): np.int8
    if not (isinstance(dtype, ast.Name) and dtype.id == "DT" or isinstance(dtype, ast.Attribute)
            and isinstance(dtype.value, ast.Name) and dtype.value.id == "np" and dtype.attr in INTEGERS):
        return None
    return stmt.targets[0].id, call


def _elements(shape, n_batch: int) -> int | None:
    """The number of elements of a shape expression (integers, ``n_batch``, ``+``, ``*``) at the
    given batch size; None for anything else (such an allocation is left alone)."""
    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id == "n_batch":
            return n_batch
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Add)):
            a, b = value(node.left), value(node.right)
            if a is None or b is None:
                return None
            return a * b if isinstance(node.op, ast.Mult) else a + b
        return None
    if not isinstance(shape, ast.Tuple):
        return None
    total = 1
    for e in shape.elts:
        v = value(e)
        if v is None:
            return None
        total *= v
    return total


def _fresh(expr) -> bool:
    """``expr`` is a new array that shares no memory with the arrays it reads: the product
    ``_matmul(a, b)`` or ``np.dot(..)`` (a weight gradient ``_matmul(δ.reshape(..).T, x)``), or a
    reshape or transpose of one."""
    while isinstance(expr, (ast.Call, ast.Attribute)):
        if isinstance(expr, ast.Attribute) and expr.attr == "T":
            expr = expr.value
        elif isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name):
            return expr.func.id == "_matmul"
        elif isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute):
            if isinstance(expr.func.value, ast.Name) and expr.func.value.id == "np":
                return expr.func.attr == "dot"
            if expr.func.attr not in ("reshape", "transpose"):
                return False
            expr = expr.func.value
        else:
            return False
    return False


def _escaping(tree, returned) -> set:
    """The names whose arrays may reach ``returned``: an assignment ``a = expr`` to such a name
    makes every name read in ``expr`` one too (a view, a reshape, an alias), unless ``expr`` is a
    fresh allocation."""
    sources: dict = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            reads = set() if _fresh(node.value) else \
                {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)}
            for target in node.targets:
                if isinstance(target, ast.Name):
                    sources.setdefault(target.id, set()).update(reads)
    out, stack = set(), list(returned)
    while stack:
        name = stack.pop()
        if name in out:
            continue
        out.add(name)
        stack.extend(sources.get(name, ()))
    return out


def use_workspace(blocks: list[str], returned: list[str], itemsize: int) -> tuple[list[str], list[Allocation]]:
    """(the blocks with their large temporaries read from ``u_ws``, the allocations of the
    workspace in order). ``returned``: the names the function returns."""
    tree = ast.parse("\n".join(blocks))
    escaping = _escaping(tree, returned)
    allocations: list[Allocation] = []
    out = []
    for block in blocks:
        lines = block.split("\n")
        for stmt in ast.parse(block).body:
            found = _allocation(stmt)
            if found is None or stmt.end_lineno != stmt.lineno:
                continue
            name, call = found
            size = _elements(call.args[0], TYPICAL_BATCH)
            dtype = call.keywords[0].value
            width = INTEGERS[dtype.attr] if isinstance(dtype, ast.Attribute) else itemsize
            if name in escaping or size is None or size * width < MIN_BYTES:
                continue
            zeroed = call.func.attr == "zeros"
            k = len(allocations)
            allocations.append(Allocation(name, ast.unparse(call), zeroed))
            line = f"{name} = u_ws[{k}]  # reused from the workspace: {ast.unparse(call)}"
            if zeroed:
                line += f"\n{name}.fill(0.0)"
            lines[stmt.lineno - 1] = line
        out.append("\n".join(lines))
    return out, allocations
