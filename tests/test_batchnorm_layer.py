"""The built-in batch-norm layer: batch statistics in training, running averages (buffers) in
evaluation, the running-average update lowered from its declaration, checkpoints and resume.

References: a NumPy batch norm written here from the paper's definition, and PyTorch's
nn.BatchNorm1d/2d where torch is installed. Sizes: 5 features or 2 channels of 5x4 positions,
batches of 7 and 9 examples (distinct, never 2)."""
import numpy as np
import pytest

DENSE = "5 -> batchnorm(momentum=0.3, eps=0.001) -> dense(3) -> mse"
CONV = "2x5x4 -> batchnorm(momentum=0.2) -> flatten -> dense(3) -> mse"


@pytest.fixture(scope="module")
def dense_cm(compiled_with):
    return compiled_with(DENSE, "adam")


@pytest.fixture(scope="module")
def conv_cm(compiled_model):
    return compiled_model(CONV)


def _batches(shape, n_out, count, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(1.5, 2.0, size=(b, *shape)), rng.normal(size=(b, n_out)))
            for b in (7, 9, 7, 9)[:count]]


def _params(cm, seed=3):
    rng = np.random.default_rng(seed)
    p = cm.init_params(seed)
    for k in p:                                # γ ≠ 1, β ≠ 0, so that scale and shift are tested
        p[k] += 0.3 * rng.normal(size=p[k].shape)
    return p


