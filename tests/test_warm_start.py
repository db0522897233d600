"""A warm start: a model compiled by name loads from its cached description, without SymPy."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from chainrule.codegen import compile_model
from chainrule.runtime import Callback
from chainrule.codegen.cache import prepare_cache_dir
from chainrule.codegen.description import ModelDescription
from chainrule.codegen.facts import facts_to_data

ROOT = Path(__file__).resolve().parents[1]

# the CLI's `chainrule demo` in a fresh process; run_demo is wrapped to keep the trained parameters
_WARM_DEMO = textwrap.dedent("""
    import json, sys
    import numpy as np
    import chainrule.runtime.demo as demo
    from chainrule.cli import main
    out = sys.argv[1]
    kept = {}
    run = demo.run_demo
    demo.run_demo = lambda **kw: kept.setdefault("r", run(**kw))
    rc = main(["demo", "--out", out, "--no-progress"])
    r = kept["r"]
    np.savez(out + "/params.npz", **r["network"].params)
    print(json.dumps({"rc": rc, "loaded": sorted(m for m in ("sympy", "jinja2", "sklearn") if m in sys.modules),
                      "hit": r["network"].compiled.cache_hit, "accuracy": r["test_accuracy"]}))
""")


def test_warm_demo_imports_no_sympy_and_trains_the_same(tmp_path, kernel_cache_dir, monkeypatch):
    """The first run (in this process) derives, generates and describes; `chainrule demo` in a new
    process then loads everything from the cache without importing SymPy, Jinja or scikit-learn,
    and trains to bit-identical parameters."""
    from chainrule.runtime.demo import run_demo
    monkeypatch.setenv("CHAINRULE_CACHE_DIR", str(kernel_cache_dir))
    first = run_demo(out_dir=str(tmp_path / "first"), progress=False, stream=open(os.devnull, "w"))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "CHAINRULE_CACHE_DIR": str(kernel_cache_dir)}
    (tmp_path / "warm").mkdir()
    out = subprocess.run([sys.executable, "-c", _WARM_DEMO, str(tmp_path / "warm")], env=env, check=True,
                         capture_output=True, text=True, timeout=300)
    warm = json.loads(out.stdout.strip().splitlines()[-1])
    assert warm["rc"] == 0 and warm["hit"]
    assert warm["loaded"] == [], f"a warm demo imported {warm['loaded']}"
    assert f"test accuracy: {warm['accuracy']:.4f}" in out.stdout
    assert warm["accuracy"] == first["test_accuracy"] >= 0.95
    params = np.load(tmp_path / "warm" / "params.npz")
    for name, value in first["network"].params.items():
        assert np.array_equal(params[name], value), name
    # the derivation and the generated code written by the warm run are those of the first
    for f in ("derivation.md", "demo_model.py"):
        assert (tmp_path / "warm" / f).read_text() == (tmp_path / "first" / f).read_text()


def _same(a: ModelDescription, b: ModelDescription):
    fields = {k: v for k, v in vars(a).items() if k != "facts"}
    assert fields == {k: v for k, v in vars(b).items() if k != "facts"}
    assert facts_to_data(a.facts) == facts_to_data(b.facts)


@pytest.mark.parametrize("recipe, optimizer", [
    ("demo", "sgd"),                                           # a probability target (a fact)
    ("gpt", "adam"),                                           # token ids, a position table, Adam's state
    ("8x8 -> conv(4, 3) -> batchnorm -> relu -> flatten -> dense(10) -> softmax_cross_entropy", "momentum"),
])
def test_description_round_trips_through_json(recipe, optimizer):
    from chainrule.derive import build_model
    from chainrule.derive.optimizers import get_rule
    model = build_model(recipe)
    d = ModelDescription.of(model, get_rule(optimizer), "float32", False, "k" * 64, recipe=recipe)
    _same(ModelDescription.from_json(d.to_json()), d)
    assert d.recipe == recipe and d.rule.name == optimizer
    assert [p[0] for p in d.params] == [p.name for p in model.params]
    assert [tuple(p[1]) for p in d.params] == [model.concrete_shape(p) for p in model.params]


def test_description_of_a_batch_norm_counts_values_per_example():
    from chainrule.derive import build_model
    from chainrule.derive.optimizers import get_rule
    model = build_model("6x6 -> conv(3, 3) -> batchnorm -> relu -> flatten -> dense(5) -> softmax_cross_entropy")
    d = ModelDescription.of(model, get_rule("sgd"), "float64", False, "k" * 64)
    (layer, per_example), = d.batch_counts
    assert "batchnorm" in layer and per_example == 4 * 4        # B × H × W values per channel


def test_second_compile_by_name_builds_no_model_and_damage_is_rebuilt(tmp_path):
    kernel_cache_dir = tmp_path         # private: the test damages a description in it
    first = compile_model("perceptron", cache_dir=kernel_cache_dir)
    second = compile_model("perceptron", cache_dir=kernel_cache_dir)
    assert second._model is None and second.cache_hit
    assert second.module_path == first.module_path
    _same(second.description, first.description)
    # the model is built on first use, and is the model the description was made from
    from chainrule.codegen.cache import model_fingerprint
    assert model_fingerprint(second.model) == first.description.fingerprint
    # a damaged description is never read: it is made again from the model
    directory, _ = prepare_cache_dir(kernel_cache_dir)
    for path in directory.glob("model_*.json"):
        text = path.read_text()
        if '"name": "perceptron"' in text:
            path.write_text(text.replace('"perceptron"', '"perceptrom"'))
    third = compile_model("perceptron", cache_dir=kernel_cache_dir)
    assert third._model is not None and third.description.name == "perceptron"
    fourth = compile_model("perceptron", cache_dir=kernel_cache_dir)
    assert fourth._model is None and fourth.description.name == "perceptron"


def test_unknown_spec_by_name_is_the_same_error(tmp_path):
    from chainrule.derive import SpecError
    with pytest.raises(SpecError, match="unknown"):
        compile_model("no-such-model", cache_dir=tmp_path)


_BLAS_CHILD = textwrap.dedent("""
    import importlib.util, json, sys, tempfile
    import numpy as np
    from chainrule.codegen.blas import kernel_blas, load_kernel_blas
    from chainrule.codegen.render import render_header
    blas = load_kernel_blas()
    found = len(kernel_blas())
    with tempfile.TemporaryDirectory() as folder:    # a generated module's header: its _matmul
        path = folder + "/header.py"
        with open(path, "w") as f:
            f.write(render_header("float64", cache=False))
        spec = importlib.util.spec_from_file_location("header", path)
        header = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(header)
    a = np.arange(12.0).reshape(3, 4)
    b = np.arange(20.0).reshape(4, 5)
    same = bool(np.array_equal(header._matmul(a, b), a @ b))
    package_loaded = "scipy.linalg" in sys.modules
    import scipy.linalg                          # the whole package, later, as any caller may
    from scipy.linalg import cython_blas
    print(json.dumps({"package_loaded_first": package_loaded, "found": found, "same": same,
                      "bound": scipy.linalg.cython_blas is blas and cython_blas is blas,
                      "solve": float(scipy.linalg.solve(np.eye(3) * 2.0, np.ones(3))[0])}))
