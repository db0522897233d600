"""Callbacks for :meth:`Network.fit`: early stopping, checkpoints, learning-rate schedules, progress.

A callback receives ``on_train_begin(network)``, ``on_epoch_begin(epoch)``,
``on_batch_end(step, steps, cost)``, ``on_epoch_end(epoch, logs)`` and ``on_train_end(logs)``.
``epoch`` is the 0-based epoch index; ``logs`` holds the epoch's metrics (``loss``, ``accuracy``,
``val_loss``, ``val_accuracy``, ``lr``). Setting ``network.stop_training = True`` ends training
after the current epoch.
"""
from __future__ import annotations

import inspect
import math
import os
import sys
import time

from .errors import ChainruleError

__all__ = ["Callback", "EarlyStopping", "LearningRateSchedule", "ModelCheckpoint", "ProgressBar"]


class Callback:
    network = None

    def set_network(self, network):
        self.network = network

    def on_train_begin(self, logs=None):
        pass

    def on_epoch_begin(self, epoch):
        pass

    def on_batch_end(self, step, steps, cost):
        pass

    def on_epoch_end(self, epoch, logs):
        pass

    def on_train_end(self, logs=None):
        pass

    # state kept in checkpoints, so that a resumed fit continues where a straight one would be
    def state_key(self) -> str:
        return type(self).__name__

    def state(self):
        """None, or ``(meta, arrays)``: a JSON-able dict and named arrays saved by Network.save."""
        return None


def _mode_for(monitor, mode):
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
    if mode == "auto":
        mode = "max" if "acc" in monitor else "min"
    return mode


