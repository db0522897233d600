"""A large model's module is split: one compiled function per kernel, called by plain Python drivers
(chainrule/codegen/split.py). The split module must compute exactly what the fused one does, for
every driver: forward in both modes, predict, outputs, the gradients, the input gradients and a
train step that updates parameters, optimiser state and running averages in place."""
import numpy as np
import pytest

from chainrule.derive import build_model

SPEC = "7 -> dense(5) -> batchnorm -> relu -> dropout(0.25) -> dense(4) -> softmax_cross_entropy"


@pytest.fixture(scope="module")
def both(kernel_cache_dir):
    from chainrule.codegen import compile_model
    model = build_model(SPEC)
    return [compile_model(model, cache_dir=kernel_cache_dir, optimizer="momentum", input_grads=True,
                          split=split) for split in (False, True)]


def test_the_split_module_is_kernels_and_python_drivers(both):
    fused, split = both
    assert "def k0_" not in fused.source and "@njit(cache=True)\ndef loss_and_grads" in fused.source
    src = split.source
    drivers = src[src.index("# -- drivers"):]
    assert "@njit" not in drivers and "\ndef loss_and_grads(" in drivers and "\ndef train_step(" in drivers
    # the forward pass's first kernel is one function, called by forward and by loss_and_grads
    first = drivers[drivers.index("def forward("):].split("= k", 1)[1].split("(")[0]
    body = drivers[drivers.index("def loss_and_grads("):drivers.index("def train_step(")]
    assert f"= k{first}(" in body
    assert src.count(f"def k{first}(") == 1
    # the optimiser's update is one kernel for all six parameters (flat views bound in Python)
    import re
    step = drivers[drivers.index("def train_step("):drivers.index("def outputs(")]
    updates = re.findall(r"\n    (k\d+_in_place)\(", step)
    assert len(updates) == 6 and len(set(updates)) == 1, updates


def test_the_split_module_computes_what_the_fused_one_does(both):
    """Every driver at batch 6 (sizes 7, 5, 4), float64: equal to 1e-12."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 7))
    y = np.eye(4)[rng.integers(0, 4, size=6)]
    results = []
    for cm in both:
        params = {k: v + 0.1 * rng.normal(size=v.shape) for k, v in cm.init_params(3).items()} \
            if not results else {k: v.copy() for k, v in results[0]["start"].items()}
        start = {k: v.copy() for k, v in params.items()}
        state, buffers = cm.init_state(), cm.init_buffers()
        r = {"start": start,
             "eval": cm.forward(params, x, y, buffers=buffers),
             "train": cm.forward(params, x, y, seed=3, buffers=buffers),
             "predict": cm.predict(params, x, buffers=buffers),
             "outputs": cm.outputs(params, x, buffers=buffers),
             "grads": cm.loss_and_grads(params, x, y, seed=4, buffers=cm.init_buffers()),
             "input": cm.input_grads(params, x, y, seed=4, buffers=cm.init_buffers())}
        r["costs"] = [cm.train_step(params, x, y, lr=0.1, state=state, step=s, clip=0.5, seed=s,
                                    buffers=buffers) for s in (1, 2)]
        r["params"], r["state"], r["buffers"] = params, state, buffers
        results.append(r)
    fused, split = results

    def same(a, b, what):
        if isinstance(a, dict):
            assert a.keys() == b.keys(), what
            for k in a:
                same(a[k], b[k], f"{what}/{k}")
        elif isinstance(a, (tuple, list)):
            assert len(a) == len(b), what
            for k, (u, v) in enumerate(zip(a, b)):
                same(u, v, f"{what}[{k}]")
        else:
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-12, atol=1e-14, err_msg=what)
    for key in ("eval", "train", "predict", "outputs", "grads", "input", "costs", "params", "state", "buffers"):
        same(fused[key], split[key], key)
    assert fused["train"][0] != fused["eval"][0]                # dropout and batch statistics acted
    assert not np.allclose(fused["params"]["W1"], fused["start"]["W1"])    # the steps moved W1
