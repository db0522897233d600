"""Compiling a module's kernels in a worker process while the caller compiles another one.

Numba compiles one function at a time per process, and compiling is most of a cold start: the
demo's ``train_step`` (the forward and backward pass and the update) takes about 6 s of CPU time and
``forward`` (the per-epoch metrics) about 1 s more (measured on the 2-core test machine: the
main process of a cold ``chainrule demo`` used 12.6-13.5 s of CPU with the worker, 14.1 s
without; the worker itself 5 s, most of it its start-up, under a load average of 12). A training run needs both, so while the main
process compiles ``train_step`` on its first step, a worker compiles ``forward`` into Numba's
on-disk cache on the other core; the main process waits for the worker only when it first calls
``forward``, and then loads the compiled code from the cache instead of compiling it.

The worker (``_compile_worker.py``) imports only NumPy, Numba and the generated module. It is used
only where it can help and cannot hurt: the module is in a writable cache directory (kernels
compiled in memory belong to one process), it was just generated (so Numba's cache has nothing for
it yet), and a core is idle (:func:`idle_core`: two CPUs or more, and a load average below
the CPUs minus one half). A worker that fails or is too slow costs nothing
but the wait: the kernel is then compiled in the main process, as without a worker.
"""
from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("_compile_worker.py")
WAIT_SECONDS = 300            # longer than any module's compile; then the main process compiles it


def idle_core() -> bool:
    """True when a core is free for a worker: fewer runnable processes, averaged over the last
    minute, than CPUs minus one half. On a machine that is already busy a worker does not shorten
    anything: it only adds its own start-up (about 2 s of CPU time: NumPy, Numba and its
    initialisation, and the helpers it compiles again).

    ``CHAINRULE_COMPILE_WORKER=0`` never starts a worker, ``=1`` always does when there are two
    CPUs or more (to measure a cold start on a machine that others load, or to keep it off)."""
    cpus = available_cpus()
    choice = os.environ.get("CHAINRULE_COMPILE_WORKER", "").strip()
    if choice in ("0", "1"):
        return choice == "1" and cpus >= 2
    try:
        return cpus >= 2 and os.getloadavg()[0] < cpus - 0.5
    except (AttributeError, OSError):     # pragma: no cover - no load average (Windows)
        return cpus >= 2


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):     # pragma: no cover - not Linux
        return os.cpu_count() or 1


class BackgroundCompile:
    """A worker process compiling ``kernels`` (names) of the module at ``path``."""

    def __init__(self, path: Path, module_name: str, signatures: dict):
        self.kernels = set(signatures)
        self._proc = _spawn([str(path), module_name, _job(signatures)], stdin=subprocess.DEVNULL)
        atexit.register(self.stop)         # never outlive the process that started it

    @classmethod
    def warming_up(cls, dtype: str) -> "BackgroundCompile":
        """A worker started before its module exists: it compiles Numba's generic implementations
        of ``dtype`` (the matrix products and allocations every generated module uses; Numba keeps
        them per process) while this process renders the module, then waits for :meth:`assign`.
        On a cold demo that moves about 40 % of compiling train_step off the critical path."""
        self = cls.__new__(cls)
        self.kernels = set()
        self._proc = _spawn(["--warm-up", dtype], stdin=subprocess.PIPE)
        atexit.register(self.stop)
        return self

    def assign(self, path: Path, module_name: str, signatures: dict) -> "BackgroundCompile":
        """Give a warming-up worker its module and kernels."""
        self.kernels = set(signatures)
        try:
            self._proc.stdin.write((json.dumps([str(path), module_name, _job(signatures)]) + "\n").encode())
            self._proc.stdin.close()
        except OSError:                     # the worker died: the caller compiles (see wait)
            pass
        return self

    def wait(self) -> bool:
        """Wait for the worker; True when it compiled every kernel (else the caller compiles)."""
        try:
            return self._proc.wait(WAIT_SECONDS) == 0
        except subprocess.TimeoutExpired:
            self.stop()
            return False

    def stop(self):
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


def _job(signatures: dict) -> str:
    return json.dumps([[name, args] for name, args in signatures.items()])


def _spawn(args, stdin):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(WORKER), *args], stdin=stdin,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def argument_types(description, kernel: str) -> list:
    """The arguments ``CompiledModel`` passes to ``kernel`` of the module ``description`` (a
    ``ModelDescription``) describes, as the worker's type descriptions: ``[dtype, ndim]`` for a
    C-contiguous array, ``"int64"`` for the seed, ``"workspace"`` for the tuple the module's
    ``workspace`` returns. (From the description, not the module: a cold start hands the worker
    its job before this process imports the module.)"""
    d = description
    dt = d.dtype
    params = [[dt, len(shape)] for _, shape, *_ in d.params]
    buffers = [[dt, len(shape)] for _, shape, *_ in d.buffers]
    inputs = [[dt, len(a.dims)] for a in d.inputs]
    targets = [[dt, len(a.dims)] for a in d.targets]
    states = [[dt, len(shape)] for _, shape, *_ in d.params for _ in d.rule.state]
    return {
        "forward": params + buffers + inputs + targets + ["int64"],
        "loss_and_grads": params + buffers + inputs + targets + ["int64", "workspace"],
        "predict": params + buffers + inputs,
        "outputs": params + buffers + inputs,
        "train_step": params + states + buffers + inputs + targets + [["float64", 1], "workspace"],
    }[kernel]
