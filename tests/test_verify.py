"""Verification that cannot be fooled: sizes, exactness, an independent reference, and safe claims."""
import copy
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import sympy as sp

from chainrule.cli import main
from chainrule.derive import (Dense, Equation, LogSumExp, Model, SpecError, Tensor, build_model, derive, index,
                              sequential, size)
from chainrule.derive.layers import B, Layer
from chainrule.derive.verify import (Check, VerificationError, check_claim, size_assignments, size_symbols,
                                     verify_model)

b, o, i, k, h, p = (index(n) for n in "b o i k h p".split())
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo():
    model = build_model("demo")
    return model, derive(model)


@pytest.fixture(scope="module")
def mse():
    model = build_model("3 -> dense(2) -> mse")
    return model, derive(model)


@pytest.fixture(scope="module")
def tanh_model():
    model = build_model("3 -> dense(2) -> tanh -> dense(2) -> mse")
    return model, derive(model)


def _sizes_ok(assignment: dict):
    values = list(assignment.values())
    return len(set(values)) == len(values) and 2 not in values and all(v >= 3 for v in values)


# -- sizes --------------------------------------------------------------------------------------------------
def test_sizes_are_distinct_never_two_and_change_between_assignments(demo):
    model, _ = demo
    found = size_assignments(model)
    assert len(found) >= 2
    assert {str(s) for s in size_symbols(model)} == {"B", "n_0", "n_1", "n_2"}
    for a in found:
        assert set(a) == set(size_symbols(model)) and _sizes_ok(a)
    for s in size_symbols(model):                       # every size, B included, takes two values
        assert len({a[s] for a in found}) == len(found)


def test_every_check_states_its_sizes_and_element_count(demo):
    model, g = demo
    checks = verify_model(model, g)
    assert checks and all(checks)
    for c in checks:
        assert len(c.sizes) >= 2 and all(_sizes_ok(a) for a in c.sizes)
        assert c.checked > 0
        text = str(c)
        assert "B=3" in text and f"{c.checked} element comparisons" in text
    w1 = next(c for c in checks if c.name.endswith("dC/dW1"))
    # W1 is n_1 x n_0: every element, at every assignment and point
    assert w1.checked == sum(a["n_1"] * a["n_0"] for a in w1.sizes) * w1.points


@pytest.mark.parametrize("model_name, claim", [
    ("demo", "z2 = (p2[b,o]-y2[b,o])/2"),
    ("demo", "W1 = (n_0 - 1)*sum(b, d_z1[b,o]*x[b,i])"),
    ("3 -> dense(2) -> mse", "z1 = (z1[b,o]-y1[b,o])/2"),
])
def test_claims_true_only_at_size_two_are_rejected_with_the_sizes(model_name, claim, demo, mse):
    model, g = demo if model_name == "demo" else mse
    tensor, _, formula = claim.partition("=")
    result = check_claim(model, tensor.strip(), formula.strip(), grads=g)
    assert not result.equal
    sizes = result.counterexample["sizes"]
    assert "B" in sizes and _sizes_ok(sizes)
    assert result.counterexample["claimed"] != result.counterexample["derived"]
    assert "NOT EQUAL" in str(result) and "B=" in str(result)


def test_cli_rejects_a_size_dependent_claim_naming_the_sizes(capsys):
    assert main(["verify", "3 -> dense(2) -> mse", "--claim", "z1 = (z1[b,o]-y1[b,o])/2"]) == 1
    out = capsys.readouterr().out
    assert "not equal: counterexample for dC/dz1" in out
    assert "sizes: B=3, n_0=4, n_1=5" in out and "element: d_z1[" in out


def test_correct_claims_are_equal_and_say_what_was_compared(demo, mse):
    model, g = demo
    r = check_claim(model, "z2", "(p2[b,o] - y2[b,o]) / B", grads=g)
    assert r.equal and r.checked > 0 and len(r.sizes) >= 2
    model, g = mse
    r = check_claim(model, "z1", "2*(z1[b,o] - y1[b,o])/(B*n_1)", grads=g)
    assert r.equal and r.method == "exact"


