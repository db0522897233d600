"""Reliability and security (issue 11): the kernel cache's trust model, checkpoints validated before
anything is allocated, degenerate and hostile specs, run-time arguments, CLI file errors, packaging.

Every test makes real calls and asserts the message a user would read.
"""
import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

from chainrule.codegen import cache as kcache
from chainrule.codegen import compile_model, render_module
from chainrule.codegen.cache import KernelCacheError, KernelCacheWarning
from chainrule.codegen.verify import sample_batch
from chainrule.derive import build_model
from chainrule.derive.errors import ChainruleError, SpecError, UnsupportedError

ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
SMALL = "3 -> dense(2) -> bce_logits"
OTHER = "3 -> dense(2) -> mse"


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _works(cm):
    p = cm.init_params(0)
    x, y = sample_batch(cm, batch=4)
    cost, grads = cm.loss_and_grads(p, x, y)
    assert np.isfinite(cost) and set(grads) == set(cm.param_names)
    return cost


# == the kernel cache ================================================================================
def test_cache_dir_is_created_private_and_numba_files_live_inside(tmp_path):
    d = tmp_path / "new" / "kernels"
    cm = compile_model(build_model(SMALL), cache_dir=d)
    _works(cm)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(cm.module_path).st_mode) == 0o600
    assert cm.module_path.parent == d
    pycache = d / "__pycache__"
    assert list(pycache.glob("*.nbi")) and list(pycache.glob("*.nbc"))   # Numba's index and code


def test_header_binds_the_module_to_its_key(tmp_path):
    a = compile_model(build_model(SMALL), cache_dir=tmp_path)
    b = compile_model(build_model(OTHER), cache_dir=tmp_path)
    first = a.module_path.read_text().splitlines()[0]
    assert first.startswith("# chainrule-kernel key=") and kcache.cache_key(a.model, "float64") in first
    # another model's (valid, self-consistent) module copied over an entry: regenerated, not run
    b_text = b.module_path.read_text()
    shutil.copyfile(a.module_path, b.module_path)
    again = compile_model(build_model(OTHER), cache_dir=tmp_path)
    assert not again.cache_hit and again.module_path.read_text() == b_text
    _works(again)
    # an edited module whose content hash was recomputed in the old key-less header: refused
    src = b_text.partition("\n")[2].replace("-= lr *", "+= lr *")
    b.module_path.write_text(f"# chainrule-kernel sha256={hashlib.sha256(src.encode()).hexdigest()}\n{src}")
    assert not compile_model(build_model(OTHER), cache_dir=tmp_path).cache_hit
    assert b.module_path.read_text() == b_text


def test_trust_model_is_stated_an_edit_with_a_recomputed_header_is_the_private_dirs_job(tmp_path):
    """No secret, no HMAC: whoever can write the directory can forge a header. The docstring says
    so, and the directory check (below) is what keeps others out."""
    doc = kcache.__doc__
    for phrase in ("the cache directory is code", "not* detected", "0700", "chmod go-w",
                   "NUMBA_CACHE_DIR", "__pycache__"):
        assert phrase in doc, phrase
    cm = compile_model(build_model(SMALL), cache_dir=tmp_path)
    key = kcache.cache_key(cm.model, "float64")
    src = cm.source.replace("-= lr *", "+= lr *")
    cm.module_path.write_text(kcache.with_header(src, key))
    assert kcache.read_verified(cm.module_path, key) == src     # forged by someone who can write


def test_insecure_cache_directories_are_refused(tmp_path):
    d = tmp_path / "shared"
    d.mkdir()
    model = build_model(SMALL)
    for mode, who in [(0o777, "group and others"), (0o702, "others"), (0o770, "group")]:
        os.chmod(d, mode)
        with pytest.raises(KernelCacheError) as e:
            compile_model(model, cache_dir=d)
        msg = str(e.value)
        assert f"writable by {who} (mode 0{mode:o})" in msg and f"chmod go-w {d}" in msg
    os.chmod(d, 0o700)
    assert not list(d.iterdir())                          # nothing was written while refused
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(KernelCacheError, match=r"afile is not a directory"):
        compile_model(model, cache_dir=f)
    with pytest.raises(KernelCacheError, match="a parent of it is not a directory"):
        compile_model(model, cache_dir=f / "sub")


@pytest.mark.skipif(not IS_ROOT, reason="chown to another user needs root")
def test_cache_directory_owned_by_someone_else_is_refused(tmp_path):
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 54321, -1)
    with pytest.raises(KernelCacheError, match=r"owned by uid 54321, not by you \(uid 0\)"):
        compile_model(build_model(SMALL), cache_dir=d)


def test_numba_cache_dir_must_be_private_too(tmp_path, monkeypatch):
    from numba.core import config
    nd = tmp_path / "numba"
    nd.mkdir()
    os.chmod(nd, 0o777)
    monkeypatch.setattr(config, "CACHE_DIR", str(nd))
    with pytest.raises(KernelCacheError, match=r"Numba's cache directory \(NUMBA_CACHE_DIR\) .* writable"):
        compile_model(build_model(SMALL), cache_dir=tmp_path / "k")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_full_or_read_only_cache_compiles_in_memory_with_one_warning(tmp_path, monkeypatch, code):
    def refuse(*a, **k):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(kcache, "atomic_write_text", refuse)
    d = tmp_path / "k"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cm = compile_model(build_model(SMALL), cache_dir=d)
        cm2 = compile_model(build_model(OTHER), cache_dir=d)
    msgs = [str(x.message) for x in w if issubclass(x.category, KernelCacheWarning)]
    assert len(msgs) == 1 and os.strerror(code) in msgs[0] and "compiling the kernels in memory" in msgs[0]
    assert cm.in_memory and cm2.in_memory and "@njit(cache=False)" in cm.source
    _works(cm)
    _works(cm2)
    assert not [p for p in d.iterdir() if p.name != "__pycache__"]
    assert not list((d / "__pycache__").iterdir())


