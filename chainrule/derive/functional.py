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
from .tensor import shape_str


def _elementwise(t):
    from .layers import elementwise_indices
    return elementwise_indices(t)


class Residual(Layer):
    """``h = x + f(x)``, ``f`` a list of layers that keeps the shape of ``x``."""

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
        width = sp.sympify(x.shape[-1]).xreplace(d.size_values) if x.rank == 2 else None
        if last is not None and width is not None and width == layers[last].units:
            layers[last] = Dense(x.shape[-1], init=layers[last].init)
        for k, layer in enumerate(layers, 1):
            if layer.has_params:
                d.level += 1
            d.layer = f"{outer}.{k}:{layer.describe()}"
            h = layer.build(d, h)
        d.layer = outer
        if tuple(h.shape) != tuple(x.shape):
            raise ShapeError(f"layer {outer}: the residual branch maps {x.name} {shape_str(x.shape)} to "
                             f"{h.name} {shape_str(h.shape)}; x + f(x) needs the same shape")
        r = d.tensor("r", x.shape)
        idx = _elementwise(x)
        return d.define(r, idx, x[idx] + h[idx], note="residual connection: the input plus the branch")
