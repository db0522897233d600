"""Naming a model: built-in names, or a layer-list spec parsed without ``eval``.

Spec grammar (items separated by ``->`` or ``,`` at the top level; whitespace ignored)::

    spec   := <input> -> <layer> -> ... -> <loss>
    input  := N                  N features               e.g. 64
            | HxW | CxHxW        an image (1 or C channels) e.g. 8x8, 3x32x32
            | C@L                a 1-D signal, C channels   e.g. 1@40
    layer  := dense(N) | <activation> | softmax | log_softmax
            | conv(F, K [, stride=S] [, padding=valid|same|P] [, dilation=D] [, bias=0])
            | maxpool(K [, stride=S]) | avgpool(K [, stride=S]) | global_avgpool | flatten
            | residual(<layer> -> <layer> -> ...)      h = x + f(x)
            | batchnorm [(momentum=M, eps=E)] | layer_norm [(eps=E)] | dropout(P) | noise(S)
            | rnn(N) | lstm(N) | gru(N)   [, return_sequences=1] [, learn_initial=1]   over a sequence
                                         input (learn_initial: the state before t = 0 a parameter)
            | embedding(N)                                        over a tokens input
    input  += seq(T, N)          a sequence of T steps of N features
            | tokens(T, V)       T token ids below V
    e.g.   64 -> dense(128) -> sigmoid -> dense(10) -> softmax_cross_entropy
           8x8 -> conv(8, 3) -> relu -> maxpool(2) -> flatten -> dense(10) -> softmax_cross_entropy

``conv``, ``maxpool`` and ``avgpool`` are 1-D or 2-D after their input (``conv1d``/``conv2d`` etc. are
accepted too and must agree with it).

Limits: a width (the inputs, a dense layer's units, a convolution's filters or kernel) is at most
``CHAINRULE_MAX_WIDTH`` (default 100000) and a model has at most ``CHAINRULE_MAX_PARAMS`` parameters
(default 100 million, 800 MB in float64), so that a typo cannot ask for hundreds of gigabytes. Raise
them with those environment variables or with ``build_model(spec, max_width=..., max_params=...)``.
"""
from __future__ import annotations

import os
import re

from .errors import SpecError
from .graph import Model
from .layers import ACTIVATIONS, LOSSES, Activation, Dense, Layer, LogSoftmax, Softmax, sequential

BUILTIN_MODELS = {
    "demo": "64 -> dense(128) -> sigmoid -> dense(10) -> softmax_cross_entropy",
    "perceptron": "2 -> dense(1) -> bce_logits",
    "mlp-relu": "64 -> dense(128) -> relu -> dense(10) -> softmax_cross_entropy",
    "mlp-tanh-regression": "1 -> dense(32) -> tanh -> dense(1) -> mse",
    "softmax-ce": "64 -> dense(10) -> softmax -> cross_entropy",
    "log-softmax-nll": "64 -> dense(10) -> log_softmax -> nll",
}

# the models of examples/ and `chainrule train`: named like built-ins, kept apart so that what iterates
# over every built-in (docs, LaTeX checks) stays quick
EXAMPLE_MODELS = {
    "digits-cnn": "8x8 -> conv(8, 3, padding=same) -> relu -> maxpool(2) -> flatten -> dense(10) "
                  "-> softmax_cross_entropy",
    "digits-cnn-wide": "8x8 -> conv(16, 3, padding=same) -> relu -> conv(32, 3, padding=same) -> relu -> maxpool(2) "
                       "-> flatten -> dense(10) -> softmax_cross_entropy",
    "mnist1d-cnn": "1@40 -> conv(32, 5, padding=same) -> relu -> maxpool(2) -> conv(32, 5, padding=same) -> relu "
                   "-> maxpool(2) -> flatten -> dense(10) -> softmax_cross_entropy",
    "mnist1d-gru": "seq(40, 1) -> gru(64) -> dense(10) -> softmax_cross_entropy",
    "residual-mlp": "64 -> dense(64) -> relu -> residual(dense(64) -> relu -> dense(64)) -> relu "
                    "-> residual(dense(64) -> relu -> dense(64)) -> relu -> dense(10) -> softmax_cross_entropy",
}


