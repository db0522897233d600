"""The on-disk kernel cache: one generated ``.py`` module per (model, dtype, versions).

* Location: ``$CHAINRULE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/chainrule/kernels``
  (``~/.cache/chainrule/kernels``).
* Key: sha256 of the model's equations (``srepr``), sizes, outputs, the dtype, the chainrule, Numba
  and NumPy versions and the code generator's own sources (so a change to a template invalidates).
* Header: the first line of each file is ``# chainrule-kernel key=<key> sha256=<hash of the rest>``.
  The loader recomputes the key from the model it is asked for and accepts the file only when both
  the key and the content hash match; anything else is regenerated, never trusted.
* Writes are atomic (temporary file in the same directory + ``os.replace``), mode 0600, and a module
  that does not compile is never written.
* Modules are imported from their path with importlib (never ``exec`` of a string read from disk),
  so Numba's ``cache=True`` keeps its compiled code in ``__pycache__`` inside the cache directory,
  for the next process.

Trust model: **the cache directory is code.** Whoever can write into it can run code as you the
next time a model is compiled, exactly as with Python's own ``__pycache__`` or ``site-packages``.
chainrule therefore keeps the directory private and checks it, as ssh does for its keys:

* it is created with mode 0700; an existing directory that is not owned by you, or that is
  writable by group or others, is refused with :class:`KernelCacheError` (fix it with
  ``chmod go-w DIR`` or point ``CHAINRULE_CACHE_DIR`` elsewhere); a path that is not a directory
  is refused too. When ``NUMBA_CACHE_DIR`` is set, Numba keeps its index and compiled code there
  instead of in ``__pycache__``: that directory must pass the same check.

What the header protects against: accidental damage (a truncated, half-written or bit-flipped
module) and a module belonging to another key (another model's module copied or renamed over an
entry, an entry left by another version): such a file is regenerated. A module whose header was
recomputed after an edit is *not* detected, and neither is a replaced file in ``__pycache__``
(Numba's index is a pickle and its data files hold machine code; Numba checks only the source
file's timestamp and size): detecting that would need a secret, and a key stored beside the cache
protects nothing. Against other users the protection is the directory's permissions, enforced
above; against code already running as you there is none (it could edit chainrule itself).
The parent directories are not checked: a parent writable by others (without the sticky bit) lets
them move the directory away and put their own in its place; the ownership check then refuses it.

A cache directory that cannot be written (read-only file system, a full disk, no permission) does
not stop anything: the module is compiled in memory, without Numba's on-disk cache, and one
:class:`KernelCacheWarning` says so.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import importlib.util
import linecache
import os
import stat
import sys
import tempfile
import types
import warnings
from pathlib import Path

from ..atomic import atomic_write_text
from ..derive.errors import ChainruleError, UnsupportedError

HEADER = "# chainrule-kernel key="
_CODEGEN_DIR = Path(__file__).resolve().parent
# errors that mean "this directory cannot hold the cache right now": fall back to memory
_UNWRITABLE = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, getattr(errno, "EDQUOT", -1)}


class KernelCacheError(ChainruleError, OSError):
    """The kernel cache directory is not usable safely (not a directory, not yours, writable by
    others): refused, since whatever is in it runs as you."""


class KernelCacheWarning(RuntimeWarning):
    """The kernel cache could not be written; kernels were compiled in memory instead."""


_warned: set = set()


def _warn_once(directory, why):
    key = str(directory)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(f"kernel cache {directory} is not writable ({why}): compiling the kernels in "
                  f"memory (not cached: the next process compiles them again)",
                  KernelCacheWarning, stacklevel=4)


def default_cache_dir() -> Path:
    env = os.environ.get("CHAINRULE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "chainrule" / "kernels"


# -- the directory ----------------------------------------------------------------------------------
def _check_owned_private(path: Path, what: str):
    """Refuse a directory that is not ours or is writable by group/others (POSIX only)."""
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise KernelCacheError(f"{what} {path} is not a directory")
    if os.name != "posix":
        return
    if st.st_uid != os.geteuid():
        raise KernelCacheError(
            f"{what} {path} is owned by uid {st.st_uid}, not by you (uid {os.geteuid()}): its "
            f"content would run as you; use a directory of your own (CHAINRULE_CACHE_DIR)")
    if st.st_mode & 0o022:
        who = {0o022: "group and others", 0o020: "group", 0o002: "others"}[st.st_mode & 0o022]
        raise KernelCacheError(
            f"{what} {path} is writable by {who} "
            f"(mode {stat.S_IMODE(st.st_mode):04o}): whoever can write there can run code as you; "
            f"fix it with `chmod go-w {path}` or use another CHAINRULE_CACHE_DIR")


def _probe(directory: Path) -> str | None:
    """None when a file can be created in ``directory``, else why not."""
    try:
        tempfile.TemporaryFile(dir=directory).close()
        return None
    except OSError as e:
        return e.strerror or str(e)


def prepare_cache_dir(cache_dir=None) -> tuple[Path, str | None]:
    """Create (0700) and check the cache directory; return (path, None) when it is writable, or
    (path, reason) when kernels must be compiled in memory. Raises :class:`KernelCacheError` for
    a directory that must not be used (see the module docstring)."""
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    what = "kernel cache directory"
    if not path.exists():
        if path.is_symlink():
            raise KernelCacheError(f"{what} {path} is a dangling symbolic link")
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except NotADirectoryError:
            raise KernelCacheError(f"{what} {path}: a parent of it is not a directory") from None
        except FileExistsError:
            pass
        except OSError as e:
            if e.errno in _UNWRITABLE:
                return path, f"cannot create it: {e.strerror}"
            raise KernelCacheError(f"{what} {path} cannot be created: {e.strerror or e}") from e
    _check_owned_private(path, what)
    numba_dir = _numba_cache_dir()
    if numba_dir is not None and numba_dir.exists():
        _check_owned_private(numba_dir, "Numba's cache directory (NUMBA_CACHE_DIR)")
    why = _probe(path)
    if why is not None:
        return path, why
    pycache = path / "__pycache__"        # where Numba's cache=True writes (InTreeCacheLocator)
    try:
        os.makedirs(pycache, mode=0o700, exist_ok=True)
    except OSError as e:
        return path, f"cannot create {pycache}: {e.strerror}"
    if numba_dir is None:
        _check_owned_private(pycache, what)
        why = _probe(pycache)
        if why is not None:
            return path, f"{pycache}: {why}"
    return path, None


def _numba_cache_dir() -> Path | None:
    """Where Numba's cache=True writes instead of beside the module, if anywhere: its setting once
    Numba is imported; before, the environment variable it will read (importing Numba only for
    this would put 0.3 s in front of a cold start's derivation)."""
    if "numba" not in sys.modules:
        value = os.environ.get("NUMBA_CACHE_DIR")
        return Path(value).expanduser() if value else None
    try:
        from numba.core import config
        value = config.CACHE_DIR
    except Exception:                      # pragma: no cover - numba layout changed
        value = os.environ.get("NUMBA_CACHE_DIR")
    return Path(value).expanduser() if value else None


# -- the key and the header ------------------------------------------------------------------------
def _codegen_fingerprint() -> str:
    """The code generator's own sources, and the primitives whose lowerings it copies into modules."""
    h = hashlib.sha256()
    # (and the engine's modules that shape a derived equation: a recurrence's time loops and
    # the delta elimination, rewrites and composition that give the adjoints)
    derive_dir = _CODEGEN_DIR.parent / "derive"
    sources = sorted(_CODEGEN_DIR.rglob("*")) + [derive_dir / f for f in (
        "primitives.py", "optimizers.py", "recurrence.py", "backprop.py", "deltas.py", "rewrites.py")]
    for p in sources:
        if p.suffix in (".py", ".j2") and "__pycache__" not in p.parts:
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def model_fingerprint(model) -> str:
    """sha256 of what defines a model's computation: sizes, tensors, outputs, cost, equations.

    Two models with the same fingerprint compute the same function of the same parameters (it does
    not depend on the model's name); the checkpoints record it to recognise their architecture."""
    import sympy as sp
    h = hashlib.sha256()
    parts = [
        repr(sorted((str(k), int(v)) for k, v in model.size_values.items())),
        repr([(t.name, t.role, t.init, tuple(map(str, t.shape))) for t in model.tensors.values()]),
        repr([t.name for t in model.outputs]), model.cost.name,
        # named constants (regularisation strengths) and declared projections (max-norm)
        repr(sorted((str(k), float(v)) for k, v in getattr(model, "constants", {}).items())),
        repr([sp.srepr(e.body) for e in getattr(model, "constraints", [])]),
        # running averages (buffers) and the evaluation forms of the tensors they replace
        repr([(e.out.name, sp.srepr(e.body)) for e in getattr(model, "buffer_updates", [])]),
        repr(sorted((k, sp.srepr(e.body)) for k, e in getattr(model, "eval_equations", {}).items())),
    ]
    for eq in model.equations:
        parts.append(eq.out.name + sp.srepr(sp.Tuple(*eq.indices)) + sp.srepr(eq.body))
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _chainrule_version() -> str:
    try:
        from importlib.metadata import version
        return version("chainrule")
    except Exception:
        return "dev"


def _numba_version() -> str:
    """Numba's version from its package metadata: importing Numba (0.3 s, SciPy with it) is left to
    the first kernel, so that a cold start hands its module to the compile worker sooner."""
    try:
        from importlib.metadata import version
        return version("numba")
    except Exception:                      # pragma: no cover - no metadata (a source checkout)
        import numba
        return numba.__version__


def _hash(parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


def cache_key(model, dtype: str, extra: str = "", fingerprint: str | None = None) -> str:
    """``extra``: what else shapes the module (the optimiser whose update train_step fuses);
    ``fingerprint``: the model's :func:`model_fingerprint`, when the caller has it already."""
    import numpy
    return _hash(["chainrule-kernel-v2", dtype, _chainrule_version(), _numba_version(), numpy.__version__,
                  _codegen_fingerprint(), fingerprint or model_fingerprint(model), extra])


# -- model descriptions -----------------------------------------------------------------------------
def recipe_key(recipe: str, dtype: str, extra: str = "") -> str:
    """The key of the model description (see :mod:`chainrule.codegen.description`) of the model
    ``build_model(recipe)`` builds (a built-in name or a layer-list spec), known before anything is
    built: the recipe, the dtype, ``extra`` (the optimiser, the module's options), the versions and
    the sources of the derivation engine and of the code generator, which decide what the recipe
    builds and what is generated from it."""
    import numpy
    return _hash(["chainrule-description-v1", recipe, dtype, extra, _chainrule_version(), _numba_version(),
                  numpy.__version__, _sympy_release(), _codegen_fingerprint(), _derive_fingerprint()])


def _sympy_release() -> str:
    """SymPy's version file, read without importing SymPy (which builds the model a recipe names)."""
    import importlib.util
    spec = importlib.util.find_spec("sympy")
    if spec is None or not spec.origin:
        return "no sympy"
    try:
        return Path(spec.origin).with_name("release.py").read_text()
    except OSError:
        return "sympy " + spec.origin


def _description_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"model_{key[:32]}.json"


def load_description(key: str, cache_dir=None) -> str | None:
    """The verified text of the description cached for ``key``, or None (missing, damaged, another
    key's, an unwritable directory)."""
    cache_dir, unwritable = prepare_cache_dir(cache_dir)
    if unwritable is not None:
        return None
    return read_verified(_description_path(cache_dir, key), key)


def save_description(key: str, text: str, cache_dir=None):
    """Write a description atomically (0600, with the verified header); an unwritable directory
    only costs the saving."""
    cache_dir, unwritable = prepare_cache_dir(cache_dir)
    if unwritable is not None:
        return
    try:
        atomic_write_text(_description_path(cache_dir, key), with_header(text, key), mode=0o600)
    except OSError as e:
        if e.errno not in _UNWRITABLE:
            raise


def with_header(source: str, key: str) -> str:
    digest = hashlib.sha256(source.encode("utf-8")).hexdigest()
    return f"{HEADER}{key} sha256={digest}\n{source}"


def read_verified(path: Path, key: str) -> str | None:
    """The module's source when ``path`` is a regular file whose header names ``key`` and whose
    content matches the header's hash; None otherwise (missing, damaged, another key's module)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        data = Path(path).read_bytes()
    except OSError:
        return None
    first, sep, rest = data.partition(b"\n")
    if not sep or not first.startswith(HEADER.encode()):
        return None
    fields = first[len(HEADER):].decode("ascii", "replace").split()
    if len(fields) != 2 or not fields[1].startswith("sha256="):
        return None
    if fields[0] != key or hashlib.sha256(rest).hexdigest() != fields[1][len("sha256="):]:
        return None
    try:
        return rest.decode("utf-8")
    except UnicodeDecodeError:
        return None


def verify_file(path: Path, key: str) -> bool:
    """True when the file exists, names ``key`` in its header and its content matches its hash."""
    return read_verified(path, key) is not None


def check_compiles(source: str, filename: str):
    """Refuse (UnsupportedError) a generated module that is not valid Python, before it is cached."""
    try:
        compile(source, filename, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:
        line = getattr(e, "lineno", None)
        text = (getattr(e, "text", None) or "").strip()
        raise UnsupportedError(f"codegen: the generated module does not compile ({e.msg if hasattr(e, 'msg') else e}"
                               f"{f' at line {line}: {text}' if line else ''}); it was not cached") from e


# -- importing ---------------------------------------------------------------------------------------
def import_path(path: Path, module_name: str):
    """Import a generated module from its file (re-importing when the file changed)."""
    path = Path(path).resolve()
    stamp = (path.stat().st_mtime_ns, path.stat().st_size)
    mod = sys.modules.get(module_name)
    if mod is not None and getattr(mod, "__file__", None) == str(path) \
            and getattr(mod, "_chainrule_stamp", None) == stamp:
        return mod
    spec = importlib.util.spec_from_file_location(module_name, str(path))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import generated kernels from {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    mod._chainrule_stamp = stamp
    return mod


def import_source(source: str, module_name: str, filename: str):
    """A module from source generated in this process (the fallback when nothing can be written).

    The source comes from the renderer, never from disk; it is registered with ``linecache`` so
    that tracebacks still show the generated lines."""
    code = compile(source, filename, "exec", dont_inherit=True)
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    mod = types.ModuleType(module_name)
    mod.__file__ = filename
    sys.modules[module_name] = mod
    try:
        exec(code, mod.__dict__)          # noqa: S102 - our own freshly rendered source
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    mod._chainrule_stamp = None
    return mod


def load_in_memory(key: str, render):
    """(module, filename, source): ``render(cache=False)`` compiled without touching the disk."""
    source = render(cache=False)
    filename = f"<chainrule kernels {key[:32]} (in memory)>"
    check_compiles(source, filename)
    return import_source(source, f"chainrule_kernels_mem_{key[:32]}", filename), filename, source


def fall_back_in_memory(err: OSError, key, render, directory):
    """After ``err`` from a kernel's first call (Numba writing its cache), the in-memory module as
    (module, label, source), with one warning; None when ``err`` is not a cache-write failure."""
    if key is None or render is None or getattr(err, "errno", None) not in _UNWRITABLE:
        return None
    _warn_once(directory, f"Numba could not write its cache: {err.strerror or err}")
    return load_in_memory(key, render)


def cached_source(key: str, cache_dir=None) -> str | None:
    """The verified source cached for ``key``, or None (missing, damaged, unwritable directory)."""
    cache_dir, unwritable = prepare_cache_dir(cache_dir)
    if unwritable is not None:
        return None
    return read_verified(cache_dir / f"chainrule_{key[:32]}.py", key)


def module_name(key: str) -> str:
    """The name the cached module of ``key`` is imported under (here and in a compile worker)."""
    return f"chainrule_kernels_{key[:32]}"


def load_or_generate(key: str, render, cache_dir=None, on_written=None):
    """Return (module, path, source, hit): the cached module for ``key``, generated by
    ``render(cache=True)`` when missing, damaged or another key's. When the directory cannot be
    written, ``render(cache=False)`` is compiled in memory (``path`` is then a ``<...>`` label) and
    one :class:`KernelCacheWarning` is issued. ``on_written(path, name)`` is called when a module
    was just generated into the cache, before it is imported here (a compile worker can start on
    it meanwhile)."""
    cache_dir, unwritable = prepare_cache_dir(cache_dir)
    if unwritable is not None:
        _warn_once(cache_dir, unwritable)
        module, label, source = load_in_memory(key, render)
        return module, label, source, False
    path = cache_dir / f"chainrule_{key[:32]}.py"
    source = read_verified(path, key)
    hit = source is not None
    if not hit:
        source = render(cache=True)
        check_compiles(source, str(path))
        try:
            atomic_write_text(path, with_header(source, key), mode=0o600)
        except OSError as e:
            if e.errno not in _UNWRITABLE:
                raise
            _warn_once(cache_dir, e.strerror or str(e))
            module, label, source = load_in_memory(key, render)
            return module, label, source, False
        if read_verified(path, key) != source:
            raise OSError(f"kernel cache: could not write a valid module at {path}")
        if on_written is not None:
            on_written(path, module_name(key))
    try:
        module = import_path(path, module_name(key))
    except BaseException:
        if not hit:                      # never leave a module that does not import in the cache
            try:
                os.unlink(path)
            except OSError:
                pass
        raise
    return module, path, source, hit


# -- derived documents ------------------------------------------------------------------------------
def _derive_fingerprint() -> str:
    """The derivation engine's own sources: a change to any of them may change a derivation."""
    h = hashlib.sha256()
    for p in sorted((_CODEGEN_DIR.parent / "derive").rglob("*.py")):
        if "__pycache__" not in p.parts:
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def cached_text(model, kind: str, make, cache_dir=None) -> str:
    """The text ``make()`` derives for ``model`` (a model, or its :func:`model_fingerprint`, which
    a cached description knows) (``kind``: e.g. "derivation.md"), derived once and
    then read from the cache directory, keyed like the kernels: by the model's fingerprint, the
    chainrule version and the derivation engine's sources, with the same verified header (a
    damaged or foreign file is derived again). An unwritable directory only costs the saving."""
    fingerprint = model if isinstance(model, str) else model_fingerprint(model)
    key = _hash(["chainrule-doc-v1", kind, _chainrule_version(), _derive_fingerprint(), fingerprint])
    cache_dir, unwritable = prepare_cache_dir(cache_dir)
    path = cache_dir / f"doc_{key[:32]}_{''.join(c if c.isalnum() else '_' for c in kind)[:24]}"
    text = None if unwritable else read_verified(path, key)
    if text is not None:
        return text
    text = make()
    if unwritable is None:
        try:
            atomic_write_text(path, with_header(text, key), mode=0o600)
        except OSError as e:
            if e.errno not in _UNWRITABLE:
                raise
    return text
