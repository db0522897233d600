"""A character-level language model on a text every Python installation has: the standard library's
``pydoc_data.topics`` (the help topics). An embedding and an LSTM read a window of characters and
predict the next one; the script prints the loss falling, epoch by epoch, and samples text.

    python examples/char_lm.py [--epochs 6] [--window 32] [--hidden 128] [--out DIR]
"""
import argparse
import os
import string
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from chainrule.derive import build_model  # noqa: E402
from chainrule.runtime.model import Network  # noqa: E402

ALPHABET = sorted(set(string.printable) - set("\x0b\x0c\r\t"))


def load_text() -> str:
    from pydoc_data.topics import topics
    text = "\n".join(topics[k] for k in sorted(topics))
    return "".join(c if c in ALPHABET else " " for c in text)


def windows(ids, window, count, rng):
    """``count`` random windows of ``window`` ids and the id that follows each."""
    starts = rng.integers(0, len(ids) - window - 1, size=count)
    x = np.stack([ids[s:s + window] for s in starts]).astype(np.float64)
    y = np.eye(len(ALPHABET))[ids[starts + window]]
    return x, y


def sample(net, seed_text, length, window, rng, temperature=0.8) -> str:
    ids = [ALPHABET.index(c) for c in seed_text[-window:].rjust(window)]
    out = []
    for _ in range(length):
        p = net.predict(np.array([ids[-window:]], dtype=np.float64))[0]
        logits = np.log(np.maximum(p, 1e-12)) / temperature
        q = np.exp(logits - logits.max())
        k = int(rng.choice(len(q), p=q / q.sum()))
        ids.append(k)
        out.append(ALPHABET[k])
    return "".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--examples", type=int, default=20000, help="windows per epoch")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    text = load_text()
    ids = np.array([ALPHABET.index(c) for c in text])
    V = len(ALPHABET)
    spec = (f"tokens({args.window}, {V}) -> embedding(32) -> lstm({args.hidden}) -> dense({V}) "
            f"-> softmax_cross_entropy")
    print(f"text: pydoc_data.topics, {len(text):,} characters, {V} symbols; model: {spec}")
    t0 = time.perf_counter()
    net = Network(build_model(spec), seed=args.seed, optimizer="adam")
    print(f"derived and generated in {time.perf_counter() - t0:.1f} s")
    x, y = windows(ids, args.window, args.examples, rng)
    xv, yv = windows(ids, args.window, 2000, rng)
    losses = []
    for epoch in range(args.epochs):
        t = time.perf_counter()
        net.fit(x, y, epochs=1, batch_size=64, lr=0.003, progress=False, diagnostics=False)
        val = net.evaluate(xv, yv)["loss"]
        losses.append(val)
        print(f"epoch {epoch + 1}: held-out loss {val:.3f} nats/char ({time.perf_counter() - t:.1f} s)")
        x, y = windows(ids, args.window, args.examples, rng)          # fresh windows each epoch
    print("sample:", repr(sample(net, "The ", 200, args.window, rng)))
    return losses


if __name__ == "__main__":
    main()
