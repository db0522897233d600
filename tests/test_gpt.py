"""Causal multi-head self-attention and the GPT built from it: the derived adjoints in textbook form,
the causal mask's exactly-zero gradient, exact verification, the generated kernels against finite
differences and against PyTorch autograd, and a short training run whose loss falls."""
import numpy as np
import pytest
import sympy as sp

from corpus import causal_attention
from chainrule.derive import derive
from chainrule.derive.errors import ShapeError
from chainrule.derive.numeric import IndexEvaluator
from chainrule.derive.tensor import index
from chainrule.derive.verify import verify_model

b, h, t, u, e = (index(n) for n in "b h t u e".split())
t_, u_ = index("t'"), index("u'")


@pytest.fixture(scope="module")
def attention():
    model = causal_attention()
    return model, derive(model, wrt=["x"])


def _tensors(model, grads):
    ts = {n: model.tensors[n + "1"] for n in "Q K V S A O".split()}
    ds = {n: grads.derivations[n + "1"].adjoint for n in "Q K V S A O".split()}
    return ts, ds


def test_attention_adjoints_are_the_textbook_steps(attention):
    """dA = dO Vᵀ, dS = A ⊙ (dA − rowsum(A ⊙ dA)), dV = Aᵀ dO, dQ = dS K/√E, dK = dSᵀ Q/√E, per
    batch element and head, exactly as SymPy expressions (heads an index, not copies)."""
    model, grads = attention
    ts, ds = _tensors(model, grads)
    A, Q, K, V = ts["A"], ts["Q"], ts["K"], ts["V"]
    T, E = A.shape[3], Q.shape[3]
    got = {n: grads.derivations[n + "1"].equation.body for n in "A S V Q K".split()}
    dA, dO, dS = ds["A"], ds["O"], ds["S"]
    assert got["A"] == sp.Sum(V[b, h, u, e] * dO[b, h, t, e], (e, 0, E - 1))
    assert got["S"] == A[b, h, t, u] * (dA[b, h, t, u] - sp.Sum(A[b, h, t, u_] * dA[b, h, t, u_], (u_, 0, T - 1)))
    assert got["V"] == sp.Sum(A[b, h, t_, t] * dO[b, h, t_, e], (t_, 0, T - 1))
    assert got["Q"] == sp.Sum(K[b, h, u, e] * dS[b, h, t, u], (u, 0, T - 1)) / sp.sqrt(E)
    assert got["K"] == sp.Sum(Q[b, h, t_, e] * dS[b, h, t_, t], (t_, 0, T - 1)) / sp.sqrt(E)
    rules = [s.rule for s in grads.derivations["S1"].steps]
    assert "masked forward result" in rules


def test_masked_scores_get_exactly_zero_gradient(attention):
    """Evaluate the declared A and the derived dS at random S and random upstream dA: dS[t, u] is
    exactly 0 for every u > t (the mask's bracket is a factor of A), and nonzero for u ≤ t (except
    t = u = 0, a softmax over one element)."""
    model, grads = attention
    ts, ds = _tensors(model, grads)
    sizes = {s: v for s, v in model.size_values.items()}
    B_, H_, T_ = 3, int(ts["A"].shape[1].subs(sizes)), int(ts["A"].shape[2].subs(sizes))
    from chainrule.derive.layers import B
    rng = np.random.default_rng(0)
    env = {"S1": rng.normal(size=(B_, H_, T_, T_)), "d_A1": rng.normal(size=(B_, H_, T_, T_))}
    ev = IndexEvaluator(env, {**sizes, B: B_})
    A_eq = next(q for q in model.equations if q.out.name == "A1")
    env["A1"] = np.array([[[[ev.value(A_eq.body, dict(zip(A_eq.indices, (i, j, k, m))))
                             for m in range(T_)] for k in range(T_)] for j in range(H_)] for i in range(B_)])
    dS_eq = grads.derivations["S1"].equation
    dS = np.array([[[[ev.value(dS_eq.body, dict(zip(dS_eq.indices, (i, j, k, m))))
                      for m in range(T_)] for k in range(T_)] for j in range(H_)] for i in range(B_)])
    future = np.triu(np.ones((T_, T_), dtype=bool), k=1)
    assert T_ == 4 and future.sum() == 6
    assert np.all(dS[..., future] == 0.0)
    past = ~future
    past[0, 0] = False          # the first row attends to itself only: A = 1 there and dS = dA - dA = 0
    assert np.all(dS[..., past] != 0.0) and np.all(dS[..., 0, 0] == 0.0)
    np.testing.assert_allclose(env["A1"].sum(axis=3), 1.0, rtol=1e-12)      # rows sum to one
    assert np.all(env["A1"][..., future] == 0.0)


