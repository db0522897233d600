"""The math core: derivation, textbook form, matrix form, explanations, verification, errors."""
import pytest
import sympy as sp

from chainrule.derive import (Activation, Builder, Dense, Loss, ShapeError, SpecError, UnsupportedError,
                              build_model, derive, explain_model, index, parse_spec, sequential, sigmoid)
from chainrule.derive.graph import Model
from chainrule.derive.layers import B, Layer
from chainrule.derive.matrix import matrix_form
from chainrule.derive.tensor import Equation, Tensor, size
from chainrule.derive.verify import check_claim, verify_model
from corpus import Bilinear

b, o, i, k = (index(n) for n in "b o i k".split())


@pytest.fixture(scope="module")
def demo():
    model = build_model("demo")
    return model, derive(model)


def T(model, name):
    return model.tensors[name]


def rules(derivation):
    return [s.rule for s in derivation.steps]


# -- the chain rule, exactly ---------------------------------------------------------------------------
def test_dense_gradients_are_the_textbook_gather_form(demo):
    model, g = demo
    x = T(model, "x")
    dz1 = g.adjoints["z1"]
    assert g["W1"].body == sp.Sum(dz1[b, o] * x[b, i], (b, 0, B - 1))
    assert g["b1"].body == sp.Sum(dz1[b, o], (b, 0, B - 1))
    assert g["W1"].indices == (o, i)
    o2 = index("o")
    assert g["a1"].body == sp.Sum(T(model, "W2")[o2, i] * g.adjoints["z2"][b, o2],
                                  (o2, 0, model.tensors["W2"].shape[0] - 1))


def test_sigmoid_derivative_is_rewritten_through_the_forward_result(demo):
    model, g = demo
    a1 = T(model, "a1")
    d = g.derivations["z1"]
    assert d.equation.body == a1[b, o] * (1 - a1[b, o]) * g.adjoints["a1"][b, o]
    assert rules(d) == ["chain rule", "differentiate", "eliminate Kronecker deltas", "forward result"]
    assert d.steps[2].after.has(sigmoid)          # before the rewrite: σ(z)(1-σ(z))


def test_softmax_cross_entropy_gives_p_minus_y_using_the_declared_fact(demo):
    model, g = demo
    p, y = T(model, "p2"), T(model, "y2")
    d = g.derivations["z2"]
    assert "declared fact" in rules(d)
    assert sp.simplify(g.composed["z2"].equation.body - (p[b, o] - y[b, o]) / B) == 0


@pytest.mark.parametrize("spec, tensor, expected", [
    ("4 -> dense(3) -> tanh -> dense(2) -> mse", "z1", lambda m, g: (1 - T(m, "a1")[b, o] ** 2)),
    ("4 -> dense(3) -> relu -> dense(2) -> mse", "z1", lambda m, g: sp.Function("step")),
])
def test_activation_derivatives(spec, tensor, expected):
    model = parse_spec(spec)
    g = derive(model)
    body = g.derivations[tensor].equation.body
    if tensor == "z1" and "tanh" in spec:
        assert body == expected(model, g) * g.adjoints["a1"][b, o]
    else:
        from chainrule.derive.primitives import step
        assert body == step(T(model, "z1")[b, o]) * g.adjoints["a1"][b, o]


def test_log_softmax_nll_and_probability_cross_entropy_also_give_p_minus_y():
    for spec in ("5 -> dense(4) -> log_softmax -> nll", "5 -> dense(4) -> softmax -> cross_entropy"):
        model = parse_spec(spec)
        g = derive(model)
        p, y = T(model, "p1"), T(model, "y1")
        assert sp.simplify(g.composed["z1"].equation.body - (p[b, o] - y[b, o]) / B) == 0, spec
        assert any(s.rule == "declared fact" for s in g.composed["z1"].steps)


def test_mse_gives_the_scaled_difference():
    model = parse_spec("3 -> dense(2) -> mse")
    g = derive(model)
    z, y, n = T(model, "z1"), T(model, "y1"), model.tensors["z1"].shape[1]
    assert sp.simplify(g.composed["z1"].equation.body - 2 * (z[b, o] - y[b, o]) / (B * n)) == 0


def test_deriving_a_4096_wide_layer_is_the_same_work_as_a_4_wide_one():
    small, large = parse_spec("4 -> dense(4) -> sigmoid -> mse"), parse_spec("4096 -> dense(4096) -> sigmoid -> mse")
    gs, gl = derive(small), derive(large)
    # sizes stay symbols: the derived equations are literally the same expressions
    assert [sp.srepr(e.body) for e in gs.equations] == [sp.srepr(e.body) for e in gl.equations]
    assert large.size_values[size("n_1")] == 4096
    assert not any(a.is_Integer and a > 100 for e in gl.equations for a in e.body.atoms(sp.Number))