def test_textbook_function_forms_are_accepted(tanh_model, demo):
    model, g = tanh_model
    for claim in ("d_a1[b,o] / cosh(z1[b,o])^2", "sech(z1[b,o])^2 * d_a1[b,o]",
                  "(1 - tanh(z1[b,o])^2) * d_a1[b,o]", "(1 - a1[b,o]^2) * d_a1[b,o]",
                  "4 * d_a1[b,o] / (exp(z1[b,o]) + exp(-z1[b,o]))^2",
                  "(1 - (sinh(z1[b,o]) / cosh(z1[b,o]))^2) * d_a1[b,o]"):
        assert check_claim(model, "z1", claim, grads=g).equal, claim
    model, g = demo
    for claim in ("sigmoid(z1[b,o]) * (1 - sigmoid(z1[b,o])) * d_a1[b,o]",
                  "exp(log(a1[b,o])) * (1 - a1[b,o]) * sqrt(d_a1[b,o]^2) * sign(d_a1[b,o])",
                  "max(a1[b,o], 0) * (1 - min(a1[b,o], 1)) * abs(d_a1[b,o]) * sign(d_a1[b,o])"):
        assert check_claim(model, "z1", claim, grads=g).equal, claim


def test_a_claim_without_a_value_somewhere_is_an_error_naming_where(demo):
    model, g = demo
    with pytest.raises(SpecError, match=r"no value at sizes \{'B': 3, .*division by zero"):
        check_claim(model, "z2", "(p2[b,o] - y2[b,o]) / (n_2 - 6)", grads=g)
    with pytest.raises(SpecError, match="log of a negative number"):
        check_claim(model, "z2", "log(p2[b,o] - 1)", grads=g)


HOSTILE = {
    "1/0": "division by zero",
    "log(0)": "log\\(0\\) is undefined",
    "(p2[b,o]-y2[b,o])/B + 1/0": "division by zero",
    "(p2-y2)/B + 1/0": "p2 has shape",
    "0/0": "division by zero",
    "9^9^9": "too large",
    "2^2^2^2^2^2": "too large",
    "exp(exp(exp(100)))": "digits",
    "0*10^10^8": "too large",
    "(" * 400 + "p2[b,o]" + ")" * 400: "nested too deeply",
    "p2[b,o+5]": "runs over \\[5, n_2 \\+ 4\\] but axis 1 of p2",
    "sum(p2, p2[b,o])": "p2 is a tensor",
    "sum(k, 1)": "not used as a tensor index",
    "p2[b, o/2]": "not an integer",
    "p2[b, p2[b,o]]": "made of indices and sizes",
    "p2[b]": "rank 2",
    "sqrt(-1)": "not real",
    "exp(p2[b,o] * 10^8)": "too large",
    "(x[b,0]^1000)^1000": "too large",
    "2^" * 900 + "2": "too large",
    "__import__('os').system('true')": "cannot read",
    "p2[b,o].__class__": "cannot read",
    "lambda: 1": "cannot read",
    "": "empty",
    "1" * 60: "too long",
    "x" * 2001: "too long",
    "sum(k0, sum(k1, sum(k2, sum(k3, sum(k4, sum(k5, sum(k6, sum(k7, "
    "p2[k0,k1]*p2[k2,k3]*p2[k4,k5]*p2[k6,k7]))))))))": "too many nested sums",
}