""")


def test_kernel_blas_loads_without_scipy_linalg_and_binds_it_later():
    """The kernels' BLAS is loaded without importing scipy.linalg; a generated module's matrix
    product computes with it (and still without the package); a later `import scipy.linalg` works
    and its cython_blas is the module already loaded."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", _BLAS_CHILD], env=env, check=True, capture_output=True,
                         text=True, timeout=300)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r.pop("found") >= 1                  # threadpoolctl sees the library it is in
    assert r == {"package_loaded_first": False, "same": True, "bound": True, "solve": 0.5}


def test_shape_errors_from_a_description_are_those_of_the_model(kernel_cache_dir):
    """A module loaded through its cached description words a wrong shape exactly as one compiled
    from the symbolic model (the layer that reads it, the declared size, the parameter it shapes),
    without building the model to do so."""
    from chainrule.derive import ShapeError, build_model
    symbolic = compile_model(build_model("demo"), cache_dir=kernel_cache_dir)
    compile_model("demo", cache_dir=kernel_cache_dir)            # describes it (if not yet)
    by_name = compile_model("demo", cache_dir=kernel_cache_dir)
    assert by_name._model is None
    params = symbolic.init_params(0)
    messages = []
    for cm in (symbolic, by_name):
        with pytest.raises(ShapeError) as err:
            cm.predict(params, np.zeros((3, 65)))
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert messages[1] == ("input x has shape (3, 65), expected (B, 64) (read by layer 1:dense(128)); axis 1 is "
                           "the size n_0 = 64 the model was declared with, which also shapes parameter W1 "
                           "(128, 64) of layer 1:dense(128): declare the model with n_0 = 65")
    assert by_name._model is None


