"""The PyTorch and JAX exports: the derived backward, verified inside each framework.

For every built-in layer and loss, and for user layers (swish, a bilinear layer, attention, the
corpus models): ``torch.autograd.gradcheck`` in float64 on the exported ``Function`` (the derived
backward against PyTorch's finite differences of the exported forward), and
``jax.test_util.check_grads`` on the exported ``custom_vjp`` function; outputs and gradients equal
the Numba kernels' on the same inputs. Sizes differ from each other and from 2 (batch 5).
torch and jax are optional extras: these tests skip where they are missing.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from chainrule.derive import Activation, Dense, build_model, sigmoid
from chainrule.derive import conv as conv_layers
from chainrule.derive.attention import CausalSelfAttention, NextTokenCrossEntropy, PositionEmbedding, TiedOutput, gpt
from chainrule.derive.sequence import GRU, LSTM, RNN, Embedding
from chainrule.derive import layers as L
from chainrule.derive.errors import UnsupportedError
from chainrule.derive.functional import Residual as Block

import corpus

BATCH = 5
ROLES = ("input", "target", "noise", "param")


def _swish():
    return Activation("swish", lambda z: z * sigmoid(z))


# name -> (declaration factory, inputs): built-in layers, every built-in loss, user layers, models
LAYERS = {
    "dense": (lambda: Dense(4), 3),
    **{f"activation {n}": ((lambda n=n: Activation(n, L.ACTIVATIONS[n])), 4) for n in L.ACTIVATIONS},
    "softmax": (L.Softmax, 4),
    "log_softmax": (L.LogSoftmax, 4),
    "residual": (L.Residual, 3),
    "layer_norm": (L.LayerNorm, 4),
    "batchnorm": (L.BatchNorm, 4),
    "batchnorm 2d": (lambda: L.BatchNorm(momentum=0.2), (3, 4, 5)),
    "dropout": (lambda: L.Dropout(0.3), 4),
    "gaussian noise": (lambda: L.GaussianNoise(0.5), 4),
    "conv1d": (lambda: conv_layers.Conv1D(2, 3), (3, 7)),
    "conv2d stride 2 padding 1": (lambda: conv_layers.Conv2D(3, 3, stride=2, padding=1), (1, 7, 7)),
    "conv2d same": (lambda: conv_layers.Conv2D(2, 3, padding="same"), (1, 5, 5)),
    "conv2d dilation 2": (lambda: conv_layers.Conv2D(2, 3, dilation=2), (3, 6, 6)),
    "maxpool": (lambda: conv_layers.MaxPool(2), (3, 6, 4)),
    "avgpool stride 1": (lambda: conv_layers.AvgPool(2, stride=1), (3, 5, 4)),
    "global_avgpool": (conv_layers.GlobalAvgPool, (3, 4, 5)),
    "residual block": (lambda: Block([Dense(3), Activation("relu", L.ACTIVATIONS["relu"]), Dense(3)]), 3),
    # recurrences: a loop over t forward, the derived BPTT recursion backward (sequences (T, n))
    "rnn": (lambda: RNN(4), (6, 3)),
    "rnn learned initial state": (lambda: RNN(3, return_sequences=True, learn_initial=True), (4, 6)),
    "lstm": (lambda: LSTM(3, return_sequences=True), (4, 6)),
    "gru": (lambda: GRU(4), (7, 3)),
    # user layers, declared and nothing else
    "swish": (_swish, 4),
    "bilinear": (lambda: corpus.Bilinear(units=3), 4),
    "user recurrence (two lags)": (lambda: corpus.SecondOrderRNN(units=3), (6, 4)),
}
LOSSES = {f"loss {n}": (L.LOSSES[n], 3) for n in L.LOSSES}
MODELS = {
    "attention": (corpus.attention, None),
    "rnn step": (corpus.rnn_step, None),
    "cnn": (lambda: build_model("7x7 -> conv(3, 3, padding=1, stride=2) -> relu -> maxpool(2) -> flatten "
                                "-> dense(4) -> softmax_cross_entropy"), None),
    "swish + huber": (lambda: corpus.corpus()["swish + huber (README)"], None),
    "batch norm": (lambda: corpus.corpus()["batch norm"], None),
    "batchnorm mlp": (lambda: L.sequential(3, [Dense(4), L.BatchNorm(), _swish(), Dense(3)], "mse", name="bn"), None),
    "temperature (a scalar parameter)": (lambda: corpus.corpus()["scalar parameter"], None),
    "dropout mlp": (lambda: L.sequential(5, [Dense(4), L.Dropout(0.25), Dense(3)], "mse", name="drop"), None),
    "flatten + dense": (lambda: L.sequential((3, 4, 5), [conv_layers.Flatten(), Dense(3)], "mse", name="flat"), None),
    "l2 weight decay": (lambda: L.sequential(3, [Dense(4, l2=0.01), _swish(), Dense(3)], "mae", name="l2"), None),
    # token ids in: an embedding's gather and its derived one-hot scatter; a causal mask
    "embedding lm": (lambda: L.sequential(L.SequenceInput(4, vocab=6), [Embedding(3), Dense(6)],
                                          NextTokenCrossEntropy(), name="embedding lm"), None),
    "position embedding": (PositionEmbedding.doc_example, None),
    "causal attention": (CausalSelfAttention.doc_example, None),
    "tied output (the embedding's table read twice)": (TiedOutput.doc_example, None),
    "gpt (one block)": (lambda: gpt(vocab=7, context=4, width=15, heads=3, layers=1), None),
    "gru model": ("seq(6, 3) -> gru(4) -> dense(8) -> mse", None),
    "elman from a given state (an input)": (corpus.elman_from_a_given_state, None),
    "gru classifier": (lambda: build_model("seq(6, 3) -> gru(4) -> dense(7) -> softmax_cross_entropy"), None),
    "token lstm": (lambda: build_model("tokens(4, 6) -> embedding(3) -> lstm(7) -> dense(8) -> softmax_cross_entropy"),
                   None),
}
DECLARATIONS = {**LAYERS, **LOSSES, **MODELS}
# the default run checks one declaration of each construct the printer lowers (a contraction, a
# moving-limit sum, a gather with stride and padding, a maximum's argmax, a log-sum-exp, a batch
# statistic, random tensors, user layers, token ids with a causal mask, a recurrence with two lags and a
# learned initial state); the rest run with -m slow
# (CI runs them too)
DEFAULT = ("dense", "softmax", "layer_norm", "dropout", "conv2d stride 2 padding 1", "maxpool",
           "loss softmax_cross_entropy", "loss bce", "swish", "bilinear", "attention",
           "causal attention", "user recurrence (two lags)")


def sweep(names):
    return [n if n in DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in names]


def declaration(name):
    make, inputs = DECLARATIONS[name]
    return (make() if callable(make) else make), inputs


def arguments(model):
    """The exported function's arguments in order (the probe of a layer is the incoming gradient)."""
    probe = getattr(model, "probe", None)
    return [t for r in ROLES for t in model.tensors.values() if t.role == r and t.name != probe]


