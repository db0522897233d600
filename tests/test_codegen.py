"""Generated kernels: gradients vs finite differences, dtypes, readability, the on-disk cache."""
import io
import json
import os
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

import numpy as np
import pytest

from chainrule.codegen import compile_model, render_module
from chainrule.codegen.verify import check_gradients, sample_batch
from chainrule.derive import build_model, derive

ROOT = Path(__file__).resolve().parents[1]

MODELS = ["demo", "mlp-relu", "mlp-tanh-regression", "perceptron", "softmax-ce", "log-softmax-nll",
          "3 -> dense(4) -> relu -> dense(3) -> leaky_relu -> dense(2) -> mae",
          "3 -> dense(4) -> leaky_relu -> dense(2) -> sigmoid -> bce",
          "3 -> dense(2) -> bce_logits",
          "3 -> dense(4) -> relu -> dense(3) -> log_softmax -> nll"]


@pytest.mark.parametrize("name", MODELS)
def test_gradients_match_finite_differences(compiled_model, name):
    cm = compiled_model(name)
    errors = check_gradients(cm.model, compiled=cm, seed=3)
    assert [n for n, _ in errors] == cm.param_names
    for pname, err in errors:
        assert err < 1e-6, (name, pname, err)
    # the separate forward and predict kernels agree with the forward pass that loss_and_grads differentiates
    x, y = sample_batch(cm, batch=7, seed=5)
    params = cm.init_params(3)
    cost, out = cm.forward(params, x, y)
    assert cost == pytest.approx(cm.loss_and_grads(params, x, y)[0], rel=1e-13)
    np.testing.assert_allclose(cm.predict(params, x), out, rtol=1e-13)


def test_check_gradients_api_default(kernel_cache_dir):
    out = check_gradients(build_model("perceptron"), cache_dir=kernel_cache_dir)
    assert all(isinstance(n, str) and e < 1e-6 for n, e in out)


def test_api_shapes_and_init(compiled_model):
    cm = compiled_model("demo")
    assert cm.param_names == ["W1", "b1", "W2", "b2"]
    assert cm.param_shapes == {"W1": (128, 64), "b1": (128,), "W2": (10, 128), "b2": (10,)}
    assert (cm.input_name, cm.target_name, cm.output_names, cm.dtype) == ("x", "y2", ["p2"], "float64")
    p, q = cm.init_params(seed=0), cm.init_params(seed=0)
    assert all(np.array_equal(p[k], q[k]) for k in p)
    assert not np.any(p["b1"]) and np.abs(p["W1"]).max() <= np.sqrt(6 / (64 + 128))
    x, _ = sample_batch(cm, batch=7)
    probs = cm.predict(p, x)
    assert probs.shape == (7, 10) and np.allclose(probs.sum(axis=1), 1.0)


def test_train_step_is_sgd_in_place(compiled_model):
    cm = compiled_model("demo")
    p = cm.init_params(seed=1)
    x, y = sample_batch(cm, batch=32, seed=2)
    cost, grads = cm.loss_and_grads(p, x, y)
    expected = {k: p[k] - 0.5 * grads[k] for k in p}
    ids = {k: id(v) for k, v in p.items()}
    assert cm.train_step(p, x, y, 0.5) == pytest.approx(cost, rel=1e-12)
    for k in p:
        assert id(p[k]) == ids[k] and np.allclose(p[k], expected[k], rtol=1e-12, atol=1e-15)
    costs = [cm.train_step(p, x, y, 0.5) for _ in range(30)]
    assert costs[-1] < 0.5 * cost


def test_float32_module(compiled_model):
    c32, c64 = compiled_model("demo", "float32"), compiled_model("demo")
    assert c32.dtype == "float32" and "DT = np.float32" in c32.source
    assert c32.module_path != c64.module_path
    p64 = c64.init_params(seed=0)
    p32 = {k: v.astype(np.float32) for k, v in p64.items()}
    x, y = sample_batch(c64, batch=16)
    assert c32.predict(p32, x).dtype == np.float32
    cost32, g32 = c32.loss_and_grads(p32, x, y)
    cost64, g64 = c64.loss_and_grads(p64, x, y)
    assert cost32 == pytest.approx(cost64, rel=1e-4)
    for k in g64:
        assert g32[k].dtype == np.float32
        assert np.linalg.norm(g32[k] - g64[k]) <= 1e-3 * np.linalg.norm(g64[k]) + 1e-7
    assert np.isfinite(c32.train_step(p32, x, y, 0.1))
    with pytest.raises(TypeError):
        c32.train_step(p64, x, y, 0.1)          # in place needs the module's dtype


