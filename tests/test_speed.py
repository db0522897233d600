"""What the speed work (issue 10) changed, checked for behaviour (timings live in benchmarks/):
the generated exp, the primitives in the module's dtype, one log-sum-exp, the wrapper's fast path,
the digits read without scikit-learn's loader, and the derivation derived once."""
import gzip
import sys
from pathlib import Path

import mpmath
import numpy as np
import pytest

from chainrule.codegen.cache import cached_text
from chainrule.derive import build_model


@pytest.fixture(scope="module")
def demo_module(tmp_path_factory):
    """The demo's modules compiled in a cache of their own, so that the test below decides which
    function Numba compiles first."""
    from chainrule.codegen import compile_model
    memo, cache = {}, tmp_path_factory.mktemp("speed-kernels")

    def get(dtype):
        if dtype not in memo:
            memo[dtype] = compile_model(build_model("demo"), dtype=dtype, cache_dir=cache)
        return memo[dtype]
    return get


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_generated_exp_is_within_one_ulp_and_keeps_the_special_values(demo_module, dtype):
    """The module's branch-free exp against float64 NumPy (float32 module) or 50-digit mpmath
    (float64 module) over its whole normal range, plus inf, -inf, NaN, overflow and underflow."""
    cm = demo_module(dtype)
    exp = cm.module._exp
    rng = np.random.default_rng(3)
    lo, hi = (-708.39, 709.78) if dtype == "float64" else (-87.33, 88.72)
    xs = np.concatenate([rng.uniform(lo, hi, 3000), rng.normal(0.0, 3.0, 3000), [lo, hi, 0.0, 1.0]]).astype(dtype)
    got = np.array([exp(v) for v in xs], dtype=np.float64)
    if dtype == "float32":
        ref = np.exp(xs.astype(np.float64))
    else:
        with mpmath.workdps(50):
            ref = np.array([float(mpmath.exp(mpmath.mpf(float(v)))) for v in xs])
    ulps = np.abs(got - ref) / np.spacing(np.abs(ref).astype(dtype)).astype(np.float64)
    assert ulps.max() <= 1.0, (xs[ulps.argmax()], ulps.max())
    t = np.dtype(dtype).type
    assert exp(t(-np.inf)) == 0.0 and exp(t(np.inf)) == np.inf and np.isnan(exp(t(np.nan)))
    assert exp(t(hi + 5)) == np.inf and exp(t(lo - 5)) == 0.0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_generated_tanh_is_within_two_ulps_and_keeps_the_special_values(demo_module, dtype):
    """The module's branch-free tanh (what a recurrence's time loop calls 65 536 times a step)
    against float64 NumPy (float32 module) or 50-digit mpmath (float64 module): tiny, small,
    around the switch at |x| = 0.625, large and saturated arguments of both signs, and ±inf, NaN."""
    cm = demo_module(dtype)
    tanh = cm.module._tanh
    rng = np.random.default_rng(4)
    xs = np.concatenate([rng.normal(0.0, s, 600) for s in (1e-6, 1e-2, 0.3, 0.7, 2.0, 12.0)]
                        + [[0.625, -0.625, np.nextafter(0.625, 0), 1e-30, 30.0, -50.0]]).astype(dtype)
    got = np.array([tanh(v) for v in xs], dtype=np.float64)
    if dtype == "float32":
        ref = np.tanh(xs.astype(np.float64))
    else:
        with mpmath.workdps(50):
            ref = np.array([float(mpmath.tanh(mpmath.mpf(float(v)))) for v in xs])
    ulps = np.abs(got - ref) / np.spacing(np.abs(ref).astype(dtype)).astype(np.float64)
    assert ulps.max() <= 2.0, (xs[ulps.argmax()], ulps.max())
    t = np.dtype(dtype).type
    assert tanh(t(np.inf)) == 1.0 and tanh(t(-np.inf)) == -1.0 and np.isnan(tanh(t(np.nan)))
    assert {str(sig.return_type) for sig in tanh.nopython_signatures} == {dtype}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_generated_exp_keeps_its_exact_arithmetic_when_a_fastmath_kernel_compiles_it_first(tmp_path, dtype):
    """Numba compiles a function that leaves ``fastmath`` unset with the flags of the kernel whose
    compilation reaches it first: reached from ``predict`` (reassoc, contract, ...), _exp computed
    p * (2^h * 2^(n-h)) and overflowed to inf just below the top of its range (709.5 in float64,
    88.685 in float32). Here a kernel runs before _exp is ever called directly, in a fresh cache."""
    from chainrule.codegen import compile_model
    cm = compile_model(build_model("demo"), dtype=dtype, cache_dir=tmp_path)
    params = cm.init_params(seed=1)
    x = np.random.default_rng(0).random((5, 64))
    assert np.isfinite(cm.predict(params, x)).all()          # compiles predict, sigmoid and _exp
    t = np.dtype(dtype).type
    for v in ((709.5, 709.78) if dtype == "float64" else (88.685, 88.72)):
        got = cm.module._exp(t(v))
        assert np.isfinite(got) and abs(float(got) / np.exp(np.float64(t(v))) - 1) < 2 * np.finfo(dtype).eps, (v, got)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sigmoid_lowering_is_stable_and_in_the_module_dtype(demo_module, dtype):
    cm = demo_module(dtype)
    xs = np.array([-800.0, -30.0, -1.5, -1e-3, 0.0, 2e-3, 1.25, 40.0, 800.0], dtype=dtype)
    got = np.array([cm.module.sigmoid(np.dtype(dtype).type(v)) for v in xs])
    with mpmath.workdps(30):
        ref = np.array([float(1 / (1 + mpmath.exp(-mpmath.mpf(float(v))))) for v in xs])
    eps = np.finfo(dtype).eps
    # exp (<= 1 ulp), 1 + e, the reciprocal and e * r: within 4 units of rounding, relative
    assert np.all(np.abs(got - ref) <= 4 * eps * np.maximum(ref, np.finfo(dtype).tiny)), got
    # computed in the module's dtype, not widened: Numba typed its result as such
    assert {str(sig.return_type) for sig in cm.module.sigmoid.nopython_signatures} == {dtype}


