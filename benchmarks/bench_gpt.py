"""One Adam training step of a small GPT, one thread: chainrule's generated ``train_step`` (derived from
the declarations in ``chainrule.derive.attention``) vs the same architecture in PyTorch eager (when
installed: a benchmark extra, never a dependency).

The model: character-level on ``pydoc_data.topics`` (103 characters), token and position embeddings,
2 pre-norm transformer blocks (4 heads, width 64, GELU feed-forward of width 256), a final layer norm
and a projection to the vocabulary; context 64, batch 16, Adam (lr 3e-3), float32.

Both candidates start from the same parameters and see the same minibatches; the first step's cost of
PyTorch is checked against chainrule's before timing. Rounds alternate; medians and ratios printed.
``--train STEPS`` then trains both for STEPS steps on the same data order and prints both validation
losses and times.

    python benchmarks/bench_gpt.py [--rounds 20] [--train 0]
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
from chainrule.derive.attention import gpt  # noqa: E402
from chainrule.runtime.text import (CharCodec, batch_starts, load_pydoc_text, split_ids,  # noqa: E402
                                    windows)

CONTEXT, WIDTH, HEADS, LAYERS, BATCH, LR = 64, 64, 4, 2, 16, 3e-3


def torch_gpt(torch, params: dict, names: list, heads: int):
    """The same GPT in PyTorch eager, reading chainrule's parameter layout: returns (tensors, loss_fn)."""
    P = {n: torch.tensor(params[n], requires_grad=True) for n in names}
    it = iter(names)
    emb, pos = next(it), next(it)
    blocks = []
    for _ in range(LAYERS):
        blocks.append([next(it) for _ in range(13)])   # ln γ β, Wq Wk Wv Wo bo, ln γ β, W1 b1 W2 b2
    final = [next(it) for _ in range(4)]
    F = torch.nn.functional

    def ln(x, g, b):
        return F.layer_norm(x, (x.shape[-1],), P[g], P[b], eps=1e-5)

    def loss(x_ids, y_onehot):
        x = P[emb][x_ids] + P[pos]
        T = x.shape[1]
        future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        for g1, b1, wq, wk, wv, wo, bo, g2, b2, w1, c1, w2, c2 in blocks:
            hN = ln(x, g1, b1)
            q, k, v = (torch.einsum("btc,che->bhte", hN, P[w]) for w in (wq, wk, wv))
            s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
            a = torch.softmax(s.masked_fill(future, float("-inf")), dim=-1)
            x = x + torch.einsum("bhte,heo->bto", a @ v, P[wo]) + P[bo]
            hN = ln(x, g2, b2)
            x = x + F.linear(F.gelu(F.linear(hN, P[w1], P[c1]), approximate="tanh"), P[w2], P[c2])
        z = F.linear(ln(x, final[0], final[1]), P[final[2]], P[final[3]])
        return -(y_onehot * F.log_softmax(z, dim=-1)).sum(-1).mean()
    return P, loss


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--train", type=int, default=0, help="then train both for this many steps")
    args = ap.parse_args(argv)
    text = load_pydoc_text()
    codec = CharCodec.of(text)
    train_ids, val_ids = split_ids(codec.encode(text))
    t0 = time.perf_counter()
    cm = compile_model(gpt(codec.vocab, CONTEXT, WIDTH, HEADS, LAYERS, name="char-gpt"), dtype="float32",
                       optimizer="adam")
    print(f"chainrule: derive, generate and load {time.perf_counter() - t0:.1f}s "
          f"({'cache hit' if cm.cache_hit else 'generated'})")
    init = cm.init_params(0)
    starts = batch_starts(len(train_ids), CONTEXT, BATCH, max(args.rounds + 1, args.train), 0)
    data = [windows(train_ids, s, CONTEXT, codec.vocab, "float32") for s in starts[:args.rounds + 1]]

    mine = {k: v.copy() for k, v in init.items()}
    state = cm.init_state()
    t = time.perf_counter()
    first = cm.train_step(mine, *data[0], lr=LR, state=state, step=1)
    print(f"chainrule: first step (Numba compiles or loads its cache) {time.perf_counter() - t:.1f}s, "
          f"cost {first:.6f}")
    try:
        import torch
    except ImportError:
        torch = None
        print("PyTorch not installed: chainrule alone (pip install torch to compare)")
    if torch is not None:
        torch.set_num_threads(1)
        P, loss_fn = torch_gpt(torch, init, cm.param_names, HEADS)
        opt = torch.optim.Adam(P.values(), lr=LR)

        def torch_step(x, y):
            opt.zero_grad(set_to_none=True)
            value = loss_fn(torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y))
            value.backward()
            opt.step()
            return float(value.detach())
        ref = torch_step(*data[0])
        print(f"PyTorch eager: first step cost {ref:.6f} (chainrule {first:.6f}, "
              f"relative difference {abs(ref - first) / abs(ref):.1e})")
        if abs(ref - first) > 1e-4 * abs(ref):
            raise SystemExit("the two models disagree on the first step's cost: not the same model")
    times = {"chainrule": [], "PyTorch eager": []}
    for r in range(1, args.rounds + 1):
        x, y = data[r]
        t = time.perf_counter()
        cm.train_step(mine, x, y, lr=LR, state=state, step=r + 1)
        times["chainrule"].append(time.perf_counter() - t)
        if torch is not None:
            t = time.perf_counter()
            torch_step(x, y)
            times["PyTorch eager"].append(time.perf_counter() - t)
    load = os.getloadavg()[0]
    print(f"\none Adam step, {LAYERS} layers, {HEADS} heads, width {WIDTH}, context {CONTEXT}, batch {BATCH}, "
          f"float32, one thread; median of {args.rounds} rounds (load average {load:.1f})")
    base = statistics.median(times["chainrule"])
    for name, ts in times.items():
        if ts:
            med = statistics.median(ts)
            print(f"  {name:<14} {med * 1000:8.1f} ms   {med / base:5.2f}x chainrule")
    if args.train:
        train_both(cm, init, torch, train_ids, val_ids, codec, starts[:args.train])