def _bn_numpy(x, gamma, beta, eps, mean=None, var=None):
    """y = γ (x - μ) / √(σ² + ε) + β per feature (axis 1), statistics over every other axis."""
    axes = (0, *range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = x.mean(axis=axes) if mean is None else mean
    var = x.var(axis=axes) if var is None else var
    return gamma.reshape(shape) * (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) \
        + beta.reshape(shape)


def _model_numpy(x, p, level_bn, level_dense, eps, mean=None, var=None):
    h = _bn_numpy(x, p[f"gamma{level_bn}"], p[f"beta{level_bn}"], eps, mean, var)
    h = h.reshape(len(x), -1)
    return h @ p[f"W{level_dense}"].reshape(p[f"W{level_dense}"].shape[0], -1).T + p[f"b{level_dense}"]


@pytest.mark.parametrize("which", ["dense", "conv"])
def test_training_eval_and_running_averages_match_numpy(which, dense_cm, conv_cm):
    """Training forward (batch statistics), 3 training steps of running averages (unbiased
    variance, momentum as in PyTorch), evaluation forward (running averages), all against NumPy."""
    cm, shape, mom, eps = {"dense": (dense_cm, (5,), 0.3, 1e-3), "conv": (conv_cm, (2, 5, 4), 0.2, 1e-5)}[which]
    p, buffers = _params(cm), cm.init_buffers()
    run_mean, run_var = np.zeros(shape[0]), np.ones(shape[0])
    assert np.array_equal(buffers["rmean1"], run_mean) and np.array_equal(buffers["rvar1"], run_var)
    axes = (0, *range(2, len(shape) + 1))
    for x, y in _batches(shape, 3, 3):
        _, out = cm.forward(p, x, y, seed=0, buffers=buffers)          # training mode
        assert np.allclose(out, _model_numpy(x, p, 1, 2, eps), rtol=1e-12, atol=1e-12)
        cm.loss_and_grads(p, x, y, seed=0, buffers=buffers)           # a training step's pass
        m = x.size // shape[0]
        run_mean = (1 - mom) * run_mean + mom * x.mean(axis=axes)
        run_var = (1 - mom) * run_var + mom * x.var(axis=axes) * m / (m - 1)
        assert np.allclose(buffers["rmean1"], run_mean, rtol=1e-12, atol=1e-13)
        assert np.allclose(buffers["rvar1"], run_var, rtol=1e-12, atol=1e-13)
    assert abs(run_mean).min() > 0.1 and abs(run_var - 1).min() > 0.1      # they did move
    x, y = _batches(shape, 3, 1, seed=5)[0]
    expected = _model_numpy(x, p, 1, 2, eps, run_mean, run_var)
    assert np.allclose(cm.predict(p, x, buffers=buffers), expected, rtol=1e-12, atol=1e-12)
    assert np.allclose(cm.forward(p, x, y, buffers=buffers)[1], expected, rtol=1e-12, atol=1e-12)
    # evaluation (seed < 0) and finite differences do not move the averages
    before = {k: v.copy() for k, v in buffers.items()}
    cm.loss_and_grads(p, x, y, buffers=buffers)
    assert all(np.array_equal(before[k], buffers[k]) for k in buffers)


def test_train_and_eval_modes_differ_as_they_should(dense_cm):
    """Different with fresh averages; equal once the averages are the batch's own statistics
    (mean and biased variance); in evaluation a row's output does not depend on its batch."""
    cm = dense_cm
    p = _params(cm)
    x, y = _batches((5,), 3, 1)[0]
    train = cm.forward(p, x, y, seed=0)[1]
    fresh = cm.forward(p, x, y, buffers=cm.init_buffers())[1]
    assert np.abs(train - fresh).max() > 0.1
    own = {"rmean1": x.mean(0), "rvar1": x.var(0)}
    assert np.allclose(cm.predict(p, x, buffers=own), train, rtol=1e-12, atol=1e-12)
    one = cm.predict(p, x[3:4], buffers=own)                     # a batch of 1 in evaluation
    assert one.shape == (1, 3) and np.allclose(one[0], train[3], rtol=1e-12, atol=1e-12)
    # in training a row's output depends on the rest of its batch
    assert not np.allclose(cm.forward(p, x[:4], y[:4], seed=0)[1][3], train[3], atol=1e-6)


def test_training_batch_of_one_is_a_clear_error(dense_cm):
    from chainrule.derive import ShapeError
    cm = dense_cm
    p, buffers = _params(cm), cm.init_buffers()
    x, y = _batches((5,), 3, 1)[0]
    with pytest.raises(ShapeError, match=r"layer 1:batchnorm\(momentum=0.3, eps=0.001\): a training "
                                         r"batch of 1 example\(s\) gives 1 value per feature, and the "
                                         r"batch variance needs at least 2"):
        cm.train_step(p, x[:1], y[:1], state=cm.init_state(), buffers=buffers)
    with pytest.raises(TypeError, match="pass buffers="):
        cm.train_step(p, x, y, state=cm.init_state())


@pytest.mark.parametrize("which", ["dense", "conv"])
def test_against_pytorch_batchnorm(which, dense_cm, conv_cm):
    """nn.BatchNorm1d / BatchNorm2d + nn.Linear: the training forward and the gradients of 3 steps,
    the running averages after them and the evaluation forward. The dense case steps with the fused
    Adam train_step against torch.optim.Adam; the convolutional one with the unfused declared SGD
    (loss_and_grads, then the lambdified update: no train_step to compile) against torch.optim.SGD."""
    torch = pytest.importorskip("torch")
    from chainrule.runtime.optim import Adam, DeclaredOptimizer
    cm, shape, mom, eps = {"dense": (dense_cm, (5,), 0.3, 1e-3), "conv": (conv_cm, (2, 5, 4), 0.2, 1e-5)}[which]
    bn = (torch.nn.BatchNorm1d if len(shape) == 1 else torch.nn.BatchNorm2d)(shape[0], eps=eps, momentum=mom,
                                                                             dtype=torch.float64)
    lin = torch.nn.Linear(int(np.prod(shape)), 3, dtype=torch.float64)
    p, buffers = _params(cm), cm.init_buffers()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(p["gamma1"]))
        bn.bias.copy_(torch.tensor(p["beta1"]))
        lin.weight.copy_(torch.tensor(p["W2"].reshape(3, -1)))
        lin.bias.copy_(torch.tensor(p["b2"]))
    net = torch.nn.Sequential(bn, torch.nn.Flatten(), lin)
    params = [bn.weight, bn.bias, lin.weight, lin.bias]
    names = ["gamma1", "beta1", "W2", "b2"]
    class UnfusedSGD(DeclaredOptimizer):
        rule = "sgd"
    ours = Adam(0.05, beta1=0.8) if which == "dense" else UnfusedSGD(0.2, fused=False)
    theirs = torch.optim.Adam(params, lr=0.05, betas=(0.8, 0.999), eps=1e-8) if which == "dense" \
        else torch.optim.SGD(params, lr=0.2)
    net.train()
    for x, y in _batches(shape, 3, 3, seed=7):
        xt, yt = torch.tensor(x), torch.tensor(y)
        theirs.zero_grad()
        out = net(xt)
        loss = torch.nn.functional.mse_loss(out, yt)
        loss.backward()
        assert np.allclose(cm.forward(p, x, y, seed=0)[1], out.detach().numpy(), rtol=1e-10, atol=1e-12)
        _, grads = cm.loss_and_grads(p, x, y)
        for k, t in zip(names, params):
            assert np.allclose(grads[k].reshape(-1), t.grad.numpy().reshape(-1), rtol=1e-9, atol=1e-12), k
        cost = ours.step(cm, p, x, y, buffers=buffers)
        assert abs(cost - float(loss.detach())) < 1e-12
        theirs.step()
        for k, t in zip(names, params):
            assert np.allclose(p[k].reshape(-1), t.detach().numpy().reshape(-1), rtol=1e-10, atol=1e-12), k
        assert np.allclose(buffers["rmean1"], bn.running_mean.numpy(), rtol=1e-12, atol=1e-13)
        assert np.allclose(buffers["rvar1"], bn.running_var.numpy(), rtol=1e-12, atol=1e-13)
    net.eval()
    x, _ = _batches(shape, 3, 1, seed=9)[0]
    with torch.no_grad():
        assert np.allclose(cm.predict(p, x, buffers=buffers), net(torch.tensor(x)).numpy(),
                           rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("which", ["dense", "conv"])
def test_kernels_match_finite_differences(which, dense_cm, conv_cm):
    from chainrule.codegen.verify import check_gradients
    cm = {"dense": dense_cm, "conv": conv_cm}[which]
    checks = check_gradients(cm.model, compiled=cm, seed=2, batch=7)
    assert [c.name for c in checks] == ["gamma1", "beta1", "W2", "b2"]
    for c in checks:
        assert c.ok and c.compared == c.size > 0, str(c)


def test_bad_momentum_and_eps_are_clear_errors():
    from chainrule.derive import BatchNorm, SpecError, build_model
    for kw, msg in [({"momentum": 0}, r"batchnorm: momentum must be a number in \(0, 1\], got 0"),
                    ({"momentum": 1.5}, r"batchnorm: momentum must be a number in \(0, 1\], got 1.5"),
                    ({"momentum": "fast"}, r"batchnorm: momentum must be a number in \(0, 1\], got 'fast'"),
                    ({"eps": 0.0}, r"batchnorm: eps must be > 0, got 0.0"),
                    ({"eps": float("nan")}, r"batchnorm: eps must be a finite number >= 0, got nan")]:
        with pytest.raises(ValueError, match=msg):
            BatchNorm(**kw)
    with pytest.raises(SpecError, match=r"item 3: batchnorm: momentum must be a number in \(0, 1\], got 0.0"):
        build_model("4 -> dense(3) -> batchnorm(momentum=0.0) -> mse")
    with pytest.raises(SpecError, match=r"item 3: batchnorm: bad arguments; usage: batchnorm\(momentum=0.1, eps=1e-5\)"):
        build_model("4 -> dense(3) -> batchnorm(mom=0.5) -> mse")
    m = build_model("4 -> dense(3) -> batchnorm(momentum=0.05, eps=0.001) -> mse")
    assert [layer.describe() for _, layer in m.layers][1] == "batchnorm(momentum=0.05, eps=0.001)"


def test_explanation_states_the_running_average_and_the_evaluation_formula():
    """Rendered from the declarations: the update with its momentum, the replacement of the batch
    statistics, and the layer's evaluation-mode equation (checked against the declared bodies)."""
    import sympy as sp

    from chainrule.derive import build_model, explain_model
    from chainrule.derive.explain import in_evaluation
    m = build_model("3 -> dense(4) -> batchnorm(momentum=0.2) -> tanh -> dense(2) -> mse")
    md = explain_model(m).to_markdown()
    text = md[md.index("# Running averages, and evaluation mode"):]
    assert r"{\hat\mu^{(2)}_{i}} \leftarrow \alpha^{(2)} {\mu^{(2)}_{i}} + \left(1 - \alpha^{(2)}\right) {\hat\mu^{(2)}_{i}}" in text
    assert r"\frac{B \alpha^{(2)} {\sigma^{2(2)}_{i}}}{B - 1}" in text
    assert r"$\alpha^{(2)} = 0.2$" in text
    assert (r"{y^{(2)}_{bi}} = {\beta^{(2)}_{i}} + \frac{\left(- {\hat\mu^{(2)}_{i}} + {z^{(1)}_{bi}}\right) "
            r"{\gamma^{(2)}_{i}}}{\sqrt{\epsilon + {\hat\sigma^{2(2)}_{i}}}}") in text
    t = m.tensors
    y = m.equation_for("y2")
    b, i = y.indices
    eps = next(c for c in m.constants if c.name.startswith("epsilon"))
    assert in_evaluation(m, y.body) == t["gamma2"][i] * (t["z1"][b, i] - t["rmean2"][i]) \
        / sp.sqrt(t["rvar2"][i] + eps) + t["beta2"][i]


def test_checkpoint_round_trip_and_exact_resume(dense_cm, tmp_path):
    """Buffers are saved with the parameters: predictions survive a save/load, and 3 epochs +
    checkpoint + 3 epochs equal 6 epochs bit for bit (parameters, Adam state and averages)."""
    from chainrule.runtime import Network
    from chainrule.runtime.optim import Adam
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, size=(45, 5))
    y = np.tanh(x[:, :3]) + 0.1 * rng.normal(size=(45, 3))

    def net():
        return Network(dense_cm.model, compiled=dense_cm, optimizer=Adam(0.02, beta1=0.8), seed=2)
    straight = net()
    straight.fit(x, y, epochs=6, batch_size=10, progress=False)
    first = net()
    first.fit(x, y, epochs=3, batch_size=10, progress=False)
    path = first.save(tmp_path / "bn.npz")
    rebuilt = Network.from_checkpoint(path, compiled=dense_cm)
    assert np.array_equal(rebuilt.predict(x), first.predict(x))
    assert all(np.array_equal(rebuilt.buffers[k], first.buffers[k]) for k in ("rmean1", "rvar1"))
    assert not np.allclose(first.buffers["rmean1"], 0)
    resumed = net()
    resumed.load(path)
    resumed.fit(x, y, epochs=6, batch_size=10, progress=False, initial_epoch=3)
    for k in straight.param_names:
        assert np.array_equal(resumed.params[k], straight.params[k]), k
    for k in straight.buffer_names:
        assert np.array_equal(resumed.buffers[k], straight.buffers[k]), k
    assert not np.array_equal(straight.buffers["rvar1"], first.buffers["rvar1"])


