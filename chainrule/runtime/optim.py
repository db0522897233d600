"""Optimisers. Every built-in optimiser is an update rule declared as equations in
``chainrule.derive.optimizers``; its update is generated and fused into ``train_step`` (forward,
backward and update in one Numba call). This module only keeps the hyperparameters, the state arrays
(kept between steps, saved in checkpoints) and the step count.

A custom *unfused* optimiser can still subclass :class:`Optimizer` and implement :meth:`update`
(an update from the gradients of ``loss_and_grads``).
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["SGD", "Adagrad", "Adam", "AdamW", "Momentum", "Nesterov", "Optimizer", "RMSProp",
           "DeclaredOptimizer", "get_optimizer", "check_number"]


def check_number(name, value, *, low=None, high=None, low_open=False, high_open=False, owner=""):
    """``float(value)``, or a ValueError naming the argument and the value."""
    who = f"{owner}: " if owner else ""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{who}{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{who}{name} must be finite, got {value!r}")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{who}{name} must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    if high is not None and (v >= high if high_open else v > high):
        raise ValueError(f"{who}{name} must be {'<' if high_open else '<='} {high:g}, got {value!r}")
    return v


class Optimizer:
    """Base class. ``step`` runs one minibatch and returns its cost; it updates ``params`` in place."""

    name = "optimizer"
    rule = None                     # the declared update rule's name (fused optimisers)

    def __init__(self, lr: float):
        self.lr = lr
        self.state: dict = {}
        self.t = 0

    @property
    def lr(self):
        if self._lr is None:     # a declared rule's default rate, read when first needed
            self._lr = float(self.rule_data.defaults["eta"])
        return self._lr

    @lr.setter
    def lr(self, value):
        """A finite number >= 0 (a schedule may anneal to 0; a negative rate would climb)."""
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not math.isfinite(value) or value < 0:
            raise ValueError(f"{type(self).__name__}: the learning rate must be a finite number "
                             f">= 0, got {value!r}")
        self._lr = float(value)

    def reset(self):
        """Forget accumulated state (moments, velocities) and the step count."""
        self.state = {}
        self.t = 0

    def step(self, cm, params: dict, x, y, seed=0, buffers=None, facts_checked=False) -> float:
        """``buffers``: the model's running averages, updated in place by the training step;
        ``facts_checked``: the caller has checked the facts declared on ``x`` and ``y`` already
        (see ``CompiledModel.train_step``)."""
        cost, grads = cm.loss_and_grads(params, x, y, seed, buffers=buffers, facts_checked=facts_checked)
        self.update(params, grads)
        return float(cost)

    def update(self, params: dict, grads: dict):
        raise NotImplementedError(f"{type(self).__name__}.update")

    def config(self) -> dict:
        return {"name": self.name, "lr": self.lr}

    def __repr__(self):
        return f"{type(self).__name__}(lr={self.lr:g})"


class DeclaredOptimizer(Optimizer):
    """An optimiser whose update is a declared rule (``chainrule.derive.optimizers.RULES``),
    generated into the compiled module's ``train_step``.

    ``clipnorm`` clips the gradient by its global norm (over all parameters) before the update.
    Other keyword arguments set hyperparameters (``momentum``, ``beta1``, ``beta2``, ``eps``,
    ``rho``, ``weight_decay``); unset ones take the rule's declared defaults.
    """

    def __init__(self, lr=None, clipnorm=None, fused=True, **hyper):
        self.fused = bool(fused)
        self._rule_data = None
        owner = type(self).__name__
        if hyper:                          # the declaration's names are needed now
            data = self.rule_data
            for k, v in hyper.items():
                name = data.keywords.get(k)
                if name is None or name not in data.defaults or name == "eta":
                    known = [kw for kw, n in data.keywords.items() if n in data.defaults and n != "eta"]
                    raise TypeError(f"{owner} has no hyperparameter {k!r} (it has lr, clipnorm"
                                    f"{', ' if known else ''}{', '.join(known)})")
        self.hyper = {}
        for k, v in hyper.items():
            high = 1 if k in ("momentum", "beta1", "beta2", "rho") else None
            self.hyper[k] = check_number(k, v, low=0, high=high, high_open=high is not None,
                                         owner=owner)
        if "eps" in self.hyper and self.hyper["eps"] <= 0:
            raise ValueError(f"{owner}: eps must be > 0, got {hyper['eps']!r}")
        super().__init__(0.0 if lr is None else lr)
        if lr is None:
            # the rule's declared default, looked up on first use: by then a network has usually
            # bound the rule's data from its cached description (no SymPy on a warm start)
            self._lr = None
        self.clipnorm = None if clipnorm is None else check_number("clipnorm", clipnorm, low=0,
                                                                   low_open=True, owner=owner)
        self.name = self.rule if isinstance(self.rule, str) else self.rule_data.name

    @property
    def rule_data(self):
        """The declared rule as plain data (``chainrule.codegen.description.RuleData``): given by
        the network from its compiled module's description (:meth:`bind_rule`), else read from
        the declaration (which imports the derivation engine)."""
        if self._rule_data is None:
            from chainrule.codegen.description import RuleData
            from chainrule.derive.optimizers import get_rule
            self._rule_data = RuleData.of(get_rule(self.rule))
        return self._rule_data

    def bind_rule(self, data):
        """Take the rule's plain data from a compiled module's cached description (the same
        declaration), so that a warm run needs no SymPy for the optimiser either."""
        if self._rule_data is None and data.name == self.name:
            self._rule_data = data

    def step(self, cm, params, x, y, seed=0, buffers=None, facts_checked=False):
        if not self.fused:
            return self._unfused_step(cm, params, x, y, seed, buffers, facts_checked)
        if cm.optimizer != self.rule:
            raise ValueError(f"the compiled module fuses the {cm.optimizer} update, not {self.rule}")
        if not self.state and cm.state_names:
            self.state = cm.init_state()
        self.t += 1
        return float(cm.train_step(params, x, y, lr=self.lr, state=self.state, step=self.t,
                                   clip=self.clipnorm or 0.0, seed=seed, buffers=buffers,
                                   facts_checked=facts_checked, **self.hyper))

    def stepper(self, cm, params, buffers=None):
        """``step(x, y, seed=0) -> cost`` for a training loop over data whose declared facts are
        checked (``Network.fit``): the same update as :meth:`step` (the same kernel on the same
        hyperparameters and step count t, so the same numbers, bit for bit), through
        ``CompiledModel.stepper``, which checks the state once instead of every step. The
        learning rate and clipping are read at every step (a schedule may change them). None
        when the update is not fused (then :meth:`step`)."""
        if not self.fused or type(self).step is not DeclaredOptimizer.step:   # (a subclass's own step)
            return None
        if cm.optimizer != self.rule:
            raise ValueError(f"the compiled module fuses the {cm.optimizer} update, not {self.rule}")
        if not self.state and cm.state_names:
            self.state = cm.init_state()
        run = cm.stepper(params, self.state, buffers)
        hp = cm.hyper_vector(self.lr, self.t + 1, self.clipnorm or 0.0, 0, **self.hyper)
        eta = cm.hyper_names.index("eta") if "eta" in cm.hyper_names else None

        def step(x, y, seed=0):
            self.t += 1
            hp[0], hp[1], hp[2] = self.t, self.clipnorm or 0.0, seed
            if eta is not None:
                hp[eta] = self.lr
            return run(x, y, hp)
        return step

    def _unfused_step(self, cm, params, x, y, seed, buffers=None, facts_checked=False):
        """``loss_and_grads`` and the declared update evaluated by NumPy (lambdified from the same
        equations): no ``train_step`` to compile, for quick experiments on big graphs."""
        cost, grads = cm.loss_and_grads(params, x, y, seed, buffers=buffers, facts_checked=facts_checked)
        if self.clipnorm:
            norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
            if norm > self.clipnorm:
                grads = {k: g * (self.clipnorm / norm) for k, g in grads.items()}
        if not self.state and cm.state_names is not None:
            names = self.rule_data.state
            self.state = {k: {s: np.zeros_like(params[k]) for s in names} for k in params} if names else {}
        self.t += 1
        self.update(params, grads)
        return float(cost)

    def update(self, params, grads):
        """The declared update applied with NumPy (lambdified from the same equations as the kernel)."""
        from chainrule.derive.optimizers import numpy_update
        if getattr(self, "_numpy_update", None) is None:
            self._numpy_update = numpy_update(self.rule)
        values = self.values()
        for k, g in grads.items():
            self._numpy_update(params[k], g, self.state.get(k, {}), values, self.t)

    def values(self) -> dict:
        """Every hyperparameter's value (declared defaults filled in), by its declared name."""
        data = self.rule_data
        out = dict(data.defaults)
        out["eta"] = self.lr
        out.update({data.keywords[k]: v for k, v in self.hyper.items()})
        return out

    def config(self) -> dict:
        """Name, learning rate, clipping and every hyperparameter (declared defaults filled in)."""
        by_name = {name: k for k, name in self.rule_data.keywords.items()}
        values = {by_name[n]: v for n, v in self.values().items() if by_name[n] != "lr"}
        return {"name": self.name, "lr": self.lr, "clipnorm": self.clipnorm,
                **{k: values[k] for k in sorted(values)}}

    def __repr__(self):
        extra = "".join(f", {k}={v:g}" for k, v in self.hyper.items())
        clip = f", clipnorm={self.clipnorm:g}" if self.clipnorm else ""
        return f"{type(self).__name__}(lr={self.lr:g}{extra}{clip})"


