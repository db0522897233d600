"""Plots of a training run, written as PNG files with matplotlib's Agg backend (no display needed).

``plot_history(history, out_dir)`` writes ``curves.png`` (training and validation loss, and accuracy
for classifiers, per epoch) and ``gradient_norms.png`` (per-parameter gradient norms per epoch, on a
log scale: the picture of vanishing or exploding gradients). ``plot_gradient_profile`` draws
gradient norms against depth (for the vanishing-gradient experiment).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..atomic import atomic_write

__all__ = ["plot_history", "plot_gradient_profile", "plot_curves"]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return os.fspath(path)


def plot_curves(history, path, title="training"):
    """Loss (and accuracy, when recorded) per epoch, training and validation."""
    plt = _pyplot()
    h = history.history
    epochs = [e + 1 for e in history.epochs]
    panels = [("loss", "loss")] + ([("accuracy", "accuracy")] if h.get("accuracy") else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        ax.plot(epochs, h[key], "o-", ms=3, label="training")
        if h.get("val_" + key):
            ax.plot(epochs, h["val_" + key], "s-", ms=3, label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_gradient_norms(history, path, title="gradient norms"):
    plt = _pyplot()
    h = history.history
    keys = [k for k in h if k.startswith("grad_norm/")]
    if not keys:
        raise ValueError("the history has no gradient norms: fit with diagnostics=True")
    epochs = [e + 1 for e in history.epochs]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for k in keys:
        ax.semilogy(epochs, [max(v, 1e-30) for v in h[k]], "o-", ms=3, label=k.split("/", 1)[1])
    ax.set_xlabel("epoch")
    ax.set_ylabel(r"$\|\partial C / \partial \theta\|$")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small", ncol=2)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_history(history, out_dir=".", prefix=""):
    """Both plots of one run; returns ``{"curves": path, "gradient_norms": path}``."""
    out = Path(out_dir)
    paths = {"curves": plot_curves(history, out / f"{prefix}curves.png")}
    if any(k.startswith("grad_norm/") for k in history.history):
        paths["gradient_norms"] = plot_gradient_norms(history, out / f"{prefix}gradient_norms.png")
    return paths


def plot_gradient_profile(series: dict, path, title="gradient norm per layer", xlabel="layer"):
    """``series``: label -> list of norms by layer (1 = nearest the input), drawn on a log scale."""
    return _log_profile(series, path, title, first=1, xlabel=xlabel,
                        ylabel=r"$\|\partial C / \partial W^{(l)}\|$", figsize=(6.5, 4))


def plot_time_profile(series: dict, path, title="gradient norm through time"):
    """``series``: label -> the mean ‖∂C/∂h_t‖ for t = 0 .. T-1, drawn on a log scale."""
    return _log_profile(series, path, title, first=0, xlabel="time step t (the loss reads the last step)",
                        ylabel=r"mean $\|\partial C / \partial h_t\|$", figsize=(7, 4))


def _log_profile(series: dict, path, title, first, xlabel, ylabel, figsize):
    """One line per series against its position (counted from ``first``), norms on a log scale (a
    norm of exactly zero drawn at 1e-30, so that it shows rather than vanishing from the plot)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=figsize)
    for label, values in series.items():
        ax.semilogy(range(first, first + len(values)), [max(v, 1e-30) for v in values], "o-", ms=3,
                    label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)
