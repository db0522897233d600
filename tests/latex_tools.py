"""Test helpers that check LaTeX with KaTeX (through node) and pull math out of Markdown.

Usage from a test::

    from latex_tools import extract_math, katex_errors, need_katex

    @pytest.mark.latex
    def test_my_equations_render():
        need_katex()                       # skip (or fail in CI) when node/KaTeX are missing
        items = [(eq, True) for eq in my_display_equations] + extract_math(markdown_text)
        assert katex_errors(items) == []   # [(latex, error message), ...] for every failure

The KaTeX side lives in ``tests/latex_check`` (``render.js`` + a pinned ``katex``);
install it with ``cd tests/latex_check && npm ci``.  ``katex_errors`` starts node once
for the whole batch, so pass everything in one call.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterable, Sequence

LATEX_CHECK_DIR = Path(__file__).resolve().parent / "latex_check"
RENDER_JS = LATEX_CHECK_DIR / "render.js"
KATEX_PACKAGE_JSON = LATEX_CHECK_DIR / "node_modules" / "katex" / "package.json"

#: Set to 1 (``.ci/run`` does) to make ``need_katex`` fail instead of skip when
#: node or KaTeX is missing, so CI cannot go green by skipping every LaTeX check.
REQUIRE_ENV = "CHAINRULE_REQUIRE_KATEX"
#: Optional override for the node executable.
NODE_ENV = "CHAINRULE_NODE"

DEFAULT_TIMEOUT = 120.0


class KatexUnavailable(RuntimeError):
    """node or the KaTeX package is not installed, or render.js could not run."""


def _node() -> str | None:
    return os.environ.get(NODE_ENV) or shutil.which("node")


@functools.lru_cache(maxsize=None)
def _availability() -> str | None:
    """None when the checker works, else a reason why it does not."""
    node = _node()
    if node is None:
        return "node is not on PATH"
    if not RENDER_JS.is_file():
        return f"{RENDER_JS} is missing"
    if not KATEX_PACKAGE_JSON.is_file():
        return f"KaTeX is not installed: run `npm ci` in {LATEX_CHECK_DIR}"
    try:
        proc = subprocess.run(
            [node, str(RENDER_JS)],
            input='[{"latex": "x", "display": false}]',
            capture_output=True,
            text=True,
            timeout=60,
            cwd=LATEX_CHECK_DIR,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"running render.js failed: {exc}"
    if proc.returncode != 0:
        return f"render.js exited {proc.returncode}: {proc.stderr.strip()}"
    try:
        if json.loads(proc.stdout) != [{"ok": True, "error": None}]:
            return f"render.js gave unexpected output: {proc.stdout.strip()!r}"
    except ValueError:
        return f"render.js gave non-JSON output: {proc.stdout.strip()!r}"
    return None


def katex_available() -> bool:
    """True when node and the pinned KaTeX are installed and render.js works."""
    return _availability() is None


def need_katex() -> None:
    """Call at the start of a test that needs KaTeX.

    Skips the test when the checker is unavailable, unless ``CHAINRULE_REQUIRE_KATEX=1``
    is set (as in CI), in which case the test fails with the reason.
    """
    import pytest

    reason = _availability()
    if reason is None:
        return
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"KaTeX checker required ({REQUIRE_ENV}) but unavailable: {reason}")
    pytest.skip(f"KaTeX checker unavailable: {reason}")


def _normalise(items: Iterable[tuple[str, bool] | str]) -> list[tuple[str, bool]]:
    out = []
    for item in items:
        if isinstance(item, str):
            out.append((item, False))
        else:
            latex, display = item
            out.append((str(latex), bool(display)))
    return out


def katex_results(
    items: Iterable[tuple[str, bool] | str], timeout: float = DEFAULT_TIMEOUT
) -> list[tuple[str, bool, str | None]]:
    """Render every item; return (latex, ok, error) for each, in input order.

    ``items`` are (latex, display) pairs; a bare string means inline math.
    Raises KatexUnavailable if node/KaTeX cannot run, RuntimeError on a protocol error.
    """
    batch = _normalise(items)
    if not batch:
        return []
    reason = _availability()
    if reason is not None:
        raise KatexUnavailable(reason)
    payload = json.dumps([{"latex": latex, "display": display} for latex, display in batch])
    try:
        proc = subprocess.run(
            [_node(), str(RENDER_JS)],
            input=payload,
            capture_output=True,
            text=True,
            encoding="utf-8",
            timeout=timeout,
            cwd=LATEX_CHECK_DIR,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(
            f"KaTeX check of {len(batch)} equations timed out after {timeout}s"
        ) from exc
    if proc.returncode != 0:
        raise RuntimeError(f"render.js exited {proc.returncode}: {proc.stderr.strip()}")
    results = json.loads(proc.stdout)
    if not isinstance(results, list) or len(results) != len(batch):
        raise RuntimeError(
            f"render.js returned {len(results) if isinstance(results, list) else results!r} "
            f"results for {len(batch)} equations"
        )
    return [
        (latex, bool(res.get("ok")), res.get("error"))
        for (latex, _display), res in zip(batch, results)
    ]


def katex_errors(
    items: Iterable[tuple[str, bool] | str], timeout: float = DEFAULT_TIMEOUT
) -> list[tuple[str, str]]:
    """Return (latex, error message) for every item KaTeX rejects; [] when all render.

    ``items`` are (latex, display) pairs (``display`` True for block/display math).
    node runs once for the whole batch.
    """
    return [
        (latex, error or "unknown KaTeX error")
        for latex, ok, error in katex_results(items, timeout=timeout)
        if not ok
    ]


def format_katex_errors(errors: Sequence[tuple[str, str]]) -> str:
    """Human-readable report of ``katex_errors`` output, for assertion messages."""
    lines = [f"{len(errors)} equation(s) rejected by KaTeX:"]
    for latex, error in errors:
        lines.append(f"  latex: {latex!r}\n  error: {error}")
    return "\n".join(lines)


def assert_katex_valid(
    items: Iterable[tuple[str, bool] | str], timeout: float = DEFAULT_TIMEOUT
) -> None:
    """AssertionError listing every equation KaTeX rejects."""
    errors = katex_errors(items, timeout=timeout)
    assert not errors, format_katex_errors(errors)


# --------------------------------------------------------------------------- Markdown

_FENCE_OPEN = re.compile(r"^ {0,3}(`{3,}|~{3,})[ \t]*([^\s`]*).*$")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def extract_math(markdown: str) -> list[tuple[str, bool]]:
    """All math in GitHub-flavoured Markdown, as (latex, display) pairs in document order.

    Recognised (GitHub's math syntax):

    * ```` ```math ```` (or ``~~~math``) fenced blocks            -> display
    * ``$$ ... $$`` blocks, on one line or spanning lines       -> display
    * ``$ ... $`` inline: no space just inside either ``$``, the closing ``$``
      not followed by a digit, not across a blank line          -> inline
    * ``$`...`$`` inline                                         -> inline

    Ignored: other fenced code blocks, inline code spans, and ``\\$`` escapes, so
    prices such as "$5 and $10" and shell snippets are not mistaken for math.
    (Indented code blocks are not recognised; fence code that contains ``$``.)
    """
    found: list[tuple[str, bool]] = []
    prose: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE_OPEN.match(lines[i])
        if m is None:
            prose.append(lines[i])
            i += 1
            continue
        fence, info = m.group(1), m.group(2).lower()
        if fence[0] == "~" or "`" not in lines[i][m.end(1):]:
            found.extend(_prose_math("\n".join(prose)))
            prose = []
            close = re.compile(r"^ {0,3}" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}[ \t]*$")
            body = []
            i += 1
            while i < len(lines) and not close.match(lines[i]):
                body.append(lines[i])
                i += 1
            i += 1  # the closing fence (or past the end)
            if info == "math":
                latex = "\n".join(body).strip()
                if latex:
                    found.append((latex, True))
            continue
        prose.append(lines[i])
        i += 1
    found.extend(_prose_math("\n".join(prose)))
    return found


def _find_unescaped(text: str, needle: str, start: int) -> int:
    """Index of ``needle`` at or after ``start`` not preceded by an odd number of backslashes."""
    while True:
        j = text.find(needle, start)
        if j < 0:
            return -1
        k = j
        while k > 0 and text[k - 1] == "\\":
            k -= 1
        if (j - k) % 2 == 0:
            return j
        start = j + 1


def _inline_close(text: str, start: int) -> int:
    """Closing ``$`` of inline math whose content starts at ``start``, or -1."""
    limit = _BLANK_LINE.search(text, start)
    end = limit.start() if limit else len(text)
    j = start
    while True:
        j = _find_unescaped(text, "$", j)
        if j < 0 or j >= end:
            return -1
        if j > start and not text[j - 1].isspace() and not (
            j + 1 < len(text) and text[j + 1].isdigit()
        ):
            return j
        j += 1


def _prose_math(text: str) -> list[tuple[str, bool]]:
    found: list[tuple[str, bool]] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2  # Markdown escape, e.g. \$ or \`
            continue
        if c == "`":
            run = len(text[i:]) - len(text[i:].lstrip("`"))
            ticks = text[i : i + run]
            # a code span: the next run of exactly the same number of backticks
            m = re.compile(r"(?<!`)" + re.escape(ticks) + r"(?!`)").search(text, i + run)
            i = m.end() if m else i + run
            continue
        if c != "$":
            i += 1
            continue
        if text.startswith("$$", i):
            j = _find_unescaped(text, "$$", i + 2)
            if j >= 0:
                latex = text[i + 2 : j].strip()
                if latex:
                    found.append((latex, True))
                i = j + 2
            else:
                i += 2
            continue
        if text.startswith("$`", i):
            m = re.match(r"\$(`+)(.+?)(?<!`)\1\$", text[i:], re.S)
            if m:
                found.append((m.group(2).strip(), False))
                i += m.end()
                continue
        if i + 1 < n and not text[i + 1].isspace():
            j = _inline_close(text, i + 1)
            if j >= 0:
                found.append((text[i + 1 : j], False))
                i = j + 1
                continue
        i += 1
    return found


# --------------------------------------------------------------------------- test summary

ENABLE_COMMAND = "(cd tests/latex_check && npm ci)"


def katex_skip_summary(skipped_reports) -> list[str]:
    """Lines for the end of a test run when LaTeX tests were skipped for want of KaTeX ([] if none).

    ``skipped_reports`` are pytest's skipped test reports (``terminalreporter.stats["skipped"]``).
    """
    reasons = []
    for rep in skipped_reports:
        longrepr = getattr(rep, "longrepr", None)
        text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        if "KaTeX checker unavailable" in text:
            reasons.append(text.split("KaTeX checker unavailable:", 1)[1].strip())
    if not reasons:
        return []
    return [
        f"{len(reasons)} LaTeX test{'s' if len(reasons) > 1 else ''} SKIPPED: the KaTeX checker is "
        f"unavailable ({reasons[0]}).",
        f"Enable them with: {ENABLE_COMMAND}   (CI sets {REQUIRE_ENV}=1, so they cannot skip there)",
    ]
