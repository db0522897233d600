"""Character-level language modelling on a text every Python has: the standard library's
``pydoc_data.topics`` (the help texts of ``help('topics')``). A GPT declared in
``chainrule.derive.attention`` is trained on it with its generated, fused ``train_step`` (Adam),
printing the validation loss as it falls, and then samples text (temperature, top-k).
"""
from __future__ import annotations

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
                   sample_length=200, plot_path=None) -> dict:
    """Train a GPT on the pydoc topics; print the validation loss as it falls and a sample."""
    from ..codegen import compile_model
    from ..derive.attention import gpt
    out = stream if stream is not None else sys.stdout
    text = load_pydoc_text()
    codec = CharCodec.of(text)
    train_ids, val_ids = split_ids(codec.encode(text))
    t0 = time.perf_counter()
    model = gpt(codec.vocab, context, width=width, heads=heads, layers=layers, name="char-gpt")
    cm = compile_model(model, dtype=dtype, optimizer="adam")
    params = cm.init_params(seed)
    state = cm.init_state()
    t_ready = time.perf_counter()
    val_starts = batch_starts(len(val_ids), context, batch, eval_batches, seed + 1)
    val_sets = [windows(val_ids, s, context, codec.vocab, dtype) for s in val_starts]

    def val_loss():
        return float(np.mean([cm.cost(params, x, y) for x, y in val_sets]))

    print(f"char-gpt: {codec.vocab} characters, {len(train_ids)} train / {len(val_ids)} validation; "
          f"{sum(int(np.prod(s)) for s in cm.param_shapes.values())} parameters; {layers} layers, "
          f"{heads} heads, width {width}, context {context}, batch {batch}, Adam lr {lr:g}", file=out)
    history = [(0, val_loss())]
    print(f"step {0:5d}  validation loss {history[-1][1]:.4f}", file=out)
    train_starts = batch_starts(len(train_ids), context, batch, steps, seed)
    t_train = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = windows(train_ids, train_starts[step - 1], context, codec.vocab, dtype)
        train = cm.train_step(params, x, y, lr=lr, state=state, step=step)
        if not np.isfinite(train):
            raise FloatingPointError(f"char-gpt: the training loss is {train} at step {step}")
        if step % eval_every == 0 or step == steps:
            history.append((step, val_loss()))
            print(f"step {step:5d}  validation loss {history[-1][1]:.4f}  (train {train:.4f}, "
                  f"{(time.perf_counter() - t_train) / step * 1000:.0f} ms/step)", file=out)
    t_end = time.perf_counter()
    prompt = codec.decode(val_ids[:context])
    text_out = sample(cm, params, codec, prompt, sample_length, context, seed=seed)
    print(f"sample (temperature 0.8, top-k 10) after {prompt[-30:]!r}:\n{text_out}", file=out)
    if plot_path:
        _plot(history, plot_path)
        print(f"loss curve: {plot_path}", file=out)
    print(f"time: compile {t_ready - t0:.1f}s, train {t_end - t_train:.1f}s", file=out)
    return {"history": history, "sample": text_out, "compiled": cm, "params": params, "codec": codec,
            "train_seconds": t_end - t_train, "val_loss": history[-1][1]}


def _plot(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import io
    from ..atomic import atomic_write
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([s for s, _ in history], [v for _, v in history], marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats per character)")
    ax.set_title("character-level GPT on pydoc_data.topics")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
