"""Named examples: a model, a data set and a training recipe. ``chainrule train NAME`` and the scripts
in ``examples/`` run them: derive, write the derivation document, generate and compile the kernels,
train with a progress bar, print the test accuracy and the time."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

from ..atomic import atomic_write_text


@dataclass(frozen=True)
class Example:
    model: str              # a name in chainrule.derive.EXAMPLE_MODELS (or any spec)
    data: str               # "digits" or "mnist1d"
    epochs: int
    lr: float
    batch_size: int = 32
    target: float = 0.0     # the test accuracy the full run is meant to reach
    about: str = ""
    optimizer: str = "sgd"  # a name in chainrule.runtime.optim.OPTIMIZERS
    clipnorm: float | None = None   # gradient clipping by global norm (recurrent networks)
    runner: str = ""        # a generative example: the name of its loop in runtime.generative.RUNNERS


EXAMPLES = {
    "digits-cnn": Example("digits-cnn-wide", "digits", epochs=20, lr=0.25, target=0.98,
                          about="a CNN on scikit-learn's 8x8 digits (80/20 split, seed 0)"),
    "mnist1d-cnn": Example("mnist1d-cnn", "mnist1d", epochs=30, lr=0.2, target=0.94,
                           about="a 1-D CNN on MNIST-1D (4000 train / 1000 test, generated locally)"),
    "mnist1d-gru": Example("mnist1d-gru", "mnist1d-seq", epochs=25, lr=0.005, target=0.90, optimizer="adam",
                           clipnorm=1.0, about="a GRU reading MNIST-1D one value at a time (40 steps; 4000 train "
                           "/ 1000 test, generated locally)"),
    "residual-mlp": Example("residual-mlp", "digits", epochs=40, lr=0.1, target=0.96,
                            about="an MLP with two residual blocks on scikit-learn's digits"),
    # generative models: their own training loops (runtime/generative.py); ``epochs`` counts epochs,
    # or alternating steps for the GANs
    "autoencoder": Example("autoencoder", "digits", epochs=60, lr=3e-3, runner="autoencoder",
                           about="an autoencoder with a 2-d code against PCA"),
    "denoising-autoencoder": Example("denoising-autoencoder", "digits", epochs=40, lr=3e-3,
                                     runner="denoising", about="a denoising autoencoder"),
    "vae": Example("vae", "digits", epochs=150, lr=2e-3, runner="vae",
                   about="a variational autoencoder with a 2-d latent space"),
    "gan-ring": Example("gan-ring", "ring", epochs=4000, lr=1e-3, runner="gan-ring",
                        about="a GAN on a ring of 8 Gaussians (--epochs counts alternating steps)"),
    "gan-digits": Example("gan-digits", "digits", epochs=8000, lr=2e-4, runner="gan-digits",
                          about="a GAN on the 8x8 digits (--epochs counts alternating steps)"),
    "ddpm": Example("ddpm", "moons", epochs=300, lr=1e-3, runner="ddpm",
                    about="a DDPM on two moons"),
    # a language model: "epochs" counts Adam steps of one batch each, "target" is a validation loss
    "char-gpt": Example("gpt", "pydoc", epochs=3000, lr=3e-3, batch_size=16, target=1.30,
                        about="a 2-layer, 4-head GPT (width 64, context 64) on the characters of the "
                              "standard library's pydoc_data.topics (90/10 split)"),
}


def load_example_data(name: str, dtype="float64"):
    """(x_train, x_test, y_train, y_test) for a data set name."""
    from .data import load_digits, load_mnist1d, train_test_split
    if name == "digits":
        x, y = load_digits(dtype=dtype)
        return train_test_split(x, y, test_size=0.2, seed=0)
    if name in ("mnist1d", "mnist1d-seq"):
        x_tr, y_tr = load_mnist1d(dtype=dtype, split="train")
        x_te, y_te = load_mnist1d(dtype=dtype, split="test")
        if name == "mnist1d-seq":            # a sequence of 40 steps of one value: (N, 40, 1)
            x_tr, x_te = x_tr[:, :, None].copy(), x_te[:, :, None].copy()
        return x_tr, x_te, y_tr, y_te
    raise ValueError(f"unknown data set {name!r}: digits, mnist1d or mnist1d-seq")


def run_example(name: str, out_dir: str | None = None, epochs: int | None = None, progress=True,
                seed=0, dtype="float64", stream=None) -> dict:
    """Run the named example; returns accuracy, timings and paths."""
    from chainrule.codegen import compile_model
    from chainrule.derive import build_model, explain_model

    from .model import Network

    if name not in EXAMPLES:
        raise ValueError(f"unknown example {name!r}; known: {', '.join(EXAMPLES)}")
    ex = EXAMPLES[name]
    out = stream if stream is not None else sys.stdout
    out_dir = out_dir or os.path.join("chainrule-examples", name)
    epochs = ex.epochs if epochs is None else int(epochs)
    if ex.runner:
        return _run_generative(name, ex, out_dir, epochs, progress, seed, dtype, out)
    if ex.data == "pydoc":
        return _run_text_example(name, ex, out_dir, epochs, seed, out)
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    model = build_model(ex.model)
    doc_path = os.path.join(out_dir, "derivation.md")
    atomic_write_text(doc_path, explain_model(model, title=f"Backpropagation in the example `{name}`")
                      .to_markdown())
    t_derived = time.perf_counter()
    from .optim import get_optimizer
    optimizer = get_optimizer(ex.optimizer, ex.lr)
    if ex.clipnorm:
        optimizer.clipnorm = ex.clipnorm
    # the kernels with the optimiser's update fused into train_step (compiled once)
    cm = compile_model(model, dtype=dtype, optimizer=getattr(optimizer, "rule", None) or "sgd")
    atomic_write_text(os.path.join(out_dir, f"{name.replace('-', '_')}_model.py"), cm.source)
    net = Network(model, dtype=dtype, seed=seed, compiled=cm, optimizer=optimizer)
    x_tr, x_te, y_tr, y_te = load_example_data(ex.data, dtype=dtype)
    t_ready = time.perf_counter()
    print(f"{name}: {ex.about}; {net.n_params()} parameters; {epochs} epochs", file=out)
    net.fit(x_tr, y_tr, epochs=epochs, batch_size=ex.batch_size, lr=ex.lr, progress=progress, seed=seed)
    t_trained = time.perf_counter()
    result = net.evaluate(x_te, y_te)
    t_end = time.perf_counter()
    print(f"test accuracy: {result['accuracy']:.4f}", file=out)
    print(f"derivation:    {doc_path}", file=out)
    print(f"time: {t_end - t0:.1f}s (derive {t_derived - t0:.1f}s, generate and load "
          f"{t_ready - t_derived:.1f}s, train {t_trained - t_ready:.1f}s including Numba's compilation "
          f"on first use)", file=out)
    return {"test_accuracy": result["accuracy"], "seconds": t_end - t0,
            "train_seconds": t_trained - t_ready, "derivation": doc_path, "network": net}


def _run_generative(name, ex, out_dir, epochs, progress, seed, dtype, out):
    from .generative import RUNNERS
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    runner = RUNNERS[ex.runner]
    count = "steps" if ex.runner.startswith("gan") else "epochs"
    result = runner(out_dir, **{count: epochs}, progress=progress, seed=seed, dtype=dtype, stream=out)
    for key in ("reconstructions", "latent", "denoised", "samples", "derivation"):
        if key in result:
            print(f"{key + ':':<16} {result[key]}", file=out)
    print(f"time: {time.perf_counter() - t0:.1f}s (derivation, code generation, Numba's compilation on "
          f"first use and training)", file=out)
    return result


def _run_text_example(name, ex, out_dir, steps, seed, out) -> dict:
    """A character-level GPT on pydoc_data.topics: the validation loss as it falls, a sample of text,
    the loss curve (PNG) and the attention layer's derivation (Markdown)."""
    from chainrule.derive import explain_model
    from chainrule.derive.attention import gpt

    from .text import train_char_gpt
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    doc_path = os.path.join(out_dir, "derivation.md")
    small = gpt(5, 4, width=6, heads=3, layers=1, name="gpt (the same declarations at small sizes)")
    atomic_write_text(doc_path, explain_model(small, title=f"Backpropagation in the example `{name}`")
                      .to_markdown())
    result = train_char_gpt(steps=steps, batch=ex.batch_size, lr=ex.lr, seed=seed, stream=out,
                            eval_every=max(1, steps // 10), plot_path=os.path.join(out_dir, "loss.png"))
    print(f"validation loss: {result['val_loss']:.4f} (target {ex.target})", file=out)
    print(f"derivation:      {doc_path}", file=out)
    print(f"time: {time.perf_counter() - t0:.1f}s", file=out)
    return {**result, "derivation": doc_path, "seconds": time.perf_counter() - t0}


def script_main(name: str, argv=None):
    """The command line of ``examples/<name>.py``: ``[--epochs N] [--out DIR]``, then ``run_example``."""
    import argparse
    ap = argparse.ArgumentParser(description=f"the {name} example (the same as: chainrule train {name})")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    return run_example(name, out_dir=args.out, epochs=args.epochs)
