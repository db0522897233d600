"""Causal multi-head self-attention and the GPT built from it: the derived adjoints in textbook form,
the causal mask's exactly-zero gradient, exact verification, the generated kernels against finite
differences and against PyTorch autograd, and a short training run whose loss falls."""
import re

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
    with pytest.raises(ShapeError, match=r"^layer 1:causal_attention: 4 heads do not divide the model width 6 of "
                                         r"its input x \(B, 3, 6\): the queries, keys and values \(B, heads, T, "
                                         r"width / heads\) need a whole head width$"):
        build(T=3, D=6, H=4)


def test_attention_matrix_forms_are_per_example_and_head(attention):
    """The explanation lifts the rank-4 tensors (B, H, T, E) to one matrix per example and head, by
    the engine's patterns: S = Q Kᵀ/√E, O = A V, dA = dO Vᵀ, dS = A ⊙ (dA − (A ⊙ dA) 1 1ᵀ) (the row
    sum as a product with ones), dV = Aᵀ dO, dQ = dS K/√E, dK = dSᵀ Q/√E, and the heads' sum of the
    output projection kept as a sum; each printed form agrees numerically with its index form at two
    size assignments (sizes distinct, none 2)."""
    from chainrule.derive import explain_model
    from chainrule.derive.matrix import check_sizes, random_env
    model, grads = attention
    doc = explain_model(model, grads)
    forms = {}
    for f in doc.matrix_forms:
        forms.setdefault(f.eq.out.name, f)
    d = lambda n: rf"\left(\frac{{\partial C}}{{\partial {n}^{{(1)}}}}\right)_{{h}}"     # noqa: E731
    root = r"\frac{1}{\sqrt{E_{1}}}"
    want = {
        "S1": rf"{root} \left(Q^{{(1)}}_{{h}} {{K^{{(1)}}_{{h}}}}^{{\top}}\right)",
        "O1": r"A^{(1)}_{h} V^{(1)}_{h}",
        "y1": r"\sum_{h=0}^{H_{1} - 1} O^{(1)}_{h} {W_{O}^{(1)}}_{h} + \mathbf{1} b_{O}^{(1)\top}",
        "d_A1": rf"{d('O')} {{V^{{(1)}}_{{h}}}}^{{\top}}",
        "d_S1": (rf"A^{{(1)}}_{{h}} \odot \left({d('A')} - \left(\left(A^{{(1)}}_{{h}} \odot {d('A')}\right) "
                 rf"\mathbf{{1}}\right) \mathbf{{1}}^{{\top}}\right)"),
        "d_V1": rf"{{A^{{(1)}}_{{h}}}}^{{\top}} {d('O')}",
        "d_Q1": rf"{root} \left({d('S')} K^{{(1)}}_{{h}}\right)",
        "d_K1": rf"{root} \left({{{d('S')}}}^{{\top}} Q^{{(1)}}_{{h}}\right)",
    }
    for name, rhs in want.items():
        assert forms[name].rhs == rhs, (name, forms[name].rhs)
        assert set(forms[name].fixed) == ({b, h} if name != "y1" else {b})
    md = doc.to_markdown()
    assert ("For each example and each $h$ of the $B \\times H_{1} \\times T_{0} \\times T_{0}$ tensor, "
            "shape $T_{0} \\times T_{0}$:") in md
    assert "- $\\mathbf{1}$ is the vector of $T_{0}$ ones: multiplying by it sums over $u'$" in md
    rng = np.random.default_rng(4)
    tensors = {**model.tensors, **{a.name: a for a in grads.adjoints.values()}}
    for name in want:
        form = forms[name]
        for sizes in check_sizes(form.eq, tensors, count=4)[2:]:
            assert len(set(sizes.values())) == len(sizes) and 2 not in sizes.values()
            env = random_env(form.eq, tensors, sizes, rng)
            at = {i: 1 for i in form.fixed}
            got, ref = form.evaluate(env, sizes, at), form.reference(env, sizes, at)
            assert ref.size > 1 and got.shape == ref.shape
            np.testing.assert_allclose(got, ref, rtol=1e-10, err_msg=name)


