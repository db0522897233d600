"""One SGD training step of the demo MLP (64 -> dense(128) -> sigmoid -> dense(10) -> softmax
cross-entropy): chainrule's generated ``train_step`` vs a hand-written NumPy step vs PyTorch eager.

All candidates run in one process, alternating round by round, on the same minibatch of
scikit-learn digits, from the same initial parameters, with the same number of BLAS threads
(threadpoolctl for NumPy/Numba's BLAS, ``torch.set_num_threads`` for PyTorch; the limit is
re-applied after warm-up because Numba loads SciPy's BLAS only when a kernel first calls it). Before timing, the
first step's cost and updated parameters of every candidate are checked against chainrule's.

    python benchmarks/bench_train_step.py                 # batch 32 and 256, float32 and float64
    python benchmarks/bench_train_step.py --threads 1 --batch 32 --dtype float32
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from chainrule.codegen import compile_model
from chainrule.derive import build_model
from chainrule.runtime.data import load_digits, one_hot

LR = 0.01


# -- the hand-written NumPy step (what a user would write without chainrule) --------------------
def numpy_step(p, x, y, lr):
    W1, b1, W2, b2 = p["W1"], p["b1"], p["W2"], p["b2"]
    n = x.shape[0]
    z1 = x @ W1.T
    z1 += b1
    a1 = 1.0 / (1.0 + np.exp(-z1))
    z2 = a1 @ W2.T
    z2 += b2
    m = z2.max(axis=1, keepdims=True)
    e = np.exp(z2 - m)
    s = e.sum(axis=1, keepdims=True)
    logp = z2 - m - np.log(s)
    cost = -(y * logp).sum() / n
    d2 = (e / s - y) / n                       # softmax + cross-entropy: p - y, batch mean
    d1 = (d2 @ W2) * a1 * (1.0 - a1)           # sigmoid' = a (1 - a)
    W2 -= lr * (d2.T @ a1)
    b2 -= lr * d2.sum(axis=0)
    W1 -= lr * (d1.T @ x)
    b1 -= lr * d1.sum(axis=0)
    return float(cost)


# -- PyTorch eager ----------------------------------------------------------------------------------
def make_torch_step(torch, params, dtype):
    tdtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    tp = {k: torch.tensor(v, dtype=tdtype, requires_grad=True) for k, v in params.items()}
    opt = torch.optim.SGD(list(tp.values()), lr=LR)
    F = torch.nn.functional

    def step(x, labels):
        opt.zero_grad(set_to_none=True)
        z1 = F.linear(x, tp["W1"], tp["b1"])
        z2 = F.linear(torch.sigmoid(z1), tp["W2"], tp["b2"])
        loss = F.cross_entropy(z2, labels)
        loss.backward()
        opt.step()
        return loss.item()

    return tp, step


def time_rounds(fns, rounds, inner):
    """Alternate the candidates round by round; return per-step times (µs) for each."""
    samples = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]   # rotate who goes first
        for name in order:
            fn = fns[name]
            t0 = time.perf_counter_ns()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter_ns() - t0) / inner / 1e3)
    return samples


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--dtype", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="BLAS / PyTorch threads (default: all cores)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--inner", type=int, default=0, help="steps per sample (default: by batch size)")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)

    from threadpoolctl import threadpool_limits
    threadpool_limits(args.threads)
    torch = None
    if not args.no_torch:
        try:
            import torch
            torch.set_num_threads(args.threads)
        except ImportError:
            print("PyTorch is not installed: comparing with NumPy only (pip install torch)")
    import numba
    print(f"python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}"
          + (f", torch {torch.__version__}" if torch else "")
          + f"; {args.threads} thread(s) on {os.cpu_count()} core(s); {platform.processor() or platform.machine()}")

    x_all, labels_all = load_digits()
    model = build_model("demo")
    rows = []
    for dtype in args.dtype:
        cm = compile_model(model, dtype=dtype)
        for batch in args.batch:
            x = np.ascontiguousarray(x_all[:batch], dtype=dtype)
            y = one_hot(labels_all[:batch], 10, dtype=dtype)
            init = cm.init_params(seed=0)

            # correctness: one step from the same parameters gives the same cost and update
            ref = {k: v.copy() for k, v in init.items()}
            c_ref = cm.train_step(ref, x, y, LR)
            npp = {k: v.copy() for k, v in init.items()}
            c_np = numpy_step(npp, x, y, LR)
            tol = 1e-4 if dtype == "float32" else 1e-10
            errs = {"numpy": max([abs(c_np - c_ref)] + [float(np.max(np.abs(npp[k] - ref[k]))) for k in ref])}
            fns = {}
            pc = {k: v.copy() for k, v in init.items()}
            fns["chainrule"] = lambda pc=pc, cm=cm, x=x, y=y: cm.train_step(pc, x, y, LR)
            raw = cm.module.train_step
            pr = [v.copy() for v in init.values()]
            hp = cm.hyper_vector(LR)           # (t, clip, lr): the SGD update's hyperparameters
            ws = cm.workspace(batch)           # the step's reused temporaries (empty for this MLP)
            fns["chainrule (raw njit)"] = lambda pr=pr, raw=raw, x=x, y=y, hp=hp, ws=ws: raw(*pr, x, y, hp, ws)
            pn = {k: v.copy() for k, v in init.items()}
            fns["numpy"] = lambda pn=pn, x=x, y=y: numpy_step(pn, x, y, LR)
            if torch is not None:
                tp, tstep = make_torch_step(torch, init, dtype)
                tx, tl = torch.from_numpy(x), torch.from_numpy(labels_all[:batch].copy())
                c_t = tstep(tx, tl)
                errs["torch"] = max([abs(c_t - c_ref)] + [float(np.max(np.abs(tp[k].detach().numpy() - ref[k])))
                                                         for k in ref])
                _, tstep2 = make_torch_step(torch, init, dtype)
                fns["torch eager"] = lambda tstep2=tstep2, tx=tx, tl=tl: tstep2(tx, tl)
            for name, e in errs.items():
                status = "ok" if e < tol else "MISMATCH"
                print(f"  check {dtype} batch {batch}: {name} vs chainrule max abs diff {e:.2e} ({status})")
            for fn in fns.values():               # warm up (JIT, allocator, thread pools)
                for _ in range(20):
                    fn()
            # the kernels load SciPy's BLAS lazily, on their first product: limit it now too
            threadpool_limits(args.threads)
            inner = args.inner or max(10, 4000 // batch)
            samples = time_rounds(fns, args.rounds, inner)
            med = {k: statistics.median(v) for k, v in samples.items()}
            rows.append((dtype, batch, med))

    names = list(rows[0][2])
    head = f"{'dtype':<8} {'batch':>5} " + " ".join(f"{n + ' µs':>22}" for n in names)
    head += "   " + " ".join(f"{n + '/chainrule':>18}" for n in names if n != "chainrule")
    print()
    print(head)
    for dtype, batch, med in rows:
        line = f"{dtype:<8} {batch:>5} " + " ".join(f"{med[n]:>22.1f}" for n in names)
        line += "   " + " ".join(f"{med[n] / med['chainrule']:>18.2f}" for n in names if n != "chainrule")
        print(line)
    print("\nmedian µs per training step (forward + backward + SGD update) over "
          f"{args.rounds} alternating rounds; ratio > 1 means chainrule is faster")
    return rows


if __name__ == "__main__":
    main()
