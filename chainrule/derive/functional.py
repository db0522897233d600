"""Graph models: residual blocks in a layer list, and a functional API (inputs, layers applied to
tensors, ``add``, ``concat``, several inputs and outputs, shared layers).

Everything here only wires declarations together: a residual connection is the equation
``h = x + f(x)``, and the engine's reverse mode gives its adjoint the two contributions (the identity
path and the path through ``f``) that add up, like every other tensor read twice.
"""
from __future__ import annotations

import sympy as sp

from .errors import ShapeError
from .layers import Layer
from .tensor import Tensor, shape_str


def _elementwise(t):
    from .layers import elementwise_indices
    return elementwise_indices(t)


class Residual(Layer):
    """``h = x + f(x)``, ``f`` a list of layers that keeps the shape of ``x``."""

    doc_example = "5 -> dense(4) -> residual(dense(4) -> relu -> dense(4)) -> dense(3) -> mse"

    def __init__(self, layers):
        self.layers = list(layers)
        self.name = "residual"

    def describe(self):
        return "residual(" + " -> ".join(layer.describe() for layer in self.layers) + ")"

    def build(self, d, x):
        from .layers import Dense
        outer = d.layer
        h = x
        layers = list(self.layers)
        # the branch's last dense layer returns to the input's width: the same size symbol, so that the
        # sum is well defined at every size (verification varies sizes), not only at the declared one
        last = max((k for k, layer in enumerate(layers) if isinstance(layer, Dense)), default=None)
        by_features = x.rank == 2 or (x.rank == 3 and x.meta.get("time_axis") == 1)   # (.., features)
        width = sp.sympify(x.shape[-1]).xreplace(d.size_values) if by_features else None
        if last is not None and width is not None and width == layers[last].units:
            layers[last] = Dense(x.shape[-1], init=layers[last].init)
        for k, layer in enumerate(layers, 1):
            if layer.has_params:
                d.level += 1
            d.layer = f"{outer}.{k}:{layer.describe()}"
            d.declaring = layer
            h = layer.build(d, h)
        d.layer, d.declaring = outer, self
        if tuple(h.shape) != tuple(x.shape):
            raise ShapeError(f"layer {outer}: the residual branch maps {x.name} {shape_str(x.shape)} to "
                             f"{h.name} {shape_str(h.shape)}; x + f(x) needs the same shape")
        r = d.tensor("r", x.shape, meta=dict(x.meta))
        idx = _elementwise(x)
        return d.define(r, idx, x[idx] + h[idx], note="residual connection: the input plus the branch")


# -- the functional API ------------------------------------------------------------------------------
class Node:
    """A tensor in a functional model before it is built: an input, or an operation on nodes."""

    def __init__(self, op, args=(), name=None, **options):
        self.op, self.args, self.name, self.options = op, tuple(args), name, options

    def __add__(self, other):
        return add(self, other)

    def __repr__(self):
        what = self.op if isinstance(self.op, str) else self.op.describe()
        return f"Node({what}{', ' + self.name if self.name else ''})"


