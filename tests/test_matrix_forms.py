"""Every matrix form the engine prints is a claim: checked numerically against its index form on a
corpus of built-in and user-declared models, at sizes other than those the engine checked itself."""
import numpy as np
import pytest
import sympy as sp

from chainrule.derive import build_model, derive, explain_model
from chainrule.derive.matrix import MatMul, T, check_sizes, matrix_form, random_env, with_sup
from corpus import corpus
from latex_tools import extract_math, format_katex_errors, katex_errors, need_katex


@pytest.fixture(scope="module")
def explained():
    out = {}
    for name, model in corpus().items():
        grads = derive(model)
        tensors = {**model.tensors, **{a.name: a for a in grads.adjoints.values()}}
        out[name] = (model, tensors, explain_model(model, grads))
    return out


def test_the_corpus_has_at_least_twenty_models_and_each_prints_matrix_forms(explained):
    assert len(explained) >= 20
    for name, (_, _, doc) in explained.items():
        assert doc.matrix_forms, f"{name}: no matrix form printed"
    assert sum(len(doc.matrix_forms) for _, _, doc in explained.values()) > 250


def test_every_printed_matrix_form_agrees_with_its_index_form(explained):
    rng = np.random.default_rng(2026)
    compared = 0
    for name, (_, tensors, doc) in explained.items():
        for form in doc.matrix_forms:
            assignments = check_sizes(form.eq, tensors, count=4)[2:] or check_sizes(form.eq, tensors, count=1)
            for sizes in assignments:
                assert len(set(sizes.values())) == len(sizes) and 2 not in sizes.values()
                env = random_env(form.eq, tensors, sizes, rng)
                fixed = {i: int(rng.integers(0, int(form.eq.out.shape[list(form.eq.indices).index(i)].xreplace(
                    {k: sp.Integer(v) for k, v in sizes.items()})))) for i in form.fixed}
                got, want = form.evaluate(env, sizes, fixed), form.reference(env, sizes, fixed)
                assert want.size > 0
                assert got.shape == want.shape, f"{name}: {form.lhs} = {form.rhs} has shape {got.shape}, not {want.shape}"
                np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12,
                                           err_msg=f"{name}: {form.lhs} = {form.rhs} at {sizes}")
                compared += want.size
    assert compared > 5000


def test_a_wrong_matrix_form_is_caught_and_not_printed():
    model = build_model("demo")
    g = derive(model)
    tensors = {**model.tensors, **{a.name: a for a in g.adjoints.values()}}
    form = matrix_form(g.composed["W1"].equation, tensors)
    assert form.rhs == r"\Delta^{(1)\top} X"
    sizes = check_sizes(form.eq, tensors)[0]
    env = random_env(form.eq, tensors, sizes, np.random.default_rng(0))
    assert form.check(env, sizes)
    # the classic mistakes: Δ X (no transpose) is a shape error; Xᵀ Δ (the transpose of the answer)
    # has the right shape when n_0 = n_1, but not the right numbers
    delta_t, x = form.node.a, form.node.b
    form.node = MatMul(delta_t.m, x)
    assert not form.check(env, sizes)
    n0, n1 = (sp.Symbol(n, integer=True, positive=True) for n in ("n_0", "n_1"))
    square = {**sizes, n0: sizes[n1]}
    env = random_env(form.eq, tensors, square, np.random.default_rng(1))
    form.node = MatMul(T(x), delta_t.m)
    assert form.evaluate(env, square).shape == form.reference(env, square).shape
    assert not form.check(env, square)


def test_matrix_bias_and_multi_letter_names_print_single_superscripts(explained):
    _, _, doc = explained["matrix bias"]
    forward = next(f for f in doc.matrix_forms if f.eq.out.name == "h1" and not f.fixed)
    assert forward.rhs == (r"X W^{(1)\top} + X \mathrm{Wa}^{(1)\top} + "
                           r"\mathbf{1} \left(U^{(1)} s^{(1)}\right)^{\top}")
    assert r"\top\top" not in forward.rhs and r"}^{\top}" not in forward.rhs.replace(r"\right)^{\top}", "")
    assert with_sup(r"\mathrm{Wa}^{(2)}", r"\top") == r"\mathrm{Wa}^{(2)\top}"
    assert with_sup(r"\frac{\partial C}{\partial x}", r"\top") == r"\frac{\partial C}{\partial x}^{\top}"
    assert with_sup(r"a^{(1)}_{b}", r"\top") == r"{a^{(1)}_{b}}^{\top}"


def test_squared_primitive_activation_is_explained():
    from chainrule.derive import Activation, Dense, relu, sequential, sigmoid
    for fn in (lambda u: relu(u) ** 2, lambda u: sigmoid(u) ** 2):
        model = sequential(3, [Dense(2), Activation("sq", fn), Dense(2)], "mse")
        md = explain_model(model).to_markdown()
        assert r"\right)^{2}" in md


@pytest.mark.latex
def test_every_equation_of_the_corpus_renders_in_katex(explained):
    need_katex()
    items = []
    for _, _, doc in explained.values():
        items += extract_math(doc.to_markdown()) + [(eq, True) for eq in doc.equations()]
    errors = katex_errors(items)
    assert not errors, format_katex_errors(errors)
