"""Generative models trained: the GAN's two-module generator step against the one-graph derivation,
the VAE's decoder inside the VAE, the DDPM's derived closed forms against simulation and an exact
noise oracle, the measures (mode coverage, MMD), and short runs that learn (the full runs, with
the goals the examples quote, are marked slow)."""
from __future__ import annotations

import io

import numpy as np
import pytest

from chainrule.runtime import generative as gen


# -- the GAN: the generator trained through the discriminator's derived input gradient ------------------
def test_the_two_module_generator_step_equals_the_one_graph_derivation(kernel_cache_dir):
    from chainrule.codegen import compile_model
    g_model, d_model = gen.gan_models(5, 3, (4,), (6,))
    joint = gen.gan_through_discriminator(5, 3, (4,), (6,))
    G = compile_model(g_model, cache_dir=kernel_cache_dir)
    D = compile_model(d_model, cache_dir=kernel_cache_dir, input_grads=True)
    J = compile_model(joint, cache_dir=kernel_cache_dir)
    pg, pd = G.init_params(seed=1), D.init_params(seed=2)
    joint_params = dict(zip(J.param_names, [pg[k] for k in G.param_names] + [pd[k] for k in D.param_names]))
    z = np.random.default_rng(0).standard_normal((7, 3))
    ones = np.ones((7, 1))
    fake = G.predict(pg, z)
    d_cost, dx = D.input_grads(pd, fake, ones)
    _, g_grads = G.loss_and_grads(pg, z, len(z) * dx["x"])          # the pullback of B ∂C/∂x̂
    j_cost, j_grads = J.loss_and_grads(joint_params, z, ones)
    assert d_cost == pytest.approx(j_cost, rel=1e-12)
    for mine, theirs in zip(G.param_names, J.param_names):
        assert np.abs(j_grads[theirs]).max() > 1e-6
        assert np.allclose(g_grads[mine], j_grads[theirs], rtol=1e-10, atol=1e-13), mine


@pytest.mark.slow
def test_a_short_gan_run_moves_the_generator_towards_the_ring():
    g_model, d_model = gen.gan_models(2, 4, (32,), (32,))
    gan = gen.GAN(g_model, d_model, 4, lr_g=2e-3, lr_d=2e-3, seed=0)
    rng = np.random.default_rng(1)
    data = gen.sample_ring(1000, np.random.default_rng(2))
    before = gen.mmd_rbf(gan.sample(500), data[:500])
    for _ in range(300):
        gan.step(gen.sample_ring(128, rng))
    after = gen.mmd_rbf(gan.sample(500), data[:500])
    assert after < 0.5 * before, (before, after)


# -- measures ----------------------------------------------------------------------------------------
def test_mode_coverage_counts_the_modes_a_sample_reaches():
    rng = np.random.default_rng(0)
    data = gen.sample_ring(2000, rng, std=0.05)
    full = gen.mode_coverage(data, gen.ring_centres(), 0.05)
    assert full["covered"] == 8 and full["high_quality"] > 0.98
    three = gen.ring_centres()[[0, 3, 5]]
    collapsed = three[rng.integers(3, size=2000)] + 0.05 * rng.standard_normal((2000, 2))
    assert gen.mode_coverage(collapsed, gen.ring_centres(), 0.05)["covered"] == 3
    assert gen.mmd_rbf(data[:500], data[500:1000]) < 0.01 < gen.mmd_rbf(collapsed[:500], data[:500])
    assert 0.4 < gen.two_sample_accuracy(data[:500], data[500:1000]) < 0.6


# -- the DDPM's closed forms ---------------------------------------------------------------------------
def test_the_closed_form_of_q_xt_given_x0_matches_simulating_the_chain():
    from chainrule.derive.generative import diffusion_schedule
    betas = np.linspace(1e-3, 0.05, 60)
    s = diffusion_schedule(betas)
    rng = np.random.default_rng(0)
    x0 = np.full(40000, 1.7)
    x = x0.copy()
    for t, beta in enumerate(betas, 1):                     # the one-step recursion, by hand
        x = np.sqrt(1 - beta) * x + np.sqrt(beta) * rng.standard_normal(x.shape)
        if t in (1, 17, 60):
            assert x.mean() == pytest.approx(s["signal"][t - 1] * 1.7, abs=0.02)
            assert x.std() == pytest.approx(s["noise"][t - 1], rel=0.02)
    assert np.allclose(s["signal"] ** 2 + s["noise"] ** 2, 1.0)


def test_sampling_with_the_exact_noise_predictor_recovers_a_gaussian():
    """For data x_0 ~ N(m, v) the best noise prediction is E[ε | x_t] = b (x_t - a m) / (a² v + b²)
    (a, b the derived signal and noise coefficients); the derived reverse step must then draw N(m, v)."""
    m, v = np.array([1.5, -0.5]), np.array([0.09, 0.25])
    ddpm = gen.DDPM(net=None, steps=200, seed=0)
    s = ddpm.schedule

    def oracle(x, t):
        a, b = s["signal"][t - 1], s["noise"][t - 1]
        return b * (x - a * m) / (a * a * v + b * b)
    x = ddpm.sample(20000, predict_noise=oracle)
    assert np.allclose(x.mean(0), m, atol=0.02)
    assert np.allclose(x.var(0), v, rtol=0.06)


# -- autoencoders ---------------------------------------------------------------------------------------
def test_a_short_autoencoder_run_beats_pca_at_the_same_code_size(tmp_path):
    out = io.StringIO()
    r = gen.run_autoencoder(str(tmp_path), epochs=12, progress=False, stream=out, latent=2, hidden=(64,),
                            lr=1e-2, document=False)
    assert r["mse"] < r["pca_mse"], out.getvalue()
    assert "PCA" in out.getvalue() and (tmp_path / "latent.png").stat().st_size > 10_000


# -- the full examples (the goals quoted in the README) -----------------------------------------------
@pytest.mark.slow
def test_full_generative_examples_meet_their_goals(tmp_path):
    from chainrule.runtime.examples import run_example
    r = run_example("autoencoder", out_dir=str(tmp_path / "ae"), progress=False, stream=io.StringIO())
    assert r["mse"] < 0.8 * r["pca_mse"]
    r = run_example("gan-ring", out_dir=str(tmp_path / "ring"), progress=False, stream=io.StringIO())
    assert r["covered"] == 8
    r = run_example("ddpm", out_dir=str(tmp_path / "ddpm"), progress=False, stream=io.StringIO())
    assert r["two_sample_accuracy"] < 0.6
    r = run_example("vae", out_dir=str(tmp_path / "vae"), progress=False, stream=io.StringIO())
    assert r["neg_elbo"] < 0.40


def test_the_one_graph_derivation_shows_the_generator_gradient_through_the_discriminator():
    from chainrule.derive import derive
    joint = gen.gan_through_discriminator(3, 2, (4,), (5,))
    composed = derive(joint).composed
    g_out = "z2"                                     # the generator's output layer (dense, level 2)
    reads = {r for r, _ in composed[g_out].equation.reads()}
    assert "W3" in reads                             # the discriminator's first weights carry δ back into G
    assert {"W1", "W2"} <= set(composed)             # and the generator's parameters get gradients


def test_every_generative_example_has_a_loop():
    from chainrule.runtime.examples import EXAMPLES
    runners = {ex.runner for ex in EXAMPLES.values() if ex.runner}
    assert runners == set(gen.RUNNERS)
