"""Character-level language modelling on a text every Python has: the standard library's
``pydoc_data.topics`` (the help texts of ``help('topics')``). A GPT declared in
``chainrule.derive.attention`` is trained on it with its generated, fused ``train_step`` (Adam),
printing the validation loss as it falls, and then samples text (temperature, top-k).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from ..derive.errors import ShapeError


def load_pydoc_text() -> str:
    """The help topics of the standard library, in a fixed order (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics
    return "\n".join(topics[k] for k in sorted(topics))


@dataclass
class CharCodec:
    """Characters <-> token ids (the sorted characters of a text)."""

    chars: str

    @classmethod
    def of(cls, text: str) -> "CharCodec":
        return cls("".join(sorted(set(text))))

    @property
    def vocab(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        table = {c: k for k, c in enumerate(self.chars)}
        unknown = sorted(set(text) - set(table))
        if unknown:
            raise ShapeError(f"text has characters outside the vocabulary of {self.vocab}: {unknown[:5]}")
        return np.array([table[c] for c in text], dtype=np.int64)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(k)] for k in ids)


def split_ids(ids: np.ndarray, validation=0.1):
    """(train, validation): the last ``validation`` fraction of the text is held out."""
    cut = int(len(ids) * (1 - validation))
    return ids[:cut], ids[cut:]


def windows(ids: np.ndarray, starts, context: int, vocab: int, dtype="float64"):
    """Inputs (n, context) token ids and one-hot targets (n, context, vocab): the next character at
    every position."""
    starts = np.asarray(starts)
    pos = starts[:, None] + np.arange(context)[None, :]
    x = ids[pos].astype(dtype)
    y = np.zeros((len(starts), context, vocab), dtype=dtype)
    np.put_along_axis(y, ids[pos + 1][..., None], 1.0, axis=2)
    return x, y


