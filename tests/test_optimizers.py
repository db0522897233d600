"""Each declared optimiser, generated into train_step, against an independent NumPy reference of the
published algorithm (written here from the papers' pseudo-code, not from the declarations)."""
import numpy as np
import pytest

SPEC = "3 -> dense(4) -> tanh -> dense(2) -> mse"
STEPS = 6


def _data():
    rng = np.random.default_rng(3)
    return rng.normal(size=(5, 3)), rng.normal(size=(5, 2))


# -- the published algorithms, one reference each ---------------------------------------------------------
def ref_sgd(p, g, s, t, h):
    return p - h["lr"] * g


def ref_momentum(p, g, s, t, h):              # Sutskever et al. 2013, eq. (1)-(2)
    s["v"] = h["momentum"] * s.get("v", 0.0) - h["lr"] * g
    return p + s["v"]


def ref_nesterov(p, g, s, t, h):              # Bengio et al. 2013, eq. (7)
    s["v"] = h["momentum"] * s.get("v", 0.0) - h["lr"] * g
    return p + h["momentum"] * s["v"] - h["lr"] * g


def ref_adagrad(p, g, s, t, h):               # Duchi et al. 2011 (diagonal)
    s["G"] = s.get("G", 0.0) + g * g
    return p - h["lr"] * g / (np.sqrt(s["G"]) + h["eps"])


def ref_rmsprop(p, g, s, t, h):               # Tieleman & Hinton 2012
    s["s"] = h["rho"] * s.get("s", 0.0) + (1 - h["rho"]) * g * g
    return p - h["lr"] * g / (np.sqrt(s["s"]) + h["eps"])


def ref_adam(p, g, s, t, h, decoupled=0.0):   # Kingma & Ba 2015, Algorithm 1
    b1, b2 = h["beta1"], h["beta2"]
    s["m"] = b1 * s.get("m", 0.0) + (1 - b1) * g
    s["v"] = b2 * s.get("v", 0.0) + (1 - b2) * g * g
    m_hat = s["m"] / (1 - b1 ** t)
    v_hat = s["v"] / (1 - b2 ** t)
    return p - h["lr"] * (m_hat / (np.sqrt(v_hat) + h["eps"]) + decoupled * p)


def ref_adamw(p, g, s, t, h):                 # Loshchilov & Hutter 2019, Algorithm 2 (η_t = 1)
    return ref_adam(p, g, s, t, h, decoupled=h["weight_decay"])


