"""Every workload of the project, one SGD training step each, side by side in one process:
chainrule's generated ``train_step`` against NumPy by hand, Numba by hand (the MLPs), PyTorch eager
and JAX jit (each where installed: ``pip install -e '.[bench]'``).

* MLP rows: the demo MLP 64-128-10 (sigmoid, softmax cross-entropy) on scikit-learn's digits at
  batch 32, 256 and 1024, and a 784-256-256-10 MLP at batch 128 (seeded random data);
* CNN rows (the models of ``bench_cnn.py``): the digits CNN (conv 8@3x3, max-pool 2, dense 10) and
  the 28x28 CNN (conv 16@5x5, pool, conv 32@5x5, pool, dense 10), batch 64;
* RNN rows (the models of ``bench_rnn.py``): an Elman RNN, an LSTM and a GRU of 64 units over 32
  steps of 16 features, then dense 10 on the last state, batch 32 (PyTorch's ``nn.RNN``, ``nn.LSTM``
  and ``nn.GRU``; JAX's ``lax.scan`` over the same cell; NumPy by hand for the Elman RNN).

The GPT (an Adam step, nanoGPT's modules as the PyTorch candidate) has its own script,
``bench_gpt.py``.

Before timing, every candidate's first step from the same initial parameters is compared with
chainrule's (the cost and every updated parameter): a candidate that disagrees is reported and not
timed. The candidates then alternate round by round; the table gives the median ms per step and the
ratio other / chainrule (above 1: chainrule is faster), with the machine, the load and the number
of threads (BLAS, Numba, PyTorch and XLA all limited to it, and the process pinned to as many
CPUs: XLA otherwise runs parts of a jitted step on a second core).

    python benchmarks/bench.py                   # every workload, 1 thread, float32
    python benchmarks/bench.py --threads 2       # both cores
    python benchmarks/bench.py --only mlp --rounds 50 --dtype float64
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time


def _limit_threads(n: int):
    """Thread limits that must be set before NumPy, Numba and JAX are imported, and the process
    pinned to ``n`` CPUs. Why the pinning: XLA's CPU client runs independent operations of a jitted
    step on threads of its own whatever its flags say; with the flags below, the demo MLP's
    batch-1024 step used 1.8 cores (0.89 ms wall, 1.61 ms of CPU), and 1.22-1.26 ms pinned to one.
    Pinned, "one thread" means one core for every candidate."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) > n:
        os.sched_setaffinity(0, cpus[:n])
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(n)
    flags = os.environ.get("XLA_FLAGS", "")
    if n == 1 and "multi_thread_eigen" not in flags:
        flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ["XLA_FLAGS"] = flags.strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--only", choices=("mlp", "cnn", "rnn"), help="run only the MLP, CNN or RNN rows")
    ap.add_argument("--min-ms", type=float, default=3.0, help="each timing sample lasts at least this long")
    ap.add_argument("--settle-ms", type=float, default=None,
                    help="pause before each timing sample (default: 0 with one thread, 500 with more; "
                         "see time_rounds)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time; cpu: this process's CPU time (on a machine shared with "
                         "other work, it does not count the time the process waits for a core; "
                         "meaningful with --threads 1 only)")
    return ap.parse_args(argv)


ARGS = _parse(sys.argv[1:] if __name__ == "__main__" else [])
_limit_threads(ARGS.threads)

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from bench_cnn import MODELS as CNN_MODELS  # noqa: E402
from bench_cnn import make_torch_step as torch_cnn_step  # noqa: E402
from bench_cnn import numpy_step as numpy_cnn_step  # noqa: E402
from bench_rnn import FEATURES as RNN_FEATURES  # noqa: E402
from bench_rnn import GATES as RNN_GATES  # noqa: E402
from bench_rnn import make_torch_step as torch_rnn_step  # noqa: E402
from bench_rnn import numpy_step as numpy_rnn_step  # noqa: E402
from chainrule.codegen import compile_model  # noqa: E402
from chainrule.derive import build_model  # noqa: E402

LR = 0.01
MLPS = [("demo MLP 64-128-10", "demo", 64, b) for b in (32, 256, 1024)] + [
    ("MLP 784-256-256-10", "784 -> dense(256) -> sigmoid -> dense(256) -> sigmoid -> dense(10) "
     "-> softmax_cross_entropy", 784, 128)]
RNN_STEPS, RNN_HIDDEN, RNN_BATCH = 32, 64, 32
RNNS = [(f"{name} seq({RNN_STEPS}, {RNN_FEATURES}) -> {cell}({RNN_HIDDEN}) -> dense(10)", cell)
        for name, cell in (("Elman RNN", "rnn"), ("LSTM", "lstm"), ("GRU", "gru"))]


