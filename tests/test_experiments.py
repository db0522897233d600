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


_NUMBER = re.compile(r"(?<![\w^_{])\d+(?:\.\d+)?(?:e[+-]\d+)?(?![\w}])")


def _numbers_and_text(report: str):
    """The report's numbers (table entries, counts) and its text with each number replaced by #."""
    return [float(n) for n in _NUMBER.findall(report)], _NUMBER.sub("#", report)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_the_committed_run_is_what_the_experiment_produces(name, tmp_path):
    """Rerun with the defaults: the report's text and derived formulas are the committed ones exactly,
    and every number agrees within 10 % (training for hundreds of epochs amplifies a kernel's last-bit
    rounding, which differs between machines and between versions of a lowering; a change in what the
    plot shows does not hide in 10 %). When this fails after a deliberate change, rerun
    `chainrule experiment NAME --out docs/experiments` and rebuild the site."""
    stem = name.replace("-", "_")
    assert main(["experiment", name, "--out", str(tmp_path)]) == 0
    ours, ours_text = _numbers_and_text((tmp_path / f"{stem}.md").read_text(encoding="utf-8"))
    committed, committed_text = _numbers_and_text((COMMITTED / f"{stem}.md").read_text(encoding="utf-8"))
    assert ours_text == committed_text
    assert ours == pytest.approx(committed, rel=0.10)


def test_the_reports_numbers_are_read_and_a_change_beyond_the_tolerance_is_caught():
    """The comparison above can fail: it reads every number of a table row (not the digits of names
    like L2 or T_{0}), masks them in the text, and a 20 % change is caught."""
    row = "| 64 units + L2 | 0.0539 | 9.65e-02 | 1500 | at $t + 1$ and $T_{0} - 1$"
    numbers, text = _numbers_and_text(row)
    assert numbers == [64, 0.0539, 0.0965, 1500, 1, 1]
    assert text == "| # units + L2 | # | # | # | at $t + #$ and $T_{0} - #$"
    assert numbers == pytest.approx([64, 0.0539 * 1.05, 0.0965, 1500, 1, 1], rel=0.10)
    assert numbers != pytest.approx([64, 0.0539 * 1.2, 0.0965, 1500, 1, 1], rel=0.10)