def test_kernels_ask_for_512_bit_vectors_and_get_them_where_the_cpu_has_avx512(demo_module):
    """Every kernel starts with _wide_vectors(): its function carries LLVM's "prefer-vector-width"
    attribute, and on a CPU with AVX-512 the sigmoid loop of train_step is compiled 16 floats wide
    (zmm registers; LLVM's default for these CPUs is 256 bits, ymm)."""
    import llvmlite.binding as llvm
    cm = demo_module("float32")
    params = cm.init_params(seed=0)
    x = np.random.default_rng(0).random((37, 64)).astype(np.float32)
    cm.train_step(params, x, np.eye(10, dtype=np.float32)[np.arange(37) % 10], 0.1)
    kernel = cm.module.train_step
    signature = kernel.signatures[0]
    assert '"prefer-vector-width"="512"' in kernel.inspect_llvm(signature)
    assert all("    _wide_vectors()" in cm.source.split(f"def {name}(")[1].split("\n\n")[0]
               for name in ("forward", "predict", "loss_and_grads", "train_step", "outputs"))
    if "+avx512f" not in llvm.get_host_cpu_features().flatten().split(","):
        pytest.skip("this CPU has no AVX-512: 256 bits are the widest vectors")
    assert "zmm" in kernel.inspect_asm(signature)


def test_float32_module_prints_values_in_float32_and_the_log_sum_exp_once(compiled_model):
    src = compiled_model("demo", "float32").source
    lag = src[src.index("def loss_and_grads"):src.index("def train_step")]
    assert lag.count("_max = DT(-np.inf)") == 1      # the log-sum-exp: once, in the dtype, read twice
    assert "cse" in lag and "/DT(n_batch)" in lag and "(DT(1) - " in lag
    assert "math.exp(" not in src
    from chainrule.codegen.render import render_module
    src_rnn = render_module(build_model("seq(5, 3) -> rnn(4) -> dense(2) -> softmax_cross_entropy"), "float32")
    assert "_tanh(" in src_rnn and "math.tanh(" not in src_rnn        # the vectorisable tanh
    src64 = compiled_model("demo", "float64").source
    assert "DT(1)" not in src64 and "/n_batch" in src64


