"""Code-generation and runtime defects of issue 6, each shown on a real call.

Nested reductions lower (a reduction alone and inside another), step functions lower with the one
stated convention, rank-0 parameters work end to end, the numeric check neither fails on a zero
gradient nor passes a wrong one, and data breaking a declared fact is refused with a clear error.
"""
import math

import numpy as np
import pytest
import sympy as sp

from chainrule.codegen.facts import FactError
from chainrule.codegen.verify import check_gradients, sample_batch
from chainrule.derive import (Activation, Dense, Equation, Layer, Loss, Model, Tensor, explain_model,
                              indices, relu, sequential, sigmoid, size, step)
from chainrule.derive.layers import B
from chainrule.runtime import Network
from chainrule.runtime.errors import DataError, TrainingDiverged


def assert_gradients_pass(cm, seed=3, **kw):
    checks = check_gradients(cm.model, compiled=cm, seed=seed, **kw)
    assert [c.name for c in checks] == cm.param_names
    for c in checks:
        assert c.ok and c.error < 1e-6 and c.compared == min(c.size, 300), str(c)
    return checks


# -- user declarations (as the README and a user would write them) -------------------------------
SWISH = Activation("swish", lambda u: u * sigmoid(u))
HUBER = Loss("huber", lambda p, y: sp.Min(sp.Abs(p - y), 1) * (sp.Abs(p - y) - sp.Min(sp.Abs(p - y), 1) / 2))
ELU = Activation("elu", lambda u: sp.Max(u, 0) + sp.Min(0, sp.exp(u) - 1))
HINGE = Loss("hinge", lambda z, y: sp.Max(0, 1 - y * z))
SOFTSIGN = Activation("softsign", lambda u: u / (1 + sp.Abs(u)))           # its derivative has sign


def huber_model():
    return sequential(3, [Dense(8), SWISH, Dense(2)], HUBER, name="huber")


def elu_hinge_model():
    return sequential(3, [Dense(4), ELU, Dense(3), SOFTSIGN, Dense(2)], HINGE, name="elu_hinge")


class InlineLayerNorm(Layer):
    """Layer normalisation in one equation: mean and variance over the features inside one body."""

    name = "layernorm"

    def build(self, d, x):
        h = d.tensor("h", x.shape)
        b, i, j, k = indices("b i j k")
        n = x.shape[1]
        mean = sp.Sum(x[b, j], (j, 0, n - 1)) / n
        var = sp.Sum((x[b, j] - sp.Sum(x[b, k], (k, 0, n - 1)) / n) ** 2, (j, 0, n - 1)) / n
        return d.define(h, (b, i), (x[b, i] - mean) / sp.sqrt(var + sp.Rational(1, 100000)))


class BatchNorm(Layer):
    """Batch normalisation as a user would declare it: mean and variance over the batch."""

    name = "batchnorm"

    def build(self, d, x):
        h = d.tensor("h", x.shape)
        b, i, c, e = indices("b i c e")
        mean = sp.Sum(x[c, i], (c, 0, B - 1)) / B
        var = sp.Sum((x[c, i] - sp.Sum(x[e, i], (e, 0, B - 1)) / B) ** 2, (c, 0, B - 1)) / B
        return d.define(h, (b, i), (x[b, i] - mean) / sp.sqrt(var + sp.Rational(1, 100000)))


class PReLU(Layer):
    """a = relu(z) + α min(z, 0) with one learned slope α: a rank-0 parameter."""

    name, has_params = "prelu", True

    def build(self, d, x):
        alpha = d.param("alpha", (), init="zeros")
        a = d.tensor("a", x.shape)
        b, i = indices("b i")
        return d.define(a, (b, i), relu(x[b, i]) + alpha.read() * sp.Min(x[b, i], 0))


class ScalarBiasThenCentre(Layer):
    """h = (z + c) - mean_j (z + c): a shared scalar bias before a centring, so dC/dc = 0 exactly."""

    name, has_params = "centre", True

    def build(self, d, x):
        c = d.param("c", (), init="zeros")
        h = d.tensor("h", x.shape)
        b, i, j = indices("b i j")
        n = x.shape[1]
        return d.define(h, (b, i), x[b, i] + c.read() - sp.Sum(x[b, j] + c.read(), (j, 0, n - 1)) / n)


