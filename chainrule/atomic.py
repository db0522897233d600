"""Atomic file writes: readers see the old file or the new one, never a partial one.

Used for kernel-cache entries, checkpoints and the documents the CLI writes.

The new content goes to a temporary file beside the target, named
``.<target name>.<pid>.<random>.tmp``, which is fsynced and then renamed over the target. A process
killed in the middle of a write (SIGKILL, power loss) leaves the target intact but cannot remove its
temporary file: the next write to the same target removes the temporaries of that target whose
writer is no longer running (or that are older than a day, e.g. written from another host).

``mode`` is the permission of the new file, masked by the umask as for ``open()``: the default
0o666 gives the usual 0o644 under umask 022 (documents, checkpoints); the kernel cache passes 0o600.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import time

STALE_AGE = 24 * 3600           # seconds after which a temporary of a live-looking pid is stale too


def _tmp_prefix(path: str) -> str:
    return "." + os.path.basename(path) + "."


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                # EPERM: it exists (another user's process)
        return True
    return True


def clean_stale_temporaries(path) -> list[str]:
    """Remove leftover temporaries of ``path`` (our own naming only); return the removed paths."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    prefix = _tmp_prefix(path)
    # ours: <pid>.<12 hex digits>; older versions used mkstemp's 8 characters [a-z0-9_]
    pattern = re.compile(re.escape(prefix) + r"(?:(\d+)\.[0-9a-f]{12}|[a-z0-9_]{8})\.tmp\Z")
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        m = pattern.match(name)
        if not m:
            continue
        full = os.path.join(directory, name)
        try:
            st = os.lstat(full)
        except OSError:
            continue
        pid = int(m.group(1)) if m.group(1) else None
        if pid == os.getpid():
            continue                     # one of ours, possibly being written by another thread
        stale = (pid is not None and not _pid_alive(pid)) or now - st.st_mtime > STALE_AGE
        if stale:
            try:
                os.unlink(full)
                removed.append(full)
            except OSError:
                pass
    return removed


def probe_writable(directory) -> str | None:
    """None when a file can be created in ``directory`` (created if missing), else the reason
    (the system's message, e.g. ``Read-only file system``)."""
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        return os.strerror(errno.ENOTDIR)
    probe = os.path.join(directory, f".chainrule-probe-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.makedirs(directory, exist_ok=True)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        return e.strerror or str(e)
    return None


def atomic_write(path, write, mode: int = 0o666):
    """Call ``write(fileobj)`` (binary) on a temporary file beside ``path``, fsync, then replace.

    ``mode`` is the new file's permission before the umask (0o666: follow the umask; 0o600: private).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    clean_stale_temporaries(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    while True:
        tmp = os.path.join(directory, f"{_tmp_prefix(path)}{os.getpid()}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, mode)
            break
        except FileExistsError:      # pragma: no cover - 48 random bits collided
            continue
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


def atomic_write_text(path, text: str, mode: int = 0o666):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")), mode=mode)
