"""The math of generative models, derived by SymPy rather than written down.

* ``gaussian_kl``: KL(N(μ, σ²) ‖ N(0, 1)) = E_q[log q(z) − log p(z)], by expanding the log-densities
  into a polynomial in z and integrating each power against q (the moments E z^k come from SymPy's
  integration). ``GaussianKL()`` is the VAE's KL term with exactly that closed form as its body, so
  the declaration, the derivation and the kernels share one source.
* ``generator_losses``: the minimax and the non-saturating generator losses as functions of the
  discriminator's logit s, their derivatives by ``diff``, evaluated where the discriminator rejects
  the samples (D = σ(s) → 0).
* ``diffusion_marginal`` / ``diffusion_posterior``: the closed form of q(x_t | x_0) by induction on
  the declared one-step recursion, and the mean of q(x_{t-1} | x_t, x_0) by completing the square,
  rewritten in terms of the noise ε that the DDPM's network predicts.

Each returns its steps as data, and ``*_explanation`` turns them into Explanation blocks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import sympy as sp

from .explain import Bullets, Display, Heading, Para
from .layers import Term
from .primitives import sigmoid, softplus


@dataclass
class Derivation:
    """A chain of equalities: ``steps`` are (justification, left side, right side)."""

    result: sp.Expr
    steps: list = field(default_factory=list)
    symbols: dict = field(default_factory=dict)


# -- the Gaussian KL term ------------------------------------------------------------------------------
MU = sp.Symbol("mu", real=True)
SIGMA = sp.Symbol("sigma", positive=True)
Z = sp.Symbol("z", real=True)


def normal_pdf(x, mean, std):
    return sp.exp(-(x - mean) ** 2 / (2 * std ** 2)) / sp.sqrt(2 * sp.pi * std ** 2)


@lru_cache(maxsize=None)
def gaussian_kl() -> Derivation:
    """KL(q ‖ p) for q = N(μ, σ²), p = N(0, 1), one latent coordinate."""
    q, p = normal_pdf(Z, MU, SIGMA), normal_pdf(Z, 0, 1)
    kl = sp.Symbol(r"\mathrm{KL}")
    log_ratio = sp.expand(sp.expand_log(sp.log(q), force=True) - sp.expand_log(sp.log(p), force=True))
    poly = sp.Poly(log_ratio, Z)
    moments = {k: sp.simplify(sp.integrate(Z ** k * q, (Z, -sp.oo, sp.oo))) for k in range(poly.degree() + 1)}
    E = sp.Function("E")                                      # the expectation under q, unevaluated
    expectation = sp.Add(*[c * E(Z ** k) for (k,), c in poly.terms()])
    result = sp.expand(sp.Add(*[c * moments[k] for (k,), c in poly.terms()]))
    steps = [("definition: the expected log-ratio of the two densities under q", kl,
              sp.Integral(sp.Symbol("q(z)") * (sp.Symbol(r"\log q(z)") - sp.Symbol(r"\log p(z)")), (Z, -sp.oo, sp.oo))),
             ("expand the two Gaussian log-densities: a polynomial in z", sp.Symbol(r"\log q(z) - \log p(z)"),
              log_ratio),
             ("linearity of the expectation", kl, expectation),
             ("the moments of q, integrated by SymPy: " + ", ".join(
                 f"${sp.latex(E(Z ** k))} = {sp.latex(m)}$" for k, m in moments.items()), kl, result)]
    return Derivation(result, steps, {"moments": moments})


def kl_in_logvar(mu, logvar) -> sp.Expr:
    """The derived closed form with σ = exp(½ log σ²): a network predicts log σ² (any real number)."""
    return sp.expand(gaussian_kl().result.xreplace({MU: mu, SIGMA: sp.exp(logvar / 2)}))


def GaussianKL() -> Term:
    """The VAE's KL term ℓ_b = Σ_k KL(N(μ_bk, σ²_bk) ‖ N(0, 1)), read from ``(mu, logvar)``."""
    return Term("gaussian_kl", kl_in_logvar, label="KL divergence of N(μ, σ²) from N(0, 1)",
                latex=r"\ell^{\mathrm{KL}}")


