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
    """p[b, t, o] = x[b, t, o] + P[t, o]: a learned vector per position, added to each token's.

    ``positions``: the rows of the table P (default: the input's length). A model may read fewer
    positions than its table holds (GPT's context up to its table's length); never more: a context
    longer than the table is an error when the model is declared."""

    has_params = True
    name = "position_embedding"
    doc_example = staticmethod(lambda: _small_model([PositionEmbedding()]))

    def __init__(self, positions: int | None = None):
        if positions is not None:
            _check_width(positions, "position_embedding: positions")
        self.positions = positions

    def describe(self):
        return self.name if self.positions is None else f"{self.name}({self.positions})"

    def build(self, d, x):
        T, D = _sequence(d, x, self.name)
        rows = T
        if self.positions is not None:
            context = int(sp.sympify(T).xreplace(d.size_values))
            if context > self.positions:
                raise ShapeError(
                    f"layer {d.layer}: the input {x.name} {shape_str(x.shape, d.size_values)} has a context "
                    f"of {context} positions, longer than the position table P{d.level} "
                    f"{shape_str((self.positions, D), d.size_values)} of {self.positions}: declare a "
                    f"context of at most {self.positions}, or a table of at least {context} positions")
            if context < self.positions:      # the T positions read plus K unread: T ≤ rows provably
                rows = T + d.size("K", self.positions - context)
        P = d.param("P", (rows, D), init="normal")
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
            raise ShapeError(f"layer {d.layer}: {self.heads} heads do not divide the model width {width} of "
                             f"its input {x.name} {shape_str(x.shape, d.size_values)}: the queries, keys and "
                             f"values (B, heads, T, width / heads) need a whole head width")
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


class TiedOutput(Layer):
    """z[b, t, k] = Σ_o h[b, t, o] E[k, o]: logits that read the token-embedding table E of
    ``embedding`` transposed (weight tying, Press & Wolf 2017; GPT-2's output layer, no bias). E then
    has two uses, the row each token selects and this projection, and its derived gradient is the sum
    of the two contributions."""

    has_params = True       # a level of its own (the names z^(l)), though its one weight is E
    name = "tied_output"
    doc_example = staticmethod(lambda: _tied_small_model())

    def __init__(self, embedding):
        from .sequence import Embedding
        if not isinstance(embedding, Embedding):
            raise TypeError(f"tied_output reads the table of an Embedding layer, got {embedding!r}")
        self.embedding = embedding

    def describe(self):
        return f"tied_output({self.embedding.describe()})"

    def build(self, d, x):
        T, D = _sequence(d, x, self.name)
        E = d.param_of(self.embedding, "E")
        V, width = E.shape
        features, row = (sp.sympify(n).xreplace(d.size_values) for n in (D, width))
        if features != row:
            raise ShapeError(f"layer {d.layer}: its input {x.name} {shape_str(x.shape, d.size_values)} has "
                             f"{features} features but the token-embedding table {E.name} "
                             f"{shape_str(E.shape, d.size_values)} it reads transposed has rows of {row}: "
                             f"tying needs one width")
        d.unify_sizes(E.shape[1:], (D,))
        z = d.tensor("z", (B, T, V), meta=dict(x.meta))
        return d.define(z, (b, t, k), sp.Sum(x[b, t, o] * E[k, o], (o, 0, width - 1)),
                        note="logits: the final features against every token's embedding (the table "
                             "transposed, tied to the input's)")


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


def _tied_small_model():
    """The tied output's documentation model: token and position embeddings, a layer norm, the
    projection through the embedding's table."""
    from .layers import LayerNorm, SequenceInput, sequential
    from .sequence import Embedding
    emb = Embedding(4)
    return sequential(SequenceInput(3, vocab=5), [emb, PositionEmbedding(), LayerNorm(), TiedOutput(emb)],
                      NextTokenCrossEntropy(), name="tied_output example")


def gpt(vocab: int, context: int, width: int = 64, heads: int = 4, layers: int = 2, hidden=None, name="gpt",
        tie_embeddings: bool = False, positions: int | None = None):
    """A small GPT: token and position embeddings, ``layers`` transformer blocks, a final layer norm,
    a projection to the vocabulary, and the next-token cross-entropy. Input: (batch, context) token
    ids; target: the one-hot next token at every position.

    ``tie_embeddings``: the projection to the vocabulary is the token-embedding table transposed
    (``TiedOutput``, no bias), not a dense layer of its own. ``positions``: the rows of the position
    table (default ``context``; a longer table lets one set of weights run at shorter contexts)."""
    from .layers import Dense, LayerNorm, SequenceInput, sequential
    from .sequence import Embedding
    _check_width(width, "gpt: width")
    _check_width(heads, "gpt: heads")
    embedding = Embedding(width)
    stack = [embedding, PositionEmbedding(positions)]
    for _ in range(layers):
        stack += transformer_block(width, heads, hidden)
    stack += [LayerNorm(), TiedOutput(embedding) if tie_embeddings else Dense(vocab)]
    return sequential(SequenceInput(context, vocab=vocab), stack, NextTokenCrossEntropy(), name=name)
