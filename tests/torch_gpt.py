"""The GPT of ``chainrule.derive.attention`` written again in PyTorch, as an independent reference
for the tests (PyTorch is a test extra, never a dependency of chainrule). It reads chainrule's
parameters by their position in ``CompiledModel.param_names`` and uses PyTorch's own layers:
``F.layer_norm``, ``masked_fill`` of the future with -inf then ``softmax``, ``F.gelu(approximate=
"tanh")``, ``F.log_softmax``; none of chainrule's derived formulas."""
from __future__ import annotations

PER_BLOCK = 13      # LN γ β, Wq Wk Wv Wo bo, LN γ β, W1 b1 W2 b2


def block(torch, P: dict, names: list, x):
    """One pre-norm transformer block on x (B, T, D)."""
    F = torch.nn.functional
    g1, b1, wq, wk, wv, wo, bo, g2, b2, w1, c1, w2, c2 = names
    D, T = x.shape[-1], x.shape[1]
    h = F.layer_norm(x, (D,), P[g1], P[b1], eps=1e-5)
    q, k, v = (torch.einsum("btc,che->bhte", h, P[w]) for w in (wq, wk, wv))
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    a = torch.softmax(s.masked_fill(future, float("-inf")), dim=-1)
    x = x + torch.einsum("bhte,heo->bto", a @ v, P[wo]) + P[bo]
    h = F.layer_norm(x, (D,), P[g2], P[b2], eps=1e-5)
    return x + F.linear(F.gelu(F.linear(h, P[w1], P[c1]), approximate="tanh"), P[w2], P[c2])


def next_token_cost(torch, z, y):
    """Mean over examples and positions of the cross-entropy against (soft) targets y."""
    return -(y * torch.nn.functional.log_softmax(z, dim=-1)).sum(-1).mean()


def gpt_cost(torch, P: dict, names: list, ids, y, tied=False):
    """gpt(): token and position embeddings, the blocks, a final layer norm, the vocabulary head (with
    ``tied``: ``F.linear`` by the token-embedding table itself, no bias: PyTorch's autograd then sums
    the gradients of its two uses)."""
    F = torch.nn.functional
    emb, pos, *rest = names
    head = 2 if tied else 4
    x = P[emb][ids] + P[pos][:ids.shape[1]]
    n_blocks = (len(rest) - head) // PER_BLOCK
    assert len(rest) == n_blocks * PER_BLOCK + head
    for k in range(n_blocks):
        x = block(torch, P, rest[k * PER_BLOCK:(k + 1) * PER_BLOCK], x)
    g, b, *out = rest[n_blocks * PER_BLOCK:]
    h = F.layer_norm(x, (x.shape[-1],), P[g], P[b], eps=1e-5)
    z = F.linear(h, P[emb]) if tied else F.linear(h, P[out[0]], P[out[1]])
    return next_token_cost(torch, z, y)