# -- MLP candidates: parameters W1, b1, W2, b2, ... (sigmoid hidden layers, softmax cross-entropy) --
def n_layers(p):
    return sum(1 for k in p if k.startswith("W"))


def numpy_mlp_step(p, x, y, lr):
    L, n = n_layers(p), x.shape[0]
    acts = [x]
    for k in range(1, L):
        z = acts[-1] @ p[f"W{k}"].T
        z += p[f"b{k}"]
        acts.append(1.0 / (1.0 + np.exp(-z)))
    z = acts[-1] @ p[f"W{L}"].T + p[f"b{L}"]
    m = z.max(axis=1, keepdims=True)
    e = np.exp(z - m)
    s = e.sum(axis=1, keepdims=True)
    cost = -(y * (z - m - np.log(s))).sum() / n
    d = (e / s - y) / n                               # softmax + cross-entropy: p - y
    for k in range(L, 0, -1):
        a = acts[k - 1]
        dn = (d @ p[f"W{k}"]) * a * (1.0 - a) if k > 1 else None
        p[f"W{k}"] -= lr * (d.T @ a)
        p[f"b{k}"] -= lr * d.sum(axis=0)
        d = dn
    return float(cost)


def make_numba_mlp():
    """A hand-written Numba kernel of the same step, as a user would write it: one function,
    np.dot for the products, loops for the rest, everything in place."""
    import numba

    @numba.njit(cache=True, error_model="numpy")
    def step(Ws, bs, x, y, lr):
        n, L = x.shape[0], len(Ws)
        acts = [x]
        for k in range(L - 1):
            z = np.dot(acts[k], Ws[k].T)
            b = bs[k]
            for i in range(z.shape[0]):
                for j in range(z.shape[1]):
                    v = z[i, j] + b[j]
                    e = math.exp(-abs(v))
                    r = 1.0 / (1.0 + e)
                    z[i, j] = r if v >= 0 else e * r
            acts.append(z)
        z = np.dot(acts[L - 1], Ws[L - 1].T)
        b = bs[L - 1]
        cost = 0.0
        for i in range(n):
            m = -np.inf
            for j in range(z.shape[1]):
                z[i, j] += b[j]
                m = max(m, z[i, j])
            s = 0.0
            for j in range(z.shape[1]):
                s += math.exp(z[i, j] - m)
            lse = m + math.log(s)
            for j in range(z.shape[1]):
                cost -= y[i, j] * (z[i, j] - lse)
                z[i, j] = (math.exp(z[i, j] - lse) - y[i, j]) / n      # becomes d = (p - y) / n
        d = z
        for k in range(L - 1, -1, -1):
            a = acts[k]
            gW = np.dot(d.T, a)
            if k > 0:
                dn = np.dot(d, Ws[k])
                for i in range(dn.shape[0]):
                    for j in range(dn.shape[1]):
                        dn[i, j] *= a[i, j] * (1.0 - a[i, j])
            W, b = Ws[k], bs[k]
            for i in range(W.shape[0]):
                for j in range(W.shape[1]):
                    W[i, j] -= lr * gW[i, j]
            for i in range(d.shape[0]):
                for j in range(d.shape[1]):
                    b[j] -= lr * d[i, j]
            if k > 0:
                d = dn
        return cost / n

    def run(p, x, y, lr):
        L = n_layers(p)
        return step(tuple(p[f"W{k}"] for k in range(1, L + 1)), tuple(p[f"b{k}"] for k in range(1, L + 1)),
                    x, y, lr)
    return run


def make_torch_mlp(torch, p):
    tdtype = getattr(torch, str(next(iter(p.values())).dtype))
    tp = {k: torch.tensor(v, dtype=tdtype, requires_grad=True) for k, v in p.items()}
    opt = torch.optim.SGD(list(tp.values()), lr=LR)
    F, L = torch.nn.functional, n_layers(p)

    def step(x, labels):
        opt.zero_grad(set_to_none=True)
        h = x
        for k in range(1, L):
            h = torch.sigmoid(F.linear(h, tp[f"W{k}"], tp[f"b{k}"]))
        loss = F.cross_entropy(F.linear(h, tp[f"W{L}"], tp[f"b{L}"]), labels)
        loss.backward()
        opt.step()
        return loss.item()
    return tp, step


# -- JAX: the same losses, differentiated by JAX, jit-compiled with the SGD update ------------------
def jax_mlp_loss(jnp, jax):
    def loss(p, x, y):
        L = n_layers(p)
        h = x
        for k in range(1, L):
            h = jax.nn.sigmoid(h @ p[f"W{k}"].T + p[f"b{k}"])
        z = h @ p[f"W{L}"].T + p[f"b{L}"]
        return -(y * jax.nn.log_softmax(z, axis=1)).sum() / x.shape[0]
    return loss


