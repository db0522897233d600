"""Sequence layers: recurrences declared as their gate equations, nothing more.

Each layer reads a (batch, time, features) sequence and declares its equations with a read of its
own state at ``t - 1`` (``recurrent`` gives the state before the start: zeros, or a learned vector).
Backpropagation through time, the kernels' loops over t and the verification all come from these
declarations. A layer returns the whole sequence of states (``return_sequences=True``, for stacking)
or the last one.

* ``RNN``: Elman's recurrence  z_t = W x_t + U h_{t-1} + c,  h_t = tanh(z_t).
* ``LSTM``: Hochreiter & Schmidhuber's cell with a forget gate, in PyTorch's ``nn.LSTM`` form.
* ``GRU``: Cho et al.'s gated recurrent unit, in PyTorch's ``nn.GRU`` form (the candidate's
  recurrent term, with its own bias, is multiplied by the reset gate).
* ``Embedding``: a read of a table indexed by an integer input, ``e[b, t, o] = E[x[b, t], o]``.
"""
from __future__ import annotations

import sympy as sp

from .errors import ShapeError, SpecError
from .layers import B, Builder, Layer, _check_width
from .primitives import sigmoid
from .recurrence import recurrent
from .tensor import Tensor, index, shape_str


def _sequence_input(d: Builder, x: Tensor, what: str):
    if x.rank != 3:
        raise ShapeError(f"layer {d.layer} ({what}) expects a (batch, time, features) sequence, got "
                         f"{x.name} {shape_str(x.shape)}: give the input as seq(T, N) (e.g. seq(40, 1)) or "
                         f"put an embedding before it")
    return x.shape[1], x.shape[2]


class _Recurrent(Layer):
    has_params = True
    kind = "rnn"
    input_names = ("T", "n")          # the sizes of its (time, features) input, by name

    def __init__(self, units: int, return_sequences: bool = False, learn_initial: bool = False,
                 probe: bool = False):
        _check_width(units, f"{self.kind}: units")
        self.units = units
        self.return_sequences = bool(return_sequences)
        self.learn_initial = bool(learn_initial)
        # a diagnostic: a zero parameter P[t, o] added to every state, whose gradient is the adjoint
        # of the state h_t summed over the batch (‖∂C/∂h_t‖ through time, for one example at a time)
        self.probe = bool(probe)

    def _probed(self, d, body, b, t, o, T, m):
        if not self.probe:
            return body
        P = d.param("P", (T, m), init="zeros")
        P.latex = rf"P^{{({d.level})}}"
        return body + P[t, o]

    def describe(self):
        extra = ", return_sequences=1" if self.return_sequences else ""
        return f"{self.kind}({self.units}{extra})"

    # shared declarations --------------------------------------------------------------------
    def _state(self, d, base, T, m, latex=None):
        """A recurrent state sequence (B, T, m) and its initial state (zeros or a parameter)."""
        h = d.tensor(base, (B, T, m), meta={"time_axis": 1}, **({"latex": latex} if latex else {}))
        init = 0
        if self.learn_initial:
            init = d.param(base + "0", (m,), init="zeros")
        return recurrent(h, 1, init)

    def _gate(self, d, name, x, h, T, n, m, f, latex=None, note=""):
        """name[b,t,o] = f(Σ_i W x[b,t,i] + Σ_j U h[b,t-1,j] + c[o]): one gate of the cell."""
        W = d.param("W" + name, (m, n))
        U = d.param("U" + name, (m, m))
        c = d.param("b" + name, (m,), init="zeros")
        for p, tex in ((W, "W"), (U, "U"), (c, "b")):
            p.latex = rf"{tex}_{{{name}}}^{{({d.level})}}"
        g = d.tensor(name, (B, T, m), meta={"time_axis": 1},
                     latex=latex or rf"{name}^{{({d.level})}}")
        b, t, o, i, j = (index(s) for s in "b t o i j".split())
        body = (sp.Sum(W[o, i] * x[b, t, i], (i, 0, n - 1)) + sp.Sum(U[o, j] * h[b, t - 1, j], (j, 0, m - 1))
                + c[o])
        return d.define(g, (b, t, o), f(body), note=note)

    def _output(self, d, h, T, m):
        if self.return_sequences:
            return h
        last = d.tensor("hT", (B, m), latex=rf"h_T^{{({d.level})}}")
        b, o = index("b"), index("o")
        return d.define(last, (b, o), h[b, T - 1, o], note="the last state")


class RNN(_Recurrent):
    """Elman's recurrent layer: z_t = W x_t + U h_{t-1} + c, h_t = tanh(z_t), h_{-1} = 0."""

    kind = "rnn"
    name = "rnn"
    doc_example = "seq(4, 3) -> rnn(5) -> dense(2) -> mse"

    def build(self, d, x):
        T, n = _sequence_input(d, x, self.kind)
        m = d.size("n", self.units)
        W, U = d.param("W", (m, n)), d.param("U", (m, m))
        c = d.param("b", (m,), init="zeros")
        h = self._state(d, "h", T, m)
        z = d.tensor("z", (B, T, m), meta={"time_axis": 1}, grad_latex=rf"\delta^{{({d.level})}}")
        b, t, o, i, j = (index(s) for s in "b t o i j".split())
        d.define(z, (b, t, o), sp.Sum(W[o, i] * x[b, t, i], (i, 0, n - 1))
                 + sp.Sum(U[o, j] * h[b, t - 1, j], (j, 0, m - 1)) + c[o],
                 note="the input and the previous state, mapped and added")
        d.define(h, (b, t, o), self._probed(d, sp.tanh(z[b, t, o]), b, t, o, T, m), note="the new state")
        return self._output(d, h, T, m)