def test_read_only_file_system_probe_falls_back_to_memory(tmp_path, monkeypatch):
    import tempfile

    def erofs(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    d = tmp_path / "ro"
    d.mkdir(mode=0o700)
    monkeypatch.setattr(tempfile, "TemporaryFile", erofs)
    with pytest.warns(KernelCacheWarning, match="Read-only file system"):
        cm = compile_model(build_model(SMALL), cache_dir=d)
    monkeypatch.undo()
    assert cm.in_memory
    _works(cm)
    assert list(d.iterdir()) == []


@pytest.mark.skipif(IS_ROOT, reason="root writes into a 0500 directory anyway (simulated above)")
def test_chmod_0500_cache_dir_compiles_in_memory(tmp_path):
    d = tmp_path / "ro"
    d.mkdir(mode=0o500)
    try:
        with pytest.warns(KernelCacheWarning):
            cm = compile_model(build_model(SMALL), cache_dir=d)
        _works(cm)
    finally:
        os.chmod(d, 0o700)


def test_numba_failing_to_write_its_cache_on_first_call_does_not_abort(tmp_path, monkeypatch):
    from numba.core import caching

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(caching.IndexDataCacheFile, "save", full)
    cm = compile_model(build_model("3 -> dense(3) -> tanh -> dense(2) -> mse"), cache_dir=tmp_path / "k")
    assert not cm.in_memory
    with pytest.warns(KernelCacheWarning, match="Numba could not write its cache"):
        cost = _works(cm)
    assert cm.in_memory and np.isfinite(cost)


def test_a_module_that_does_not_compile_is_never_cached(tmp_path, monkeypatch):
    from chainrule.codegen import render
    monkeypatch.setattr(render, "render_plan", lambda plan, cache=True: "def forward(, x):\n    pass\n")
    with pytest.raises(UnsupportedError, match="the generated module does not compile .* it was not cached"):
        compile_model(build_model(SMALL), cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.py"))


def test_parameterless_model_is_refused_clearly_and_nothing_is_cached(tmp_path):
    from chainrule.derive.layers import Activation, sequential, sigmoid
    with pytest.raises(SpecError, match=r"spec '3 -> mse' has no layer with parameters.*'3 -> dense\(1\) -> mse'"):
        build_model("3 -> mse")
    with pytest.raises(UnsupportedError, match="has no parameters, so there is nothing to train"):
        compile_model(sequential(3, [], "mse"), cache_dir=tmp_path)
    with pytest.raises(UnsupportedError, match="no parameters"):
        render_module(sequential(3, [Activation("sigmoid", sigmoid)], "mse"))
    assert not list(tmp_path.glob("*.py"))


# == degenerate and hostile specs =====================================================================
@pytest.mark.parametrize("spec, message", [
    ("3 -> dense(0) -> mse", "item 2: the width of dense(0) is 0: a width must be at least 1"),
    ("0 -> dense(2) -> mse", "the input width is 0: a width must be at least 1"),
    ("3 -> dense(1000000000) -> mse", "is 1000000000, above the limit of 100000; if you mean it, raise "
     "the limit with CHAINRULE_MAX_WIDTH=1000000000 or build_model(..., max_width=1000000000)"),
    ("2 -> dense(20000) -> dense(20000) -> mse", "has 400,080,000 parameters, above the limit of "
     "100,000,000; if you mean it, raise the limit with CHAINRULE_MAX_PARAMS=400080000"),
    ("\u00b2 -> dense(2) -> mse", "the first item must be the input width (digits 0-9), got '\u00b2'"),
    ("3 -> dense(\u00b2) -> mse", "item 2 'dense(\u00b2)' is not a layer"),
    ("", "empty model spec"),
    ("   ", "empty model spec"),
])
def test_degenerate_specs_get_clear_errors(spec, message):
    with pytest.raises(SpecError) as e:
        build_model(spec)
    assert message in str(e.value)


def test_limits_can_be_raised_by_argument_or_environment(monkeypatch):
    from chainrule.derive.layers import Dense
    assert build_model("2 -> dense(150000) -> mse", max_width=200_000).size_values
    monkeypatch.setenv("CHAINRULE_MAX_WIDTH", "200000")
    assert build_model("2 -> dense(150000) -> mse").size_values
    monkeypatch.setenv("CHAINRULE_MAX_PARAMS", "10")
    with pytest.raises(SpecError, match="has 15 parameters, above the limit of 10"):
        build_model("2 -> dense(5) -> mse")
    monkeypatch.setenv("CHAINRULE_MAX_PARAMS", "lots")
    with pytest.raises(SpecError, match="CHAINRULE_MAX_PARAMS='lots' is not a positive integer"):
        build_model("2 -> dense(5) -> mse")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(SpecError, match=f"dense: units must be a positive integer, got {bad!r}"):
            Dense(bad)


def _hostile_model(evil):
    """The perceptron with its input tensor renamed after declaration (name, base, equations)."""
    from chainrule.derive.graph import Model
    m = build_model("2 -> dense(1) -> bce_logits")
    x = m.tensors["x"]
    old = x.base
    x.name, x.base = evil, sp.IndexedBase(evil, real=True)
    eqs = [type(e)(e.out, e.indices, e.body.xreplace({old: x.base}), layer=e.layer, note=e.note)
           for e in m.equations]
    return Model(eqs, list(m.tensors.values()), m.cost, loss=m.loss, outputs=m.outputs,
                 size_values=m.size_values, name="evil\nmodel", layers=m.layers)


@pytest.mark.parametrize("sep", ["\n", "\r", "\r\n", "\x0c\n", "\u2028", "\x00"])
def test_renamed_tensor_never_reaches_generated_code_raw(tmp_path, sep):
    import ast
    marker = tmp_path / "pwned"
    evil = f"x{sep}import os; open({str(marker)!r}, 'w'){sep}#"
    def imports(src):
        return sorted(a.name for n in ast.walk(ast.parse(src)) if isinstance(n, (ast.Import, ast.ImportFrom))
                      for a in n.names)
    model = _hostile_model(evil)
    src = render_module(model)
    assert imports(src) == imports(render_module(build_model("2 -> dense(1) -> bce_logits")))
    assert all("open(" not in line for line in src.splitlines() if not line.lstrip().startswith("#"))
    cm = compile_model(model, cache_dir=tmp_path / "k")      # importing it runs nothing
    _works(cm)
    assert not marker.exists()
# == atomic writes ====================================================================================
_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from chainrule.atomic import atomic_write
    def write(f):
        f.write(b"x" * 100000)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    atomic_write(sys.argv[1], write)
""")


def test_stale_temporaries_of_a_killed_save_are_removed_on_the_next_save(tmp_path):
    from chainrule.atomic import atomic_write_text
    target = tmp_path / "model.npz"
    target.write_text("old")
    for _ in range(3):
        r = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)], env=_env())
        assert r.returncode == -signal.SIGKILL
    leaked = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # each save removed the temporary its killed predecessor leaked: they never pile up
    assert len(leaked) == 1 and leaked[0].startswith(".model.npz.")
    assert target.read_text() == "old"                           # the target survived
    other = tmp_path / ".notes.txt.12345678.tmp"                 # not a temporary of this target
    other.write_text("keep")
    atomic_write_text(target, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "model.npz"]
    assert target.read_text() == "new"


def test_user_files_follow_the_umask_and_the_cache_stays_private(tmp_path):
    from chainrule.atomic import atomic_write_text
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "doc.md", "x")
        atomic_write_text(tmp_path / "private", "x", mode=0o600)
        os.umask(0o077)
        atomic_write_text(tmp_path / "strict.md", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "doc.md").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "private").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "strict.md").st_mode) == 0o600


# == checkpoints ======================================================================================
RELU = "4 -> dense(3) -> relu -> dense(2) -> mse"
TANH = "4 -> dense(3) -> tanh -> dense(2) -> mse"


@pytest.fixture
def net_of(compiled_model):
    from chainrule.runtime import Network

    def make(spec, seed=0):
        cm = compiled_model(spec)
        return Network(cm.model, compiled=cm, seed=seed)
    return make


def _npz(path, arrays: dict, meta=None, compress=False):
    """An .npz written member by member (streams, so a large declared array costs no memory)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED,
                         allowZip64=True) as zf:
        if meta is not None:
            text = meta if isinstance(meta, str) else json.dumps(meta)
            with zf.open("__meta__.npy", "w") as f:
                np.lib.format.write_array(f, np.array(text))
        for name, a in arrays.items():
            with zf.open(name + ".npy", "w", force_zip64=True) as f:
                if isinstance(a, tuple):                       # (shape, dtype): zeros, streamed
                    shape, dtype = a
                    np.lib.format.write_array_header_2_0(
                        f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                            "fortran_order": False, "shape": shape})
                    chunk = bytes(1 << 20)
                    left = int(np.prod(shape)) * np.dtype(dtype).itemsize
                    while left:
                        f.write(chunk[:min(left, len(chunk))])
                        left -= min(left, len(chunk))
                else:
                    np.lib.format.write_array(f, np.asarray(a), allow_pickle=True)