def is_integer(t):
    """Token ids (an embedding's input): integer tensors, with no gradient."""
    return "vocab" in t.meta


def differentiable(t):
    return t.role != "noise" and t.simplex_axis is None and not is_integer(t)


def values(model, rng, name=""):
    """Arrays for every argument, and for a layer the incoming gradient: float64, batch 5, away from
    the kinks (a ReLU at 0, ties in a maximum) with probability 1; probabilities where declared;
    token ids drawn from the whole vocabulary (int64)."""
    out = {}
    for t in list(model.tensors.values()):
        if t.role not in ROLES or t.role == "cost":
            continue
        shape = model.concrete_shape(t, B=BATCH)
        if t.role == "noise":
            a = (rng.random(shape) < t.meta.get("keep", 0.5)).astype(float) if t.meta["dist"] == "bernoulli" \
                else rng.normal(size=shape)
        elif is_integer(t):
            vocab = int(model.size_values.get(t.meta["vocab"], t.meta["vocab"]))
            a = rng.integers(0, vocab, size=shape)
        elif t.simplex_axis is not None:
            a = rng.random(shape) + 0.1
            a /= a.sum(axis=t.simplex_axis, keepdims=True)
        elif name in ("loss bce", "loss cross_entropy") and t.role == "input":
            a = rng.uniform(0.1, 0.9, size=shape)       # a predicted probability
        else:
            a = rng.normal(size=shape)
        out[t.name] = a
    return out


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("exports")