def _char_gpt() -> Model:
    from .attention import gpt
    return gpt(vocab=103, context=64, width=64, heads=4, layers=2, name="gpt")


# models declared in Python, not as a layer list (a transformer block is two residual branches around
# attention and a GELU feed-forward, which the spec grammar does not name): name -> a function of no
# arguments returning the Model. "gpt": the architecture of `chainrule train char-gpt` (103 characters
# of pydoc_data.topics; its derivation is the same at any sizes)
DECLARED_MODELS = {"gpt": _char_gpt}

_NAME = re.compile(r"^(?P<name>[a-z_][a-z0-9_]*)(?:\((?P<args>.*)\)|:(?P<arg2>[0-9]+))?$", re.S)
_INPUT = re.compile(r"^(?:(?P<n>[0-9]+)|(?P<c1>[0-9]+)@(?P<l>[0-9]+)|(?:(?P<c>[0-9]+)x)?(?P<h>[0-9]+)x(?P<w>[0-9]+))$")

MAX_WIDTH = 100_000
MAX_PARAMS = 100_000_000
_WIDTH = re.compile(r"[0-9]+")       # ASCII digits only ("²".isdigit() is True, int("²") fails)
_DECIMAL = re.compile(r"[0-9]+\.[0-9]*(?:e-?[0-9]+)?|[0-9]+e-?[0-9]+")   # 0.1, 1e-5, 1.5e-3


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



def split_top(text: str, seps=("->", ",")) -> list[str]:
    """Split at separators outside parentheses; unbalanced parentheses are an error."""
    out, depth, cur, k = [], 0, "", 0
    while k < len(text):
        ch = text[k]
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise SpecError(f"spec {text!r}: unbalanced ')'")
        if depth == 0:
            sep = next((s for s in seps if text.startswith(s, k)), None)
            if sep:
                out.append(cur.strip())
                cur, k = "", k + len(sep)
                continue
        cur += ch
        k += 1
    if depth:
        raise SpecError(f"spec {text!r}: unbalanced '('")
    out.append(cur.strip())
    return [s for s in out if s]


