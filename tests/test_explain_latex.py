"""Every equation chainrule emits must render: KaTeX (through node) checks the whole documents."""
import pytest

from chainrule.cli import main
from chainrule.derive import BUILTIN_MODELS, build_model, explain_model
from chainrule.derive.verify import builtin_declarations
from latex_tools import extract_math, format_katex_errors, katex_errors, need_katex


@pytest.fixture(scope="module")
def documents():
    specs = dict(BUILTIN_MODELS) | {label: spec for label, spec in builtin_declarations().items()}
    return {name: explain_model(build_model(spec)) for name, spec in specs.items()}


@pytest.mark.latex
def test_every_equation_of_every_builtin_derivation_renders(documents):
    need_katex()
    items = []
    for doc in documents.values():
        md_math = extract_math(doc.to_markdown())
        assert len(md_math) > 10
        items += md_math + [(eq, True) for eq in doc.equations()]
        items.append((doc._repr_latex_().strip("$"), True))
    errors = katex_errors(items)
    assert not errors, format_katex_errors(errors)


@pytest.mark.latex
def test_latex_document_math_renders(documents):
    need_katex()
    import re
    tex = documents["demo"].to_latex()
    blocks = re.findall(r"\\begin\{equation\*\}\n(.*?)\n\\end\{equation\*\}", tex, re.DOTALL)
    inline = re.findall(r"(?<!\\)\$([^$]+)\$", tex)
    assert blocks and inline
    errors = katex_errors([(b, True) for b in blocks] + [(i, False) for i in inline])
    assert not errors, format_katex_errors(errors)


def test_cli_derive_writes_the_demo_derivation_by_default(capsys):
    assert main(["derive"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Backpropagation in the model `demo`")
    assert r"\Delta^{(1)\top} X" in out


def test_cli_derive_latex_to_file(tmp_path):
    target = tmp_path / "d.tex"
    assert main(["derive", "perceptron", "--format", "latex", "-o", str(target)]) == 0
    assert target.read_text().startswith(r"\documentclass{article}")


def test_cli_derive_help_explains_how_to_name_a_model(capsys):
    with pytest.raises(SystemExit):
        main(["derive", "--help"])
    out = capsys.readouterr().out
    assert "built-in name: demo" in out and "dense(N)" in out and "softmax_cross_entropy" in out


def test_cli_reports_a_bad_spec_clearly(capsys):
    assert main(["derive", "4 -> dense(3) -> sigmod -> mse"]) == 2
    assert "unknown layer 'sigmod'" in capsys.readouterr().err


def test_cli_verify_claims(capsys):
    assert main(["verify", "--claim", "z2 = (p2[b,o] - y2[b,o]) / B"]) == 0
    assert main(["verify", "--claim", "z2 = y2[b,o] - p2[b,o]"]) == 1
    out = capsys.readouterr().out
    assert "equal" in out and "not equal: counterexample" in out


def test_cli_verify_symbolic_table(capsys):
    assert main(["verify", "--symbolic-only", "perceptron", "mlp-tanh-regression"]) == 0
    out = capsys.readouterr().out
    assert "all passed" in out and "perceptron" in out


def _pdflatex(tex_path):
    import shutil
    import subprocess
    exe = shutil.which("pdflatex")
    if exe is None:
        import os
        if os.environ.get("CHAINRULE_REQUIRE_PDFLATEX"):
            pytest.fail("pdflatex is required (CHAINRULE_REQUIRE_PDFLATEX is set) but not installed")
        pytest.skip("pdflatex is not installed (apt-get install texlive-latex-recommended)")
    run = subprocess.run([exe, "-interaction=nonstopmode", "-halt-on-error", tex_path.name],
                         cwd=tex_path.parent, capture_output=True, text=True, timeout=120)
    log = tex_path.with_suffix(".log").read_text(errors="replace")
    return run.returncode, log


@pytest.mark.latex
def test_latex_derivations_compile_with_pdflatex_without_errors_or_missing_characters(tmp_path):
    """The demo (CLI) and user-declared models with multi-letter and subscripted names, rank-3
    tensors, Min/Abs and several outputs: pdflatex compiles each with no error and no missing glyph."""
    from corpus import corpus
    docs = {"demo": None, **{k: v for k, v in corpus().items()
                             if k in ("matrix bias", "attention", "swish + huber (README)", "batch norm",
                                      "3 -> dense(4) -> leaky_relu -> dense(2) -> mae")}}
    for k, (name, model) in enumerate(docs.items()):
        target = tmp_path / f"doc{k}.tex"
        if model is None:
            assert main(["derive", name, "--format", "latex", "-o", str(target)]) == 0
        else:
            target.write_text(explain_model(model).to_latex())
        code, log = _pdflatex(target)
        problems = [line for line in log.splitlines()
                    if line.startswith("!") or "Missing character" in line or "Warning" in line]
        assert code == 0 and not problems, f"{name}: pdflatex says {problems[:5]}"
        assert target.with_suffix(".pdf").stat().st_size > 10_000
        tex = target.read_text()
        assert r"Step 1, \emph{chain rule}" in tex and "*chain" not in tex and "`" not in tex
