"""A corpus of models for tests that must hold on every model: the built-ins, and layers declared as a
user would (residual block, bias through a matrix, convolution, pooling, attention, layer and batch
normalisation, an RNN step, multi-letter names, several outputs, a scalar parameter).

Every user layer here is a declaration and nothing else: no gradient, no LaTeX.
"""
from __future__ import annotations

import sympy as sp

from chainrule.derive import (Activation, Builder, Dense, Layer, Loss, build_model, index, indices,
                              sequential, sigmoid)
from chainrule.derive.graph import Model
from chainrule.derive.layers import B
from chainrule.derive.primitives import LogSumExp, relu
from chainrule.derive.recurrence import recurrent
from chainrule.derive.tensor import Equation, Tensor

b, o, i, j, k, t, u, f, e = indices("b o i j k t u f e")
k_ = index("q")


class Residual(Layer):
    """h = x + relu(W x + c): the identity path and the layer's path add up."""
    has_params = True

    def build(self, d, x):
        n = x.shape[1]
        W, c = d.param("W", (n, n)), d.param("b", (n,), init="zeros")
        h = d.tensor("h", x.shape)
        return d.define(h, (b, o), x[b, o] + relu(sp.Sum(W[o, i] * x[b, i], (i, 0, n - 1)) + c[o]),
                        note="residual block")


class MatrixBias(Layer):
    """h = X Wᵀ + X Waᵀ + U s: a bias computed by a matrix, and a multi-letter parameter name."""
    has_params = True

    def build(self, d, x):
        n = x.shape[1]
        m, q = d.size("n", 3), d.size("q", 4)
        W, Wa = d.param("W", (m, n)), d.param("Wa", (m, n))
        U, s = d.param("U", (m, q)), d.param("s", (q,))
        h = d.tensor("h", (B, m))
        return d.define(h, (b, o), sp.Sum(W[o, i] * x[b, i], (i, 0, n - 1)) + sp.Sum(Wa[o, i] * x[b, i], (i, 0, n - 1))
                        + sp.Sum(U[o, j] * s[j], (j, 0, q - 1)))


class Conv1D(Layer):
    """y[b,t] = Σ_k w[k] x[b, t+k] + c: one channel, valid, stride 1."""
    has_params = True

    def __init__(self, kernel):
        self.kernel = kernel

    def build(self, d, x):
        n = x.shape[1]
        w, c = d.param("w", (self.kernel,)), d.param("c", ())
        y = d.tensor("y", (B, n - self.kernel + 1))
        return d.define(y, (b, t), sp.Sum(w[k] * x[b, t + k], (k, 0, self.kernel - 1)) + c.read())


class AvgPool(Layer):
    """y[b,t] = Σ_k x[b, 2t+k] / 2: window 2, stride 2 (the width must be even)."""

    def build(self, d, x):
        y = d.tensor("y", (B, x.shape[1] / 2))
        return d.define(y, (b, t), sp.Sum(x[b, 2 * t + k], (k, 0, 1)) / 2)


class LayerNorm(Layer):
    """Per example: mean and variance over the features, then scale and shift."""
    has_params = True

    def build(self, d, x):
        n = x.shape[1]
        g, s = d.param("gamma", (n,)), d.param("beta", (n,), init="zeros")
        mu, var, y = d.tensor("mu", (B,)), d.tensor("v", (B,)), d.tensor("y", x.shape)
        d.define(mu, (b,), sp.Sum(x[b, i], (i, 0, n - 1)) / n)
        d.define(var, (b,), sp.Sum((x[b, i] - mu[b]) ** 2, (i, 0, n - 1)) / n)
        return d.define(y, (b, i), g[i] * (x[b, i] - mu[b]) / sp.sqrt(var[b] + sp.Rational(1, 100)) + s[i])


