"""Generative models: a cost over several heads (a Term with no target, weighted losses, outputs with
no loss), the reparameterisation trick and the Gaussian KL term (derived and checked against their
definitions), concat along the channels, and the generated ``outputs`` / ``input_grads`` kernels
against finite differences."""
from __future__ import annotations

import math

import numpy as np
import pytest
import sympy as sp

from chainrule.derive import ACTIVATIONS, Activation, Dense, SpecError, derive, explain_model
from chainrule.derive.functional import Input, concat, functional_model, gaussian_sample
from chainrule.derive.generative import (GaussianKL, MU, SIGMA, autoencoder, gaussian_kl, generator_losses,
                                         kl_explanation, kl_in_logvar, reparameterisation_explanation, vae)
from chainrule.derive.verify import verify_model


@pytest.fixture(scope="module")
def small_vae():
    return vae(n_in=5, hidden=(4,), latent=3, name="vae-small")


@pytest.fixture(scope="module")
def small_vae_compiled(small_vae, compiled_declared, kernel_cache_dir):
    from chainrule.codegen import compile_model
    return compile_model(small_vae, cache_dir=kernel_cache_dir, input_grads=True)


# -- the KL term -------------------------------------------------------------------------------------
def test_the_derived_kl_is_the_textbook_closed_form_exactly():
    lv = sp.Symbol("lv", real=True)
    textbook = -sp.Rational(1, 2) * (1 + lv - MU ** 2 - sp.exp(lv))
    assert sp.simplify(kl_in_logvar(MU, lv) - textbook) == 0
    moments = gaussian_kl().symbols["moments"]
    assert moments == {0: 1, 1: MU, 2: MU ** 2 + SIGMA ** 2}


@pytest.mark.parametrize("mu,sigma", [(0.3, 0.7), (-1.7, 1.9), (2.5, 0.45)])
def test_the_kl_closed_form_matches_its_definition_by_quadrature(mu, sigma):
    from scipy.integrate import quad

    def integrand(z):                                   # q(z) log(q(z) / p(z)), written out by hand
        log_q = -0.5 * ((z - mu) / sigma) ** 2 - math.log(sigma * math.sqrt(2 * math.pi))
        log_p = -0.5 * z ** 2 - 0.5 * math.log(2 * math.pi)
        return math.exp(log_q) * (log_q - log_p)
    reference, _ = quad(integrand, mu - 30 * sigma, mu + 30 * sigma, limit=200)
    closed = float(gaussian_kl().result.subs({MU: mu, SIGMA: sigma}))
    assert closed == pytest.approx(reference, rel=1e-9, abs=1e-12)
    assert closed > 0


def test_the_kl_explanation_prints_the_derived_steps():
    tex = "\n".join(getattr(b, "tex", getattr(b, "text", "")) for b in kl_explanation())
    assert r"E{\left(z^{2} \right)} = \mu^{2} + \sigma^{2}" in tex
    assert r"\frac{\mu^{2}}{2}" in tex


# -- the VAE: several heads, one cost ------------------------------------------------------------------
def test_the_vae_cost_combines_the_reconstruction_and_the_weighted_kl(small_vae):
    m = small_vae
    assert [t.name for t in m.outputs] == ["p5", "z2", "z3"]          # reconstruction, μ, log σ²
    assert [t.name for t in m.tensors.values() if t.role == "target"] == ["y5"]
    assert [t.name for t in m.tensors.values() if t.role == "noise"] == ["eps3"]
    cost = m.equation_for("C").body
    (w, value), = m.constants.items()
    assert value == pytest.approx(1 / 5)
    b = sp.Symbol("b", integer=True)
    assert cost.has(w * sp.IndexedBase("l5_2", real=True)[b])


def test_the_vae_gradients_verify_exactly_at_two_size_assignments(small_vae):
    grads = derive(small_vae)
    checks = verify_model(small_vae, grads)
    assert {c.name.split("dC/d")[1] for c in checks} == {p.name for p in small_vae.params}
    assert all(checks)
    # μ and log σ² each get two contributions: through the sample z and through the KL term
    assert len(grads.derivations["z2"].contributions) == 2
    assert len(grads.derivations["z3"].contributions) == 2


