"""One SGD training step of an Elman RNN, one thread: chainrule's generated ``train_step`` (a time
loop forward, backpropagation through time as a time loop backward) vs a hand-written NumPy step vs
PyTorch eager (``nn.RNN``, when installed: a benchmark extra, never a dependency).

    seq(32, 16) -> rnn(64) -> dense(10) -> softmax_cross_entropy,  batch 32

``--cell lstm`` or ``--cell gru`` times the same step with an LSTM or a GRU against PyTorch's
``nn.LSTM`` / ``nn.GRU`` (no NumPy column: the hand-written step is the Elman RNN's).

All candidates run in one process, alternating round by round, on the same minibatch and the same
initial parameters; each one's first cost is checked against chainrule's before timing. Prints
the medians and the ratios to chainrule.

    python benchmarks/bench_rnn.py [--rounds 50] [--dtype float32] [--hidden 64] [--steps 32] [--batch 32]
                                   [--clock wall|cpu] [--cell rnn|lstm|gru]

``--clock cpu`` times each step by the CPU time of the calling thread (``time.thread_time``): on a
shared machine it leaves out the time other processes hold the core, so the medians move less
with the load (every candidate runs on this one thread: BLAS and PyTorch are limited to one).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from chainrule.codegen import compile_model  # noqa: E402
from chainrule.derive import build_model  # noqa: E402

LR = 0.01
FEATURES, CLASSES = 16, 10


def numpy_step(p, x, y, lr):
    """The Elman RNN step by hand: forward over t, BPTT backward over t, SGD."""
    W, U, b, V, c = p["W1"], p["U1"], p["b1"], p["W2"], p["b2"]
    n, steps, _ = x.shape
    hs = np.zeros((steps + 1, n, U.shape[0]), dtype=x.dtype)          # hs[t + 1] = h_t, hs[0] = 0
    xw = x @ W.T + b                                                    # every step's input term at once
    for t in range(steps):
        hs[t + 1] = np.tanh(xw[:, t] + hs[t] @ U.T)
    logits = hs[-1] @ V.T + c
    mx = logits.max(axis=1, keepdims=True)
    e = np.exp(logits - mx)
    s = e.sum(axis=1, keepdims=True)
    cost = -(y * (logits - mx - np.log(s))).sum() / n
    d = (e / s - y) / n
    dV, dc = d.T @ hs[-1], d.sum(axis=0)
    dh = d @ V
    dz = np.empty((n, steps, U.shape[0]), dtype=x.dtype)
    for t in range(steps - 1, -1, -1):
        dz[:, t] = dh * (1 - hs[t + 1] ** 2)
        dh = dz[:, t] @ U
    dW = np.tensordot(dz, x, axes=([0, 1], [0, 1]))
    dU = np.tensordot(dz, hs[:-1].transpose(1, 0, 2), axes=([0, 1], [0, 1]))
    db = dz.sum(axis=(0, 1))
    for k, g in (("W1", dW), ("U1", dU), ("b1", db), ("W2", dV), ("b2", dc)):
        p[k] -= lr * g
    return float(cost)


GATES = {"rnn": "", "lstm": "ifgo", "gru": "rzn"}       # PyTorch's order of the stacked gates


def make_torch_step(torch, params, dtype, cell):
    """PyTorch's cell with chainrule's parameters loaded (gates stacked in PyTorch's order; the GRU's
    recurrent candidate bias is chainrule's ``bhn1``, every other recurrent bias zero)."""
    torch.set_num_threads(1)
    tdtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    hidden = params["W2"].shape[1]
    kind = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell]
    rnn = kind(FEATURES, hidden, batch_first=True).to(tdtype)
    head = torch.nn.Linear(hidden, CLASSES).to(tdtype)
    gates = GATES[cell] or [""]
    stack = lambda prefix: np.concatenate([params[f"{prefix}{g}1"] for g in gates])
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(torch.tensor(stack("W")))
        rnn.weight_hh_l0.copy_(torch.tensor(stack("U")))
        rnn.bias_ih_l0.copy_(torch.tensor(stack("b")))
        rnn.bias_hh_l0.zero_()
        if cell == "gru":
            rnn.bias_hh_l0[2 * hidden:] = torch.tensor(params["bhn1"])
        head.weight.copy_(torch.tensor(params["W2"]))
        head.bias.copy_(torch.tensor(params["b2"]))
    opt = torch.optim.SGD(list(rnn.parameters()) + list(head.parameters()), lr=LR)

    def step(x, y):
        opt.zero_grad()
        out, _ = rnn(x)
        logits = head(out[:, -1])
        loss = -(y * torch.log_softmax(logits, dim=1)).sum() / x.shape[0]
        loss.backward()
        opt.step()
        return float(loss.detach())
    step.modules = (rnn, head)
    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--cell", choices=sorted(GATES), default="rnn")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time; cpu: this thread's CPU time (steadier on a loaded machine)")
    args = ap.parse_args(argv)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)
    except ImportError:
        pass
    spec = (f"seq({args.steps}, {FEATURES}) -> {args.cell}({args.hidden}) -> dense({CLASSES}) -> "
            "softmax_cross_entropy")
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    cm = compile_model(build_model(spec), dtype=args.dtype)
    compile_s = time.perf_counter() - t0
    params = cm.init_params(0)
    x = rng.normal(size=(args.batch, args.steps, FEATURES)).astype(args.dtype)
    y = np.eye(CLASSES, dtype=args.dtype)[rng.integers(0, CLASSES, size=args.batch)]
    cands = {}
    p_cr = {k: v.copy() for k, v in params.items()}
    cands["chainrule"] = lambda: cm.train_step(p_cr, x, y, LR)
    if args.cell == "rnn":
        p_np = {k: v.copy() for k, v in params.items()}
        cands["numpy"] = lambda: numpy_step(p_np, x, y, LR)
    try:
        import torch
        tstep = make_torch_step(torch, params, args.dtype, args.cell)
        tx, ty = torch.tensor(x), torch.tensor(y)
        cands["pytorch eager"] = lambda: tstep(tx, ty)
    except ImportError:
        print("(PyTorch is not installed: its column is skipped)")
    first = {name: fn() for name, fn in cands.items()}
    for name, c in first.items():
        if abs(c - first["chainrule"]) > 1e-4 * max(1.0, abs(first["chainrule"])):
            raise SystemExit(f"{name}'s first cost {c} differs from chainrule's {first['chainrule']}")
    for fn in cands.values():
        fn()
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    times = {name: [] for name in cands}
    for _ in range(args.rounds):
        for name, fn in cands.items():
            t = clock()
            fn()
            times[name].append(clock() - t)
    base = statistics.median(times["chainrule"])
    print(f"\n{ {'rnn': 'Elman RNN', 'lstm': 'LSTM', 'gru': 'GRU'}[args.cell]} {spec}\nbatch {args.batch}, {args.dtype}, 1 thread, median of {args.rounds} "
          f"({args.clock} clock; kernels ready in {compile_s:.1f} s; load average {os.getloadavg()[0]:.2f}):")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<14} {med * 1e3:8.3f} ms   {med / base:5.2f}x chainrule's time")


if __name__ == "__main__":
    main()
