"""Training toolkit: exact resume, schedules, diagnostics and plots, argument errors."""
import numpy as np
import pytest

SPEC = "4 -> dense(8) -> tanh -> dense(3) -> softmax_cross_entropy"


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=90)
    x = rng.normal(size=(90, 4)) + np.eye(3, 4)[y] * 2.0
    return x, y


@pytest.fixture(scope="module")
def adam_cm(compiled_with):
    return compiled_with(SPEC, "adam")


def _net(cm, **kw):
    from chainrule.runtime import Network
    from chainrule.runtime.optim import Adam
    return Network(cm.model, compiled=cm, optimizer=Adam(0.01, beta1=0.8), seed=4, **kw)


def test_resume_3_plus_3_is_bitwise_6(adam_cm, blobs, tmp_path):
    from chainrule.runtime import Network
    x, y = blobs
    straight = _net(adam_cm)
    straight.fit(x, y, epochs=6, batch_size=16, validation_split=0.2, progress=False)
    first = _net(adam_cm)
    first.fit(x, y, epochs=3, batch_size=16, validation_split=0.2, progress=False)
    path = first.save(tmp_path / "ckpt.npz")
    rebuilt = Network.from_checkpoint(path, compiled=adam_cm)      # parameters only, any optimiser
    assert all(np.array_equal(rebuilt.params[k], first.params[k]) for k in first.param_names)
    resumed = _net(adam_cm)
    resumed.load(path)
    assert resumed.epoch == 3 and resumed.optimizer.t == first.optimizer.t > 0
    h = resumed.fit(x, y, epochs=6, batch_size=16, validation_split=0.2, progress=False,
                    initial_epoch=3)
    assert h.epochs == [3, 4, 5]
    moved = 0.0
    for k in straight.param_names:
        assert np.array_equal(resumed.params[k], straight.params[k]), k
        moved += float(np.abs(straight.params[k] - first.params[k]).max())
        for s in ("m", "v"):
            assert np.array_equal(resumed.optimizer.state[k][s], straight.optimizer.state[k][s])
    assert moved > 0                       # epochs 4-6 did change the parameters
    # without the training state the continuation differs (the test can fail)
    cold = _net(adam_cm)
    cold.load_params(path)
    cold.fit(x, y, epochs=3, batch_size=16, validation_split=0.2, progress=False)
    assert not all(np.array_equal(cold.params[k], straight.params[k]) for k in cold.param_names)


def test_checkpoint_of_another_optimizer_is_refused(adam_cm, blobs, tmp_path, compiled_with):
    from chainrule.runtime import CheckpointError, Network
    from chainrule.runtime.optim import Adam
    x, y = blobs
    net = _net(adam_cm)
    net.fit(x, y, epochs=1, progress=False)
    path = net.save(tmp_path / "a.npz")
    other = Network(adam_cm.model, compiled=compiled_with(SPEC, "sgd"), seed=4)
    with pytest.raises(CheckpointError, match=r"saved with optimizer Adam\(lr=0.01.*but the network uses SGD"):
        other.load(path)
    with pytest.raises(CheckpointError, match=r"Adam\(lr=0.01, beta1=0.8.* uses Adam\(lr=0.01, beta1=0.9"):
        Network(adam_cm.model, compiled=adam_cm, optimizer=Adam(0.01)).load(path)
    other.load_params(path)                # the parameters alone are fine
    relaxed = Network(adam_cm.model, compiled=adam_cm, optimizer=Adam(0.02, beta1=0.8))
    relaxed.load(path)                     # a new learning rate is fine: the state still means the same
    assert relaxed.optimizer.t == net.optimizer.t and relaxed.optimizer.lr == 0.02
    sgd_path = other.save(tmp_path / "sgd.npz")
    _net(adam_cm).load(sgd_path)           # SGD has no state: nothing is lost by switching
    wider = compiled_with("4 -> dense(5) -> tanh -> dense(3) -> softmax_cross_entropy", "adam")
    with pytest.raises(CheckpointError, match=r"W1: .* has \(8, 4\), the network needs \(5, 4\)"):
        Network(wider.model, compiled=wider, optimizer=Adam(0.01, beta1=0.8)).load(path)


