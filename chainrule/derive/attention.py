"""The transformer's layers, declared: causal multi-head self-attention, GELU, position embeddings
and a position-wise next-token cross-entropy. Their gradients, LaTeX and kernels come from the engine.

* Heads are an *index* of the equations (``Q[b, h, t, e]``), never copies of a one-head layer, so one
  derivation covers every head and the kernels loop over (batch, head) around one BLAS call.
* The causal mask is math, not ``-inf`` added to scores: the attention weights carry the Iverson
  bracket ``[u ≤ t]`` and the softmax's normaliser sums over ``v ≤ t`` only. The engine's delta
  elimination turns the bracket into summation limits, so the derived backward shows why a score
  ``S[t, u]`` with ``u > t`` gets exactly zero gradient: nothing downstream reads it.
* The number of heads and the width of a head are sizes of their own: the algebra does not need
  ``D = H·E`` (the output projection maps ``H·E`` back to ``D``), so verification varies them freely;
  the conventional ``E = D / H`` is chosen (and checked) when the layer is declared.
"""
from __future__ import annotations

import sympy as sp

from .deltas import Bracket
from .errors import ShapeError
from .layers import B, Layer, Loss, _check_width
from .primitives import LogSumExp
from .tensor import index, shape_str

b, t, u, v, c, e, h, o, k = (index(n) for n in "b t u v c e h o k".split())


def gelu(x):
    """GELU, the tanh form of Hendrycks & Gimpel (GPT-2's, PyTorch's ``approximate='tanh'``):
    x/2 · (1 + tanh(√(2/π) (x + 0.044715 x³)))."""
    return x / 2 * (1 + sp.tanh(sp.sqrt(2 / sp.pi) * (x + sp.Rational(44715, 1000000) * x ** 3)))


def _sequence(d, x, what):
    if x.rank != 3:
        raise ShapeError(f"layer {d.layer} ({what}) expects a (batch, time, features) input, "
                         f"got {x.name} {shape_str(x.shape)}")
    return x.shape[1], x.shape[2]


class PositionEmbedding(Layer):
    """p[b, t, o] = x[b, t, o] + P[t, o]: a learned vector per position, added to each token's."""

    has_params = True
    name = "position_embedding"
    doc_example = staticmethod(lambda: _small_model([PositionEmbedding()]))

    def build(self, d, x):
        T, D = _sequence(d, x, self.name)
        P = d.param("P", (T, D), init="normal")
        P.latex = rf"P^{{({d.level})}}"
        out = d.tensor("p", x.shape, meta=dict(x.meta))
        return d.define(out, (b, t, o), x[b, t, o] + P[t, o], note="token embedding plus position embedding")