def jax_cnn_loss(jnp, jax, convs):
    lax = jax.lax

    def loss(p, x, y):
        h = x
        for k in range(1, convs + 1):
            h = lax.conv_general_dilated(h, p[f"W{k}"], (1, 1), "VALID",
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))
            h = jnp.maximum(h + p[f"b{k}"][None, :, None, None], 0)
            h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
        W = p[f"W{convs + 1}"]
        z = h.reshape(h.shape[0], -1) @ W.reshape(W.shape[0], -1).T + p[f"b{convs + 1}"]
        return -(y * jax.nn.log_softmax(z, axis=1)).sum() / x.shape[0]
    return loss


def jax_rnn_loss(jnp, jax, cell):
    """The cell as PyTorch defines it (chainrule's declarations follow the same equations), over
    time by ``lax.scan`` from a zero state, then dense + softmax cross-entropy on the last state."""
    sig = jax.nn.sigmoid

    def gate(p, g, x_t, h):
        return x_t @ p[f"W{g}1"].T + p[f"b{g}1"] + h @ p[f"U{g}1"].T

    def step(p):
        def elman(h, x_t):
            h = jnp.tanh(gate(p, "", x_t, h))
            return h, None

        def lstm(hc, x_t):
            h, c = hc
            i, f = sig(gate(p, "i", x_t, h)), sig(gate(p, "f", x_t, h))
            g, o = jnp.tanh(gate(p, "g", x_t, h)), sig(gate(p, "o", x_t, h))
            c = f * c + i * g
            return (o * jnp.tanh(c), c), None

        def gru(h, x_t):
            r, z = sig(gate(p, "r", x_t, h)), sig(gate(p, "z", x_t, h))
            n = jnp.tanh(x_t @ p["Wn1"].T + p["bn1"] + r * (h @ p["Un1"].T + p["bhn1"]))
            return (1 - z) * n + z * h, None
        return {"rnn": elman, "lstm": lstm, "gru": gru}[cell]

    def loss(p, x, y):
        h0 = jnp.zeros((x.shape[0], p["W2"].shape[1]), dtype=x.dtype)
        carry, _ = jax.lax.scan(step(p), (h0, h0) if cell == "lstm" else h0, jnp.swapaxes(x, 0, 1))
        h = carry[0] if cell == "lstm" else carry
        z = h @ p["W2"].T + p["b2"]
        return -(y * jax.nn.log_softmax(z, axis=1)).sum() / x.shape[0]
    return loss


def torch_rnn_params(torch_step, cell):
    """PyTorch's RNN parameters in chainrule's names (the stacked gates split; the input bias is
    chainrule's gate bias: after one step PyTorch's recurrent bias holds the same update again)."""
    rnn, head = torch_step.modules
    hidden = head.weight.shape[1]
    out = {"W2": head.weight, "b2": head.bias}
    for k, g in enumerate(RNN_GATES[cell] or [""]):
        rows = slice(k * hidden, (k + 1) * hidden)
        out[f"W{g}1"], out[f"U{g}1"] = rnn.weight_ih_l0[rows], rnn.weight_hh_l0[rows]
        out[f"b{g}1"] = rnn.bias_ih_l0[rows]
    if cell == "gru":
        out["bhn1"] = rnn.bias_hh_l0[2 * hidden:]
    return {k: v.detach().numpy() for k, v in out.items()}


def make_jax_step(jax, loss, p):
    """A jitted step: (params, x, y) -> (cost, new params); the wrapper keeps the new params."""
    @jax.jit
    def step(q, x, y):
        cost, g = jax.value_and_grad(loss)(q, x, y)
        return cost, {k: q[k] - LR * g[k] for k in q}
    state = {"p": {k: jax.numpy.asarray(v) for k, v in p.items()}}

    def run(x, y):
        cost, state["p"] = step(state["p"], x, y)
        return float(cost)                 # waits for the result
    run.params = lambda: {k: np.asarray(v) for k, v in state["p"].items()}
    return run


# -- one workload ---------------------------------------------------------------------------------
def optional(name):
    try:
        return __import__(name)
    except ImportError:
        return None


def max_diff(c, ref_c, p, ref_p):
    return max([abs(c - ref_c)] + [float(np.max(np.abs(np.asarray(p[k], dtype=np.float64) - ref_p[k])))
                                   for k in ref_p])


