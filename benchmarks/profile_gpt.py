"""Where a GPT training step's time goes: the CPU time of each compiled kernel of the split module
(``chainrule.codegen.split``), summed over a number of Adam steps of ``bench_gpt.py``'s model (2 layers,
4 heads, width 64, context 64, batch 16, float32, one thread).

Each kernel of the generated module is wrapped in a timer (the drivers look their kernels up in the
module's namespace at every call), the steps are run, and the kernels are printed from the most
expensive, with the equation each implements. The wrapped step's median is printed beside an
unwrapped one: their difference is the timers' own cost; the step's median minus the kernels' sum
is what the Python drivers cost.

    python benchmarks/profile_gpt.py [--steps 30] [--top 40]
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_gpt import BATCH, CONTEXT, LR, char_gpt_setup  # noqa: E402

from chainrule.runtime.text import batch_starts, windows  # noqa: E402


def kernels(module) -> dict:
    """The module's compiled kernels (``k<n>_...``, Numba dispatchers), by name."""
    return {name: fn for name, fn in vars(module).items()
            if name[:1] == "k" and name[1:2].isdigit() and hasattr(fn, "py_func")}


def equation_of(source: str, name: str) -> str:
    """The first comment of a kernel: the equation it implements."""
    lines = source.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"def {name}("))
    return next((ln.strip() for ln in lines[start + 1:start + 6] if ln.strip().startswith("#")), "")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--top", type=int, default=40, help="print this many kernels")
    args = ap.parse_args(argv)
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)
    codec, train_ids, _, cm = char_gpt_setup()
    params, state = cm.init_params(0), cm.init_state()
    starts = batch_starts(len(train_ids), CONTEXT, BATCH, 2 * args.steps + 1, 0)
    data = [windows(train_ids, s, CONTEXT, codec.vocab, "float32") for s in starts]
    cm.train_step(params, *data[0], lr=LR, state=state, step=1)     # compiles or loads every kernel
    threadpool_limits(1)                                           # (SciPy's BLAS, loaded by then)
    clock = time.process_time

    def steps(first):
        out = []
        for r in range(first, first + args.steps):
            t = clock()
            cm.train_step(params, *data[r], lr=LR, state=state, step=r + 1)
            out.append(clock() - t)
        return out

    spent, calls = collections.defaultdict(float), collections.Counter()
    module, originals = cm.module, kernels(cm.module)
    for name, fn in originals.items():
        def timed(*a, _fn=fn, _name=name):
            t = clock()
            try:
                return _fn(*a)
            finally:
                spent[_name] += clock() - t
                calls[_name] += 1
        setattr(module, name, timed)
    try:
        wrapped = steps(1)
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)
    plain = steps(1 + args.steps)
    per_step = {n: spent[n] / args.steps * 1e3 for n in spent}
    total = sum(per_step.values())
    print(f"{cm.module_path.name}: {len(originals)} kernels; load average "
          f"{'/'.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"step median {statistics.median(plain) * 1e3:.2f} ms CPU (with the timers "
          f"{statistics.median(wrapped) * 1e3:.2f} ms); kernels {total:.2f} ms per step, in "
          f"{sum(calls.values()) // args.steps} calls")
    for name, ms in sorted(per_step.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{ms:7.3f} ms {ms / total:6.1%}  x{calls[name] // args.steps:<3d} {name:<24} "
              f"{equation_of(cm.source, name)[:100]}")


if __name__ == "__main__":
    main()
