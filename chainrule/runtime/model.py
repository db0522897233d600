"""``Network``: a trainable model built on the generated kernels of a derived model.

The runtime never touches the math: it asks ``chainrule.derive`` for the model and
``chainrule.codegen`` for its compiled module, and drives ``train_step`` / ``loss_and_grads`` /
``predict``. Parameters are plain NumPy arrays in a dict, ordered as ``compiled.param_names``.
"""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from ..atomic import atomic_write
from .callbacks import Callback, ProgressBar
from .checkpoint import (BUFFER_PREFIX, CALLBACK_PREFIX, FORMAT, FORMAT_VERSION, STATE_PREFIX,
                         inspect_checkpoint)
from .data import one_hot, train_test_split
from .errors import ChainruleError, CheckpointError, DataError, LabelError, ShapeError, TrainingDiverged
from .optim import SGD, get_optimizer

__all__ = ["History", "Network"]

BINARY_LOSSES = ("bce", "bce_logits")


# -- small helpers -----------------------------------------------------------------------------
def _fmt_config(cfg: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in cfg.items() if k != "name" and v is not None)


def _whole(value, name: str, minimum: int, who="fit") -> int:
    """An integer argument (an integral float such as 3.0 is fine; 2.9 is not truncated)."""
    import numbers
    ok = not isinstance(value, bool) and (
        isinstance(value, numbers.Integral)
        or (isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer()))
    if not ok or int(value) < minimum:
        raise ValueError(f"{who}: {name} must be a whole number >= {minimum}, got {value!r}")
    return int(value)


def _learning_rate(value, who="fit") -> float:
    import numbers
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{who}: lr must be a finite number > 0, got {value!r}")
    return float(value)


def _check_finite(arr: np.ndarray, what: str):
    if arr.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        count = int(bad.sum())
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        first_s = str(first[0]) if len(first) == 1 else str(first)
        raise DataError(f"{what} contains {count} non-finite value{'s' if count > 1 else ''} "
                        f"(NaN or inf); the first at index {first_s} is {arr[first].item()!r}")


class History:
    """Per-epoch metrics of one ``fit``: ``history["loss"]``, ``["accuracy"]``, ``["val_loss"]``,
    ``["val_accuracy"]``, ``["lr"]``, ``["time"]`` (lists, one entry per completed epoch).

    ``loss`` is the mean minibatch cost over the epoch; ``accuracy`` and the validation metrics are
    those of the parameters at the end of the epoch.
    """

    def __init__(self, keys):
        self.history = {k: [] for k in keys}
        self.epochs: list[int] = []
        self.stopped_early = False
        self.params: dict = {}
        self.best_epoch = None         # set by EarlyStopping (0-based)
        self.restored_epoch = None     # the epoch whose parameters EarlyStopping put back

    def append(self, epoch, logs):
        self.epochs.append(epoch)
        for k, v in logs.items():
            self.history.setdefault(k, []).append(v)

    def __getitem__(self, key):
        return self.history[key]

    def __contains__(self, key):
        return key in self.history

    def __len__(self):
        return len(self.epochs)

    def best(self, monitor="val_loss", mode="auto"):
        """(0-based epoch, value) of the best epoch for ``monitor``."""
        values = self.history[monitor]
        if not values:
            raise ValueError("no epochs recorded")
        maximise = mode == "max" or (mode == "auto" and "acc" in monitor)
        k = int(np.argmax(values) if maximise else np.argmin(values))
        return self.epochs[k], values[k]

    def __repr__(self):
        last = {k: (round(v[-1], 4) if v else None) for k, v in self.history.items()}
        return f"History({len(self)} epochs, last {last})"


# -- the network ---------------------------------------------------------------------------------
class Inputs:
    """The inputs of a model with several: arrays whose rows are the same examples, indexed together
    (so shuffling, minibatches and validation splits work as for one array)."""

    def __init__(self, arrays):
        self.arrays = list(arrays)

    def __len__(self):
        return len(self.arrays[0])

    def __getitem__(self, idx):
        return Inputs([a[idx] for a in self.arrays])

    def __repr__(self):
        return f"Inputs({', '.join(str(a.shape) for a in self.arrays)})"