# -- PyTorch ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sweep(DECLARATIONS))
def test_torch_gradcheck(name, export_dir):
    torch = pytest.importorskip("torch")
    from chainrule.codegen.targets import export, model_of
    decl, inputs = declaration(name)
    model, mode = model_of(decl, inputs)
    mod = export(decl, "torch", inputs=inputs, cache_dir=export_dir)
    vals = values(model, np.random.default_rng(7), name)
    args = [torch.tensor(vals[t.name], requires_grad=differentiable(t)) for t in arguments(model)]
    assert torch.autograd.gradcheck(mod.Function.apply, args, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_torch_backward_is_the_derived_one(export_dir):
    """The module's source holds the derived adjoint equations (commented) and calls no autograd of
    its own forward: the gradient that trains is the one chainrule printed."""
    from chainrule.codegen.targets import render_export
    src = render_export(corpus.Bilinear(units=3), "torch", inputs=4)
    assert "class Function(torch.autograd.Function)" in src
    assert "once_differentiable" in src
    assert "# d_W1[i,j,k] = " in src and "torch.einsum(" in src
    assert "torch.autograd.grad" not in src and ".backward(" not in src
    compile(src, "export", "exec")


# -- agreement with the Numba kernels ------------------------------------------------------------
# recurrent models compile for 30-60 s: their agreement with Numba is in the sweep (-m slow)
NUMBA_DEFAULT = ("bilinear", "dropout mlp", "embedding lm")


def _agree_with_numba(name, export_dir, compiled_declared, compiled_model):
    torch = pytest.importorskip("torch")
    from chainrule.codegen.targets import export, model_of
    decl, inputs = declaration(name)
    model, mode = model_of(decl, inputs)
    mod = export(decl, "torch", inputs=inputs, cache_dir=export_dir)
    if isinstance(decl, str):            # a spec: the session's kernels for it (shared with other tests)
        cm = compiled_model(decl)
    else:
        cm = compiled_declared(("export", name), lambda: model_of(declaration(name)[0], inputs)[0])
    vals = values(model, np.random.default_rng(11), name)
    for t in model.tensors.values():            # Numba evaluates random tensors at their mean
        if t.role == "noise":
            vals[t.name] = np.full(model.concrete_shape(t, B=BATCH), t.meta.get("keep", 0.0))
    args = [torch.tensor(vals[t.name], requires_grad=t.role == "param") for t in arguments(model)]
    params = {t.name: vals[t.name] for t in model.params}
    xs = [vals[t.name] for t in model.tensors.values() if t.role == "input"]
    target = next(t.name for t in model.tensors.values() if t.role == "target")
    x_arg = xs[0] if len(xs) == 1 else xs
    out = mod.Function.apply(*args)
    ps = [a for a, t in zip(args, arguments(model)) if t.role == "param"]
    # the Function is the training form; with running averages Numba's training mode is seed >= 0
    # (its masks would be random then: no model here has both)
    mode_kw = (lambda: dict(seed=0, buffers=cm.init_buffers())) if cm.buffer_names else (lambda: {})
    if mode == "layer":             # Numba's cost is Σ g·out over the probe g: the VJP at g
        g = torch.tensor(vals[target])
        cost, numba_out = cm.forward(params, x_arg, vals[target], **mode_kw())
        np.testing.assert_allclose(out.detach().numpy(), numba_out, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad(out, ps, grad_outputs=g)
    else:
        cost, _ = cm.forward(params, x_arg, vals[target], **mode_kw())
        np.testing.assert_allclose(out.item(), cost, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad(out, ps)
    _, numba_grads = cm.loss_and_grads(params, x_arg, vals[target], **mode_kw())
    compared = 0
    for t, gr in zip(model.params, grads):
        np.testing.assert_allclose(gr.numpy(), numba_grads[t.name], rtol=1e-10, atol=1e-12,
                                   err_msg=f"{name}: d{t.name}")
        compared += gr.numel()
    assert compared > 0


@pytest.mark.parametrize("name", NUMBA_DEFAULT)
def test_torch_equals_numba(name, export_dir, compiled_declared, compiled_model):
    _agree_with_numba(name, export_dir, compiled_declared, compiled_model)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in DECLARATIONS if n not in NUMBA_DEFAULT])
def test_torch_equals_numba_everywhere(name, export_dir, compiled_declared, compiled_model):
    from chainrule.codegen.targets import model_of
    if not model_of(*declaration(name))[0].params:
        pytest.skip("no parameters: Numba compiles models with parameters only")
    _agree_with_numba(name, export_dir, compiled_declared, compiled_model)


# -- JAX -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def jax64():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("name", sweep(DECLARATIONS))
def test_jax_check_grads(name, export_dir, jax64):
    from jax.test_util import check_grads
    import jax.numpy as jnp
    from chainrule.codegen.targets import export, model_of
    decl, inputs = declaration(name)
    model, mode = model_of(decl, inputs)
    mod = export(decl, "jax", inputs=inputs, cache_dir=export_dir)
    vals = values(model, np.random.default_rng(7), name)
    ts = arguments(model)
    fixed = {k: jnp.asarray(vals[t.name]) for k, t in enumerate(ts) if t.role == "noise" or is_integer(t)}
    free = [k for k in range(len(ts)) if k not in fixed]

    def f(*xs):
        full = dict(fixed)
        full.update(zip(free, xs))
        return mod.apply(*[full[k] for k in range(len(ts))])
    check_grads(jax64.jit(f), [jnp.asarray(vals[ts[k].name]) for k in free], order=1, modes=("rev",),
                eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["conv2d stride 2 padding 1", "attention", "loss bce", "dropout",
                                  "causal attention"])
def test_jax_equals_torch(name, export_dir, jax64):
    torch = pytest.importorskip("torch")
    import jax
    import jax.numpy as jnp
    from chainrule.codegen.targets import export, model_of
    decl, inputs = declaration(name)
    model, mode = model_of(decl, inputs)
    tm = export(decl, "torch", inputs=inputs, cache_dir=export_dir)
    jm = export(decl, "jax", inputs=inputs, cache_dir=export_dir)
    vals = values(model, np.random.default_rng(3), name)
    ts = arguments(model)
    targs = [torch.tensor(vals[t.name], requires_grad=not is_integer(t)) for t in ts]
    out = tm.Function.apply(*targs)
    cot = np.random.default_rng(4).normal(size=tuple(out.shape))
    floats = [k for k, t in enumerate(ts) if not is_integer(t)]
    tg = torch.autograd.grad(out, [targs[k] for k in floats], grad_outputs=torch.tensor(cot))
    jout, vjp = jax.vjp(jax.jit(jm.apply), *[jnp.asarray(vals[t.name]) for t in ts])
    jg = vjp(jnp.asarray(cot))
    np.testing.assert_allclose(np.asarray(jout), out.detach().numpy(), rtol=1e-12, atol=1e-12)
    for k, a in zip(floats, tg):
        np.testing.assert_allclose(np.asarray(jg[k]), a.numpy(), rtol=1e-10, atol=1e-12, err_msg=ts[k].name)
    for k in set(range(len(ts))) - set(floats):        # token ids: no gradient (JAX's float0 zeros)
        assert jg[k].dtype == jax.dtypes.float0 and jg[k].shape == vals[ts[k].name].shape


# -- errors, cache and the command line -------------------------------------------------------------
def test_a_layer_needs_its_input_shape():
    from chainrule.codegen.targets import render_export
    with pytest.raises(UnsupportedError, match=r"layer dense\(4\) needs its input shape"):
        render_export(Dense(4), "torch")
    with pytest.raises(UnsupportedError, match="layer flatten defines no equation"):
        render_export(conv_layers.Flatten(), "torch", inputs=(3, 4, 5))
    with pytest.raises(UnsupportedError, match="unknown target 'tf'; known: numba, torch, jax"):
        render_export("perceptron", "tf")


def test_a_recurrence_prints_as_loops_over_time_with_the_derived_bptt():
    """A recurrence's forward is a loop over t (PyTorch: a Python loop of tensor ops; JAX: one
    ``fori_loop``), and its backward the derived BPTT recursion, a loop running backward in time,
    whose step reads the adjoint at t+1 (zeros past the end) and receives the output's gradient at
    the last step only: never the framework's autodiff of the forward."""
    from chainrule.codegen.targets import render_export
    src = render_export("seq(6, 3) -> rnn(4) -> dense(7) -> mse", "torch")
    assert "for t in range(6):" in src and "for t_2 in range(5, -1, -1):" in src
    assert ("h1_m1 = h1[:, t - 1, :] if t - 1 >= 0 else torch.zeros((n_batch, 4), dtype=dt, device=dev)"
            in src)
    assert "d_z1_p1 = d_z1[:, t_2 + 1, :] if t_2 + 1 <= 5 else torch.zeros((n_batch, 4), dtype=dt, device=dev)" in src
    assert "if t_2 == (5) else torch.full((n_batch, 4), 0, dtype=dt, device=dev))" in src
    assert "d_z1[:, t_2, :] = d_z1_now  # store d_z1 at step t_2" in src
    assert "torch.autograd.grad" not in src and ".backward(" not in src
    jsrc = render_export("seq(6, 3) -> rnn(4) -> dense(7) -> mse", "jax")
    assert "z1, h1 = jax.lax.fori_loop(0, 6, step_z1, (" in jsrc
    assert "t_2 = 5 - k   # backward in time" in jsrc
    assert "h1_m1 = jnp.where(t - 1 >= 0, h1[:, jnp.clip(t - 1, 0, 5), :], 0.0)" in jsrc


def test_a_learned_initial_state_is_read_before_the_start():
    """The declared initial state (a parameter h0) is what a delayed read gives before t = 0, at
    both lags of a user's second-order recurrence."""
    from chainrule.codegen.targets import render_export
    src = render_export(corpus.SecondOrderRNN(units=3), "torch", inputs=(6, 4))
    for lag in (1, 2):
        assert (f"        if t - {lag} >= 0:\n            h1_m{lag} = h1[:, t - {lag}, :]\n        else:\n"
                f"            h1_m{lag} = h01[None, :].expand(n_batch, 3)\n") in src


def test_a_recurrent_model_with_running_averages_is_refused():
    from chainrule.codegen.targets import render_export
    with pytest.raises(UnsupportedError, match=r"export: layer 1:rnn\(4\): a recurrent model with "
                                               r"evaluation-mode equations \(running averages\) is not supported"):
        render_export("seq(5, 3) -> rnn(4) -> batchnorm -> dense(2) -> mse", "torch")


def test_embedding_prints_a_gather_and_the_derived_scatter(export_dir):
    """Token ids are read as integers (a gather of the table's rows, the ids checked on entry) and get
    no gradient; the table's gradient is the derived ``Σ_bt [j0 = x[b, t]] d_e[b, t, j1]``, printed
    as a scatter-add of the rows of d_e into the rows the tokens select (not an autograd of the gather)."""
    torch = pytest.importorskip("torch")
    from chainrule.codegen.targets import export, render_export
    decl = DECLARATIONS["embedding lm"][0]()
    src = render_export(decl, "torch")
    assert "e1 = torch.take(E1, x[:, :, None] * 3 + " in src and "x.clamp" not in src
    assert "# d_E1[j0,j1] = Σ_b,t[Piecewise((d_e1[b, t, j1], Eq(j0, x[b, t])), (0, True))]" in src
    assert ("d_E1 = torch.zeros((6, 3), dtype=dt, device=dev).index_add_(0, x.reshape(-1), "
            "d_e1.reshape(-1, 3))") in src
    assert "d_x" not in src and "dt, dev = y2.dtype, x.device" in src
    jsrc = render_export(decl, "jax")
    assert "e1 = E1[x[:, :, None], " in jsrc and "clip(x" not in jsrc
    assert "d_E1 = jnp.zeros((6, 3), dtype=dt).at[x.reshape(-1)].add(d_e1.reshape((-1, 3)))" in jsrc
    assert "np.zeros(x.shape, dtype=jax.dtypes.float0)" in jsrc
    module = export(decl, "torch", cache_dir=export_dir).Module(seed=0, dtype=torch.float64)
    x = torch.tensor([[0, 5, 5, 1], [2, 3, 4, 1]])
    y = torch.nn.functional.one_hot(torch.tensor([[5, 5, 1, 0], [3, 4, 1, 2]]), 6).double()
    module(x, y).backward()
    unused = torch.ones(6, dtype=torch.bool)
    unused[x.flatten()] = False                      # rows no token selected receive no gradient
    assert torch.all(module.E1.grad[unused] == 0) and torch.all(module.E1.grad[~unused].abs().sum(1) > 0)


IDS_ERROR = (r"embedding lm: layer 1:embedding\(3\): token ids x \(B, 4\) select rows of E1 \(6, 3\): the ids "
             r"of shape \(2, 4\) hold {value} at \({at}\); each must be in 0..5")


def test_torch_refuses_token_ids_outside_the_table(export_dir):
    """An id outside the embedding's table is an error naming the layer, the ids, the table and
    the shapes (checked eagerly on entry), never clamped; so is a float tensor of ids."""
    torch = pytest.importorskip("torch")
    from chainrule.codegen.targets import export
    m = export(DECLARATIONS["embedding lm"][0](), "torch", cache_dir=export_dir).Module(seed=0, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.tensor([[5, 5, 1, 0], [3, 4, 1, 2]]), 6).double()
    for bad, value, at in ((6, 6, "1, 2"), (-1, -1, "1, 2")):
        x = torch.tensor([[0, 5, 5, 1], [2, 3, bad, 1]])
        with pytest.raises(ValueError, match=IDS_ERROR.format(value=value, at=at)):
            m(x, y)
        with pytest.raises(ValueError, match=IDS_ERROR.format(value=value, at=at)):
            m.predict(x)
    with pytest.raises(TypeError, match=r"token ids x \(B, 4\) select rows of E1 \(6, 3\): they have dtype "
                                        r"torch.float64; give integers"):
        m(torch.zeros(2, 4, dtype=torch.float64), y)


def test_jax_refuses_token_ids_outside_the_table(export_dir, jax64):
    """Concrete ids are checked eagerly (ValueError); traced ids (under jit) when the computation runs,
    on the host: the same message inside JAX's runtime error. Ids in range give no error."""
    import jax
    import jax.numpy as jnp
    from chainrule.codegen.targets import export
    mod = export(DECLARATIONS["embedding lm"][0](), "jax", cache_dir=export_dir)
    p = mod.init_params(seed=0, dtype=jnp.float64)
    y = jax.nn.one_hot(jnp.array([[5, 5, 1, 0], [3, 4, 1, 2]]), 6, dtype=jnp.float64)
    bad = jnp.array([[0, 5, 5, 1], [2, 3, 9, 1]])
    good = jnp.array([[0, 5, 5, 1], [2, 3, 4, 1]])
    with pytest.raises(ValueError, match=IDS_ERROR.format(value=9, at="1, 2")):
        mod.apply(bad, y, p["E1"], p["W2"], p["b2"])
    loss = jax.jit(mod.apply)
    assert np.isfinite(float(loss(good, y, p["E1"], p["W2"], p["b2"])))
    with pytest.raises(Exception, match=IDS_ERROR.format(value=9, at="1, 2")) as err:
        jax.block_until_ready(loss(bad, y, p["E1"], p["W2"], p["b2"]))
    assert "ValueError" in str(err.value)
    grad = jax.jit(jax.grad(mod.apply, argnums=2))
    with pytest.raises(Exception, match=IDS_ERROR.format(value=9, at="1, 2")):
        jax.block_until_ready(grad(bad, y, p["E1"], p["W2"], p["b2"]))
    with pytest.raises(TypeError, match="they have dtype float64; give integers"):
        mod.apply(jnp.zeros((2, 4)), y, p["E1"], p["W2"], p["b2"])


def test_torch_refuses_a_target_that_breaks_its_declared_fact(export_dir):
    torch = pytest.importorskip("torch")
    from chainrule.codegen.targets import export
    mod = export("3 -> dense(4) -> softmax_cross_entropy", "torch", cache_dir=export_dir)
    m = mod.Module(seed=0, dtype=torch.float64)
    x = torch.ones(5, 3, dtype=torch.float64)
    y = torch.zeros(5, 4, dtype=torch.float64)
    y[:, 1] = 1.0
    y[3] = 0.0                                  # a masked row: the derived p - y would be wrong
    with pytest.raises(ValueError, match="target y1 breaks the fact sum over axis 1 of y1 = 1.*row 3"):
        m(x, y)
    with pytest.raises(ValueError, match=r"input x has shape \(5, 4\), expected \(B, 3\)"):
        m(torch.ones(5, 4, dtype=torch.float64), y)


def test_export_is_cached_on_disk(export_dir):
    pytest.importorskip("torch")
    from chainrule.codegen.targets import export
    first = export(_swish(), "torch", inputs=4, cache_dir=export_dir)
    path = Path(first.chainrule_source_path)
    assert path.is_file() and path.parent == Path(export_dir)
    stamp = path.stat().st_mtime_ns
    again = export(_swish(), "torch", inputs=4, cache_dir=export_dir)
    assert Path(again.chainrule_source_path) == path and path.stat().st_mtime_ns == stamp


def test_dropout_module_draws_masks_in_training_only(export_dir):
    torch = pytest.importorskip("torch")
    from chainrule.codegen.targets import to_torch
    m = to_torch(L.Dropout(0.5), inputs=4, dtype=torch.float64, cache_dir=export_dir)
    x = torch.rand(400, 4, dtype=torch.float64) + 1.0
    m.eval()
    assert torch.equal(m(x), x)                          # the mask at its mean: the identity
    m.train()
    out = m(x)
    kept = out != 0
    assert torch.allclose(out[kept], 2 * x[kept])         # inverted dropout: kept entries / (1 - p)
    assert 0.4 < kept.double().mean().item() < 0.6


def test_model_predict_equals_numba(export_dir, compiled_declared):
    """A whole model's Module.predict (and JAX's predict): its first output, equal to Numba's."""
    torch = pytest.importorskip("torch")
    from chainrule.codegen.targets import export, model_of
    decl, _ = declaration("dropout mlp")
    model, _ = model_of(decl)
    m = export(decl, "torch", cache_dir=export_dir).Module(seed=3, dtype=torch.float64)
    cm = compiled_declared(("export", "dropout mlp"), lambda: model_of(declaration("dropout mlp")[0])[0])
    x = np.random.default_rng(5).normal(size=(BATCH, 5))
    params = {t.name: getattr(m, t.name).detach().numpy() for t in model.params}
    ref = cm.init_params(seed=3)
    for k in params:                             # the module's initialisation is chainrule's
        np.testing.assert_array_equal(params[k], ref[k])
    np.testing.assert_allclose(m.predict(torch.tensor(x)).numpy(), cm.predict(params, x), rtol=1e-12, atol=1e-12)


def test_batchnorm_module_running_averages_and_evaluation(export_dir):
    """The built-in batch norm layer: training mode normalises by the batch (the Function, derived
    backward) and updates the declared running averages; evaluation mode uses them. Checked against
    NumPy written here."""
    torch = pytest.importorskip("torch")
    from chainrule.codegen.targets import to_torch
    m = to_torch(L.BatchNorm(momentum=0.2), inputs=(3, 4, 5), dtype=torch.float64, cache_dir=export_dir)
    x = np.random.default_rng(2).normal(1.0, 2.0, size=(BATCH, 3, 4, 5))
    m.train()
    out = m(torch.tensor(x)).detach().numpy()
    mu, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    np.testing.assert_allclose(out, (x - mu[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5),
                               rtol=1e-12, atol=1e-12)
    count = BATCH * 4 * 5
    np.testing.assert_allclose(m.rmean1.numpy(), 0.2 * mu, rtol=1e-12)
    np.testing.assert_allclose(m.rvar1.numpy(), 0.8 + 0.2 * var * count / (count - 1), rtol=1e-12)
    m.eval()
    ev = m(torch.tensor(x)).numpy()
    rm, rv = m.rmean1.numpy(), m.rvar1.numpy()
    np.testing.assert_allclose(ev, (x - rm[None, :, None, None]) / np.sqrt(rv[None, :, None, None] + 1e-5),
                               rtol=1e-12, atol=1e-12)


def test_layer_penalty_is_named_in_the_module(export_dir):
    from chainrule.codegen.targets import render_export
    src = render_export(Dense(3, l2=0.1), "torch", inputs=4)
    assert "# note: L2 weight decay on W1: a term of a model's cost, not of the layer's function" in src


def test_the_core_imports_neither_torch_nor_jax():
    code = ("import sys, chainrule, chainrule.codegen, chainrule.runtime\n"
            "from chainrule.codegen.targets import render_export\n"
            "render_export('perceptron', 'torch'); render_export('perceptron', 'jax')\n"
            "print(sorted(m for m in ('torch', 'jax', 'jaxlib') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_cli_codegen_target_torch(tmp_path):
    out = tmp_path / "perceptron_torch.py"
    r = subprocess.run([sys.executable, "-m", "chainrule.cli", "codegen", "perceptron", "--target", "torch",
                        "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    src = out.read_text()
    assert "torch.autograd.Function" in src and "# d_W1[o,i] = " in src
    compile(src, str(out), "exec")


@pytest.mark.slow
def test_ddp_example_matches_one_process(tmp_path):
    """examples/ddp_export.py, briefly: 2 gloo processes train a model holding an exported chainrule
    layer; both ranks end with identical parameters, equal to a one-process run on the same global
    batches (float64, to rounding), and the loss falls."""
    pytest.importorskip("torch")
    import json
    import os
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CHAINRULE_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, str(root / "examples" / "ddp_export.py"), "--steps", "12",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads((tmp_path / "out" / "ddp_summary.json").read_text())
    assert s["world"] == 2 and len(s["losses"]) == 12
    assert s["between_ranks"] == 0.0
    assert s["vs_single"] < 1e-9
    assert np.mean(s["losses"][-3:]) < np.mean(s["losses"][:3])


def test_readme_three_lines_train_in_float32(export_dir):
    """The README's export of a user's layer into a PyTorch model, in float32: the model trains."""
    torch = pytest.importorskip("torch")
    from chainrule.codegen.targets import to_torch
    torch.manual_seed(0)
    layer = to_torch(corpus.Bilinear(units=3), inputs=4, cache_dir=export_dir)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), layer, torch.nn.Linear(3, 2))
    assert layer.W1.dtype == torch.float32 and layer.W1.shape == (4, 4, 3)
    x, y = torch.randn(64, 6), torch.randn(64, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert layer.W1.grad is not None and layer.W1.grad.abs().sum() > 0
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.slow
def test_an_exported_gru_learns_inside_a_pytorch_model(export_dir):
    """An exported GRU layer (float32) between PyTorch layers learns a task that needs memory: is
    the first value of a sequence of 8 positive? Trained by its derived BPTT, it reaches accuracy
    above 0.9 on held-out sequences (chance: 0.5)."""
    torch = pytest.importorskip("torch")
    from chainrule.codegen.targets import to_torch
    torch.manual_seed(0)
    gru = to_torch(GRU(10), inputs=(8, 1), cache_dir=export_dir)
    model = torch.nn.Sequential(gru, torch.nn.Linear(10, 2))
    assert gru.Wz1.dtype == torch.float32
    x = torch.randn(768, 8, 1)
    y = (x[:, 0, 0] > 0).long()
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(150):
        batch = torch.randint(0, 512, (64,))
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (model(x[512:]).argmax(1) == y[512:]).double().mean().item()
    assert accuracy > 0.9, accuracy
