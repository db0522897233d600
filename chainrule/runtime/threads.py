"""How many BLAS threads a training loop's matrix products use.

A minibatch step of a small network makes matrix products of a few hundred thousand multiply-adds.
OpenBLAS splits a product over its threads from about 262 144 multiply-adds on (m·n·k, its
compile-time threshold) and its threads then spin while they wait for the next one: on two cores
that costs more than it saves, and with any other load on the machine it is far worse (the demo's
50 epochs on the 2-core test machine under load: 0.17 s of CPU with one thread, 0.71 s with two).
So ``Network.fit`` limits BLAS to one thread when the step's largest product is small, and leaves
the thread count to BLAS otherwise (see :func:`training_blas_threads`).
"""
from __future__ import annotations

from contextlib import contextmanager

# below this many multiply-adds in a step's largest product, one BLAS thread is faster
SMALL_PRODUCT = 1 << 22


def training_blas_threads(param_shapes, batch_size, requested="auto"):
    """The BLAS thread limit for training: ``requested`` when it is a number, None (BLAS's own
    choice) for None, and for ``"auto"`` 1 when the largest parameter times the batch (a dense
    layer's product, m·n·k) is below :data:`SMALL_PRODUCT`, else None."""
    if requested != "auto":
        return requested
    largest = 0
    for shape in param_shapes:
        size = 1
        for n in shape:
            size *= int(n)
        largest = max(largest, size)
    if not isinstance(batch_size, int) or largest * batch_size >= SMALL_PRODUCT:
        return None
    return 1


@contextmanager
def blas_threads(limit):
    """BLAS (NumPy's and the one Numba's ``np.dot`` calls) limited to ``limit`` threads inside the
    block; no limit for None, or when threadpoolctl is missing."""
    if limit is None:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:                   # pragma: no cover - a declared dependency
        yield
        return
    import scipy.linalg.cython_blas  # noqa: F401  (Numba's np.dot calls this BLAS: loaded so it is limited too)
    with threadpool_limits(int(limit), user_api="blas"):
        yield