def _meta_of(net):
    return {"format": "chainrule-params", "version": 1, "model": net.model.name, "spec": net.spec,
            "dtype": "float64", "param_names": net.param_names,
            "param_shapes": {k: list(s) for k, s in net.param_shapes.items()}}


def _peak_mib(fn):
    import tracemalloc
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / 2**20


def test_large_undeclared_array_is_refused_before_it_is_allocated(net_of, tmp_path):
    from chainrule.runtime import CheckpointError
    net = net_of(TANH)
    path = tmp_path / "bomb.npz"
    params = {k: v for k, v in net.get_params().items()}
    _npz(path, {**params, "payload": ((32 << 20,), "float64")}, meta=_meta_of(net), compress=True)
    assert path.stat().st_size < 2 << 20                     # 256 MiB of zeros, compressed
    errors = []

    def load():
        with pytest.raises(CheckpointError) as e:
            net.load(path)
        errors.append(str(e.value))
    assert _peak_mib(load) < 8
    assert "holds array payload that the metadata does not declare" in errors[0]
    # without metadata, the unexpected name and the shape are refused from the headers too
    _npz(path, {**params, "W1": ((4096, 4096), "float64")}, compress=True)
    errors.clear()
    assert _peak_mib(load) < 8
    assert "W1: " in errors[0] and "has (4096, 4096), the network needs (3, 4)" in errors[0]


