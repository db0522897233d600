"""`chainrule demo`: derive the demo MLP, write its derivation and its generated code, train on digits."""
from __future__ import annotations

import os
import sys
import time

from ..atomic import atomic_write_text

DEMO_EPOCHS = 50
DEMO_QUICK_EPOCHS = 15
DEMO_LR = 2.0
DEMO_BATCH = 32


def _write_text(path, text):
    """Write ``text`` atomically, unless the file already holds exactly it (a second run writes
    the same derivation and code: reading is cheaper than a write and its fsync)."""
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write_text(path, text)


def run_demo(out_dir="chainrule-demo", epochs=None, progress=True, quick=False, lr=DEMO_LR,
             batch_size=DEMO_BATCH, seed=0, dtype="float64", stream=None, worker=None) -> dict:
    """Build the demo model (64 -> dense(128) -> sigmoid -> dense(10) -> softmax cross-entropy),
    write ``derivation.md`` and ``demo_model.py`` (the generated
    kernels) into ``out_dir``, train on scikit-learn's digits (80/20 stratified split, seed 0) and
    print the test accuracy. Returns a dict with the accuracy, timings and file paths.

    ``worker``: a compile worker the caller started warming up in ``dtype`` (``chainrule demo``
    starts it first of all); None: one starts when the module is rendered (on a cold start only).
    """
    from chainrule.codegen import compile_model
    from chainrule.codegen.cache import cached_text

    from .data import load_digits, train_test_split
    from .model import Network

    out = stream if stream is not None else sys.stdout
    epochs = (DEMO_QUICK_EPOCHS if quick else DEMO_EPOCHS) if epochs is None else int(epochs)
    t_start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)

    # compiled by name: a warm start reads the model's description from the cache and never builds
    # the symbolic model (nor imports SymPy); a cold one builds and derives it (``cm.model``).
    # On a cold start (the module generated now) a worker compiles train_step, the longest
    # compilation, while this process explains the derivation, reads the data and compiles forward
    # (see Network.fit). ``chainrule demo`` starts it before anything else (``worker``), so that
    # its start-up and Numba's warm-up run beside this process's imports and derivation; by
    # default it starts while the module is rendered. On a warm start the kernels load from the
    # cache and no worker runs (one given is stopped).
    cm = compile_model("demo", dtype=dtype, background=["train_step"], worker=worker)
    code_path = os.path.join(out_dir, "demo_model.py")
    _write_text(code_path, cm.source)
    net = Network("demo", dtype=dtype, seed=seed, compiled=cm)
    t_generated = time.perf_counter()

    def derivation():
        # imported here: a second run reads the document from the cache and never needs the
        # explanation's modules
        from chainrule.derive import explain_model
        return explain_model(cm.model).to_markdown()
    # derived once: a second run reads the document from the cache, keyed like the kernels (by the
    # model's fingerprint, which the description keeps)
    text = cached_text(cm.description.fingerprint, "derivation.md", derivation)
    derivation_path = os.path.join(out_dir, "derivation.md")
    _write_text(derivation_path, text)
    t_explained = time.perf_counter()

    x, y = load_digits(dtype=dtype)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, seed=0)
    # no per-epoch gradient norms (fit's diagnostics): the demo plots none, and they would load
    # (or on a cold start compile) loss_and_grads and run it every epoch (train_step holds its own
    # copy of the forward and backward pass)
    history = net.fit(x_train, y_train, epochs=epochs, batch_size=batch_size, lr=lr,
                      progress=progress, seed=seed, diagnostics=False)
    t_trained = time.perf_counter()
    result = net.evaluate(x_test, y_test)
    t_end = time.perf_counter()

    print(f"test accuracy: {result['accuracy']:.4f}", file=out)
    print(f"derivation:     {derivation_path}", file=out)
    print(f"generated code: {code_path} (kernels cached at {cm.module_path})", file=out)
    print(f"time: {t_end - t_start:.1f}s (derive and generate {t_generated - t_start:.1f}s, explain "
          f"{t_explained - t_generated:.1f}s, train {t_trained - t_explained:.1f}s: {epochs} epochs, "
          f"including Numba's compilation on first use)",
          file=out)
    return {"test_accuracy": result["accuracy"], "test_loss": result["loss"],
            "train_accuracy": history["accuracy"][-1], "epochs": len(history),
            "derivation": derivation_path, "code": code_path, "module_path": cm.module_path,
            "seconds": t_end - t_start, "compile_seconds": t_generated - t_start,
            "train_seconds": t_trained - t_explained, "history": history, "network": net}