def test_the_reparameterisation_derivatives_come_from_the_sampling_equation(small_vae):
    text = "\n".join(getattr(b, "text", "") + " ".join(getattr(b, "items", []))
                     for b in reparameterisation_explanation(small_vae))
    assert r"\frac{\partial z_{bi}}{\partial \mu_{bi}} = 1" in text
    assert (r"\frac{\partial z_{bi}}{\partial {\log\sigma^{2}_{bi}}} = "
            r"\frac{e^{\frac{{\log\sigma^{2}_{bi}}}{2}} \varepsilon_{bi}}{2}") in text
    md = explain_model(small_vae).to_markdown()
    assert "KL divergence of N(μ, σ²) from N(0, 1), per example" in md


def test_a_term_needs_tensors_of_one_shape_and_the_cost_needs_a_loss():
    x = Input(4, name="x")
    with pytest.raises(Exception, match="reads tensors of one shape"):
        functional_model(x, [(Dense(2)(x), Dense(3)(x))], [GaussianKL()])
    with pytest.raises(SpecError, match="at least one loss"):
        functional_model(x, Dense(2)(x), [None])
    with pytest.raises(SpecError, match="2 losses need 2 weights"):
        functional_model(x, [Dense(2)(x), Dense(2)(x)], ["mse", "mse"], weights=[1])


# -- the generated kernels ---------------------------------------------------------------------------
def _numeric_input_grad(cm, params, x, y, seed, h=1e-6):
    num = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        num[idx] = (cm.cost(params, xp, y, seed=seed) - cm.cost(params, xm, y, seed=seed)) / (2 * h)
    return num


def test_input_gradients_match_finite_differences(small_vae_compiled):
    cm = small_vae_compiled
    params = cm.init_params(seed=1)
    rng = np.random.default_rng(0)
    x, y = rng.random((3, 5)), rng.random((3, 5))
    cost, grads = cm.input_grads(params, x, y, seed=3)
    assert cost == pytest.approx(cm.cost(params, x, y, seed=3), rel=1e-12)
    num = _numeric_input_grad(cm, params, x, y, seed=3)
    assert np.abs(num).max() > 1e-3
    assert np.allclose(grads["x"], num, rtol=1e-6, atol=1e-8)


def test_outputs_reports_every_head_in_evaluation_mode(small_vae_compiled):
    cm = small_vae_compiled
    params = cm.init_params(seed=2)
    x = np.random.default_rng(1).random((4, 5))
    out = cm.outputs(params, x)
    assert list(out) == ["p5", "z2", "z3"]
    assert np.allclose(out["p5"], cm.predict(params, x))
    relu = lambda v: np.maximum(v, 0)                            # noqa: E731  by hand, from the parameters
    h = relu(x @ params["W1"].T + params["b1"])
    assert np.allclose(out["z2"], h @ params["W2"].T + params["b2"])
    assert np.allclose(out["z3"], h @ params["W3"].T + params["b3"])


def test_the_vae_decoder_is_the_vae_s_last_layers(small_vae, small_vae_compiled, kernel_cache_dir):
    from chainrule.codegen import compile_model
    from chainrule.derive.generative import vae_decoder
    from chainrule.runtime.generative import vae_decoder_params
    decoder = vae_decoder(n_in=5, hidden=(4,), latent=3)
    dec = compile_model(decoder, cache_dir=kernel_cache_dir)
    params = small_vae_compiled.init_params(seed=3)
    x = np.random.default_rng(0).random((4, 5))
    out = small_vae_compiled.outputs(params, x)
    assert np.allclose(dec.predict(vae_decoder_params(params, decoder), out["z2"]), out["p5"])


def test_a_module_without_input_gradients_says_how_to_get_them(compiled_declared):
    cm = compiled_declared("ae-tiny", lambda: autoencoder(n_in=5, hidden=(3,), latent=2, name="ae-tiny"))
    with pytest.raises(Exception, match="input_grads=True"):
        cm.input_grads(cm.init_params(), np.ones((2, 5)), np.ones((2, 5)))
    out = cm.outputs(cm.init_params(), np.full((3, 5), 0.5))
    assert [v.shape for v in out.values()] == [(3, 5), (3, 2)]


