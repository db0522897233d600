"""Reading parameter files (``.npz`` + JSON metadata) safely: validate first, allocate after.

A checkpoint is a zip archive of ``.npy`` members: one per parameter, plus ``__meta__`` (a JSON
string, see :meth:`chainrule.runtime.Network.save`). :func:`inspect_checkpoint` reads only the
archive's directory and each member's ``.npy`` header (names, shapes, dtypes: a few hundred bytes
each) and checks them against the metadata and against the sizes the members really have; nothing
is allocated for the arrays until every check has passed and the caller has compared the declared
shapes with its network. Pickled (object) arrays, members the metadata does not declare, shapes
that disagree with it, and malformed metadata are refused with a :class:`CheckpointError` saying
what is wrong.
"""
from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np

from .errors import CheckpointError

FORMAT = "chainrule-params"
FORMAT_VERSION = 1
META = "__meta__"
MAX_META_BYTES = 1 << 20          # the JSON metadata of any real network is a few kB
MAX_RANK = 8
FLOAT_DTYPES = ("float32", "float64")
_JSON_TYPE = {int: "integer", str: "string", list: "array", dict: "object"}


@dataclass
class Member:
    name: str
    info: zipfile.ZipInfo
    shape: tuple
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class Checkpoint:
    """What a parameter file declares, read without loading its arrays."""

    path: str
    members: dict                       # name -> Member (parameters only)
    meta: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)   # name -> Member: the optimiser's state arrays
    buffers: dict = field(default_factory=dict)  # name -> Member: running averages (batch norm)
    callbacks: dict = field(default_factory=dict)  # name -> Member: early stopping's best weights

    @property
    def shapes(self) -> dict:
        return {k: m.shape for k, m in self.members.items()}

    def read_arrays(self, state=False, buffers=False, callbacks=False) -> dict:
        """The arrays (allocated now, after validation); each one's size is already known.
        ``state``: the optimiser's state arrays instead of the parameters; ``buffers``: the
        running averages; ``callbacks``: the callbacks' arrays (early stopping's best weights)."""
        out = {}
        members = (self.state if state else self.buffers if buffers
                   else self.callbacks if callbacks else self.members)
        try:
            with zipfile.ZipFile(self.path) as zf:
                for name, m in members.items():
                    with zf.open(m.info) as f:
                        out[name] = np.lib.format.read_array(f, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"{self.path}: cannot read the arrays: {e}") from e
        for name, m in members.items():
            if out[name].shape != m.shape:           # pragma: no cover - header checked above
                raise CheckpointError(f"{self.path}: array {name} changed while reading")
        return out


STATE_PREFIX = "__opt__/"
BUFFER_PREFIX = "__buf__/"
CALLBACK_PREFIX = "__cb__/"


def _header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: str):
    fmt = np.lib.format
    try:
        with zf.open(info) as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = fmt.read_array_header_2_0(f)
            else:
                raise ValueError(f".npy format version {version} is not supported")
            offset = f.tell()
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, SyntaxError) as e:
        raise CheckpointError(f"{path}: member {info.filename} is not a readable .npy array: {e}") from e
    return tuple(shape), bool(fortran), np.dtype(dtype), offset