def test_fused_loop_keeps_an_intermediate_nothing_else_reads_as_a_local(compiled_model):
    """z1 is read only by a1 = σ(z1), pointwise: in loss_and_grads it is a scalar, no array."""
    src = compiled_model("demo").source
    lag = src[src.index("def loss_and_grads"):src.index("def train_step")]
    assert "t3_z1 = np.empty" not in lag and "t3_z1 = " in lag
    fwd = src[src.index("def forward"):src.index("def predict")]
    assert "t10_p2 = np.empty" in fwd                 # returned by forward: stays an array


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_train_step_matches_numpy_by_hand_in_both_dtypes(compiled_model, dtype):
    """One SGD step of the demo MLP against a NumPy step written by hand (batch 37)."""
    cm = compiled_model("demo", dtype)
    rng = np.random.default_rng(5)
    x = rng.random((37, 64)).astype(dtype)
    y = np.eye(10, dtype=dtype)[rng.integers(0, 10, 37)]
    p = cm.init_params(seed=2)
    ref = {k: v.astype(np.float64) for k, v in p.items()}
    cost = cm.train_step(p, x, y, lr=0.3)
    z1 = x @ ref["W1"].T + ref["b1"]
    a1 = 1 / (1 + np.exp(-z1))
    z2 = a1 @ ref["W2"].T + ref["b2"]
    lse = np.log(np.exp(z2 - z2.max(1, keepdims=True)).sum(1)) + z2.max(1)
    want = -(y * (z2 - lse[:, None])).sum() / 37
    d2 = (np.exp(z2 - lse[:, None]) - y) / 37
    d1 = (d2 @ ref["W2"]) * a1 * (1 - a1)
    new = {"W1": ref["W1"] - 0.3 * d1.T @ x, "b1": ref["b1"] - 0.3 * d1.sum(0),
           "W2": ref["W2"] - 0.3 * d2.T @ a1, "b2": ref["b2"] - 0.3 * d2.sum(0)}
    tol = 2e-6 if dtype == "float32" else 1e-12
    assert abs(cost - want) < tol * 10
    for k in new:
        np.testing.assert_allclose(p[k], new[k], atol=tol, rtol=0)


def test_facts_checked_skips_only_the_fact_check(compiled_model):
    """``facts_checked=True`` (Network.fit, after checking the whole data set) skips the per-step
    fact check; shapes are still checked, and without it a broken target row is refused."""
    from chainrule.codegen.facts import FactError
    from chainrule.derive.errors import ShapeError
    cm = compiled_model("demo")
    p = cm.init_params(seed=0)
    x = np.full((5, 64), 0.5)
    y = np.eye(10)[[1, 2, 3, 4, 5]]
    y[3] = 0.0                                       # a row that sums to 0, not 1
    with pytest.raises(FactError, match="row 3"):
        cm.train_step(p, x, y, lr=0.1)
    assert np.isfinite(cm.train_step(p, x, y, lr=0.1, facts_checked=True))
    with pytest.raises(ShapeError, match=r"input x has shape \(5, 63\)"):
        cm.train_step(p, x[:, :63], y, lr=0.1, facts_checked=True)
    with pytest.raises(TypeError, match="W1 in place"):
        cm.train_step({**p, "W1": p["W1"].astype(np.float32)}, x, np.eye(10)[[1, 2, 3, 4, 5]], lr=0.1)


def test_digits_read_from_the_installed_file_equal_scikit_learns_loader():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    from chainrule.runtime.data import _sklearn_data_file, load_digits
    path = _sklearn_data_file("digits.csv.gz")
    assert path is not None and gzip.open(path).read(10)
    x, y = load_digits()
    d = sklearn_datasets.load_digits()
    assert x.shape == (1797, 64) and np.array_equal(x, d.data / 16.0) and np.array_equal(y, d.target)


