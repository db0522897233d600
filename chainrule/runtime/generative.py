"""Generative models trained with generated kernels: autoencoders (plain, denoising, variational), a
GAN (two networks, two costs, alternating updates) and a DDPM on 2-D data.

The runtime never differentiates: every gradient comes from a derived, compiled model. What is new
here is the orchestration: a GAN's generator is trained through the discriminator's *derived input
gradient* (``compile_model(..., input_grads=True)``), pulled back through the generator by its
``pullback`` loss; a DDPM's noising and sampling use the closed forms that
``chainrule.derive.generative`` derives. Each ``run_*`` writes its plots and its derivation document
and returns its measures.
"""
from __future__ import annotations

import math
import os
import sys
import time

import numpy as np

from ..atomic import atomic_write_text
from .plots import _pyplot, _save

def one_blas_thread(fn):
    """Run ``fn`` with BLAS limited to one thread. These loops make many small matrix products, for
    which a second BLAS thread only adds contention: on the project's 2-core machine under load, one
    GAN step on the ring took 0.32 s with the default threads and 0.023 s with one."""
    import functools

    @functools.wraps(fn)
    def run(*args, **kw):
        from chainrule.codegen.blas import load_kernel_blas
        load_kernel_blas()                # the BLAS the kernels call, loaded so that it is limited too
        from threadpoolctl import threadpool_limits
        with threadpool_limits(1):
            return fn(*args, **kw)
    return run


# -- measures ---------------------------------------------------------------------------------------


def mmd_rbf(a, b, bandwidth=None) -> float:
    """The unbiased squared maximum mean discrepancy between samples ``a`` and ``b`` with a Gaussian
    kernel (bandwidth: the median distance of the pooled samples, unless given)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    pooled = np.concatenate([a, b])
    sq = np.sum(pooled ** 2, 1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * pooled @ pooled.T, 0.0)
    if bandwidth is None:
        bandwidth = math.sqrt(np.median(d2[np.triu_indices(len(pooled), 1)]) / 2)
    k = np.exp(-d2 / (2 * bandwidth ** 2))
    n, m = len(a), len(b)
    kaa, kbb, kab = k[:n, :n], k[n:, n:], k[:n, n:]
    return float((kaa.sum() - np.trace(kaa)) / (n * (n - 1)) + (kbb.sum() - np.trace(kbb)) / (m * (m - 1))
                 - 2 * kab.mean())


def two_sample_accuracy(a, b, seed=0, neighbours=10) -> float:
    """The 5-fold cross-validated accuracy of a k-nearest-neighbour classifier told to separate
    ``a`` from ``b`` (equal sizes): 0.5 when it cannot tell them apart, 1.0 when it always can."""
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    n = min(len(a), len(b))
    x = np.concatenate([a[:n], b[:n]])
    y = np.r_[np.zeros(n), np.ones(n)]
    perm = np.random.default_rng(seed).permutation(2 * n)
    return float(cross_val_score(KNeighborsClassifier(neighbours), x[perm], y[perm], cv=5).mean())


def ring_centres(modes=8, radius=2.0):
    angles = 2 * np.pi * np.arange(modes) / modes
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], 1)


def sample_ring(n, rng, modes=8, radius=2.0, std=0.05):
    """The ring of ``modes`` Gaussians: a centre drawn uniformly, plus isotropic noise of ``std``."""
    centres = ring_centres(modes, radius)
    return centres[rng.integers(modes, size=n)] + std * rng.standard_normal((n, 2))


def mode_coverage(samples, centres, std, radius_in_std=3.0, share=0.2) -> dict:
    """How a sample covers the modes: a sample *hits* the nearest centre when it lies within
    ``radius_in_std`` standard deviations of it; a mode is *covered* when it gets at least ``share``
    of its fair share of the samples (1/modes of them). Returns the number covered, the hits per
    mode and the fraction of samples that hit a mode (the high-quality fraction)."""
    d = np.linalg.norm(samples[:, None, :] - centres[None, :, :], axis=2)
    nearest, dist = d.argmin(1), d.min(1)
    hit = dist <= radius_in_std * std
    counts = np.bincount(nearest[hit], minlength=len(centres))
    needed = share * len(samples) / len(centres)
    return {"covered": int((counts >= needed).sum()), "counts": counts.tolist(),
            "high_quality": float(hit.mean()), "needed": needed}


def pca_reconstruction(x_train, x_test, components) -> np.ndarray:
    """``x_test`` through scikit-learn's PCA fitted on ``x_train`` (the baseline at equal code size)."""
    from sklearn.decomposition import PCA
    pca = PCA(components).fit(x_train)
    return pca.inverse_transform(pca.transform(x_test))