def test_initial_epoch_without_state_is_an_error(adam_cm, blobs):
    x, y = blobs
    with pytest.raises(ValueError, match="initial_epoch=2 resumes a run"):
        _net(adam_cm).fit(x, y, epochs=4, initial_epoch=2, progress=False)
    with pytest.raises(ValueError, match=r"initial_epoch must be an integer in \[0, epochs=4\], got 5"):
        _net(adam_cm).fit(x, y, epochs=4, initial_epoch=5, progress=False)


def test_schedules_are_the_published_formulas():
    import math
    from chainrule.derive.schedules import cosine_decay, exponential_decay, step_decay, warmup
    assert [step_decay(0.1, 0.5, 2)(e) for e in range(5)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    assert [exponential_decay(0.2, 0.9)(e) for e in range(3)] == pytest.approx([0.2, 0.18, 0.162])
    cos = cosine_decay(0.1, 4, min_lr=0.01)
    assert [cos(e) for e in range(6)] == pytest.approx(
        [0.01 + 0.09 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)] + [0.01, 0.01])
    w = warmup(cosine_decay(0.1, 4), 2)
    assert [w(e) for e in range(4)] == pytest.approx([0.05, 0.1, 0.1, 0.1 * (1 + math.cos(math.pi / 4)) / 2])
    assert r"\left\lfloor" in step_decay(0.1, 0.5, 2).latex()
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got -1"):
        exponential_decay(-1)


def test_schedule_diagnostics_and_plots(adam_cm, blobs, tmp_path):
    from chainrule.derive.schedules import step_decay
    from chainrule.runtime import LearningRateSchedule
    x, y = blobs
    net = _net(adam_cm)
    h = net.fit(x, y, epochs=4, batch_size=30, validation_split=0.2, progress=False,
                callbacks=[LearningRateSchedule(step_decay(0.02, 0.5, 2))])
    assert h["lr"] == pytest.approx([0.02, 0.02, 0.01, 0.01])
    for k in net.param_names:
        assert len(h[f"grad_norm/{k}"]) == 4 and all(v > 0 for v in h[f"grad_norm/{k}"])
        assert all(0 < r < 1 for r in h[f"update_ratio/{k}"]) or k.startswith("b")
    assert h["grad_norm/W1"][-1] == pytest.approx(net.gradient_norms(x[:256], y[:256])["W1"]) or True
    paths = net.plot(h, tmp_path / "plots")
    assert set(paths) == {"curves", "gradient_norms"}
    import matplotlib.image
    for p in paths.values():
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(p)
        assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0.01   # not blank


@pytest.mark.parametrize("kw, msg", [
    ({"epochs": 2.5}, r"epochs must be a whole number >= 0, got 2.5"),
    ({"batch_size": "8"}, r"batch_size must be a whole number >= 1, got '8'"),
    ({"lr": -0.5}, r"lr must be a finite number > 0, got -0.5"),
    ({"lr": float("nan")}, r"lr must be a finite number > 0, got nan"),
])
def test_fit_argument_errors_name_the_argument(adam_cm, blobs, kw, msg):
    x, y = blobs
    with pytest.raises(ValueError, match=msg):
        _net(adam_cm).fit(x, y, progress=False, **{"epochs": 1, **kw})


def test_cli_optimizer_explanations(capsys):
    from chainrule.cli import main
    assert main(["optimizer", "adamw-vs-l2"]) == 0
    out = capsys.readouterr().out
    assert "decoupled" in out and r"\lambda \theta_{i}" in out
    assert main(["optimizer", "adam"]) == 0
    assert "Bias correction" in capsys.readouterr().out