def kl_explanation() -> list:
    d = gaussian_kl()
    lv = sp.Symbol(r"\log\sigma^2", real=True)
    blocks = [Heading(1, "The KL term, derived"),
              Para("The encoder outputs a Gaussian $q(z \\mid x) = \\mathcal{N}(\\mu, \\sigma^2)$ per latent "
                   "coordinate; the prior is $p(z) = \\mathcal{N}(0, 1)$. The KL divergence has a closed form, "
                   "which the engine derives:")]
    for k, (why, lhs, rhs) in enumerate(d.steps, 1):
        blocks += [Para(f"Step {k}, {why}:"), Display(f"{sp.latex(lhs)} = {sp.latex(rhs)}")]
    blocks += [Para("With $\\sigma^2 = e^{\\log\\sigma^2}$ (the network predicts $\\log\\sigma^2$, any real "
                    "number), the term of the cost per coordinate is"),
               Display(f"\\mathrm{{KL}} = {sp.latex(kl_in_logvar(MU, lv))}"),
               Para("It is zero exactly at $\\mu = 0$, $\\sigma^2 = 1$: the code is pulled towards the "
                    "prior, which is what makes sampling $z \\sim \\mathcal{N}(0, 1)$ and decoding work.")]
    return blocks


def reparameterisation_explanation(model) -> list:
    """∂z/∂μ and ∂z/∂log σ² from the model's own sampling equation (``functional.gaussian_sample``)."""
    eq = next((e for e in model.equations if any(model.tensors[r].role == "noise"
                                                 for r, _ in e.reads() if r in model.tensors)), None)
    if eq is None:
        return []
    from .printing import IndexPrinter
    printer = IndexPrinter(model.tensors)
    reads = [sp.Indexed(model.tensors[r].base, *idx) for r, idx in eq.reads()
             if model.tensors[r].role != "noise"]
    items = [f"$\\frac{{\\partial {printer.doprint(eq.lhs)}}}{{\\partial {printer.doprint(r)}}} = "
             f"{printer.doprint(sp.diff(eq.body, r))}$" for r in reads]
    return [Heading(1, "The reparameterisation trick"),
            Para("Sampling $z \\sim \\mathcal{N}(\\mu, \\sigma^2)$ directly has no derivative with respect to "
                 "$\\mu$ or $\\sigma$. Written as a deterministic function of the parameters' path and an "
                 "independent noise $\\varepsilon \\sim \\mathcal{N}(0, 1)$, the sample is an ordinary equation:"),
            Display(f"{printer.doprint(eq.lhs)} = {printer.doprint(eq.body)}"),
            Para("so the chain rule passes through it; its local derivatives (by `diff` on that body) are"),
            Bullets(items),
            Para("These are the factors that the adjoints of the mean and of the log-variance carry in "
                 "the derivation below (the noise is held fixed within a training step).")]


# -- the GAN generator losses -------------------------------------------------------------------------
S = sp.Symbol("s", real=True)          # the discriminator's logit on a generated sample
D = sp.Symbol("D", positive=True)      # D(G(z)) = σ(s)


@lru_cache(maxsize=None)
def generator_losses() -> dict:
    """{name: (loss of s, d loss / ds in terms of D, its value at D = 0)} for the generator's two
    classic losses, both from the declared binary cross-entropy on logits ``softplus(s) - y s``:
    minimax: -BCE(s, y=0) = -softplus(s) = log(1 - D); non-saturating: BCE(s, y=1) = -log D."""
    from .layers import LOSSES
    bce = LOSSES["bce_logits"]().fn
    losses = {"minimax": -bce(S, 0), "non-saturating": bce(S, 1)}
    out = {}
    for name, loss in losses.items():
        grad = sp.diff(loss, S).xreplace({sigmoid(S): D})
        out[name] = (loss, sp.simplify(grad), sp.simplify(grad.subs(D, 0)))
    return out


def gan_explanation() -> list:
    blocks = [Heading(1, "Why the generator uses the non-saturating loss"),
              Para("Write $s$ for the discriminator's logit on a generated sample and $D = \\sigma(s)$ for "
                   "its probability that the sample is real. From the declared binary cross-entropy on "
                   "logits, $\\mathrm{softplus}(s) - y s$, the two classic generator losses are the minimax "
                   "one (minus the discriminator's loss on fakes, $y = 0$) and the non-saturating one "
                   "(the loss with the label flipped to real, $y = 1$). The engine differentiates both "
                   "with respect to $s$ (every gradient that reaches the generator is this factor times "
                   "the discriminator's input gradient and the generator's own chain):")]
    items = []
    for name, (loss, grad, at0) in generator_losses().items():
        blocks += [Para(f"{name}:"), Display(f"\\ell_{{G}} = {sp.latex(loss)}, \\qquad "
                                             f"\\frac{{\\partial \\ell_G}}{{\\partial s}} = {sp.latex(grad)}")]
        items.append(f"{name}: $\\left.\\frac{{\\partial \\ell_G}}{{\\partial s}}\\right|_{{D = 0}} = {sp.latex(at0)}$")
    blocks += [Para("Early in training the discriminator rejects the generator's samples easily, "
                    "$D(G(z)) \\to 0$. There:"), Bullets(items),
               Para("The minimax loss saturates: its gradient vanishes exactly when the generator is worst, "
                    "so it learns nothing. The non-saturating loss keeps a gradient of magnitude 1 there "
                    "(and has the same fixed point), which is why the examples train with it.")]
    return blocks