def rank0_model():
    return sequential(3, [Dense(4), PReLU(), Dense(3), ScalarBiasThenCentre(), Activation("tanh", sp.tanh),
                          Dense(2)], "mse", name="rank0")


# -- 1. reductions alone and nested ------------------------------------------------------------------
def test_softmax_of_softmax_lowers_and_matches_finite_differences(compiled_model):
    cm = compiled_model("3 -> dense(4) -> softmax -> softmax -> mse")
    assert_gradients_pass(cm)


def test_inline_layer_norm_lowers_and_matches_finite_differences(compiled_declared):
    cm = compiled_declared("layernorm", lambda: sequential(3, [Dense(4), InlineLayerNorm(), Dense(2)], "mse"))
    assert_gradients_pass(cm)
    p = cm.init_params(0)
    x, y = sample_batch(cm, batch=6)
    z = x @ p["W1"].T + p["b1"]                   # the forward pass against NumPy
    h = (z - z.mean(1, keepdims=True)) / np.sqrt(z.var(1, keepdims=True) + 1e-5)
    assert np.allclose(cm.predict(p, x), h @ p["W2"].T + p["b2"], rtol=1e-12, atol=1e-12)


def test_shadowed_and_repeated_bound_indices_lower_correctly(kernel_cache_dir):
    """A sum binding the output's own index, a sum nested in a sum over the same name, and the same
    sum alone and nested: each loop gets its own variable (none clobbers an enclosing one)."""
    from chainrule.codegen import compile_model
    n = size("n")
    b, o = indices("b o")
    x, y = Tensor("x", (B, n), role="input"), Tensor("y", (B, n), role="target")
    w = Tensor("w", (n,), role="param", init="glorot")
    h, l, C = Tensor("h", (B, n)), Tensor("l", (B,), role="loss"), Tensor("C", (), role="cost")
    S = sp.Sum(x[b, o], (o, 0, n - 1))                                  # binds o, free in the body
    body = w[o] * x[b, o] * sp.Sum(x[b, o] * S, (o, 0, n - 1)) + S      # Σ_o x·(Σ_o x) = S², and S
    eqs = [Equation(h, (b, o), body),
           Equation(l, (b,), sp.Sum((h[b, o] - y[b, o]) ** 2, (o, 0, n - 1))),
           Equation(C, (), sp.Sum(l[b], (b, 0, B - 1)) / B)]
    model = Model(eqs, [x, y, w, h, l, C], C, loss=l, outputs=[h], size_values={n: 4}, name="shadow")
    cm = compile_model(model, cache_dir=kernel_cache_dir)
    p = cm.init_params(0)
    xs, _ = sample_batch(cm, batch=3)
    s = xs.sum(1, keepdims=True)
    assert np.allclose(cm.predict(p, xs), p["w"] * xs * s ** 2 + s, rtol=1e-12)


# -- 2. step functions: Max, Min, Abs and their derivatives ----------------------------------------
def test_readme_huber_compiles_trains_and_matches_finite_differences(compiled_declared):
    cm = compiled_declared("huber", huber_model)
    assert_gradients_pass(cm)
    assert "step(" in cm.source and "Heaviside" not in cm.source.split("def forward(")[1]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 3))
    y = np.stack([np.sin(x[:, 0]) + x[:, 1], 3 * x[:, 2]], 1)      # large errors: both Huber branches
    net = Network(cm.model, compiled=cm, seed=0)
    history = net.fit(x, y, epochs=8, lr=0.05, batch_size=16, progress=False)
    assert history["loss"][-1] < 0.5 * history["loss"][0], history["loss"]


def test_elu_with_min_softsign_with_abs_and_hinge_with_max_match_finite_differences(compiled_declared):
    cm = compiled_declared("elu_hinge", elu_hinge_model)
    assert_gradients_pass(cm)
    assert "_sign(" in cm.source and "step(" in cm.source