def input_item(shape) -> str:
    """The spec item for a per-example input shape (the inverse of the input grammar)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 1:
        return str(shape[0])
    if len(shape) == 2:
        return f"{shape[0]}@{shape[1]}"
    return "x".join(map(str, shape))


def _parse_input(item: str, text: str, max_width: int = MAX_WIDTH):
    seq = re.fullmatch(r"(seq|tokens)\(\s*([0-9]+)\s*,\s*([0-9]+)\s*\)", item)
    if seq:
        from .layers import SequenceInput
        steps, width = int(seq[2]), int(seq[3])
        for v in (steps, width):
            _check_width(v, f"spec {text!r}: the input size", max_width)
        return SequenceInput(steps, width) if seq[1] == "seq" else SequenceInput(steps, vocab=width)
    m = _INPUT.match(item)
    if not m:
        raise SpecError(f"spec {text!r}: the first item must be the input width (digits 0-9), got {item!r} "
                        f"(or an input shape: 8x8, 3x32x32, 1@40)")
    if m["n"]:
        shape = int(m["n"])
        dims = [shape]
    elif m["l"]:
        shape = dims = (int(m["c1"]), int(m["l"]))
    else:
        shape = dims = (int(m["c"] or 1), int(m["h"]), int(m["w"]))
    for v in dims:
        _check_width(v, f"spec {text!r}: the input {'width' if len(dims) == 1 else 'size'}", max_width)
    return shape


def _args(text: str, position: int, name: str):
    pos, kw = [], {}
    for a in split_top(text, (",",)):
        key, _, val = a.rpartition("=")
        key, val = key.strip(), val.strip()
        if not (re.fullmatch(r"[0-9]+|[a-z_]+", val) or _DECIMAL.fullmatch(val)) \
                or (key and not re.fullmatch(r"[a-z_]+", key)):
            raise SpecError(f"item {position}: {name}: argument {a!r} is not a number or a name")
        value = int(val) if _WIDTH.fullmatch(val) else float(val) if _DECIMAL.fullmatch(val) else val
        if key:
            kw[key] = value
        elif kw:
            raise SpecError(f"item {position}: {name}: positional argument {a!r} after a keyword")
        else:
            pos.append(value)
    return pos, kw


def _call(cls, pos, kw, position, name, usage):
    try:
        return cls(*pos, **kw)
    except TypeError:
        raise SpecError(f"item {position}: {name}: bad arguments; usage: {usage}") from None


KNOWN = ["dense(N)", *ACTIVATIONS, "softmax", "log_softmax", "conv(F, K, ...)", "maxpool(K)", "avgpool(K)",
         "global_avgpool", "flatten", "residual(...)", "batchnorm", "layer_norm", "dropout(P)", "noise(S)",
         "rnn(N)", "lstm(N)", "gru(N)", "embedding(N)"]

# layers whose arguments are numbers (rates, strengths): name -> (class, usage)
_NUMERIC = {"batchnorm": ("BatchNorm", "batchnorm(momentum=0.1, eps=1e-5)"),
            "layer_norm": ("LayerNorm", "layer_norm(eps=1e-5)"),
            "dropout": ("Dropout", "dropout(P), 0 <= P < 1"),
            "noise": ("GaussianNoise", "noise(S), S >= 0 the standard deviation")}


def _layer(item: str, position: int, max_width: int = MAX_WIDTH) -> Layer:
    from .conv import AvgPool, Conv, Flatten, GlobalAvgPool, MaxPool
    from .functional import Residual
    m = _NAME.match(item)
    if not m or (m["args"] is not None and not re.fullmatch(r"[0-9a-z_=,.\s>()-]*", m["args"])):
        raise SpecError(f"item {position} {item!r} is not a layer (expected e.g. dense(128), sigmoid)")
    name, raw = m["name"], m["args"]
    if name in ("rnn", "lstm", "gru", "embedding"):
        from .sequence import sequence_layer
        pos, kw = _args(raw, position, name) if raw is not None else ([], {})
        for v in [*pos, *kw.values()]:
            if isinstance(v, int) and not isinstance(v, bool) and v > 1:
                _check_width(v, f"item {position}: an argument of {item}", max_width)
        return sequence_layer(name, pos, kw, position)
    if name == "residual":
        if not raw:
            raise SpecError(f"item {position}: residual needs its layers, e.g. residual(dense(64) -> relu)")
        return Residual([_layer(s, position, max_width) for s in split_top(raw, ("->",))])
    pos, kw = _args(raw, position, name) if raw is not None else ([int(m["arg2"])] if m["arg2"] else [], {})
    if name == "dense":
        if len(pos) != 1 or kw or not isinstance(pos[0], int):
            raise SpecError(f"item {position}: dense needs a width, e.g. dense(128)")
        _check_width(pos[0], f"item {position}: the width of {item}", max_width)
        return Dense(pos[0])
    dims = {"1d": 1, "2d": 2}.get(name[-2:]) if name[-2:] in ("1d", "2d") else None
    base = name[:-2] if dims else name
    if base in ("conv", "maxpool", "avgpool"):
        if "padding" in kw and isinstance(kw["padding"], str) and kw["padding"] not in ("same", "valid"):
            raise SpecError(f"item {position}: {name}: padding must be same, valid or a number")
        if "bias" in kw:
            kw["bias"] = bool(kw["bias"])
        for v in [*pos, *kw.values()]:
            if isinstance(v, int) and not isinstance(v, bool):
                _check_width(v, f"item {position}: an argument of {item}", max_width)
        cls, usage = {"conv": (Conv, "conv(F, K, stride=1, padding=valid|same|P, dilation=1, bias=1)"),
                      "maxpool": (MaxPool, "maxpool(K, stride=K)"),
                      "avgpool": (AvgPool, "avgpool(K, stride=K)")}[base]
        return _call(cls, pos, {**kw, "dims": dims}, position, name, usage)
    if name in _NUMERIC:
        from . import layers
        cls, usage = _NUMERIC[name]
        try:
            return _call(getattr(layers, cls), pos, kw, position, name, usage)
        except SpecError:
            raise
        except ValueError as e:
            raise SpecError(f"item {position}: {e}") from None
    if pos or kw:
        raise SpecError(f"item {position}: {name} takes no arguments")
    if name in ACTIVATIONS:
        return Activation(name, ACTIVATIONS[name])
    if name == "softmax":
        return Softmax()
    if name == "log_softmax":
        return LogSoftmax()
    if name == "global_avgpool":
        return GlobalAvgPool()
    if name == "flatten":
        return Flatten()
    raise SpecError(f"item {position}: unknown layer {name!r}; known layers: {', '.join(KNOWN)}")


def _learns(layer) -> bool:
    return layer.has_params or any(_learns(inner) for inner in getattr(layer, "layers", ()))


def parse_spec(text: str, name: str = "model", *, max_width: int | None = None,
               max_params: int | None = None) -> Model:
    max_width = _limit(max_width, "CHAINRULE_MAX_WIDTH", MAX_WIDTH)
    max_params = _limit(max_params, "CHAINRULE_MAX_PARAMS", MAX_PARAMS)
    items = split_top(text.strip().lower())
    if len(items) < 2:
        raise SpecError(f"spec {text!r}: need at least '<inputs> -> <loss>'")
    inputs = _parse_input(items[0], text, max_width)
    if items[-1] not in LOSSES:
        raise SpecError(f"spec {text!r}: the last item must be a loss ({', '.join(LOSSES)}), got {items[-1]!r}")
    layers = [_layer(item, k, max_width) for k, item in enumerate(items[1:-1], 2)]
    if not any(_learns(layer) for layer in layers):
        raise SpecError(f"spec {text!r} has no layer with parameters, so there is nothing to learn: "
                        f"add one, e.g. '{items[0]} -> dense(1) -> {items[-1]}'")
    count, widths = 0, [inputs if isinstance(inputs, int) else None]
    for layer in layers:                     # dense chains: refused before anything is built
        if isinstance(layer, Dense) and widths[-1] is not None:
            count += layer.units * widths[-1] + layer.units
            widths.append(layer.units)
        elif not isinstance(layer, Activation):
            widths.append(None)
    if count <= max_params:
        model = sequential(inputs, layers, items[-1], name=name)
        count = sum(int(_prod(model.concrete_shape(p))) for p in model.params)
    if count > max_params:
        raise SpecError(f"spec {text!r} has {count:,} parameters, above the limit of {max_params:,}; "
                        f"if you mean it, raise the limit with CHAINRULE_MAX_PARAMS={count} or "
                        f"build_model(..., max_params={count})")
    return model


def _prod(shape) -> int:
    out = 1
    for v in shape:
        out *= int(v)
    return out


def build_model(name_or_spec: str | None = None, *, max_width: int | None = None,
                max_params: int | None = None) -> Model:
    """A built-in model name (``demo``, ...), an example model name, or a layer-list spec; ``None`` is
    the demo model. ``max_width`` and ``max_params`` raise the limits on a spec's sizes (see the module
    docstring)."""
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
    if key in EXAMPLE_MODELS:
        return parse_spec(EXAMPLE_MODELS[key], name=key)
    if key in DECLARED_MODELS:
        return DECLARED_MODELS[key]()
    if "->" in key or "," in key:
        return parse_spec(key, max_width=max_width, max_params=max_params)
    raise SpecError(f"unknown model {key!r}: use a built-in name "
                    f"({', '.join([*BUILTIN_MODELS, *EXAMPLE_MODELS, *DECLARED_MODELS])}) "
                    f"or a layer-list spec such as {BUILTIN_MODELS['demo']!r}")