# -- kernels ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def attention_kernels(compiled_declared):
    return compiled_declared("causal-attention", causal_attention)


def _function(src, name):
    start = src.index(f"def {name}(")
    end = src.find("\ndef ", start + 1)
    return src[start:end if end > 0 else len(src)]


def test_attention_runs_per_batch_and_head_in_one_loop_with_blas_products(attention_kernels):
    """The forward run (S, A, O) and the backward run (dA, dS, dV, dK, dQ) are each one loop over
    (b, h): every contraction there is one _matmul_into on the slices, written into its slice (the 1/√E
    of S, dK and dQ scales it in place: no temporary), and the scores, dA and dS, which nothing
    after the run reads, are one (T, T) slice reused, never a (B, H, T, T) array."""
    src = _function(attention_kernels.source, "loss_and_grads")
    scale = "*= 0.7071067811865476"
    runs = {"# one loop over (b, h): S1; A1; O1, each slice computed while its data is in cache":
            {"S1": ["_matmul_into(t6_Q1_s, t7_K1_s.T, t9_S1_s)", f"t9_S1_s {scale}"],
             "O1": ["_matmul_into(t10_A1_s, t8_V1_s, t11_O1_s)"]},
            "# one loop over (b, h): d_A1; d_S1; d_V1; d_K1; d_Q1, each slice computed while its data is in cache":
            {"d_A1": ["_matmul_into(t16_d_O1_s, t8_V1_s.T, t17_d_A1_s)"],
             "d_V1": ["_matmul_into(t10_A1_s.T, t16_d_O1_s, t19_d_V1_s)"],
             "d_K1": ["_matmul_into(t18_d_S1_s.T, t6_Q1_s, t20_d_K1_s)", f"t20_d_K1_s {scale}"],
             "d_Q1": ["_matmul_into(t18_d_S1_s, t7_K1_s, t21_d_Q1_s)", f"t21_d_Q1_s {scale}"]}}
    for heading, products in runs.items():
        start = src.index(heading)
        run = src[start:src.index("\n    # ", src.index("\n    for s", start) + 1)]
        for out, calls in products.items():     # each product right below its equation
            lines = run[run.index(f"# {out}__slice["):].splitlines()
            assert [ln.strip() for ln in lines[1:1 + len(calls)]] == calls, (out, lines[:3])
        assert run.count("_matmul_into(") == len(products)
    for scratch in ("S1", "d_A1", "d_S1"):
        assert re.search(rf"t\d+_{scratch}_s = np.empty\(\(4, 4\), dtype=DT\)  # {scratch}: one slice at a "
                         rf"time, read by nothing after", src), scratch
        assert not re.search(rf"t\d+_{scratch} = np.empty", src), scratch
    # the weights, read by the backward, are a whole array written slice by slice
    assert "t10_A1 = np.empty((n_batch, 3, 4, 4), dtype=DT)" in src
    assert re.search(r"t10_A1_s = t10_A1\[s\d+, s\d+\]", src)


