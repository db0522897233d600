"""Worker process: compile some kernels of one generated module into Numba's on-disk cache.

Run as a script by :mod:`chainrule.codegen.background` (``python _compile_worker.py MODULE_PATH
MODULE_NAME KERNELS_JSON``, or ``--warm-up DTYPE`` to start before the module exists and read
``[MODULE_PATH, MODULE_NAME, KERNELS_JSON]`` from standard input). It imports only NumPy, Numba and the generated module itself (no
SymPy, no chainrule), so it starts in a fraction of a second, and it compiles each kernel for
the exact argument types the caller will pass: Numba's ``Dispatcher.compile`` then saves the
machine code next to the module (``cache=True``), where the caller's first call finds it.
KERNELS_JSON is ``[[name, [arg, ...]], ...]`` with each ``arg`` either ``"int64"`` or
``[dtype, ndim]`` (a C-contiguous array) or ``"workspace"`` (the tuple of arrays the module's
plain-Python ``workspace`` function returns: its type is the same at every batch size).
"""
import os
import sys

# python puts this script's directory first on sys.path: its neighbours (cache.py, verify.py, ...)
# must not shadow the modules NumPy and Numba import
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import importlib.util  # noqa: E402
import json  # noqa: E402


def argument_type(arg, module):
    """The Numba type of one argument description (shared with ``CompiledModel.compile_now``);
    ``module``: the generated module, whose ``workspace`` gives the workspace tuple's type."""
    from numba import typeof, types
    if arg == "int64":
        return types.int64
    if arg == "workspace":
        return typeof(module.workspace(1))
    dtype, ndim = arg
    return types.Array(getattr(types, dtype), int(ndim), "C")


# the options of the generated kernels and of their _exp (njit and njit_ordered in
# templates/_header.py.j2): an implementation Numba compiles for one caller serves every later
# one, with the flags of the first
_NJIT_OPTIONS = dict(error_model="numpy", fastmath={"reassoc", "contract", "arcp", "nsz"})
_NJIT_ORDERED_OPTIONS = dict(error_model="numpy", fastmath={"contract"})


def warm_up_pieces(dtype: str):
    """What every generated module's kernels use and Numba compiles once per process, as small
    functions in the order a dense layer's ``train_step`` first needs them (each one returned
    uncalled: :func:`warm_then_wait` compiles them one by one until its job arrives). The first
    also pays Numba's own start (about 0.5 s, whatever it compiles); then np.empty of 1-D and 2-D
    arrays of the module's dtype, np.zeros, the min, max and bit view of the header's _exp
    (compiled with "contract" alone, as _exp is) and np.ascontiguousarray (train_step's flat
    gradients). Numba reuses each for the module's kernels when the argument types are the same."""
    import numpy as np
    from numba import njit
    DT = getattr(np, dtype)
    INT = np.int64 if dtype == "float64" else np.int32
    a = np.ones((2, 2), dtype=DT)

    @njit(**_NJIT_OPTIONS)
    def allocate(a):
        e1 = np.empty((a.shape[0],), dtype=DT)
        e2 = np.empty((a.shape[0], 3), dtype=DT)
        e1[0] = e2[0, 0] = 0.0
        return e1[0] + e2[0, 0]

    @njit(**_NJIT_OPTIONS)
    def zeros(a):
        return np.zeros((a.shape[0],), dtype=DT)[0] + np.zeros((a.shape[0], 3), dtype=DT)[0, 0]

    @njit(**_NJIT_ORDERED_OPTIONS)
    def exp_parts(x):
        y = min(max(x, DT(-1.0)), DT(1.0))
        return y * INT(1).view(DT)

    @njit(**_NJIT_OPTIONS)
    def flatten(a):
        return np.ascontiguousarray(a[0]).reshape(a.shape[1])[0] + np.ascontiguousarray(a).reshape(a.size)[0]

    return [lambda: allocate(a), lambda: zeros(a), lambda: exp_parts(DT(0.5)), lambda: flatten(a)]


def main(path, module_name, kernels_json) -> int:
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    for name, args in json.loads(kernels_json):
        kernel = getattr(module, name)
        if hasattr(kernel, "compile"):     # (a split module's driver is Python: nothing to compile)
            kernel.compile(tuple(argument_type(a, module) for a in args))
    return 0


def warm_then_wait(dtype: str) -> int:
    """``--warm-up DTYPE``: warm up until the job (a JSON line ``[path, module, kernels]``) arrives
    on standard input, then do it; end of input (the module was cached after all) ends the worker.
    Warming up stops at the job: a piece compiled after it would only delay its kernels (a module
    that uses the piece compiles it anyway, once)."""
    for piece in warm_up_pieces(dtype):
        piece()
        if _input_ready(sys.stdin):
            break
    line = sys.stdin.readline()
    if not line.strip():
        return 0
    return main(*json.loads(line))


def _input_ready(stream) -> bool:
    """True when a read of ``stream`` would not block (a line or its end has arrived)."""
    import select
    try:
        return bool(select.select([stream], [], [], 0)[0])
    except (OSError, ValueError):          # pragma: no cover - no select on this pipe (Windows)
        return False


if __name__ == "__main__":
    code = warm_then_wait(sys.argv[2]) if sys.argv[1] == "--warm-up" else main(*sys.argv[1:4])
    # Leave without the interpreter's teardown: with Numba and LLVM loaded it took 0.25-0.3 s, and
    # the parent waits for this exit before it loads the kernels. (Numba has closed every cache
    # file it wrote; an exception above still exits the ordinary way, with its traceback.)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
