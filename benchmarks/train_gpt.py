"""The char-gpt example against its PyTorch twin, in one run: the same 2-layer, 4-head, width-64,
context-64 GPT on the characters of ``pydoc_data.topics``, the same initial parameters, the same
minibatches in the same order, the same number of Adam steps (lr 3e-3, PyTorch's defaults otherwise),
float32, one thread each.

chainrule trains with its generated ``train_step`` (``chainrule.runtime.text.train_char_gpt``, what
``chainrule train char-gpt`` runs: validation loss as it falls, a sample with temperature and top-k);
PyTorch eager (a benchmark extra, never a dependency) trains the same architecture written with
PyTorch's layers in chainrule's parameter layout (``tests/torch_gpt.py``, the tests' independent
reference: ``F.layer_norm``, a masked ``softmax``, ``F.gelu``, autograd, ``torch.optim.Adam``) and is
evaluated on the same validation batches at the same steps (``benchmarks/bench_gpt.py`` times one step
against nanoGPT's modules as well). Printed:
both validation losses and their ratio, wall and CPU times, the load average; written: one PNG with
both validation curves.

    python benchmarks/train_gpt.py [--steps 1500] [--eval-every 150] [--out chainrule-examples/char-gpt]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))      # torch_gpt: the PyTorch twin

from chainrule.runtime.text import (CharCodec, batch_starts, load_pydoc_text, plot_losses,  # noqa: E402
                                    split_ids, train_char_gpt, validation_windows, windows)

CONTEXT, WIDTH, HEADS, LAYERS, BATCH, LR, SEED = 64, 64, 4, 2, 16, 3e-3, 0


def train_torch(torch, init: dict, names: list, steps: int, eval_every: int) -> dict:
    """The PyTorch twin from chainrule's initial parameters: validation history and times."""
    import torch_gpt
    torch.set_num_threads(1)
    text = load_pydoc_text()
    codec = CharCodec.of(text)
    train_ids, val_ids = split_ids(codec.encode(text))
    val_sets = validation_windows(val_ids, CONTEXT, BATCH, 8, SEED, codec.vocab, "float32")
    P = {n: torch.tensor(init[n], requires_grad=True) for n in names}
    opt = torch.optim.Adam(P.values(), lr=LR)

    def cost(x, y):
        return torch_gpt.gpt_cost(torch, P, names, torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y))

    def val_loss():
        with torch.no_grad():
            return float(np.mean([float(cost(x, y)) for x, y in val_sets]))

    history = [(0, val_loss())]
    starts = batch_starts(len(train_ids), CONTEXT, BATCH, steps, SEED)
    wall, cpu = time.perf_counter(), time.process_time()
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        cost(*windows(train_ids, starts[step - 1], CONTEXT, codec.vocab, "float32")).backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            history.append((step, val_loss()))
            print(f"PyTorch step {step:5d}  validation loss {history[-1][1]:.4f}", flush=True)
    return {"history": history, "seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--out", default=os.path.join("chainrule-examples", "char-gpt"))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    load = [os.getloadavg()[0]]
    mine = train_char_gpt(steps=args.steps, context=CONTEXT, width=WIDTH, heads=HEADS, layers=LAYERS,
                          batch=BATCH, lr=LR, eval_every=args.eval_every, seed=SEED,
                          plot_path=os.path.join(args.out, "loss.png"))
    load.append(os.getloadavg()[0])
    try:
        import torch
    except ImportError:
        print("PyTorch not installed: chainrule alone (pip install torch to compare)")
        return
    cm = mine["compiled"]
    ref = train_torch(torch, cm.init_params(SEED), cm.param_names, args.steps, args.eval_every)
    load.append(os.getloadavg()[0])
    plot_losses({"chainrule (validation)": mine["history"], "PyTorch eager (validation)": ref["history"]},
                os.path.join(args.out, "loss_vs_pytorch.png"))
    a, b = mine["val_loss"], ref["history"][-1][1]
    print(f"\n{args.steps} Adam steps, batch {BATCH}, float32, one thread each (load average "
          f"{' -> '.join(f'{v:.1f}' for v in load)}):")
    print(f"  chainrule      validation loss {a:.4f}   train {mine['train_seconds']:7.1f}s wall "
          f"{mine['train_cpu_seconds']:7.1f}s CPU   (kernels ready {mine['ready_seconds']:.1f}s wall, "
          f"{mine['ready_cpu_seconds']:.1f}s CPU)")
    print(f"  PyTorch eager  validation loss {b:.4f}   train {ref['seconds']:7.1f}s wall "
          f"{ref['cpu_seconds']:7.1f}s CPU")
    print(f"  chainrule / PyTorch: validation loss {a / b:.4f} ({(a / b - 1) * 100:+.2f} %), "
          f"training CPU time {mine['train_cpu_seconds'] / ref['cpu_seconds']:.2f}x")
    print(f"loss curves: {os.path.join(args.out, 'loss_vs_pytorch.png')}")


if __name__ == "__main__":
    main()