def test_checkpoint_members_must_agree_with_their_headers_and_hold_no_pickles(net_of, tmp_path):
    from chainrule.runtime import CheckpointError
    net = net_of(TANH)
    path = tmp_path / "p.npz"
    _npz(path, {**net.get_params(), "W1": np.array([{"a": 1}], dtype=object)}, meta=_meta_of(net))
    with pytest.raises(CheckpointError, match="array W1 holds Python objects .a pickle., which are never loaded"):
        net.load(path)
    net.save(path)
    with zipfile.ZipFile(path) as zf:                      # a member cut short: header lies
        data = {i.filename: zf.read(i) for i in zf.infolist()}
    with zipfile.ZipFile(path, "w") as zf:
        for name, blob in data.items():
            zf.writestr(name, blob[:-8] if name == "W1.npy" else blob)
    with pytest.raises(CheckpointError, match=r"array W1 declares shape \(3, 4\) float64 \(96 bytes\) "
                                              r"but its member holds 88 bytes"):
        net.load(path)


@pytest.mark.parametrize("meta, message", [
    ({"format": "chainrule-params"}, "malformed metadata: 'version' is missing"),
    ('["format", "chainrule-params"]', "malformed metadata: expected a JSON object, got a JSON list"),
    ("{not json", "unreadable metadata (not JSON)"),
    ({"format": "something-else"}, "is not a chainrule parameter file (format 'something-else'"),
    ({"format": "chainrule-params", "version": 1, "model": "m", "dtype": "float64",
      "param_names": ["W1"], "param_shapes": {"W1": "big"}},
     "malformed metadata: the shape of W1 should be a list of non-negative integers, got \"big\""),
    ({"format": "chainrule-params", "version": 1, "model": "m", "dtype": "float16",
      "param_names": [], "param_shapes": {}}, "malformed metadata: dtype 'float16' is not one of"),
    ({"format": "chainrule-params", "version": "1", "model": "m", "dtype": "float64",
      "param_names": [], "param_shapes": {}}, "malformed metadata: 'version' should be a JSON integer"),
    ({"format": "chainrule-params", "version": 7, "model": "m", "dtype": "float64",
      "param_names": [], "param_shapes": {}}, "format version 7 is not supported"),
])
def test_malformed_metadata_says_what_is_wrong(tmp_path, meta, message):
    from chainrule.runtime import CheckpointError, Network
    path = tmp_path / "m.npz"
    _npz(path, {"W1": np.zeros((3, 4))}, meta=meta)
    with pytest.raises(CheckpointError) as e:
        Network.from_checkpoint(path)
    assert message in str(e.value)


def test_metadata_spec_is_checked_before_kernels_are_compiled(net_of, tmp_path, monkeypatch):
    import chainrule.codegen
    from chainrule.runtime import CheckpointError, Network
    net = net_of(TANH)

    def no_compiling(*a, **k):
        raise AssertionError("compiled kernels for a checkpoint that does not validate")
    monkeypatch.setattr(chainrule.codegen, "compile_model", no_compiling)
    path = tmp_path / "c.npz"
    meta = {**_meta_of(net), "spec": "2 -> dense(20000) -> dense(20000) -> mse", "model": "model"}
    _npz(path, net.get_params(), meta=meta)
    with pytest.raises(CheckpointError, match=r"the model in its metadata cannot be built: .* has "
                                              r"400,080,000 parameters, above the limit"):
        Network.from_checkpoint(path)
    meta["spec"] = "4 -> dense(300) -> dense(2) -> mse"             # buildable, but not these arrays
    _npz(path, net.get_params(), meta=meta)
    with pytest.raises(CheckpointError, match=r"its metadata's model '4 -> dense\(300\) -> dense\(2\) -> "
                                              r"mse' does not match its arrays: W1: the model has \(300, 4\), "
                                              r"the file \(3, 4\)"):
        Network.from_checkpoint(path)


def test_same_shapes_other_architecture_is_refused_with_both_descriptions(net_of, tmp_path):
    from chainrule.runtime import CheckpointError
    relu, tanh = net_of(RELU), net_of(TANH, seed=5)
    path = tmp_path / "relu.npz"
    relu.save(path)
    with pytest.raises(CheckpointError) as e:
        tanh.load(path)
    msg = str(e.value)
    assert f"was saved from a different architecture: {RELU!r}, but this network is {TANH!r}" in msg
    assert "check_architecture=False" in msg
    assert not np.array_equal(tanh.params["W1"], relu.params["W1"])      # nothing was loaded
    tanh.load(path, check_architecture=False)
    np.testing.assert_array_equal(tanh.params["W1"], relu.params["W1"])
    mse, ce = net_of("4 -> dense(3) -> mse"), net_of("4 -> dense(3) -> softmax -> cross_entropy")
    mse.save(path)
    with pytest.raises(CheckpointError, match="'4 -> dense.3. -> mse', but this network is "
                                              "'4 -> dense.3. -> softmax -> cross_entropy'"):
        ce.load(path)