def test_derivation_document_is_derived_once_then_read_from_the_cache(tmp_path):
    model = build_model("5 -> dense(3) -> tanh -> dense(4) -> softmax_cross_entropy")
    calls = []

    def make():
        calls.append(1)
        return "# the derivation\n$z = W x$\n"
    first = cached_text(model, "derivation.md", make, cache_dir=tmp_path / "c")
    again = cached_text(build_model("5 -> dense(3) -> tanh -> dense(4) -> softmax_cross_entropy"),
                        "derivation.md", make, cache_dir=tmp_path / "c")
    assert first == again == make() and len(calls) == 2          # derived once (+ the call here)
    other = build_model("5 -> dense(3) -> sigmoid -> dense(4) -> softmax_cross_entropy")
    cached_text(other, "derivation.md", make, cache_dir=tmp_path / "c")
    assert len(calls) == 3                                        # another model: derived
    for f in (tmp_path / "c").iterdir():
        if f.name.startswith("doc_"):
            f.write_text(f.read_text() + "tampered")            # damaged: derived again
    cached_text(model, "derivation.md", make, cache_dir=tmp_path / "c")
    assert len(calls) == 4


def test_derive_is_computed_once_per_model():
    from chainrule.derive import derive
    model = build_model("demo")
    assert derive(model) is derive(model)


def test_a_worker_compiles_forward_into_the_cache_while_fit_compiles_train_step(tmp_path, monkeypatch):
    """On a cold start ``Network.fit`` has a worker process compile ``forward`` (the epoch metrics)
    into Numba's cache; this process then loads it from there (a cache hit, no compilation of its
    own), and the worker compiled it for exactly the argument types the wrapper passes. (A worker is
    started only when a core is idle: here it is, whatever the test machine's load.)"""
    from chainrule.codegen import background, compile_model
    from chainrule.runtime import Network
    monkeypatch.setattr(background, "idle_core", lambda: True)
    model = build_model("6 -> dense(5) -> tanh -> dense(3) -> softmax_cross_entropy")
    cm = compile_model(model, cache_dir=tmp_path)
    rng = np.random.default_rng(1)
    x, labels = rng.normal(size=(40, 6)), rng.integers(0, 3, 40)
    net = Network(model, compiled=cm, seed=0)
    net.fit(x, labels, epochs=2, batch_size=16, progress=False)
    forward = cm.module.forward
    assert sum(forward.stats.cache_hits.values()) == 1 and not sum(forward.stats.cache_misses.values())
    assert cm._background is None                    # waited for, and not started twice
    # a cached module (the next process): no worker
    again = compile_model(model, cache_dir=tmp_path)
    assert again.cache_hit and not again.compile_in_background(["forward"])