class LSTM(_Recurrent):
    """The LSTM cell (PyTorch's gate order and form): i, f, o = σ(...), g = tanh(...),
    c_t = f ⊙ c_{t-1} + i ⊙ g, h_t = o ⊙ tanh(c_t); both states start at zero."""

    kind = "lstm"
    name = "lstm"
    doc_example = "seq(4, 3) -> lstm(5) -> dense(2) -> mse"

    def build(self, d, x):
        T, n = _sequence_input(d, x, self.kind)
        m = d.size("n", self.units)
        h = self._state(d, "h", T, m)
        cell = self._state(d, "c", T, m)
        gi = self._gate(d, "i", x, h, T, n, m, sigmoid, note="input gate")
        gf = self._gate(d, "f", x, h, T, n, m, sigmoid, note="forget gate")
        gg = self._gate(d, "g", x, h, T, n, m, sp.tanh, note="candidate cell")
        go = self._gate(d, "o", x, h, T, n, m, sigmoid, note="output gate")
        b, t, k = index("b"), index("t"), index("k")
        d.define(cell, (b, t, k), gf[b, t, k] * cell[b, t - 1, k] + gi[b, t, k] * gg[b, t, k],
                 note="the cell: what the forget gate keeps plus what the input gate writes")
        d.define(h, (b, t, k), self._probed(d, go[b, t, k] * sp.tanh(cell[b, t, k]), b, t, k, T, m),
                 note="the new state")
        return self._output(d, h, T, m)


class GRU(_Recurrent):
    """The GRU (PyTorch's form): r, z = σ(...), n = tanh(W_n x + b_n + r ⊙ (U_n h_{t-1} + b_hn)),
    h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}; the state starts at zero."""

    kind = "gru"
    name = "gru"
    doc_example = "seq(4, 3) -> gru(5) -> dense(2) -> mse"

    def build(self, d, x):
        T, n = _sequence_input(d, x, self.kind)
        m = d.size("n", self.units)
        h = self._state(d, "h", T, m)
        r = self._gate(d, "r", x, h, T, n, m, sigmoid, note="reset gate")
        z = self._gate(d, "z", x, h, T, n, m, sigmoid, note="update gate")
        Wn, Un = d.param("Wn", (m, n)), d.param("Un", (m, m))
        bn, bhn = d.param("bn", (m,), init="zeros"), d.param("bhn", (m,), init="zeros")
        for p, tex in ((Wn, "W_{n}"), (Un, "U_{n}"), (bn, "b_{n}"), (bhn, "b_{hn}")):
            p.latex = rf"{tex}^{{({d.level})}}"
        cand = d.tensor("n", (B, T, m), meta={"time_axis": 1}, latex=rf"n^{{({d.level})}}")
        b, t, o, i, j = (index(s) for s in "b t o i j".split())
        d.define(cand, (b, t, o), sp.tanh(sp.Sum(Wn[o, i] * x[b, t, i], (i, 0, n - 1)) + bn[o]
                                          + r[b, t, o] * (sp.Sum(Un[o, j] * h[b, t - 1, j], (j, 0, m - 1))
                                                          + bhn[o])),
                 note="the candidate state, its recurrent part scaled by the reset gate")
        d.define(h, (b, t, o), self._probed(d, (1 - z[b, t, o]) * cand[b, t, o] + z[b, t, o] * h[b, t - 1, o],
                                            b, t, o, T, m),
                 note="the new state: between the candidate and the previous state, by the update gate")
        return self._output(d, h, T, m)


class Embedding(Layer):
    """e[b, t, o] = E[x[b, t], o]: each token id selects a learned row of the table E."""

    has_params = True
    name = "embedding"
    doc_example = "tokens(4, 7) -> embedding(3) -> rnn(5) -> dense(2) -> softmax_cross_entropy"

    def __init__(self, units: int):
        _check_width(units, "embedding: units")
        self.units = units

    def build(self, d, x):
        vocab = x.meta.get("vocab")
        if x.rank != 2 or vocab is None:
            raise ShapeError(f"layer {d.layer} (embedding) expects (batch, time) token ids, got {x.name} "
                             f"{shape_str(x.shape)}: give the input as tokens(T, V)")
        m = d.size("n", self.units)
        E = d.param("E", (vocab, m), init="normal")
        e = d.tensor("e", (B, x.shape[1], m), meta={"time_axis": 1})
        b, t, o = index("b"), index("t"), index("o")
        return d.define(e, (b, t, o), E[x[b, t], o], note="the row of the table that each token selects")

    def describe(self):
        return f"embedding({self.units})"


SEQUENCE_LAYERS = {"rnn": RNN, "lstm": LSTM, "gru": GRU, "embedding": Embedding}


def sequence_layer(name, pos, kw, position):
    cls = SEQUENCE_LAYERS[name]
    for flag in ("return_sequences", "learn_initial"):
        if flag in kw:
            kw[flag] = bool(kw[flag])
    try:
        return cls(*pos, **kw)
    except TypeError:
        usage = "embedding(N)" if name == "embedding" else f"{name}(N, return_sequences=0|1, learn_initial=0|1)"
        raise SpecError(f"item {position}: {name}: bad arguments; usage: {usage}") from None
