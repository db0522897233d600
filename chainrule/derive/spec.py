"""Naming a model: built-in names, or a layer-list spec parsed without ``eval``.

Spec grammar (items separated by ``,`` or ``->``; whitespace ignored)::

    <inputs> , <layer> , ... , <loss>
    layer := dense(<units>) | dense:<units> | <activation> | softmax | log_softmax
    e.g.   64 -> dense(128) -> sigmoid -> dense(10) -> softmax_cross_entropy
"""
from __future__ import annotations

import re

from .errors import SpecError
from .graph import Model
from .layers import ACTIVATIONS, LOSSES, Activation, Dense, LogSoftmax, Softmax, sequential

BUILTIN_MODELS = {
    "demo": "64 -> dense(128) -> sigmoid -> dense(10) -> softmax_cross_entropy",
    "perceptron": "2 -> dense(1) -> bce_logits",
    "mlp-relu": "64 -> dense(128) -> relu -> dense(10) -> softmax_cross_entropy",
    "mlp-tanh-regression": "1 -> dense(32) -> tanh -> dense(1) -> mse",
    "softmax-ce": "64 -> dense(10) -> softmax -> cross_entropy",
    "log-softmax-nll": "64 -> dense(10) -> log_softmax -> nll",
}

_ITEM = re.compile(r"^(?P<name>[a-z_][a-z0-9_]*)(?:\((?P<arg>\d+)\)|:(?P<arg2>\d+))?$")


def _layer(item: str, position: int):
    m = _ITEM.match(item)
    if not m:
        raise SpecError(f"item {position} {item!r} is not a layer (expected e.g. dense(128), sigmoid)")
    name, arg = m["name"], m["arg"] or m["arg2"]
    if name == "dense":
        if arg is None:
            raise SpecError(f"item {position}: dense needs a width, e.g. dense(128)")
        return Dense(int(arg))
    if arg is not None:
        raise SpecError(f"item {position}: {name} takes no width")
    if name in ACTIVATIONS:
        return Activation(name, ACTIVATIONS[name])
    if name == "softmax":
        return Softmax()
    if name == "log_softmax":
        return LogSoftmax()
    known = ["dense(N)", *ACTIVATIONS, "softmax", "log_softmax"]
    raise SpecError(f"item {position}: unknown layer {name!r}; known layers: {', '.join(known)}")


def parse_spec(text: str, name: str = "model") -> Model:
    items = [s.strip() for s in re.split(r"->|,", text.strip().lower()) if s.strip()]
    if len(items) < 2:
        raise SpecError(f"spec {text!r}: need at least '<inputs> -> <loss>'")
    if not items[0].isdigit() or int(items[0]) < 1:
        raise SpecError(f"spec {text!r}: the first item must be the input width, got {items[0]!r}")
    if items[-1] not in LOSSES:
        raise SpecError(f"spec {text!r}: the last item must be a loss ({', '.join(LOSSES)}), got {items[-1]!r}")
    layers = [_layer(item, k) for k, item in enumerate(items[1:-1], 2)]
    return sequential(int(items[0]), layers, items[-1], name=name)


def build_model(name_or_spec: str | None = None) -> Model:
    """A built-in model name (``demo``, ...) or a layer-list spec; ``None`` is the demo model."""
    key = (name_or_spec or "demo").strip()
    if key in BUILTIN_MODELS:
        return parse_spec(BUILTIN_MODELS[key], name=key)
    if "->" in key or "," in key:
        return parse_spec(key)
    raise SpecError(f"unknown model {key!r}: use a built-in name ({', '.join(BUILTIN_MODELS)}) "
                    f"or a layer-list spec such as {BUILTIN_MODELS['demo']!r}")