def test_attention_kernels_match_a_numpy_reference_and_finite_differences(attention_kernels):
    """The per-(b, h) loops compute what attention is: the output against NumPy written by hand
    (masked scores, softmax, heads), float64, batch 5; every gradient against central differences."""
    from chainrule.codegen.verify import check_gradients
    cm = attention_kernels
    rng = np.random.default_rng(7)
    params = {k: v + 0.1 * rng.normal(size=v.shape) for k, v in cm.init_params(1).items()}
    x = rng.normal(size=(5, 4, 6))
    q, k, v = (np.einsum("btc,che->bhte", x, params[n]) for n in ("Wq1", "Wk1", "Wv1"))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    s = np.where(np.triu(np.ones((4, 4), dtype=bool), k=1), -np.inf, s)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    out = np.einsum("bhte,heo->bto", a @ v, params["Wo1"]) + params["bo1"]
    np.testing.assert_allclose(cm.predict(params, x), out, rtol=1e-12, atol=1e-12)
    checks = check_gradients(cm.model, compiled=cm, batch=5)
    assert len(checks) == 5 and all(c.ok for c in checks), [str(c) for c in checks]


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
    """Refused when the model is declared, by the attention layer of the first block, with its input."""
    from chainrule.derive.attention import gpt
    with pytest.raises(ShapeError, match=r"^layer 3:residual\(layer_norm -> causal_attention\(3\)\)\.2:"
                                         r"causal_attention\(3\): 3 heads do not divide the model width 8 of "
                                         r"its input y3 \(B, 4, 8\)"):
        gpt(5, 4, width=8, heads=3)


def test_a_context_longer_than_the_position_table_is_refused_when_declared():
    from chainrule.derive.attention import gpt
    with pytest.raises(ShapeError, match=r"^layer 2:position_embedding\(6\): the input e1 \(B, 7, 8\) has a "
                                         r"context of 7 positions, longer than the position table P2 \(6, 8\) "
                                         r"of 6: declare a context of at most 6, or a table of at least 7 "
                                         r"positions$"):
        gpt(5, 7, width=8, heads=4, positions=6)


def test_a_position_table_longer_than_the_context_verifies_and_its_unread_rows_get_no_gradient():
    """P has T + K rows (K a size of its own, so T ≤ rows holds at every size verification picks);
    the derived gradient of a row t is guarded by t ≤ T - 1, and the whole model verifies exactly."""
    from chainrule.derive.attention import PositionEmbedding, _small_model
    from chainrule.derive.layers import B
    model = _small_model([PositionEmbedding(7)], vocab=5, context=4, width=3)
    P = model.tensors["P2"]
    T, n = model.tensors["x"].shape[1], model.tensors["e1"].shape[2]
    K = P.shape[0] - T
    assert model.size_values[K] == 3 and model.size_values[T] == 4
    grads = derive(model)
    dp = grads.adjoints["p2"]
    b_, o = index("b"), index("o")
    assert grads.derivations["P2"].equation.body == sp.Piecewise(
        (sp.Sum(dp[b_, t, o], (b_, 0, B - 1)), t <= T - 1), (0, True))
    checks = verify_model(model, grads, sizes=[{"B": 3, "T_0": 4, "K_2": 5, "V_0": 6, "n_1": 7, "n_3": 8},
                                               {"B": 4, "T_0": 3, "K_2": 1, "V_0": 5, "n_1": 6, "n_3": 7}], points=1)
    assert all(checks) and all(c.checked > 0 for c in checks), [str(c) for c in checks]


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


# -- a tied output projection: the token-embedding table read twice ----------------------------------
def test_a_tied_output_sums_the_embedding_tables_two_contributions():
    """z = h Eᵀ reads the table E that the tokens select rows of: its derived gradient is, exactly,
    the projection's Σ_bt δz[b, t, k] h[b, t, o] plus the selected rows' Σ_bt [k = x[b, t]] δe[b, t, o];
    the explanation names both uses; the whole model verifies exactly at two size assignments."""
    from chainrule.derive import explain_model
    from chainrule.derive.attention import _tied_small_model
    from chainrule.derive.layers import B
    model = _tied_small_model()
    assert [t.name for t in model.params] == ["E1", "P2", "gamma3", "beta3"]     # no weight of its own
    grads = derive(model)
    x, y3, T = model.tensors["x"], model.tensors["y3"], model.tensors["x"].shape[1]
    dz, de = grads.adjoints["z4"], grads.adjoints["e1"]
    b_, k, o = index("b"), index("k"), index("o")
    assert grads.derivations["E1"].equation.body == (
        sp.Sum(dz[b_, t, k] * y3[b_, t, o], (b_, 0, B - 1), (t, 0, T - 1))
        + sp.Sum(sp.Piecewise((de[b_, t, o], sp.Eq(k, x[b_, t])), (0, True)), (b_, 0, B - 1), (t, 0, T - 1)))
    md = explain_model(model, grads).to_markdown()
    assert "$E^{(1)}$ is used 2 times, so its adjoint is the sum of one contribution per use" in md
    assert "- through $e^{(1)}$ (the row of the table that each token selects)" in md
    assert "- through $z^{(4)}$ (logits: the final features against every token's embedding" in md
    checks = verify_model(model, grads, sizes=[{"B": 3, "T_0": 4, "V_0": 5, "n_1": 6},
                                               {"B": 4, "T_0": 5, "V_0": 7, "n_1": 3}], points=1)
    assert {c.name.split("dC/d")[1] for c in checks} == {"E1", "P2", "gamma3", "beta3"}
    assert all(checks) and all(c.checked > 0 for c in checks), [str(c) for c in checks]


