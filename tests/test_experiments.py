"""The experiments behind the concepts guide's plots (`chainrule experiment ...`): the runs committed in
docs/experiments are what the experiments produce from this checkout (slow: each trains or measures
for minutes), and what the through-time experiment reports is what its recursion claims."""
from __future__ import annotations

from pathlib import Path
import re

import pytest

from chainrule.cli import main

COMMITTED = Path(__file__).resolve().parent.parent / "docs" / "experiments"
NAMES = ("overfitting", "vanishing", "vanishing-through-time")


def test_every_experiment_has_a_committed_run_with_its_plot():
    for name in NAMES:
        stem = name.replace("-", "_")
        assert (COMMITTED / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"![plot]({stem}.png)" in (COMMITTED / f"{stem}.md").read_text(encoding="utf-8"), name


def test_the_committed_through_time_run_shows_the_open_forget_gate_keeping_the_gradient():
    """The three rows of the committed table: Elman and the initial LSTM vanish towards t = 0 (first /
    last below 1e-2), the LSTM with its forget gate held open does not (above 0.1)."""
    report = (COMMITTED / "vanishing_through_time.md").read_text(encoding="utf-8")
    ratio = {row.split("|")[1].strip(): float(row.split("|")[5]) for row in report.splitlines()
             if row.startswith("| ") and not row.startswith("| layer")}
    assert set(ratio) == {"Elman RNN", "LSTM", "LSTM, forget gate held open (b_f = 3)"}
    assert ratio["Elman RNN"] < 1e-2 and ratio["LSTM"] < 1e-2
    assert ratio["LSTM, forget gate held open (b_f = 3)"] > 0.1
    # the recursions quoted are the derived adjoints that read t+1, Elman's through U, the LSTM's cell
    # through the forget gate at t+1
    assert re.search(r"U\^\{\(1\)\}_\{o'o\}\} \{\\delta\^\{\(1\)\}_\{b,t \+ 1,o'\}\}", report)
    assert r"\frac{\partial C}{\partial c^{(1)}_{b,t + 1,k}} {f^{(1)}_{b,t + 1,k}}" in report


def test_epochs_is_refused_where_nothing_trains(capsys):
    assert main(["experiment", "vanishing-through-time", "--epochs", "3"]) == 2
    assert "--epochs: vanishing-through-time measures at initialisation (no training)" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_the_committed_run_is_what_the_experiment_produces(name, tmp_path):
    """Rerun with the defaults: the report (every number in it, the derived formulas) is the committed
    one, byte for byte. When this fails after a deliberate change, rerun
    `chainrule experiment NAME --out docs/experiments` and rebuild the site."""
    stem = name.replace("-", "_")
    assert main(["experiment", name, "--out", str(tmp_path)]) == 0
    assert (tmp_path / f"{stem}.md").read_text(encoding="utf-8") == \
        (COMMITTED / f"{stem}.md").read_text(encoding="utf-8")
