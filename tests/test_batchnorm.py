"""Batch normalisation's backward pass reaches the compact Ioffe–Szegedy form through recorded,
general rewrites (no per-layer formula): Σ_b (x_b − μ) = 0 follows from the forward equation of μ."""
import sympy as sp

from chainrule.derive import derive, sequential
from chainrule.derive.layers import B, Dense, Layer
from chainrule.derive.tensor import index
from chainrule.derive.verify import verify_model

from corpus import BatchNorm


class BatchNormXhat(Layer):
    """Batch norm declared as a textbook writes it: μ, σ², x̂ = (x − μ)/√(σ² + ε), y = γ x̂ + β."""
    has_params = True

    def build(self, d, x):
        n, b, i = x.shape[1], index("b"), index("i")
        g, s = d.param("gamma", (n,), init="ones"), d.param("beta", (n,), init="zeros")
        mu, var = d.tensor("mu", (n,)), d.tensor("v", (n,))
        xh, y = d.tensor("xhat", x.shape), d.tensor("y", x.shape)
        d.define(mu, (i,), sp.Sum(x[b, i], (b, 0, B - 1)) / B)
        d.define(var, (i,), sp.Sum((x[b, i] - mu[i]) ** 2, (b, 0, B - 1)) / B)
        d.define(xh, (b, i), (x[b, i] - mu[i]) / sp.sqrt(var[i] + sp.Rational(1, 100)))
        return d.define(y, (b, i), g[i] * xh[b, i] + s[i])


def _model():
    return sequential(3, [Dense(4), BatchNorm()], "mse", name="bn")


def _xhat_model():
    return sequential(3, [Dense(4), BatchNormXhat()], "mse", name="bn-xhat")


def _bound_renamed(e):
    """Summation indices renamed canonically (b', b'' ... -> one name), for structural comparison."""
    k = sp.Symbol("b_sum", integer=True)
    return e.replace(lambda s: isinstance(s, sp.Sum) and len(s.limits) == 1,
                     lambda s: sp.Sum(s.function.xreplace({s.limits[0][0]: k}), (k, *s.limits[0][1:])))


def test_textbook_declaration_reaches_the_compact_form_literally():
    """dx̂ = dy ⊙ γ; dx = (1/(B σ)) (B dx̂ − Σ_b dx̂ − x̂ Σ_b dx̂ ⊙ x̂), read off the derived equation
    (equal as SymPy expressions up to the summation index's name), through recorded steps."""
    grads = derive(_xhat_model())
    t = grads.model.tensors
    dxh = grads.composed["xhat2"].equation
    bi = dxh.indices
    dy = next(a.base for a in dxh.body.atoms(sp.Indexed) if str(a.base) == "d_y2")
    assert dxh.body == dy[bi] * t["gamma2"][bi[1]]
    comp = grads.composed["z1"].equation
    b, o = comp.indices
    D = next(a.base for a in comp.body.atoms(sp.Indexed) if str(a.base) == "d_xhat2")
    Bsym = next(s for s in comp.body.free_symbols if s.name == "B")
    k = sp.Symbol("b_sum", integer=True)
    xh, sig = t["xhat2"], sp.sqrt(t["v2"][o] + sp.Rational(1, 100))
    compact = (Bsym * D[b, o] - sp.Sum(D[k, o], (k, 0, Bsym - 1))
               - xh[b, o] * sp.Sum(D[k, o] * xh[k, o], (k, 0, Bsym - 1))) / (Bsym * sig)
    got = _bound_renamed(comp.body)
    assert sp.expand(got - compact) == 0
    assert not any(str(r.base) in ("z1", "mu2") for r in got.atoms(sp.Indexed))   # only x̂ and σ
    rules = [s.rule for s in grads.composed["z1"].steps]
    assert "normalised forward result" in rules
    assert "forward sum" in [s.rule for s in grads.derivations["mu2"].steps]
    d_v = grads.derivations["v2"]
    assert "normalised forward result" in [s.rule for s in d_v.steps]
    for d in (grads.composed["z1"], d_v):
        step = next(s for s in d.steps if s.rule == "normalised forward result")
        assert any("forward pass computed" in str(w) for w in step.why)


def test_textbook_declaration_is_verified():
    assert all(verify_model(_xhat_model()))


