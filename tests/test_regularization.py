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


# -- dropout and noise: random tensors, seeded in training, their mean in evaluation ---------------------
def _dropout_models():
    from chainrule.derive.layers import Dropout, GaussianNoise
    drop = sequential(3, [GaussianNoise(0.2), Dense(6), TANH, Dropout(0.5), Dense(2)], "mse")
    plain = sequential(3, [Dense(6), TANH, Dense(2)], "mse")
    return drop, plain


@pytest.fixture(scope="module")
def dropout_cms(kernel_cache_dir):
    from chainrule.codegen import compile_model
    drop, plain = _dropout_models()
    return compile_model(drop, cache_dir=kernel_cache_dir), compile_model(plain, cache_dir=kernel_cache_dir)


def test_dropout_derivation_and_verification():
    from chainrule.derive.verify import verify_model
    drop, _ = _dropout_models()
    eq = derive(drop).composed["z1"].equation
    m, p = drop.tensors["m1"], next(s for s in drop.constants if s.name.startswith("p"))
    assert eq.body.has(m.base) and sp.simplify(eq.body * (1 - p)).has(m.base)   # δ gets m/(1-p)
    assert all(c.equal and c.checked > 0 for c in verify_model(drop))


def test_dropout_is_seeded_in_training_and_the_identity_in_evaluation(dropout_cms):
    cm, plain = dropout_cms
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 3)), rng.normal(size=(40, 2))
    params = plain.init_params(seed=1)
    np.testing.assert_array_equal(cm.predict(params, x), plain.predict(params, x))   # evaluation
    assert cm.cost(params, x, y) == plain.cost(params, x, y)
    c1, g1 = cm.loss_and_grads(params, x, y, seed=7)
    c2, g2 = cm.loss_and_grads(params, x, y, seed=7)
    c3, _ = cm.loss_and_grads(params, x, y, seed=8)
    assert c1 == c2 and c1 != c3 and c1 != plain.cost(params, x, y)
    for k in g1:
        np.testing.assert_array_equal(g1[k], g2[k])
    # the gradient of one training step is the gradient of that step's cost (same masks)
    W = params["W1"]
    for idx in [(0, 0), (3, 2)]:
        old = W[idx]
        W[idx] = old + 1e-6
        up = cm.cost(params, x, y, seed=7)
        W[idx] = old - 1e-6
        down = cm.cost(params, x, y, seed=7)
        W[idx] = old
        assert g1["W1"][idx] == pytest.approx((up - down) / 2e-6, rel=1e-6)
    # inverted scaling: the training-mode output averages to the evaluation output
    _, out_eval = plain.forward(params, x[:5], y[:5])
    mean = np.mean([cm.forward(params, x[:5], y[:5], seed=s)[1] for s in range(3000)], axis=0)
    assert np.abs(mean - out_eval).max() < 0.05 * np.abs(out_eval).max() + 0.02


def test_dropout_training_is_reproducible_under_a_seed(dropout_cms):
    from chainrule.runtime import Network
    cm, _ = dropout_cms
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 3)), rng.normal(size=(64, 2))
    nets = [Network(cm.model, compiled=cm, seed=s) for s in (0, 0, 1)]
    for n in nets:
        n.params = nets[0].compiled.init_params(seed=0)
        n.fit(x, y, epochs=2, batch_size=16, progress=False)
    for k in nets[0].param_names:
        np.testing.assert_array_equal(nets[0].params[k], nets[1].params[k])
    assert any(not np.array_equal(nets[0].params[k], nets[2].params[k]) for k in nets[0].param_names)


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5, "0.5"])
def test_bad_dropout_rate_is_named(rate):
    from chainrule.derive.layers import Dropout
    with pytest.raises(ValueError, match=r"dropout rate must be a number in \[0, 1\), got "):
        Dropout(rate)


def test_max_norm_is_a_declared_projection_after_the_update(kernel_cache_dir):
    from chainrule.codegen import compile_model
    c = 0.6
    model = sequential(3, [Dense(5, max_norm=c), TANH, Dense(2)], "mse")
    md = explain_model(model).to_markdown()
    assert "Constraints, applied after each update" in md and r"\begin{cases}" in md and "c^{(1)}" in md
    plain = compile_model(_model_5(), cache_dir=kernel_cache_dir)
    cm = compile_model(model, cache_dir=kernel_cache_dir)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 3)), rng.normal(size=(8, 2))
    p = cm.init_params(seed=3)
    p["W1"][0] *= 0.1                                  # one short row, the others long
    q = {k: v.copy() for k, v in p.items()}
    cm.train_step(p, x, y, lr=0.1)
    plain.train_step(q, x, y, lr=0.1)                  # the same update without the projection
    norms_q = np.linalg.norm(q["W1"], axis=1)
    assert norms_q[0] < c and (norms_q[1:] > c).any()
    expect = np.where((norms_q <= c)[:, None], q["W1"], c * q["W1"] / norms_q[:, None])
    np.testing.assert_allclose(p["W1"], expect, rtol=1e-12)
    np.testing.assert_array_equal(p["W1"][0], q["W1"][0])          # inside the ball: untouched
    np.testing.assert_array_equal(p["W2"], q["W2"])
    assert np.linalg.norm(p["W1"], axis=1).max() <= c * (1 + 1e-12)
    with pytest.raises(ValueError, match=r"max_norm must be > 0, got 0"):
        Dense(5, max_norm=0)


def _model_5():
    return sequential(3, [Dense(5), TANH, Dense(2)], "mse")


def test_layer_norm_verifies_and_trains(kernel_cache_dir):
    from chainrule.codegen import compile_model
    from chainrule.codegen.verify import check_gradients
    from chainrule.derive.layers import LayerNorm
    from chainrule.derive.verify import verify_model
    from chainrule.runtime import Network
    from chainrule.runtime.optim import Adam
    model = sequential(3, [Dense(5), LayerNorm(), TANH, Dense(2)], "mse")
    assert all(c.equal and c.checked > 0 for c in verify_model(model))
    cm = compile_model(model, cache_dir=kernel_cache_dir, optimizer="adam")
    assert all(err < 1e-6 for _, err in check_gradients(model, compiled=cm))
    p = cm.init_params(seed=0)
    assert (p["gamma2"] == 1).all() and (p["beta2"] == 0).all()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 3))
    y = np.stack([np.sin(x[:, 0]), x[:, 1] * x[:, 2]], axis=1)
    net = Network(model, compiled=cm, optimizer=Adam(0.01))
    h = net.fit(x, y, epochs=20, batch_size=16, progress=False)
    assert h["loss"][-1] < 0.5 * h["loss"][0]
    out = net.predict(x[:4])           # per example: the same in evaluation, batch of one included
    np.testing.assert_allclose(np.vstack([net.predict(x[k:k + 1]) for k in range(4)]), out, rtol=1e-12)
