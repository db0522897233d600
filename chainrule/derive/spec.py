"""Naming a model: built-in names, or a layer-list spec parsed without ``eval``.

Spec grammar (items separated by ``,`` or ``->``; whitespace ignored)::

    <inputs> , <layer> , ... , <loss>
    layer := dense(<units>) | dense:<units> | <activation> | softmax | log_softmax
    e.g.   64 -> dense(128) -> sigmoid -> dense(10) -> softmax_cross_entropy

Limits: a width (the inputs, or a dense layer's units) is at most ``CHAINRULE_MAX_WIDTH`` (default
100000) and a model has at most ``CHAINRULE_MAX_PARAMS`` parameters (default 100 million, 800 MB in
float64), so that a typo cannot ask for hundreds of gigabytes. Raise them with those environment
variables or with ``build_model(spec, max_width=..., max_params=...)``.
"""
from __future__ import annotations

import os
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

_ITEM = re.compile(r"^(?P<name>[a-z_][a-z0-9_]*)(?:\((?P<arg>[0-9]+)\)|:(?P<arg2>[0-9]+))?$")
_WIDTH = re.compile(r"[0-9]+")       # ASCII digits only ("²".isdigit() is True, int("²") fails)

MAX_WIDTH = 100_000
MAX_PARAMS = 100_000_000


def _limit(value, env: str, default: int) -> int:
    if value is None:
        raw = os.environ.get(env, "").strip()
        if not raw:
            return default
        if not _WIDTH.fullmatch(raw) or int(raw) < 1:
            raise SpecError(f"{env}={raw!r} is not a positive integer")
        return int(raw)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"limit {value!r} is not a positive integer")
    return value


def _check_width(width: int, what: str, max_width: int):
    if width < 1:
        raise SpecError(f"{what} is {width}: a width must be at least 1")
    if width > max_width:
        raise SpecError(f"{what} is {width}, above the limit of {max_width}; if you mean it, raise "
                        f"the limit with CHAINRULE_MAX_WIDTH={width} or build_model(..., max_width={width})")


def _layer(item: str, position: int, max_width: int = MAX_WIDTH):
    m = _ITEM.match(item)
    if not m:
        raise SpecError(f"item {position} {item!r} is not a layer (expected e.g. dense(128), sigmoid)")
    name, arg = m["name"], m["arg"] or m["arg2"]
    if name == "dense":
        if arg is None:
            raise SpecError(f"item {position}: dense needs a width, e.g. dense(128)")
        _check_width(int(arg), f"item {position}: the width of {item}", max_width)
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


def parse_spec(text: str, name: str = "model", *, max_width: int | None = None,
               max_params: int | None = None) -> Model:
    max_width = _limit(max_width, "CHAINRULE_MAX_WIDTH", MAX_WIDTH)
    max_params = _limit(max_params, "CHAINRULE_MAX_PARAMS", MAX_PARAMS)
    items = [s.strip() for s in re.split(r"->|,", text.strip().lower()) if s.strip()]
    if len(items) < 2:
        raise SpecError(f"spec {text!r}: need at least '<inputs> -> <loss>'")
    if not _WIDTH.fullmatch(items[0]):
        raise SpecError(f"spec {text!r}: the first item must be the input width (digits 0-9), "
                        f"got {items[0]!r}")
    _check_width(int(items[0]), f"spec {text!r}: the input width", max_width)
    if items[-1] not in LOSSES:
        raise SpecError(f"spec {text!r}: the last item must be a loss ({', '.join(LOSSES)}), got {items[-1]!r}")
    layers = [_layer(item, k, max_width) for k, item in enumerate(items[1:-1], 2)]
    if not any(layer.has_params for layer in layers):
        raise SpecError(f"spec {text!r} has no layer with parameters, so there is nothing to learn: "
                        f"add one, e.g. '{items[0]} -> dense(1) -> {items[-1]}'")
    count, widths = 0, [int(items[0])]
    for layer in layers:
        if isinstance(layer, Dense):
            count += layer.units * widths[-1] + layer.units
            widths.append(layer.units)
    if count > max_params:
        raise SpecError(f"spec {text!r} has {count:,} parameters, above the limit of {max_params:,}; "
                        f"if you mean it, raise the limit with CHAINRULE_MAX_PARAMS={count} or "
                        f"build_model(..., max_params={count})")
    return sequential(int(items[0]), layers, items[-1], name=name)


def build_model(name_or_spec: str | None = None, *, max_width: int | None = None,
                max_params: int | None = None) -> Model:
    """A built-in model name (``demo``, ...) or a layer-list spec; ``None`` is the demo model.

    ``max_width`` and ``max_params`` raise the limits on a spec's sizes (see the module docstring)."""
    if name_or_spec is None:
        name_or_spec = "demo"
    if not isinstance(name_or_spec, str):
        raise SpecError(f"a model is named by a string, got {type(name_or_spec).__name__}")
    key = name_or_spec.strip()
    if not key:
        raise SpecError("empty model spec: give a built-in name "
                        f"({', '.join(BUILTIN_MODELS)}) or a layer-list spec such as {BUILTIN_MODELS['demo']!r}")
    if key in BUILTIN_MODELS:
        return parse_spec(BUILTIN_MODELS[key], name=key)
    if "->" in key or "," in key:
        return parse_spec(key, max_width=max_width, max_params=max_params)
    raise SpecError(f"unknown model {key!r}: use a built-in name ({', '.join(BUILTIN_MODELS)}) "
                    f"or a layer-list spec such as {BUILTIN_MODELS['demo']!r}")
