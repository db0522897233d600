"""Worker process: compile some kernels of one generated module into Numba's on-disk cache.

Run as a script by :mod:`chainrule.codegen.background` (``python _compile_worker.py MODULE_PATH
MODULE_NAME KERNELS_JSON``). It imports only NumPy, Numba and the generated module itself (no
SymPy, no chainrule), so it starts in a fraction of a second, and it compiles each kernel for
the exact argument types the caller will pass: Numba's ``Dispatcher.compile`` then saves the
machine code next to the module (``cache=True``), where the caller's first call finds it.
KERNELS_JSON is ``[[name, [arg, ...]], ...]`` with each ``arg`` either ``"int64"`` or
``[dtype, ndim]`` (a C-contiguous array).
"""
import os
import sys

# python puts this script's directory first on sys.path: its neighbours (cache.py, verify.py, ...)
# must not shadow the modules NumPy and Numba import
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import importlib.util  # noqa: E402
import json  # noqa: E402


def argument_type(arg):
    """The Numba type of one argument description (shared with ``CompiledModel.compile_now``)."""
    from numba import types
    if arg == "int64":
        return types.int64
    dtype, ndim = arg
    return types.Array(getattr(types, dtype), int(ndim), "C")


def main(path, module_name, kernels_json) -> int:
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    for name, args in json.loads(kernels_json):
        getattr(module, name).compile(tuple(argument_type(a) for a in args))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