CASES = {
    "sgd": (ref_sgd, {"lr": 0.3}),
    "momentum": (ref_momentum, {"lr": 0.1, "momentum": 0.8}),
    "nesterov": (ref_nesterov, {"lr": 0.1, "momentum": 0.7}),
    "adagrad": (ref_adagrad, {"lr": 0.2, "eps": 1e-10}),
    "rmsprop": (ref_rmsprop, {"lr": 0.01, "rho": 0.85, "eps": 1e-8}),
    "adam": (ref_adam, {"lr": 0.01, "beta1": 0.8, "beta2": 0.95, "eps": 1e-8}),
    "adamw": (ref_adamw, {"lr": 0.01, "beta1": 0.85, "beta2": 0.99, "eps": 1e-8,
                          "weight_decay": 0.3}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_first_steps_match_published_algorithm(name, compiled_with):
    from chainrule.runtime.optim import OPTIMIZERS
    ref, hyper = CASES[name]
    cm = compiled_with(SPEC, name)
    assert cm.optimizer == name and f"{name} update of W1" in cm.source
    x, y = _data()
    params = cm.init_params(seed=1)
    expect = {k: v.copy() for k, v in params.items()}
    states = {k: {} for k in params}
    opt = OPTIMIZERS[name](**hyper)
    moved = 0.0
    for t in range(1, STEPS + 1):
        _, grads = cm.loss_and_grads(expect, x, y)          # the reference's gradient at its own point
        for k in expect:
            expect[k] = ref(expect[k], grads[k], states[k], t, hyper)
        before = {k: v.copy() for k, v in params.items()}
        opt.step(cm, params, x, y)
        moved += sum(float(np.abs(params[k] - before[k]).max()) for k in params)
        for k in params:
            np.testing.assert_allclose(params[k], expect[k], rtol=1e-12, atol=1e-14,
                                       err_msg=f"{name}, parameter {k}, step {t}")
    assert moved > 1e-3                 # the parameters did move: the comparison is not vacuous
    assert opt.t == STEPS
    for k in params:                    # the state kept between steps is the reference's state
        assert set(opt.state.get(k, {})) == set(states[k])
        for sname, value in opt.state.get(k, {}).items():
            np.testing.assert_allclose(value, states[k][sname], rtol=1e-12, atol=1e-15)


def test_clipping_by_global_norm(compiled_with):
    cm = compiled_with(SPEC, "sgd")
    x, y = _data()
    params = cm.init_params(seed=1)
    ref = {k: v.copy() for k, v in params.items()}
    _, grads = cm.loss_and_grads(ref, x, y)
    norm = np.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    clip = norm / 3
    cm.train_step(params, x, y, lr=0.5, clip=clip)
    for k in params:
        np.testing.assert_allclose(params[k], ref[k] - 0.5 * grads[k] * (clip / norm), rtol=1e-12)
    # a clip above the norm changes nothing
    p2 = {k: v.copy() for k, v in ref.items()}
    cm.train_step(p2, x, y, lr=0.5, clip=norm * 2)
    for k in p2:
        np.testing.assert_allclose(p2[k], ref[k] - 0.5 * grads[k], rtol=1e-12)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.1"])
def test_bad_learning_rate_is_named(bad):
    from chainrule.runtime.optim import Adam
    with pytest.raises(ValueError, match=r"Adam: the learning rate must be a finite number >= 0, got"):
        Adam(lr=bad)


def test_bad_hyperparameters_are_named():
    from chainrule.runtime.optim import SGD, Adam, AdamW, Momentum
    with pytest.raises(ValueError, match=r"weight_decay must be >= 0, got -0.1"):
        AdamW(weight_decay=-0.1)
    with pytest.raises(ValueError, match=r"beta1 must be < 1, got 1.0"):
        Adam(beta1=1.0)
    with pytest.raises(TypeError, match=r"no hyperparameter 'beta1'"):
        Momentum(beta1=0.9)
    with pytest.raises(ValueError, match=r"clipnorm must be > 0"):
        SGD(0.1, clipnorm=0)
    opt = SGD(0.1)
    with pytest.raises(ValueError, match=r"SGD: the learning rate must be a finite number >= 0, got -1"):
        opt.lr = -1


def test_explanations_come_from_the_declarations():
    import sympy as sp
    from chainrule.derive.optimizers import (GRAD, I, RULES, STEP, beta1, constant_gradient_solution,
                                             explain_decoupled_decay, explain_optimizer, mu, eta)
    g = GRAD[I]
    assert sp.simplify(constant_gradient_solution(RULES["adam"], "m") - (1 - beta1 ** STEP) * g) == 0
    assert sp.simplify(constant_gradient_solution(RULES["momentum"], "v")
                       - eta * g * (1 - mu ** STEP) / (mu - 1)) == 0
    assert constant_gradient_solution(RULES["adagrad"], "G") == STEP * g ** 2
    md = explain_optimizer("adam").to_markdown()
    assert "Bias correction" in md
    assert r"\Delta \theta_{i} = - \frac{\eta g_{i}}{\epsilon + \left|{g_{i}}\right|}" in md
    assert "Bias correction" not in explain_optimizer("rmsprop").to_markdown()   # nothing to correct
    dd = explain_decoupled_decay().to_markdown()
    assert r"- \frac{\eta \lambda \theta_{i}}{\epsilon + \lambda \left|{\theta_{i}}\right|}" in dd
    assert r"\Delta \theta_{i}\big|_{\mathrm{decoupled}} = - \eta \lambda \theta_{i}" in dd


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_unfused_path_is_the_same_declaration(name, compiled_with):
    """fused=False evaluates the declared equations with NumPy (lambdify): same steps."""
    from chainrule.runtime.optim import OPTIMIZERS
    _, hyper = CASES[name]
    fused_cm, sgd_cm = compiled_with(SPEC, name), compiled_with(SPEC, "sgd")
    x, y = _data()
    a, b = fused_cm.init_params(seed=1), sgd_cm.init_params(seed=1)
    fa, fb = OPTIMIZERS[name](**hyper), OPTIMIZERS[name](fused=False, **hyper)
    for _ in range(4):
        fa.step(fused_cm, a, x, y)
        fb.step(sgd_cm, b, x, y)          # only loss_and_grads of this module is used
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-12, atol=1e-15)
        assert not np.array_equal(a[k], sgd_cm.init_params(seed=1)[k])


@pytest.mark.latex
def test_optimizer_and_regulariser_explanations_render(tmp_path):
    """KaTeX renders every equation of the optimiser explanations and of a model with every
    regulariser; pdflatex compiles Adam's explanation and AdamW vs L2."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from latex_tools import extract_math, format_katex_errors, katex_errors, need_katex
    from test_explain_latex import _pdflatex
    from chainrule.derive import ACTIVATIONS, Activation, Dense, explain_model, sequential
    from chainrule.derive.layers import ActivityRegularization, Dropout, GaussianNoise, LayerNorm
    from chainrule.derive.optimizers import RULES, explain_decoupled_decay, explain_optimizer
    need_katex()
    docs = [explain_optimizer(n) for n in RULES] + [explain_decoupled_decay()]
    relu = Activation("relu", ACTIVATIONS["relu"])
    docs.append(explain_model(sequential(3, [GaussianNoise(0.1), Dense(4, l2=0.01, l1=0.001, max_norm=2.0),
                                             LayerNorm(), relu, ActivityRegularization(l2=0.1),
                                             Dropout(0.5), Dense(2)], "mse")))
    items = []
    for doc in docs:
        items += extract_math(doc.to_markdown()) + [(eq, True) for eq in doc.equations()]
    errors = katex_errors(items)
    assert not errors, format_katex_errors(errors)
    for k, doc in enumerate([docs[list(RULES).index("adam")], docs[len(RULES)]]):
        target = tmp_path / f"opt{k}.tex"
        target.write_text(doc.to_latex())
        code, log = _pdflatex(target)
        problems = [ln for ln in log.splitlines()
                    if ln.startswith("!") or "Missing character" in ln or "Warning" in ln]
        assert code == 0 and not problems, problems[:5]
