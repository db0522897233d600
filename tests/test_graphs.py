"""Graph models: the functional API (add, concat, several inputs, shared layers), residual blocks in the
layer-list spec, the explanation of a residual connection, and a model with two inputs trained."""
from __future__ import annotations

import numpy as np
import pytest

from chainrule.derive import (ACTIVATIONS, Activation, Dense, EXAMPLE_MODELS, ShapeError, SpecError,
                              build_model, derive, explain_model, parse_spec)
from chainrule.derive.functional import Input, add, concat, functional_model
from chainrule.derive.verify import verify_model


def relu():
    return Activation("relu", ACTIVATIONS["relu"])


def _residual_functional():
    x = Input(5, name="x")
    h = Dense(5)(x)
    r = add(h, relu()(Dense(5)(h)))           # widths 5 and 5: one size, so the sum is defined
    return functional_model(x, Dense(3)(r), "softmax_cross_entropy", name="res-functional")


def test_a_residual_model_from_the_functional_api_shows_the_two_summed_contributions():
    model = _residual_functional()
    grads = derive(model)
    d = grads.derivations["z1"]
    assert len(d.contributions) == 2
    md = explain_model(model, grads).to_markdown()
    assert "is used 2 times, so its adjoint is the sum of one contribution per use" in md
    assert "the identity path" in md
    assert all(verify_model(model))


def test_a_shared_layer_reads_the_same_parameters_and_its_gradient_sums_both_uses():
    a, b = Input(4, name="a"), Input(4, name="b")
    enc = Dense(3)
    model = functional_model([a, b], Dense(2)(add(enc(a), enc(b))), "mse", name="shared")
    assert [p.name for p in model.params] == ["W1", "b1", "W2", "b2"]      # one W1 for both uses
    grads = derive(model)
    assert len(grads.derivations["W1"].contributions) == 2
    checks = verify_model(model, grads)
    assert all(checks) and {c.name.split("dC/d")[1] for c in checks} == {"W1", "b1", "W2", "b2"}


def test_concat_and_several_outputs_verify():
    x, m = Input(3, name="x"), Input(2, name="m")
    h = relu()(Dense(4)(concat(x, m)))
    model = functional_model([x, m], [Dense(2)(h), Dense(1)(h)], ["softmax_cross_entropy", "mse"])
    assert len([t for t in model.tensors.values() if t.role == "target"]) == 2
    assert all(verify_model(model, points=1))


def test_functional_errors_name_the_tensors_and_shapes():
    x = Input(4, name="x")
    with pytest.raises(ShapeError, match=r"cannot add x \(B, n_x_0\) and z1 \(B, n_1\)"):
        functional_model(x, Dense(2)(add(x, Dense(3)(x))), "mse")
    with pytest.raises(SpecError, match="2 outputs need 2 losses"):
        functional_model(x, [Dense(2)(x), Dense(2)(x)], "mse")
    with pytest.raises(SpecError, match="distinct names"):
        functional_model([x, Input(4, name="x")], Dense(2)(x), "mse")


def test_two_inputs_train_through_the_generated_kernels(kernel_cache_dir):
    from chainrule.codegen import compile_model
    from chainrule.runtime import Network
    x, m = Input(4, name="x"), Input(2, name="m")
    h = relu()(Dense(8)(concat(x, m)))
    model = functional_model([x, m], Dense(2)(add(h, relu()(Dense(8)(h)))), "softmax_cross_entropy",
                             name="two-inputs")
    net = Network(model, seed=0, compiled=compile_model(model, cache_dir=kernel_cache_dir))
    rng = np.random.default_rng(0)
    X, M = rng.normal(size=(300, 4)), rng.normal(size=(300, 2))
    y = ((X[:, 0] + M[:, 1]) > 0).astype(int)          # needs both inputs
    net.fit([X, M], y, epochs=15, batch_size=32, lr=0.1, progress=False)
    assert net.evaluate({"x": X, "m": M}, y)["accuracy"] > 0.9
    with pytest.raises(ShapeError, match="takes 2 inputs"):
        net.predict(X)


# -- the layer-list spec --------------------------------------------------------------------------------
def test_the_spec_declares_cnns_and_residual_blocks_and_round_trips():
    spec = "8x8 -> conv(4, 3, padding=same) -> relu -> maxpool(2) -> flatten -> dense(10) -> softmax_cross_entropy"
    model = parse_spec(spec)
    assert model.tensors["x"].shape[1:] == tuple(model.tensors["x"].shape[1:])
    items = " -> ".join(["1x8x8"] + [layer.describe() for _, layer in model.layers] + ["softmax_cross_entropy"])
    again = parse_spec(items)
    assert [layer.describe() for _, layer in again.layers] == [layer.describe() for _, layer in model.layers]
    res = parse_spec("6 -> dense(6) -> residual(dense(6) -> relu -> dense(6)) -> dense(2) -> mse")
    assert res.layers[1][1].describe() == "residual(dense(6) -> relu -> dense(6))"
    assert all(verify_model(res, points=1))
    sig = parse_spec("1@12 -> conv(2, 3, stride=1, padding=1) -> avgpool(2) -> global_avgpool -> dense(2) -> mse")
    assert sig.tensors["x"].rank == 3
    for name in EXAMPLE_MODELS:
        build_model(name)                                   # every example model declares


@pytest.mark.parametrize("spec,message", [
    ("8x8 -> conv(4) -> mse", "bad arguments"),
    ("8x8 -> conv(4, 3, padding=full) -> flatten -> dense(2) -> mse", "padding must be same, valid"),
    ("8x8 -> maxpool(2 -> mse", "unbalanced"),
    ("8x -> dense(2) -> mse", "the first item must be the input"),
    ("6 -> residual(dense(4)) -> mse", "x \\+ f\\(x\\) needs the same shape"),
    ("6 -> conv(2, 3) -> mse", "expects a \\(batch, channel, length\\)"),
])
def test_spec_errors(spec, message):
    with pytest.raises((SpecError, ShapeError), match=message):
        parse_spec(spec)
