"""Forward + backward of exported chainrule layers in PyTorch vs PyTorch's own layers.

The exported ``autograd.Function`` runs the declaration's forward and the *derived* backward as
tensor code (einsum, gathers); PyTorch's native layers run hand-optimised kernels (``F.linear``,
``F.conv2d``, ``F.max_pool2d``) with autograd's backward. Both run in one process, alternating round
by round, on the same inputs and parameters, after a check that their outputs and gradients agree.

    python benchmarks/bench_export.py [--threads 1] [--rounds 30] [--dtype float32]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from chainrule.codegen.targets import to_torch  # noqa: E402
from chainrule.derive import Dense  # noqa: E402
from chainrule.derive.conv import Conv2D, MaxPool  # noqa: E402


def cases(torch, F):
    """(name, chainrule declaration, inputs, input shape, native function of (x, params))."""
    return [
        ("dense 256 -> 256, batch 128", Dense(256), 256, (128, 256),
         lambda x, W, b: F.linear(x, W, b)),
        ("conv2d 8 -> 16, 3x3 same, 16x16, batch 32", Conv2D(16, 3, padding="same"), (8, 16, 16),
         (32, 8, 16, 16), lambda x, W, b: F.conv2d(x, W, b, padding=1)),
        ("maxpool 2x2, 16 x 16x16, batch 32", MaxPool(2), (16, 16, 16), (32, 16, 16, 16),
         lambda x: F.max_pool2d(x, 2)),
    ]


def step(fn, x, params, g):
    for p in [x, *params]:
        p.grad = None
    out = fn(x, *params)
    out.backward(g)
    return out


def main(argv=None):
    import torch
    import torch.nn.functional as F
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dt = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.dtype}, {args.rounds} rounds, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'case':45s} {'exported (ms)':>14s} {'native (ms)':>12s} {'ratio':>7s}")
    for name, decl, inputs, xshape, native in cases(torch, F):
        layer = to_torch(decl, inputs=inputs, dtype=dt)
        params = list(layer.parameters())
        rng = np.random.default_rng(0)
        x = torch.tensor(rng.normal(size=xshape), dtype=dt, requires_grad=True)
        out = layer(x)
        g = torch.tensor(rng.normal(size=tuple(out.shape)), dtype=dt)
        exported = lambda x, *ps: layer(x)                      # noqa: E731
        a = step(exported, x, params, g)
        grads_a = [t.grad.clone() for t in [x, *params]]
        b = step(native, x, params, g)
        grads_b = [t.grad.clone() for t in [x, *params]]
        tol = 1e-5 if dt == torch.float32 else 1e-12      # relative to the largest entry (rounding)
        for u, v in [(a.detach(), b.detach()), *zip(grads_a, grads_b)]:
            assert float((u - v).abs().max()) <= tol * max(1.0, float(v.abs().max())), name
        times = {"exported": [], "native": []}
        for _ in range(args.rounds):
            for label, fn in (("exported", exported), ("native", native)):
                t0 = time.perf_counter()
                step(fn, x, params, g)
                times[label].append(time.perf_counter() - t0)
        e, n = (statistics.median(times[k]) * 1e3 for k in ("exported", "native"))
        print(f"{name:45s} {e:14.3f} {n:12.3f} {e / n:7.2f}")
    print("ratio = exported / native median time of forward + backward (> 1: the native layer is faster)")


if __name__ == "__main__":
    main()