class CausalSelfAttention(Layer):
    """Causal multi-head self-attention (Vaswani et al. 2017; GPT's masked form), heads as an index:

    Q = X W_q, K = X W_k, V = X W_v per head; S = Q Kᵀ / √E; A = softmax over u ≤ t of S (zero for
    u > t); O = A V; Y = Σ_h O_h W_o,h + b_o."""

    has_params = True
    name = "causal_attention"
    doc_example = staticmethod(lambda: _small_model([CausalSelfAttention(2)]))

    def __init__(self, heads: int):
        _check_width(heads, "causal_attention: heads")
        self.heads = heads

    def describe(self):
        return f"causal_attention({self.heads})"

    def build(self, d, x):
        T, D = _sequence(d, x, "causal attention")
        value = sp.sympify(D).subs(d.size_values)
        width = int(value) if value.is_Integer else None
        if width is not None and width % self.heads:
            raise ShapeError(f"layer {d.layer} (causal attention): {self.heads} heads do not divide the "
                             f"model width {width} of {x.name} {shape_str(x.shape)}")
        H = d.size("H", self.heads)
        E = d.size("E", width // self.heads if width else 1)
        Wq, Wk, Wv = (d.param(n, (D, H, E)) for n in ("Wq", "Wk", "Wv"))
        Wo, bo = d.param("Wo", (H, E, D)), d.param("bo", (D,), init="zeros")
        lvl = f"^{{({d.level})}}"
        for w, s in ((Wq, "Q"), (Wk, "K"), (Wv, "V"), (Wo, "O")):
            w.latex = rf"W_{{{s}}}{lvl}"
        bo.latex = rf"b_{{O}}{lvl}"
        Q, K, V = (d.tensor(n, (B, H, T, E), latex=n + lvl) for n in "QKV")
        for out, W, what in ((Q, Wq, "query"), (K, Wk, "key"), (V, Wv, "value")):
            d.define(out, (b, h, t, e), sp.Sum(x[b, t, c] * W[c, h, e], (c, 0, D - 1)),
                     note=f"the {what} of every position, per head")
        S = d.tensor("S", (B, H, T, T), latex="S" + lvl)
        d.define(S, (b, h, t, u), sp.Sum(Q[b, h, t, e] * K[b, h, u, e], (e, 0, E - 1)) / sp.sqrt(E),
                 note="scores: the query at t against the key at u, scaled by the root of the head width")
        A = d.tensor("A", (B, H, T, T), latex="A" + lvl)
        d.define(A, (b, h, t, u), Bracket(u, 0, t) * sp.exp(S[b, h, t, u] - LogSumExp(S[b, h, t, v], (v, 0, t))),
                 note="causal softmax: position t attends to the positions u ≤ t only")
        O = d.tensor("O", (B, H, T, E), latex="O" + lvl)
        d.define(O, (b, h, t, e), sp.Sum(A[b, h, t, u] * V[b, h, u, e], (u, 0, T - 1)),
                 note="each head's output: the attention-weighted values")
        y = d.tensor("y", (B, T, D), meta=dict(x.meta))
        return d.define(y, (b, t, o), sp.Sum(O[b, h, t, e] * Wo[h, e, o], (h, 0, H - 1), (e, 0, E - 1)) + bo[o],
                        note="the heads' outputs projected back to the model width and summed")


class NextTokenCrossEntropy(Loss):
    """ℓ_b = -(1/T) Σ_t Σ_k y[b, t, k] (z[b, t, k] - LSE_m z[b, t, m]): softmax cross-entropy at every
    position against the next token (one-hot ``y``), averaged over the positions."""

    def __init__(self):
        super().__init__("next_token_cross_entropy", fn=None, simplex=True,
                         label="next-token softmax cross-entropy")

    def build(self, d, z):
        if z.rank != 3:
            raise ShapeError(f"layer {d.layer} (next-token cross-entropy) expects (batch, time, vocabulary) "
                             f"logits, got {z.name} {shape_str(z.shape)}")
        T, V = z.shape[1], z.shape[2]
        y = d.tensor("y", z.shape, role="target", simplex_axis=2)
        loss = d.tensor("l", (B,), role="loss", latex=r"\ell")
        m = index("m")
        logp = z[b, t, k] - LogSumExp(z[b, t, m], (m, 0, V - 1))
        d.define(loss, (b,), -sp.Sum(y[b, t, k] * logp, (k, 0, V - 1), (t, 0, T - 1)) / T,
                 note="next-token cross-entropy, averaged over the positions")
        p = d.tensor("p", z.shape, latex="p")
        d.define(p, (b, t, k), sp.exp(logp), note="predicted next-token probabilities")
        return y, loss, [p]



def transformer_block(width: int, heads: int, hidden: int | None = None) -> list:
    """One pre-norm transformer block (GPT-2's order) as two residual branches:
    x + attention(LN(x)), then x + W₂ GELU(W₁ LN(x) + b₁) + b₂."""
    from .functional import Residual
    from .layers import Activation, Dense, LayerNorm
    return [Residual([LayerNorm(), CausalSelfAttention(heads)]),
            Residual([LayerNorm(), Dense(hidden or 4 * width), Activation("gelu", gelu), Dense(width)])]


def _small_model(layers, vocab=5, context=3, width=4):
    """The model a layer's documentation page derives: token embedding, the layer, a projection to the
    vocabulary, next-token cross-entropy, at small sizes."""
    from .layers import Dense, SequenceInput, sequential
    from .sequence import Embedding
    return sequential(SequenceInput(context, vocab=vocab), [Embedding(width), *layers, Dense(vocab)],
                      NextTokenCrossEntropy(), name=f"{layers[0].name} example")


def gpt(vocab: int, context: int, width: int = 64, heads: int = 4, layers: int = 2, hidden=None, name="gpt"):
    """A small GPT: token and position embeddings, ``layers`` transformer blocks, a final layer norm,
    a projection to the vocabulary, and the next-token cross-entropy. Input: (batch, context) token
    ids; target: the one-hot next token at every position."""
    from .layers import Dense, LayerNorm, SequenceInput, sequential
    from .sequence import Embedding
    _check_width(width, "gpt: width")
    _check_width(heads, "gpt: heads")
    if width % heads:
        raise ShapeError(f"gpt: {heads} heads do not divide the model width {width}")
    stack = [Embedding(width), PositionEmbedding()]
    for _ in range(layers):
        stack += transformer_block(width, heads, hidden)
    stack += [LayerNorm(), Dense(vocab)]
    return sequential(SequenceInput(context, vocab=vocab), stack, NextTokenCrossEntropy(), name=name)