def candidates(kind, cm, init, x, y, labels, convs):
    """name -> (first-step function returning (cost, updated params), timed step function)."""
    copy = lambda: {k: v.copy() for k, v in init.items()}   # noqa: E731
    out = {}

    def chainrule():
        p = copy()
        return (lambda: cm.train_step(p, x, y, LR)), (lambda: p)
    out["chainrule"] = chainrule

    def numpy_():
        p = copy()
        fn = by_hand[kind]
        return (lambda: fn(p, x, y, LR)), (lambda: p)
    by_hand = {"mlp": numpy_mlp_step, "cnn": lambda p, x, y, lr: numpy_cnn_step(p, x, y, lr, convs),
               "rnn:rnn": numpy_rnn_step}         # the hand-written RNN step is the Elman cell's
    if kind in by_hand:
        out["NumPy"] = numpy_
    if kind == "mlp" and optional("numba"):
        run = make_numba_mlp()

        def numba_():
            p = copy()
            return (lambda: run(p, x, y, LR)), (lambda: p)
        out["Numba by hand"] = numba_
    torch = optional("torch")
    if torch is not None:
        torch.set_num_threads(ARGS.threads)

        def torch_():
            if kind == "mlp":
                tp, step = make_torch_mlp(torch, init)
                tx, tl = torch.from_numpy(x), torch.from_numpy(labels)
                fn = lambda: step(tx, tl)   # noqa: E731
            elif kind.startswith("rnn"):
                cell = kind.split(":")[1]
                step = torch_rnn_step(torch, init, str(x.dtype), cell)
                torch.set_num_threads(ARGS.threads)
                tx, ty = torch.from_numpy(x), torch.from_numpy(y)
                return (lambda: step(tx, ty)), (lambda: torch_rnn_params(step, cell))
            else:
                step = torch_cnn_step(torch, init, str(x.dtype), convs)
                torch.set_num_threads(ARGS.threads)
                tp, tx, ty = step.params, torch.from_numpy(x), torch.from_numpy(y)
                fn = lambda: step(tx, ty)   # noqa: E731
            return fn, (lambda: {k: v.detach().numpy() for k, v in tp.items()})
        out["PyTorch eager"] = torch_
    jax = optional("jax")
    if jax is not None:
        if x.dtype == np.float64:
            jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp
        if kind == "mlp":
            loss = jax_mlp_loss(jnp, jax)
        elif kind.startswith("rnn"):
            loss = jax_rnn_loss(jnp, jax, kind.split(":")[1])
        else:
            loss = jax_cnn_loss(jnp, jax, convs)

        def jax_():
            run = make_jax_step(jax, loss, init)
            jx, jy = jnp.asarray(x), jnp.asarray(y)
            return (lambda: run(jx, jy)), run.params
        out["JAX jit"] = jax_
    return out