def Input(shape, name: str = "x") -> Node:
    """An input of the model: ``Input(64)`` (features), ``Input((1, 8, 8))`` (an image), ``Input((1, 40))``."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not shape or not all(isinstance(v, int) and v >= 1 for v in shape) or len(shape) > 3:
        raise ShapeError(f"input {name}: shape must be 1 to 3 positive integers, got {shape}")
    return _input(shape, name)


def _input(shape, name):
    n = Node("input", (), name=name)
    n.shape = shape
    return n


def add(*nodes: Node) -> Node:
    """Elementwise sum of tensors of one shape (a residual connection: ``add(x, f(x))``)."""
    if len(nodes) < 2:
        raise ShapeError("add needs at least two tensors")
    return Node("add", nodes)


def concat(*nodes: Node) -> Node:
    """Concatenation along axis 1: the features of (batch, features) tensors, the channels of
    (batch, channels, length) or (batch, channels, height, width) ones (the other axes must agree)."""
    if len(nodes) < 2:
        raise ShapeError("concat needs at least two tensors")
    return Node("concat", nodes)


def gaussian_sample(mu: Node, logvar: Node) -> Node:
    """The reparameterisation trick: ``z = μ + exp(½ log σ²) ⊙ ε`` with ``ε ~ N(0, 1)`` a noise tensor
    drawn at every training step (its mean 0 in evaluation, so ``z = μ``). The randomness sits in ε,
    outside the parameters' path, so the engine differentiates z with respect to μ and log σ² like
    any other equation."""
    return Node("sample", (mu, logvar))


def apply_layer(layer, inputs) -> Node:
    if len(inputs) != 1 or not isinstance(inputs[0], Node):
        raise ShapeError(f"layer {layer.describe()} is applied to one tensor (a functional Input or a "
                         f"layer's output), got {inputs!r}")
    return Node(layer, inputs)


def functional_model(inputs, outputs, losses, name="model", weights=None):
    """A Model from a functional graph: ``inputs`` (Input nodes), ``outputs`` and one loss per output.

    A loss is a name such as "softmax_cross_entropy" or a ``Loss`` (it declares a target for its
    output), a ``Term`` (a per-example term over one or more of the model's tensors, with no target:
    a VAE's KL term reads μ and log σ², given as the tuple ``(mu, logvar)``), or ``None`` (an output
    that predictions report, such as a latent code, with no term in the cost). ``weights`` (one per
    loss, default 1) scale the terms; a weight other than 1 is a named constant of the model.

    The cost is the batch mean of the weighted sum of the per-example losses, plus the layers'
    penalties. A layer object applied more than once shares its parameters: each application reads
    the same tensors, so its gradient sums the uses."""
    from .graph import Model
    from .layers import B, Builder, Term
    from .errors import SpecError
    from .tensor import Equation, Tensor, index
    inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    losses = list(losses) if isinstance(losses, (list, tuple)) else [losses]
    if len(losses) != len(outputs):
        raise SpecError(f"{len(outputs)} outputs need {len(outputs)} losses, got {len(losses)}")
    weights = [1] * len(losses) if weights is None else list(weights)
    if len(weights) != len(losses):
        raise SpecError(f"{len(losses)} losses need {len(losses)} weights, got {len(weights)}")
    d = Builder()
    built: dict[int, Tensor] = {}
    names = [n.name for n in inputs]
    if len(set(names)) != len(names):
        raise SpecError(f"inputs need distinct names, got {names}")
    for node in inputs:
        if node.op != "input":
            raise SpecError(f"{node!r} is not an Input")
        if len(node.shape) == 1:
            dims = (d.size(f"n_{node.name}", node.shape[0]),)
        else:
            letters = ("C", "L") if len(node.shape) == 2 else ("C", "H", "W")
            dims = tuple(d.size(f"{s}_{node.name}", v) for s, v in zip(letters, node.shape))
        t = Tensor(node.name, (B, *dims), role="input", latex=node.name)
        d.tensors.append(t)
        built[id(node)] = t
    levels: dict[int, int] = {}
    first_input: dict[int, Tensor] = {}
    step = [0]

    def build(node):
        if id(node) in built:
            return built[id(node)]
        args = [build(a) for a in node.args]
        step[0] += 1
        if node.op == "input":
            raise SpecError(f"input {node.name} is used but not listed in inputs")
        if isinstance(node.op, str) and node.op in NODE_OPS:
            d.layer = f"{step[0]}:{node.op}"
            out = NODE_OPS[node.op](d, args, **node.options)
        else:
            layer = node.op
            first = id(layer) not in levels
            if layer.has_params and first:
                d.level = max(levels.values(), default=0) + 1
                levels[id(layer)] = d.level
            elif layer.has_params:
                d.level = levels[id(layer)]              # a shared layer: the same parameters
            d.layer = f"{step[0]}:{layer.describe()}" + ("" if first else " (shared)")
            if not first and first_input[id(layer)].rank == args[0].rank:
                d.unify_sizes(first_input[id(layer)].shape, args[0].shape)   # one layer, one input size
            first_input.setdefault(id(layer), args[0])
            d.owner = d.declaring = layer
            for key in [k for k in d._param_uses.get(id(layer), {}) if k[0] == "next"]:
                del d._param_uses[id(layer)][key]          # this application counts its parameters anew
            out = layer.build(d, args[0])
            d.owner = d.declaring = None
            if first:
                levels.setdefault(id(layer), d.level)
                d.layer_log.append((d.layer, layer))
        built[id(node)] = out
        return out

    outs = [tuple(build(o) for o in out) if isinstance(out, tuple) else build(out) for out in outputs]
    per_example, predictions, scaled = [], [], []
    d.level = max(levels.values(), default=0)
    for k, (out, loss, weight) in enumerate(zip(outs, losses, weights), 1):
        if loss is None:                       # reported by predictions, no term in the cost
            predictions += list(out) if isinstance(out, tuple) else [out]
            continue
        loss = _as_loss(loss, k)
        d.layer = f"loss{k}:{loss.name}"
        if isinstance(loss, Term):
            per, outs_k = loss.build(d, *(out if isinstance(out, tuple) else (out,)))
        elif isinstance(out, tuple):
            raise SpecError(f"output {k}: loss {loss.name} takes one tensor, got {len(out)}")
        else:
            _, per, outs_k = loss.build(d, out)
        per_example.append(per)
        predictions += outs_k
        scaled.append(_weight(d, weight, k, loss.name))
    if not per_example:
        raise SpecError("every output has loss None: the cost needs at least one loss")
    d.layer = "cost"
    cost = Tensor("C", (), role="cost", latex="C", layer="cost")
    d.tensors.append(cost)
    b = index("b")
    total = sp.Add(*[w * p[b] for w, p in zip(scaled, per_example)])
    body = sp.Sum(total, (b, 0, B - 1)) / B
    note = "cost: the mean over the batch of the per-example losses"
    if len(per_example) > 1:
        note += " (summed over the outputs" + (", weighted" if any(w != 1 for w in scaled) else "") + ")"
    if d.penalties:
        body = body + sp.Add(*[p for p, _, _ in d.penalties])
        note += ", plus " + ", ".join(n for _, n, _ in d.penalties)
    d.equations.append(Equation(cost, (), body, layer="cost", note=note))
    return d.finish(Model(d.equations, d.tensors, cost, loss=per_example[0], outputs=predictions,
                          size_values=d.size_values, name=name, layers=d.layer_log))


def _as_loss(loss, k):
    from .errors import SpecError
    from .layers import LOSSES, Loss, Term
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise SpecError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
        loss = LOSSES[loss]()
    if not isinstance(loss, (Loss, Term)):
        raise SpecError(f"output {k}: {loss!r} is not a loss")
    return loss


def _weight(d, weight, k, name):
    """1, or the weight as a named constant of the model (shown as w_k in the derivation)."""
    from .layers import check_strength
    value = check_strength(f"loss {k} ({name}): weight", weight)
    if value == 1:
        return sp.S.One
    return d.constant("w", value, rf"w_{{{k}}}")


def _add(d, args):
    first = args[0]
    for t in args[1:]:
        if t.rank == first.rank:
            d.unify_sizes(first.shape, t.shape)       # adding them says their equal widths are one size
        if tuple(t.shape) != tuple(first.shape):
            vals = [tuple(sp.sympify(s).xreplace(d.size_values) for s in a.shape) for a in (first, t)]
            hint = (" (equal values but independent sizes: give the layers the same width symbol)"
                    if vals[0] == vals[1] else "")
            raise ShapeError(f"layer {d.layer}: cannot add {first.name} {shape_str(first.shape)} and "
                             f"{t.name} {shape_str(t.shape)}{hint}")
    r = d.tensor("r", first.shape)
    idx = _elementwise(first)
    return d.define(r, idx, sp.Add(*[t[idx] for t in args]),
                    note="sum of " + ", ".join(t.name for t in args) + " (a residual connection)")


def _concat(d, args):
    from .tensor import index
    first = args[0]
    for t in args:
        if t.rank < 2 or t.rank != first.rank:
            raise ShapeError(f"layer {d.layer}: concat joins tensors of one rank (>= 2) along axis 1, "
                             f"got {', '.join(f'{a.name} {shape_str(a.shape)}' for a in args)}")
        d.unify_sizes(first.shape[2:], t.shape[2:])     # the axes after 1 must be one size
        if tuple(t.shape[2:]) != tuple(first.shape[2:]):
            raise ShapeError(f"layer {d.layer}: concat along axis 1 needs equal other axes, got "
                             f"{first.name} {shape_str(first.shape)} and {t.name} {shape_str(t.shape)}")
    idx = _elementwise(first)
    b, i, rest = idx[0], index("i"), idx[2:]
    offset, terms = sp.S.Zero, []
    for k, t in enumerate(args):
        j = index(f"j{k}")                   # one summation index per part: each has its own range
        terms.append(sp.Sum(t[(b, j, *rest)] * sp.KroneckerDelta(i, j + offset), (j, 0, t.shape[1] - 1)))
        offset += t.shape[1]
    c = d.tensor("c", (first.shape[0], offset, *first.shape[2:]))
    axis = "features" if first.rank == 2 else "channels"
    return d.define(c, (b, i, *rest), sp.Add(*terms),
                    note="concatenation of " + ", ".join(t.name for t in args) + f" along the {axis}")


def _sample(d, args):
    """z = μ + exp(½ log σ²) ε, ε ~ N(0, 1): see ``gaussian_sample``."""
    mu, logvar = args
    if mu.rank == logvar.rank:
        d.unify_sizes(mu.shape, logvar.shape)
    if tuple(mu.shape) != tuple(logvar.shape):
        raise ShapeError(f"layer {d.layer}: the mean {mu.name} {shape_str(mu.shape)} and the log-variance "
                         f"{logvar.name} {shape_str(logvar.shape)} need one shape")
    mu.latex, logvar.latex = r"\mu", r"\log\sigma^{2}"     # what they now mean, in the derivation
    idx = _elementwise(mu)
    eps = d.tensor("eps", mu.shape, role="noise", meta={"dist": "normal"}, latex=r"\varepsilon")
    z = d.tensor("zs", mu.shape, latex="z")
    return d.define(z, idx, mu[idx] + sp.exp(logvar[idx] / 2) * eps[idx],
                    note="reparameterised sample: the mean plus the standard deviation times "
                         "standard normal noise")


NODE_OPS = {"add": _add, "concat": _concat, "sample": _sample}