def test_step_convention_is_stated_once():
    """Heaviside (SymPy's derivative of Max/Min, ½ at 0) lowers as chainrule's step (0 at 0), an
    explicit other value at 0 is kept, DiracDelta (derivative of sign/step) is 0; the explanation
    prints the step as the kernel computes it."""
    from chainrule.codegen.printer import print_expr, to_conventions
    u = sp.Symbol("u", real=True)
    assert sp.diff(sp.Max(u, 0), u) == sp.Heaviside(u)
    assert to_conventions(sp.Heaviside(u)) == step(u) == to_conventions(sp.Heaviside(u, 0))
    pw = to_conventions(sp.Heaviside(u, 1))
    assert [pw.subs(u, v) for v in (-1, 0, 1)] == [0, 1, 1]
    assert to_conventions(sp.diff(sp.sign(u) * u, u)) == sp.sign(u)
    assert print_expr(sp.Heaviside(u), {u: "v"}) == "step(v)"
    code = print_expr(sp.Heaviside(u, 1), {u: "v"})
    assert [eval(code, {"np": np, "v": v}) for v in (-1.0, 0.0, 2.0)] == [0, 1, 1]
    from chainrule.derive.printing import latex
    assert latex(sp.Heaviside(u)) == latex(step(u)) and r"\theta" in latex(sp.Heaviside(u, 1))
    md = explain_model(elu_hinge_model()).to_markdown()
    assert latex(step(sp.Symbol("z", real=True))).split("z")[0] in md and r"\theta" not in md


@pytest.mark.latex
def test_step_explanations_render_in_katex():
    from latex_tools import extract_math, format_katex_errors, katex_errors, need_katex
    need_katex()
    items = []
    for build in (huber_model, elu_hinge_model):
        items += extract_math(explain_model(build()).to_markdown())
    errors = katex_errors(items)
    assert not errors, format_katex_errors(errors)


# -- 3. the numeric check: zeros and corruption ------------------------------------------------------
def test_rank0_parameters_end_to_end_and_zero_gradient_passes(compiled_declared):
    cm = compiled_declared("rank0", rank0_model)
    assert cm.param_shapes["alpha2"] == () and cm.param_shapes["c4"] == ()
    p = cm.init_params(0)
    assert p["alpha2"].shape == () and p["c4"].shape == ()
    checks = {c.name: c for c in assert_gradients_pass(cm)}
    zero = checks["c4"]                         # a bias before a normalisation: the gradient is 0
    assert zero.compared == 1 and abs(zero.worst[1]) < 1e-12 and zero.error < 1e-6
    x, y = sample_batch(cm, batch=8, seed=1)
    cost, g = cm.loss_and_grads(p, x, y)
    assert g["alpha2"].shape == () and g["c4"].shape == () and g["alpha2"] != 0
    alpha, ident = float(p["alpha2"]), id(p["alpha2"])
    assert cm.train_step(p, x, y, 0.5) == pytest.approx(cost, rel=1e-12)
    assert id(p["alpha2"]) == ident and p["alpha2"].shape == ()
    assert float(p["alpha2"]) == pytest.approx(alpha - 0.5 * float(g["alpha2"]), rel=1e-12)


def test_rank0_parameters_in_the_runtime(compiled_declared, tmp_path):
    cm = compiled_declared("rank0", rank0_model)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3))
    y = np.stack([x[:, 0] * x[:, 1], np.abs(x[:, 2])], 1)
    net = Network(cm.model, compiled=cm, seed=0)
    assert net.param_shapes["alpha2"] == () and net.n_params() == 12 + 4 + 1 + 12 + 3 + 1 + 6 + 2
    history = net.fit(x, y, epochs=5, lr=0.05, batch_size=16, progress=False)
    assert history["loss"][-1] < history["loss"][0]
    assert net.params["alpha2"].shape == () and float(net.params["alpha2"]) != 0.0
    path = net.save(tmp_path / "rank0.npz")
    again = Network(cm.model, compiled=cm, seed=1).load(path)
    assert again.params["alpha2"].shape == () and again.params["alpha2"] == net.params["alpha2"]


def test_batch_norm_compiles_and_its_zero_bias_gradient_passes(compiled_declared):
    """The bias before a batch normalisation has gradient 0: compared as 0, not as relative error 1."""
    cm = compiled_declared("batchnorm", lambda: sequential(
        3, [Dense(4), BatchNorm(), Activation("tanh", sp.tanh), Dense(2)], "mse", name="batchnorm"))
    checks = {c.name: c for c in assert_gradients_pass(cm, seed=1)}
    b1 = checks["b1"]
    _, g, fd = b1.worst
    assert b1.compared == 4 and abs(g) < 1e-12 and 0 < abs(fd) < 1e-8     # fd: rounding noise
    assert abs(g - fd) / max(abs(g), abs(fd)) > 0.99       # what a plain relative error would say


