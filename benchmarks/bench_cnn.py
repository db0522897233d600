"""One SGD training step of two CNNs, one thread: chainrule's generated ``train_step`` vs a
hand-written NumPy step (im2col with ``sliding_window_view`` and ``tensordot``) vs PyTorch eager
(when installed: ``pip install torch``, a benchmark extra, never a dependency).

* digits CNN: 1x8x8 -> conv 8@3x3 -> relu -> maxpool 2x2 -> dense 10 -> softmax cross-entropy, batch 64
* 28x28 CNN:  1x28x28 -> conv 16@5x5 -> relu -> maxpool 2 -> conv 32@5x5 -> relu -> maxpool 2 -> dense 10, batch 64

All candidates run in one process, alternating round by round, on the same minibatch and the same
initial parameters; the first step's cost of every candidate is checked against chainrule's before
timing. Prints medians and the ratios to chainrule.

    python benchmarks/bench_cnn.py [--rounds 30] [--dtype float32]
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
from numpy.lib.stride_tricks import sliding_window_view

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from chainrule.codegen import compile_model  # noqa: E402
from chainrule.derive import build_model  # noqa: E402

LR = 0.01
MODELS = {
    "digits CNN (8x8, conv 8@3x3, pool 2, dense 10)":
        ("8x8 -> conv(8, 3) -> relu -> maxpool(2) -> flatten -> dense(10) -> softmax_cross_entropy", (1, 8, 8)),
    "28x28 CNN (conv 16@5x5, pool, conv 32@5x5, pool, dense 10)":
        ("28x28 -> conv(16, 5) -> relu -> maxpool(2) -> conv(32, 5) -> relu -> maxpool(2) -> flatten -> dense(10) "
         "-> softmax_cross_entropy", (1, 28, 28)),
}


# -- a hand-written NumPy step (what a user would write without chainrule) ----------------------------
def conv_fwd(x, W, b):
    k = W.shape[2]
    cols = sliding_window_view(x, (k, k), axis=(2, 3))             # (n, c, ho, wo, k, k)
    return np.tensordot(cols, W, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2) + b[None, :, None, None]


def conv_bwd(x, W, dy, need_dx):
    k = W.shape[2]
    cols = sliding_window_view(x, (k, k), axis=(2, 3))
    dW = np.tensordot(dy, cols, axes=([0, 2, 3], [0, 2, 3]))        # (f, c, k, k)
    db = dy.sum(axis=(0, 2, 3))
    dx = None
    if need_dx:                                                      # full correlation with the flipped kernel
        pad = np.pad(dy, ((0, 0), (0, 0), (k - 1, k - 1), (k - 1, k - 1)))
        pcols = sliding_window_view(pad, (k, k), axis=(2, 3))
        dx = np.tensordot(pcols, W[:, :, ::-1, ::-1], axes=([1, 4, 5], [0, 2, 3])).transpose(0, 3, 1, 2)
    return dW, db, dx


def pool_fwd(a):
    n, c, h, w = a.shape
    r = a.reshape(n, c, h // 2, 2, w // 2, 2)
    m = r.max(axis=(3, 5))
    return m, r


def pool_bwd(r, m, dm):
    mask = r == m[:, :, :, None, :, None]
    return (mask * dm[:, :, :, None, :, None]).reshape(r.shape[0], r.shape[1], r.shape[2] * 2, r.shape[4] * 2)


def numpy_step(p, x, y, lr, convs):
    acts, h = [], x
    for k in range(1, convs + 1):
        z = conv_fwd(h, p[f"W{k}"], p[f"b{k}"])
        a = np.maximum(z, 0)
        m, r = pool_fwd(a)
        acts.append((h, z, r, m))
        h = m
    W, bias = p[f"W{convs + 1}"], p[f"b{convs + 1}"]
    n = x.shape[0]
    flat = h.reshape(n, -1)
    logits = flat @ W.reshape(W.shape[0], -1).T + bias
    mx = logits.max(axis=1, keepdims=True)
    e = np.exp(logits - mx)
    s = e.sum(axis=1, keepdims=True)
    cost = -(y * (logits - mx - np.log(s))).sum() / n
    d = (e / s - y) / n
    dW = (d.T @ flat).reshape(W.shape)
    dh = (d @ W.reshape(W.shape[0], -1)).reshape(h.shape)
    W -= lr * dW
    bias -= lr * d.sum(axis=0)
    for k in range(convs, 0, -1):
        h_in, z, r, m = acts[k - 1]
        da = pool_bwd(r, m, dh) * (z > 0)
        dWk, dbk, dh = conv_bwd(h_in, p[f"W{k}"], da, need_dx=k > 1)
        p[f"W{k}"] -= lr * dWk
        p[f"b{k}"] -= lr * dbk
    return float(cost)


def make_torch_step(torch, params, dtype, convs):
    torch.set_num_threads(1)
    tdtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    tp = {k: torch.tensor(v, dtype=tdtype, requires_grad=True) for k, v in params.items()}
    opt = torch.optim.SGD(list(tp.values()), lr=LR)
    F = torch.nn.functional

    def step(x, y):
        opt.zero_grad()
        h = x
        for k in range(1, convs + 1):
            h = F.max_pool2d(F.relu(F.conv2d(h, tp[f"W{k}"], tp[f"b{k}"])), 2)
        W = tp[f"W{convs + 1}"]
        logits = h.reshape(h.shape[0], -1) @ W.reshape(W.shape[0], -1).T + tp[f"b{convs + 1}"]
        loss = -(y * torch.log_softmax(logits, dim=1)).sum() / x.shape[0]
        loss.backward()
        opt.step()
        return loss.item()
    step.params = tp                 # the updated parameters, for the first-step check of bench.py
    return step


def bench(label, spec, shape, dtype, rounds, batch=64, seed=0):
    rng = np.random.default_rng(seed)
    model = build_model(spec)
    cm = compile_model(model, dtype=dtype)
    convs = sum(1 for _, layer in model.layers if layer.describe().startswith("conv"))
    params = cm.init_params(seed)
    x = rng.normal(size=(batch, *shape)).astype(dtype)
    y = np.eye(10, dtype=dtype)[rng.integers(0, 10, size=batch)]
    cands = {}
    p_cr = {k: v.copy() for k, v in params.items()}
    cands["chainrule"] = lambda: cm.train_step(p_cr, x, y, LR)
    p_np = {k: v.copy() for k, v in params.items()}
    cands["numpy"] = lambda: numpy_step(p_np, x, y, LR, convs)
    try:
        import torch
        tstep = make_torch_step(torch, params, dtype, convs)
        tx, ty = torch.tensor(x), torch.tensor(y)
        cands["pytorch eager"] = lambda: tstep(tx, ty)
    except ImportError:
        pass
    first = {name: fn() for name, fn in cands.items()}          # warm-up (JIT) and agreement
    for name, c in first.items():
        if abs(c - first["chainrule"]) > 1e-4 * max(1.0, abs(first["chainrule"])):
            raise SystemExit(f"{label}: {name}'s first cost {c} differs from chainrule's {first['chainrule']}")
    for fn in cands.values():
        fn()
    times = {name: [] for name in cands}
    for _ in range(rounds):
        for name, fn in cands.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["chainrule"])
    print(f"\n{label}, batch {batch}, {dtype}, 1 thread, median of {rounds}:")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<14} {med * 1e3:8.2f} ms   {med / base:5.2f}x chainrule's time")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = ap.parse_args(argv)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)
    except ImportError:
        pass
    for label, (spec, shape) in MODELS.items():
        bench(label, spec, shape, args.dtype, args.rounds)


if __name__ == "__main__":
    main()
