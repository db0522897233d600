"""The named examples: a short run of each kind through `chainrule train` (lower thresholds), and the
full runs (the issue's accuracies) marked slow."""
from __future__ import annotations

import io

import pytest

from chainrule.runtime.examples import EXAMPLES, run_example


def _run(name, tmp_path, epochs):
    out = io.StringIO()
    result = run_example(name, out_dir=str(tmp_path / name), epochs=epochs, progress=False, stream=out)
    text = out.getvalue()
    assert "test accuracy:" in text and "time:" in text
    assert (tmp_path / name / "derivation.md").read_text().startswith("# Backpropagation in the example")
    return result


def test_the_cli_trains_a_named_example_with_a_short_run(tmp_path, capsys):
    from chainrule.cli import main
    assert main(["train", "residual-mlp", "--epochs", "4", "--no-progress", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    acc = float(out.split("test accuracy:")[1].split()[0])
    assert acc > 0.85, out
    doc = (tmp_path / "r" / "derivation.md").read_text()
    assert "the identity path" in doc            # the residual connections' two contributions


@pytest.mark.slow
def test_a_short_digits_cnn_run_learns(tmp_path):
    result = _run("digits-cnn", tmp_path, epochs=4)
    assert result["test_accuracy"] > 0.85


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits-cnn", "mnist1d-cnn", "residual-mlp", "mnist1d-gru"])
def test_full_example_runs_reach_their_targets(tmp_path, name):
    if EXAMPLES[name].data.startswith("mnist1d"):
        pytest.importorskip("mnist1d")
    result = _run(name, tmp_path, epochs=None)
    assert result["test_accuracy"] >= EXAMPLES[name].target


@pytest.mark.slow
def test_the_gru_on_mnist1d_learns_in_a_short_run(tmp_path):
    pytest.importorskip("mnist1d")
    result = _run("mnist1d-gru", tmp_path, epochs=4)
    assert result["test_accuracy"] > 0.6


@pytest.mark.slow
def test_the_character_model_loss_falls(capsys):
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parent.parent / "examples" / "char_lm.py"
    spec = importlib.util.spec_from_file_location("char_lm", path)
    char_lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(char_lm)
    losses = char_lm.main(["--epochs", "3", "--examples", "4000", "--hidden", "32", "--window", "16"])
    assert losses[-1] < losses[0] < 4.6                       # below log(95): it learned something
    assert "sample:" in capsys.readouterr().out