def time_rounds(fns, rounds, min_s):
    """Median ms per step of each candidate, the candidates alternating sample by sample.

    With more than one thread, each sample starts after a pause (``--settle-ms``, 500 ms): after
    its last call a thread pool keeps its threads spinning for a while (OpenBLAS's for 2^28 cycles,
    about 0.1 s; OpenMP's and XLA's too), and in this shared process the spinning threads of the
    candidate timed before (NumPy's OpenBLAS, PyTorch's OpenMP pool, XLA's) took the cores from the
    next one: every candidate then measured slower on two threads than on one. (Idle machine, demo
    MLP at batch 1024, chainrule on two threads: 1.89 ms without a pause, 2.02 with 200 ms, 1.71
    with 600 ms, against 1.49-1.76 on one thread; alone in its own process 1.43 against 1.40.)"""
    clock = time.process_time if ARGS.clock == "cpu" else time.perf_counter
    settle = (ARGS.settle_ms if ARGS.settle_ms is not None else 500.0 if ARGS.threads > 1 else 0.0) / 1e3
    inner = {}
    for name, fn in fns.items():            # steps per sample: long enough to be timed well
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < min_s:
            fn()
            k += 1
        inner[name] = max(1, k)
    samples = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:     # rotate who goes first
            fn, k = fns[name], inner[name]
            if settle:
                time.sleep(settle)
            t0 = clock()
            for _ in range(k):
                fn()
            samples[name].append((clock() - t0) / k * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def run_workload(label, kind, spec, x, y, labels, dtype):
    from threadpoolctl import threadpool_limits
    model = build_model(spec)
    cm = compile_model(model, dtype=dtype)
    convs = sum(1 for _, layer in getattr(model, "layers", []) if layer.describe().startswith("conv"))
    init = cm.init_params(seed=0)
    made = candidates(kind, cm, init, x, y, labels, convs)
    first, ref, fns, notes = {}, None, {}, []
    tol = 2e-4 if dtype == "float32" else 1e-9
    for name, make in made.items():
        fn, params = make()
        cost = fn()                               # the first step, from the common initial values
        if ref is None:
            ref = (cost, {k: np.asarray(v, dtype=np.float64) for k, v in params().items()})
            first[name] = 0.0
        else:
            first[name] = max_diff(cost, ref[0], params(), ref[1])
        if first[name] > tol:
            notes.append(f"{name}: first step differs from chainrule's by {first[name]:.1e}: not timed")
            continue
        fns[name] = make()[0]                      # a fresh copy for timing
        for _ in range(3):
            fns[name]()                            # warm-up: JIT, allocator, thread pools
    threadpool_limits(ARGS.threads)                # Numba loads SciPy's BLAS lazily: limit it too
    return time_rounds(fns, ARGS.rounds, ARGS.min_ms / 1e3), first, notes


def digits():
    from chainrule.runtime.data import load_digits
    return load_digits()


def main():
    from threadpoolctl import threadpool_limits
    threadpool_limits(ARGS.threads)
    dtype = ARGS.dtype
    rng = np.random.default_rng(0)
    rows = []
    if ARGS.only in (None, "mlp"):
        xd, ld = digits()
        for label, spec, n_in, batch in MLPS:
            if n_in == 64:
                x, labels = np.ascontiguousarray(xd[:batch], dtype=dtype), ld[:batch].copy()
            else:
                x = rng.normal(size=(batch, n_in)).astype(dtype)
                labels = rng.integers(0, 10, size=batch)
            y = np.eye(10, dtype=dtype)[labels]
            rows.append((label, batch, *run_workload(label, "mlp", spec, x, y, labels, dtype)))
    if ARGS.only in (None, "cnn"):
        for label, (spec, shape) in CNN_MODELS.items():
            batch = 64
            x = rng.normal(size=(batch, *shape)).astype(dtype)
            labels = rng.integers(0, 10, size=batch)
            y = np.eye(10, dtype=dtype)[labels]
            rows.append((label, batch, *run_workload(label, "cnn", spec, x, y, labels, dtype)))
    if ARGS.only in (None, "rnn"):
        for label, cell in RNNS:
            spec = f"seq({RNN_STEPS}, {RNN_FEATURES}) -> {cell}({RNN_HIDDEN}) -> dense(10) -> softmax_cross_entropy"
            x = rng.normal(size=(RNN_BATCH, RNN_STEPS, RNN_FEATURES)).astype(dtype)
            labels = rng.integers(0, 10, size=RNN_BATCH)
            y = np.eye(10, dtype=dtype)[labels]
            rows.append((label, RNN_BATCH, *run_workload(label, f"rnn:{cell}", spec, x, y, labels, dtype)))
    report(rows, dtype)
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = "/".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    versions = [f"python {platform.python_version()}", f"numpy {np.__version__}"]
    for mod in ("numba", "torch", "jax"):
        m = sys.modules.get(mod)
        if m is not None:
            versions.append(f"{mod} {m.__version__}")
    pinned = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    return (f"{cpu}, {os.cpu_count()} cores, {ARGS.threads} thread(s) on CPU(s) {pinned}; load average {load} "
            f"(1/5/15 min)\n"
            + ", ".join(versions))


def report(rows, dtype):
    names = []
    for _, _, med, _, _ in rows:
        names += [n for n in med if n not in names]
    others = [n for n in names if n != "chainrule"]
    print(f"\nSGD training step, {dtype}, median {ARGS.clock}-clock ms/step over {ARGS.rounds} alternating rounds; "
          "(ratio) = other / chainrule, above 1: chainrule is faster")
    print(machine())
    head = f"| {'workload':<62} | batch | {'chainrule':>9} | " + " | ".join(f"{n:>20}" for n in others) + " |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for label, batch, med, first, _ in rows:
        base = med.get("chainrule")
        cells = []
        for n in others:
            cells.append(f"{med[n]:8.3f} ({med[n] / base:5.2f})" if n in med and base else f"{'-':>20}")
        print(f"| {label:<62} | {batch:>5} | {base:9.3f} | " + " | ".join(f"{c:>20}" for c in cells) + " |")
    print("\nfirst step vs chainrule's (max abs difference of the cost and the updated parameters):")
    for label, batch, med, first, notes in rows:
        print(f"  {label}, batch {batch}: " + ", ".join(f"{n} {d:.1e}" for n, d in first.items() if n != "chainrule"))
        for note in notes:
            print(f"    {note}")


if __name__ == "__main__":
    main()