def train_both(cm, init, torch, train_ids, val_ids, codec, starts):
    """The same steps, data order and initial parameters in both: validation losses and times."""
    val = [windows(val_ids, s, CONTEXT, codec.vocab, "float32")
           for s in batch_starts(len(val_ids), CONTEXT, BATCH, 8, 1)]
    params, state = {k: v.copy() for k, v in init.items()}, cm.init_state()
    t = time.perf_counter()
    for step, s in enumerate(starts, 1):
        cm.train_step(params, *windows(train_ids, s, CONTEXT, codec.vocab, "float32"), lr=LR, state=state,
                      step=step)
    mine_time = time.perf_counter() - t
    mine_val = float(np.mean([cm.cost(params, x, y) for x, y in val]))
    print(f"\ntrained {len(starts)} steps: chainrule validation loss {mine_val:.4f} in {mine_time:.1f}s")
    if torch is None:
        return
    P, loss_fn = torch_gpt(torch, init, cm.param_names, HEADS)
    opt = torch.optim.Adam(P.values(), lr=LR)
    t = time.perf_counter()
    for s in starts:
        x, y = windows(train_ids, s, CONTEXT, codec.vocab, "float32")
        opt.zero_grad(set_to_none=True)
        loss_fn(torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y)).backward()
        opt.step()
    torch_time = time.perf_counter() - t
    with torch.no_grad():
        torch_val = float(np.mean([float(loss_fn(torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y)))
                                   for x, y in val]))
    print(f"trained {len(starts)} steps: PyTorch   validation loss {torch_val:.4f} in {torch_time:.1f}s "
          f"(chainrule / PyTorch: loss {mine_val / torch_val:.3f}, time {mine_time / torch_time:.2f})")


if __name__ == "__main__":
    main()