def inspect_checkpoint(path) -> Checkpoint:
    """Open ``path``, read every member's header and the metadata, and validate them (see the
    module docstring). Raises ``FileNotFoundError`` for a missing file, else ``CheckpointError``."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no parameter file at {path}")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable .npz parameter file: {e}") from e
    with zf:
        members, meta = {}, {}
        for info in zf.infolist():
            if info.is_dir() or not info.filename.endswith(".npy"):
                raise CheckpointError(f"{path}: unexpected member {info.filename!r} (a parameter file "
                                      f"holds only .npy arrays)")
            name = info.filename[:-4]
            if name in members or (name == META and meta):
                raise CheckpointError(f"{path}: member {info.filename!r} appears twice")
            shape, fortran, dtype, offset = _header(zf, info, path)
            if dtype.hasobject:
                raise CheckpointError(f"{path}: array {name} holds Python objects (a pickle), which "
                                      f"are never loaded")
            if len(shape) > MAX_RANK or any(not isinstance(n, int) or n < 0 for n in shape):
                raise CheckpointError(f"{path}: array {name} has an invalid shape {shape}")
            m = Member(name, info, shape, dtype)
            if info.file_size != offset + m.nbytes:
                raise CheckpointError(f"{path}: array {name} declares shape {shape} {dtype} "
                                      f"({m.nbytes} bytes) but its member holds "
                                      f"{info.file_size - offset} bytes of data")
            if name == META:
                if shape != () or dtype.kind != "U" or m.nbytes > MAX_META_BYTES:
                    raise CheckpointError(f"{path}: malformed metadata: {META} must be one JSON "
                                          f"string of at most {MAX_META_BYTES} bytes, got shape "
                                          f"{shape} {dtype}")
                with zf.open(info) as f:
                    text = str(np.lib.format.read_array(f, allow_pickle=False))
                meta = _parse_meta(text, path)
                continue
            if dtype.kind != "f":
                raise CheckpointError(f"{path}: array {name} has dtype {dtype}; parameters are "
                                      f"floating-point arrays")
            members[name] = m
    if meta:
        declared = {**meta["param_shapes"], **meta["state_shapes"], **meta["buffer_shapes"],
                    **meta["callback_shapes"]}
        undeclared = sorted(set(members) - set(declared))
        absent = sorted(set(declared) - set(members))
        problems = []
        if undeclared:
            problems.append(f"holds array{'s' if len(undeclared) > 1 else ''} "
                            f"{', '.join(undeclared)} that the metadata does not declare")
        if absent:
            problems.append(f"lacks declared parameter{'s' if len(absent) > 1 else ''} "
                            f"{', '.join(absent)}")
        problems += [f"array {k} has shape {members[k].shape} but the metadata declares {declared[k]}"
                     for k in sorted(set(members) & set(declared)) if members[k].shape != declared[k]]
        if problems:
            raise CheckpointError(f"{path} is inconsistent: " + "; ".join(problems))
    state = {k: members.pop(k) for k in list(members) if k.startswith(STATE_PREFIX)}
    buffers = {k: members.pop(k) for k in list(members) if k.startswith(BUFFER_PREFIX)}
    callbacks = {k: members.pop(k) for k in list(members) if k.startswith(CALLBACK_PREFIX)}
    return Checkpoint(path, members, meta, state, buffers, callbacks)


def _parse_meta(text: str, path: str) -> dict:
    def bad(why):
        return CheckpointError(f"{path}: malformed metadata: {why}")
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{path}: unreadable metadata (not JSON): {e}") from e
    if not isinstance(meta, dict):
        raise bad(f"expected a JSON object, got a JSON {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a chainrule parameter file (format "
                              f"{meta.get('format')!r}, expected {FORMAT!r})")
    required = {"version": int, "model": str, "dtype": str, "param_names": list, "param_shapes": dict}
    for key, typ in required.items():
        if key not in meta:
            raise bad(f"{key!r} is missing")
        if not isinstance(meta[key], typ) or isinstance(meta[key], bool):
            raise bad(f"{key!r} should be a JSON {_JSON_TYPE[typ]}, got {json.dumps(meta[key])[:80]}")
    if meta["version"] > FORMAT_VERSION or meta["version"] < 1:
        raise bad(f"format version {meta['version']} is not supported (this chainrule reads "
                  f"version {FORMAT_VERSION})")
    if meta["dtype"] not in FLOAT_DTYPES:
        raise bad(f"dtype {meta['dtype']!r} is not one of {', '.join(FLOAT_DTYPES)}")
    for key in ("spec", "task", "loss", "architecture"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise bad(f"{key!r} should be a string or null, got {json.dumps(meta[key])[:80]}")
    names = meta["param_names"]
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise bad("'param_names' should be distinct strings")
    shapes = {}
    for name, shape in meta["param_shapes"].items():
        if (not isinstance(shape, list) or len(shape) > MAX_RANK
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise bad(f"the shape of {name} should be a list of non-negative integers, got "
                      f"{json.dumps(shape)[:80]}")
        shapes[name] = tuple(shape)
    if set(shapes) != set(names):
        raise bad(f"'param_names' {names} and 'param_shapes' {sorted(shapes)} name different parameters")
    meta["param_shapes"] = shapes
    if not isinstance(meta.get("callbacks", {}), dict) or not all(
            isinstance(v, dict) for v in meta.get("callbacks", {}).values()):
        raise bad("'callbacks' should be a JSON object of objects")
    # training state (optional): the optimiser's state arrays, named "__opt__/<param>/<state>";
    # running averages (optional): "__buf__/<buffer>"; callbacks' arrays: "__cb__/<key>/<name>"
    for key, prefix, what in (("state_shapes", STATE_PREFIX, "optimizer state"),
                              ("buffer_shapes", BUFFER_PREFIX, "buffer"),
                              ("callback_shapes", CALLBACK_PREFIX, "callback state")):
        entries = meta.get(key, {})
        if not isinstance(entries, dict):
            raise bad(f"{key!r} should be a JSON object")
        checked = {}
        for name, shape in entries.items():
            if (not isinstance(name, str) or not name.startswith(prefix) or not isinstance(shape, list)
                    or len(shape) > MAX_RANK
                    or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
                raise bad(f"{what} entry {str(name)[:40]!r}: {json.dumps(shape)[:80]}")
            checked[name] = tuple(shape)
        meta[key] = checked
    return meta