def test_mean_adjoint_uses_the_forward_sum_and_records_it():
    grads = derive(_model())
    d_mu = grads.derivations["mu2"]
    steps = [s.rule for s in d_mu.steps]
    assert "forward sum" in steps
    step = next(s for s in d_mu.steps if s.rule == "forward sum")
    assert step.before.has(sp.Sum) and step.after != step.before
    # d_μ_i = −γ_i Σ_b dy_bi / σ_i: the term through the variance vanished (Σ_b (x_bi − μ_i) = 0)
    t = grads.model.tensors
    got = d_mu.equation.body
    i = d_mu.equation.indices[0]
    dy = next(a.base for a in got.atoms(sp.Indexed) if str(a.base) == "d_y2")
    Bsym = next(s for s in got.free_symbols if s.name == "B")
    bb = next(iter(s.limits[0][0] for s in sp.preorder_traversal(got) if isinstance(s, sp.Sum)))
    expected = -t["gamma2"][i] * sp.Sum(dy[bb, i], (bb, 0, Bsym - 1)) / sp.sqrt(t["v2"][i] + sp.Rational(1, 100))
    assert got == expected
    assert not any(str(r.base) in ("z1", "d_v2") for r in got.atoms(sp.Indexed))


def test_input_adjoint_is_the_compact_ioffe_szegedy_form():
    """dx = (1/(B σ)) (B dx̂ − Σ_b dx̂ − x̂ Σ_b dx̂ ⊙ x̂), dx̂ = dy ⊙ γ, x̂ = (x − μ)/σ, exactly."""
    grads = derive(_model())
    comp = grads.composed["z1"].equation
    t = grads.model.tensors
    bvar, o = comp.indices
    bp = sp.Symbol("b_c", integer=True)
    Bsym = next(s for s in comp.body.free_symbols if s.name == "B")
    mu, v, g, z = (t[n] for n in ("mu2", "v2", "gamma2", "z1"))
    dy = next(a.base for a in comp.body.atoms(sp.Indexed) if str(a.base) == "d_y2")
    sig = sp.sqrt(v[o] + sp.Rational(1, 100))
    xhat = lambda r: (z[r, o] - mu[o]) / sig
    dxhat = lambda r: dy[r, o] * g[o]
    compact = (Bsym * dxhat(bvar) - sp.Sum(dxhat(bp), (bp, 0, Bsym - 1))
               - xhat(bvar) * sp.Sum(dxhat(bp) * xhat(bp), (bp, 0, Bsym - 1))) / (Bsym * sig)

    def normal(e):                       # sums of products, constants out of sums
        e = sp.expand(e)
        e = e.replace(lambda s: isinstance(s, sp.Sum), lambda s: sp.expand(s.function).as_independent(s.limits[0][0])[0]
                      * sp.Sum(sp.expand(s.function).as_independent(s.limits[0][0])[1], *s.limits)
                      if not sp.expand(s.function).is_Add else s)
        e = e.replace(lambda s: isinstance(s, sp.Sum) and s.function.is_Add,
                      lambda s: sp.Add(*[sp.Sum(a, *s.limits) for a in s.function.args]))
        e = e.replace(lambda s: isinstance(s, sp.Sum),
                      lambda s: s.function.as_independent(s.limits[0][0])[0]
                      * sp.Sum(s.function.as_independent(s.limits[0][0])[1], *s.limits).xreplace({s.limits[0][0]: bp}))
        return sp.expand(e)

    assert sp.simplify(normal(comp.body) - normal(compact)) == 0
    # the variance term enters through x̂ only once: no Σ_b x_b left over (it became B μ)
    assert not any(isinstance(s, sp.Sum) and s.function == z[s.limits[0][0], o]
                   for s in sp.preorder_traversal(comp.body))


def test_batchnorm_gradients_are_verified():
    assert all(verify_model(_model()))


def test_batchnorm_kernels_match_finite_differences(compiled_declared):
    from chainrule.codegen.verify import check_gradients
    from chainrule.derive import Activation
    model = lambda: sequential(3, [Dense(4), BatchNormXhat(), Activation("tanh", sp.tanh), Dense(2)], "mse",
                               name="bn-fd")
    cm = compiled_declared("bn-fd", model)
    checks = check_gradients(cm.model, compiled=cm, seed=2)
    assert [c.name for c in checks] == cm.param_names and len(checks) == 6
    for c in checks:
        assert c.ok and c.compared == min(c.size, 300), str(c)
