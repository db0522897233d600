"""The training step's large temporaries come from a workspace allocated once per batch size
(chainrule/codegen/workspace.py): the results are those of fresh arrays, the returned gradients are
never overwritten by a later step, and a step stops faulting pages in."""
import sys

import numpy as np
import pytest

SPEC = "12x12 -> conv(16, 3) -> relu -> maxpool(2) -> flatten -> dense(3) -> softmax_cross_entropy"


@pytest.fixture(scope="module")
def cnn(compiled_model):
    return compiled_model(SPEC, "float64")


def _batch(n, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 1, 12, 12)), np.eye(3)[rng.integers(0, 3, size=n)]


def test_the_large_temporaries_of_the_step_are_read_from_the_workspace(cnn):
    step = cnn.source[cnn.source.index("def loss_and_grads("):cnn.source.index("def train_step(")]
    reused = [ln for ln in step.splitlines() if "reused from the workspace" in ln]
    # at least 128 KiB at batch 32: the activation, the convolution's im2col buffer and its product,
    # the pooling adjoint's scatter buffer (zeroed at every step, as np.zeros did); not the pooled
    # map (50 KiB)
    assert len(reused) >= 4, reused
    assert any("np.zeros" in ln for ln in reused) and ".fill(0.0)" in step
    ws = cnn.module.workspace(32)
    assert len(ws) == len(reused) and all(a.nbytes >= 128 * 1024 for a in ws)
    # the gradients are returned to the caller: never from the workspace
    assert "d_W1 = u_ws" not in step and "d_W2 = u_ws" not in step


def test_a_reused_workspace_gives_the_results_of_fresh_arrays(cnn):
    """Each step's result equals the one computed with a fresh workspace, whatever ran before with
    the reused one (another batch, another batch size): a scatter buffer is zeroed again, and
    nothing of a previous step leaks into the next."""
    params = cnn.init_params(0)
    args = [params[n] for n in cnn.param_names]
    batches = [_batch(37, 1), _batch(5, 2), _batch(37, 3), _batch(37, 1)]
    for x, y in batches:
        reused = cnn.loss_and_grads(params, x, y)
        fresh = cnn.module.loss_and_grads(*args, x, y, -1, cnn.module.workspace(x.shape[0]))
        assert reused[0] == fresh[0]
        for name, g in zip(cnn.param_names, fresh[1]):
            np.testing.assert_array_equal(reused[1][name], g, err_msg=name)
    assert set(cnn._workspaces) == {5, 37}


def test_returned_gradients_survive_the_next_step(cnn):
    params = cnn.init_params(1)
    (x1, y1), (x2, y2) = _batch(33, 4), _batch(33, 5)
    _, first = cnn.loss_and_grads(params, x1, y1)
    kept = {k: v.copy() for k, v in first.items()}
    _, second = cnn.loss_and_grads(params, x2, y2)
    for name in kept:
        np.testing.assert_array_equal(first[name], kept[name], err_msg=name)
        assert not np.array_equal(first[name], second[name]), name


def test_the_kernels_pass_finite_differences(cnn):
    from chainrule.codegen.verify import check_gradients
    results = check_gradients(cnn.model, compiled=cnn)
    assert [n for n, _ in results] == ["W1", "b1", "W2", "b2"]
    assert all(err < 1e-6 for _, err in results), results


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-fault counts of glibc's malloc")
def test_a_step_with_its_workspace_faults_far_fewer_pages_than_with_fresh_arrays(cnn):
    """The reason for the workspace: freed large arrays are given back to the operating system and
    faulted in again, page by page, at the next step. Counted with getrusage (no timing)."""
    import resource
    params = cnn.init_params(2)
    args = [params[n] for n in cnn.param_names]
    x, y = _batch(256, 6)
    ws = cnn.module.workspace(256)

    def faults(fresh: bool) -> float:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            cnn.module.loss_and_grads(*args, x, y, -1, cnn.module.workspace(256) if fresh else ws)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
    faults(False), faults(True)                          # compiled, warmed up
    reused, fresh = faults(False), faults(True)
    pages = sum(a.nbytes for a in ws) / 4096
    assert reused < pages / 20, (reused, fresh, pages)   # the workspace: next to none
    # fresh arrays fault their pages in where glibc maps large blocks afresh; after many large
    # frees in one process (the whole suite) its dynamic mmap threshold grows and it reuses heap
    # pages instead, so the contrast is asserted only in a process where fresh arrays do fault
    if fresh > pages / 2:
        assert reused < fresh / 10, (reused, fresh, pages)


def test_an_array_read_only_by_a_returned_product_is_reused():
    """A returned gradient _matmul(a.reshape(..).T, x) is a fresh array, so ``a`` does not reach the
    caller and is taken from the workspace; a returned view or alias of ``b`` keeps ``b`` out."""
    from chainrule.codegen.workspace import use_workspace
    blocks = ["a = np.empty((n_batch, 512), dtype=DT)",
              "g = _matmul(a.reshape(((n_batch) * (2), (256))).T, x).reshape((256, 16,))",
              "b = np.empty((n_batch, 512), dtype=DT)",
              "h = b.reshape((n_batch * 512,))"]
    out, allocations = use_workspace(blocks, ["g", "h"], itemsize=8)
    assert [a.name for a in allocations] == ["a"]
    assert out[0].startswith("a = u_ws[0]") and out[2] == blocks[2]