def test_multihead_attention_verifies_exactly_at_sizes_not_two(attention):
    model, grads = attention
    sizes = [{"B": 1, "T_0": 4, "n_0": 3, "H_1": 5, "E_1": 1},
             {"B": 3, "T_0": 3, "n_0": 1, "H_1": 4, "E_1": 5}]
    checks = verify_model(model, grads, sizes=sizes, points=1)
    assert {c.name.split("dC/d")[1] for c in checks} == {"Wq1", "Wk1", "Wv1", "Wo1", "bo1", "x"}
    assert all(checks), [str(c) for c in checks if not c]
    assert all(c.checked > 0 for c in checks)


def test_heads_must_divide_the_width():
    from corpus import causal_attention as build
    with pytest.raises(ShapeError, match="4 heads do not divide the model width 6 of x"):
        build(T=3, D=6, H=4)


# -- kernels ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def attention_kernels(compiled_declared):
    return compiled_declared("causal-attention", causal_attention)


def test_attention_contractions_are_one_blas_call_per_batch_and_head(attention_kernels):
    src = attention_kernels.source
    for out in ("S1", "O1", "d_A1", "d_V1", "d_Q1", "d_K1"):
        head = f"# {out}[b,h,"
        start = src.index(head, src.index("def loss_and_grads"))
        lines = src[start:start + 800].splitlines()[:8]
        assert any("one matrix product per batch element (b, h)" in ln for ln in lines), (out, lines)
        assert any("np.dot(" in ln for ln in lines), (out, lines)


@pytest.mark.slow
def test_attention_kernels_match_finite_differences(attention_kernels):
    from chainrule.codegen.verify import check_gradients
    checks = check_gradients(attention_kernels.model, compiled=attention_kernels, batch=3)
    assert len(checks) == 5 and all(c.ok for c in checks), [str(c) for c in checks]


