"""Declarations: every built-in layer, activation and loss is a short symbolic definition.

Nothing here says how to differentiate or how to typeset a layer: that all comes from the equations.
A user's own layer is declared the same way (see ``Activation``, ``Loss`` and ``Layer``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import sympy as sp

from .errors import ShapeError, SpecError
from .graph import Model, check_equation
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
        self.declaring = None             # the layer object being built (every API): whose params
        self._params_of: dict = {}        # id(layer object) -> {base name: its parameter tensor}
        self._param_uses: dict = {}
        self._renamed: dict = {}          # size symbol -> the size it was unified with
        self.constants: dict = {}      # regularisation strengths: symbol -> value
        self.constant_latex: dict = {}
        self.penalties: list = []      # rank-0 cost terms (regularisers), added to the cost
        self.constraints: list = []    # projections applied to parameters after each update
        self.buffer_updates: list = []  # running averages: new buffer values after a training step
        self.eval_equations: dict = {}  # tensor name -> its equation in evaluation mode

    def constant(self, base: str, value, latex: str) -> sp.Symbol:
        """A named positive constant of the model (e.g. a regularisation strength λ^(l))."""
        sym = sp.Symbol(f"{base}{self.level}_{len(self.constants)}", positive=True)
        self.constants[sym] = float(value)
        self.constant_latex[sym] = latex
        return sym

    def penalty(self, body, note: str):
        """Add ``body`` (a scalar expression over tensors) to the cost, as a regularisation term."""
        self.penalties.append((body, note, self.layer))

    def buffer(self, base: str, shape, init="zeros", latex=None) -> Tensor:
        """Non-trainable state of the layer (a running average): no gradient, saved in checkpoints."""
        return self.tensor(base, shape, role="buffer", init=init, latex=latex)

    def running_update(self, buf: Tensor, idx, body, note: str, **meta):
        """Declare ``buf[idx] <- body`` after each training step (``body`` may read the step's
        forward tensors, e.g. the batch statistics): lowered like every equation, no gradient."""
        out = Tensor(f"{buf.name}__new", buf.shape, role="hidden", latex=buf.latex, layer=self.layer,
                     meta={"buffer": buf.name, **meta})
        self.buffer_updates.append(Equation(out, tuple(idx), body, layer=self.layer, note=note))

    def in_evaluation(self, t: Tensor, idx, body, note: str):
        """In evaluation mode ``t`` is defined by ``t[idx] = body`` instead of its training equation
        (batch statistics replaced by running averages); the derivation uses the training equation."""
        self.eval_equations[t.name] = Equation(t, tuple(idx), body, layer=self.layer, note=note)

    def finish(self, model: Model) -> Model:
        """Attach what the layers declared besides the equations (constants, constraints, buffers)."""
        model.constants = dict(self.constants)
        model.constraints = list(self.constraints)
        model.constant_latex = dict(self.constant_latex)
        model.buffer_updates = list(self.buffer_updates)
        model.eval_equations = dict(self.eval_equations)
        for eq in [*model.buffer_updates, *model.eval_equations.values()]:
            check_equation(eq, {**model.tensors, eq.out.name: eq.out})
        return model

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
            uses[key] = self._remember(base, self.tensor(base, shape, role="param", init=init))
            return uses[key]
        return self._remember(base, self.tensor(base, shape, role="param", init=init))

    def _remember(self, base: str, t: Tensor) -> Tensor:
        if self.declaring is not None:
            self._params_of.setdefault(id(self.declaring), {}).setdefault(base, t)
        return t

    def param_of(self, layer, base: str) -> Tensor:
        """The parameter ``base`` that ``layer`` (a layer object declared earlier in this model)
        declared: a second use of one parameter by another layer (a tied output projection reads
        the token-embedding table). Its gradient then sums the two uses, like any shared tensor."""
        declared = self._params_of.get(id(layer))
        if declared is None:
            raise ShapeError(f"layer {self.layer} reads a parameter of layer {layer.describe()}, which is "
                             f"not declared before it in this model")
        if base not in declared:
            raise ShapeError(f"layer {self.layer}: layer {layer.describe()} has no parameter {base!r} "
                             f"(it declares {', '.join(declared)})")
        return declared[base]

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
    # the smallest model that shows the layer at work, for its documentation page (chainrule.docs):
    # a layer-list spec, or a function of no arguments returning a Model (for layers a spec cannot name)
    doc_example = None

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
    l2: float = 0.0          # weight decay in the cost: + l2/2 Σ W²
    l1: float = 0.0          # + l1 Σ |W|
    max_norm: float | None = None   # after each update, rows of W projected onto ‖W_o‖ ≤ max_norm
    name = "dense"
    has_params = True
    doc_example = "5 -> dense(4) -> sigmoid -> dense(3) -> mse"

    def __post_init__(self):
        if not isinstance(self.units, sp.Expr):   # a size symbol: the width of another tensor (residual)
            _check_width(self.units, "dense: units")
        for what in ("l2", "l1"):
            check_strength(f"dense({self.units}): {what}", getattr(self, what))
        if self.max_norm is not None and (check_strength(f"dense({self.units}): max_norm",
                                                         self.max_norm) == 0):
            raise ValueError(f"dense({self.units}): max_norm must be > 0, got {self.max_norm!r}")

    def build(self, d, x):
        if x.rank == 3 and x.meta.get("time_axis") == 1 and not x.meta.get("flattened"):
            return self._build_steps(d, x)      # a sequence: the same map at every position
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
        weight_penalties(d, W, (o, i), self.l2, self.l1)
        if self.max_norm is not None:
            max_norm_constraint(d, W, self.max_norm)
        return d.define(z, (b, o), sp.Sum(W[o, i] * x[b, i], (i, 0, n_in - 1)) + c[o],
                        note="affine map (the perceptron's weighted sum)")

    def _build_steps(self, d, x):
        """A dense layer on a sequence (batch, time, features) maps every position with the same
        weights: z_bto = Σ_i W_oi x_bti + b_o (a transformer's position-wise projections)."""
        n_in = x.shape[2]
        n_out = self.units if isinstance(self.units, sp.Expr) else d.size("n", self.units)
        W = d.param("W", (n_out, n_in), init=self.init)
        c = d.param("b", (n_out,), init="zeros")
        z = d.tensor("z", (B, x.shape[1], n_out), grad_latex=rf"\delta^{{({d.level})}}", meta={"time_axis": 1})
        b, t, o, i = index("b"), index("t"), index("o"), index("i")
        weight_penalties(d, W, (o, i), self.l2, self.l1)
        if self.max_norm is not None:
            max_norm_constraint(d, W, self.max_norm)
        return d.define(z, (b, t, o), sp.Sum(W[o, i] * x[b, t, i], (i, 0, n_in - 1)) + c[o],
                        note="affine map of every position (the same weights at each step)")

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
        extra = "".join(f", {k}={getattr(self, k):g}" for k in ("l2", "l1", "max_norm") if getattr(self, k))
        return f"dense({self.units}{extra})"


def check_strength(what: str, value) -> float:
    """A regularisation strength: a finite number >= 0 (else a ValueError naming it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    if not (float(value) >= 0) or float(value) == float("inf"):
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


def _full_sum(d: Builder, read, t: Tensor, idx):
    """Σ over every element of ``t`` of ``read(t[idx'])``, with summation indices primed apart from
    those of the cost's other terms (sibling sums over different ranges never share a name)."""
    k = len(d.penalties) + 1
    fresh = tuple(index(v.name + "'" * k) for v in idx)
    return sp.Sum(read(t[fresh]), *[(v, 0, n - 1) for v, n in zip(fresh, t.shape)])


def weight_penalties(d: Builder, W: Tensor, idx, l2=0.0, l1=0.0):
    """Weight decay terms of the cost: λ/2 Σ W² (L2) and λ Σ |W| (L1). Their gradients (λW and
    λ sign W) are derived by the engine like every other term."""
    if l2:
        lam = d.constant("lambda", l2, rf"\lambda^{{({d.level})}}_{{2}}")
        d.penalty(lam / 2 * _full_sum(d, lambda r: r ** 2, W, idx), f"L2 weight decay on {W.name}")
    if l1:
        lam = d.constant("lambda", l1, rf"\lambda^{{({d.level})}}_{{1}}")
        d.penalty(lam * _full_sum(d, sp.Abs, W, idx), f"L1 penalty on {W.name}")


class Residual(Layer):
    """A residual block h = x + f(W x + c), f an activation (ReLU by default): the identity path
    carries the adjoint past the block unchanged (the "gradient highway")."""

    has_params = True
    name = "residual"
    doc_example = staticmethod(lambda: sequential(5, [Dense(4), Residual("relu"), Dense(3)], "mse"))

    def __init__(self, activation: str = "relu", init: str = "he"):
        if activation not in ACTIVATIONS:
            raise SpecError(f"residual: unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
        self.activation, self.init = activation, init

    def build(self, d, x):
        if x.rank != 2:
            raise ShapeError(f"layer {d.layer} (residual) expects a (batch, features) input, "
                             f"got {x.name} {shape_str(x.shape)}")
        n = x.shape[1]
        W, c = d.param("W", (n, n), init=self.init), d.param("b", (n,), init="zeros")
        h = d.tensor("h", x.shape)
        b, o, i = index("b"), index("o"), index("i")
        f = ACTIVATIONS[self.activation]
        return d.define(h, (b, o), x[b, o] + f(sp.Sum(W[o, i] * x[b, i], (i, 0, n - 1)) + c[o]),
                        note=f"residual block: the input plus {self.activation} of an affine map")

    def describe(self):
        return f"residual({self.activation})"


class LayerNorm(Layer):
    """Layer normalisation (Ba, Kiros & Hinton 2016): per example, the mean and variance over the
    features, then a learnable scale γ and shift β. The same in training and evaluation."""

    has_params = True
    name = "layer_norm"
    doc_example = staticmethod(lambda: sequential(5, [Dense(4), LayerNorm(), Dense(3)], "mse"))

    def __init__(self, eps: float = 1e-5):
        if check_strength("layer_norm: eps", eps) == 0:
            raise ValueError(f"layer_norm: eps must be > 0, got {eps!r}")
        self.eps = float(eps)

    def build(self, d, x):
        steps = x.rank == 3 and x.meta.get("time_axis") == 1      # a sequence: per position
        if x.rank != 2 and not steps:
            raise ShapeError(f"layer {d.layer} (layer_norm) expects a (batch, features) or (batch, time, "
                             f"features) input, got {x.name} {shape_str(x.shape)}")
        n = x.shape[-1]
        g, s = d.param("gamma", (n,), init="ones"), d.param("beta", (n,), init="zeros")
        g.latex, s.latex = rf"\gamma^{{({d.level})}}", rf"\beta^{{({d.level})}}"
        eps = d.constant("epsilon", self.eps, r"\epsilon")
        rows = x.shape[:-1]                 # (B,) or (B, T): one mean and variance per row
        mu = d.tensor("mu", rows, latex=rf"\mu^{{({d.level})}}")
        var = d.tensor("v", rows, latex=rf"\sigma^{{2({d.level})}}")
        y = d.tensor("y", x.shape, meta=dict(x.meta))
        row = (index("b"), index("t")) if steps else (index("b"),)
        return self._declare(d, x, row, index("i"), n, mu, var, y, g, s, eps)

    @staticmethod
    def _declare(d, x, row, i, n, mu, var, y, g, s, eps):
        d.define(mu, row, sp.Sum(x[(*row, i)], (i, 0, n - 1)) / n, note="mean over the features")
        d.define(var, row, sp.Sum((x[(*row, i)] - mu[row]) ** 2, (i, 0, n - 1)) / n,
                 note="variance over the features")
        return d.define(y, (*row, i), g[i] * (x[(*row, i)] - mu[row]) / sp.sqrt(var[row] + eps) + s[i],
                        note="normalise, then scale and shift")

    def describe(self):
        return "layer_norm" if self.eps == 1e-5 else f"layer_norm(eps={self.eps:g})"


class BatchNorm(Layer):
    """Batch normalisation (Ioffe & Szegedy 2015). In training, each feature (each channel of a
    convolutional input) is normalised by its mean μ and variance σ² over the batch (and the
    positions), then scaled by γ and shifted by β; running averages of μ and of the unbiased
    variance are kept (buffers, updated after every training step with ``momentum``, as in
    PyTorch), and evaluation normalises by them instead."""

    has_params = True
    name = "batchnorm"
    doc_example = "5 -> dense(4) -> batchnorm -> relu -> dense(3) -> mse"

    def __init__(self, momentum: float = 0.1, eps: float = 1e-5):
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 < momentum <= 1:
            raise ValueError(f"batchnorm: momentum must be a number in (0, 1], got {momentum!r}")
        if check_strength("batchnorm: eps", eps) == 0:
            raise ValueError(f"batchnorm: eps must be > 0, got {eps!r}")
        self.momentum, self.eps = float(momentum), float(eps)

    def build(self, d, x):
        if not 2 <= x.rank <= 4:
            raise ShapeError(f"layer {d.layer} (batchnorm) expects a (batch, features) or (batch, "
                             f"channels, ...) input, got {x.name} {shape_str(x.shape)}")
        n, lvl = x.shape[1], d.level
        xi = elementwise_indices(x)                 # (b, i) or (b, i, h[, w]): i is the feature
        c = xi[1]
        over = (xi[0], *xi[2:])                     # the statistics run over batch and positions
        limits = [(v, 0, size - 1) for v, size in zip(over, (x.shape[0], *x.shape[2:]))]
        count = sp.Mul(*(x.shape[0], *x.shape[2:]))
        g, s = d.param("gamma", (n,), init="ones"), d.param("beta", (n,), init="zeros")
        g.latex, s.latex = rf"\gamma^{{({lvl})}}", rf"\beta^{{({lvl})}}"
        eps = d.constant("epsilon", self.eps, r"\epsilon")
        mom = d.constant("momentum", self.momentum, rf"\alpha^{{({lvl})}}")
        mu = d.tensor("mu", (n,), latex=rf"\mu^{{({lvl})}}")
        var = d.tensor("v", (n,), latex=rf"\sigma^{{2({lvl})}}")
        y = d.tensor("y", x.shape)
        d.define(mu, (c,), sp.Sum(x[xi], *limits) / count, note="mean of each feature over the batch")
        d.define(var, (c,), sp.Sum((x[xi] - mu[c]) ** 2, *limits) / count,
                 note="variance of each feature over the batch")
        d.define(y, xi, g[c] * (x[xi] - mu[c]) / sp.sqrt(var[c] + eps) + s[c],
                 note="normalise by the batch statistics, then scale and shift")
        run_mu = d.buffer("rmean", (n,), "zeros", latex=rf"\hat\mu^{{({lvl})}}")
        run_var = d.buffer("rvar", (n,), "ones", latex=rf"\hat\sigma^{{2({lvl})}}")
        d.running_update(run_mu, (c,), (1 - mom) * run_mu[c] + mom * mu[c],
                         note="running average of the batch mean")
        d.running_update(run_var, (c,), (1 - mom) * run_var[c] + mom * count / (count - 1) * var[c],
                         note="running average of the unbiased batch variance", count=count)
        d.in_evaluation(mu, (c,), run_mu[c], note="evaluation: the running mean")
        d.in_evaluation(var, (c,), run_var[c], note="evaluation: the running variance")
        return y

    def describe(self):
        args = [f"{k}={getattr(self, k):g}" for k, v in (("momentum", 0.1), ("eps", 1e-5))
                if getattr(self, k) != v]
        return "batchnorm" + (f"({', '.join(args)})" if args else "")


class Dropout(Layer):
    """Inverted dropout: a = x ⊙ m / (1 - p), m a Bernoulli(1 - p) mask drawn at every training step
    (from a seeded generator); in evaluation m is its mean 1 - p, so the layer is the identity."""

    name = "dropout"
    doc_example = staticmethod(lambda: sequential(5, [Dense(4), Dropout(0.25), Dense(3)], "mse"))

    def __init__(self, rate: float):
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ValueError(f"dropout rate must be a number in [0, 1), got {rate!r}")
        self.rate = float(rate)

    def build(self, d, x):
        idx = elementwise_indices(x)
        p = d.constant("p", self.rate, "p")
        m = d.tensor("m", x.shape, role="noise", meta={"dist": "bernoulli", "keep": 1 - self.rate},
                     latex="m")
        a = d.tensor("a", x.shape)
        return d.define(a, idx, x[idx] * m[idx] / (1 - p),
                        note="inverted dropout: a random mask, rescaled so that its mean is 1")

    def describe(self):
        return f"dropout({self.rate:g})"


class GaussianNoise(Layer):
    """Additive noise a = x + σ ε, ε ~ N(0, 1) drawn at every training step; 0 in evaluation."""

    name = "noise"
    doc_example = staticmethod(lambda: sequential(5, [GaussianNoise(0.1), Dense(3)], "mse"))

    def __init__(self, std: float):
        check_strength("noise: std", std)
        self.std = float(std)

    def build(self, d, x):
        idx = elementwise_indices(x)
        sigma = d.constant("sigma", self.std, r"\sigma")
        e = d.tensor("eps", x.shape, role="noise", meta={"dist": "normal"}, latex=r"\varepsilon")
        a = d.tensor("a", x.shape)
        return d.define(a, idx, x[idx] + sigma * e[idx], note="additive Gaussian noise")

    def describe(self):
        return f"noise({self.std:g})"


def max_norm_constraint(d: Builder, W: Tensor, bound: float):
    """The max-norm constraint as a declared projection (applied after each update, no gradient):
    W_oi ← W_oi if ‖W_o‖ ≤ c, else c W_oi / ‖W_o‖: rows longer than c are scaled back to length c,
    the others are left exactly as they are."""
    c = d.constant("c", bound, rf"c^{{({d.level})}}")
    o, i, j = index("o"), index("i"), index("j")
    out = Tensor(f"{W.name}__maxnorm", W.shape, role="hidden", latex=W.latex, layer=d.layer,
                 meta={"param": W.name})
    norm = sp.sqrt(sp.Sum(W[o, j] ** 2, (j, 0, W.shape[1] - 1)))
    body = sp.Piecewise((W[o, i], norm <= c), (c * W[o, i] / norm, True))
    d.constraints.append(Equation(out, (o, i), body, layer=d.layer,
                                  note=f"Max-norm constraint on the rows of {W.name}"))


class ActivityRegularization(Layer):
    """The identity, adding to the cost the batch mean of λ₂/2 Σ a² and λ₁ Σ |a| over its input."""

    name = "activity"
    doc_example = staticmethod(lambda: sequential(5, [Dense(4), ActivityRegularization(l2=0.01, l1=0.001), Dense(3)],
                                                  "mse"))

    def __init__(self, l2=0.0, l1=0.0):
        self.l2 = check_strength("activity: l2", l2)
        self.l1 = check_strength("activity: l1", l1)

    def build(self, d, x):
        idx = elementwise_indices(x)
        if self.l2:
            lam = d.constant("alpha", self.l2, rf"\alpha_{{2}}")
            d.penalty(lam / 2 * _full_sum(d, lambda r: r ** 2, x, idx) / B, f"L2 activity penalty on {x.name}")
        if self.l1:
            lam = d.constant("alpha", self.l1, rf"\alpha_{{1}}")
            d.penalty(lam * _full_sum(d, sp.Abs, x, idx) / B, f"L1 activity penalty on {x.name}")
        return x

    def describe(self):
        return f"activity(l2={self.l2:g}, l1={self.l1:g})"


class Activation(Layer):
    """An elementwise nonlinearity a = f(z), f any SymPy-differentiable function of one variable."""

    def __init__(self, name: str, fn: Callable):
        self.name, self.fn = name, fn

    def build(self, d, x):
        a = d.tensor("a", x.shape)
        if x.meta.get("flattened"):          # an activation after a flatten keeps it flat for dense
            a.meta["flattened"] = True
        if x.meta.get("time_axis") is not None:     # and one over a sequence keeps its time axis
            a.meta["time_axis"] = x.meta["time_axis"]
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
    doc_example = "5 -> dense(4) -> softmax -> cross_entropy"

    def build(self, d, x):
        p = d.tensor("p", x.shape)
        b, k = index("b"), index("k")
        return d.define(p, (b, k), _softmax_of(x, b, k, x.shape[1]), note="softmax")


class LogSoftmax(Layer):
    """s_bk = z_bk - LSE_m z_bm."""

    name = "log_softmax"
    doc_example = "5 -> dense(4) -> log_softmax -> nll"

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


@dataclass
class Term:
    """A per-example term of the cost over one or more of the model's tensors, with no target:
    ℓ_b = Σ_k fn(T1[b, k], T2[b, k], ...) (a VAE's KL term reads the mean and the log-variance).

    In a functional model each term is one output's loss; the cost sums the terms of every output,
    and the engine differentiates the sum like any equation (each tensor's adjoint gets one
    contribution per term that reads it)."""

    name: str
    fn: Callable                        # (*reads) -> summand over k
    label: str = ""
    latex: str = r"\ell"

    def build(self, d: Builder, *tensors: Tensor):
        first = tensors[0]
        for t in tensors:
            if t.rank != 2:
                raise ShapeError(f"layer {d.layer} ({self.name}) reads (batch, features) tensors, got "
                                 f"{t.name} {shape_str(t.shape)}")
            d.unify_sizes(first.shape, t.shape)
            if tuple(t.shape) != tuple(first.shape):
                raise ShapeError(f"layer {d.layer} ({self.name}) reads tensors of one shape, got "
                                 f"{first.name} {shape_str(first.shape)} and {t.name} {shape_str(t.shape)}")
        loss = d.tensor("l", (B,), role="loss", latex=self.latex)
        b, k = index("b"), index("k")
        body = sp.Sum(self.fn(*(t[b, k] for t in tensors)), (k, 0, first.shape[1] - 1))
        d.define(loss, (b,), body, note=f"{self.label or self.name}, per example")
        return loss, list(tensors)


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
    # ℓ_b = Σ_k g_bk ŷ_bk with the target g an upstream gradient times B: ∂C/∂ŷ_bk = g_bk / B, so
    # the parameters' gradient is the vector-Jacobian product that pulls g back through the model
    # (a GAN's generator, given the discriminator's derived input gradient)
    "pullback": lambda: Loss("pullback", lambda p, g: g * p, label="pullback of an upstream gradient"),
    "nll": lambda: Loss("nll", lambda s, y: -y * s, simplex=True,
                        prediction=lambda s, b, k, n: sp.exp(s[b, k]),
                        label="negative log-likelihood"),
}


def _check_width(n, what):
    import numbers
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise SpecError(f"{what} must be a positive integer, got {n!r}")


# -- assembling a model --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SequenceInput:
    """A sequential model's input that runs over time: ``steps`` steps of ``features`` numbers
    (``seq(T, N)`` in a spec: x is (B, T, N)), or, with ``vocab``, ``steps`` token ids below ``vocab``
    (``tokens(T, V)``: x is (B, T), read through an embedding)."""

    steps: int
    features: int = 0
    vocab: int | None = None

    def __post_init__(self):
        _check_width(self.steps, "a sequence input: the number of steps")
        if self.vocab is not None:
            _check_width(self.vocab, "a token input: the vocabulary")
        else:
            _check_width(self.features, "a sequence input: the number of features")

    def declare(self, d: Builder) -> Tensor:
        T = d.size("T", self.steps)
        if self.vocab is not None:
            return d.tensor("x", (B, T), role="input", latex="x",
                            meta={"time_axis": 1, "vocab": d.size("V", self.vocab)})
        return d.tensor("x", (B, T, d.size("n", self.features)), role="input", latex="x",
                        meta={"time_axis": 1})



def sequential(n_inputs, layers, loss: Loss | str, name="model") -> Model:
    """A layer list -> Model: input x (B × n_0, or B × C × H × W for an input shape such as (1, 8, 8)),
    the layers, the per-example loss and the batch-mean cost."""
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise SpecError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
        loss = LOSSES[loss]()
    if not isinstance(n_inputs, (tuple, list, SequenceInput)):
        _check_width(n_inputs, "sequential: the number of inputs")
    d = Builder()
    if isinstance(n_inputs, SequenceInput):
        x = n_inputs.declare(d)
    elif isinstance(n_inputs, (tuple, list)):
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
        d.declaring = layer
        h = layer.build(d, h)
        d.declaring = None
        d.layer_log.append((d.layer, layer))
    d.layer = f"{len(layers) + 1}:{loss.name}"
    y, per_example, outputs = loss.build(d, h)
    d.layer = "cost"
    cost = Tensor("C", (), role="cost", latex="C", layer="cost")
    d.tensors.append(cost)
    b = index("b")
    body = sp.Sum(per_example[b], (b, 0, B - 1)) / B
    note = "cost: the mean of the per-example losses over the batch"
    if d.penalties:
        body = body + sp.Add(*[p for p, _, _ in d.penalties])
        note += ", plus " + ", ".join(n for _, n, _ in d.penalties)
    d.equations.append(Equation(cost, (), body, layer="cost", note=note))
    model = Model(d.equations, d.tensors, cost, loss=per_example, outputs=outputs,
                  size_values=d.size_values, name=name, layers=d.layer_log)
    return d.finish(model)