def pca_test_error(x_train, x_test, components) -> float:
    """Mean squared reconstruction error on ``x_test`` of PCA fitted on ``x_train``."""
    return float(np.mean((pca_reconstruction(x_train, x_test, components) - x_test) ** 2))


# -- plots ------------------------------------------------------------------------------------------
def image_rows(rows, path, titles=(), side=8):
    """One row of ``side``×``side`` images per entry of ``rows`` (arrays of flat images in [0, 1])."""
    plt = _pyplot()
    n = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.8, len(rows) * 0.9), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(row):
                ax.imshow(np.asarray(row[j]).reshape(side, side), cmap="gray_r", vmin=0, vmax=1)
        if i < len(titles):
            axes[i][0].set_title(titles[i], fontsize=8, loc="left")
    return _save(fig, path)


def image_grid(images, path, cols=10, side=8, title=""):
    rows = [images[k:k + cols] for k in range(0, len(images), cols)]
    return image_rows(rows, path, titles=[title] if title else (), side=side)


def scatter_codes(codes, labels, path, title):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    sc = ax.scatter(codes[:, 0], codes[:, 1], c=labels, cmap="tab10", s=6)
    fig.colorbar(sc, ax=ax, ticks=range(10), label="digit")
    ax.set_title(title)
    return _save(fig, path)


