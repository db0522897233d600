"""Runtime: Network training loop, callbacks, checkpoints, data, error messages, the demo.

The demo model is compiled once per session (``demo_cm``); every Network below reuses it.
"""
from __future__ import annotations

import io
import os

import numpy as np
import pytest

from chainrule.derive import build_model
from chainrule.derive.errors import ChainruleError, ShapeError
from chainrule.runtime import (
    EarlyStopping,
    LearningRateSchedule,
    ModelCheckpoint,
    Network,
    ProgressBar,
    TrainingDiverged,
    data,
)
from chainrule.runtime.callbacks import Callback
from chainrule.runtime.errors import CheckpointError, DataError, LabelError


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def demo_model():
    return build_model("demo")


@pytest.fixture(scope="session")
def demo_cm(demo_model):
    from chainrule.codegen import compile_model
    return compile_model(demo_model, dtype="float64")


@pytest.fixture(scope="session")
def digits():
    x, y = data.load_digits()
    return data.train_test_split(x, y, test_size=0.2, seed=0)


@pytest.fixture()
def net(demo_model, demo_cm):
    return Network(demo_model, seed=0, compiled=demo_cm)


def make_net(demo_model, demo_cm, seed=0):
    return Network(demo_model, seed=seed, compiled=demo_cm)


# -- training ----------------------------------------------------------------------------------------
def test_demo_quick_reaches_real_accuracy(tmp_path, capsys):
    from chainrule.runtime.demo import run_demo
    res = run_demo(out_dir=str(tmp_path / "demo"), quick=True, progress=False)
    out = capsys.readouterr().out
    assert res["test_accuracy"] >= 0.9
    assert f"test accuracy: {res['test_accuracy']:.4f}" in out
    with open(res["code"]) as f:
        assert "def " in f.read()
    assert res["derivation"] is not None and res["derivation"] in out
    with open(res["derivation"]) as f:
        assert "```math" in f.read()


