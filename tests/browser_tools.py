"""Test helpers that open the generated site in headless Chromium, from file://, with the network off.

``check_pages(site, pages)`` writes a harness page into ``site`` that loads every page in an iframe
(``--allow-file-access-from-files`` lets it read their documents), waits for all of them, and reports
per page: formulas found, formulas KaTeX rendered, error nodes, ``$`` left in the text outside math
and code, whether an SVG graph is present; Chromium's console (every message a page logs, uncaught
errors included) is read from its log. ``need_chromium()`` skips without Chromium, and fails instead
where ``CHAINRULE_REQUIRE_CHROMIUM=1`` (``.ci/run`` sets it), like the KaTeX checks.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import pytest

REQUIRE_ENV = "CHAINRULE_REQUIRE_CHROMIUM"
NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# no network: every host resolves nowhere and every proxied request goes to a closed port
OFFLINE = ["--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>"]
BASE = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-default-apps", "--mute-audio"]


def chromium() -> str | None:
    override = os.environ.get("CHAINRULE_CHROMIUM")
    return override or next((p for p in map(shutil.which, NAMES) if p), None)


def need_chromium() -> str:
    exe = chromium()
    if exe is None:
        why = "headless Chromium is not installed (Debian: apt-get install chromium)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{why}, but {REQUIRE_ENV}=1 requires the browser tests")
        pytest.skip(why)
    return exe


def _run(args, profile: Path, timeout=180):
    cmd = [need_chromium(), *BASE, *OFFLINE, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


HARNESS = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>check</title></head><body>
<pre id="result">pending</pre>
%(frames)s
<script>
function textOutsideMath(doc) {
  var walker = doc.createTreeWalker(doc.body, NodeFilter.SHOW_TEXT), out = [];
  while (walker.nextNode()) {
    var n = walker.currentNode, p = n.parentElement;
    if (p.closest(".katex, pre, code, script, style, svg")) continue;
    out.push(n.nodeValue);
  }
  return out.join(" ");
}
window.addEventListener("load", function () {
  var report = {};
  document.querySelectorAll("iframe").forEach(function (f) {
    var doc = f.contentDocument, r = {};
    if (!doc || !doc.body) { report[f.dataset.page] = {loaded: false}; return; }
    var tex = doc.querySelectorAll(".tex");
    r.loaded = doc.documentElement.hasAttribute("data-formulas");
    r.formulas = tex.length;
    r.rendered = Array.prototype.filter.call(tex, function (e) { return e.querySelector(".katex") !== null; }).length;
    r.errors = doc.querySelectorAll(".katex-error").length;
    var text = textOutsideMath(doc);
    var k = text.indexOf("$");
    r.dollar = k < 0 ? null : text.slice(Math.max(0, k - 40), k + 40);
    r.svg = doc.querySelectorAll("svg.graph").length;
    report[f.dataset.page] = r;
  });
  document.getElementById("result").textContent = JSON.stringify(report);
});
</script></body></html>
"""


def check_pages(site: Path, pages: list[str], profile: Path) -> tuple[dict, list[str]]:
    """({page: report}, console lines) for ``pages`` (paths relative to ``site``)."""
    frames = "\n".join(f'<iframe data-page="{p}" src="{p}" width="1000" height="600"></iframe>' for p in pages)
    harness = site / "_check.html"
    harness.write_text(HARNESS % {"frames": frames}, encoding="utf-8")
    try:
        proc = _run(["--allow-file-access-from-files", "--enable-logging=stderr", "--v=0",
                     "--dump-dom", harness.as_uri()], profile)
    finally:
        harness.unlink()
    m = re.search(r'<pre id="result">(.*?)</pre>', proc.stdout, re.S)
    if not m or m.group(1) == "pending":
        raise AssertionError(f"the harness did not report (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return json.loads(unescape(m.group(1))), console


def screenshot(page: Path, png: Path, profile: Path, size=(1200, 1800)):
    proc = _run([f"--window-size={size[0]},{size[1]}", "--hide-scrollbars", "--virtual-time-budget=10000",
                 f"--screenshot={png}", page.as_uri()], profile)
    if not png.is_file():
        raise AssertionError(f"no screenshot written (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