def samples_vs_data(panels, data, path):
    """Generated 2-D samples (``panels``: (title, samples) pairs) over the data, side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    lim = np.abs(data).max() * 1.3
    for ax, (title, s) in zip(axes[0], panels):
        ax.scatter(data[:, 0], data[:, 1], s=3, c="#bbbbbb", label="data")
        ax.scatter(s[:, 0], s[:, 1], s=3, c="#d62728", label="samples")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=9)
    axes[0][0].legend(loc="lower left", fontsize=7, markerscale=3)
    return _save(fig, path)


# -- helpers ----------------------------------------------------------------------------------------
def _network(model, lr, seed, dtype, input_grads=False, beta1=None):
    from chainrule.codegen import compile_model

    from .model import Network
    from .optim import Adam
    opt = Adam(lr, beta1=beta1) if beta1 is not None else Adam(lr)
    cm = compile_model(model, dtype=dtype, optimizer="adam", input_grads=input_grads)
    return Network(model, dtype=dtype, seed=seed, optimizer=opt, compiled=cm)


def _document(path, model, title, extra=()):
    from chainrule.derive import explain_model
    doc = explain_model(model, title=title)
    doc.blocks = doc.blocks[:2] + list(extra) + doc.blocks[2:]     # after the layers and the notation
    atomic_write_text(path, doc.to_markdown())
    return path


def _digits_split(dtype):
    from .data import load_digits, train_test_split
    x, y = load_digits(dtype=dtype)
    return train_test_split(x, y, test_size=0.2, seed=0)


def _say(stream, text):
    print(text, file=stream if stream is not None else sys.stdout)


# -- autoencoders -----------------------------------------------------------------------------------
@one_blas_thread
def run_autoencoder(out_dir, epochs=60, progress=True, seed=0, dtype="float64", stream=None,
                    latent=2, hidden=(128, 32), lr=3e-3, document=True) -> dict:
    """An autoencoder on the digits with a ``latent``-wide code, against PCA with as many components."""
    from chainrule.derive.generative import autoencoder
    t0 = time.perf_counter()
    model = autoencoder(latent=latent, hidden=hidden, activation="relu", name="autoencoder")
    x_tr, x_te, y_tr, y_te = _digits_split(dtype)
    net = _network(model, lr, seed, dtype)
    _say(stream, f"autoencoder: 64 -> {' -> '.join(map(str, hidden))} -> {latent} -> ... -> 64 on the digits; "
                 f"{net.n_params()} parameters; {epochs} epochs")
    net.fit(x_tr, x_tr, epochs=epochs, batch_size=32, progress=progress, seed=seed)
    out = net.compiled.outputs(net.params, x_te)
    recon, code = out[model.outputs[0].name], out[model.outputs[1].name]
    ae = float(np.mean((recon - x_te) ** 2))
    pca_recon = pca_reconstruction(x_tr, x_te, latent)        # one fit: the error and the picture
    pca = float(np.mean((pca_recon - x_te) ** 2))
    paths = {"reconstructions": image_rows([x_te[:10], recon[:10], np.clip(pca_recon[:10], 0, 1)],
                                           os.path.join(out_dir, "reconstructions.png"),
                                           ["test digits", f"autoencoder ({latent}-d code)", f"PCA ({latent} components)"])}
    if latent == 2:
        paths["latent"] = scatter_codes(code, y_te, os.path.join(out_dir, "latent.png"),
                                        "autoencoder codes of the test digits")
    if document:
        paths["derivation"] = _document(os.path.join(out_dir, "derivation.md"), model,
                                        "Backpropagation in the example `autoencoder`")
    _say(stream, f"test reconstruction MSE with a {latent}-d code: autoencoder {ae:.4f}, "
                 f"PCA {pca:.4f} (ratio {ae / pca:.2f})")
    return {"mse": ae, "pca_mse": pca, "seconds": time.perf_counter() - t0, "network": net, **paths}


@one_blas_thread
def run_denoising(out_dir, epochs=40, progress=True, seed=0, dtype="float64", stream=None,
                  noise=0.3, latent=16, hidden=(128,), lr=3e-3, document=True) -> dict:
    """A denoising autoencoder: Gaussian noise of std ``noise`` on the input in training (the
    noise regulariser, drawn by the kernels), the clean digit as the target."""
    from chainrule.derive.generative import autoencoder
    t0 = time.perf_counter()
    model = autoencoder(latent=latent, hidden=hidden, activation="relu", noise=noise,
                        name="denoising-autoencoder")
    x_tr, x_te, y_tr, y_te = _digits_split(dtype)
    net = _network(model, lr, seed, dtype)
    _say(stream, f"denoising autoencoder: noise({noise}) -> 64 -> {hidden[0]} -> {latent} -> ... -> 64; "
                 f"{net.n_params()} parameters; {epochs} epochs")
    net.fit(x_tr, x_tr, epochs=epochs, batch_size=32, progress=progress, seed=seed)
    noisy = x_te + noise * np.random.default_rng(seed + 1).standard_normal(x_te.shape)
    clean = net.predict(noisy)
    from sklearn.decomposition import PCA
    p = PCA(latent).fit(x_tr)
    pca = p.inverse_transform(p.transform(noisy))
    errors = {"noisy": float(np.mean((noisy - x_te) ** 2)), "dae": float(np.mean((clean - x_te) ** 2)),
              "pca": float(np.mean((pca - x_te) ** 2))}
    paths = {"denoised": image_rows([x_te[:10], np.clip(noisy[:10], 0, 1), clean[:10], np.clip(pca[:10], 0, 1)],
                                    os.path.join(out_dir, "denoised.png"),
                                    ["clean", f"noisy (σ = {noise})", "denoised by the autoencoder",
                                     f"PCA ({latent} components)"])}
    if document:
        paths["derivation"] = _document(os.path.join(out_dir, "derivation.md"), model,
                                        "Backpropagation in the example `denoising-autoencoder`")
    _say(stream, f"test MSE to the clean digits: noisy input {errors['noisy']:.4f}, denoising autoencoder "
                 f"{errors['dae']:.4f}, PCA projection ({latent} components) {errors['pca']:.4f}")
    return {**errors, "seconds": time.perf_counter() - t0, "network": net, **paths}


def vae_decoder_params(vae_params: dict, decoder_model) -> dict:
    """The decoder's parameters inside a VAE's: the decoder's layers are the VAE's last ones, in the
    same order (``chainrule.derive.generative.vae_decoder`` declares them so)."""
    names = list(vae_params)
    mine = [p.name for p in decoder_model.params]
    return {m: vae_params[v] for m, v in zip(mine, names[len(names) - len(mine):])}


def vae_elbo(net, x, seeds=5) -> float:
    """The negative ELBO per pixel on ``x``: the cost with the sampling noise drawn (one sample per
    example), averaged over ``seeds`` draws."""
    return float(np.mean([net.compiled.cost(net.params, x, x, seed=s) for s in range(seeds)]))


@one_blas_thread
def run_vae(out_dir, epochs=150, progress=True, seed=0, dtype="float64", stream=None, latent=2,
            hidden=(128,), lr=2e-3, document=True) -> dict:
    from chainrule.codegen import compile_model
    from chainrule.derive.generative import (kl_explanation, reparameterisation_explanation, vae,
                                             vae_decoder)
    t0 = time.perf_counter()
    model = vae(latent=latent, hidden=hidden, name="vae")
    x_tr, x_te, y_tr, y_te = _digits_split(dtype)
    net = _network(model, lr, seed, dtype)
    _say(stream, f"variational autoencoder: 64 -> {hidden[0]} -> (μ, log σ²) {latent} -> z -> {hidden[0]} -> 64; "
                 f"{net.n_params()} parameters; {epochs} epochs")
    net.fit(x_tr, x_tr, epochs=epochs, batch_size=32, progress=progress, seed=seed)
    out = net.compiled.outputs(net.params, x_te)
    recon, mu = out[model.outputs[0].name], out[model.outputs[1].name]
    elbo = vae_elbo(net, x_te)
    decoder = vae_decoder(latent=latent, hidden=hidden)
    dec = compile_model(decoder, dtype=dtype)
    dparams = vae_decoder_params(net.params, decoder)
    z = np.random.default_rng(seed + 2).standard_normal((40, latent))
    samples = dec.predict(dparams, z)
    paths = {"reconstructions": image_rows([x_te[:10], recon[:10]], os.path.join(out_dir, "reconstructions.png"),
                                           ["test digits", "VAE reconstruction (z = μ)"]),
             "samples": image_grid(samples, os.path.join(out_dir, "samples.png"),
                                   title="decoded z ~ N(0, I)")}
    if latent == 2:
        paths["latent"] = scatter_codes(mu, y_te, os.path.join(out_dir, "latent.png"), "VAE means μ of the test digits")
    if document:
        paths["derivation"] = _document(os.path.join(out_dir, "derivation.md"), model,
                                        "Backpropagation in the example `vae`",
                                        kl_explanation() + reparameterisation_explanation(model))
    recon_mse = float(np.mean((recon - x_te) ** 2))
    _say(stream, f"test negative ELBO per pixel {elbo:.4f} (one sample per example, 5 draws); "
                 f"reconstruction MSE at z = μ {recon_mse:.4f}; PCA ({latent}) {pca_test_error(x_tr, x_te, latent):.4f}")
    return {"neg_elbo": elbo, "mse": recon_mse, "seconds": time.perf_counter() - t0, "network": net,
            "decoder": dec, "decoder_params": dparams, **paths}


# -- the GAN ----------------------------------------------------------------------------------------
class GAN:
    """Two networks, two costs, alternating updates.

    The discriminator D is an ordinary classifier of real (1) against generated (0) samples, with the
    binary cross-entropy on its logit. The generator G is trained through D: D's module is compiled
    with ``input_grads``, so that the derived gradient of D's cost with respect to its input ``x``
    is available; for the non-saturating loss that cost is D's with every generated sample labelled
    real. G's own loss is ``pullback``: ℓ_b = Σ_k g_bk x̂_bk, whose derived gradient passes
    g / B back through G; with g = B ∂C_D/∂x̂, G's parameters get exactly ∂C_D/∂θ_G, the chain rule
    through D and then G, each half derived and generated by the engine."""

    def __init__(self, generator, discriminator, z_dim, lr_g=1e-3, lr_d=1e-3, seed=0, dtype="float64",
                 beta1=0.5):
        self.G = _network(generator, lr_g, seed, dtype, beta1=beta1)
        self.D = _network(discriminator, lr_d, seed + 1, dtype, input_grads=True, beta1=beta1)
        self.z_dim, self.dtype = z_dim, np.dtype(dtype)
        self.rng = np.random.default_rng(seed)
        self.steps = 0

    def noise(self, n):
        return self.rng.standard_normal((n, self.z_dim)).astype(self.dtype)

    def sample(self, n):
        return self.G.compiled.predict(self.G.params, self.noise(n))

    def generator_gradient(self, z):
        """(D's cost on G(z) labelled real, the pullback target g = B ∂C/∂x̂ for G's loss)."""
        fake = self.G.compiled.predict(self.G.params, z)
        ones = np.ones((len(z), 1), dtype=self.dtype)
        cost, grads = self.D.compiled.input_grads(self.D.params, fake, ones)
        return cost, len(z) * grads[self.D.input_name]

    def step(self, real):
        """One discriminator update on real and generated samples, then one generator update."""
        n = len(real)
        fake = self.sample(n)
        x = np.concatenate([real, fake])
        y = np.r_[np.ones(n), np.zeros(n)].reshape(-1, 1).astype(self.dtype)
        d_cost = self.D.optimizer.step(self.D.compiled, self.D.params, x, y)
        z = self.noise(n)
        g_cost, g = self.generator_gradient(z)
        self.G.optimizer.step(self.G.compiled, self.G.params, z, g)
        self.steps += 1
        if not (math.isfinite(d_cost) and math.isfinite(g_cost)):
            from .errors import TrainingDiverged
            raise TrainingDiverged(f"GAN training diverged at step {self.steps}: discriminator cost "
                                   f"{d_cost}, generator cost {g_cost}", epoch=0, step=self.steps,
                                   cost=d_cost)
        return d_cost, g_cost


def gan_models(data_dim, z_dim, g_hidden, d_hidden, output="identity"):
    """The generator (z -> ... -> x̂, trained by its pullback loss) and the discriminator
    (x -> ... -> logit, binary cross-entropy) as layer-list specs."""
    from chainrule.derive import parse_spec
    g = " -> ".join([str(z_dim)] + [f"dense({w}) -> relu" for w in g_hidden] + [f"dense({data_dim})"]
                    + ([output] if output != "identity" else []) + ["pullback"])
    d = " -> ".join([str(data_dim)] + [f"dense({w}) -> leaky_relu" for w in d_hidden] + ["dense(1)", "bce_logits"])
    return parse_spec(g, name="generator"), parse_spec(d, name="discriminator")


def gan_through_discriminator(data_dim, z_dim, g_hidden, d_hidden, output="identity", name="gan-generator-step"):
    """G and D as one functional graph z -> G -> D -> BCE(·, real): the generator's step as the engine
    derives it in one piece (for the derivation document and for checking the two-module training)."""
    from chainrule.derive import Dense
    from chainrule.derive.functional import Input, functional_model
    from chainrule.derive.generative import _act
    z = Input(z_dim, name="z")
    h = z
    for w in g_hidden:
        h = _act("relu")(Dense(w)(h))
    h = Dense(data_dim)(h)
    if output != "identity":
        h = _act(output)(h)
    for w in d_hidden:
        h = _act("leaky_relu")(Dense(w)(h))
    return functional_model(z, Dense(1)(h), "bce_logits", name=name)


def _gan_document(path, data_dim, z_dim, g_hidden, d_hidden, output, title):
    from chainrule.derive.generative import gan_explanation
    from chainrule.derive.explain import Para
    model = gan_through_discriminator(data_dim, z_dim, g_hidden, d_hidden, output)
    n_g = 2 * (len(g_hidden) + 1)
    intro = [Para(f"The generator's step, derived as one graph: the generator's layers (parameters "
                  f"$W^{{(1)}}$ to $W^{{({n_g // 2})}}$) feed the discriminator's (the rest), and the cost is "
                  f"the discriminator's binary cross-entropy with the generated samples labelled real. "
                  f"The adjoint of the generator's output is the discriminator's input gradient: the "
                  f"training loop gets it from the discriminator's module (`input_grads`) and passes it to "
                  f"the generator's (`pullback` loss); the two halves below are what each one computes.")]
    return _document(path, model, title, gan_explanation() + intro)


@one_blas_thread
def run_gan_ring(out_dir, steps=4000, progress=True, seed=0, dtype="float64", stream=None, batch=256,
                 document=True, snapshots=(0.1, 0.4, 1.0)) -> dict:
    """A GAN on the ring of 8 Gaussians (radius 2, std 0.05)."""
    t0 = time.perf_counter()
    z_dim, g_hidden, d_hidden, std = 4, (128, 128), (128, 128), 0.05
    gen, disc = gan_models(2, z_dim, g_hidden, d_hidden)
    gan = GAN(gen, disc, z_dim, lr_g=1e-3, lr_d=1e-3, seed=seed, dtype=dtype)
    data_rng = np.random.default_rng(seed + 10)
    _say(stream, f"GAN on a ring of 8 Gaussians: G {gan.G.n_params()} parameters, D {gan.D.n_params()}; "
                 f"{steps} alternating steps of batch {batch}")
    panels, marks = [], sorted({max(1, int(round(f * steps))) for f in snapshots})
    for k in range(1, steps + 1):
        d_cost, g_cost = gan.step(sample_ring(batch, data_rng, std=std).astype(gan.dtype))
        if k in marks:
            panels.append((f"step {k}", gan.sample(1000)))
        if progress and (k % max(1, steps // 10) == 0):
            _say(stream, f"  step {k}/{steps}: D cost {d_cost:.3f}, G cost {g_cost:.3f}")
    samples = gan.sample(2000)
    data = sample_ring(2000, np.random.default_rng(seed + 20), std=std)
    cover = mode_coverage(samples, ring_centres(), std)
    mmd = mmd_rbf(samples, data)
    paths = {"samples": samples_vs_data(panels, data, os.path.join(out_dir, "samples.png"))}
    if document:
        paths["derivation"] = _gan_document(os.path.join(out_dir, "derivation.md"), 2, z_dim, g_hidden,
                                            d_hidden, "identity", "The GAN on the ring: derivation")
    _say(stream, f"modes covered: {cover['covered']}/8 (a sample hits a mode within 3 std = {3 * std:g} of its "
                 f"centre; a mode counts when it gets at least {cover['needed']:.0f} of 2000 samples, a fifth of "
                 f"its fair share); hits per mode {cover['counts']}; high-quality samples "
                 f"{cover['high_quality']:.1%}; MMD² to the data {mmd:.4f}")
    return {"covered": cover["covered"], "coverage": cover, "mmd": mmd, "seconds": time.perf_counter() - t0,
            "gan": gan, **paths}


@one_blas_thread
def run_gan_digits(out_dir, steps=8000, progress=True, seed=0, dtype="float64", stream=None, batch=64,
                   document=True, z_dim=32, g_hidden=(256,), d_hidden=(256,), lr=2e-4) -> dict:
    """A GAN on the 8×8 digits: a grid of samples. (Measured, seed 0: with these settings a 5-NN
    classifier reads the samples as every digit, 24 to 50 of 360 each, and the two-sample accuracy is
    0.695; with z 16, G (128, 128), D (64,) the generator collapsed onto 1s and 8s, accuracy 1.0.)"""
    t0 = time.perf_counter()
    gen, disc = gan_models(64, z_dim, g_hidden, d_hidden, output="sigmoid")
    gan = GAN(gen, disc, z_dim, lr_g=lr, lr_d=lr, seed=seed, dtype=dtype)
    x_tr, x_te, y_tr, y_te = _digits_split(dtype)
    rng = np.random.default_rng(seed + 10)
    _say(stream, f"GAN on the digits: G {gan.G.n_params()} parameters, D {gan.D.n_params()}; {steps} steps of batch {batch}")
    for k in range(1, steps + 1):
        d_cost, g_cost = gan.step(x_tr[rng.integers(len(x_tr), size=batch)])
        if progress and (k % max(1, steps // 10) == 0):
            _say(stream, f"  step {k}/{steps}: D cost {d_cost:.3f}, G cost {g_cost:.3f}")
    samples = gan.sample(len(x_te))
    acc = two_sample_accuracy(samples, x_te, seed=seed)
    from sklearn.neighbors import KNeighborsClassifier
    knn = KNeighborsClassifier(5).fit(x_tr, y_tr)
    classes = np.bincount(knn.predict(samples), minlength=10)
    paths = {"samples": image_grid(samples[:60], os.path.join(out_dir, "samples.png"), title="generated digits")}
    if document:
        paths["derivation"] = _gan_document(os.path.join(out_dir, "derivation.md"), 64, z_dim, g_hidden,
                                            d_hidden, "sigmoid", "The GAN on the digits: derivation")
    _say(stream, f"a 10-nearest-neighbour two-sample test tells samples from test digits with accuracy "
                 f"{acc:.3f} (0.5: indistinguishable); a 5-NN digit classifier reads the samples as "
                 f"{classes.tolist()} (digits 0-9)")
    return {"two_sample_accuracy": acc, "classes": classes.tolist(), "seconds": time.perf_counter() - t0,
            "gan": gan, **paths}


# -- the DDPM ---------------------------------------------------------------------------------------
def time_features(t, steps, width=16):
    """Sinusoidal features of the step t (data for the network, like a positional encoding)."""
    freqs = np.exp(np.linspace(0, math.log(200.0), width // 2))
    angle = (np.asarray(t, np.float64)[:, None] / steps) * freqs[None, :]
    return np.concatenate([np.sin(angle), np.cos(angle)], 1)


def ddpm_model(data_dim=2, width=16, hidden=(128, 128, 128), name="ddpm-denoiser"):
    """ε_θ(x_t, t): the noisy point and the step's features, concatenated, through an MLP, trained
    with the mean squared error against the noise that was added."""
    from chainrule.derive import Dense
    from chainrule.derive.functional import Input, concat, functional_model
    from chainrule.derive.generative import _act
    x, t = Input(data_dim, name="x_t"), Input(width, name="t_emb")
    h = concat(x, t)
    for w in hidden:
        h = _act("relu")(Dense(w)(h))
    return functional_model([x, t], Dense(data_dim)(h), "mse", name=name)


class DDPM:
    """Training pairs by the derived closed form of q(x_t | x_0); sampling by the derived reverse mean."""

    def __init__(self, net, steps=200, beta=(1e-4, 0.04), width=16, seed=0):
        from chainrule.derive.generative import diffusion_schedule
        self.net, self.T, self.width = net, steps, width
        self.schedule = diffusion_schedule(np.linspace(beta[0], beta[1], steps))
        self.rng = np.random.default_rng(seed)

    def noised(self, x0):
        """(x_t, features of t, ε) for a t drawn uniformly from 1..T per example."""
        t = self.rng.integers(1, self.T + 1, size=len(x0))
        eps = self.rng.standard_normal(x0.shape)
        s = self.schedule
        xt = s["signal"][t - 1, None] * x0 + s["noise"][t - 1, None] * eps
        return xt, time_features(t, self.T, self.width), eps

    def train(self, data, epochs, batch_size=128, progress=False, stream=None):
        losses = []
        for epoch in range(epochs):
            xt, temb, eps = self.noised(data)
            h = self.net.fit([xt, temb], eps, epochs=1, batch_size=batch_size, progress=False,
                             seed=int(self.rng.integers(2 ** 31)), diagnostics=False)
            losses.append(h["loss"][-1])
            if progress and (epoch + 1) % max(1, epochs // 10) == 0:
                _say(stream, f"  epoch {epoch + 1}/{epochs}: ε-prediction MSE {losses[-1]:.4f}")
        return losses

    def predict_noise(self, x, t):
        return self.net.predict([x, time_features(np.full(len(x), t), self.T, self.width)])

    def sample(self, n, dim=2, predict_noise=None):
        """The reverse chain from x_T ~ N(0, I); ``predict_noise(x, t)`` defaults to the network."""
        predict_noise = predict_noise or self.predict_noise
        s = self.schedule
        x = self.rng.standard_normal((n, dim))
        for t in range(self.T, 0, -1):
            eps = predict_noise(x, t)
            x = s["mean_x"][t - 1] * x + s["mean_eps"][t - 1] * eps
            if t > 1:
                x = x + math.sqrt(s["var"][t - 1]) * self.rng.standard_normal(x.shape)
        return x


@one_blas_thread
def run_ddpm(out_dir, epochs=300, progress=True, seed=0, dtype="float64", stream=None, document=True) -> dict:
    """A DDPM on two moons (standardised, 2000 points)."""
    from chainrule.derive.generative import diffusion_explanation
    from .data import make_moons
    t0 = time.perf_counter()
    data, _ = make_moons(n=2000, noise=0.05, seed=seed)
    data = (data - data.mean(0)) / data.std(0)
    model = ddpm_model()
    net = _network(model, 1e-3, seed, dtype)
    ddpm = DDPM(net, seed=seed)
    _say(stream, f"DDPM on two moons: T = {ddpm.T} steps, β linear 1e-4 .. 0.04, ε_θ with {net.n_params()} "
                 f"parameters; {epochs} epochs (each with fresh t and ε)")
    ddpm.train(data, epochs, progress=progress, stream=stream)
    samples = ddpm.sample(2000)
    reference, _ = make_moons(n=2000, noise=0.05, seed=seed + 1)
    reference = (reference - reference.mean(0)) / reference.std(0)
    mmd, base = mmd_rbf(samples, reference), mmd_rbf(data, reference)
    acc = two_sample_accuracy(samples, reference, seed=seed)
    paths = {"samples": samples_vs_data([("DDPM samples", samples), ("a second draw of the data", data)],
                                        reference, os.path.join(out_dir, "samples.png"))}
    if document:
        paths["derivation"] = _document(os.path.join(out_dir, "derivation.md"), model,
                                        "The DDPM on two moons: derivation", diffusion_explanation())
    _say(stream, f"samples vs a fresh draw of the data: MMD² {mmd:.4f} (two draws of the data: {base:.4f}); "
                 f"a 10-NN two-sample classifier's accuracy {acc:.3f} (0.5: indistinguishable)")
    return {"mmd": mmd, "mmd_data": base, "two_sample_accuracy": acc, "seconds": time.perf_counter() - t0,
            "ddpm": ddpm, **paths}


RUNNERS = {"autoencoder": run_autoencoder, "denoising": run_denoising, "vae": run_vae,
           "gan-ring": run_gan_ring, "gan-digits": run_gan_digits, "ddpm": run_ddpm}
