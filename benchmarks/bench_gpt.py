"""One Adam training step of a small GPT, one thread: chainrule's generated ``train_step`` (derived from
the declarations in ``chainrule.derive.attention``) against the same architecture written the way a
user of each framework would write it: PyTorch eager (nanoGPT's modules: ``nn.Linear`` projections,
``view``/``transpose`` to (B, heads, T, d), ``F.scaled_dot_product_attention(is_causal=True)`` or the
explicit masked softmax, ``F.layer_norm``, ``F.gelu(approximate="tanh")``, ``F.cross_entropy``), the
earlier ``einsum`` twin in chainrule's own parameter layout, and JAX jit (one jitted function for
the loss, its gradient and the Adam update). PyTorch and JAX are benchmark extras, never
dependencies; each column is skipped when its package is absent.

The model: character-level on ``pydoc_data.topics`` (103 characters), token and position embeddings,
2 pre-norm transformer blocks (4 heads, width 64, GELU feed-forward of width 256), a final layer norm
and a projection to the vocabulary; context 64, batch 16, Adam (lr 3e-3), float32.

Every candidate starts from chainrule's initial parameters and sees the same minibatches; its first
step's cost must agree with chainrule's (relative 1e-4) before it is timed. Rounds alternate (the
first candidate rotates); medians and the ratios other / chainrule are printed (above 1: chainrule
is faster). ``--clock cpu`` times this process's CPU time instead of the wall clock: on a machine
shared with other work it does not count the time spent waiting for a core (one thread: each
candidate runs on one core at a time). ``--train STEPS`` then trains chainrule and PyTorch for STEPS
steps on the same data order and prints both validation losses and times.

    python benchmarks/bench_gpt.py [--rounds 20] [--clock wall|cpu] [--train 0]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"
if "multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from chainrule.codegen import compile_model  # noqa: E402
from chainrule.derive.attention import gpt  # noqa: E402
from chainrule.runtime.text import (CharCodec, batch_starts, load_pydoc_text, split_ids,  # noqa: E402
                                    windows)

CONTEXT, WIDTH, HEADS, LAYERS, BATCH, LR = 64, 64, 4, 2, 16, 3e-3
PER_BLOCK = 13       # LN γ β, Wq Wk Wv Wo bo, LN γ β, W1 b1 W2 b2 (chainrule's parameter order)


def split_names(names: list) -> tuple:
    """chainrule's parameter names: (token table, position table, [13 per block], final 4)."""
    emb, pos, *rest = names
    blocks = [rest[k * PER_BLOCK:(k + 1) * PER_BLOCK] for k in range(LAYERS)]
    return emb, pos, blocks, rest[LAYERS * PER_BLOCK:]


def heads_as_rows(W):
    """A (D, H, E) projection of chainrule's as an ``nn.Linear`` weight (H·E, D): out = x Wᵀ."""
    return W.reshape(W.shape[0], -1).T


# -- PyTorch, nanoGPT style ------------------------------------------------------------------------
def torch_nanogpt(torch, params: dict, names: list, sdpa: bool):
    """nanoGPT's modules (Karpathy's model.py, without dropout), loaded with chainrule's initial
    parameters: returns (module, step(x_ids, targets) -> cost)."""
    nn, F = torch.nn, torch.nn.functional

    class CausalSelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(WIDTH, 3 * WIDTH, bias=False)    # q, k, v of every head at once
            self.c_proj = nn.Linear(WIDTH, WIDTH)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.c_attn(x).split(WIDTH, dim=2)
            q, k, v = (a.view(B, T, HEADS, C // HEADS).transpose(1, 2) for a in (q, k, v))   # (B, nh, T, hs)
            if sdpa:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                att = (q @ k.transpose(-2, -1)) * (1.0 / (k.size(-1) ** 0.5))
                att = att.masked_fill(self.mask[:T, :T] == 0, float("-inf"))
                y = F.softmax(att, dim=-1) @ v
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn = nn.LayerNorm(WIDTH), CausalSelfAttention()
            self.ln_2 = nn.LayerNorm(WIDTH)
            self.c_fc, self.c_proj = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self, vocab):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, WIDTH), nn.Embedding(CONTEXT, WIDTH)
            self.h = nn.ModuleList(Block() for _ in range(LAYERS))
            self.ln_f, self.lm_head = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, vocab)
            self.register_buffer("mask", torch.tril(torch.ones(CONTEXT, CONTEXT)))

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.h:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    emb, pos, blocks, (gf, bf, wf, cf) = split_names(names)
    model = GPT(params[emb].shape[0])
    for blk in model.h:
        blk.attn.mask = model.mask
    t = lambda a: torch.tensor(np.ascontiguousarray(a))   # noqa: E731
    with torch.no_grad():
        model.wte.weight.copy_(t(params[emb]))
        model.wpe.weight.copy_(t(params[pos]))
        for blk, (g1, b1, wq, wk, wv, wo, bo, g2, b2, w1, c1, w2, c2) in zip(model.h, blocks):
            blk.ln_1.weight.copy_(t(params[g1]))
            blk.ln_1.bias.copy_(t(params[b1]))
            blk.attn.c_attn.weight.copy_(t(np.concatenate([heads_as_rows(params[w]) for w in (wq, wk, wv)])))
            blk.attn.c_proj.weight.copy_(t(params[wo].reshape(-1, WIDTH).T))
            blk.attn.c_proj.bias.copy_(t(params[bo]))
            blk.ln_2.weight.copy_(t(params[g2]))
            blk.ln_2.bias.copy_(t(params[b2]))
            for lin, w, c in ((blk.c_fc, w1, c1), (blk.c_proj, w2, c2)):
                lin.weight.copy_(t(params[w]))
                lin.bias.copy_(t(params[c]))
        model.ln_f.weight.copy_(t(params[gf]))
        model.ln_f.bias.copy_(t(params[bf]))
        model.lm_head.weight.copy_(t(params[wf]))
        model.lm_head.bias.copy_(t(params[cf]))
    opt = torch.optim.Adam(model.parameters(), lr=LR)

    def step(idx, targets):
        opt.zero_grad(set_to_none=True)
        loss = model(idx, targets)
        loss.backward()
        opt.step()
        return float(loss.detach())
    return model, step