def _code_names(source):
    """NAME tokens of the generated functions (comments, docstrings and copied primitives excluded)."""
    body = source[source.index("def forward("):]
    names = set()
    for tok in tokenize.generate_tokens(io.StringIO(body).readline):
        if tok.type == tokenize.NAME:
            names.add(tok.string)
    return names


def test_module_is_readable_and_names_are_mapped(compiled_model):
    cm = compiled_model("demo")
    src = cm.source
    assert cm.module_path.read_text().endswith(src)
    for comment in ["# z1[b,o] = ", "# a1[b,i] = sigmoid(z1[b, i])", "# d_W1[o,i] = Σ_b[d_z1[b, o]*x[b, i]]",
                    "# d_b1[o] = Σ_b[d_z1[b, o]]", "# sgd update of W1",
                        "# theta__0[i] = -eta*gscale*g[i] + theta[i]", "u_p0[i0] = -u_hp_eta*u_gscale*u_g0[i0] + u_p0[i0]"]:
        assert comment in src, comment
    assert "_matmul(" in src and "@njit(cache=True)" in src
    for fn in ("forward", "predict", "loss_and_grads", "train_step"):
        assert f"def {fn}(" in src
    grads = derive(cm.model)
    user = set(cm.model.tensors) | {d.adjoint.name for d in grads.composed.values()}
    assert not (user & _code_names(src))
    # every kernel statement is preceded (in its block) by a comment naming its equation
    lines = src[src.index("def forward("):].splitlines()
    assigns = [i for i, ln in enumerate(lines) if ln.strip().startswith(("t", "dot"))
               and " = " in ln and not ln.strip().startswith("#")]
    for i in assigns:
        window = lines[max(0, i - 12):i]
        assert any(ln.strip().startswith("#") for ln in window), lines[i]


def test_render_module_matches_cached_source(compiled_model):
    cm = compiled_model("perceptron")
    assert render_module(cm.model) == cm.source