# -- the models ---------------------------------------------------------------------------------------
def _act(name):
    from .layers import ACTIVATIONS, Activation
    return Activation(name, ACTIVATIONS[name])


def autoencoder(n_in=64, hidden=(64,), latent=2, activation="tanh", noise=0.0, name="autoencoder"):
    """x -> encoder -> code (``latent`` wide, linear) -> decoder -> sigmoid reconstruction, trained
    with the mean squared error against the clean input. ``noise`` > 0 corrupts the input with
    Gaussian noise of that standard deviation in training (a denoising autoencoder). The code is the
    model's second output (loss None), so predictions can report it."""
    from .functional import Input, functional_model
    from .layers import Dense, GaussianNoise
    x = Input(n_in, name="x")
    h = GaussianNoise(noise)(x) if noise else x
    for w in hidden:
        h = _act(activation)(Dense(w)(h))
    code = Dense(latent)(h)
    h = code
    for w in reversed(hidden):
        h = _act(activation)(Dense(w)(h))
    recon = _act("sigmoid")(Dense(n_in)(h))
    return functional_model(x, [recon, code], ["mse", None], name=name)


def vae(n_in=64, hidden=(128,), latent=2, activation="relu", name="vae"):
    """A variational autoencoder: the encoder gives μ and log σ², ``gaussian_sample`` draws
    z = μ + exp(½ log σ²) ε, the decoder gives Bernoulli logits. The cost is the negative ELBO per
    pixel: the mean binary cross-entropy plus the KL term divided by the number of pixels."""
    from .functional import Input, functional_model, gaussian_sample
    from .layers import Dense
    x = Input(n_in, name="x")
    h = x
    for w in hidden:
        h = _act(activation)(Dense(w)(h))
    mu, logvar = Dense(latent)(h), Dense(latent)(h)
    h = gaussian_sample(mu, logvar)
    for w in reversed(hidden):
        h = _act(activation)(Dense(w)(h))
    logits = Dense(n_in)(h)
    return functional_model(x, [logits, (mu, logvar)], ["bce_logits", GaussianKL()],
                            weights=[1, 1 / n_in], name=name)



def vae_decoder(n_in=64, hidden=(128,), latent=2, activation="relu", name="vae-decoder"):
    """The VAE's decoder alone (z -> Bernoulli logits), to decode z ~ N(0, I): its layers are the
    last layers of ``vae(...)`` with the same sizes, in the same order."""
    from .functional import Input, functional_model
    from .layers import Dense
    z = Input(latent, name="z")
    h = z
    for w in reversed(hidden):
        h = _act(activation)(Dense(w)(h))
    return functional_model(z, Dense(n_in)(h), "bce_logits", name=name)

# -- diffusion (DDPM) ---------------------------------------------------------------------------------
ALPHA = sp.Symbol("alpha_t", positive=True)           # α_t = 1 - β_t
ABAR_PREV = sp.Symbol(r"\bar{\alpha}_{t-1}", positive=True)
ABAR = sp.Symbol(r"\bar{\alpha}_t", positive=True)
X0, XT, XPREV, EPS = sp.symbols(r"x_0 x_t x_{t-1} varepsilon", real=True)