class _LrEveryStep(Callback):
    """Changes the learning rate after every step: the fast step must read it at each step."""

    def on_batch_end(self, step, steps, cost):
        self.network.optimizer.lr *= 0.97


@pytest.mark.parametrize("spec, optimizer", [
    ("5 -> batchnorm(momentum=0.3, eps=0.001) -> dense(3) -> mse", "adam"),    # state and buffers
    ("4 -> dense(8) -> tanh -> dropout(0.25) -> dense(3) -> softmax_cross_entropy", "momentum"),  # noise
])
def test_fit_fast_step_equals_the_optimizer_step_bit_for_bit(spec, optimizer, compiled_with):
    """fit's per-epoch stepper (state checked once, the hyperparameter vector kept) trains to
    exactly the numbers of optimizer.step: parameters, running averages, optimiser state, step
    count and losses, with a last short batch, a validation split, seeded dropout, a schedule
    and a learning rate changed after every step."""
    from chainrule.runtime import LearningRateSchedule, Network
    from chainrule.runtime.optim import get_optimizer
    cm = compiled_with(spec, optimizer)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(61, int(spec.split("->")[0])))
    y = rng.integers(0, 3, size=61) if "softmax" in spec else rng.normal(size=(61, 3))
    nets, histories = [], []
    for fast in (True, False):
        opt = get_optimizer(optimizer, 0.05)
        if optimizer == "adam":
            opt = type(opt)(0.05, beta1=0.8)                 # a hyperparameter given, not the default
        net = Network(cm.model, compiled=cm, optimizer=opt, seed=2)
        made, original = [], net.optimizer.stepper

        def recording(*a, **k):
            step = original(*a, **k) if fast else None     # None: the per-step path, optimizer.step
            made.append(step is not None)
            return step
        net.optimizer.stepper = recording
        histories.append(net.fit(x, y, epochs=3, batch_size=7, validation_split=0.2, progress=False,
                                 callbacks=[LearningRateSchedule(lambda e: 0.05 / (1 + e)), _LrEveryStep()]))
        assert made == [fast] * 3                          # one stepper per epoch, used when given
        nets.append(net)
    fast, slow = nets
    assert fast.optimizer.t == slow.optimizer.t == 3 * 7
    for k in fast.params:
        assert np.array_equal(fast.params[k], slow.params[k]), k
    for k in fast.buffers:
        assert np.array_equal(fast.buffers[k], slow.buffers[k]), k
    for p, states in fast.optimizer.state.items():
        for s, a in states.items():
            assert np.array_equal(a, slow.optimizer.state[p][s]), (p, s)
    assert histories[0]["loss"] == histories[1]["loss"]
    assert histories[0]["val_loss"] == histories[1]["val_loss"]