# -- PyTorch, the earlier twin in chainrule's parameter layout ---------------------------------------
def torch_einsum_twin(torch, params: dict, names: list):
    """The twin this benchmark used first: ``einsum`` over chainrule's (c, h, e) weights. Returns
    (tensors, loss(x_ids, y_onehot))."""
    P = {n: torch.tensor(params[n], requires_grad=True) for n in names}
    emb, pos, blocks, final = split_names(names)
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


def torch_einsum_step(torch, params, names):
    P, loss_fn = torch_einsum_twin(torch, params, names)
    opt = torch.optim.Adam(P.values(), lr=LR)

    def step(idx, y_onehot):
        opt.zero_grad(set_to_none=True)
        value = loss_fn(idx, y_onehot)
        value.backward()
        opt.step()
        return float(value.detach())
    return step


# -- JAX jit -------------------------------------------------------------------------------------
def jax_gpt_step(jax, params: dict, names: list):
    """The same GPT as pure functions (no framework beyond jax.numpy: the layer norm written out),
    the loss, its gradient and Adam in one jitted function. Returns step(x_ids, targets) -> cost."""
    jnp = jax.numpy
    emb, pos, blocks, (gf, bf, wf, cf) = split_names(names)

    def ln(x, g, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(var + 1e-5) * g + b

    def loss(p, idx, targets):
        x = p[emb][idx] + p[pos]
        B, T, C = x.shape
        causal = jnp.tril(jnp.ones((T, T), dtype=bool))
        for g1, b1, wq, wk, wv, wo, bo, g2, b2, w1, c1, w2, c2 in blocks:
            h = ln(x, p[g1], p[b1])
            q, k, v = (jnp.einsum("btc,che->bhte", h, p[w]) for w in (wq, wk, wv))
            att = jnp.where(causal, q @ jnp.swapaxes(k, -1, -2) / jnp.sqrt(q.shape[-1]), -jnp.inf)
            o = jax.nn.softmax(att, axis=-1) @ v
            x = x + jnp.einsum("bhte,heo->bto", o, p[wo]) + p[bo]
            h = ln(x, p[g2], p[b2])
            x = x + jax.nn.gelu(h @ p[w1].T + p[c1], approximate=True) @ p[w2].T + p[c2]
        logits = ln(x, p[gf], p[bf]) @ p[wf].T + p[cf]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()

    b1, b2, eps = 0.9, 0.999, 1e-8

    @jax.jit
    def update(p, m, v, t, idx, targets):
        cost, g = jax.value_and_grad(loss)(p, idx, targets)
        m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
        v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
        p = jax.tree_util.tree_map(lambda p, m, v: p - LR * (m / (1 - b1 ** t)) / (jnp.sqrt(v / (1 - b2 ** t)) + eps),
                                   p, m, v)
        return cost, p, m, v

    state = {"p": {k: jnp.asarray(v) for k, v in params.items()}}
    state["m"] = {k: jnp.zeros_like(v) for k, v in state["p"].items()}
    state["v"] = {k: jnp.zeros_like(v) for k, v in state["p"].items()}
    state["t"] = 0

    def step(idx, targets):
        state["t"] += 1
        cost, state["p"], state["m"], state["v"] = update(state["p"], state["m"], state["v"],
                                                          jnp.float32(state["t"]), idx, targets)
        return float(cost)                   # waits for the result
    return step


# -- the benchmark ---------------------------------------------------------------------------------
def optional(name):
    try:
        return __import__(name)
    except ImportError:
        return None


def candidates(cm, init, data, labels):
    """name -> step(round) -> cost, every one from chainrule's initial parameters."""
    out = {}
    params, state = {k: v.copy() for k, v in init.items()}, cm.init_state()
    out["chainrule"] = lambda r: cm.train_step(params, *data[r], lr=LR, state=state, step=r + 1)
    torch = optional("torch")
    if torch is None:
        print("PyTorch not installed: its columns are skipped (pip install torch to compare)")
    else:
        torch.set_num_threads(1)
        ids = [torch.from_numpy(x.astype(np.int64)) for x, _ in data]
        tl = [torch.from_numpy(t) for t in labels]
        for name, sdpa in (("PyTorch nanoGPT (SDPA)", True), ("PyTorch nanoGPT (masked softmax)", False)):
            _, fn = torch_nanogpt(torch, init, cm.param_names, sdpa)
            out[name] = lambda r, fn=fn: fn(ids[r], tl[r])
        twin = torch_einsum_step(torch, init, cm.param_names)
        onehot = [torch.from_numpy(y) for _, y in data]
        out["PyTorch einsum twin (old)"] = lambda r: twin(ids[r], onehot[r])
    jax = optional("jax")
    if jax is None:
        print("JAX not installed: its column is skipped (pip install jax to compare)")
    else:
        jstep = jax_gpt_step(jax, init, cm.param_names)
        jids = [jax.numpy.asarray(x.astype(np.int32)) for x, _ in data]
        jtl = [jax.numpy.asarray(t.astype(np.int32)) for t in labels]
        out["JAX jit"] = lambda r: jstep(jids[r], jtl[r])
    return out


def time_rounds(fns, rounds, clock):
    """Round r runs step r of every candidate (the first one rotating); median ms per candidate."""
    samples = {name: [] for name in fns}
    names = list(fns)
    for r in range(1, rounds + 1):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = clock()
            fns[name](r)
            samples[name].append((clock() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def char_gpt_setup():
    """The benchmark's text and model: (codec, train ids, validation ids, the compiled GPT with Adam)."""
    text = load_pydoc_text()
    codec = CharCodec.of(text)
    train_ids, val_ids = split_ids(codec.encode(text))
    cm = compile_model(gpt(codec.vocab, CONTEXT, WIDTH, HEADS, LAYERS, name="char-gpt"), dtype="float32",
                       optimizer="adam")
    return codec, train_ids, val_ids, cm


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time; cpu: this process's CPU time (robust against other work "
                         "on a shared machine)")
    ap.add_argument("--train", type=int, default=0, help="then train chainrule and PyTorch for this many steps")
    args = ap.parse_args(argv)
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)
    t0 = time.perf_counter()
    codec, train_ids, val_ids, cm = char_gpt_setup()
    print(f"chainrule: derive, generate and load {time.perf_counter() - t0:.1f}s "
          f"({'cache hit' if cm.cache_hit else 'generated'})")
    init = cm.init_params(0)
    starts = batch_starts(len(train_ids), CONTEXT, BATCH, max(args.rounds + 1, args.train), 0)
    data = [windows(train_ids, s, CONTEXT, codec.vocab, "float32") for s in starts[:args.rounds + 1]]
    labels = [y.argmax(-1) for _, y in data]
    fns = candidates(cm, init, data, labels)
    first = {}
    for name, fn in fns.items():                   # step 0: compiles, and checks the model is the same
        t = time.perf_counter()
        first[name] = fn(0)
        print(f"{name}: first step {time.perf_counter() - t:.1f}s (compiling or loading), cost {first[name]:.6f}")
    ref = first["chainrule"]
    for name in list(fns):
        rel = abs(first[name] - ref) / abs(ref)
        print(f"  {name:<34} first cost {first[name]:.6f}, relative difference to chainrule {rel:.1e}")
        if rel > 1e-4:
            raise SystemExit(f"{name} disagrees with chainrule on the first step's cost: not the same model")
    threadpool_limits(1)                           # Numba loads SciPy's BLAS lazily: limit it too
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    med = time_rounds(fns, args.rounds, clock)
    load = "/".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"\none Adam step, {LAYERS} layers, {HEADS} heads, width {WIDTH}, context {CONTEXT}, batch {BATCH}, "
          f"float32, one thread; median {args.clock}-clock ms of {args.rounds} alternating rounds "
          f"(load average {load}); ratio = other / chainrule, above 1: chainrule is faster")
    base = med["chainrule"]
    for name, m in med.items():
        print(f"  {name:<34} {m:8.1f} ms   {m / base:5.2f}")
    if args.train:
        train_both(cm, init, optional("torch"), train_ids, val_ids, codec, starts[:args.train])


def train_both(cm, init, torch, train_ids, val_ids, codec, starts):
    """The same steps, data order and initial parameters in chainrule and in nanoGPT (SDPA):
    validation losses and times."""
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
    model, step = torch_nanogpt(torch, init, cm.param_names, sdpa=True)
    as_torch = lambda x, y: (torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.argmax(-1)))  # noqa: E731
    t = time.perf_counter()
    for s in starts:
        step(*as_torch(*windows(train_ids, s, CONTEXT, codec.vocab, "float32")))
    torch_time = time.perf_counter() - t
    with torch.no_grad():
        torch_val = float(np.mean([float(model(*as_torch(x, y))) for x, y in val]))
    print(f"trained {len(starts)} steps: PyTorch   validation loss {torch_val:.4f} in {torch_time:.1f}s "
          f"(chainrule / PyTorch: loss {mine_val / torch_val:.3f}, time {mine_time / torch_time:.2f})")


if __name__ == "__main__":
    main()