def _check_monitor(monitor, network, who):
    if monitor.startswith("val_") and not network.has_validation:
        raise ChainruleError(f"{who} monitors {monitor!r} but fit has no validation data: pass "
                             f"validation_split= or validation_data=, or monitor={monitor[4:]!r}")
    if monitor.endswith("accuracy") and not network.is_classifier:
        raise ChainruleError(f"{who} monitors {monitor!r} but the model's loss "
                             f"({network.loss_name}) is not a classification loss")


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs.

    With ``restore_best`` the parameters of the best epoch are put back when training ends.
    ``best_epoch`` (0-based) and ``stopped_epoch`` (None if it never stopped) tell what happened.
    """

    def __init__(self, monitor="val_loss", patience=5, min_delta=0.0, mode="auto", restore_best=True):
        self.monitor, self.patience, self.min_delta = monitor, int(patience), float(min_delta)
        self.mode = _mode_for(monitor, mode)
        self.restore_best = restore_best

    def _better(self, value, best):
        if self.mode == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta

    def on_train_begin(self, logs=None):
        _check_monitor(self.monitor, self.network, "EarlyStopping")
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch, self.best_params, self.wait, self.stopped_epoch = None, None, 0, None
        self.best_buffers = {}
        saved = self.network.saved_callback_state(self.state_key())
        if saved is not None:             # a resumed run: the best so far and the patience used
            self._restore(*saved)

    def state_key(self):
        return f"EarlyStopping.{self.monitor}"

    def state(self):
        """The best value, its epoch, the patience counter and the best weights (and buffers)."""
        if self.best_epoch is None:
            return None
        meta = {"best": float(self.best), "best_epoch": int(self.best_epoch), "wait": int(self.wait),
                "mode": self.mode, "min_delta": self.min_delta}
        arrays = {}
        if self.best_params is not None:
            arrays.update({f"param.{k}": v for k, v in self.best_params.items()})
            arrays.update({f"buffer.{k}": v for k, v in self.best_buffers.items()})
        return meta, arrays

    def _restore(self, meta, arrays):
        src = f"the checkpoint's {self.state_key()} state"
        if meta.get("mode") != self.mode or meta.get("min_delta") != self.min_delta:
            raise ChainruleError(f"{src} was saved with mode={meta.get('mode')!r}, min_delta="
                                 f"{meta.get('min_delta')!r}; this EarlyStopping has mode={self.mode!r}, "
                                 f"min_delta={self.min_delta!r}")
        best, epoch, wait = meta.get("best"), meta.get("best_epoch"), meta.get("wait")
        if not (isinstance(best, float) and math.isfinite(best)) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (epoch, wait)):
            raise ChainruleError(f"{src} is malformed: best={best!r}, best_epoch={epoch!r}, wait={wait!r}")
        self.best, self.best_epoch, self.wait = best, epoch, wait
        if self.restore_best and arrays:
            self.best_params = {k[6:]: v for k, v in arrays.items() if k.startswith("param.")}
            self.best_buffers = {k[7:]: v for k, v in arrays.items() if k.startswith("buffer.")}

    def on_epoch_end(self, epoch, logs):
        value = logs[self.monitor]
        if self._better(value, self.best):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best:
                self.best_params = self.network.get_params()
                self.best_buffers = self.network.get_buffers()      # running averages go with them
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.stopped_epoch = epoch
                self.network.stop_training = True

    def on_train_end(self, logs=None):
        history = getattr(self.network, "history", None)
        if history is not None:
            history.best_epoch = self.best_epoch
        if self.restore_best and self.best_params is not None:
            self.network.set_params(self.best_params, source=f"the best epoch ({self.best_epoch + 1})")
            self.network.set_buffers(self.best_buffers, source=f"the best epoch ({self.best_epoch + 1})")
            if history is not None:
                history.restored_epoch = self.best_epoch     # the parameters are those of this epoch


class ModelCheckpoint(Callback):
    """Save the parameters (atomically) after each epoch, or only when ``monitor`` improves.

    ``path`` may contain ``{epoch}`` (1-based) and any metric name, e.g. ``ckpt-{epoch:03d}.npz``.
    """

    def __init__(self, path, monitor="val_loss", save_best_only=False, mode="auto"):
        self.path, self.monitor, self.save_best_only = str(path), monitor, save_best_only
        self.mode = _mode_for(monitor, mode)
        self.saved = []

    def on_train_begin(self, logs=None):
        if self.save_best_only:
            _check_monitor(self.monitor, self.network, "ModelCheckpoint")
        self.best = math.inf if self.mode == "min" else -math.inf
        saved = self.network.saved_callback_state(self.state_key()) if self.save_best_only else None
        if saved is not None and isinstance(saved[0].get("best"), float):
            self.best = saved[0]["best"]          # a resumed run saves only what beats the best so far
        # fail now, not after the first epoch: the path's fields and its directory
        history = getattr(self.network, "history", None)
        fields = list(history.history) if history is not None else []
        try:
            path = self.path.format(epoch=1, **{k: 0.0 for k in fields})
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise ChainruleError(f"ModelCheckpoint path {self.path!r} cannot be filled in ({e!r}); "
                                 f"its fields can be: epoch, {', '.join(fields)}") from None
        from ..atomic import probe_writable
        why = probe_writable(os.path.dirname(os.path.abspath(path)))
        if why is not None:
            raise ChainruleError(f"ModelCheckpoint cannot save to {path}: {why}")

    def state_key(self):
        return f"ModelCheckpoint.{self.monitor}"

    def state(self):
        if not self.save_best_only or not math.isfinite(self.best):
            return None
        return {"best": float(self.best)}, {}

    def on_epoch_end(self, epoch, logs):
        if self.save_best_only:
            value = logs[self.monitor]
            if not (value < self.best if self.mode == "min" else value > self.best):
                return
            self.best = value
        fields = {k: v for k, v in logs.items() if v is not None}
        path = self.path.format(epoch=epoch + 1, **fields)
        self.network.save(path)
        self.saved.append(path)


class LearningRateSchedule(Callback):
    """Set the learning rate before each epoch: ``fn(epoch)`` or ``fn(epoch, lr)`` (0-based epoch)."""

    def __init__(self, fn):
        self.fn = fn
        try:
            n = len([p for p in inspect.signature(fn).parameters.values()
                     if p.default is inspect.Parameter.empty
                     and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
        except (TypeError, ValueError):
            n = 2
        self.two_args = n >= 2

    def on_epoch_begin(self, epoch):
        opt = self.network.optimizer
        lr = self.fn(epoch, opt.lr) if self.two_args else self.fn(epoch)
        lr = float(lr)
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"LearningRateSchedule gave lr={lr!r} for epoch {epoch + 1}")
        opt.lr = lr


class ProgressBar(Callback):
    """A one-line text progress bar per epoch, on stderr (or ``stream``)."""

    def __init__(self, stream=None, width=24, min_interval=0.1):
        self.stream = stream if stream is not None else sys.stderr
        self.width, self.min_interval = width, min_interval

    def on_train_begin(self, logs=None):
        self.epochs = self.network._fit_epochs
        isatty = getattr(self.stream, "isatty", None)
        self.live = bool(isatty and isatty())     # redraw during the epoch only on a terminal

    def on_epoch_begin(self, epoch):
        self.epoch, self.t0, self.last, self.sum, self.n = epoch, time.perf_counter(), 0.0, 0.0, 0

    def _line(self, step, steps, tail):
        done = int(self.width * step / max(steps, 1))
        bar = "=" * done + (">" if done < self.width else "") + "." * max(self.width - done - 1, 0)
        return f"\repoch {self.epoch + 1}/{self.epochs} [{bar}] {step}/{steps} {tail}"

    def on_batch_end(self, step, steps, cost):
        self.sum += cost
        self.n += 1
        if not self.live:
            return
        now = time.perf_counter()
        if now - self.last >= self.min_interval or step == steps:
            self.last = now
            self.stream.write(self._line(step, steps, f"loss {self.sum / self.n:.4f}"))
            self.stream.flush()

    def on_epoch_end(self, epoch, logs):
        parts = [f"{k} {v:.4f}" for k, v in logs.items() if v is not None and k not in ("lr", "time")]
        dt = time.perf_counter() - self.t0
        steps = self.network._fit_steps
        line = self._line(steps, steps, " - ".join(parts) + f" - {dt:.2f}s")
        self.stream.write((line if self.live else line.lstrip("\r")) + "\n")
        self.stream.flush()