class _Corrupted:
    """A compiled model whose gradient is wrong in one entry (or scaled): the check must fail."""

    def __init__(self, cm, name, delta=0.0, scale=1.0):
        self._cm, self._name, self._delta, self._scale = cm, name, delta, scale

    def __getattr__(self, attr):
        return getattr(self._cm, attr)

    def loss_and_grads(self, params, x, y):
        cost, grads = self._cm.loss_and_grads(params, x, y)
        g = grads[self._name].copy()          # (a 0-d array stays an array)
        g *= self._scale
        g.reshape(-1)[0] += self._delta
        return cost, {**grads, self._name: g}


@pytest.mark.parametrize("name,delta,scale", [("W1", 1e-5, 1.0), ("b5", 0.0, 1.001), ("c4", 1e-6, 1.0)])
def test_wrong_gradient_fails(compiled_declared, name, delta, scale):
    cm = compiled_declared("rank0", rank0_model)
    checks = {c.name: c for c in check_gradients(cm.model, compiled=_Corrupted(cm, name, delta, scale), seed=3)}
    bad = checks.pop(name)
    assert not bad.ok and bad.error > 1e-5, str(bad)
    assert "FAIL" in str(bad) and f"over {bad.compared} of {bad.size} entries" in str(bad)
    assert all(c.ok for c in checks.values())


# -- 4. declared facts checked on the data -------------------------------------------------------------
FACT = r"target y2 breaks the fact Σ_k y2\[b, k\] = 1 for every b declared by softmax_cross_entropy"


def _bad_targets(cm, batch=8):
    x, y = sample_batch(cm, batch=batch, seed=5)
    masked, doubled = y.copy(), y.copy()
    masked[3] = 0.0                                   # a masked row
    doubled[5] *= 2.0                                 # a doubled one-hot
    return x, y, masked, doubled


def test_fact_violations_refused_by_compiled_kernels(compiled_model):
    cm = compiled_model("demo")
    x, y, masked, doubled = _bad_targets(cm)
    p = cm.init_params(0)
    with pytest.raises(FactError, match=FACT + r".*row 3 is \[0, 0, 0, .*\(sum 0,"):
        cm.loss_and_grads(p, x, masked)
    before = {k: v.copy() for k, v in p.items()}
    with pytest.raises(FactError, match=FACT + r".*row 5 is \[.*2.*\] \(sum 2,"):
        cm.train_step(p, x, doubled, 0.1)
    assert all(np.array_equal(before[k], p[k]) for k in p)       # refused before any update
    soft = np.full_like(y, 1.0 / y.shape[1], dtype=np.float32)   # float32 soft labels are fine
    assert math.isfinite(cm.loss_and_grads(p, x, soft)[0])
    assert math.isfinite(cm.train_step(p, x, y, 0.1))


def test_fact_violations_refused_by_fit_and_evaluate(compiled_model):
    cm = compiled_model("demo")
    net = Network("demo", compiled=cm)
    x, y, masked, doubled = _bad_targets(cm, batch=40)
    with pytest.raises(DataError, match="y: " + FACT + r".*row 3 is .*\(sum 0,"):
        net.fit(x, masked, epochs=1, progress=False)
    with pytest.raises(DataError, match="y: " + FACT + r".*row 5 .*\(sum 2,"):
        net.evaluate(x, doubled)
    with pytest.raises(DataError, match="validation y: " + FACT):
        net.fit(x, y, epochs=1, validation_data=(x, doubled), progress=False)
    assert set(net.evaluate(x, y)) == {"loss", "accuracy"}


# -- 5. IEEE arithmetic in kernels -----------------------------------------------------------------------
def test_division_by_zero_in_a_kernel_gives_inf_not_an_exception(compiled_declared):
    relative = Loss("relsq", lambda p, y: (p - y) ** 2 / y)
    cm = compiled_declared("relsq", lambda: sequential(2, [Dense(2)], relative, name="relsq"))
    assert 'error_model="numpy"' in cm.source
    p = cm.init_params(0)
    x, y = np.ones((4, 2)), np.ones((4, 2))
    y[2, 1] = 0.0
    cost, grads = cm.loss_and_grads(p, x, y)
    assert math.isinf(cost) and not np.isfinite(grads["W1"]).all()
    net = Network(cm.model, compiled=cm)
    with pytest.raises(TrainingDiverged, match="the cost became inf .*division by zero"):
        net.fit(x, y, epochs=1, progress=False)
