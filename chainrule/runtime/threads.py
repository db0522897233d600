"""How many BLAS threads a training loop's matrix products use.

A minibatch step of a small network makes matrix products of a few hundred thousand multiply-adds.
OpenBLAS splits a product over its threads from about 262 144 multiply-adds on (m·n·k, its
compile-time threshold) and its threads then spin while they wait for the next one: on two cores
that costs more than it saves, and with any other load on the machine it is far worse (the demo's
20 epochs on the 2-core test machine under load: 0.17 s of CPU and 0.48 s wall with one thread,
0.71 s and 2.1 s with two).
So ``Network.fit`` limits BLAS to one thread when the step's largest product is small, and leaves
the thread count to BLAS otherwise (see :func:`training_blas_threads`).

Where "small" ends is a judgement from measurements on that machine (``benchmarks/bench.py
--threads 1`` and ``--threads 2``, float32, under a load average of 11): with two threads every
BLAS-based step (chainrule's, NumPy's, Numba's by hand, PyTorch's) took 60-280 times longer at
batch 256 and 57-72 times longer at batch 1024 of the demo MLP (up to 8.4 M multiply-adds per
product), whereas on an idle machine a second thread can at best halve a product of a few
milliseconds. Below 2^24 multiply-adds (a few milliseconds on one core) the step stays on one
thread; the choice depends only on the model and the batch, never on the load, so that a run is
reproducible (see ``Network.fit``).
"""
from __future__ import annotations

from contextlib import contextmanager

# below this many multiply-adds in a step's largest product, one BLAS thread is faster (the same
# rule limits a kernel called directly, per call: chainrule.codegen.blas)
from chainrule.codegen.blas import SMALL_PRODUCT  # noqa: E402


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
    """BLAS (NumPy's and the one the kernels' ``_matmul`` calls) limited to ``limit`` threads inside the
    block; no limit for None, or when threadpoolctl is missing."""
    if limit is None:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:                   # pragma: no cover - a declared dependency
        yield
        return
    from chainrule.codegen.blas import load_kernel_blas
    load_kernel_blas()                    # the kernels' products call this BLAS: loaded so it is limited too
    with threadpool_limits(int(limit), user_api="blas"):
        yield
