"""A user's own layer, derived and verified in chainrule, trained at scale by PyTorch.

The bilinear layer below is a declaration and nothing else. chainrule derives its backward pass,
exports it as an ``nn.Module`` whose ``autograd.Function`` runs the *derived* gradient, and a
PyTorch model containing it is trained with DistributedDataParallel on 2 processes of this machine
(CPU, the gloo backend, ``torch.multiprocessing``): each process takes half of every global batch and
DDP averages the gradients. The script then repeats the training in one process on the whole global
batches and checks that the parameters after N steps are equal (float64, to rounding), that the two
ranks' parameters are equal, and that the loss fell.

    python examples/ddp_export.py [--steps N] [--world 2] [--out DIR]

Needs the torch extra (``pip install -e '.[torch]'``). Prints the loss curve and the comparisons,
writes DIR/ddp_summary.json, and exits non-zero if a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import sympy as sp  # noqa: E402

from chainrule.codegen.targets import to_torch  # noqa: E402
from chainrule.derive import Layer, indices  # noqa: E402
from chainrule.derive.layers import B  # noqa: E402

GLOBAL_BATCH = 64
HIDDEN, UNITS = 24, 16
LR = 0.1
SEED = 0


class Bilinear(Layer):
    """y_bk = Σ_ij x_bi W_ijk x_bj: a layer that reads its input twice. Declared, nothing else."""
    has_params = True

    def __init__(self, units):
        self.units = units

    def build(self, d, x):
        b, i, j, k = indices("b i j k")
        n = x.shape[1]
        W = d.param("W", (n, n, d.size("n", self.units)))
        y = d.tensor("z", (B, W.shape[2]))
        return d.define(y, (b, k), sp.Sum(sp.Sum(x[b, i] * W[i, j, k] * x[b, j], (i, 0, n - 1)), (j, 0, n - 1)))


def build_model(cache_dir):
    """Linear -> tanh -> the exported chainrule layer -> tanh -> Linear, float64, seeded."""
    import torch
    torch.manual_seed(SEED)
    layer = to_torch(Bilinear(UNITS), inputs=HIDDEN, seed=SEED, dtype=torch.float64, cache_dir=cache_dir)
    return torch.nn.Sequential(torch.nn.Linear(64, HIDDEN), torch.nn.Tanh(), layer, torch.nn.Tanh(),
                               torch.nn.Linear(UNITS, 10)).double()


def load_data():
    from chainrule.runtime.data import load_digits, train_test_split
    x, y = load_digits()
    return train_test_split(x, y, test_size=0.2, seed=SEED)


def batches(n_train, steps):
    """The global batches: one seeded order, the same in every process."""
    rng = np.random.default_rng(SEED)
    order = np.concatenate([rng.permutation(n_train) for _ in range(steps * GLOBAL_BATCH // n_train + 1)])
    return [order[s * GLOBAL_BATCH:(s + 1) * GLOBAL_BATCH] for s in range(steps)]


def train(model, x, y, steps, rank=0, world=1, on_step=None):
    """SGD on the global batches; this process takes its 1/world share of each."""
    import torch
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = torch.nn.CrossEntropyLoss()
    share = GLOBAL_BATCH // world
    for step, rows in enumerate(batches(len(x), steps)):
        mine = rows[rank * share:(rank + 1) * share]
        loss = loss_fn(model(torch.as_tensor(x[mine])), torch.as_tensor(y[mine]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step, loss.detach())


def run_rank(rank, world, port, steps, out_dir, cache_dir):
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x_train, _, y_train, _ = load_data()
        model = DDP(build_model(cache_dir))
        losses = []

        def record(step, loss):                  # the global batch's loss: the mean of the shares
            dist.all_reduce(loss)
            losses.append(float(loss) / world)
        train(model, x_train, y_train, steps, rank, world, record)
        params = {k: v.detach().numpy() for k, v in model.module.state_dict().items()}
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), losses=np.array(losses), **params)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    import torch
    import torch.multiprocessing as mp
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--out", default="ddp-export-out")
    args = p.parse_args(argv)
    if args.steps < 2 or args.world < 1 or GLOBAL_BATCH % args.world:
        p.error(f"--steps must be >= 2 and --world must divide the global batch {GLOBAL_BATCH}")
    os.makedirs(args.out, exist_ok=True)
    cache_dir = os.environ.get("CHAINRULE_CACHE_DIR") or tempfile.mkdtemp(prefix="chainrule-ddp-")
    build_model(cache_dir)      # derive and export once: the ranks load the cached module

    mp.spawn(run_rank, args=(args.world, free_port(), args.steps, args.out, cache_dir),
             nprocs=args.world, join=True)
    ranks = [dict(np.load(os.path.join(args.out, f"rank{r}.npz"))) for r in range(args.world)]

    torch.set_num_threads(1)
    x_train, x_test, y_train, y_test = load_data()
    single = build_model(cache_dir)
    train(single, x_train, y_train, args.steps)
    ref = {k: v.detach().numpy() for k, v in single.state_dict().items()}
    with torch.no_grad():
        accuracy = float((single(torch.as_tensor(x_test)).argmax(1).numpy() == y_test).mean())

    losses = ranks[0]["losses"]
    between_ranks = max(float(np.abs(r[k] - ranks[0][k]).max()) for r in ranks[1:] for k in ref) \
        if args.world > 1 else 0.0
    vs_single = max(float(np.abs(ranks[0][k] - ref[k]).max() / max(1.0, np.abs(ref[k]).max())) for k in ref)
    head, tail = float(losses[:5].mean()), float(losses[-5:].mean())
    for s in list(range(0, len(losses), max(1, len(losses) // 10))) + [len(losses) - 1]:
        print(f"step {s + 1:4d}  global-batch loss {losses[s]:.4f}")
    print(f"{args.world} processes (gloo, CPU), {args.steps} steps of {GLOBAL_BATCH} examples, "
          f"the chainrule layer's backward derived")
    print(f"max |parameter difference| between ranks: {between_ranks:.3g}")
    print(f"max relative parameter difference, DDP vs one process on the same global batches: {vs_single:.3g}")
    print(f"loss, mean of the first 5 steps {head:.4f} -> of the last 5 {tail:.4f}; "
          f"test accuracy (one process) {accuracy:.3f}")
    summary = dict(world=args.world, steps=args.steps, losses=[float(v) for v in losses],
                   between_ranks=between_ranks, vs_single=vs_single, test_accuracy=accuracy)
    with open(os.path.join(args.out, "ddp_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    ok = between_ranks == 0.0 and vs_single < 1e-9 and tail < head
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
