"""One BLAS thread around a kernel call whose matrix products are small.

The generated kernels multiply through ``_matmul`` (their header's direct call of gemm, through
Numba's own entry point ``numba_xxgemm``), which calls SciPy's BLAS (its ``cython_blas``). OpenBLAS splits a product over its threads from about 2^18 multiply-adds on, and
on two cores the second thread costs more than it saves below about 2^24 (the measurements are in
``chainrule.runtime.threads``; with any other work on the machine it is far worse:
``benchmarks/bench.py --threads 2`` under a load average of 4.4 had the demo MLP's batch-256 step at
26 ms, against 0.53 ms on one thread). ``Network.fit`` limits BLAS for a whole training run; a
kernel called directly (``CompiledModel.train_step`` in a user's own loop, the benchmarks) gets the
same rule per call: when the largest parameter times the batch is below :data:`SMALL_PRODUCT`, the
BLAS the kernels call runs on one thread during the call and gets its thread count back after.
That costs a read of the count (about 1 µs) when it already is one (inside ``fit``, or with
``OPENBLAS_NUM_THREADS=1``) and two more calls (about 3 µs) otherwise.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

# below this many multiply-adds in a step's largest product, one BLAS thread is faster
SMALL_PRODUCT = 1 << 24
# up to this many, OpenBLAS runs a product on one thread by itself (its GEMM_MULTITHREAD_THRESHOLD,
# 4 x 65536): the call needs no limit (the demo MLP at batch 32: 8192 x 32)
ONE_THREAD_ANYWAY = 1 << 18

_LIBRARIES = None
_CYTHON_BLAS = "scipy.linalg.cython_blas"


def load_kernel_blas():
    """Load SciPy's ``cython_blas``, the BLAS the kernels' products call (Numba's ``numba_xxgemm``
    imports it by name on a kernel's first product), without the ``scipy.linalg`` package around it.

    Why: importing the package costs 0.2 s on an idle machine and 0.4-0.8 s under load (its array-API
    layer, f2py, every linear-algebra routine), a sixth of a warm ``chainrule demo``, and the kernels
    need only this one extension module's table of BLAS functions. Numba's import of the name finds
    the module in ``sys.modules``. A later ``import scipy.linalg`` works as always and still gets
    its ``cython_blas`` attribute (:class:`_BindCythonBlas`). When ``scipy.linalg`` is already
    imported, or the extension is not where SciPy keeps it, this is the ordinary import."""
    if _CYTHON_BLAS in sys.modules:
        return sys.modules[_CYTHON_BLAS]
    import scipy
    path = None
    if "scipy.linalg" not in sys.modules:
        folder = os.path.join(os.path.dirname(scipy.__file__), "linalg")
        path = next((p for p in (os.path.join(folder, "cython_blas" + s)
                                 for s in importlib.machinery.EXTENSION_SUFFIXES) if os.path.isfile(p)), None)
    if path is None:
        import scipy.linalg.cython_blas as module
        return module
    loader = importlib.machinery.ExtensionFileLoader(_CYTHON_BLAS, path)
    spec = importlib.util.spec_from_file_location(_CYTHON_BLAS, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_CYTHON_BLAS] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_CYTHON_BLAS]
        raise
    sys.meta_path.insert(0, _BindCythonBlas())
    return module


class _BindCythonBlas(importlib.abc.MetaPathFinder):
    """Once: when ``scipy.linalg`` is imported after :func:`load_kernel_blas` loaded its
    ``cython_blas`` directly, the package gets the attribute ``cython_blas`` (the module already
    loaded), as the ordinary import of a submodule would have set it."""

    def find_spec(self, name, path=None, target=None):
        if name != "scipy.linalg":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.cython_blas = sys.modules[_CYTHON_BLAS]
        spec.loader.exec_module = exec_module
        return spec


def kernel_blas() -> list:
    """threadpoolctl's controllers of the BLAS the kernels call: SciPy's (NumPy's own copy, which
    the kernels never call, is left alone when they are separate libraries); [] without
    threadpoolctl."""
    global _LIBRARIES
    if _LIBRARIES is None:
        try:
            import numpy
            from threadpoolctl import ThreadpoolController
            load_kernel_blas()             # (loaded before the scan, so that it is found)
        except ImportError:                # pragma: no cover - declared dependencies
            _LIBRARIES = []
            return _LIBRARIES
        blas = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
        numpy_dir = os.path.dirname(os.path.dirname(os.path.realpath(numpy.__file__)))
        numpys = {os.path.join(numpy_dir, "numpy.libs"), os.path.join(numpy_dir, "numpy")}
        others = [lib for lib in blas if not any(os.path.realpath(lib.filepath).startswith(d + os.sep)
                                                 for d in numpys)]
        _LIBRARIES = [_get_and_set(lib) for lib in others or blas]
    return _LIBRARIES


def _get_and_set(lib):
    """(get, set) of a library's thread count: OpenBLAS's own two functions, found once (looking
    them up through threadpoolctl on every call costs 10-20 µs: it tries each symbol prefix);
    threadpoolctl's methods for another BLAS, or for OpenBLAS on OpenMP (per-thread limits)."""
    find = getattr(lib, "_get_symbol", None)
    if find is not None and getattr(lib, "internal_api", "") == "openblas" \
            and getattr(lib, "threading_layer", "") != "openmp":
        get, set_ = find("openblas_get_num_threads"), find("openblas_set_num_threads")
        if get is not None and set_ is not None:
            return get, set_
    return (lambda: lib.num_threads), lib.set_num_threads


def call_on_one_thread(kernel, *args):
    """``kernel(*args)`` with the kernels' BLAS on one thread, its thread count restored after."""
    saved = []
    for get, set_ in kernel_blas():
        n = get()
        if n != 1:
            set_(1)
            saved.append((set_, n))
    try:
        return kernel(*args)
    finally:
        for set_, n in saved:
            set_(n)
