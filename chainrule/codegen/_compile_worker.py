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


# the options of the generated kernels (templates/_header.py.j2): an implementation Numba compiles
# for one caller serves every later one, with the flags of the first
_NJIT_OPTIONS = dict(error_model="numpy", fastmath={"reassoc", "contract", "arcp", "nsz"})


def warm_up(dtype: str):
    """Compile, before the module exists, what every generated module's kernels use and Numba
    compiles once per process: np.dot of 2-D arrays for the three layout pairs of a dense layer's
    step (x Wᵀ, δ W, δᵀ a), np.empty and np.zeros of 1-D and 2-D arrays of the module's dtype,
    np.ascontiguousarray of both (train_step's flat gradients), and the min, max and bit view of
    the header's _exp (compiled without fastmath flags, as _exp is)."""
    import numpy as np
    from numba import njit
    DT = getattr(np, dtype)
    INT = np.int64 if dtype == "float64" else np.int32

    @njit(error_model="numpy", fastmath=False)
    def exp_parts(x):
        y = min(max(x, DT(-1.0)), DT(1.0))
        return y * INT(1).view(DT)
    exp_parts(DT(0.5))

    @njit(**_NJIT_OPTIONS)
    def products(a, b):
        c = np.dot(a, b.T)
        d = np.dot(c, b)
        e = np.dot(c.T, a)
        z1 = np.zeros((a.shape[0],), dtype=DT)
        z2 = np.zeros((a.shape[0], 3), dtype=DT)
        e1 = np.empty((a.shape[0],), dtype=DT)
        e2 = np.empty((a.shape[0], 3), dtype=DT)
        e1[0] = e2[0, 0] = 0.0
        f1 = np.ascontiguousarray(e1).reshape(e1.shape[0])
        f2 = np.ascontiguousarray(e2).reshape(e2.shape[0] * 3)
        return c[0, 0] + d[0, 0] + e[0, 0] + z1[0] + z2[0, 0] + e1[0] + e2[0, 0] + f1[0] + f2[0]
    a = np.ones((2, 2), dtype=DT)
    products(a, a)


def main(path, module_name, kernels_json) -> int:
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    for name, args in json.loads(kernels_json):
        getattr(module, name).compile(tuple(argument_type(a, module) for a in args))
    return 0


def warm_then_wait(dtype: str) -> int:
    """``--warm-up DTYPE``: warm up, then read the job (a JSON line ``[path, module, kernels]``)
    from standard input; end of input (the module was cached after all) ends the worker."""
    warm_up(dtype)
    line = sys.stdin.readline()
    if not line.strip():
        return 0
    return main(*json.loads(line))


if __name__ == "__main__":
    if sys.argv[1] == "--warm-up":
        sys.exit(warm_then_wait(sys.argv[2]))
    sys.exit(main(*sys.argv[1:4]))