def test_a_tied_output_needs_a_declared_embedding_of_its_width():
    from chainrule.derive.attention import NextTokenCrossEntropy, TiedOutput
    from chainrule.derive.layers import Dense, SequenceInput, sequential
    from chainrule.derive.sequence import Embedding
    emb = Embedding(4)
    with pytest.raises(ShapeError, match=r"^layer 3:tied_output\(embedding\(4\)\): its input z2 \(B, 3, 6\) has "
                                         r"6 features but the token-embedding table E1 \(5, 4\) it reads "
                                         r"transposed has rows of 4: tying needs one width$"):
        sequential(SequenceInput(3, vocab=5), [emb, Dense(6), TiedOutput(emb)], NextTokenCrossEntropy())
    with pytest.raises(ShapeError, match=r"^layer 2:tied_output\(embedding\(6\)\) reads a parameter of layer "
                                         r"embedding\(6\), which is not declared before it in this model$"):
        sequential(SequenceInput(3, vocab=5), [Embedding(6), TiedOutput(Embedding(6))], NextTokenCrossEntropy())


@pytest.fixture(scope="module")
def tied_kernels(compiled_declared):
    from chainrule.derive.attention import _tied_small_model
    return compiled_declared("tied-output", _tied_small_model)


def _torch_tied(torch, P, ids, y):
    """Embedding rows plus positions, layer norm, logits by the same table: F.linear(h, E)."""
    F = torch.nn.functional
    h = F.layer_norm(P["E1"][ids] + P["P2"], (P["E1"].shape[1],), P["gamma3"], P["beta3"], eps=1e-5)
    return -(y * F.log_softmax(F.linear(h, P["E1"]), dim=-1)).sum(-1).mean()


def test_tied_kernels_match_finite_differences_and_pytorch(tied_kernels):
    """The generated kernels: every gradient against central differences, and against PyTorch
    autograd on the same tied model (float64, batch 6, soft targets, perturbed parameters)."""
    from chainrule.codegen.verify import check_gradients
    cm = tied_kernels
    checks = check_gradients(cm.model, compiled=cm, batch=3)
    assert len(checks) == 4 and all(c.ok for c in checks), [str(c) for c in checks]
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    params = _perturbed(cm, 4)
    ids, y = rng.integers(0, 5, size=(6, 3)), _soft_targets(rng, (6, 3, 5))
    cost, grads = cm.loss_and_grads(params, ids.astype(np.float64), y)
    P = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    ref = _torch_tied(torch, P, torch.tensor(ids), torch.tensor(y))
    ref.backward()
    assert cost == pytest.approx(ref.item(), rel=1e-12)
    for name in cm.param_names:
        np.testing.assert_allclose(grads[name], P[name].grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=name)
        assert np.abs(grads[name]).max() > 1e-3, name