def test_save_round_trip_and_leftovers_of_a_killed_save_are_cleaned(net_of, tmp_path):
    from chainrule.runtime import Network
    net = net_of(TANH, seed=3)
    path = tmp_path / "ck.npz"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    leftover = tmp_path / f".ck.npz.{dead}.0123456789ab.tmp"
    leftover.write_bytes(b"\0" * 1000)
    old = os.umask(0o022)
    try:
        net.save(path)
    finally:
        os.umask(old)
    assert not leftover.exists() and sorted(os.listdir(tmp_path)) == ["ck.npz"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    back = Network.from_checkpoint(path, compiled=net.compiled)
    for k in net.param_names:
        np.testing.assert_array_equal(back.params[k], net.params[k])


# == run-time arguments and data ======================================================================
@pytest.mark.parametrize("kwargs, message", [
    ({"lr": -1}, "fit: lr must be a finite number > 0, got -1"),
    ({"lr": 0}, "fit: lr must be a finite number > 0, got 0"),
    ({"lr": float("nan")}, "fit: lr must be a finite number > 0, got nan"),
    ({"lr": float("inf")}, "fit: lr must be a finite number > 0, got inf"),
    ({"lr": "0.1"}, "fit: lr must be a finite number > 0, got '0.1'"),
    ({"batch_size": 2.9}, "fit: batch_size must be a whole number >= 1, got 2.9"),
    ({"batch_size": 0}, "fit: batch_size must be a whole number >= 1, got 0"),
    ({"batch_size": True}, "fit: batch_size must be a whole number >= 1, got True"),
    ({"epochs": 2.9}, "fit: epochs must be a whole number >= 0, got 2.9"),
    ({"epochs": -1}, "fit: epochs must be a whole number >= 0, got -1"),
])
def test_fit_arguments_are_checked_by_name(net_of, kwargs, message):
    net = net_of(TANH)
    lr_before, before = net.optimizer.lr, net.get_params()
    x, y = np.ones((6, 4)), np.zeros((6, 2))
    with pytest.raises(ValueError) as e:
        net.fit(x, y, progress=False, **kwargs)
    assert str(e.value) == message
    assert net.optimizer.lr == lr_before
    for k in net.param_names:
        np.testing.assert_array_equal(net.params[k], before[k])


def test_whole_floats_are_accepted_and_optimizers_refuse_bad_rates(net_of):
    from chainrule.runtime import SGD
    net = net_of(TANH)
    h = net.fit(np.ones((6, 4)), np.zeros((6, 2)), epochs=2.0, batch_size=np.int64(3), lr=0.05,
                progress=False)
    assert len(h) == 2 and h.params["steps"] == 2
    with pytest.raises(ValueError, match="SGD: the learning rate must be a finite number >= 0, got -0.5"):
        SGD(-0.5)
    with pytest.raises(ValueError, match="got nan"):
        net.optimizer.lr = float("nan")


def test_empty_data_is_a_clear_error(net_of):
    from chainrule.runtime import DataError
    net = net_of(TANH)
    x, y = np.zeros((0, 4)), np.zeros((0, 2))
    with pytest.raises(DataError, match=r"fit: x is empty \(0 examples, shape \(0, 4\)\): "
                                        r"there is nothing to train on"):
        net.fit(x, y, progress=False)
    with pytest.raises(DataError, match=r"evaluate: x is empty \(0 examples.*nothing to evaluate"):
        net.evaluate(x, y)
    with pytest.raises(DataError, match=r"fit \(validation_data\): validation x is empty"):
        net.fit(np.ones((4, 4)), np.zeros((4, 2)), validation_data=(x, y), progress=False)


# == the command line and files =======================================================================
def _cli(capsys, *argv):
    from chainrule.cli import main
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_cli_version(capsys):
    from importlib.metadata import version
    with pytest.raises(SystemExit) as e:
        _cli(capsys, "--version")
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"chainrule {version('chainrule')}"


def test_the_console_script_skips_only_the_interpreter_teardown(tmp_path):
    """``chainrule`` (``cli.run``) leaves through ``os._exit`` once the command is done: its files
    are complete, exit handlers have run, buffered output is flushed, and the command's exit
    code is the process's; a usage error still exits through argparse."""
    out = tmp_path / "sgd.md"
    code = ("import atexit, sys; atexit.register(lambda: print('exit handler ran', file=sys.stderr)); "
            "sys.argv = ['chainrule'] + sys.argv[1:]; from chainrule.cli import run; run()")
    r = subprocess.run([sys.executable, "-c", code, "optimizer", "sgd", "-o", str(out)],
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "exit handler ran\n", r.stderr
    assert out.read_text().startswith("#") and "\\eta" in out.read_text()
    r = subprocess.run([sys.executable, "-c", code, "optimizer", "sgd", "--format", "latex"],
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "\\eta" in r.stdout and r.stdout.endswith("\n")   # flushed, not lost
    r = subprocess.run([sys.executable, "-c", code, "derive", str(tmp_path / "missing.json")],
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "exit handler ran" in r.stderr
    r = subprocess.run([sys.executable, "-c", code, "optimizer", "no-such-rule"],
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_cli_file_errors_are_one_line_before_any_work(capsys, tmp_path, monkeypatch):
    import chainrule.runtime.demo as demo
    monkeypatch.setattr(demo, "run_demo", lambda **k: pytest.fail("demo started working"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (("demo", "--out", "/proc/x"), "chainrule demo: error: --out /proc/x: cannot create the directory"),
        (("demo", "--out", str(afile)), f"chainrule demo: error: --out {afile} exists and is not a directory"),
        (("derive", "-o", str(tmp_path)), f"chainrule derive: error: -o {tmp_path} is a directory: give a file name"),
        (("codegen", "-o", str(afile / "m.py")),
         f"chainrule codegen: error: -o {afile / 'm.py'}: {afile} is not a directory"),
        (("derive", "-o", "/proc/d.md"), "chainrule derive: error: -o /proc/d.md: directory /proc: cannot write there"),
        (("docs", "--out", str(afile)), f"chainrule docs: error: --out {afile} exists and is not a directory"),
        (("derive", ""), "chainrule derive: SpecError: empty model spec"),
    ]
    for argv, start in cases:
        rc, out, err = _cli(capsys, *argv)
        assert rc == 2 and out == "", argv
        assert _one_line(err).startswith(start), (argv, err)
    monkeypatch.setenv("CHAINRULE_CACHE_DIR", str(afile))
    rc, _, err = _cli(capsys, "demo", "--out", str(tmp_path / "d"))
    assert rc == 2
    assert _one_line(err) == f"chainrule demo: KernelCacheError: kernel cache directory {afile} is not a directory"


def test_cli_read_only_output_directory(capsys, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open = os.open

    def read_only(path, *a, **k):                   # as on a read-only mount (root ignores 0500)
        if str(path).startswith(str(ro)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *a, **k)
    monkeypatch.setattr(os, "open", read_only)
    rc, _, err = _cli(capsys, "derive", "perceptron", "-o", str(ro / "p.md"))
    monkeypatch.undo()
    assert rc == 2
    assert _one_line(err) == (f"chainrule derive: error: -o {ro / 'p.md'}: directory {ro}: cannot write "
                              f"there: Read-only file system")
    assert list(ro.iterdir()) == []


@pytest.mark.skipif(IS_ROOT, reason="root can write into a 0500 directory (simulated above)")
def test_cli_chmod_0500_output_directory(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        rc, _, err = _cli(capsys, "demo", "--out", str(ro))
        assert rc == 2 and "cannot write there: Permission denied" in _one_line(err)
    finally:
        os.chmod(ro, 0o700)


def test_cli_outputs_follow_the_umask(capsys, tmp_path):
    old = os.umask(0o022)
    try:
        assert _cli(capsys, "derive", "perceptron", "-o", str(tmp_path / "d.md"))[0] == 0
        assert _cli(capsys, "codegen", "perceptron", "-o", str(tmp_path / "m.py"))[0] == 0
        from chainrule.runtime.demo import run_demo
        res = run_demo(out_dir=str(tmp_path / "demo"), epochs=1, progress=False, stream=sys.stderr)
    finally:
        os.umask(old)
    for f in [tmp_path / "d.md", tmp_path / "m.py", Path(res["derivation"]), Path(res["code"])]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def _source_tree_with_demo_output(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "node_modules", "__pycache__",
                                                              "*.egg-info", "build", "dist"))
    (src / "chainrule-demo").mkdir(exist_ok=True)          # what `chainrule demo` leaves behind
    (src / "chainrule-demo" / "demo_model.py").write_text("x = 1\n")
    (src / "chainrule_extra").mkdir()
    (src / "chainrule_extra" / "__init__.py").write_text("")
    return src


def test_package_discovery_finds_only_chainrule(tmp_path):
    """The discovery pyproject.toml configures, run on a tree holding chainrule-demo/."""
    import tomllib

    import setuptools
    src = _source_tree_with_demo_output(tmp_path)
    find = tomllib.loads((src / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    found = setuptools.find_namespace_packages(where=str(src), include=find["include"])
    assert "chainrule" in found and "chainrule.runtime" in found
    assert all(p == "chainrule" or p.startswith("chainrule.") for p in found), found


@pytest.mark.slow
def test_wheel_contains_only_the_package(tmp_path):
    """`pip wheel .` after `chainrule demo` left chainrule-demo/ in the source tree (needs pip to
    fetch the build backend)."""
    src = _source_tree_with_demo_output(tmp_path)
    wheels = tmp_path / "whl"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(wheels)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    (whl,) = wheels.glob("chainrule-*.whl")
    with zipfile.ZipFile(whl) as zf:
        tops = {n.split("/")[0] for n in zf.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"chainrule"}, tops


# == the test summary =================================================================================
def test_skipped_latex_tests_are_announced_with_the_command_that_enables_them():
    from types import SimpleNamespace

    from latex_tools import katex_skip_summary
    skip = "Skipped: KaTeX checker unavailable: KaTeX is not installed: run `npm ci` in tests/latex_check"
    reports = [SimpleNamespace(longrepr=("t.py", 3, skip)) for _ in range(12)]
    reports.append(SimpleNamespace(longrepr=("t.py", 9, "Skipped: needs torch")))
    lines = katex_skip_summary(reports)
    assert lines[0].startswith("12 LaTeX tests SKIPPED: the KaTeX checker is unavailable (KaTeX is not installed")
    assert "Enable them with: (cd tests/latex_check && npm ci)" in lines[1]
    assert katex_skip_summary(reports[-1:]) == []
    ci = (ROOT / ".ci" / "run").read_text()
    assert "export CHAINRULE_REQUIRE_KATEX=1" in ci and "npm ci" in ci


# == property-based tests ===========================================================================
# Random layer-list specs -> build -> compile -> finite differences and an independent NumPy forward;
# random claim strings -> an answer or a clear ChainruleError. Compiling costs seconds per model, so
# the default run draws a handful of examples (derandomized: the same ones every run) and the
# `slow` variants draw many more.
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from chainrule.derive.layers import ACTIVATIONS, LOSSES

FAST = settings(max_examples=4, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
# no shrinking in the large runs: every shrink step compiles a model (minutes); the failing
# example is reported as drawn
MANY = settings(max_examples=60, deadline=None, derandomize=False, database=None,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.reuse, Phase.generate])


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _log_softmax(z):
    m = z.max(1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(1, keepdims=True))


# the NumPy meaning of each built-in name, written independently of the SymPy declarations
NP_LAYERS = {
    "identity": lambda z: z,
    "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
    "tanh": np.tanh,
    "relu": lambda z: np.maximum(z, 0.0),
    "leaky_relu": lambda z: np.where(z > 0, z, 0.01 * z),
    "softmax": _softmax,
    "log_softmax": _log_softmax,
}
NP_LOSSES = {   # name -> (per-example loss of (output, y), prediction of the output)
    "mse": (lambda p, y: ((p - y) ** 2).mean(1), None),
    "mae": (lambda p, y: np.abs(p - y).mean(1), None),
    "bce": (lambda p, y: (-(y * np.log(p) + (1 - y) * np.log(1 - p))).mean(1), None),
    "bce_logits": (lambda z, y: (np.logaddexp(0, z) - y * z).mean(1), NP_LAYERS["sigmoid"]),
    "cross_entropy": (lambda p, y: -(y * np.log(p)).sum(1), None),
    "softmax_cross_entropy": (lambda z, y: -(y * _log_softmax(z)).sum(1), _softmax),
    "nll": (lambda s, y: -(y * s).sum(1), np.exp),
}
# what a loss needs in front of it to be defined (probabilities, log-probabilities)
NEEDS = {"bce": "sigmoid", "cross_entropy": "softmax", "nll": "log_softmax"}


@st.composite
def layer_specs(draw, max_depth=3, max_width=4):
    """(spec, layers, loss): dense layers of width 1..max_width, optional activations, any loss."""
    loss = draw(st.sampled_from(sorted(LOSSES)))
    n_in = draw(st.integers(1, max_width))
    hidden = sorted(ACTIVATIONS) + ["softmax", "log_softmax"]
    layers = []
    for _ in range(draw(st.integers(1, max_depth))):
        layers.append(f"dense({draw(st.integers(1, max_width))})")
        if draw(st.booleans()):
            layers.append(draw(st.sampled_from(hidden)))
    simplex = LOSSES[loss]().simplex or loss == "softmax_cross_entropy"
    if layers[-1] in ("softmax", "log_softmax") and NEEDS.get(loss) != layers[-1]:
        layers.pop()
    if loss in NEEDS:
        if layers[-1] == NEEDS[loss]:
            layers.pop()
        if not layers[-1].startswith("dense"):
            layers.append(f"dense({draw(st.integers(1, max_width))})")
        layers.append(NEEDS[loss])
    if simplex:                                   # a probability over at least two classes
        last = max(k for k, item in enumerate(layers) if item.startswith("dense"))
        width = int(layers[last][6:-1])
        layers[last] = f"dense({max(width, 2)})"
    return " -> ".join([str(n_in), *layers, loss]), layers, loss


def _numpy_forward(layers, loss, params, x, y):
    h = x
    level = 0
    for item in layers:
        if item.startswith("dense"):
            level += 1
            h = h @ params[f"W{level}"].T + params[f"b{level}"]
        else:
            h = NP_LAYERS[item](h)
    per_example, prediction = NP_LOSSES[loss]
    return per_example(h, y).mean(), (prediction(h) if prediction else h)


def _check_spec(compiled_model, drawn):
    from chainrule.codegen.verify import check_gradients
    spec, layers, loss = drawn
    missing = {i for i in layers if not i.startswith("dense")} - set(NP_LAYERS) | ({loss} - set(NP_LOSSES))
    assert not missing, f"no NumPy reference for {missing}: add one to NP_LAYERS / NP_LOSSES"
    cm = compiled_model(spec)
    errors = check_gradients(cm.model, compiled=cm, seed=1)
    assert errors and max(e for _, e in errors) < 1e-5, (spec, errors)
    rng = np.random.default_rng(2)
    params = cm.init_params(3)
    for k in params:
        params[k] += 0.3 * rng.normal(size=params[k].shape)
    x, y = sample_batch(cm, batch=5, seed=4)
    cost, out = cm.forward(params, x, y)
    ref_cost, ref_out = _numpy_forward(layers, loss, params, x, y)
    np.testing.assert_allclose(cost, ref_cost, rtol=1e-10, atol=1e-12, err_msg=spec)
    np.testing.assert_allclose(out, ref_out, rtol=1e-10, atol=1e-12, err_msg=spec)
    np.testing.assert_allclose(cm.predict(params, x), ref_out, rtol=1e-10, atol=1e-12, err_msg=spec)


@FAST
@given(drawn=layer_specs(max_depth=2, max_width=3))
def test_random_specs_compile_and_match_finite_differences_and_numpy(compiled_model, drawn):
    _check_spec(compiled_model, drawn)


@pytest.mark.slow
@MANY
@given(drawn=layer_specs())
def test_many_random_specs(compiled_model, drawn):
    _check_spec(compiled_model, drawn)


CLAIM_MODEL = "3 -> dense(2) -> sigmoid -> dense(2) -> softmax_cross_entropy"


@pytest.fixture(scope="module")
def claim_model():
    from chainrule.derive import derive
    model = build_model(CLAIM_MODEL)
    return model, derive(model)


def claim_strings():
    names = ["x", "W1", "b1", "z1", "a1", "W2", "b2", "z2", "y2", "l2", "p2", "C", "d_z2", "d_a1",
             "b", "o", "i", "k", "B", "n_1", "exp", "log", "tanh", "sigmoid", "abs", "sqrt", "relu",
             "softplus", "step", "sign", "sum", "nope", "__import__", "lambda"]
    tokens = st.sampled_from(names + ["+", "-", "*", "/", "**", "^", "(", ")", "[", "]", ",", "0", "1",
                                      "2", "0.5", "1e3", "'", "=", " ", "\n", "9" * 40])
    read = st.builds(lambda t, i, j: f"{t}[{i},{j}]", st.sampled_from(["z2", "p2", "y2", "a1", "z1", "W2"]),
                     st.sampled_from(["b", "o", "i", "0", "1", "b+1", "o-1", "2"]),
                     st.sampled_from(["o", "b", "i", "k", "0", "1"]))
    atom = st.one_of(read, st.sampled_from(["B", "1", "2", "0", "n_1", "b", "o"]))
    expr = st.recursive(atom, lambda e: st.one_of(
        st.builds(lambda a, op, c: f"({a}) {op} ({c})", e, st.sampled_from(["+", "-", "*", "/", "**"]), e),
        st.builds(lambda f, a: f"{f}({a})", st.sampled_from(["exp", "log", "tanh", "sigmoid", "abs", "sqrt"]), e)),
        max_leaves=6)
    return st.one_of(expr, st.lists(tokens, max_size=12).map("".join), st.text(max_size=20))


def _claim_outcome(claim_model, tensor, claim):
    from chainrule.derive.verify import check_claim
    model, grads = claim_model
    try:
        result = check_claim(model, tensor, claim, grads=grads, points=1)
    except ChainruleError as e:
        assert str(e), "a ChainruleError must say what is wrong"
        return None
    assert isinstance(result.equal, bool)
    return result


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(tensor=st.sampled_from(["z2", "z1", "W2", "b1"]), claim=claim_strings())
def test_random_claims_get_an_answer_or_a_clear_error(claim_model, tensor, claim):
    _claim_outcome(claim_model, tensor, claim)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(tensor=st.sampled_from(["z2", "z1", "W2", "W1", "b1", "b2"]), claim=claim_strings())
def test_many_random_claims(claim_model, tensor, claim):
    _claim_outcome(claim_model, tensor, claim)


@pytest.mark.parametrize("claim", ["1/0", "log(0)", "(p2[b,o] - y2[b,o])/B + 1/0"])
def test_a_non_finite_claim_is_never_equal(claim_model, claim):
    result = _claim_outcome(claim_model, "z2", claim)
    assert result is None or not result.equal, f"{claim!r} was declared equal to dC/dz2"


def test_model_checkpoint_checks_its_path_before_the_first_epoch(net_of, tmp_path):
    from chainrule.runtime import ModelCheckpoint
    net = net_of(TANH)
    x, y = np.ones((6, 4)), np.zeros((6, 2))
    ck = ModelCheckpoint(str(tmp_path / "ck-{val_loss:.3f}.npz"))
    with pytest.raises(ChainruleError, match=r"ModelCheckpoint path .* cannot be filled in \(KeyError\('val_loss'\)\); "
                                             r"its fields can be: epoch, loss, lr, time"):
        net.fit(x, y, epochs=3, callbacks=[ck], progress=False)
    afile = tmp_path / "afile"
    afile.write_text("x")
    ck = ModelCheckpoint(str(afile / "ck-{epoch}.npz"))
    with pytest.raises(ChainruleError, match=f"ModelCheckpoint cannot save to {afile}/ck-1.npz: Not a directory"):
        net.fit(x, y, epochs=3, callbacks=[ck], progress=False)
    assert net.history is not None and len(net.history) == 0        # no epoch was spent


def test_user_layers_sharing_a_name_but_not_a_function_warn_on_load(tmp_path, kernel_cache_dir):
    from chainrule.derive.layers import Activation, Dense, sequential
    from chainrule.runtime import Network
    a = sequential(3, [Dense(2), Activation("act", lambda u: u ** 3), Dense(1)], "mse")
    b = sequential(3, [Dense(2), Activation("act", lambda u: u / 2), Dense(1)], "mse")
    na = Network(a, compiled=compile_model(a, cache_dir=kernel_cache_dir))
    nb = Network(b, compiled=compile_model(b, cache_dir=kernel_cache_dir), seed=1)
    assert na.spec == nb.spec == "3 -> dense(2) -> act -> dense(1) -> mse"
    na.save(tmp_path / "a.npz")
    with pytest.warns(RuntimeWarning, match="whose equations differ from this network's"):
        nb.load(tmp_path / "a.npz")
    np.testing.assert_array_equal(nb.params["W1"], na.params["W1"])
