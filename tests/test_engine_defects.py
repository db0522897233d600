"""Defects of the derivation engine, each shown on a real call and fixed at the root."""
import re

import numpy as np
import pytest
import sympy as sp

from chainrule.derive import build_model, derive, explain_model, index
from chainrule.derive.tensor import Equation, Tensor, rename_bound, size, substitute
from chainrule.derive.verify import verify_model
from corpus import corpus

b, o, i = (index(n) for n in "b o i".split())


def _bound(expr):
    return [v for s in expr.atoms(sp.Sum) for v, *_ in s.limits]


# -- index capture -----------------------------------------------------------------------------------
def test_substitution_never_reaches_a_bound_index():
    B = size("B")
    x = sp.IndexedBase("x", real=True)
    expr = x[b, o] - sp.Sum(x[b, o], (b, 0, B - 1)) / B          # a batch statistic, b bound and free
    out = substitute(expr, {b: sp.Integer(1), o: sp.Integer(0)})
    assert out.subs(B, 3).doit() == x[1, 0] - (x[0, 0] + x[1, 0] + x[2, 0]) / 3
    renamed = substitute(sp.Sum(x[b, o], (b, 0, B - 1)), {o: b})   # o := b must not be captured by Σ_b
    assert renamed.free_symbols >= {b} and _bound(renamed) != [b]


def test_equations_never_shadow_their_own_indices():
    B = size("B")
    x = Tensor("x", (B, 3), role="input")
    y = Tensor("y", (B, 3))
    eq = Equation(y, (b, o), x[b, o] - sp.Sum(x[b, o], (b, 0, B - 1)) / B)
    assert b not in _bound(eq.body) and eq.body.free_symbols >= {b, o}
    nested = rename_bound(sp.Sum(sp.Sum(x[b, o], (b, 0, 1)), (b, 0, 1)))
    assert len(set(_bound(nested))) == 2


@pytest.mark.parametrize("spec", ["3 -> dense(4) -> softmax -> dense(4) -> softmax -> mse",
                                  "3 -> dense(4) -> log_softmax -> dense(4) -> log_softmax -> mse"])
def test_stacked_softmaxes_derive_and_verify(spec):
    model = build_model(spec)
    grads = derive(model)
    for d in grads.composed.values():
        assert not set(_bound(d.equation.body)) & set(d.equation.indices), d.equation
    assert all(verify_model(model, grads))


def test_batch_normalisation_declared_as_a_user_would_derives_and_verifies():
    model = corpus()["batch norm"]
    grads = derive(model)
    d_z = grads.composed["z1"].equation
    assert set(d_z.indices) == {b, o}
    assert not set(_bound(d_z.body)) & {b, o}          # the batch sums run over b', never over b
    assert any(v.name.startswith("b'") for v in _bound(d_z.body))
    checks = verify_model(model, grads)
    assert checks and all(checks)


# -- sigmoid then binary cross-entropy ---------------------------------------------------------------
def test_sigmoid_then_bce_cancels_to_the_textbook_form():
    model = build_model("3 -> dense(2) -> sigmoid -> bce")
    grads = derive(model)
    d = grads.composed["z1"]
    a, y = model.tensors["a1"], model.tensors["y1"]
    B, n = size("B"), size("n_1")
    assert sp.simplify(d.equation.body - (a[b, o] - y[b, o]) / (B * n)) == 0
    assert d.equation.body == (a[b, o] - y[b, o]) / (B * n)          # literally, not just equal
    assert "cancel" in [s.rule for s in d.steps]
    assert "cancel" in explain_model(model, grads).to_markdown()


def test_no_generated_kernel_divides_by_a_sigmoid_output(compiled_model):
    cm = compiled_model("30 -> dense(16) -> relu -> dense(1) -> sigmoid -> bce")
    backward = cm.source.split("def loss_and_grads")[1].split("# ---- backward")[1]
    assert not re.search(r"/\s*\(?\s*(1(\.0)? - )?t\d+_a2", backward)


def test_sigmoid_bce_trains_at_a_large_learning_rate_without_error(compiled_model):
    from chainrule.runtime import Network
    from chainrule.runtime.data import load_breast_cancer, train_test_split
    x, y = load_breast_cancer()
    xtr, xte, ytr, yte = train_test_split(x, y, 0.2, seed=0)
    net = Network("30 -> dense(16) -> relu -> dense(1) -> sigmoid -> bce", seed=0,
                  compiled=compiled_model("30 -> dense(16) -> relu -> dense(1) -> sigmoid -> bce"))
    history = net.fit(xtr, ytr, lr=2.0, epochs=30, progress=False)
    assert np.isfinite(history["loss"]).all() and history["loss"][-1] < history["loss"][0] / 5
    assert net.evaluate(xte, yte)["accuracy"] >= 0.95


# -- explanations ------------------------------------------------------------------------------------
def test_the_step_function_prints_as_an_iverson_bracket():
    md = explain_model(build_model("mlp-relu")).to_markdown()
    assert r"\left[{z^{(1)}_{bo}} > 0\right]" in md and r"\mathbb{1}" not in md


def test_every_corpus_model_verifies_symbolically_at_several_sizes():
    """The whole corpus: each derived parameter gradient against the independent reference."""
    for name, model in corpus().items():
        checks = verify_model(model)
        assert checks and all(checks), f"{name}: {[str(c) for c in checks if not c]}"
        assert all(c.checked > 0 for c in checks)
        assert len({tuple(sorted(s.items())) for s in checks[0].sizes}) >= 2