def test_a_longer_context_or_an_unknown_token_is_refused_naming_the_table(tied_kernels):
    """At run time: a context the model was not declared for names the position table it would
    overrun; a token id outside the vocabulary names the embedding layer and its table."""
    from chainrule.codegen.facts import FactError
    cm = tied_kernels
    params = cm.init_params(0)
    with pytest.raises(ShapeError, match=r"^input x has shape \(2, 5\), expected \(B, 3\) \(read by layer "
                                         r"1:embedding\(4\)\); axis 1 is the size T_0 = 3 the model was declared "
                                         r"with, which also shapes parameter P2 \(3, 4\) of layer "
                                         r"2:position_embedding: declare the model with T_0 = 5$"):
        cm.predict(params, np.zeros((2, 5)))
    with pytest.raises(FactError, match=r"^input x \(2, 3\) holds token id 5 at \[1, 0\], outside the vocabulary "
                                        r"\[0, 5\) of layer 1:embedding\(4\), whose table E1 \(5, 4\) has one row "
                                        r"per token; 1 entry is outside$"):
        cm.predict(params, np.array([[0, 1, 4], [5, 0, 0]]))
    assert cm.predict(params, np.array([[0, 1, 4], [4, 0, 0]])).shape == (2, 3, 5)


@pytest.fixture(scope="module")
def tied_gpt(compiled_declared):
    """A one-block gpt() with the tied output and a position table of 5 rows read at context 4."""
    from chainrule.derive.attention import gpt
    return compiled_declared("tied-gpt", lambda: gpt(7, 4, width=6, heads=3, layers=1, tie_embeddings=True,
                                                     positions=5))


@pytest.mark.slow
def test_tied_gpt_matches_finite_differences_and_pytorch(tied_gpt):
    """All 17 gradients of the tied one-block GPT against central differences and against PyTorch
    autograd (tests/torch_gpt.py with ``F.linear(h, E)``, the table sliced to the context), float64;
    the position table's unread row gets exactly zero."""
    torch = pytest.importorskip("torch")
    import torch_gpt
    from chainrule.codegen.verify import check_gradients
    cm = tied_gpt
    assert cm.param_shapes["P2"] == (5, 6) and len(cm.param_names) == 17
    checks = check_gradients(cm.model, compiled=cm, batch=3)
    assert len(checks) == 17 and all(c.ok for c in checks), [str(c) for c in checks if not c.ok]
    rng = np.random.default_rng(13)
    params = _perturbed(cm, 3)
    ids, y = rng.integers(0, 7, size=(3, 4)), _soft_targets(rng, (3, 4, 7))
    cost, grads = cm.loss_and_grads(params, ids.astype(np.float64), y)
    P = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    ref = torch_gpt.gpt_cost(torch, P, cm.param_names, torch.tensor(ids), torch.tensor(y), tied=True)
    ref.backward()
    assert cost == pytest.approx(ref.item(), rel=1e-12)
    for name in cm.param_names:
        np.testing.assert_allclose(grads[name], P[name].grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=name)
    assert np.all(grads["P2"][4] == 0.0) and np.abs(grads["P2"][:4]).min() > 0


@pytest.mark.slow
def test_the_char_gpt_run_prints_its_losses_a_sample_and_writes_the_curve(kernel_cache_dir, tmp_path):
    """train_char_gpt at small sizes (what `chainrule train char-gpt` runs): the validation loss at
    each evaluation, falling; a sample of the asked length from the pydoc characters; the PNG."""
    import io
    from chainrule.runtime.text import train_char_gpt
    out = io.StringIO()
    result = train_char_gpt(steps=40, context=8, width=8, heads=2, layers=1, batch=8, lr=1e-2, eval_every=20,
                            stream=out, sample_length=30, plot_path=tmp_path / "loss.png",
                            cache_dir=kernel_cache_dir, temperature=0.7, top_k=5)
    text = out.getvalue()
    assert [s for s, _ in result["history"]] == [0, 20, 40]
    assert "step    20  validation loss" in text and "step    40  validation loss" in text
    assert result["history"][-1][1] < result["history"][0][1] - 0.5, result["history"]
    assert "sample (temperature 0.7, top-k 5) after" in text
    assert len(result["sample"]) == 30 and set(result["sample"]) <= set(result["codec"].chars)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["train_cpu_seconds"] > 0 and "s CPU)" in text