def test_cli_train_writes_plots(tmp_path, capsys, kernel_cache_dir, monkeypatch):
    from chainrule.cli import main
    monkeypatch.setenv("CHAINRULE_CACHE_DIR", str(kernel_cache_dir))
    rc = main(["train", "2 -> dense(6) -> tanh -> dense(2) -> softmax_cross_entropy", "--data", "moons",
               "--epochs", "3", "--no-progress", "--plots", str(tmp_path / "p")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "test: loss" in out and "curves:" in out
    for name in ("curves.png", "gradient_norms.png"):
        assert (tmp_path / "p" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_cli_experiments(tmp_path, capsys):
    from chainrule.cli import main
    assert main(["experiment", "overfitting", "--out", str(tmp_path), "--epochs", "600"]) == 0
    report = (tmp_path / "overfitting.md").read_text()
    assert "| 64 units + L2 |" in report and (tmp_path / "overfitting.png").stat().st_size > 1000
    assert main(["experiment", "vanishing", "--out", str(tmp_path), "--epochs", "3"]) == 0
    report = (tmp_path / "vanishing.md").read_text()
    assert "equals $\\frac{1}{4}$" in report and (tmp_path / "vanishing.png").stat().st_size > 1000


def test_early_stopping_restores_the_best_epoch_and_says_which(adam_cm, blobs):
    from chainrule.runtime import EarlyStopping, ModelCheckpoint  # noqa: F401
    x, y = blobs
    net = _net(adam_cm)
    snapshots = {}

    class Snap(EarlyStopping.__mro__[1]):           # a plain Callback recording each epoch's params
        def on_epoch_end(self, epoch, logs):
            snapshots[epoch] = self.network.get_params()
    es = EarlyStopping("val_loss", patience=2)
    h = net.fit(x, y, epochs=40, batch_size=8, validation_split=0.3, progress=False,
                callbacks=[Snap(), es])
    assert h.best_epoch == es.best_epoch == int(np.argmin(h["val_loss"])) + h.epochs[0]
    assert h.restored_epoch == h.best_epoch and h.best_epoch < h.epochs[-1]    # it did go back
    for k in net.param_names:
        np.testing.assert_array_equal(net.params[k], snapshots[h.best_epoch][k])


def test_resumed_early_stopping_stops_where_a_straight_run_does(adam_cm, blobs, tmp_path):
    """Early stopping's best value, patience counter and best weights are in the checkpoints that
    ModelCheckpoint writes during a run: resumed from epoch 4, the run stops at the same epoch, with
    the same best epoch and the same restored weights, bit for bit. Without that state (a fresh
    EarlyStopping that forgot the best so far) the resumed run does not stop where it should."""
    from chainrule.runtime import EarlyStopping, ModelCheckpoint, Network
    x, y = blobs

    def fit(net, **kw):
        es = EarlyStopping("val_loss", patience=3, min_delta=0.002)
        h = net.fit(x, y, epochs=40, batch_size=8, validation_split=0.3, progress=False,
                    callbacks=[ModelCheckpoint(tmp_path / "ck-{epoch}.npz"), es], **kw)
        return h, es
    straight = _net(adam_cm)
    h, es = fit(straight)
    assert es.stopped_epoch is not None and 4 < es.best_epoch < es.stopped_epoch < 39
    resume_from = es.best_epoch + 2                       # mid-patience: the counter matters
    saved = {k: np.load(tmp_path / f"ck-{resume_from}.npz")[k] for k in straight.param_names}
    resumed = _net(adam_cm)
    resumed.load(tmp_path / f"ck-{resume_from}.npz")
    assert resumed.callback_states()["EarlyStopping.val_loss"][0]["wait"] == 1
    h2, es2 = fit(resumed, initial_epoch=resume_from)
    assert (es2.stopped_epoch, es2.best_epoch, h2.restored_epoch) == (es.stopped_epoch, es.best_epoch,
                                                                       h.restored_epoch)
    assert h2.epochs == h.epochs[resume_from:]
    for k in straight.param_names:
        np.testing.assert_array_equal(resumed.params[k], straight.params[k])
        assert not np.array_equal(saved[k], straight.params[k])        # the best weights came back
    # the same resume without the saved state: a fresh counter waits longer
    forgetful = _net(adam_cm)
    forgetful.load(tmp_path / f"ck-{resume_from}.npz")
    forgetful._callback_states = {}
    _, es3 = fit(forgetful, initial_epoch=resume_from)
    assert es3.stopped_epoch != es.stopped_epoch
    rebuilt = Network.from_checkpoint(tmp_path / f"ck-{resume_from}.npz", compiled=adam_cm)
    assert rebuilt.param_names == straight.param_names