def test_spec_items_with_numbers_round_trip():
    """batchnorm, layer_norm, dropout and noise in a layer-list spec: parsed with their numbers (no
    eval), described back as the same spec (what a checkpoint rebuilds from)."""
    from chainrule.derive import BatchNorm, Dropout, LayerNorm, SpecError, build_model
    from chainrule.derive.layers import GaussianNoise
    spec = ("4 -> dense(6) -> batchnorm(momentum=0.05, eps=0.001) -> relu -> dropout(0.25) -> noise(0.5) "
            "-> dense(5) -> layer_norm(eps=0.0001) -> dense(3) -> mse")
    m = build_model(spec)
    layers = [layer for _, layer in m.layers]
    assert [type(layers[k]) for k in (1, 3, 4)] == [BatchNorm, Dropout, GaussianNoise]
    assert (layers[1].momentum, layers[1].eps, layers[3].rate, layers[4].std, layers[6].eps) == \
        (0.05, 0.001, 0.25, 0.5, 0.0001) and isinstance(layers[6], LayerNorm)
    assert " -> ".join(["4"] + [v.describe() for v in layers] + ["mse"]) == spec
    for bad, msg in [("dropout(1.0)", r"item 3: dropout rate must be a number in \[0, 1\), got 1.0"),
                     ("noise(1e)", r"item 3: noise: argument '1e' is not a number or a name"),
                     ("layer_norm(eps=0)", r"item 3: layer_norm: eps must be > 0, got 0")]:
        with pytest.raises(SpecError, match=msg):
            build_model(f"4 -> dense(3) -> {bad} -> dense(2) -> mse")