class Network:
    """A trainable network: a derived model, its compiled kernels, and its parameters.

    ``Network("demo")``, ``Network("4 -> dense(8) -> tanh -> dense(3) -> softmax_cross_entropy")``
    or ``Network(model)`` for a ``chainrule.derive.Model``. ``compiled`` reuses an already compiled
    module (``chainrule.codegen.compile_model(model, dtype=...)``).
    """

    def __init__(self, model="demo", dtype="float64", seed=0, optimizer=None, compiled=None):
        if model is None:
            model = "demo"
        # a name or a spec is compiled through its cached description: a warm start never builds
        # the symbolic model (``self.model`` builds it when something asks for it)
        self._model = None if isinstance(model, str) else model
        self._recipe = model if isinstance(model, str) else None
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype}")
        self.optimizer = get_optimizer(optimizer if optimizer is not None else SGD(0.1))
        if compiled is None:
            # one module, generated for the optimiser whose update train_step fuses (not first the
            # default SGD's and then this one's: each costs a derivation and a rendering)
            from chainrule.codegen import compile_model
            rule = getattr(self.optimizer, "rule", None)
            fused = rule is not None and getattr(self.optimizer, "fused", True)
            compiled = compile_model(model, dtype=self.dtype.name, optimizer=rule if fused else "sgd")
        elif np.dtype(compiled.dtype) != self.dtype:
            raise ValueError(f"compiled module is {compiled.dtype} but the network is {self.dtype}")
        self.compiled = compiled
        self._modules = {compiled.optimizer: compiled}
        self.seed = seed
        self._ensure_compiled()
        self.stop_training = False
        self.has_validation = False
        self.epoch = 0                 # epochs completed (what a resumed fit continues from)
        self._rng = None               # the shuffling generator, kept across fits for exact resume
        self._callbacks = []           # the callbacks of the current (or last) fit
        self._callback_states = {}     # key -> (meta, arrays) of stateful callbacks, from a checkpoint
        self.resuming = False          # True while a fit continues a run (initial_epoch > 0)

        cm = compiled
        d = cm.description
        self.name = d.name
        if len(cm.target_names) > 1:
            from chainrule.derive import UnsupportedError
            raise UnsupportedError(
                f"Network trains a model with one target; {d.name!r} has {len(cm.target_names)} "
                f"({', '.join(cm.target_names)}, one per loss): train it with its compiled module "
                f"(compile_model(model).train_step(params, x, [y1, y2, ...])), or give the other heads a "
                f"Term or None instead of a loss with a target")
        self.input_name, self.target_name = cm.input_name, cm.target_name
        self.input_shape = tuple(d.inputs[0].example_shape)       # per example
        self.n_inputs = int(np.prod(self.input_shape))
        self.input_names = list(cm.input_names)
        self.input_shapes = {a.name: tuple(a.example_shape) for a in d.inputs}
        self.n_outputs = d.targets[0].example_shape[0]
        self.loss_name = d.loss_name
        self.task = "multiclass" if d.target_is_simplex else ("binary" if self.loss_name in BINARY_LOSSES
                                                              else "regression")
        self._facts = [f for f in d.facts if f.tensor.name in (cm.input_name, cm.target_name)]
        self.params = cm.init_params(seed=seed)
        self._check_params(self.params, "init_params")
        # non-trainable state (batch norm's running averages): updated by training steps, read in
        # evaluation, saved with the parameters
        self.buffers = cm.init_buffers()
        # the optimiser's declared rule as plain data (the same declaration, without SymPy)
        bind = getattr(self.optimizer, "bind_rule", None)
        if bind is not None:
            bind(cm.description.rule)

    @property
    def model(self):
        """The symbolic model (``chainrule.derive.Model``), built on first use when the network
        was made from a name or a spec whose description was cached."""
        if self._model is None:
            self._model = self.compiled.model
        return self._model

    def _ensure_compiled(self):
        """The compiled module whose ``train_step`` fuses the optimiser's declared update."""
        rule = getattr(self.optimizer, "rule", None)
        if rule is None or self.compiled.optimizer == rule or not getattr(self.optimizer, "fused", True):
            return
        if rule not in self._modules:
            from chainrule.codegen import compile_model
            self._modules[rule] = compile_model(self._recipe or self.model, dtype=self.dtype.name, optimizer=rule,
                                                cache_dir=self.compiled.module_path.parent,
                                                input_grads=getattr(self.compiled, "has_input_grads", False))
        self.compiled = self._modules[rule]

    # -- description ---------------------------------------------------------------------------
    @property
    def is_classifier(self) -> bool:
        return self.task in ("multiclass", "binary")

    @property
    def param_names(self):
        return list(self.compiled.param_names)

    @property
    def param_shapes(self):
        return {k: tuple(self.compiled.param_shapes[k]) for k in self.param_names}

    @property
    def spec(self) -> str | None:
        """The layer-list spec of a sequential model (None for a hand-built graph)."""
        return self.compiled.description.spec

    def n_params(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.param_shapes.values()))

    def summary(self) -> str:
        lines = [f"Network {self.name!r} ({self.dtype.name}, {self.task}, loss {self.loss_name})",
                 (f"  input {self.input_name}: (N, {self.n_inputs})   target {self.target_name}: "
                  f"(N, {self.n_outputs})")]
        if self.spec:
            lines.append(f"  spec: {self.spec}")
        for k, s in self.param_shapes.items():
            lines.append(f"  param {k:<8} {s!s:<12} {int(np.prod(s)):>8}")
        lines.append(f"  {self.n_params()} parameters")
        return "\n".join(lines)

    def __repr__(self):
        return f"Network({self.name!r}, {self.dtype.name}, {self.n_params()} params)"

    # -- parameters ----------------------------------------------------------------------------
    def _check_params(self, params, source):
        self._check_shapes({k: tuple(np.shape(v)) for k, v in params.items()}, source)

    def _check_shapes(self, shapes: dict, source):
        expected = self.param_shapes
        missing = [k for k in expected if k not in shapes]
        extra = [k for k in shapes if k not in expected]
        wrong = [f"{k}: {source} has {tuple(shapes[k])}, the network needs {expected[k]}"
                 for k in expected if k in shapes and tuple(shapes[k]) != expected[k]]
        problems = []
        if missing:
            problems.append(f"missing parameter{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        if extra:
            problems.append(f"unexpected parameter{'s' if len(extra) > 1 else ''} {', '.join(extra)}")
        problems += wrong
        if problems:
            raise CheckpointError(f"parameters from {source} do not fit network {self.name!r} "
                                  f"({self.spec or self.name}): " + "; ".join(problems))

    def get_params(self) -> dict:
        """A copy of the parameters."""
        return {k: self.params[k].copy() for k in self.param_names}

    @property
    def buffer_names(self):
        return list(self.compiled.buffer_names)

    def get_buffers(self) -> dict:
        """A copy of the buffers (running averages)."""
        return {k: self.buffers[k].copy() for k in self.buffer_names}

    def set_buffers(self, buffers: dict, source="set_buffers"):
        """Copy ``buffers`` into the network's running averages (checks names and shapes)."""
        expected = {k: tuple(self.compiled.buffer_shapes[k]) for k in self.buffer_names}
        got = {k: tuple(np.shape(v)) for k, v in buffers.items()}
        if got != expected:
            raise CheckpointError(f"buffers from {source} do not fit network {self.name!r}: "
                                  f"it has {expected}, {source} has {got}")
        for k in self.buffer_names:
            v = np.asarray(buffers[k])
            _check_finite(v, f"buffer {k} from {source}")
            np.copyto(self.buffers[k], v.astype(self.dtype, copy=False))

    def set_params(self, params: dict, source="set_params"):
        """Copy ``params`` into the network's arrays (checks names and shapes)."""
        self._check_params(params, source)
        for k in self.param_names:
            v = np.asarray(params[k])
            _check_finite(v, f"parameter {k} from {source}")
            np.copyto(self.params[k], v.astype(self.dtype, copy=False))

    @property
    def architecture(self) -> str:
        """A fingerprint of the model's equations (see ``chainrule.codegen.cache.model_fingerprint``)."""
        return self.compiled.description.fingerprint

    def save(self, path, training_state=True):
        """Write the parameters to ``path`` (.npz) atomically, with metadata to rebuild the network.

        With ``training_state`` (the default) the file also holds what an exact resume needs: the
        optimiser (its name, hyperparameters, step count and state arrays), the number of epochs
        completed and the state of the shuffling generator.

        The file's mode follows the umask, like any file you write. The temporaries of an earlier
        save of the same path that was killed midway are removed."""
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "model": self.name,
                "spec": self.spec, "dtype": self.dtype.name, "param_names": self.param_names,
                "param_shapes": {k: list(s) for k, s in self.param_shapes.items()},
                "task": self.task, "loss": self.loss_name, "architecture": self.architecture}
        arrays = {k: self.params[k] for k in self.param_names}
        # the running averages are part of the model in evaluation: always saved
        meta["buffer_shapes"] = {}
        for k in self.buffer_names:
            arrays[f"{BUFFER_PREFIX}{k}"] = self.buffers[k]
            meta["buffer_shapes"][f"{BUFFER_PREFIX}{k}"] = list(self.buffers[k].shape)
        if training_state:
            opt = self.optimizer
            meta["optimizer"] = {"class": type(opt).__name__, "config": opt.config(),
                                 "t": int(getattr(opt, "t", 0)),
                                 "state": sorted(f"{p}/{s}" for p in opt.state for s in opt.state[p])}
            meta["epoch"] = int(self.epoch)
            meta["rng"] = self._rng.bit_generator.state if self._rng is not None else None
            meta["callbacks"], meta["callback_shapes"] = {}, {}
            for key, (cb_meta, cb_arrays) in self.callback_states().items():
                meta["callbacks"][key] = cb_meta
                for name, a in cb_arrays.items():
                    arrays[f"{CALLBACK_PREFIX}{key}/{name}"] = a
                    meta["callback_shapes"][f"{CALLBACK_PREFIX}{key}/{name}"] = list(np.shape(a))
            meta["state_shapes"] = {}
            for p, states in opt.state.items():
                for sname, a in states.items():
                    arrays[f"{STATE_PREFIX}{p}/{sname}"] = a
                    meta["state_shapes"][f"{STATE_PREFIX}{p}/{sname}"] = list(a.shape)
        arrays["__meta__"] = np.array(json.dumps(meta))
        atomic_write(path, lambda f: np.savez(f, **arrays))
        return os.fspath(path)

    def _check_architecture(self, ck, src):
        """Refuse a file saved from another architecture with the same shapes (relu vs tanh, mse vs
        cross-entropy): both layer-list specs are compared. The equations' fingerprints are compared
        too (hand-built graphs, user layers that share a name), with a warning only: they may also
        change with the SymPy version."""
        meta = ck.meta
        if not meta:
            return
        theirs, ours = meta.get("spec"), self.spec
        if theirs and ours and theirs != ours:
            raise CheckpointError(
                f"{src} was saved from a different architecture: {theirs!r}, but this network "
                f"is {ours!r} (the parameter shapes agree, the functions differ); build the "
                f"network it was saved from (Network.from_checkpoint) or pass "
                f"check_architecture=False to load the numbers anyway")
        if meta.get("architecture") and meta["architecture"] != self.architecture:
            import warnings
            warnings.warn(f"{src} was saved from model {meta['model']!r} ({theirs or 'hand-built'}) "
                          f"whose equations differ from this network's {self.name!r} "
                          f"({ours or 'hand-built'}); loading the parameters anyway",
                          RuntimeWarning, stacklevel=3)

    def load(self, path, check_architecture=True):
        """Load parameters saved by :meth:`save`; names and shapes must match this network, and
        (unless ``check_architecture=False``) the file must come from the same architecture.
        Everything is validated from the file's headers before any array is read.

        A file with training state also restores the optimiser's state and step count (the
        network's optimiser must be the same kind with the same hyperparameters; the learning rate
        may differ), the epoch count and the shuffling generator, so that
        ``fit(..., initial_epoch=net.epoch)`` continues exactly.
        """
        ck = inspect_checkpoint(path)
        src = os.fspath(path)
        if ck.meta and ck.meta.get("spec") and self.spec and ck.meta["spec"] != self.spec:
            src = f"{src} (saved from {ck.meta['spec']!r})"
        self._check_shapes(ck.shapes, src)
        if check_architecture:
            self._check_architecture(ck, os.fspath(path))
        saved_opt = ck.meta.get("optimizer") if ck.meta else None
        if saved_opt is not None:
            mine = self.optimizer.config()
            theirs = saved_opt.get("config", {})
            same_kind = theirs.get("name") == mine.get("name")
            # the learning rate and clipping may change between runs (schedules do it every epoch);
            # the other hyperparameters define what the saved state means
            fixed = lambda cfg: {k: v for k, v in cfg.items() if k not in ("lr", "clipnorm")}  # noqa: E731
            if (not same_kind and ck.state) or (same_kind and fixed(theirs) != fixed(mine)):
                raise CheckpointError(
                    f"{src} was saved with optimizer {saved_opt.get('class')}({_fmt_config(theirs)}) "
                    f"but the network uses {type(self.optimizer).__name__}({_fmt_config(mine)}): pass the "
                    f"same optimizer to Network(..., optimizer=...) to resume, or load the parameters "
                    f"only with load_params()")
            from chainrule.derive.optimizers import get_rule
            rule = getattr(self.optimizer, "rule", None)
            expected = {f"{STATE_PREFIX}{p}/{s}" for p in self.param_names
                        for s in (get_rule(rule).state if rule else [])}
            if same_kind and ck.state and set(ck.state) != expected:
                raise CheckpointError(f"{src}: optimizer state {sorted(ck.state)} does not fit this "
                                      f"network's {sorted(expected)}")
            for key, m in ck.state.items():
                pname = key[len(STATE_PREFIX):].split("/", 1)[0]
                if m.shape != self.param_shapes[pname]:
                    raise CheckpointError(f"{src}: optimizer state {key} has shape {m.shape}, the "
                                          f"parameter has {self.param_shapes[pname]}")
        self.set_params(ck.read_arrays(), source=src)
        self._load_buffers(ck, src)
        if saved_opt is not None:
            state = {}
            if same_kind:
                for key, a in ck.read_arrays(state=True).items():
                    pname, sname = key[len(STATE_PREFIX):].split("/", 1)
                    _check_finite(a, f"optimizer state {sname} of {pname} in {src}")
                    state.setdefault(pname, {})[sname] = np.ascontiguousarray(a, dtype=self.dtype)
            self.optimizer.state = state
            self.optimizer.t = int(saved_opt.get("t", 0)) if same_kind else 0
            self.epoch = int(ck.meta.get("epoch", 0))
            self._callback_states = self._read_callback_states(ck, src)
            self._callbacks = []             # what is saved next is the loaded state
            if ck.meta.get("rng") is not None:
                self._rng = np.random.default_rng()
                self._rng.bit_generator.state = ck.meta["rng"]
        return self

    def load_params(self, path, check_architecture=True):
        """Load only the parameters (and the running averages the model evaluates with) of a file
        saved by :meth:`save` (no optimiser state)."""
        ck = inspect_checkpoint(path)
        self._check_shapes(ck.shapes, os.fspath(path))
        if check_architecture:
            self._check_architecture(ck, os.fspath(path))
        self.set_params(ck.read_arrays(), source=os.fspath(path))
        self._load_buffers(ck, os.fspath(path))
        return self

    def callback_states(self) -> dict:
        """``key -> (meta, arrays)`` of the stateful callbacks (early stopping, checkpoints kept
        when the monitor improves): those of the current fit, else those loaded from a checkpoint."""
        live = {c.state_key(): c.state() for c in self._callbacks if c.state() is not None}
        return live if self._callbacks else dict(self._callback_states)

    def saved_callback_state(self, key):
        """The state a resumed fit's callback continues from (None when not resuming)."""
        return self._callback_states.get(key) if self.resuming else None

    def _read_callback_states(self, ck, src) -> dict:
        states = {k: (dict(v), {}) for k, v in (ck.meta.get("callbacks") or {}).items()
                  if isinstance(v, dict)}
        for name, a in ck.read_arrays(callbacks=True).items():
            key, _, array = name[len(CALLBACK_PREFIX):].rpartition("/")
            if key not in states:
                raise CheckpointError(f"{src}: callback array {name} belongs to no saved callback")
            _check_finite(a, f"callback state {name} in {src}")
            states[key][1][array] = np.ascontiguousarray(a, dtype=self.dtype)
        return states

    def _load_buffers(self, ck, src):
        """The running averages of a checkpoint, by name (``__buf__/<name>``)."""
        buffers = {k[len(BUFFER_PREFIX):]: a for k, a in ck.read_arrays(buffers=True).items()}
        if buffers or self.buffer_names:
            self.set_buffers(buffers, source=src)

    @classmethod
    def from_checkpoint(cls, path, compiled=None, **kw):
        """Rebuild the network a file was saved from (model name or spec, dtype) and load it.

        The metadata's model is built (symbolically, cheap) and its parameter shapes checked against
        the metadata and the archive before any kernel is compiled or any array allocated."""
        ck = inspect_checkpoint(path)
        src = os.fspath(path)
        meta = ck.meta
        if not meta:
            raise CheckpointError(f"{src} has no chainrule metadata: build the Network "
                                  f"yourself and call .load()")
        from chainrule.derive import BUILTIN_MODELS, EXAMPLE_MODELS, build_model
        name = meta["model"] if meta["model"] in {**BUILTIN_MODELS, **EXAMPLE_MODELS} else meta.get("spec")
        if name is None:
            raise CheckpointError(f"{src} was saved from a hand-built model "
                                  f"{meta['model']!r}: build it and call Network(model).load(path)")
        try:
            model = build_model(name)
        except ChainruleError as e:
            raise CheckpointError(f"{src}: the model in its metadata cannot be built: {e}") from e
        shapes = {p.name: tuple(int(n) for n in model.concrete_shape(p)) for p in model.params}
        if shapes != ck.shapes:
            diff = [f"{k}: the model has {shapes.get(k)}, the file {ck.shapes.get(k)}"
                    for k in sorted(set(shapes) | set(ck.shapes)) if shapes.get(k) != ck.shapes.get(k)]
            raise CheckpointError(f"{src}: its metadata's model {name!r} does not match its arrays: "
                                  + "; ".join(diff))
        net = cls(model, dtype=meta["dtype"], compiled=compiled, **kw)
        net._check_architecture(ck, src)
        net.set_params(ck.read_arrays(), source=src)
        net._load_buffers(ck, src)
        return net

    # -- data checks -----------------------------------------------------------------------------
    def _prepare_x(self, x, what="x"):
        if len(self.input_names) == 1:
            return self._prepare_one(x, what, self.input_name, self.input_shape)
        if isinstance(x, Inputs):
            x = x.arrays
        if isinstance(x, dict):
            missing = [n for n in self.input_names if n not in x]
            if missing:
                raise ShapeError(f"{what}: missing inputs {missing}; the model takes {self.input_names}")
            x = [x[n] for n in self.input_names]
        if not isinstance(x, (list, tuple)) or len(x) != len(self.input_names):
            raise ShapeError(f"{what}: the model takes {len(self.input_names)} inputs {self.input_names}; "
                             f"give a list or a dict of arrays")
        arrays = [self._prepare_one(a, f"{what}[{n}]", n, self.input_shapes[n])
                  for a, n in zip(x, self.input_names)]
        rows = {len(a) for a in arrays}
        if len(rows) != 1:
            raise ShapeError(f"{what}: the inputs {self.input_names} have different numbers of rows "
                             f"{[len(a) for a in arrays]}")
        return Inputs(arrays)

    def _prepare_one(self, x, what, name, shape):
        arr = np.asarray(x)
        shape = tuple(shape)
        n_flat = int(np.prod(shape))
        if len(shape) > 1 and arr.ndim == 2 and arr.shape[1] == n_flat:
            arr = arr.reshape((len(arr),) + shape)      # flat rows of an image, row-major (C, H, W)
        if arr.shape[1:] != shape:
            where = "" if what == name else f"{what}: "
            want = ", ".join(map(str, shape))
            alt = f" (or (N, {n_flat}) rows, reshaped row-major)" if len(shape) > 1 else ""
            raise ShapeError(f"{where}tensor {name} expects shape (N, {want}){alt}, "
                             f"got {arr.shape}")
        if arr.dtype.kind not in "biuf":
            raise DataError(f"{what}: expected numbers, got dtype {arr.dtype}")
        _check_finite(arr, what)
        out = np.ascontiguousarray(arr, dtype=self.dtype)
        _check_finite(out, f"{what} (as {self.dtype.name})")
        for fact in self._facts:                 # facts declared on the input, if any
            if fact.tensor.name == self.input_name:
                fact.check(out, what=what, error=DataError, data_dtype=arr.dtype)
        return out

    def _prepare_y(self, y, n, what="y"):
        arr = np.asarray(y)
        t, k = self.target_name, self.n_outputs
        if arr.dtype.kind not in "biuf":
            raise DataError(f"{what}: expected numbers, got dtype {arr.dtype}")
        if arr.shape[:1] != (n,):
            raise ShapeError(f"{what}: tensor {t} needs one row per example: x has {n} rows, "
                             f"{what} has shape {arr.shape}")
        _check_finite(arr, what)
        if self.task == "multiclass" and arr.ndim == 1:
            arr = one_hot(arr, k, dtype=self.dtype, name=f"{t} ({what})")
        elif self.task == "binary" and arr.ndim == 1 and k == 1:
            bad = np.flatnonzero((arr != 0) & (arr != 1))
            if bad.size:
                i = int(bad[0])
                raise LabelError(f"label {arr[i].item()!r} at index {i} of {what} is outside the range 0..1 "
                                 f"of the binary target {t} ({bad.size} bad labels)")
            arr = arr.reshape(n, 1)
        elif arr.ndim == 1 and k == 1:
            arr = arr.reshape(n, 1)
        if arr.ndim != 2 or arr.shape[1] != k:
            hint = (f" (or integer class labels of shape ({n},))" if self.task == "multiclass" else "")
            raise ShapeError(f"{what}: tensor {t} expects shape (N, {k}){hint}, got {np.shape(y)}")
        out = np.ascontiguousarray(arr, dtype=self.dtype)
        _check_finite(out, f"{what} (as {self.dtype.name})")
        # every fact declared on the target (the derived gradient may rely on it), on all rows
        # at once, so that the error names the row of the caller's data
        for fact in self._facts:
            if fact.tensor.name == t:
                fact.check(out, what=what, error=DataError, data_dtype=arr.dtype)
        if self.task == "multiclass" and (out < 0).any():
            i = int(np.argwhere(out < 0)[0][0])
            raise DataError(f"{what}: each row of target {t} must be a probability vector "
                            f"(non-negative, summing to 1: {self.loss_name} declares it); "
                            f"row {i} is {out[i].tolist()}")
        elif self.task == "binary" and ((out < 0) | (out > 1)).any():
            i = tuple(int(v) for v in np.argwhere((out < 0) | (out > 1))[0])
            raise DataError(f"{what}: binary target {t} must lie in [0, 1]; {what}{list(i)} = {out[i].item()!r}")
        return out

    def _prepare(self, x, y, what="x", ywhat="y", who=None):
        xs = self._prepare_x(x, what)
        if who and len(xs) == 0:
            raise DataError(f"{who}: {what} is empty (0 examples, shape {xs.shape}): there is "
                            f"nothing to {'evaluate' if who == 'evaluate' else 'train on'}")
        return xs, self._prepare_y(y, len(xs), ywhat)

    # -- inference -------------------------------------------------------------------------------
    def predict(self, x, batch_size=4096):
        """The model's output for ``x`` (class probabilities for classification losses)."""
        batch_size = _whole(batch_size, "batch_size", 1, who="predict")
        xs = self._prepare_x(x)
        if len(xs) <= batch_size:
            return np.asarray(self.compiled.predict(self.params, xs, buffers=self.buffers))
        return np.concatenate([np.asarray(self.compiled.predict(self.params, xs[i:i + batch_size],
                                                                buffers=self.buffers))
                               for i in range(0, len(xs), batch_size)])

    def predict_classes(self, x):
        if not self.is_classifier:
            raise ValueError(f"predict_classes needs a classification loss, the model has {self.loss_name}")
        p = self.predict(x)
        if self.task == "binary":
            return (p > 0.5).astype(np.int64).reshape(len(p), -1).squeeze(-1) if p.shape[1] == 1 \
                else (p > 0.5).astype(np.int64)
        return np.argmax(p, axis=1)

    def _accuracy(self, pred, y):
        if self.task == "multiclass":
            return float(np.mean(np.argmax(pred, 1) == np.argmax(y, 1)))
        if self.task == "binary":
            return float(np.mean((pred > 0.5) == (y > 0.5)))
        return None

    def _cost(self, xs, ys, batch_size=4096):
        total = 0.0
        for i in range(0, len(xs), batch_size):
            xb, yb = xs[i:i + batch_size], ys[i:i + batch_size]
            if hasattr(self.compiled, "cost"):
                c = self.compiled.cost(self.params, xb, yb, buffers=self.buffers)
            else:
                c, _ = self.compiled.loss_and_grads(self.params, xb, yb)
            total += float(c) * len(xb)
        return total / len(xs)

    def _metrics(self, xs, ys, want_loss=True, batch_size=4096):
        out = {}
        if not hasattr(self.compiled, "forward"):
            if want_loss:
                out["loss"] = self._cost(xs, ys)
            if self.is_classifier:
                out["accuracy"] = self._accuracy(self.predict(xs), ys)
            return out
        # one pass of the compiled forward gives both the cost and the output (so a training run
        # compiles and runs forward, not forward and predict)
        total, preds = 0.0, []
        for i in range(0, len(xs), batch_size):
            xb, yb = xs[i:i + batch_size], ys[i:i + batch_size]
            c, p = self.compiled.forward(self.params, xb, yb)
            total += float(c) * len(xb)
            preds.append(np.asarray(p))
        if want_loss:
            out["loss"] = total / len(xs)
        if self.is_classifier:
            out["accuracy"] = self._accuracy(np.concatenate(preds) if len(preds) > 1 else preds[0], ys)
        return out

    def evaluate(self, x, y) -> dict:
        """``{"loss": mean cost, "accuracy": ...}`` (accuracy only for classification losses)."""
        xs, ys = self._prepare(x, y, who="evaluate")
        return self._metrics(xs, ys)

    def gradient_norms(self, x, y, prepared=False) -> dict:
        """‖∂C/∂θ‖ for every parameter θ at the current parameters, on the batch ``x, y``."""
        xs, ys = (x, y) if prepared else self._prepare(x, y)
        # _prepare checked the declared facts on every row (fit's data, prepared, too)
        _, grads = self.compiled.loss_and_grads(self.params, xs, ys, facts_checked=True)
        return {k: float(np.linalg.norm(grads[k])) for k in self.param_names}

    def plot(self, history=None, out_dir=".", prefix=""):
        """Write the training curves and the per-layer gradient norms as PNG files in ``out_dir``;
        returns their paths (see :mod:`chainrule.runtime.plots`)."""
        from .plots import plot_history
        return plot_history(history if history is not None else self.history, out_dir, prefix=prefix)

    # -- training ----------------------------------------------------------------------------------
    def fit(self, x, y, epochs=10, batch_size=32, lr=None, validation_split=None,
            validation_data=None, shuffle=True, seed=None, callbacks=(), progress=True,
            optimizer=None, divergence_factor=1e3, initial_epoch=0, diagnostics=True,
            blas_threads="auto") -> History:
        """Minibatch training. Returns a :class:`History`.

        ``seed`` seeds the shuffling (default: the network's seed) and the validation split.
        ``validation_split`` (a fraction) holds out a seeded, stratified part of ``x, y``;
        ``validation_data=(x_val, y_val)`` gives the held-out set directly.
        Training stops with :class:`TrainingDiverged` if a minibatch cost is NaN/inf or exceeds
        ``divergence_factor`` × max(first cost, 1) (``None`` disables the second test); the
        parameters are then restored to those at the start of the failing epoch.

        ``epochs`` (>= 0) and ``batch_size`` (>= 1) are whole numbers and ``lr`` a finite number
        > 0: anything else is a ``ValueError`` naming the argument; empty data is a ``DataError``.

        Reproducibility: the same data, seed, dtype, optimizer and *number of BLAS threads* give
        bitwise identical parameters. The matrix products run in BLAS, whose summation order
        depends on its thread count once the products are large enough to be split, so 1 and 2
        threads can differ in the last bits: rounding-level differences that training may grow
        (measured in float64: the demo at batch 32 is identical; a 64-512-10 tanh network at batch
        512 differs by up to 6e-17 in absolute value after 5 epochs). For bitwise equal runs pin
        the thread count, e.g. ``OPENBLAS_NUM_THREADS=1`` (or ``OMP_NUM_THREADS``) before NumPy
        and Numba are imported.

        ``blas_threads``: the BLAS thread limit while training; ``"auto"`` (the default) is one
        thread when the step's largest product (largest parameter × batch) has fewer than 2²⁴
        multiply-adds, where a second thread costs more than it saves, and BLAS's own choice
        otherwise (:mod:`chainrule.runtime.threads`); a number sets it, None leaves BLAS alone.

        With ``diagnostics`` the history also records, per parameter and epoch, the gradient norm
        ``grad_norm/W1`` (on up to 256 training examples, at the epoch's end) and the update/weight
        ratio ``update_ratio/W1`` = ‖W_end - W_start‖ / ‖W_start‖ over the epoch.

        ``initial_epoch`` continues a run: epochs ``initial_epoch .. epochs - 1`` are trained, with
        the shuffling generator and optimiser state as they were (kept in memory, or restored by
        :meth:`load` from a checkpoint written by :meth:`save` / ``ModelCheckpoint``), so that
        3 epochs + save + load + ``fit(epochs=6, initial_epoch=3)`` equals 6 epochs bit for bit.
        """
        from .threads import blas_threads as limit, training_blas_threads
        threads = training_blas_threads(self.compiled.param_shapes.values(), batch_size, blas_threads)
        with limit(threads):
            return self._fit(x, y, epochs, batch_size, lr, validation_split, validation_data, shuffle,
                             seed, callbacks, progress, optimizer, divergence_factor, initial_epoch,
                             diagnostics)

    def _fit(self, x, y, epochs, batch_size, lr, validation_split, validation_data, shuffle, seed,
             callbacks, progress, optimizer, divergence_factor, initial_epoch, diagnostics) -> History:
        epochs = _whole(epochs, "epochs", 0)
        batch_size = _whole(batch_size, "batch_size", 1)
        if lr is not None:
            lr = _learning_rate(lr)
        if optimizer is not None:
            self.optimizer = get_optimizer(optimizer)
        if lr is not None:
            self.optimizer.lr = lr
        self._ensure_compiled()
        seed = self.seed if seed is None else seed
        if validation_split is not None and validation_data is not None:
            raise ValueError("give validation_split or validation_data, not both")
        xs, ys = self._prepare(x, y, who="fit")
        if validation_split is not None:
            if not 0 < float(validation_split) < 1:
                raise ValueError(f"validation_split must be in (0, 1), got {validation_split!r}")
            n_val = round(float(validation_split) * len(xs))
            if n_val < 1 or n_val >= len(xs):
                raise ValueError(f"validation_split={validation_split} leaves {n_val} of {len(xs)} "
                                 f"examples for validation")
            idx = np.arange(len(xs))
            if self.task == "multiclass":      # stratified by class
                tr, va, _, _ = train_test_split(idx, np.argmax(ys, 1), n_val, seed=seed, stratify=True)
            else:
                tr, va, _, _ = train_test_split(idx, idx, n_val, seed=seed, stratify=False)
            xs, xv, ys, yv = xs[tr], xs[va], ys[tr], ys[va]
            validation = (xv, yv)
        elif validation_data is not None:
            if len(validation_data) != 2:
                raise ValueError("validation_data must be a pair (x_val, y_val)")
            validation = self._prepare(*validation_data, what="validation x", ywhat="validation y",
                                       who="fit (validation_data)")
        else:
            validation = None
        self.has_validation = validation is not None
        if epochs > initial_epoch and (self.is_classifier or validation is not None):
            # the epochs' metrics call forward: on a cold start a worker compiles it while this
            # process compiles train_step on the first step (nothing happens when it is cached);
            # when a worker already compiles train_step (started before other work, as the demo
            # does), this process compiles forward meanwhile
            if "train_step" in self.compiled.background_kernels:
                self.compiled.compile_now(["forward"])
            else:
                self.compiled.compile_in_background(["forward"])

        callbacks = list(callbacks or ())
        if progress and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(ProgressBar())
        for c in callbacks:
            if not isinstance(c, Callback):
                raise TypeError(f"callbacks must be Callback instances, got {type(c).__name__}")
            c.set_network(self)

        n = len(xs)
        steps = math.ceil(n / batch_size)
        self._fit_epochs, self._fit_steps = epochs, steps
        keys = ["loss"] + (["accuracy"] if self.is_classifier else [])
        keys += [f"val_{k}" for k in keys] if validation is not None else []
        history = History(keys + ["lr", "time"])
        history.params = {"epochs": epochs, "batch_size": batch_size, "steps": steps, "seed": seed,
                          "optimizer": self.optimizer.config(), "n_train": n,
                          "n_val": len(validation[0]) if validation is not None else 0}
        self.history = history
        self.stop_training = False
        if isinstance(initial_epoch, bool) or not isinstance(initial_epoch, (int, np.integer)) \
                or not 0 <= initial_epoch <= epochs:
            raise ValueError(f"initial_epoch must be an integer in [0, epochs={epochs}], "
                             f"got {initial_epoch!r}")
        if initial_epoch == 0 or self._rng is None:
            if initial_epoch:
                raise ValueError(f"initial_epoch={initial_epoch} resumes a run, but this network has "
                                 f"no training state: load a checkpoint saved by save() first")
            self._rng = np.random.default_rng(seed)
        elif initial_epoch != self.epoch:
            raise ValueError(f"initial_epoch={initial_epoch} but the network has completed "
                             f"{self.epoch} epochs (from its checkpoint or last fit)")
        rng = self._rng
        reference = None
        buffers = {"buffers": self.buffers} if self.buffer_names else {}   # custom optimisers: none
        self.resuming = initial_epoch > 0
        self._callbacks = callbacks
        for c in callbacks:
            c.on_train_begin()
        # checkpoints are written after every other callback has seen the epoch, so that they hold
        # its state (early stopping's best value and patience counter)
        from .callbacks import ModelCheckpoint
        at_epoch_end = ([c for c in callbacks if not isinstance(c, ModelCheckpoint)]
                        + [c for c in callbacks if isinstance(c, ModelCheckpoint)])
        for epoch in range(initial_epoch, epochs):
            for c in callbacks:
                c.on_epoch_begin(epoch)
            t0 = time.perf_counter()
            last_good, last_buffers = self.get_params(), self.get_buffers()
            if shuffle:
                perm = rng.permutation(n)
                xe, ye = xs[perm], ys[perm]
            else:
                xe, ye = xs, ys
            total = 0.0
            # a declared optimiser's fused step with its state checked once per epoch (the same
            # kernel and numbers as optimizer.step); None: a custom or unfused optimiser
            stepper = getattr(self.optimizer, "stepper", None)
            fast_step = stepper(self.compiled, self.params, **buffers) if stepper is not None else None
            # The minibatch loop stays in Python, one kernel call per step. Measured on the demo at
            # batch 32 (2-core machine at load 6.8, CPU clock, medians of 7 alternating runs of 20
            # epochs): fit takes 91 µs a step with the stepper and 96 µs with optimizer.step, the
            # bare kernel 59 µs; the difference is per-epoch work (the shuffled copy of the data,
            # the accuracy pass's bookkeeping) and the checks each step keeps (the batch's shapes,
            # the parameters: about 6 µs). An epoch compiled as one njit function would save those
            # few µs a step (about 15 ms of a warm `chainrule demo`'s 2250 steps). It would not pay:
            # every per-step callback (the progress bar is on by default, schedules, divergence
            # checks that stop at the failing step) needs Python between the steps anyway, and a
            # function that calls train_step inside Numba links and optimises train_step's code
            # again, seconds of compilation on a cold start for milliseconds saved.
            for step in range(steps):
                lo = step * batch_size
                xb, yb = xe[lo:lo + batch_size], ye[lo:lo + batch_size]
                # the declared facts were checked on every row by _prepare: not again per step
                # this step's dropout masks / noise, seeded
                noise = {"seed": int(rng.integers(2 ** 31))} if self.compiled.has_noise else {}
                if fast_step is not None:
                    cost = fast_step(xb, yb, **noise)
                else:
                    cost = self.optimizer.step(self.compiled, self.params, xb, yb, facts_checked=True,
                                               **noise, **buffers)
                if reference is None and math.isfinite(cost):
                    reference = max(abs(cost), 1.0)
                exploded = (divergence_factor is not None and reference is not None
                            and cost > divergence_factor * reference)
                if not math.isfinite(cost) or exploded:
                    self.set_params(last_good, source="the last good parameters")
                    self.set_buffers(last_buffers, source="the last good buffers")
                    # (the kernels follow IEEE arithmetic: an overflow or a division by zero in
                    # the forward or backward pass arrives here as an inf/NaN cost)
                    why = (f"the cost became {cost} (an overflow or a division by zero in the "
                           f"forward or backward pass gives inf/NaN)" if not math.isfinite(cost) else
                           f"the cost {cost:.4g} exceeds {divergence_factor:g} × the first cost "
                           f"({reference:.4g})")
                    err = TrainingDiverged(
                        f"training diverged at epoch {epoch + 1}, step {step + 1}/{steps}: {why} "
                        f"(optimizer {self.optimizer!r}); parameters restored to those at the start "
                        f"of epoch {epoch + 1}; try a smaller learning rate",
                        epoch=epoch + 1, step=step + 1, cost=cost)
                    err.history = history
                    raise err
                total += cost * len(xb)
                for c in callbacks:
                    c.on_batch_end(step + 1, steps, cost)
            for k in self.param_names:
                if not np.all(np.isfinite(self.params[k])):
                    self.set_params(last_good, source="the last good parameters")
                    self.set_buffers(last_buffers, source="the last good buffers")
                    err = TrainingDiverged(
                        f"training diverged in epoch {epoch + 1}: parameter {k} became non-finite; "
                        f"parameters restored to those at the start of epoch {epoch + 1}",
                        epoch=epoch + 1, step=steps, cost=math.nan)
                    err.history = history
                    raise err
            logs = {"loss": total / n}
            if self.is_classifier:
                logs["accuracy"] = self._metrics(xs, ys, want_loss=False)["accuracy"]
            if validation is not None:
                logs.update({f"val_{k}": v for k, v in self._metrics(*validation).items()})
            logs["lr"] = self.optimizer.lr
            logs["time"] = time.perf_counter() - t0
            record = dict(logs)
            if diagnostics:
                norms = self.gradient_norms(xs[:256], ys[:256], prepared=True)
                for k in self.param_names:
                    record[f"grad_norm/{k}"] = norms[k]
                    start = float(np.linalg.norm(last_good[k]))
                    step_norm = float(np.linalg.norm(self.params[k] - last_good[k]))
                    record[f"update_ratio/{k}"] = step_norm / start if start > 0 else math.inf
            history.append(epoch, record)
            self.epoch = epoch + 1
            for c in at_epoch_end:
                c.on_epoch_end(epoch, logs)
            if self.stop_training:
                history.stopped_early = True
                break
        for c in callbacks:
            c.on_train_end({})
        return history