class BatchNorm(Layer):
    """Batch statistics: mean and variance over the batch, then scale and shift."""
    has_params = True

    def build(self, d, x):
        n = x.shape[1]
        g, s = d.param("gamma", (n,)), d.param("beta", (n,), init="zeros")
        mu, var, y = d.tensor("mu", (n,)), d.tensor("v", (n,)), d.tensor("y", x.shape)
        d.define(mu, (i,), sp.Sum(x[b, i], (b, 0, B - 1)) / B)
        d.define(var, (i,), sp.Sum((x[b, i] - mu[i]) ** 2, (b, 0, B - 1)) / B)
        return d.define(y, (b, i), g[i] * (x[b, i] - mu[i]) / sp.sqrt(var[i] + sp.Rational(1, 100)) + s[i])


class Gated(Layer):
    """Two outputs of one input (a gate and a candidate), multiplied: a = σ(z) ⊙ tanh(z)."""

    def build(self, d, x):
        gate, cand, out = d.tensor("g", x.shape), d.tensor("c", x.shape), d.tensor("a", x.shape)
        d.define(gate, (b, i), sigmoid(x[b, i]))
        d.define(cand, (b, i), sp.tanh(x[b, i]))
        return d.define(out, (b, i), gate[b, i] * cand[b, i])


class Temperature(Layer):
    """z = x / τ with a learned scalar τ (a rank-0 parameter)."""
    has_params = True

    def build(self, d, x):
        tau = d.param("tau", (), init="ones")
        z = d.tensor("z", x.shape)
        return d.define(z, (b, i), x[b, i] / tau.read())


class Bilinear(Layer):
    """y_bk = Σ_ij x_bi W_ijk x_bj: a user's layer that reads its input twice, declared and nothing else."""
    has_params = True

    def __init__(self, units=2):
        self.units = units

    def build(self, d, x):
        n = x.shape[1]
        m = d.size("n", self.units)
        W = d.param("W", (n, n, m))
        y = d.tensor("z", (B, m))
        return d.define(y, (b, k), sp.Sum(sp.Sum(x[b, i] * W[i, j, k] * x[b, j], (i, 0, n - 1)), (j, 0, n - 1)))


class SecondOrderRNN(Layer):
    """h_t = tanh(W x_t + U h_{t-1} + V h_{t-2} + c), before the start the learned state h0: a user's own
    recurrence (two lags, a learned initial state) declared with ``recurrent`` and nothing else."""
    has_params = True
    input_names = ("T", "n")

    def __init__(self, units=3):
        self.units = units

    def build(self, d, x):
        T, n = x.shape[1], x.shape[2]
        m = d.size("n", self.units)
        W, U, V = d.param("W", (m, n)), d.param("U", (m, m)), d.param("V", (m, m))
        c, h0 = d.param("c", (m,), init="zeros"), d.param("h0", (m,), init="normal")
        h = recurrent(d.tensor("h", (B, T, m)), 1, initial=h0)
        return d.define(h, (b, t, o), sp.tanh(sp.Sum(W[o, i] * x[b, t, i], (i, 0, n - 1))
                                              + sp.Sum(U[o, j] * h[b, t - 1, j], (j, 0, m - 1))
                                              + sp.Sum(V[o, j] * h[b, t - 2, j], (j, 0, m - 1)) + c[o]))


def elman_from_a_given_state() -> Model:
    """H[b,t] = tanh(W x[b,t] + U H[b,t-1]) whose state before the start is a second input h0 (a state
    carried over from an earlier segment), read out at the last step: a recurrence declared by hand."""
    d = Builder()
    T, n, m, k = d.size("T", 6), d.size("n", 3), d.size("m", 4), d.size("k", 7)
    x, h0 = d.tensor("x", (B, T, n), role="input"), d.tensor("h0", (B, m), role="input")
    W, U, V = d.param("W", (m, n)), d.param("U", (m, m)), d.param("V", (k, m))
    H = recurrent(d.tensor("H", (B, T, m)), 1, initial=h0)
    d.define(H, (b, t, o), sp.tanh(sp.Sum(W[o, i] * x[b, t, i], (i, 0, n - 1))
                                   + sp.Sum(U[o, j] * H[b, t - 1, j], (j, 0, m - 1))))
    z = d.tensor("z", (B, k))
    d.define(z, (b, k_), sp.Sum(V[k_, o] * H[b, T - 1, o], (o, 0, m - 1)))
    cost = _cost_of(d, z)
    return Model(d.equations, d.tensors, cost, outputs=[z], size_values=d.size_values, name="elman-given-state")


