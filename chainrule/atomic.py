"""Atomic file writes: readers see the old file or the new one, never a partial one.

Used for kernel-cache entries, checkpoints and the documents the CLI writes.
"""
from __future__ import annotations

import os
import tempfile


def atomic_write(path, write):
    """Call ``write(fileobj)`` (binary) on a temporary file beside ``path``, fsync, then replace."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path, text: str):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