def test_a_tensor_read_twice_accumulates_both_contributions():
    """A residual connection z = W x + x: the gradient highway adds δ to Wᵀδ."""
    d = Builder()
    n = d.size("n", 3)
    x = d.tensor("x", (B, n), role="input")
    W = d.param("W", (n, n))
    z = d.tensor("z", (B, n))
    d.define(z, (b, o), sp.Sum(W[o, i] * x[b, i], (i, 0, n - 1)) + x[b, o])
    cost = Tensor("C", (), role="cost")
    model = Model(d.equations + [Equation(cost, (), sp.Sum(sp.Sum(z[b, k] ** 2, (k, 0, n - 1)), (b, 0, B - 1)))],
                  d.tensors + [cost], cost, size_values=d.size_values)
    g = derive(model, wrt=["x"])
    dz = g.adjoints["z"]
    j0, j1 = g["x"].indices
    expected = sp.Sum(W[k, j1] * dz[j0, k], (k, 0, n - 1)) + dz[j0, j1]       # Wᵀδ + δ
    assert sp.expand((g["x"].body - expected).subs(n, 3).doit()) == 0
    assert all(verify_model(model, g))


def test_affine_reads_give_summation_limits_in_gather_form():
    """A 1-D convolution y[b,t] = Σ_p w[p] x[b,t+p]: ∂C/∂x keeps the bounds as summation limits."""
    d = Builder()
    L, K = d.size("L", 5), d.size("K", 2)
    t, p = index("t"), index("p")
    x = d.tensor("x", (B, L), role="input")
    w = d.param("w", (K,))
    y = d.tensor("y", (B, L - K + 1))
    d.define(y, (b, t), sp.Sum(w[p] * x[b, t + p], (p, 0, K - 1)))
    cost = Tensor("C", (), role="cost")
    model = Model(d.equations + [Equation(cost, (), sp.Sum(sp.Sum(y[b, t] ** 2, (t, 0, L - K)), (b, 0, B - 1)))],
                  d.tensors + [cost], cost, size_values={**d.size_values, L: 4, K: 2})
    g = derive(model, wrt=["x"])
    dx = g["x"]
    limits = [lim for s in dx.body.atoms(sp.Sum) for lim in s.limits]
    assert any(lim[1].has(sp.Max) or lim[2].has(sp.Min) for lim in limits)
    assert any(s.rule == "eliminate Kronecker deltas" and any("summation limits" in str(getattr(w, "fmt", w))
                                                              for w in s.why) for s in g.derivations["x"].steps)
    assert all(verify_model(model, g))


# -- matrix form ------------------------------------------------------------------------------------------
def test_matrix_form_of_the_weight_gradient_states_the_transpose_and_shape(demo):
    model, g = demo
    tensors = {**model.tensors, **{a.name: a for a in g.adjoints.values()}}
    mf = matrix_form(g.composed["W1"].equation, tensors)
    assert mf["rhs"] == r"\Delta^{(1)\top} X"
    assert mf["shape"] == r"n_{1} \times n_{0}"
    assert any("transposed" in n for n in mf["notes"])
    per_example = matrix_form(g.composed["z1"].equation, tensors, fixed=[b])
    assert per_example["rhs"].startswith(r"\left(W^{(2)\top} \delta^{(2)}\right) \odot")


def test_model_explanation_contains_every_part(demo):
    model, g = demo
    doc = explain_model(model, g)
    md = doc.to_markdown()
    for needle in ("## Forward pass", "## Loss and cost", "## The backward recursion", r"\Delta^{(1)\top} X",
                   "declared fact", "forward result", r"\frac{1}{B} \left(P - Y^{(2)}\right)", "```math"):
        assert needle in md, needle
    assert doc._repr_markdown_() == md
    assert doc._repr_latex_().startswith("$$\\begin{aligned}")
    assert "\\begin{document}" in doc.to_latex()


# -- a user's own declarations ---------------------------------------------------------------------------------
def test_user_declared_swish_activation_is_derived_and_verified():
    model = sequential(2, [Dense(2), Activation("swish", lambda u: u * sigmoid(u))], "mse")
    g = derive(model)
    assert all(verify_model(model, g, points=1))
    assert "swish activation" in explain_model(model, g).to_markdown()