@pytest.mark.slow
def test_attention_kernels_match_pytorch(attention_kernels):
    """The same attention in PyTorch (masked_fill of the future with -inf, softmax, the usual
    reshape of heads), float64: forward and every parameter gradient."""
    torch = pytest.importorskip("torch")
    cm = attention_kernels
    rng = np.random.default_rng(3)
    params = {k: v + 0.1 * rng.normal(size=v.shape) for k, v in cm.init_params(1).items()}
    x = rng.normal(size=(5, 4, 6))
    y = rng.normal(size=(5, 4, 6))
    cost, grads = cm.loss_and_grads(params, x, y)
    P = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    X = torch.tensor(x)
    q, k, v = (torch.einsum("btc,che->bhte", X, P[n]) for n in ("Wq1", "Wk1", "Wv1"))
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    future = torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1)
    a = torch.softmax(s.masked_fill(future, float("-inf")), dim=-1)
    o = torch.einsum("bhtu,bhue->bhte", a, v)
    out = torch.einsum("bhte,heo->bto", o, P["Wo1"]) + P["bo1"]
    ref = ((out - torch.tensor(y)) ** 2).sum() / 5
    ref.backward()
    np.testing.assert_allclose(cm.predict(params, x), out.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert cost == pytest.approx(ref.item(), rel=1e-10)
    for name in params:
        np.testing.assert_allclose(grads[name], P[name].grad.numpy(), rtol=1e-8, atol=1e-10, err_msg=name)


def test_the_explanation_names_the_softmax_jacobian_and_the_causal_limit(attention):
    from chainrule.derive.patterns import describe
    model, grads = attention
    tensors = {**model.tensors, **{a.name: a for a in grads.adjoints.values()}}
    said = describe(grads.derivations["S1"].equation, tensors, lambda e: f"${sp.latex(e)}$")
    assert len(said) == 1 and "Jacobian-vector product" in said[0]
    assert "every weight of a row shares one normaliser" in said[0]
    A = next(q for q in model.equations if q.out.name == "A1")
    assert r"\operatorname{LSE}_{v=0}^{t}" in sp.latex(A.body) and r"\left[0 \le u \le t\right]" in sp.latex(A.body)


# -- the GPT ----------------------------------------------------------------------------------------
def test_gpt_declares_heads_that_divide_the_width():
    from chainrule.derive.attention import gpt
    with pytest.raises(ShapeError, match="gpt: 3 heads do not divide the model width 8"):
        gpt(5, 4, width=8, heads=3)


def test_char_windows_are_next_token_one_hots():
    from chainrule.runtime.text import CharCodec, load_pydoc_text, windows
    text = load_pydoc_text()
    codec = CharCodec.of(text)
    assert codec.vocab > 90 and codec.decode(codec.encode(text[:500])) == text[:500]
    ids = codec.encode(text[:1000])
    x, y = windows(ids, [3, 100], 7, codec.vocab)
    assert x.shape == (2, 7) and y.shape == (2, 7, codec.vocab)
    assert np.array_equal(x[1], ids[100:107]) and np.array_equal(y[1].argmax(axis=1), ids[101:108])
    assert np.all(y.sum(axis=2) == 1.0)
    with pytest.raises(ShapeError, match="outside the vocabulary"):
        codec.encode("\x00")


def test_char_gpt_is_a_named_example():
    from chainrule.runtime.examples import EXAMPLES
    assert EXAMPLES["char-gpt"].data == "pydoc"


@pytest.fixture(scope="module")
def tiny_gpt(compiled_declared):
    from chainrule.derive.attention import gpt
    return compiled_declared("tiny-gpt", lambda: gpt(5, 4, width=6, heads=3, layers=1))


@pytest.mark.slow
def test_gpt_kernels_match_finite_differences(tiny_gpt):
    """Every parameter of a one-block GPT (embeddings, layer norms, attention, GELU feed-forward,
    the output projection) against central differences of the generated cost."""
    from chainrule.codegen.verify import check_gradients
    src = tiny_gpt.source
    start = src.index("# d_E1[", src.index("def loss_and_grads"))
    assert "# scatter: the condition" in src[start:start + 500]      # no loop over the vocabulary
    checks = check_gradients(tiny_gpt.model, compiled=tiny_gpt, batch=3)
    assert len(checks) == 19 and all(c.ok for c in checks), [str(c) for c in checks if not c.ok]


@pytest.mark.slow
def test_gpt_training_loss_falls(tiny_gpt):
    """Adam on a repeating token pattern: the loss falls well below log(5) (uniform guessing)."""
    cm = tiny_gpt
    params = cm.init_params(0)
    from chainrule.codegen import compile_model
    adam = compile_model(cm.model, optimizer="adam", cache_dir=cm.module_path.parent)
    state = adam.init_state()
    ids = np.array([0, 1, 2, 3, 4, 2, 1] * 20)
    from chainrule.runtime.text import windows
    rng = np.random.default_rng(0)
    losses = []
    for step in range(1, 151):
        x, y = windows(ids, rng.integers(0, len(ids) - 6, size=8), 4, 5)
        losses.append(adam.train_step(params, x, y, lr=0.01, state=state, step=step))
    assert losses[0] > 1.4 and np.mean(losses[-10:]) < 0.6 * losses[0], (losses[0], losses[-10:])


# -- against an independent reference: the same architecture written in PyTorch ---------------------
def _perturbed(cm, seed):
    """Initial parameters moved off their special values (γ = 1, β = 0, zero biases), so that no
    gradient is trivially zero or symmetric."""
    rng = np.random.default_rng(seed)
    return {k: v + 0.3 * rng.normal(size=v.shape) for k, v in cm.init_params(seed).items()}


def _soft_targets(rng, shape):
    """Probability vectors (the declared simplex fact), not one-hots: every logit gets a gradient."""
    p = rng.random(shape) + 0.05
    return p / p.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def block_kernels(kernel_cache_dir):
    """One transformer block on a (B, T, D) float sequence, a vocabulary head and the next-token
    cost, with the input gradient. Sizes all distinct and not 2: T=5, D=12, heads 3 of width 4,
    feed-forward 7, vocabulary 9 (batch 6 in the test)."""
    from chainrule.codegen import compile_model
    from chainrule.derive.attention import NextTokenCrossEntropy, transformer_block
    from chainrule.derive.layers import Dense, SequenceInput, sequential
    model = sequential(SequenceInput(5, features=12), [*transformer_block(12, 3, hidden=7), Dense(9)],
                       NextTokenCrossEntropy(), name="one block")
    return compile_model(model, cache_dir=kernel_cache_dir, input_grads=True)


@pytest.mark.slow
def test_transformer_block_gradients_match_pytorch(block_kernels):
    """float64: the cost, all 15 parameter gradients and the gradient of the block's input agree
    with PyTorch autograd on the block written with PyTorch's layers (tests/torch_gpt.py)."""
    torch = pytest.importorskip("torch")
    import torch_gpt
    cm = block_kernels
    rng = np.random.default_rng(7)
    params = _perturbed(cm, 1)
    x, y = rng.normal(size=(6, 5, 12)), _soft_targets(rng, (6, 5, 9))
    cost, grads = cm.loss_and_grads(params, x, y)
    cost_x, dx = cm.input_grads(params, x, y)
    P = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    X = torch.tensor(x, requires_grad=True)
    names = cm.param_names
    z = torch.nn.functional.linear(torch_gpt.block(torch, P, names[:13], X), P[names[13]], P[names[14]])
    ref = torch_gpt.next_token_cost(torch, z, torch.tensor(y))
    ref.backward()
    assert len(names) == 15
    assert cost == pytest.approx(ref.item(), rel=1e-12) and cost_x == pytest.approx(cost, rel=1e-14)
    for name in names:
        np.testing.assert_allclose(grads[name], P[name].grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=name)
        assert np.abs(grads[name]).max() > 1e-6, name              # compared something nonzero
    np.testing.assert_allclose(dx["x"], X.grad.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_small_gpt_gradients_match_pytorch(tiny_gpt):
    """The whole one-block gpt() (embeddings, block, final layer norm, head): cost and all 19
    parameter gradients against PyTorch autograd, float64, batch 3."""
    torch = pytest.importorskip("torch")
    import torch_gpt
    cm = tiny_gpt
    rng = np.random.default_rng(11)
    params = _perturbed(cm, 2)
    ids = rng.integers(0, 5, size=(3, 4))
    y = _soft_targets(rng, (3, 4, 5))
    cost, grads = cm.loss_and_grads(params, ids.astype(np.float64), y)
    P = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    ref = torch_gpt.gpt_cost(torch, P, cm.param_names, torch.tensor(ids), torch.tensor(y))
    ref.backward()
    assert len(cm.param_names) == 19
    assert cost == pytest.approx(ref.item(), rel=1e-12)
    for name in cm.param_names:
        np.testing.assert_allclose(grads[name], P[name].grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=name)