def test_the_gpt_is_a_model_name_for_derive():
    """`chainrule derive gpt` explains the char-gpt architecture: the name builds gpt() at its sizes."""
    from chainrule.derive import build_model
    model = build_model("gpt")
    assert model.size_values[model.tensors["x"].meta["vocab"]] == 103
    assert [layer.describe() for _, layer in model.layers][:3] == [
        "embedding(64)", "position_embedding", "residual(layer_norm -> causal_attention(4))"]
    assert sum(t.name.startswith("Wq") for t in model.params) == 2


def test_the_sample_prompt_ends_where_a_paragraph_of_prose_begins():
    from chainrule.runtime.text import paragraph_prompt
    text = "x = 1\n>>> f(x)\n\n   def g():\n\n      The function g returns.\n"
    prompt = paragraph_prompt(text, 7)
    assert prompt == "\n      " and text[text.index(":\n\n      ") + 9:].startswith("The function")
    assert paragraph_prompt("no paragraph here at all", 5) == "no pa"


def _next_token_softmax():
    """A dense head on a (B, T, F) sequence with the next-token cross-entropy: the loss sums the
    log-sum-exp of the logits over t, the probabilities read it at every (b, t)."""
    from chainrule.derive.attention import NextTokenCrossEntropy
    from chainrule.derive.layers import Dense, SequenceInput, sequential
    return sequential(SequenceInput(5, features=4), [Dense(7)], NextTokenCrossEntropy(), name="next token head")