@lru_cache(maxsize=None)
def diffusion_marginal() -> Derivation:
    """q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I), by induction on the declared step
    x_t = √α_t x_{t-1} + √(1 - α_t) ε_t: if x_{t-1} | x_0 has mean √ᾱ_{t-1} x_0 and variance
    1 - ᾱ_{t-1}, the step (a scaled Gaussian plus independent Gaussian noise) gives mean and
    variance that SymPy simplifies to the same form at t, with ᾱ_t = α_t ᾱ_{t-1}."""
    mean_prev, var_prev = sp.sqrt(ABAR_PREV) * X0, 1 - ABAR_PREV
    scale, noise_var = sp.sqrt(ALPHA), 1 - ALPHA              # the declared one-step recursion
    mean_t = scale * mean_prev                                # E[a X + b ε] = a E[X]
    var_t = sp.expand(scale ** 2 * var_prev + noise_var)      # Var[a X + b ε] = a² Var X + b², ε independent
    claimed_mean, claimed_var = sp.sqrt(ABAR) * X0, 1 - ABAR
    step = {ABAR: ALPHA * ABAR_PREV}
    holds = (sp.simplify(mean_t - claimed_mean.xreplace(step)) == 0
             and sp.simplify(var_t - claimed_var.xreplace(step)) == 0)
    if not holds:                                             # a wrong claim is an error, never printed
        raise AssertionError("the induction step of q(x_t | x_0) does not close")
    steps = [("the declared forward step, ε_t ~ N(0, I) independent of x_{t-1}", XT,
              scale * XPREV + sp.sqrt(noise_var) * EPS),
             ("induction hypothesis: the mean of x_{t-1} given x_0", sp.Symbol(r"E[x_{t-1} \mid x_0]"), mean_prev),
             ("induction hypothesis: its variance", sp.Symbol(r"\mathrm{Var}[x_{t-1} \mid x_0]"), var_prev),
             ("the mean of the step (ε has mean 0)", sp.Symbol(r"E[x_t \mid x_0]"), mean_t),
             ("the variance of the step (independent terms add their variances)",
              sp.Symbol(r"\mathrm{Var}[x_t \mid x_0]"), var_t),
             ("with ᾱ_t = α_t ᾱ_{t-1}: the hypothesis at t (base case t = 0: ᾱ_0 = 1, x_0 itself)",
              sp.Symbol(r"\mathrm{Var}[x_t \mid x_0]"), claimed_var)]
    return Derivation(claimed_mean + sp.sqrt(claimed_var) * EPS, steps,
                      {"mean": claimed_mean, "var": claimed_var})


@lru_cache(maxsize=None)
def diffusion_posterior() -> Derivation:
    """The mean and variance of q(x_{t-1} | x_t, x_0), by completing the square in x_{t-1} of
    log q(x_t | x_{t-1}) + log q(x_{t-1} | x_0); then the mean with x_0 written through the noise,
    x_0 = (x_t - √(1 - ᾱ_t) ε) / √ᾱ_t: the form the sampling loop uses with the predicted ε."""
    log_density = (-(XT - sp.sqrt(ALPHA) * XPREV) ** 2 / (2 * (1 - ALPHA))
                   - (XPREV - sp.sqrt(ABAR_PREV) * X0) ** 2 / (2 * (1 - ABAR_PREV)))
    poly = sp.Poly(sp.expand(log_density), XPREV)
    quad, lin = poly.coeff_monomial(XPREV ** 2), poly.coeff_monomial(XPREV)
    var = sp.factor(sp.simplify(-1 / (2 * quad)))
    mean = sp.simplify(-lin / (2 * quad))
    abar = ALPHA * ABAR_PREV
    mean_eps = sp.simplify(mean.xreplace({X0: (XT - sp.sqrt(1 - abar) * EPS) / sp.sqrt(abar)}))
    textbook = (XT - (1 - ALPHA) / sp.sqrt(1 - abar) * EPS) / sp.sqrt(ALPHA)
    if sp.simplify(mean_eps - textbook) != 0:
        raise AssertionError("the posterior mean does not reduce to the ε form")
    steps = [("the log-density of x_{t-1} given x_t and x_0 (Bayes, up to a constant)",
              sp.Symbol(r"\log q(x_{t-1} \mid x_t, x_0)"), log_density),
             ("a quadratic in x_{t-1}: the variance is -1 / (2 × its x_{t-1}² coefficient)",
              sp.Symbol(r"\tilde{\beta}_t"), var),
             ("the mean is -(x_{t-1} coefficient) / (2 × the x_{t-1}² coefficient)",
              sp.Symbol(r"\tilde{\mu}_t"), mean),
             ("x_0 through the noise, x_0 = (x_t - √(1-ᾱ_t) ε)/√ᾱ_t, with ᾱ_t = α_t ᾱ_{t-1}",
              sp.Symbol(r"\tilde{\mu}_t"), textbook)]
    return Derivation(textbook, steps, {"var": var, "mean": mean, "mean_eps": textbook})