def _cost_of(d: Builder, out: Tensor, target_shape=None) -> tuple:
    """Mean squared error against a target of ``out``'s shape, summed over every non-batch axis."""
    y = d.tensor("Y", out.shape, role="target", latex="Y")
    cost = Tensor("C", (), role="cost", latex="C")
    idx = (b,) + tuple(index(f"q{n}") for n in range(out.rank - 1))
    body = (out[idx] - y[idx]) ** 2
    for v, n in reversed(list(zip(idx, out.shape))):
        body = sp.Sum(body, (v, 0, n - 1))
    d.tensors.append(cost)
    d.equations.append(Equation(cost, (), body / B, layer="cost", note="cost"))
    return cost


def attention() -> Model:
    """One-head self-attention, declared as a user would: Q = XWq, K = XWk, V = XWv, S = QKᵀ/√d,
    A = row softmax(S), O = AV; rank-3 tensors (batch, time, feature)."""
    d = Builder()
    T_, D = d.size("T", 3), d.size("d", 3)
    X = d.tensor("X", (B, T_, D), role="input", latex="X")
    Wq, Wk, Wv = (d.tensor(n, (D, D), role="param", latex=rf"W_{{{n[1]}}}") for n in ("Wq", "Wk", "Wv"))
    Q, K, V = (d.tensor(n, (B, T_, D), latex=n) for n in "QKV")
    for out, W in ((Q, Wq), (K, Wk), (V, Wv)):
        d.define(out, (b, t, f), sp.Sum(X[b, t, e] * W[e, f], (e, 0, D - 1)))
    S = d.tensor("S", (B, T_, T_), latex="S")
    d.define(S, (b, t, u), sp.Sum(Q[b, t, f] * K[b, u, f], (f, 0, D - 1)) / sp.sqrt(D))
    A = d.tensor("A", (B, T_, T_), latex="A")
    v = index("v")
    d.define(A, (b, t, u), sp.exp(S[b, t, u] - LogSumExp(S[b, t, v], (v, 0, T_ - 1))))
    O = d.tensor("O", (B, T_, D), latex="O")
    d.define(O, (b, t, f), sp.Sum(A[b, t, u] * V[b, u, f], (u, 0, T_ - 1)))
    cost = _cost_of(d, O)
    return Model(d.equations, d.tensors, cost, outputs=[O], size_values=d.size_values, name="attention")


def rnn_step() -> Model:
    """One step of an Elman RNN with the previous state as a second input: h = tanh(W x + U h0 + c)."""
    d = Builder()
    n, m = d.size("n", 3), d.size("m", 4)
    x = d.tensor("x", (B, n), role="input")
    h0 = d.tensor("h0", (B, m), role="input", latex="h^{(0)}")
    W, U, c = d.param("W", (m, n)), d.param("U", (m, m)), d.param("c", (m,), init="zeros")
    h = d.tensor("h", (B, m), latex="h^{(1)}")
    d.define(h, (b, o), sp.tanh(sp.Sum(W[o, i] * x[b, i], (i, 0, n - 1))
                                + sp.Sum(U[o, j] * h0[b, j], (j, 0, m - 1)) + c[o]))
    cost = _cost_of(d, h)
    return Model(d.equations, d.tensors, cost, outputs=[h], size_values=d.size_values, name="rnn-step")