def test_the_logits_log_sum_exp_is_computed_once_for_the_loss_and_the_probabilities(compiled_declared):
    """share_reductions also shares a reduction read inside a sum over a whole axis: the loss's
    Σ_t (z - LSE z) y and the probabilities exp(z - LSE z) read one array LSE[b, t], computed once;
    the cost and the gradient agree with NumPy written by hand (B=3, T=5, F=4, V=7)."""
    cm = compiled_declared("next-token-head", _next_token_softmax)
    src = cm.source
    body = src[src.index("def loss_and_grads"):src.index("def train_step")]
    comments = {ln.strip() for ln in body.splitlines() if ln.strip().startswith("#")}
    shared = [c for c in comments if c.startswith("# cse") and "LSE_" in c]
    assert len(shared) == 1, shared                            # the one log-sum-exp of the logits
    name = shared[0][2:].split("[")[0]
    readers = {c for c in comments if f"-{name}[b, t]" in c}
    assert any(r.startswith("# l") for r in readers) and any(r.startswith("# p") for r in readers), readers
    assert not any("LSE_" in r for r in readers)               # neither computes it again
    rng = np.random.default_rng(3)
    params = cm.init_params(1)
    x = rng.standard_normal((3, 5, 4))
    y = np.eye(7)[rng.integers(0, 7, (3, 5))]
    cost, grads = cm.loss_and_grads(params, x, y)
    weight = next(v for k, v in params.items() if v.ndim == 2)
    offset = next(v for k, v in params.items() if v.ndim == 1)
    z = x @ weight.T + offset
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    ref = -((z - lse[..., None]) * y).sum((1, 2)).mean() / 5
    assert cost == pytest.approx(ref, rel=1e-12)
    p = np.exp(z - lse[..., None])
    d_z = (p - y) / (3 * 5)
    wname = next(k for k, v in params.items() if v.ndim == 2)
    assert np.allclose(grads[wname], np.einsum("bto,bti->oi", d_z, x), rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def gelu_kernels(compiled_declared):
    """Embeddings, a GELU feed-forward of width 7 and the projection to a vocabulary of 5."""
    from chainrule.derive.attention import _small_model, gelu
    from chainrule.derive.layers import Activation, Dense
    return compiled_declared("gelu-ffn", lambda: _small_model([Dense(7), Activation("gelu", gelu), Dense(6)],
                                                               context=4, width=6))


def test_the_gelu_backward_reads_the_forward_tanh_and_matches_finite_differences(gelu_kernels):
    """The training forward keeps tanh(√(2/π)(z + 0.044715 z³)), which the derived GELU adjoint
    evaluates again (three times, its argument factored differently); the backward reads the
    kept array and calls no tanh. Every gradient still agrees with central differences."""
    from chainrule.codegen.verify import check_gradients
    cm = gelu_kernels
    src = _function(cm.source, "loss_and_grads")
    kept = re.search(r"# (kept\d+)\[b,i,h\] = tanh\(sqrt\(2\)\*\(8943\*z2\[b, i, h\]\*\*3/200000 \+ z2\[b, i, h\]\)"
                     r"/sqrt\(pi\)\)", src)
    assert kept, src[:3000]
    name = kept.group(1)
    assert f"# a2[b,i,h] = ({name}[b, i, h] + 1)*z2[b, i, h]/2" in src
    adjoint = src[src.index("# d_z2[b,t,o] = "):]
    adjoint = adjoint[:adjoint.index("\n    # ", 1)]
    assert f"(1 - {name}[b, t, o]**2)" in adjoint and "_tanh(" not in adjoint, adjoint
    assert src.count("_tanh(") == 1                     # the forward's, once per element
    checks = check_gradients(cm.model, compiled=cm, batch=5)
    assert len(checks) == 7 and all(c.ok for c in checks), [str(c) for c in checks]


def _scores_then_row_sums():
    """S[b,h,t,u] = Σ_f P[b,h,t,f] x[b,h,u,f] (a batched product) followed by R[b,h,t] = Σ_u S[b,h,t,u],
    a per-slice sum with fixed limits: a run whose second kernel would allocate its own output."""
    from corpus import _cost_of
    from chainrule.derive import Builder
    from chainrule.derive.graph import Model
    from chainrule.derive.layers import B
    bb, hh, tt, uu, ee, ff = (index(n) for n in "b h t u e f".split())
    d = Builder()
    H, T, E = d.size("H", 3), d.size("T", 4), d.size("E", 5)
    x = d.tensor("x", (B, H, T, E), role="input")
    d.level, d.layer = 1, "1:scores"
    W = d.param("W", (E, E))
    P = d.tensor("P", (B, H, T, E))
    d.define(P, (bb, hh, tt, ff), sp.Sum(x[bb, hh, tt, ee] * W[ee, ff], (ee, 0, E - 1)))
    S = d.tensor("S", (B, H, T, T))
    d.define(S, (bb, hh, tt, uu), sp.Sum(P[bb, hh, tt, ff] * x[bb, hh, uu, ff], (ff, 0, E - 1)))
    R = d.tensor("R", (B, H, T))
    y = d.define(R, (bb, hh, tt), sp.Sum(S[bb, hh, tt, uu], (uu, 0, T - 1)))
    d.layer = "cost"
    cost = _cost_of(d, y)
    return Model(d.equations, d.tensors, cost, outputs=[y], size_values=d.size_values, name="row-sums")


def test_a_run_whose_slice_kernel_would_allocate_is_lowered_as_whole_tensors(compiled_declared):
    """A per-slice accumulation cannot write into a slice of a whole array: that run stays whole
    tensors (no slice loop), and its gradient agrees with central differences."""
    from chainrule.codegen.verify import check_gradients
    cm = compiled_declared("row-sums", _scores_then_row_sums)
    src = _function(cm.source, "loss_and_grads")
    assert "# one loop over (b, h): S1; R1" not in src and "one matrix product per batch element (b, h)" in src
    checks = check_gradients(cm.model, compiled=cm, batch=5)
    assert len(checks) == 1 and all(c.ok for c in checks), [str(c) for c in checks]