def diffusion_schedule(betas):
    """(α, ᾱ, √ᾱ, √(1-ᾱ), the ε-form posterior mean coefficients, posterior variance) per step, each
    a NumPy evaluation of the derived closed forms (lambdified, not retyped)."""
    import numpy as np
    betas = np.asarray(betas, dtype=np.float64)
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    m, p = diffusion_marginal().symbols, diffusion_posterior()
    coef = lambda expr, *syms: sp.lambdify(syms, expr, "numpy")     # noqa: E731
    mean_x = coef(sp.diff(p.result, XT), ALPHA, ABAR_PREV)
    mean_eps = coef(sp.diff(p.result, EPS), ALPHA, ABAR_PREV)
    var = coef(p.symbols["var"], ALPHA, ABAR_PREV)
    return {"alpha": alphas, "abar": abar,
            "signal": coef(sp.diff(m["mean"], X0), ABAR)(abar) * np.ones_like(abar),
            "noise": coef(sp.sqrt(m["var"]), ABAR)(abar) * np.ones_like(abar),
            "mean_x": mean_x(alphas, abar_prev), "mean_eps": mean_eps(alphas, abar_prev),
            "var": np.where(abar_prev < 1.0, var(alphas, abar_prev), 0.0)}


def diffusion_explanation() -> list:
    blocks = [Heading(1, "The forward process in closed form"),
              Para("The forward process adds Gaussian noise in $T$ small steps with variances $\\beta_t$; "
                   "write $\\alpha_t = 1 - \\beta_t$ and $\\bar\\alpha_t = \\prod_{s \\le t} \\alpha_s$. "
                   "By induction (each equality below checked by SymPy):")]
    for k, (why, lhs, rhs) in enumerate(diffusion_marginal().steps, 1):
        blocks += [Para(f"Step {k}, {why}:"), Display(f"{sp.latex(lhs)} = {sp.latex(rhs)}")]
    blocks += [Para("So $x_t$ is drawn in one go from $x_0$, without simulating the chain:"),
               Display(f"x_t = {sp.latex(diffusion_marginal().result)}, \\qquad "
                       f"\\varepsilon \\sim \\mathcal{{N}}(0, I)"),
               Heading(1, "The ε-prediction loss"),
               Para("The network $\\varepsilon_\\theta(x_t, t)$ sees $x_t$ and $t$ and predicts the noise that "
                    "was added. The simplified objective of Ho et al. (2020) is the mean squared error "
                    "between the two (the per-example loss below, with the target $y = \\varepsilon$); its "
                    "gradients are derived in the sections that follow, like any model's."),
               Heading(1, "Sampling: the reverse step"),
               Para("The reverse step needs the Gaussian $q(x_{t-1} \\mid x_t, x_0)$; the engine completes "
                    "the square:")]
    for k, (why, lhs, rhs) in enumerate(diffusion_posterior().steps, 1):
        blocks += [Para(f"Step {k}, {why}:"), Display(f"{sp.latex(lhs)} = {sp.latex(rhs)}")]
    blocks += [Para("Sampling starts from $x_T \\sim \\mathcal{N}(0, I)$ and, for $t = T, \\dots, 1$, draws "
                    "$x_{t-1} = \\tilde\\mu_t(x_t, \\varepsilon_\\theta(x_t, t)) + \\sqrt{\\tilde\\beta_t}\\, z$ with "
                    "$z \\sim \\mathcal{N}(0, I)$ ($z = 0$ at the last step). The loop uses these "
                    "coefficients, evaluated from the expressions above.")]
    return blocks


def generative_documents() -> dict:
    """The generative models' math as documents (``chainrule docs`` writes them): the VAE's KL term
    and reparameterisation, the GAN generator losses, the DDPM's closed forms."""
    from .explain import Explanation
    docs = {}
    doc = Explanation("The variational autoencoder: the KL term and the reparameterisation trick")
    doc.add(*kl_explanation(), *reparameterisation_explanation(vae()))
    docs["vae"] = doc
    doc = Explanation("The GAN: minimax and non-saturating generator losses")
    doc.add(*gan_explanation())
    docs["gan"] = doc
    doc = Explanation("The DDPM: the forward process in closed form, the loss and the reverse step")
    doc.add(*diffusion_explanation())
    docs["diffusion"] = doc
    return docs