def test_user_declared_huber_loss_is_derived_and_verified():
    # Huber: r²/2 for |r| ≤ 1, |r| - 1/2 beyond; with m = min(|r|, 1) that is m (|r| - m/2)
    huber = Loss("huber", lambda p, y: sp.Min(sp.Abs(p - y), 1) * (sp.Abs(p - y) - sp.Min(sp.Abs(p - y), 1) / 2))
    model = sequential(2, [Dense(2)], huber)
    assert all(verify_model(model, points=1))


def test_user_declared_bilinear_layer_reads_its_input_twice_and_verifies():
    model = sequential(2, [Bilinear(2)], "mse")
    g = derive(model)
    assert all(verify_model(model, g, points=1))


# -- claims -------------------------------------------------------------------------------------------------
def test_a_correct_claim_is_accepted_and_a_wrong_one_gets_a_counterexample(demo):
    model, g = demo
    assert check_claim(model, "z2", "(p2[b,o] - y2[b,o]) / B", grads=g).equal
    wrong = check_claim(model, "z2", "(y2[b,o] - p2[b,o]) / B", grads=g)
    assert not wrong.equal
    assert wrong.counterexample["claimed"] == -wrong.counterexample["derived"]
    assert check_claim(model, "W1", "sum(b, d_z1[b,o] * x[b,i])", grads=g).equal


def test_claims_are_parsed_without_eval(demo):
    model, g = demo
    for bad in ("__import__('os').system('true')", "p2[b,o].__class__", "lambda: 1", "p2[b,o] ; 1"):
        with pytest.raises(SpecError):
            check_claim(model, "z2", bad, grads=g)


# -- symbolic verification ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["demo", "perceptron", "mlp-relu", "mlp-tanh-regression", "softmax-ce",
                                  "log-softmax-nll"])
def test_every_builtin_model_verifies(name):
    checks = verify_model(build_model(name))
    assert checks and all(checks), [c for c in checks if not c]


def test_verification_catches_a_wrong_derivation(demo, monkeypatch):
    model, g = demo
    import copy
    bad = copy.copy(g)
    bad._composed = {**g.composed}
    d = copy.copy(g.composed["b2"])
    d.equation = Equation(d.adjoint, d.equation.indices, 2 * d.equation.body)
    bad._composed["b2"] = d
    results = {c.name: c.equal for c in verify_model(model, bad)}
    assert results["demo: dC/db2"] is False and results["demo: dC/dW2"] is True


# -- errors ----------------------------------------------------------------------------------------------------------
def test_errors_name_the_layer_the_tensor_and_the_shapes():
    with pytest.raises(SpecError, match="unknown layer 'sigmod'"):
        parse_spec("4 -> dense(3) -> sigmod -> mse")
    with pytest.raises(SpecError, match="unknown model"):
        build_model("resnet-9000")
    x = Tensor("x", (B, size("n_0")), role="input", layer="1:dense")
    with pytest.raises(ShapeError, match=r"tensor x in layer 1:dense has shape \(B, n_0\)"):
        x[b]
    d = Builder()
    n = d.size("n", 3)
    xx = d.tensor("x", (B, n), role="input")
    y = d.tensor("y", (B, n))
    d.layer = "2:shift"
    d.define(y, (b, i), xx[b, i + 1])
    cost = Tensor("C", (), role="cost")
    with pytest.raises(ShapeError, match=r"layer 2:shift: y\[b, i\] \(B, n_0\) reads x\[b, i \+ 1\]: index i \+ 1 "
                                         r"runs over \[1, n_0\] but axis 1 of x \(B, n_0\) has size n_0"):
        Model(d.equations + [Equation(cost, (), sp.Sum(y[b, 0], (b, 0, B - 1)))], d.tensors + [cost], cost)


def test_unsupported_index_maps_are_refused_not_guessed():
    d = Builder()
    n = d.size("n", 4)
    x = d.tensor("x", (B, 2 * n), role="input")
    W = d.param("W", (n,))
    y = d.tensor("y", (B, n))
    d.define(y, (b, i), W[i] * x[b, 2 * i])
    cost = Tensor("C", (), role="cost")
    model = Model(d.equations + [Equation(cost, (), sp.Sum(sp.Sum(y[b, k], (k, 0, n - 1)), (b, 0, B - 1)))],
                  d.tensors + [cost], cost)
    with pytest.raises(UnsupportedError, match="unit coefficients"):
        derive(model, wrt=["x"])


def test_dense_layer_rejects_a_non_matrix_input():
    d = Builder()
    x = d.tensor("x", (B, size("h"), size("w")), role="input")
    d.layer = "1:dense(4)"
    with pytest.raises(ShapeError, match=r"layer 1:dense\(4\) \(dense\) expects a \(batch, features\) input, got x "
                                         r"\(B, h, w\)"):
        Dense(4).build(d, x)
