"""Declarations: every built-in layer, activation and loss is a short symbolic definition.

Nothing here says how to differentiate or how to typeset a layer: that all comes from the equations.
A user's own layer is declared the same way (see ``Activation``, ``Loss`` and ``Layer``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import sympy as sp

from .errors import ShapeError, SpecError
from .graph import Model
from .primitives import LogSumExp, leaky_relu, relu, sigmoid, softplus
from .tensor import Equation, Tensor, index, shape_str, size

B = size("B")          # the batch size, always symbolic


class Builder:
    """The declaration context a layer writes into: names, numbering, tensors and equations."""

    def __init__(self):
        self.tensors: list[Tensor] = []
        self.equations: list[Equation] = []
        self.size_values: dict = {}
        self.level = 0            # the (l) in W^(l): advanced by every layer with parameters
        self.layer = ""           # the name of the layer being declared
        self.layer_log: list = []
        self.owner = None                 # the layer object being declared (functional API)
        self._param_uses: dict = {}
        self._renamed: dict = {}          # size symbol -> the size it was unified with

    # names
    def _name(self, base: str) -> tuple[str, str]:
        taken = {t.name for t in self.tensors}
        name = f"{base}{self.level}" if self.level else base
        k = 2
        while name in taken:
            name, k = f"{base}{self.level}_{k}", k + 1
        sup = f"^{{({self.level})}}" if self.level else ""
        latex = (base if len(base) == 1 else rf"\mathrm{{{base}}}") + sup
        if name.count("_") and self.level:
            latex = latex + "{}'" * (int(name.rsplit("_", 1)[1]) - 1)
        return name, latex

    def size(self, name: str, value: int | None = None) -> sp.Symbol:
        s = size(f"{name}_{self.level}")
        if value is not None:
            self.size_values[s] = int(value)
        return s

    def tensor(self, base: str, shape, role="hidden", **kw) -> Tensor:
        name, latex = self._name(base)
        if kw.get("grad_latex") and self.level and name.count("_"):     # a second use: primed like its name
            kw["grad_latex"] += "{}'" * (int(name.rsplit("_", 1)[1]) - 1)
        t = Tensor(name, tuple(shape), role=role, latex=kw.pop("latex", latex), layer=self.layer, **kw)
        self.tensors.append(t)
        return t

    def param(self, base: str, shape, init="glorot") -> Tensor:
        """A parameter of the layer being declared. A layer object declared again (the functional API
        applies one layer to several tensors) gets the parameters of its first declaration back."""
        owner = getattr(self, "owner", None)
        if owner is not None:
            uses = self._param_uses.setdefault(id(owner), {})
            k = uses.get(("next", base), 0)
            uses[("next", base)] = k + 1
            key = (base, k)
            if key in uses:
                t = uses[key]
                self.unify_sizes(t.shape, shape)
                shape = tuple(sp.sympify(s).xreplace(self._renamed) for s in shape)
                if tuple(t.shape) != tuple(sp.sympify(s) for s in shape):
                    raise ShapeError(f"layer {self.layer}: a shared layer's parameter {t.name} has shape "
                                     f"{shape_str(t.shape)}, but this use needs {shape_str(tuple(shape))} "
                                     f"(apply a shared layer to tensors of one shape)")
                return t
            uses[key] = self.tensor(base, shape, role="param", init=init)
            return uses[key]
        return self.tensor(base, shape, role="param", init=init)

    def unify_sizes(self, first, second):
        """Axes of equal declared length but different size symbols that must be one size (a sum of
        two tensors, a shared layer applied twice): the later symbol is replaced by the earlier one
        everywhere, so the model stays valid at every size verification picks, not only the declared."""
        for sa, sb in zip(first, second):
            sa, sb = sp.sympify(sa), sp.sympify(sb).xreplace(self._renamed)
            if sa == sb or not (isinstance(sa, sp.Symbol) and isinstance(sb, sp.Symbol)):
                continue
            if sa not in self.size_values or self.size_values.get(sa) != self.size_values.get(sb):
                continue
            for t in self.tensors:
                t.shape = tuple(sp.sympify(s).xreplace({sb: sa}) for s in t.shape)
            for eq in self.equations:
                eq.body = eq.body.xreplace({sb: sa})
            self.size_values.pop(sb, None)
            self._renamed[sb] = sa

    def define(self, out: Tensor, idx, body, note="") -> Tensor:
        self.equations.append(Equation(out, tuple(idx), body, layer=self.layer, note=note))
        return out


def elementwise_indices(t: Tensor):
    return tuple(index(n) for n in ("b", "i", "h", "w")[: t.rank]) if t.rank <= 4 else \
        tuple(index(f"i{k}") for k in range(t.rank))


# -- layers ----------------------------------------------------------------------------------------
class Layer:
    """A layer maps an input tensor to an output tensor by declaring equations in a Builder."""

    name = "layer"
    has_params = False

    def build(self, d: Builder, x: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, *inputs):
        """Functional API: the layer applied to a tensor of a graph model (see ``functional.py``)."""
        from .functional import apply_layer
        return apply_layer(self, inputs)

    def describe(self) -> str:
        return self.name


@dataclass
class Dense(Layer):
    """The perceptron / affine layer: z_bo = Σ_i W_oi x_bi + b_o."""

    units: int
    init: str = "glorot"
    name = "dense"
    has_params = True

    def __post_init__(self):
        if not isinstance(self.units, sp.Expr):   # a size symbol: the width of another tensor (residual)
            _check_width(self.units, "dense: units")

    def build(self, d, x):
        if x.rank > 2:
            return self._build_flat(d, x)
        if x.rank != 2:
            raise ShapeError(f"layer {d.layer} (dense) expects a (batch, features) input, "
                             f"got {x.name} {shape_str(x.shape)}")
        n_in = x.shape[1]
        n_out = self.units if isinstance(self.units, sp.Expr) else d.size("n", self.units)
        W = d.param("W", (n_out, n_in), init=self.init)
        c = d.param("b", (n_out,), init="zeros")
        z = d.tensor("z", (B, n_out), grad_latex=rf"\delta^{{({d.level})}}")
        b, o, i = index("b"), index("o"), index("i")
        return d.define(z, (b, o), sp.Sum(W[o, i] * x[b, i], (i, 0, n_in - 1)) + c[o],
                        note="affine map (the perceptron's weighted sum)")

    def _build_flat(self, d, x):
        """A dense layer on a flattened (batch, channel, ...) tensor contracts every non-batch axis."""
        if not x.meta.get("flattened"):
            raise ShapeError(f"layer {d.layer} (dense) expects a (batch, features) input, got {x.name} "
                             f"{shape_str(x.shape)}: put a flatten (or a global pooling) before it")
        n_out = self.units if isinstance(self.units, sp.Expr) else d.size("n", self.units)
        W = d.param("W", (n_out, *x.shape[1:]), init=self.init)
        c = d.param("b", (n_out,), init="zeros")
        z = d.tensor("z", (B, n_out), grad_latex=rf"\delta^{{({d.level})}}")
        b, o = index("b"), index("o")
        axes = tuple(index(n) for n in ("c", "h", "w")[: x.rank - 1]) if x.rank <= 4 else \
            tuple(index(f"i{k}") for k in range(x.rank - 1))
        body = sp.Sum(W[(o, *axes)] * x[(b, *axes)], *[(a, 0, n - 1) for a, n in zip(axes, x.shape[1:])])
        return d.define(z, (b, o), body + c[o], note="affine map of the flattened features")

    def describe(self):
        return f"dense({self.units})"


class Activation(Layer):
    """An elementwise nonlinearity a = f(z), f any SymPy-differentiable function of one variable."""

    def __init__(self, name: str, fn: Callable):
        self.name, self.fn = name, fn

    def build(self, d, x):
        a = d.tensor("a", x.shape)
        if x.meta.get("flattened"):          # an activation after a flatten keeps it flat for dense
            a.meta["flattened"] = True
        idx = elementwise_indices(x)
        return d.define(a, idx, self.fn(x[idx]), note=f"{self.name} activation, elementwise")

    def describe(self):
        return self.name


def identity(u):
    return u


ACTIVATIONS = {
    "identity": identity,
    "sigmoid": sigmoid,
    "tanh": sp.tanh,
    "relu": relu,
    "leaky_relu": lambda u: leaky_relu(u, sp.Rational(1, 100)),
}


class Softmax(Layer):
    """p_bk = exp(z_bk - LSE_m z_bm): softmax over the last axis, in its stable form."""

    name = "softmax"

    def build(self, d, x):
        p = d.tensor("p", x.shape)
        b, k = index("b"), index("k")
        return d.define(p, (b, k), _softmax_of(x, b, k, x.shape[1]), note="softmax")


class LogSoftmax(Layer):
    """s_bk = z_bk - LSE_m z_bm."""

    name = "log_softmax"

    def build(self, d, x):
        s = d.tensor("s", x.shape)
        b, k = index("b"), index("k")
        return d.define(s, (b, k), _log_softmax_of(x, b, k, x.shape[1]), note="log-softmax")


# -- losses ------------------------------------------------------------------------------------------
@dataclass
class Loss:
    """A per-example loss ℓ_b = fn(ŷ_b·, y_b·, k, n), a sum over the output index k.

    ``prediction`` optionally turns the network's output into what ``predict`` returns (e.g. logits
    into probabilities); ``simplex`` declares that each target row sums to one (a probability target).
    """

    name: str
    fn: Callable                        # (yhat_read, y_read, k, n) -> summand over k
    mean: bool = False                  # divide by n (MSE, MAE, BCE average over outputs)
    simplex: bool = False
    prediction: Callable | None = None  # (z_tensor, b, k, n) -> body of the probability output
    label: str = ""

    def build(self, d: Builder, yhat: Tensor):
        n = yhat.shape[1]
        y = d.tensor("y", yhat.shape, role="target", simplex_axis=1 if self.simplex else None)
        loss = d.tensor("l", (B,), role="loss", latex=r"\ell")
        b, k = index("b"), index("k")
        body = sp.Sum(self.fn(yhat[b, k], y[b, k]), (k, 0, n - 1))
        if self.mean:
            body = body / n
        d.define(loss, (b,), body, note=f"{self.label or self.name}, per example")
        outputs = [yhat]
        if self.prediction is not None:
            p = d.tensor("p", yhat.shape, latex="p")
            d.define(p, (b, k), self.prediction(yhat, b, k, n), note="predicted probabilities")
            outputs = [p]
        return y, loss, outputs


def _softmax_of(z, b, k, n):
    m = index("m")
    return sp.exp(z[b, k] - LogSumExp(z[b, m], (m, 0, n - 1)))


def _log_softmax_of(z, b, k, n):
    m = index("m")
    return z[b, k] - LogSumExp(z[b, m], (m, 0, n - 1))


class SoftmaxCrossEntropy(Loss):
    """Categorical cross-entropy on logits, fused with softmax: ℓ_b = -Σ_k y_bk (z_bk - LSE_m z_bm)."""

    def __init__(self):
        super().__init__("softmax_cross_entropy", fn=None, simplex=True, prediction=_softmax_of,
                         label="softmax + cross-entropy")

    def build(self, d, yhat):
        n = yhat.shape[1]
        self.fn = lambda zr, yr: -yr * _log_softmax_of(yhat, zr.indices[0], zr.indices[1], n)
        return super().build(d, yhat)


LOSSES = {
    "mse": lambda: Loss("mse", lambda p, y: (p - y) ** 2, mean=True, label="mean squared error"),
    "mae": lambda: Loss("mae", lambda p, y: sp.Abs(p - y), mean=True, label="mean absolute error"),
    "bce": lambda: Loss("bce", lambda p, y: -(y * sp.log(p) + (1 - y) * sp.log(1 - p)), mean=True,
                        label="binary cross-entropy"),
    "bce_logits": lambda: Loss("bce_logits", lambda z, y: softplus(z) - y * z, mean=True,
                               prediction=lambda z, b, k, n: sigmoid(z[b, k]),
                               label="binary cross-entropy on logits"),
    "cross_entropy": lambda: Loss("cross_entropy", lambda p, y: -y * sp.log(p), simplex=True,
                                  label="categorical cross-entropy"),
    "softmax_cross_entropy": SoftmaxCrossEntropy,
    "nll": lambda: Loss("nll", lambda s, y: -y * s, simplex=True,
                        prediction=lambda s, b, k, n: sp.exp(s[b, k]),
                        label="negative log-likelihood"),
}


def _check_width(n, what):
    import numbers
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise SpecError(f"{what} must be a positive integer, got {n!r}")


# -- assembling a model --------------------------------------------------------------------------------
def sequential(n_inputs, layers, loss: Loss | str, name="model") -> Model:
    """A layer list -> Model: input x (B × n_0, or B × C × H × W for an input shape such as (1, 8, 8)),
    the layers, the per-example loss and the batch-mean cost."""
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise SpecError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
        loss = LOSSES[loss]()
    if not isinstance(n_inputs, (tuple, list)):
        _check_width(n_inputs, "sequential: the number of inputs")
    d = Builder()
    if isinstance(n_inputs, (tuple, list)):
        if not 2 <= len(n_inputs) <= 3 or not all(isinstance(v, int) and v >= 1 for v in n_inputs):
            raise SpecError(f"input shape {tuple(n_inputs)}: expected (channels, width) or "
                            f"(channels, height, width) of positive integers")
        names = ("C", "L") if len(n_inputs) == 2 else ("C", "H", "W")
        dims = tuple(d.size(nm, v) for nm, v in zip(names, n_inputs))
        x = d.tensor("x", (B, *dims), role="input", latex="x")
    else:
        n0 = d.size("n", n_inputs)
        x = d.tensor("x", (B, n0), role="input", latex="x")
    h = x
    for k, layer in enumerate(layers, 1):
        if layer.has_params:
            d.level += 1
        d.layer = f"{k}:{layer.describe()}"
        h = layer.build(d, h)
        d.layer_log.append((d.layer, layer))
    d.layer = f"{len(layers) + 1}:{loss.name}"
    y, per_example, outputs = loss.build(d, h)
    d.layer = "cost"
    cost = Tensor("C", (), role="cost", latex="C", layer="cost")
    d.tensors.append(cost)
    b = index("b")
    d.equations.append(Equation(cost, (), sp.Sum(per_example[b], (b, 0, B - 1)) / B, layer="cost",
                                note="cost: the mean of the per-example losses over the batch"))
    return Model(d.equations, d.tensors, cost, loss=per_example, outputs=outputs,
                 size_values=d.size_values, name=name, layers=d.layer_log)
