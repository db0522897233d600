"""Regularisers are terms of the cost, derived like everything else: the gradient gains + λW."""
import numpy as np
import pytest
import sympy as sp

from chainrule.derive import ACTIVATIONS, Activation, Dense, derive, explain_model, sequential
from chainrule.derive.layers import ActivityRegularization

TANH = Activation("tanh", ACTIVATIONS["tanh"])


def _model(**kw):
    act = kw.pop("activity", None)
    layers = [Dense(4, **kw), TANH] + ([ActivityRegularization(**act)] if act else []) + [Dense(2)]
    return sequential(3, layers, "mse")


def test_l2_and_l1_add_their_terms_to_the_derived_gradient():
    plain = derive(_model()).composed["W1"].equation.body
    reg_model = _model(l2=0.01, l1=0.002)
    reg = derive(reg_model).composed["W1"].equation.body
    (lam2, v2), (lam1, v1) = sorted(reg_model.constants.items(), key=lambda kv: -kv[1])
    assert (v2, v1) == (0.01, 0.002)
    W = reg_model.tensors["W1"]
    o, i = derive(reg_model).composed["W1"].equation.indices
    assert sp.simplify(reg - plain - lam2 * W[o, i] - lam1 * sp.sign(W[o, i])) == 0
    md = explain_model(sequential(3, [Dense(4, l2=0.01), TANH, Dense(2)], "mse")).to_markdown()
    assert r"\frac{\partial C}{\partial W^{(1)}_{oi}} = \lambda^{(1)}_{2} {W^{(1)}_{oi}} + " in md


def test_regularised_model_verifies_exactly():
    from chainrule.derive.verify import verify_model
    checks = verify_model(_model(l2=0.01, l1=0.002, activity={"l2": 0.1}))
    assert checks and all(c.equal and c.checked > 0 for c in checks)


def test_generated_gradient_has_the_extra_terms(kernel_cache_dir):
    from chainrule.codegen import compile_model
    from chainrule.codegen.verify import check_gradients
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 2))
    plain = compile_model(_model(), cache_dir=kernel_cache_dir)
    model = _model(l2=0.05, activity={"l2": 0.1})
    reg = compile_model(model, cache_dir=kernel_cache_dir)
    assert reg.module_path != plain.module_path           # the strength is part of the cache key
    p = plain.init_params(seed=2)
    c0, g0 = plain.loss_and_grads(p, x, y)
    c1, g1 = reg.loss_and_grads(p, x, y)
    a1 = np.tanh(x @ p["W1"].T + p["b1"])
    assert c1 == pytest.approx(c0 + 0.05 / 2 * (p["W1"] ** 2).sum() + 0.1 / 2 * (a1 ** 2).sum() / 6,
                               rel=1e-12)
    np.testing.assert_allclose(g1["W2"], g0["W2"], rtol=1e-12)      # not regularised
    assert np.abs(g1["W1"] - g0["W1"] - 0.05 * p["W1"]).max() > 1e-4   # activity term reaches W1
    assert all(err < 1e-6 for _, err in check_gradients(model, compiled=reg))


@pytest.mark.parametrize("kw, msg", [({"l2": -0.1}, r"dense\(4\): l2 must be a finite number >= 0, got -0.1"),
                                      ({"l1": float("nan")}, r"l1 must be a finite number >= 0, got nan")])
def test_bad_strength_is_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Dense(4, **kw)
    with pytest.raises(ValueError, match="activity: l2"):
        ActivityRegularization(l2=-1)