# -- concat beyond (batch, features) ------------------------------------------------------------------
def test_concat_joins_channels_of_rank_3_and_4_tensors_and_verifies():
    from chainrule.derive.conv import Flatten
    a, b = Input((2, 5), name="a"), Input((3, 5), name="b")
    c = concat(a, b)
    model = functional_model([a, b], Dense(2)(Flatten()(c)), "mse", name="concat-1d")
    assert model.concrete_shape(model.equation_for("c").out, B=1) == (1, 5, 5)     # 2 + 3 channels
    assert all(verify_model(model, points=1))
    img, mask = Input((1, 4, 4), name="img"), Input((2, 4, 4), name="mask")
    both = concat(img, mask)
    m2 = functional_model([img, mask], Dense(2)(Flatten()(both)), "mse", name="concat-2d")
    assert m2.concrete_shape(m2.equation_for("c").out, B=1) == (1, 3, 4, 4)
    assert all(verify_model(m2, points=1))
    with pytest.raises(Exception, match="concat along axis 1 needs equal other axes"):
        c6 = Input((3, 6), name="c6")
        functional_model([a, c6], Dense(2)(Flatten()(concat(a, c6))), "mse")


def test_the_gan_generator_losses_are_derived_from_the_declared_bce():
    losses = generator_losses()
    _, grad_mm, at0_mm = losses["minimax"]
    _, grad_ns, at0_ns = losses["non-saturating"]
    D = sp.Symbol("D", positive=True)
    assert sp.simplify(grad_mm + D) == 0 and at0_mm == 0          # vanishes where D(G(z)) -> 0
    assert sp.simplify(grad_ns - (D - 1)) == 0 and at0_ns == -1   # keeps magnitude 1 there


def test_the_generative_documents_print_the_derived_closed_forms():
    from chainrule.derive.generative import diffusion_marginal, diffusion_posterior, generative_documents
    docs = {k: v.to_markdown() for k, v in generative_documents().items()}
    assert set(docs) == {"vae", "gan", "diffusion"}
    assert sp.latex(diffusion_marginal().result) in docs["diffusion"]
    assert sp.latex(diffusion_posterior().symbols["var"]) in docs["diffusion"]
    assert r"\left.\frac{\partial \ell_G}{\partial s}\right|_{D = 0} = -1" in docs["gan"]
    assert "The reparameterisation trick" in docs["vae"]


def test_a_model_with_two_targets_trains_through_its_compiled_module(compiled_declared):
    """Two heads, two losses with their own targets (a class and a regression value), one cost."""
    from chainrule.runtime import Network
    from chainrule.derive import UnsupportedError

    def build():
        x = Input(4, name="x")
        h = Activation("tanh", ACTIVATIONS["tanh"])(Dense(6)(x))
        return functional_model(x, [Dense(3)(h), Dense(1)(h)], ["softmax_cross_entropy", "mse"],
                                weights=[1, 0.5], name="two-heads")
    cm = compiled_declared("two-heads", build)
    assert cm.target_names == ["y3", "y3_2"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4))
    labels = np.eye(3)[(x[:, 0] > 0).astype(int) + (x[:, 1] > 0)]
    value = (x[:, 2] * x[:, 3])[:, None]
    params = cm.init_params(seed=0)
    # the gradient of the combined cost against finite differences, on a few parameters
    _, grads = cm.loss_and_grads(params, x[:5], [labels[:5], value[:5]])
    for name in ("W1", "W2", "W3"):                  # the shared layer and each head
        k = (0, 2)
        p_plus = {n: a.copy() for n, a in params.items()}
        p_minus = {n: a.copy() for n, a in params.items()}
        p_plus[name][k] += 1e-6
        p_minus[name][k] -= 1e-6
        num = (cm.cost(p_plus, x[:5], {"y3": labels[:5], "y3_2": value[:5]})
               - cm.cost(p_minus, x[:5], {"y3": labels[:5], "y3_2": value[:5]})) / 2e-6
        assert grads[name][k] == pytest.approx(num, rel=1e-6, abs=1e-9)
    first = cm.cost(params, x, [labels, value])
    for step in range(1, 201):
        cm.train_step(params, x, [labels, value], lr=0.2, step=step)
    assert cm.cost(params, x, [labels, value]) < 0.6 * first
    with pytest.raises(Exception, match="takes 2 targets"):
        cm.cost(params, x, labels)
    with pytest.raises(UnsupportedError, match="one target"):
        Network(cm.model, compiled=cm)