def test_fit_history_shapes_and_validation_split(net, digits):
    x_train, _, y_train, _ = digits
    h = net.fit(x_train, y_train, epochs=3, batch_size=64, lr=1.0, validation_split=0.25,
                progress=False)
    assert len(h) == 3 and h.epochs == [0, 1, 2]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "time"):
        assert len(h[key]) == 3, key
    assert h.params["n_val"] == round(0.25 * len(x_train))
    assert h.params["n_train"] + h.params["n_val"] == len(x_train)
    assert h.params["steps"] == -(-h.params["n_train"] // 64)
    assert h["loss"][-1] < h["loss"][0]
    assert all(0 <= a <= 1 for a in h["accuracy"] + h["val_accuracy"])
    ev = net.evaluate(x_train, y_train)
    assert set(ev) == {"loss", "accuracy"}


def test_validation_data_and_regression_free_keys(net, digits):
    x_train, x_test, y_train, y_test = digits
    h = net.fit(x_train, y_train, epochs=2, batch_size=128, lr=1.0,
                validation_data=(x_test, y_test), progress=False)
    ev = net.evaluate(x_test, y_test)
    assert h["val_loss"][-1] == pytest.approx(ev["loss"], rel=1e-9)
    assert h["val_accuracy"][-1] == pytest.approx(ev["accuracy"])
    with pytest.raises(ValueError, match="not both"):
        net.fit(x_train, y_train, epochs=1, validation_split=0.1, validation_data=(x_test, y_test),
                progress=False)


def test_integer_labels_equal_one_hot(demo_model, demo_cm, digits):
    x_train, _, y_train, _ = digits
    a, b = make_net(demo_model, demo_cm), make_net(demo_model, demo_cm)
    a.fit(x_train[:300], y_train[:300], epochs=2, progress=False)
    b.fit(x_train[:300], data.one_hot(y_train[:300], 10), epochs=2, progress=False)
    for k in a.param_names:
        np.testing.assert_array_equal(a.params[k], b.params[k])


def test_seeded_determinism(demo_model, demo_cm, digits):
    x_train, _, y_train, _ = digits
    nets = [make_net(demo_model, demo_cm, seed=s) for s in (7, 7, 8)]
    for n in nets:
        n.fit(x_train, y_train, epochs=2, batch_size=32, lr=0.5, validation_split=0.1, progress=False)
    for k in nets[0].param_names:
        np.testing.assert_array_equal(nets[0].params[k], nets[1].params[k])
    assert not np.array_equal(nets[0].params["W1"], nets[2].params["W1"])


class RecordParams(Callback):
    def on_train_begin(self, logs=None):
        self.snapshots = []

    def on_epoch_end(self, epoch, logs):
        self.snapshots.append(self.network.get_params())


def test_early_stopping_restores_best(net, digits):
    x_train, x_test, y_train, y_test = digits
    rec = RecordParams()
    stop = EarlyStopping(monitor="val_loss", patience=2, restore_best=True)
    # a tiny training set and a large step size overfit quickly: the validation loss turns up
    h = net.fit(x_train[:60], y_train[:60], epochs=60, batch_size=10, lr=3.0,
                validation_data=(x_test, y_test), callbacks=[rec, stop], progress=False)
    best = int(np.argmin(h["val_loss"]))
    assert stop.best_epoch == best
    assert h.stopped_early and stop.stopped_epoch == len(h) - 1 < 59
    assert best < len(h) - 1
    for k in net.param_names:
        np.testing.assert_array_equal(net.params[k], rec.snapshots[best][k])
    assert net.evaluate(x_test, y_test)["loss"] == pytest.approx(h["val_loss"][best])


def test_early_stopping_needs_validation(net, digits):
    x_train, _, y_train, _ = digits
    with pytest.raises(ChainruleError, match="monitors 'val_loss' but fit has no validation data"):
        net.fit(x_train, y_train, epochs=1, callbacks=[EarlyStopping()], progress=False)


def test_lr_schedule_checkpoint_and_progress(net, digits, tmp_path):
    x_train, _, y_train, _ = digits
    stream = io.StringIO()
    ckpt = ModelCheckpoint(str(tmp_path / "ckpt-{epoch:02d}.npz"))
    sched = LearningRateSchedule(lambda epoch: 1.0 / (1 + epoch))
    h = net.fit(x_train, y_train, epochs=3, callbacks=[sched, ckpt, ProgressBar(stream=stream)],
                progress=True)
    assert h["lr"] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert [os.path.basename(p) for p in ckpt.saved] == ["ckpt-01.npz", "ckpt-02.npz", "ckpt-03.npz"]
    text = stream.getvalue()
    assert "epoch 3/3" in text and "accuracy" in text and text.count("\n") == 3
    last = Network.from_checkpoint(ckpt.saved[-1], compiled=net.compiled)
    for k in net.param_names:
        np.testing.assert_array_equal(last.params[k], net.params[k])


# -- checkpoints -----------------------------------------------------------------------------------
def test_save_load_round_trip(net, demo_model, demo_cm, digits, tmp_path):
    x_train, x_test, y_train, _ = digits
    net.fit(x_train, y_train, epochs=1, progress=False)
    path = tmp_path / "params.npz"
    net.save(path)
    other = make_net(demo_model, demo_cm, seed=123)
    other.load(path)
    for k in net.param_names:
        np.testing.assert_array_equal(other.params[k], net.params[k])
    np.testing.assert_array_equal(other.predict(x_test), net.predict(x_test))
    rebuilt = Network.from_checkpoint(path, compiled=demo_cm)
    assert rebuilt.spec == net.spec == "64 -> dense(128) -> sigmoid -> dense(10) -> softmax_cross_entropy"
    np.testing.assert_array_equal(rebuilt.predict(x_test), net.predict(x_test))


def test_failed_save_leaves_old_file_intact(net, tmp_path, monkeypatch):
    path = tmp_path / "params.npz"
    net.save(path)
    before = path.read_bytes()
    saved = net.get_params()
    for k in net.param_names:
        net.params[k] += 1.0

    def broken_savez(f, **arrays):
        f.write(b"half a file")
        raise OSError("disk full")

    import chainrule.runtime.model as model_mod
    monkeypatch.setattr(model_mod.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        net.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["params.npz"]          # no temp file left behind
    net.load(path)
    for k in net.param_names:
        np.testing.assert_array_equal(net.params[k], saved[k])


def test_load_mismatch_names_tensors_and_shapes(net, tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, W1=np.zeros((32, 64)), b1=np.zeros(128), W2=np.zeros((10, 128)), extra=np.zeros(3))
    with pytest.raises(CheckpointError) as e:
        net.load(path)
    msg = str(e.value)
    assert "missing parameter b2" in msg
    assert "unexpected parameter extra" in msg
    assert "W1: " in msg and "(32, 64)" in msg and "(128, 64)" in msg
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable"):
        net.load(tmp_path / "junk.npz")


# -- errors ------------------------------------------------------------------------------------------
def test_label_out_of_range(net, digits):
    x_train, _, y_train, _ = digits
    y = y_train.copy()
    y[5] = 12
    with pytest.raises(LabelError) as e:
        net.fit(x_train, y, epochs=1, progress=False)
    assert "label 12 at index 5 is outside the range 0..9" in str(e.value)
    assert "y2" in str(e.value)
    assert isinstance(e.value, ChainruleError) and isinstance(e.value, ValueError)
    y[5] = -1
    with pytest.raises(LabelError, match="label -1 at index 5"):
        net.evaluate(x_train, y)


def test_wrong_input_width(net, digits):
    x_train, _, y_train, _ = digits
    with pytest.raises(ShapeError) as e:
        net.fit(x_train[:, :63], y_train, epochs=1, progress=False)
    assert "tensor x expects shape (N, 64), got (1438, 63)" in str(e.value)
    with pytest.raises(ShapeError, match=r"tensor x expects shape \(N, 64\), got \(64,\)"):
        net.predict(x_train[0])
    with pytest.raises(ShapeError, match=r"tensor y2 expects shape \(N, 10\)"):
        net.fit(x_train, np.zeros((len(x_train), 3)), epochs=1, progress=False)
    with pytest.raises(ShapeError, match="one row per example"):
        net.fit(x_train, y_train[:-1], epochs=1, progress=False)


def test_nan_in_data(net, digits):
    x_train, x_test, y_train, y_test = digits
    x = x_train.copy()
    x[3, 5] = np.nan
    x[9, 1] = np.inf
    with pytest.raises(DataError) as e:
        net.fit(x, y_train, epochs=1, progress=False)
    assert "x contains 2 non-finite values (NaN or inf); the first at index (3, 5)" in str(e.value)
    xv = x_test.copy()
    xv[0, 0] = np.nan
    with pytest.raises(DataError, match="validation x contains 1 non-finite value"):
        net.fit(x_train, y_train, epochs=1, validation_data=(xv, y_test), progress=False)
    y = data.one_hot(y_train, 10)
    y[4, 2] = np.nan
    with pytest.raises(DataError, match=r"y contains 1 non-finite value .* index \(4, 2\)"):
        net.fit(x_train, y, epochs=1, progress=False)


def test_target_rows_must_be_probabilities(net, digits):
    x_train, _, y_train, _ = digits
    y = data.one_hot(y_train, 10)
    y[7] *= 0.5
    with pytest.raises(DataError, match="row 7 .*sum 0.5"):
        net.fit(x_train, y, epochs=1, progress=False)


def test_diverging_loss_restores_last_good_params(net, digits):
    x_train, _, y_train, _ = digits
    initial = net.get_params()
    with pytest.raises(TrainingDiverged) as e:
        net.fit(x_train, y_train, epochs=3, lr=1e6, progress=False)
    assert e.value.epoch == 1 and e.value.step >= 1
    assert f"epoch 1, step {e.value.step}/" in str(e.value)
    assert "restored" in str(e.value)
    for k in net.param_names:
        np.testing.assert_array_equal(net.params[k], initial[k])
        assert np.all(np.isfinite(net.params[k]))


# -- data ----------------------------------------------------------------------------------------
def test_loaders_shapes_and_ranges():
    x, y = data.load_digits()
    assert x.shape == (1797, 64) and x.dtype == np.float64 and 0 <= x.min() and x.max() <= 1
    assert set(np.unique(y)) == set(range(10))
    for loader, shape, k in [(data.load_iris, (150, 4), 3), (data.load_wine, (178, 13), 3),
                             (data.load_breast_cancer, (569, 30), 2)]:
        x, y = loader()
        assert x.shape == shape and len(np.unique(y)) == k
        np.testing.assert_allclose(x.mean(0), 0, atol=1e-9)
        np.testing.assert_allclose(x.std(0), 1, atol=1e-9)
    for maker, k in [(data.make_moons, 2), (data.make_spirals, 3), (data.make_xor, 2)]:
        x1, y1 = maker(seed=3)
        x2, _ = maker(seed=3)
        np.testing.assert_array_equal(x1, x2)
        assert x1.shape[1] == 2 and len(np.unique(y1)) == k
        assert not np.array_equal(maker(seed=4)[0], x1)
    x, y = data.make_sine(n=50, dtype="float32")
    assert x.shape == y.shape == (50, 1) and x.dtype == np.float32


def test_split_and_one_hot():
    x, y = data.load_digits()
    a = data.train_test_split(x, y, test_size=0.2, seed=0)
    b = data.train_test_split(x, y, test_size=0.2, seed=0)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    x_tr, x_te, _, y_te = a
    assert len(x_te) == 359 and len(x_tr) == 1438
    # stratified: each class's share of the test set within one example of proportional
    counts, test_counts = np.bincount(y, minlength=10), np.bincount(y_te, minlength=10)
    assert np.all(np.abs(test_counts - counts * 359 / 1797) <= 1)
    oh = data.one_hot([2, 0, 1], 3)
    np.testing.assert_array_equal(oh, np.eye(3)[[2, 0, 1]])
    with pytest.raises(LabelError, match="label 3 at index 1 is outside the range 0..2"):
        data.one_hot([0, 3], 3)
    with pytest.raises(LabelError, match="must be integers"):
        data.one_hot([0.5, 1.0], 3)


def test_optional_datasets():
    if data.mnist1d_available():
        x, y = data.load_mnist1d()
        assert x.shape[1] == 40 and len(np.unique(y)) == 10
    else:
        with pytest.raises(ChainruleError, match="mnist1d"):
            data.load_mnist1d()
    if data.fashion_mnist_available():
        x, y = data.load_fashion_mnist("test")
        assert x.shape == (10000, 784) and 0 <= x.min() and x.max() <= 1
    else:
        with pytest.raises(ChainruleError, match="dataset-fashion-mnist"):
            data.load_fashion_mnist()


# -- other tasks: binary (1-D 0/1 labels) and regression (no accuracy) ---------------------------------
def test_binary_perceptron_float32_on_moons():
    net = Network("perceptron", dtype="float32", seed=0)
    assert net.task == "binary" and net.params["W1"].dtype == np.float32
    x, y = data.make_moons(n=300, seed=0, dtype="float32")
    h = net.fit(x, y, epochs=20, batch_size=16, lr=0.5, validation_split=0.2, progress=False)
    assert h["val_accuracy"][-1] >= 0.8                     # a line separates moons fairly well
    assert set(np.unique(net.predict_classes(x))) <= {0, 1}
    with pytest.raises(LabelError, match="label 2 at index 0 .* range 0..1"):
        net.fit(x, np.full(len(x), 2), epochs=1, progress=False)


def test_regression_on_sine():
    net = Network("1 -> dense(16) -> tanh -> dense(1) -> mse", seed=0)
    assert net.task == "regression" and not net.is_classifier
    x, y = data.make_sine(n=256, seed=0)
    h = net.fit(x, y[:, 0], epochs=60, batch_size=16, lr=0.1, validation_split=0.25, progress=False)
    assert "accuracy" not in h and set(net.evaluate(x, y)) == {"loss"}
    assert h["val_loss"][-1] < 0.2 * h["val_loss"][0]
    assert net.predict(x).shape == (256, 1)


def test_unfused_optimizer_path_matches_fused_sgd(demo_model, demo_cm, digits):
    """The Optimizer base (loss_and_grads + an elementwise update) is the hook for other optimisers."""
    from chainrule.runtime import SGD, Optimizer

    class UnfusedSGD(Optimizer):
        def update(self, params, grads):
            SGD(self.lr).update(params, grads)

    x_train, _, y_train, _ = digits
    fused, unfused = make_net(demo_model, demo_cm), make_net(demo_model, demo_cm)
    h1 = fused.fit(x_train[:256], y_train[:256], epochs=2, optimizer=SGD(0.5), progress=False)
    h2 = unfused.fit(x_train[:256], y_train[:256], epochs=2, optimizer=UnfusedSGD(0.5), progress=False)
    assert h1["loss"] == pytest.approx(h2["loss"], rel=1e-10)
    for k in fused.param_names:
        np.testing.assert_allclose(fused.params[k], unfused.params[k], rtol=1e-10, atol=1e-12)


def test_fashion_mnist_idx_reader(tmp_path, monkeypatch):
    """The Debian-package loader, on tiny IDX files in its layout (gzip'd images and labels)."""
    import gzip
    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    labels = np.array([9, 0, 3], np.uint8)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + b"".join(int(n).to_bytes(4, "big") for n in images.shape)
                + images.tobytes())
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + labels.tobytes())
    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", (str(tmp_path),))
    x, y = data.load_fashion_mnist("test")
    assert x.shape == (3, 784) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :3], np.array([0, 1, 2]) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y, [9, 0, 3])