def batch_starts(n_ids: int, context: int, batch: int, steps: int, seed: int) -> np.ndarray:
    """(steps, batch) window starts drawn from a seeded generator: the data order of a run (the
    PyTorch reference of the benchmark uses the same)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_ids - context - 1, size=(steps, batch))


def sample(cm, params, codec: CharCodec, prompt: str, length: int, context: int, temperature=0.8,
           top_k: int | None = 10, seed=0) -> str:
    """Continue ``prompt`` (at least ``context`` characters) by ``length`` characters: at each step
    the model's next-character probabilities at the last position, sharpened by the temperature
    (p^(1/τ), renormalised: softmax(z/τ)) and cut to the ``top_k`` most likely."""
    if len(prompt) < context:
        raise ShapeError(f"sample: the prompt has {len(prompt)} characters; the model reads {context}")
    rng = np.random.default_rng(seed)
    ids = list(codec.encode(prompt))
    for _ in range(length):
        x = np.array([ids[-context:]], dtype=cm.dtype)
        p = np.asarray(cm.predict(params, x), dtype=np.float64)[0, -1]
        logp = np.log(np.maximum(p, 1e-300)) / temperature
        if top_k is not None and top_k < len(logp):
            logp[np.argsort(logp)[:-top_k]] = -np.inf
        q = np.exp(logp - logp.max())
        ids.append(int(rng.choice(len(q), p=q / q.sum())))
    return codec.decode(ids[len(prompt):])


def train_char_gpt(steps=600, context=64, width=64, heads=4, layers=2, batch=16, lr=3e-3,
                   eval_every=100, eval_batches=8, seed=0, dtype="float32", stream=None,
                   sample_length=200, plot_path=None, temperature=0.8, top_k=10,
                   tie_embeddings=False, cache_dir=None) -> dict:
    """Train a GPT on the pydoc topics with Adam: the validation loss as it falls, then a sample.

    The data order is ``batch_starts(..., seed)`` and the validation windows ``batch_starts(...,
    seed + 1)``, so a reference (``benchmarks/train_gpt.py``, the same model in PyTorch) sees the same
    batches. Times are wall clock and CPU time (``_cpu_seconds``: compile workers included), since the
    machine may be shared."""
    from ..codegen import compile_model
    from ..derive.attention import gpt
    from .threads import blas_threads
    out = stream if stream is not None else sys.stdout
    text = load_pydoc_text()
    codec = CharCodec.of(text)
    train_ids, val_ids = split_ids(codec.encode(text))
    clock = _Clock()
    model = gpt(codec.vocab, context, width=width, heads=heads, layers=layers, name="char-gpt",
                tie_embeddings=tie_embeddings)
    cm = compile_model(model, dtype=dtype, optimizer="adam", cache_dir=cache_dir)
    params = cm.init_params(seed)
    state = cm.init_state()
    val_sets = validation_windows(val_ids, context, batch, eval_batches, seed, codec.vocab, dtype)

    def val_loss():
        return float(np.mean([cm.cost(params, x, y) for x, y in val_sets]))

    print(f"char-gpt: {codec.vocab} characters, {len(train_ids)} train / {len(val_ids)} validation; "
          f"{sum(int(np.prod(s)) for s in cm.param_shapes.values())} parameters; {layers} layers, "
          f"{heads} heads, width {width}, context {context}, batch {batch}, Adam lr {lr:g}"
          f"{', tied embeddings' if tie_embeddings else ''}", file=out)
    history = [(0, val_loss())]
    ready = clock.lap()          # derive, generate, compile (or load) the kernels, first validation
    print(f"step {0:5d}  validation loss {history[-1][1]:.4f}  (kernels ready after {ready[0]:.1f}s, "
          f"{ready[1]:.1f}s CPU)", file=out)
    train_starts = batch_starts(len(train_ids), context, batch, steps, seed)
    train_history, recent = [], []
    # one BLAS thread, like the PyTorch twin: the step's products (batch x context rows, up to 2^24
    # multiply-adds) are where OpenBLAS's second thread spins instead of helping (measured on the
    # 2-core machine under load 5-7: 37 ms of CPU per step on one thread, 288 ms with BLAS's choice)
    with blas_threads(1):
        for step in range(1, steps + 1):
            x, y = windows(train_ids, train_starts[step - 1], context, codec.vocab, dtype)
            train = cm.train_step(params, x, y, lr=lr, state=state, step=step)
            if not np.isfinite(train):
                raise FloatingPointError(f"char-gpt: the training loss is {train} at step {step}")
            recent.append(train)
            if step % eval_every == 0 or step == steps:
                train_history.append((step, float(np.mean(recent))))
                recent = []
                history.append((step, val_loss()))
                wall, cpu = clock.since_lap()
                print(f"step {step:5d}  validation loss {history[-1][1]:.4f}  (train {train_history[-1][1]:.4f}; "
                      f"{wall / step * 1000:.0f} ms/step wall, {cpu / step * 1000:.0f} ms CPU)", file=out)
    trained = clock.lap()
    prompt = paragraph_prompt(codec.decode(val_ids), context)
    text_out = sample(cm, params, codec, prompt, sample_length, context, temperature=temperature,
                      top_k=top_k, seed=seed)
    print(f"sample (temperature {temperature:g}, top-k {top_k}) after {prompt[-30:]!r}:\n{text_out}", file=out)
    if plot_path:
        plot_losses({"validation": history, "training (mean since the last point)": train_history}, plot_path)
        print(f"loss curve: {plot_path}", file=out)
    print(f"time: kernels ready {ready[0]:.1f}s ({ready[1]:.1f}s CPU), {steps} steps {trained[0]:.1f}s "
          f"({trained[1]:.1f}s CPU)", file=out)
    return {"history": history, "train_history": train_history, "sample": text_out, "compiled": cm,
            "params": params, "codec": codec, "ready_seconds": ready[0], "ready_cpu_seconds": ready[1],
            "train_seconds": trained[0], "train_cpu_seconds": trained[1], "val_loss": history[-1][1]}


def paragraph_prompt(text: str, context: int) -> str:
    """The ``context`` characters of ``text`` that end where its first paragraph of prose begins (after
    a blank line and the indentation, before a capitalised word): the sample then writes prose, not
    the middle of a code example. The text's start when there is no such place."""
    import re
    found = re.search(r"\n\n +(?=[A-Z][a-z])", text[context:])
    end = context + found.end() if found else context
    return text[end - context:end]


def validation_windows(val_ids, context, batch, eval_batches, seed, vocab, dtype="float32") -> list:
    """The fixed validation batches of a run (window starts from ``seed + 1``)."""
    return [windows(val_ids, s, context, vocab, dtype)
            for s in batch_starts(len(val_ids), context, batch, eval_batches, seed + 1)]


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished child processes: Numba's compilation (also in the
    compile workers that ``codegen.background`` starts) and the BLAS threads included."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class _Clock:
    """Wall and CPU time (``_cpu_seconds``) since the last lap."""

    def __init__(self):
        self._wall, self._cpu = time.perf_counter(), _cpu_seconds()

    def since_lap(self) -> tuple[float, float]:
        return time.perf_counter() - self._wall, _cpu_seconds() - self._cpu

    def lap(self) -> tuple[float, float]:
        took = self.since_lap()
        self._wall, self._cpu = time.perf_counter(), _cpu_seconds()
        return took


def plot_losses(curves: dict, path, title="character-level GPT on pydoc_data.topics"):
    """One PNG of loss curves, ``{label: [(step, loss), ...]}``, written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import io
    from ..atomic import atomic_write
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per character)")
    ax.set_title(title)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