def _seq(n_in, layers, loss, name):
    return sequential(n_in, layers, loss, name=name)


def corpus() -> dict:
    """name -> Model (built fresh on each call)."""
    swish = Activation("swish", lambda z: z * sigmoid(z))
    huber = Loss("huber", lambda p, y: sp.Min(sp.Abs(p - y), 1) * (sp.Abs(p - y) - sp.Min(sp.Abs(p - y), 1) / 2))
    models = {name: build_model(name) for name in
              ("demo", "perceptron", "mlp-relu", "mlp-tanh-regression", "softmax-ce", "log-softmax-nll")}
    for spec in ("3 -> dense(4) -> softmax -> dense(4) -> softmax -> mse",
                 "3 -> dense(4) -> leaky_relu -> dense(2) -> mae",
                 "3 -> dense(2) -> sigmoid -> bce",
                 "3 -> dense(4) -> tanh -> dense(3) -> log_softmax -> nll"):
        models[spec] = build_model(spec)
    models.update({
        "residual": _seq(3, [Dense(3), Residual(), Dense(2)], "mse", "residual"),
        "matrix bias": _seq(3, [MatrixBias()], "mse", "matrix-bias"),
        "conv1d": _seq(6, [Conv1D(3), Dense(2)], "mse", "conv1d"),
        "avg pool": _seq(6, [AvgPool(), Dense(2)], "mse", "avg-pool"),
        "layer norm": _seq(3, [Dense(4), LayerNorm(), Dense(2)], "mse", "layer-norm"),
        "batch norm": _seq(3, [Dense(4), BatchNorm(), Activation("tanh", sp.tanh), Dense(2)], "mse", "batch-norm"),
        "gated (several outputs)": _seq(3, [Dense(3), Gated(), Dense(2)], "mse", "gated"),
        "scalar parameter": _seq(3, [Dense(3), Temperature()], "softmax_cross_entropy", "temperature"),
        "bilinear": _seq(3, [Bilinear()], "mse", "bilinear"),
        "swish + huber (README)": _seq(3, [Dense(8), swish, Dense(2)], huber, "swish-huber"),
        "attention": attention(),
        "rnn step": rnn_step(),
        # recurrences over a symbolic T: one step's matrix form (h_{t-1}, δ_{t+1}, the initial state)
        # and the weight gradients as sums over the steps
        "elman rnn": build_model("seq(4, 3) -> rnn(5) -> dense(2) -> mse"),
        "elman rnn, learned initial state": build_model("seq(4, 3) -> rnn(5, learn_initial=1) -> dense(2) -> mse"),
        "lstm": build_model("seq(4, 3) -> lstm(5) -> dense(2) -> mse"),
        "gru": build_model("seq(4, 3) -> gru(5) -> dense(2) -> mse"),
        # rank-4 tensors (batch, head, time, feature): one matrix form per example and head, a sum
        # over the heads kept as a sum; the tied output's table read twice
        "causal multi-head attention": causal_attention(),
        "tied output": _tied_output(),
    })
    return models


def _tied_output() -> Model:
    from chainrule.derive.attention import _tied_small_model
    return _tied_small_model()


def causal_attention(T=4, D=6, H=3) -> Model:
    """Causal multi-head self-attention (chainrule.derive.attention) on a (B, T, D) sequence, squared
    error against a target of the same shape."""
    from chainrule.derive.attention import CausalSelfAttention
    d = Builder()
    T_, D_ = d.size("T", T), d.size("n", D)
    x = d.tensor("x", (B, T_, D_), role="input", latex="X", meta={"time_axis": 1})
    d.level, d.layer = 1, "1:causal_attention"
    y = CausalSelfAttention(H).build(d, x)
    d.layer = "cost"
    cost = _cost_of(d, y)
    return Model(d.equations, d.tensors, cost, outputs=[y], size_values=d.size_values, name="causal-attention")
