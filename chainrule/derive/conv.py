"""Convolution and pooling layers: each one a short declaration, like every other layer.

Tensors are (batch, channel, *spatial): rank 3 for 1-D layers, rank 4 for 2-D ones (batch, channel,
height, width). Kernel sizes are symbolic sizes with values (so a derivation holds for every kernel
size and verification picks its own); strides, dilations and pooling windows are integers written
into the declaration. A strided or dilated read ``x[s h + d p]`` is affine, and the engine solves it
(``deltas.py``): nothing here says how to differentiate or how to typeset a layer.

Zero padding is declared as what it is, the input embedded in a larger tensor of zeros:
``x̃[b, c, h'] = Σ_h x[b, c, h] δ(h', h + P)``. The engine differentiates through it like any other
equation (its adjoint is ``δx[h] = δx̃[h + P]``, a crop), and the code generator lowers it in
gather form, as a guarded read.

Every size problem (a kernel larger than its input, a stride of 0, padding that leaves a negative
size, channels that do not match, a pooled size that is not whole) is an error at declaration time
that names the layer, the tensor and the shapes.
"""
from __future__ import annotations

import sympy as sp

from .errors import ShapeError, SpecError
from .layers import B, Builder, Layer
from .primitives import MaxOver
from .tensor import Tensor, index, shape_str

SPATIAL = ("h", "w")


def _tuple(value, dims: int, what: str, layer: str):
    vals = tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims
    if len(vals) != dims or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        raise SpecError(f"layer {layer}: {what} must be an integer or {dims} integers, got {value!r}")
    return vals


def _value(d: Builder, s) -> int | None:
    """The concrete value of a size expression, when the model gives it one."""
    v = sp.sympify(sp.sympify(s).xreplace(d.size_values))
    return int(v) if v.is_Integer else None


def _expect_rank(d: Builder, x: Tensor, dims: int | None, kind: str) -> int:
    """The number of spatial axes: ``dims``, or (None) inferred from the input, which must be 3-D or 4-D."""
    if dims is None:
        if x.rank not in (3, 4):
            raise ShapeError(f"layer {d.layer} expects a (batch, channel, length) or (batch, channel, "
                             f"height, width) input, got {x.name} {shape_str(x.shape)}")
        return x.rank - 2
    if x.rank != 2 + dims:
        axes = "(batch, channel, " + ", ".join(SPATIAL[2 - dims:] if dims == 1 else SPATIAL) + ")"
        raise ShapeError(f"layer {d.layer} expects a rank-{2 + dims} input {axes}, "
                         f"got {x.name} {shape_str(x.shape)}")
    return dims


def _out_size(d, x, axis, n, kernel_extent, stride, kind, what="kernel"):
    """(n - extent)/stride + 1, checked: whole, positive, and the window inside the input."""
    nv, kv = _value(d, n), _value(d, kernel_extent)
    where = f"layer {d.layer}: input {x.name} {shape_str(x.shape)}"
    if nv is not None and kv is not None:
        if kv > nv:
            raise ShapeError(f"{where}: the {what} spans {kv} along axis {axis} but the input has only {nv}")
        if (nv - kv) % stride:
            raise ShapeError(f"{where}: along axis {axis}, ({nv} - {kv})/{stride} + 1 is not whole: "
                             f"the windows do not tile the input (choose a size, padding or stride that fits)")
    return (n - kernel_extent) / stride + 1