def test_hostile_and_invalid_claims_get_clear_errors_quickly():
    """Each claim is answered with a SpecError within seconds; run in a subprocess so a hang fails."""
    script = textwrap.dedent("""
        import json, sys, time
        from chainrule.derive import build_model, derive
        from chainrule.derive.errors import ChainruleError
        from chainrule.derive.verify import check_claim
        model = build_model("demo"); grads = derive(model)
        out = {}
        for claim in json.loads(sys.stdin.read()):
            t = time.perf_counter()
            try:
                r = check_claim(model, "z2", claim, grads=grads)
                verdict = "equal" if r.equal else "not equal"
            except ChainruleError as err:
                verdict = f"{type(err).__name__}: {err}"
            except BaseException as err:
                verdict = f"CRASH {type(err).__name__}: {err}"
            out[claim] = [verdict, time.perf_counter() - t]
            print(json.dumps({claim[:80]: out[claim]}), file=sys.stderr, flush=True)
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], input=json.dumps(list(HOSTILE)), capture_output=True,
                          text=True, timeout=240, cwd=ROOT, env={**__import__("os").environ,
                                                                 "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    import re
    for claim, pattern in HOSTILE.items():
        verdict, seconds = results[claim]
        assert verdict.startswith("SpecError: "), (claim[:60], verdict)
        assert re.search(pattern, verdict), (claim[:60], verdict)
        assert seconds < 10, (claim[:60], seconds)


def test_unary_minus_chains_are_read_without_recursion(demo):
    model, g = demo
    assert check_claim(model, "z2", "-" * 1501 + "(y2[b,o] - p2[b,o]) / B", grads=g).equal
    assert not check_claim(model, "z2", "-" * 1500 + "(y2[b,o] - p2[b,o]) / B", grads=g).equal


def test_unknown_names_list_the_models_tensors_and_the_sum_form(demo, capsys):
    model, g = demo
    with pytest.raises(SpecError) as err:
        check_claim(model, "W1", "delta[b,o] * x[b,i]", grads=g)
    text = str(err.value)
    for name in ("d_z1", "p2", "W1", "x", "sum(k, expr)", "n_0", "d_W1[o, i]", "cosh"):
        assert name in text, name
    assert main(["verify", "demo", "--claim", "W1 = delta[b,o]"]) == 2
    captured = capsys.readouterr()
    assert "unknown name 'delta'" in captured.err and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_cli_help_shows_the_claim_grammar(capsys):
    with pytest.raises(SystemExit):
        main(["verify", "--help"])
    out = capsys.readouterr().out
    for needle in ("sum(k, expr)", "d_z1", "p2", "cosh", "--claim"):
        assert needle in out, needle


def test_cli_claim_errors_are_one_line_with_nonzero_exit(capsys):
    for claim in ("z2 = 9^9^9", "z2 (p2)", "nosuch = 1", "z2 = " + "(" * 500 + "1" + ")" * 500):
        assert main(["verify", "demo", "--claim", claim]) == 2, claim
        err = capsys.readouterr().err
        assert err.startswith("chainrule verify: ") and len(err.strip().splitlines()) == 1, err


# -- what verification compares -------------------------------------------------------------------------------
def test_a_check_of_zero_elements_is_an_error_never_a_pass():
    d_model = _conv_model()
    model, W, K = d_model
    with pytest.raises(VerificationError, match="size 0"):     # W - K + 1 = 0: an empty output
        verify_model(model, sizes=[{"B": 3, "W": 4, "K": 5}, {"B": 4, "W": 5, "K": 6}])
    x = Tensor("x", (B, size("n")), role="input")
    cost = Tensor("C", (), role="cost")
    no_params = Model([Equation(cost, (), sp.Sum(x[b, 0], (b, 0, B - 1)))], [x, cost], cost)
    with pytest.raises(VerificationError, match="no parameter gradient"):
        verify_model(no_params)


def test_a_corrupted_gradient_is_caught(demo):
    model, g = demo

    def corrupted(name, change):
        bad = copy.copy(g)
        bad._composed = dict(g.composed)
        d = copy.copy(g.composed[name])
        d.equation = Equation(d.adjoint, d.equation.indices, change(d.equation.body))
        bad._composed[name] = d
        return {c.name.split("dC/d")[1]: c for c in verify_model(model, bad)}

    # a factor that is 1 at B = 2 only would have passed the old check (B fixed at 2)
    results = corrupted("b2", lambda body: body * (1 + 1 / B) * 2 / 3)
    assert not results["b2"] and results["W2"] and results["W1"]
    assert results["b2"].counterexample["sizes"]["B"] != 2
    # a transposed read of W2 (n_2 x n_1): the same at n_1 = n_2 = 2, wrong at every other size
    W2 = model.tensors["W2"]
    results = corrupted("z1", lambda body: body.replace(lambda e: isinstance(e, sp.Indexed) and e.base == W2.base,
                                                          lambda e: W2.base[e.indices[1], e.indices[0]]))
    assert not results["W1"] and not results["b1"]
    assert results["W2"] and results["b2"]


def test_the_reference_does_not_use_the_derivatives_primitives_declare():
    """A wrong declared derivative (σ' = σ) makes the engine derive a wrong gradient; the reference
    differentiates σ's plain definition 1/(1+e^-u), so verification catches it."""
    from sympy.core.cache import clear_cache
    from chainrule.derive.primitives import sigmoid
    right = sigmoid.fdiff
    sigmoid.fdiff = lambda self, argindex=1: sigmoid(self.args[0])
    clear_cache()                                 # SymPy caches derivatives: none may leak either way
    try:
        model = build_model("3 -> dense(2) -> sigmoid -> dense(2) -> mse")
        checks = {c.name.split("dC/d")[1]: c for c in verify_model(model, derive(model))}
    finally:
        sigmoid.fdiff = right
        clear_cache()
    assert not checks["W1"] and not checks["b1"] and checks["W2"] and checks["b2"]


def test_a_rank_zero_parameter_is_verified():
    class Temperature(Layer):
        has_params = True

        def build(self, d, x):
            s = d.param("s", ())
            y = d.tensor("z", x.shape)
            return d.define(y, (b, i), s.read() * x[b, i])

    model = sequential(3, [Dense(2), Temperature()], "mse")
    checks = {c.name.split("dC/d")[1]: c for c in verify_model(model)}
    assert checks["s2"] and checks["s2"].checked == 2 * 2       # one element, 2 assignments x 2 points


def _conv_model(stride=1):
    """y[b,h] = Σ_p w[p] x[b, stride*h + p] / K, then a squared error: a strided conv / average pool."""
    W, K = size("W"), size("K")
    out = (W - K) / stride + 1
    x = Tensor("x", (B, W), role="input")
    w = Tensor("w", (K,), role="param")
    y = Tensor("y", (B, out))
    t = Tensor("t", (B, out), role="target")
    cost = Tensor("C", (), role="cost")
    eqs = [Equation(y, (b, h), sp.Sum(w[p] * x[b, stride * h + p], (p, 0, K - 1)) / K),
           Equation(cost, (), sp.Sum(sp.Sum((y[b, h] - t[b, h]) ** 2, (h, 0, out - 1)), (b, 0, B - 1)) / B)]
    return Model(eqs, [x, w, y, t, cost], cost, size_values={W: 8, K: 2}, name=f"conv-stride-{stride}"), W, K


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_strided_reads_get_sizes_that_keep_every_shape_whole(stride):
    model, W, K = _conv_model(stride)
    found = size_assignments(model)
    assert len(found) >= 2
    for a in found:
        assert _sizes_ok(a)
        out = sp.Rational(a[W] - a[K], stride) + 1
        assert out.is_Integer and out >= 1, a
    checks = verify_model(model)
    assert checks and all(checks)


def test_convolution_gradient_wrt_the_input_verifies_at_kernel_sizes_above_two():
    from chainrule.derive import Builder
    d = Builder()
    L, K = d.size("L", 5), d.size("K", 3)
    t = index("t")
    x = d.tensor("x", (B, L), role="input")
    w = d.param("w", (K,))
    y = d.tensor("y", (B, L - K + 1))
    d.define(y, (b, t), sp.Sum(w[p] * x[b, t + p], (p, 0, K - 1)))
    cost = Tensor("C", (), role="cost")
    model = Model(d.equations + [Equation(cost, (), sp.Sum(sp.Sum(y[b, t] ** 2, (t, 0, L - K)), (b, 0, B - 1)))],
                  d.tensors + [cost], cost, size_values=d.size_values)
    checks = verify_model(model, derive(model, wrt=["x"]))
    assert all(checks) and {c.name.split("dC/d")[1] for c in checks} == {"w", "x"}
    assert all(a["K_0"] >= 3 and a["L_0"] >= a["K_0"] for a in checks[0].sizes)


def test_batch_statistics_verify():
    """Batch normalisation declared as a user would: mean and variance over the batch."""
    class BatchNorm(Layer):
        has_params = True

        def build(self, d, x):
            n = x.shape[1]
            g, beta = d.param("g", (n,)), d.param("beta", (n,))
            mu, var, out = d.tensor("mu", (n,)), d.tensor("v", (n,)), d.tensor("z", x.shape)
            d.define(mu, (i,), sp.Sum(x[b, i], (b, 0, B - 1)) / B)
            d.define(var, (i,), sp.Sum((x[b, i] - mu[i]) ** 2, (b, 0, B - 1)) / B)
            return d.define(out, (b, i), g[i] * (x[b, i] - mu[i]) / sp.sqrt(var[i] + sp.Rational(1, 100)) + beta[i])

    checks = verify_model(sequential(3, [Dense(4), BatchNorm()], "mse"))
    assert len(checks) == 4 and all(checks), [str(c) for c in checks if not c]


def test_self_attention_verifies_in_seconds():
    """One head, declared with raw equations: Q = XWq, K = XWk, V = XWv, S = QKᵀ/√d, A = softmax(S), O = AV."""
    start = time.perf_counter()
    T, d = size("T"), size("d")
    t, s, e, c, m = (index(n) for n in "t s e c m".split())
    X, Y = Tensor("X", (T, d), role="input"), Tensor("Y", (T, d), role="target")
    Wq, Wk, Wv = (Tensor(n, (d, d), role="param") for n in ("Wq", "Wk", "Wv"))
    Q, K, V = (Tensor(n, (T, d)) for n in "QKV")
    S, A, O, C = Tensor("S", (T, T)), Tensor("A", (T, T)), Tensor("O", (T, d)), Tensor("C", (), role="cost")
    eqs = [Equation(Q, (t, e), sp.Sum(X[t, c] * Wq[c, e], (c, 0, d - 1))),
           Equation(K, (t, e), sp.Sum(X[t, c] * Wk[c, e], (c, 0, d - 1))),
           Equation(V, (t, e), sp.Sum(X[t, c] * Wv[c, e], (c, 0, d - 1))),
           Equation(S, (t, s), sp.Sum(Q[t, e] * K[s, e], (e, 0, d - 1)) / sp.sqrt(d)),
           Equation(A, (t, s), sp.exp(S[t, s] - LogSumExp(S[t, m], (m, 0, T - 1)))),
           Equation(O, (t, e), sp.Sum(A[t, s] * V[s, e], (s, 0, T - 1))),
           Equation(C, (), sp.Sum(sp.Sum((O[t, e] - Y[t, e]) ** 2, (e, 0, d - 1)), (t, 0, T - 1)) / 2)]
    model = Model(eqs, [X, Y, Wq, Wk, Wv, Q, K, V, S, A, O, C], C, size_values={T: 3, d: 3}, name="attention")
    checks = verify_model(model, derive(model, wrt=["X"]))
    elapsed = time.perf_counter() - start
    assert {c.name.split("dC/d")[1] for c in checks} == {"Wq", "Wk", "Wv", "X"}
    assert all(checks), [str(c) for c in checks if not c]
    assert all(c.method == "50 digits" and c.checked > 0 for c in checks)
    assert elapsed < 30, f"attention verification took {elapsed:.1f}s"


def test_check_is_falsy_when_not_equal_and_prints_the_counterexample():
    c = Check("x: dC/dW", False, "exact", {"sizes": {"B": 3}, "element": "d_W[0]"}, 1, [{"B": 3}], 1)
    assert not c and "NOT EQUAL" in str(c) and "B=3" in str(c) and "d_W[0]" in str(c)


def test_cli_verify_table_shows_sizes_and_counts(capsys):
    assert main(["verify", "--symbolic-only", "perceptron"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("declaration") and "sizes" in lines[0]
    assert "perceptron" in lines[1] and "pass" in lines[1] and "(B=3, n_0=4, n_1=5)" in lines[1]
    assert lines[-1].startswith("all passed")