class SGD(DeclaredOptimizer):
    """θ ← θ - η g."""

    rule = "sgd"

    def __init__(self, lr: float = 0.1, clipnorm=None):
        super().__init__(lr, clipnorm)



class Momentum(DeclaredOptimizer):
    """v ← μ v - η g; θ ← θ + v."""
    rule = "momentum"


class Nesterov(DeclaredOptimizer):
    """v ← μ v - η g; θ ← θ + μ v - η g."""
    rule = "nesterov"


class Adagrad(DeclaredOptimizer):
    rule = "adagrad"


class RMSProp(DeclaredOptimizer):
    rule = "rmsprop"


class Adam(DeclaredOptimizer):
    rule = "adam"


class AdamW(DeclaredOptimizer):
    rule = "adamw"


OPTIMIZERS = {"sgd": SGD, "momentum": Momentum, "nesterov": Nesterov, "adagrad": Adagrad,
              "rmsprop": RMSProp, "adam": Adam, "adamw": AdamW}


def get_optimizer(opt, lr=None) -> Optimizer:
    if isinstance(opt, Optimizer):
        if lr is not None:
            opt.lr = lr
        return opt
    if isinstance(opt, str):
        key = opt.lower()
        if key not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {opt!r}; known: {', '.join(OPTIMIZERS)}")
        return OPTIMIZERS[key](lr) if lr is not None else OPTIMIZERS[key]()
    raise TypeError(f"optimizer must be an Optimizer or a name, got {type(opt).__name__}")