class Conv(Layer):
    """Convolution (cross-correlation, as every deep-learning library computes it), 1-D or 2-D:

    ``y[b, f, h, w] = Σ_c Σ_p Σ_q W[f, c, p, q] x̃[b, c, s h + d p, s w + d q] + β[f]``

    with ``x̃`` the input padded with zeros (``padding`` "valid", "same" or an integer per axis).
    """

    has_params = True
    doc_example = "6x6 -> conv(2, 3) -> relu -> flatten -> dense(3) -> softmax_cross_entropy"

    def __init__(self, filters: int, kernel, *, dims: int | None = None, stride=1, padding="valid", dilation=1,
                 bias: bool = True, in_channels: int | None = None, init: str = "he"):
        self.filters, self.kernel, self.dims = filters, kernel, dims
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.bias, self.in_channels, self.init = bias, in_channels, init
        self.name = f"conv{dims}d" if dims else "conv"

    def describe(self):
        k = self.kernel if isinstance(self.kernel, int) else "x".join(map(str, self.kernel))
        extra = "".join(f", {n}={v}" for n, v, default in (("stride", self.stride, 1), ("padding", self.padding, "valid"),
                                                           ("dilation", self.dilation, 1)) if v != default)
        return f"{self.name}({self.filters}, {k}{extra})"

    def build(self, d: Builder, x: Tensor) -> Tensor:
        dims, kind = self.dims, self.describe()
        dims = _expect_rank(d, x, dims, kind)
        K = _tuple(self.kernel, dims, "kernel size", d.layer)
        S = _tuple(self.stride, dims, "stride", d.layer)
        D = _tuple(self.dilation, dims, "dilation", d.layer)
        if not isinstance(self.filters, int) or self.filters < 1:
            raise SpecError(f"layer {d.layer}: the number of filters must be a positive integer, "
                            f"got {self.filters!r}")
        for what, vals in (("kernel size", K), ("stride", S), ("dilation", D)):
            if any(v < 1 for v in vals):
                raise SpecError(f"layer {d.layer}: {what} must be at least 1, got {vals}")
        if self.padding == "valid":
            P = (0,) * dims
        elif self.padding == "same":
            if any(s != 1 for s in S):
                raise SpecError(f"layer {d.layer}: padding 'same' needs stride 1, got stride {S}")
            if any(dd * (k - 1) % 2 for k, dd in zip(K, D)):
                raise SpecError(f"layer {d.layer}: padding 'same' needs an odd kernel extent, "
                                f"got kernel {K} with dilation {D}")
            P = tuple(dd * (k - 1) // 2 for k, dd in zip(K, D))
        else:
            P = _tuple(self.padding, dims, "padding", d.layer)
            if any(p < 0 for p in P):
                raise SpecError(f"layer {d.layer}: padding must be 'valid', 'same' or >= 0, got {P}")
        C = x.shape[1]
        if self.in_channels is not None and _value(d, C) not in (None, self.in_channels):
            raise ShapeError(f"layer {d.layer}: declared for {self.in_channels} input channels, "
                             f"but its input {x.name} {shape_str(x.shape)} has {_value(d, C)}")
        b, f, c = index("b"), index("f"), index("c")
        out_idx = tuple(index(n) for n in (SPATIAL[1:] if dims == 1 else SPATIAL))
        win = tuple(index(n) for n in (("q",) if dims == 1 else ("p", "q")))
        spatial = x.shape[2:]
        src = x
        if any(P):
            padded = tuple(n + 2 * p for n, p in zip(spatial, P))
            src = d.tensor("xp", (B, C, *padded), latex=r"\tilde{x}" + (f"^{{({d.level})}}" if d.level else ""))
            inner = tuple(index(n.name + "'") for n in out_idx)
            body = x[(b, c, *inner)]
            deltas = sp.Mul(*[sp.KroneckerDelta(o, v + p) for o, v, p in zip(out_idx, inner, P)])
            body = sp.Sum(body * deltas, *[(v, 0, n - 1) for v, n in zip(inner, spatial)])
            d.define(src, (b, c, *out_idx), body, note=f"zero padding by {P}: the input embedded in zeros")
        ks = tuple(d.size("K" if dims == 1 else "KH KW".split()[a], k) for a, k in enumerate(K))
        out_sizes = tuple(_out_size(d, src, 2 + a, n, dd * (k - 1) + 1, s, kind)
                          for a, (n, k, s, dd) in enumerate(zip(src.shape[2:], ks, S, D)))
        F = d.size("F", self.filters)
        W = d.param("W", (F, C, *ks), init=self.init)
        y = d.tensor("y", (B, F, *out_sizes))
        read = src[(b, c, *(s * o + dd * v for o, v, s, dd in zip(out_idx, win, S, D)))]
        body = sp.Sum(W[(f, c, *win)] * read, (c, 0, C - 1), *[(v, 0, k - 1) for v, k in zip(win, ks)])
        if self.bias:
            beta = d.param("b", (F,), init="zeros")
            body = body + beta[f]
        return d.define(y, (b, f, *out_idx), body,
                        note=f"{kind}: cross-correlation of the input with each filter")


def Conv1D(filters, kernel, **kw) -> Conv:
    return Conv(filters, kernel, dims=1, **kw)


def Conv2D(filters, kernel, **kw) -> Conv:
    return Conv(filters, kernel, dims=2, **kw)


class _Pool(Layer):
    """A reduction over each window ``x[b, c, s h + p, s w + q]``; subclasses say which (``reduce``)."""

    kind = "pool"
    what = ""

    def __init__(self, window=2, stride=None, *, dims: int | None = None):
        self.window, self.stride, self.dims = window, stride, dims
        self.name = f"{self.kind}{dims}d" if dims else self.kind

    def describe(self):
        return f"{self.name}({self.window}" + (f", stride={self.stride})" if self.stride else ")")

    def reduce(self, read, limits, K):
        raise NotImplementedError

    def build(self, d, x):
        dims, kind = self.dims, self.describe()
        dims = _expect_rank(d, x, dims, kind)
        K = _tuple(self.window, dims, "window", d.layer)
        S = _tuple(self.stride if self.stride is not None else self.window, dims, "stride", d.layer)
        if any(v < 1 for v in K + S):
            raise SpecError(f"layer {d.layer}: window and stride must be at least 1, got {K}, {S}")
        out_sizes = tuple(_out_size(d, x, 2 + a, n, k, s, kind, what="window")
                          for a, (n, k, s) in enumerate(zip(x.shape[2:], K, S)))
        b, c = index("b"), index("c")
        out_idx = tuple(index(n) for n in (SPATIAL[1:] if dims == 1 else SPATIAL))
        win = tuple(index(n) for n in (("q",) if dims == 1 else ("p", "q")))
        y = d.tensor("m", (B, x.shape[1], *out_sizes))
        read = x[(b, c, *(s * o + v for o, v, s in zip(out_idx, win, S)))]
        body = self.reduce(read, [(v, 0, k - 1) for v, k in zip(win, K)], K)
        return d.define(y, (b, c, *out_idx), body, note=f"{kind}: the {self.what} over each window")


class AvgPool(_Pool):
    """``y[b, c, h, w] = (1/k²) Σ_p Σ_q x[b, c, s h + p, s w + q]``: the mean over each window."""

    doc_example = "7x7 -> conv(2, 2) -> avgpool(2) -> flatten -> dense(3) -> mse"

    kind, what = "avgpool", "mean"

    def reduce(self, read, limits, K):
        return sp.Sum(read, *limits) / sp.Mul(*K)


class MaxPool(_Pool):
    """``y[b, c, h, w] = max_{p,q} x[b, c, s h + p, s w + q]``: the largest value in each window
    (ties: the first position in row-major order, as PyTorch; see ``MaxOver``)."""

    doc_example = "7x7 -> conv(2, 2) -> maxpool(2) -> flatten -> dense(3) -> mse"

    kind, what = "maxpool", "maximum"

    def reduce(self, read, limits, K):
        return MaxOver(read, *limits)


class GlobalAvgPool(Layer):
    """``g[b, c] = (1/HW) Σ_h Σ_w x[b, c, h, w]``: one feature per channel."""

    name = "global_avgpool"
    doc_example = "6x6 -> conv(3, 3) -> global_avgpool -> dense(2) -> mse"

    def build(self, d, x):
        if x.rank < 3:
            raise ShapeError(f"layer {d.layer} (global_avgpool) expects a (batch, channel, ...) input, "
                             f"got {x.name} {shape_str(x.shape)}")
        b, c = index("b"), index("c")
        sp_idx = tuple(index(n) for n in (SPATIAL if x.rank == 4 else [f"s{k}" for k in range(x.rank - 2)]))
        g = d.tensor("g", (B, x.shape[1]))
        body = sp.Sum(x[(b, c, *sp_idx)], *[(v, 0, n - 1) for v, n in zip(sp_idx, x.shape[2:])])
        return d.define(g, (b, c), body / sp.Mul(*x.shape[2:]), note="global average pooling, per channel")


class Flatten(Layer):
    """``z[b, (c, h, w)] = x[b, c, h, w]``: one feature axis from several.

    Flattening moves no number, so it declares no equation: the tensor keeps its axes, and the dense
    layer that follows contracts all of them (``z_bo = Σ_{chw} W_{ochw} x_{bchw} + b_o``), which is the
    same map as a dense layer on the flattened vector, with the same gradients."""

    name = "flatten"
    doc_example = "5x5 -> conv(2, 3) -> flatten -> dense(3) -> mse"

    def build(self, d, x):
        if x.rank < 2:
            raise ShapeError(f"layer {d.layer} (flatten) expects a (batch, ...) input, got {x.name} "
                             f"{shape_str(x.shape)}")
        x.meta["flattened"] = True
        return x


__all__ = ["Conv", "Conv1D", "Conv2D", "AvgPool", "MaxPool", "GlobalAvgPool", "Flatten"]