def test_training_limits_blas_to_one_thread_for_small_products(compiled_model):
    """``fit`` runs the demo at batch 32 (largest product 8192 × 32 multiply-adds) on one BLAS
    thread and restores the limit afterwards; a large product is left to BLAS."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from chainrule.runtime import Callback, Network
    from chainrule.runtime.threads import training_blas_threads
    shapes = [(128, 64), (128,), (10, 128), (10,)]
    assert training_blas_threads(shapes, 32) == 1 and training_blas_threads(shapes, 2047) == 1
    assert training_blas_threads(shapes, 2048) is None                # 8192 * 2048 = 2^24
    assert training_blas_threads(shapes, 32, requested=3) == 3
    assert training_blas_threads(shapes, 32, requested=None) is None

    seen = []

    class Threads(Callback):
        def on_batch_end(self, step, steps, cost):
            seen.append({i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()
                         if i["user_api"] == "blas"})
    before = {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"}
    net = Network("demo", compiled=compiled_model("demo"))
    rng = np.random.default_rng(0)
    net.fit(rng.random((64, 64)), rng.integers(0, 10, 64), epochs=1, batch_size=32, progress=False,
            callbacks=[Threads()])
    assert len(seen) == 2 and all(set(s.values()) == {1} for s in seen)
    after = {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"}
    assert {k: after[k] for k in before} == before


def test_loading_a_cached_module_imports_neither_jinja_nor_the_lowering(tmp_path):
    """A second run loads its module from the cache: the code generator (Jinja, the lowering and
    the renderer, 0.1-0.2 s of imports) is imported only to generate one."""
    import subprocess
    import sys
    from chainrule.codegen import compile_model
    spec = "6 -> dense(5) -> tanh -> dense(3) -> softmax_cross_entropy"
    assert not compile_model(build_model(spec), cache_dir=tmp_path).cache_hit      # generated here
    code = ("import sys; from chainrule.derive import build_model; from chainrule.codegen import compile_model; "
            f"cm = compile_model(build_model({spec!r}), cache_dir={str(tmp_path)!r}); "
            "print(cm.cache_hit, sorted(m for m in ('jinja2', 'chainrule.codegen.render', "
            "'chainrule.codegen.lower') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[0] == "True []", out


def test_plain_summation_limits_are_never_simplified():
    """A summation limit that is a number, a symbol or a linear sum is kept as it is
    (``tensor.simplified``), and a difference of polynomial bounds is tested for zero by expansion
    (``tensor.vanishes``): SymPy's first ``simplify`` imports ``sympy.physics.units``, 0.1-0.2 s of a
    cold demo. A fresh process derives and renders the demo's module without importing it; a limit
    with Min is still simplified, and a zero that only expansion shows is found."""
    import subprocess
    import sympy as sp
    from chainrule.derive.tensor import simplified, vanishes
    n, B = sp.symbols("n B", integer=True)
    assert simplified(B - 1) == B - 1 and simplified(sp.Integer(0)) == 0
    assert simplified(sp.Min(B, B + 1) - 1) == B - 1                     # simplified as before
    assert vanishes(3 * (n - 1) - 3 * n + 3) and not vanishes(n - 1)
    assert vanishes(sp.Min(n, B) - sp.Min(B, n)) and not vanishes(sp.Min(n, B) - B)
    code = ("import sys; from chainrule.derive import build_model; "
            "from chainrule.codegen.render import render_module; "
            "render_module(build_model('demo'), 'float32'); print('sympy.physics' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[0] == "False", out


def test_no_worker_is_started_when_no_core_is_idle(monkeypatch):
    """On a busy machine a worker only adds its own start-up: the load average decides."""
    from chainrule.codegen import background
    monkeypatch.setattr(background, "available_cpus", lambda: 2)
    monkeypatch.setattr(background.os, "getloadavg", lambda: (1.7, 1.0, 1.0))
    assert not background.idle_core()
    monkeypatch.setattr(background.os, "getloadavg", lambda: (0.4, 1.0, 1.0))
    assert background.idle_core()
    monkeypatch.setattr(background, "available_cpus", lambda: 1)
    assert not background.idle_core()


def test_a_worker_compiles_train_step_while_fit_compiles_forward_here(tmp_path, monkeypatch):
    """The demo's cold start: ``compile_model(..., background=["train_step"])`` starts a worker
    before rendering the module (it warms Numba up meanwhile), then hands it the module; ``fit``
    compiles ``forward`` here instead of starting a second worker; the first step loads
    ``train_step`` from Numba's cache (compiled by the worker for exactly the wrapper's argument
    types), and both kernels compute the right thing. A cached module starts no worker."""
    from chainrule.codegen import background, compile_model
    from chainrule.runtime import Network
    monkeypatch.setattr(background, "idle_core", lambda: True)
    started = []
    warming_up = background.BackgroundCompile.warming_up
    monkeypatch.setattr(background.BackgroundCompile, "warming_up",
                        classmethod(lambda cls, dtype: started.append(dtype) or warming_up(dtype)))
    # the worker gets its job as soon as the module is written, before this process imports it
    handed, assign = [], background.BackgroundCompile.assign
    monkeypatch.setattr(background.BackgroundCompile, "assign",
                        lambda self, path, name, sigs: handed.append((name in sys.modules, sorted(sigs)))
                        or assign(self, path, name, sigs))
    model = build_model("5 -> dense(4) -> sigmoid -> dense(3) -> softmax_cross_entropy")
    cm = compile_model(model, cache_dir=tmp_path, background=["train_step"])
    assert started == ["float64"] and cm.background_kernels == {"train_step"}
    assert handed == [(False, ["train_step"])] and cm.module.__name__ in sys.modules
    net = Network(model, compiled=cm, seed=0)
    rng = np.random.default_rng(2)
    x, labels = rng.normal(size=(30, 5)), rng.integers(0, 3, 30)
    start = net.get_params()
    net.fit(x, labels, epochs=1, batch_size=30, lr=0.5, progress=False, shuffle=False, diagnostics=False)
    step, forward = cm.module.train_step, cm.module.forward
    assert sum(step.stats.cache_hits.values()) == 1 and not step.stats.cache_misses
    assert sum(forward.stats.cache_misses.values()) == 1 and not forward.stats.cache_hits
    assert cm._background is None and cm.background_kernels == frozenset()
    # one full-batch SGD step, recomputed with NumPy by hand from the same start
    y = np.eye(3)[labels]
    a = 1 / (1 + np.exp(-(x @ start["W1"].T + start["b1"])))
    z = a @ start["W2"].T + start["b2"]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d2 = (p - y) / 30
    d1 = (d2 @ start["W2"]) * a * (1 - a)
    expected = {"W1": start["W1"] - 0.5 * d1.T @ x, "b1": start["b1"] - 0.5 * d1.sum(0),
                "W2": start["W2"] - 0.5 * d2.T @ a, "b2": start["b2"] - 0.5 * d2.sum(0)}
    for k, v in expected.items():
        np.testing.assert_allclose(net.params[k], v, rtol=1e-12, atol=1e-14)
    again = compile_model(model, cache_dir=tmp_path, background=["train_step"])
    assert again.cache_hit and started == ["float64"] and again.background_kernels == frozenset()
    # train_step holds its own forward and backward pass: compiling it (in the worker) compiled
    # neither loss_and_grads (which it used to call, linking and optimising it a second time)
    # nor anything else but the primitives and the one matrix product it calls; this process
    # compiled forward's
    assert _numba_cached(tmp_path) == {"train_step", "forward", "sigmoid", "_exp", "_gemm_views"}


def test_the_worker_warms_up_until_its_job_arrives(monkeypatch):
    """A warming worker compiles Numba's generic pieces one by one and stops at the first piece
    after which its job is on standard input (a piece compiled after it would only delay the
    job's kernels); without a job it compiles every piece, then reads the end of its input."""
    import io
    import os
    from chainrule.codegen import _compile_worker as worker
    done, jobs = [], []
    monkeypatch.setattr(worker, "warm_up_pieces", lambda dtype: [lambda i=i: done.append(i) for i in range(5)])
    monkeypatch.setattr(worker, "main", lambda *job: jobs.append(job) or 0)
    read, write = os.pipe()
    with os.fdopen(read) as stdin, os.fdopen(write, "w") as feed:
        feed.write('["/x/m.py", "m", "[]"]\n')
        feed.flush()
        monkeypatch.setattr(sys, "stdin", stdin)
        assert worker.warm_then_wait("float32") == 0
    assert done == [0] and jobs == [("/x/m.py", "m", "[]")]
    done.clear()
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    monkeypatch.setattr(worker, "_input_ready", lambda stream: False)
    assert worker.warm_then_wait("float32") == 0
    assert done == [0, 1, 2, 3, 4] and len(jobs) == 1


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_warm_up_piece_compiles(dtype):
    """The worker's warm-up pieces compile and run (one that failed would end the worker, and
    the cold start would silently compile everything in the main process)."""
    from chainrule.codegen._compile_worker import warm_up_pieces
    pieces = warm_up_pieces(dtype)
    assert len(pieces) == 4
    for piece in pieces:
        assert np.isfinite(piece())


def _numba_cached(cache_dir) -> set:
    """The functions Numba has compiled into the cache directory (its index files,
    ``<module>.<function>-<line>.py311.nbi``)."""
    return {p.name.split(".")[1].rsplit("-", 1)[0] for p in Path(cache_dir).rglob("*.nbi")}


def test_the_compile_worker_starts_before_sympy_or_numba_is_imported():
    """``chainrule demo`` starts its compile worker first: importing what starts it (the
    background module) imports neither SymPy, NumPy nor Numba, nor the rest of chainrule."""
    import subprocess
    import sys
    code = ("import sys; from chainrule.codegen import background; "
            "print(sorted(m for m in ('sympy', 'numpy', 'numba', 'chainrule.derive', 'chainrule.runtime', "
            "'chainrule.codegen.compiled') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_a_worker_started_before_the_model_is_derived_is_used_or_stopped(tmp_path, monkeypatch):
    """The demo starts its worker before deriving the model (``compile_model(..., worker=)``):
    when the module is generated the worker compiles train_step into the cache (and no second
    worker starts); when the module is cached the worker is stopped, its process ended."""
    from chainrule.codegen import background, compile_model
    from chainrule.runtime import Network
    monkeypatch.setattr(background, "idle_core", lambda: True)
    early = background.BackgroundCompile.warming_up("float64")
    monkeypatch.setattr(background.BackgroundCompile, "warming_up",
                        classmethod(lambda cls, dtype: pytest.fail("a second worker was started")))
    model = build_model("4 -> dense(3) -> sigmoid -> dense(2) -> softmax_cross_entropy")
    cm = compile_model(model, cache_dir=tmp_path, background=["train_step"], worker=early)
    assert cm._background is early and cm.background_kernels == {"train_step"}
    rng = np.random.default_rng(3)
    net = Network(model, compiled=cm, seed=0)
    net.fit(rng.normal(size=(12, 4)), rng.integers(0, 2, 12), epochs=1, batch_size=12,
            progress=False, diagnostics=False)
    step = cm.module.train_step
    assert sum(step.stats.cache_hits.values()) == 1 and not step.stats.cache_misses
    monkeypatch.undo()
    late = background.BackgroundCompile.warming_up("float64")
    again = compile_model(model, cache_dir=tmp_path, background=["train_step"], worker=late)
    assert again.cache_hit and again._background is None
    assert late._proc.wait(10) is not None                 # stopped, not left running


def test_the_compile_worker_can_be_forced_on_or_off(monkeypatch):
    """``CHAINRULE_COMPILE_WORKER`` overrides the load-average rule (never with one CPU)."""
    from chainrule.codegen import background
    monkeypatch.setattr(background, "available_cpus", lambda: 2)
    monkeypatch.setattr(background.os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    monkeypatch.setenv("CHAINRULE_COMPILE_WORKER", "1")
    assert background.idle_core()
    monkeypatch.setattr(background.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    monkeypatch.setenv("CHAINRULE_COMPILE_WORKER", "0")
    assert not background.idle_core()
    monkeypatch.setenv("CHAINRULE_COMPILE_WORKER", "1")
    monkeypatch.setattr(background, "available_cpus", lambda: 1)
    assert not background.idle_core()


def test_parsing_the_command_line_imports_no_sympy_and_the_explanation_is_imported_when_used():
    """A warm ``chainrule demo`` reads its derivation from the cache: the command line's model
    lists (built from the engine's registries) are made only when a help page shows them, and
    ``chainrule.derive`` imports its explanation modules on first use."""
    import subprocess
    import sys
    code = ("import sys, contextlib, io\n"
            "from chainrule.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: main(['demo', '--help'])\n"
            "    except SystemExit: pass\n"
            "print('sympy' in sys.modules)\n"
            "import chainrule.derive as d\n"
            "print('chainrule.derive.explain' in sys.modules, 'chainrule.derive.matrix' in sys.modules)\n"
            "print(d.explain_model.__module__, 'Explanation' in d.__all__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:3] == ["False", "False False", "chainrule.derive.explain True"], out
    from chainrule.cli import main
    import contextlib
    import io
    text = io.StringIO()
    with contextlib.redirect_stdout(text), pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "examples (their own data, recipe and accuracy target):" in text.getvalue()
    assert "'64 -> dense(128) -> sigmoid -> dense(10) -> softmax_cross_entropy'" in text.getvalue()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_compiled_probability_check_agrees_with_numpys_at_the_tolerance(compiled_model, dtype):
    """The module's one-pass check of Σ_k y[b, k] = 1 (what every kernel call taking the target runs)
    against the fact's NumPy check (the reference, which words the error): rows off by 0.9 and 1.1
    tolerances, a NaN row, a masked row and soft labels, in both dtypes; a module with no such fact
    has no check."""
    from chainrule.codegen.facts import FactError
    cm = compiled_model("demo", dtype)
    fact, = cm.facts
    rng = np.random.default_rng(7)
    y = rng.dirichlet(np.ones(10), size=7).astype(dtype)       # soft labels, 7 rows
    tol = fact.cached_tolerance(y, y.dtype)
    first_off = cm.module._first_row_off_simplex
    assert first_off(y, tol) == -1
    fact.check(y, data_dtype=y.dtype)
    for row, change in [(4, 1.1 * tol), (2, -1.1 * tol), (0, np.nan), (6, -1.0)]:
        bad = y.astype(np.float64)
        bad[row, 3] += change
        bad = bad.astype(dtype)
        assert first_off(bad, tol) == row, (row, change)
        with pytest.raises(FactError, match=f"row {row} is"):
            fact.check(bad, data_dtype=bad.dtype)
    near = y.astype(np.float64)
    near[5, 1] += 0.9 * tol
    near = near.astype(dtype)
    assert first_off(near, tol) == -1
    fact.check(near, data_dtype=near.dtype)
    assert not hasattr(compiled_model("3 -> dense(2) -> mse").module, "_first_row_off_simplex")


def test_a_kernel_called_directly_runs_small_products_on_one_blas_thread(compiled_model, monkeypatch):
    """``CompiledModel.train_step`` outside ``fit`` applies fit's rule per call: with BLAS on two
    threads, a batch whose largest product (8192 × rows for the demo) lies between OpenBLAS's own
    one-thread limit (2^18) and 2^24 runs on one thread, and the count is restored after; smaller
    and larger batches, and ``blas_threads=None``, leave BLAS alone."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import types
    from chainrule.codegen.blas import kernel_blas
    cm = compiled_model("demo")
    (get, _), = kernel_blas()[:1]
    seen = []
    monkeypatch.setattr(cm, "module", types.SimpleNamespace(train_step=lambda *a: seen.append(get()) or 0.0,
                                                            workspace=cm.module.workspace))
    p = cm.init_params(0)
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        if get() != 2:
            pytest.skip("BLAS cannot run two threads here")
        for rows in (17, 32, 33, 256, 2047, 2048, 3000):
            y = np.eye(10)[np.arange(rows) % 10]
            cm.train_step(p, np.zeros((rows, 64)), y, lr=0.1, facts_checked=True)
            assert get() == 2
        cm.blas_threads = None
        cm.train_step(p, np.zeros((256, 64)), np.eye(10)[np.arange(256) % 10], lr=0.1, facts_checked=True)
        cm.blas_threads = "auto"
    assert seen == [2, 2, 1, 1, 1, 2, 2, 2]


def test_a_refused_demo_stops_the_worker_it_started(tmp_path, monkeypatch, capsys):
    """``chainrule demo`` starts its worker before checking its arguments (the checks import
    SymPy); when they refuse the command, the worker is stopped with it."""
    from chainrule import cli
    from chainrule.codegen import background
    monkeypatch.setattr(background, "idle_core", lambda: True)
    monkeypatch.setenv("CHAINRULE_CACHE_DIR", str(tmp_path / "cache"))     # the demo not described
    started = []
    warming_up = background.BackgroundCompile.warming_up
    monkeypatch.setattr(background.BackgroundCompile, "warming_up",
                        classmethod(lambda cls, dtype: started.append(warming_up(dtype)) or started[-1]))
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli.main(["demo", "--out", str(afile)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert len(started) == 1 and started[0]._proc.poll() is not None


def test_a_warm_demo_starts_no_worker(tmp_path, monkeypatch):
    """``chainrule demo`` starts its early worker only when the demo's module is not described in
    the cache: a warm start compiles nothing, and a worker would only cost its start-up."""
    from chainrule import cli
    from chainrule.codegen import background, compile_model
    monkeypatch.setattr(background, "idle_core", lambda: True)
    monkeypatch.setenv("CHAINRULE_CACHE_DIR", str(tmp_path))
    worker = cli._demo_worker()
    assert worker is not None
    worker.stop()
    compile_model("demo", cache_dir=tmp_path)           # generated and described (nothing compiled)
    assert cli._demo_worker() is None