def test_damaged_cache_entry_is_regenerated(tmp_path):
    model = build_model("3 -> dense(2) -> bce_logits")
    cm = compile_model(model, cache_dir=tmp_path)
    assert not cm.cache_hit
    assert compile_model(model, cache_dir=tmp_path).cache_hit
    path = cm.module_path
    text = path.read_text()
    path.write_text(text[: len(text) // 2])              # truncated, as by a crash or full disk
    again = compile_model(model, cache_dir=tmp_path)
    assert not again.cache_hit and again.module_path == path
    assert path.read_text() == text
    p = again.init_params(0)
    x, y = sample_batch(again, batch=4)
    assert np.isfinite(again.loss_and_grads(p, x, y)[0])
    assert "-u_hp_eta*" in text
    path.write_text(text.replace("-u_hp_eta*", "+u_hp_eta*"))  # same length, edited: not trusted either
    assert not compile_model(model, cache_dir=tmp_path).cache_hit
    assert path.read_text() == text
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_cache_dir_env_var(tmp_path, monkeypatch):
    from chainrule.codegen import default_cache_dir
    monkeypatch.setenv("CHAINRULE_CACHE_DIR", str(tmp_path / "k"))
    assert default_cache_dir() == tmp_path / "k"
    monkeypatch.delenv("CHAINRULE_CACHE_DIR")
    assert default_cache_dir().parts[-2:] == ("chainrule", "kernels")


_CHILD = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    from chainrule.codegen import compile_model
    from chainrule.codegen.verify import sample_batch
    from chainrule.derive import build_model
    t1 = time.perf_counter()
    cm = compile_model(build_model("mlp-tanh-regression"), cache_dir=sys.argv[1])
    p = cm.init_params(0)
    x, y = sample_batch(cm, batch=8)
    cm.loss_and_grads(p, x, y); cm.train_step(p, x, y, 0.1); cm.predict(p, x); cm.forward(p, x, y)
    t2 = time.perf_counter()
    misses = sum(sum(getattr(cm.module, f).stats.cache_misses.values())
                 for f in ("loss_and_grads", "train_step", "predict", "forward"))
    hits = sum(sum(getattr(cm.module, f).stats.cache_hits.values())
               for f in ("loss_and_grads", "train_step", "predict", "forward"))
    print(json.dumps({"hit": cm.cache_hit, "misses": misses, "hits": hits, "seconds": t2 - t1,
                      "path": str(cm.module_path)}))
""")


def test_second_process_reuses_cached_kernels(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def run():
        out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], env=env, check=True,
                             capture_output=True, text=True, timeout=300)
        return json.loads(out.stdout.strip().splitlines()[-1])
    first, second = run(), run()
    assert not first["hit"] and first["misses"] > 0
    assert second["hit"] and second["misses"] == 0 and second["hits"] >= 4
    assert second["path"] == first["path"]
    pycache = Path(first["path"]).parent / "__pycache__"
    assert list(pycache.glob("*.nbi")) and list(pycache.glob("*.nbc"))
    assert second["seconds"] < 0.5 * first["seconds"], (first, second)


def test_affine_reads_multi_limit_sums_and_nested_reductions(kernel_cache_dir):
    """A hand-written 1-D convolution model: reads x[b, t+p], two-limit sums in the weight
    gradient, a squared inner sum (nested reduction) and a LogSumExp over time."""
    import sympy as sp
    from chainrule.derive import Equation, Model, Tensor, indices, size
    from chainrule.derive.layers import B
    from chainrule.derive.primitives import LogSumExp, leaky_relu
    n, k = size("n"), size("k")
    b, t, p, j = indices("b t p j")
    x = Tensor("x", (B, n), role="input")
    W = Tensor("W", (k,), role="param", init="glorot")
    V = Tensor("V", (k,), role="param", init="he")
    z, h = Tensor("z", (B, n - k + 1)), Tensor("h", (B, n - k + 1))
    y = Tensor("y", (B, n - k + 1), role="target")
    l, C = Tensor("l", (B,), role="loss"), Tensor("C", (), role="cost")
    eqs = [Equation(z, (b, t), sp.Sum(W[p] * x[b, t + p], (p, 0, k - 1))),
           Equation(h, (b, t), leaky_relu(z[b, t], sp.Rational(1, 10)) + sp.tanh(z[b, t]) ** 3
                    + sp.Sum(V[j] * x[b, t + j], (j, 0, k - 1)) ** 2),
           Equation(l, (b,), sp.Sum((h[b, t] - y[b, t]) ** 2, (t, 0, n - k))
                    + LogSumExp(h[b, t], (t, 0, n - k))),
           Equation(C, (), sp.Sum(l[b], (b, 0, B - 1)) / B)]
    model = Model(eqs, [x, W, V, z, h, y, l, C], C, loss=l, outputs=[h],
                  size_values={n: 7, k: 3}, name="conv1d")
    errors = check_gradients(model, cache_dir=kernel_cache_dir)
    assert [e[0] for e in errors] == ["W", "V"] and all(e < 1e-6 for _, e in errors), errors


def test_printer_constructs_and_unsupported():
    import sympy as sp
    from chainrule.codegen.printer import print_expr
    from chainrule.derive.errors import UnsupportedError
    a, c = sp.Symbol("a", real=True), sp.Symbol("c", real=True)
    names = {a: "v_a", c: "v_c"}
    code = print_expr(sp.Piecewise((a, a > 0), (c / 3, True)) + sp.Max(a, c) + sp.Min(a, 1)
                      + sp.sign(a) + sp.Abs(c) + sp.log(a) + a ** 2 + sp.Rational(1, 4), names)
    env = {"math": __import__("math"), "np": np, "TINY": 1e-300,
           "_sign": lambda v: float(np.sign(v)), "v_a": 2.0, "v_c": -1.5}
    expected = 2.0 + 2.0 + 1.0 + 1.0 + 1.5 + np.log(2.0) + 4.0 + 0.25
    assert eval(code, env) == pytest.approx(expected)
    assert "TINY" in code and "v_a" in code
    with pytest.raises(UnsupportedError, match="gamma"):
        print_expr(sp.gamma(a), names)
    with pytest.raises(UnsupportedError):
        print_expr(sp.Symbol("unknown", real=True), names)
