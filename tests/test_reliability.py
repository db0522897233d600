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
    from chainrule.codegen import compiled
    monkeypatch.setattr(compiled, "render_plan", lambda plan, cache=True: "def forward(, x):\n    pass\n")
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
    model = _hostile_model(evil)
    src = render_module(model)
    tree = ast.parse(src)
    imports = sorted(a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                     for a in n.names)
    assert imports == ["math", "njit", "numpy"]
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
