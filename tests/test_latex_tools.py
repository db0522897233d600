"""The KaTeX checker and the Markdown math extractor used to validate chainrule's LaTeX."""

from __future__ import annotations

import pytest

from latex_tools import (
    extract_math,
    format_katex_errors,
    katex_available,
    katex_errors,
    katex_results,
    need_katex,
)


# ------------------------------------------------------------------ KaTeX (needs node)

VALID = [
    (r"\frac{\partial L}{\partial W_{ij}} = \sum_{k} \delta_{k} x_{j}", True),
    (r"\operatorname{softmax}(z)_i = \frac{e^{z_i}}{\sum_j e^{z_j}}", True),
    (r"W \in \mathbb{R}^{m \times n}, \quad \mathrm{d}W = \delta x^\top", False),
    (r"\delta^{(l)} = \left(W^{(l+1)\top} \delta^{(l+1)}\right) \odot \sigma'(z^{(l)})", True),
    (r"\begin{aligned} a &= b + c \\ d &= \tanh(a) \end{aligned}", True),
    (r"\mathbf{1}[i = j] - p_i p_j \cdot \hat{y}_{ij}", False),
    (r"\begin{pmatrix} 1 & 0 \\ 0 & 1 \end{pmatrix}", True),
]


@pytest.mark.latex
def test_valid_latex_passes():
    need_katex()
    assert katex_errors(VALID) == [], format_katex_errors(katex_errors(VALID))


@pytest.mark.latex
@pytest.mark.parametrize(
    "latex, fragment",
    [
        (r"\frac{a}{", "end of input"),
        (r"\notacommand", "Undefined control sequence"),
        (r"\notacommand{x} + y", "Undefined control sequence"),
        (r"x^{2", "Expected '}'"),
        (r"\left( x", "Expected '\\right'"),
        (r"\begin{aligned} a &= b", "Expected"),
        ("x % trailing comment", "strict"),
    ],
)
def test_invalid_latex_fails(latex, fragment):
    need_katex()
    errors = katex_errors([(latex, False), (latex, True)])
    assert [e[0] for e in errors] == [latex, latex]
    for _latex, message in errors:
        assert fragment in message


@pytest.mark.latex
def test_batch_reports_only_failures_in_order():
    need_katex()
    items = [("a+b", False), (r"\frac{a}{", True), (r"\sum_i x_i", True), (r"\notacommand", False)]
    errors = katex_errors(items)
    assert [latex for latex, _ in errors] == [r"\frac{a}{", r"\notacommand"]
    results = katex_results(items)
    assert [ok for _, ok, _ in results] == [True, False, True, False]
    assert all(err is None for _, ok, err in results if ok)
    # bare strings mean inline math
    assert katex_errors(["x^2", r"\notacommand"]) == [errors[1]]


@pytest.mark.latex
def test_markdown_document_round_trip():
    need_katex()
    doc = "Loss $L = \\frac{1}{2}\\|y - \\hat y\\|^2$.\n\n$$\n\\frac{a}{\n$$\n"
    errors = katex_errors(extract_math(doc))
    assert errors and errors[0][0] == "\\frac{a}{"
    assert len(errors) == 1


def test_empty_batch_needs_no_node():
    assert katex_errors([]) == []


def test_katex_available_is_bool():
    assert isinstance(katex_available(), bool)


# ------------------------------------------------------------------ Markdown extraction

def test_extract_inline_math():
    assert extract_math("The loss $L = \\sum_i \\ell_i$ is minimised.") == [
        ("L = \\sum_i \\ell_i", False)
    ]


def test_extract_inline_backtick_math():
    assert extract_math("Root $`\\sqrt{3}`$ here.") == [("\\sqrt{3}", False)]


def test_extract_dollar_block_multiline_and_single_line():
    md = "Text\n\n$$\n\\frac{\\partial L}{\\partial x}\n= \\delta\n$$\n\nand $$ z = Wx $$ too.\n"
    assert extract_math(md) == [
        ("\\frac{\\partial L}{\\partial x}\n= \\delta", True),
        ("z = Wx", True),
    ]


def test_extract_math_fence():
    md = "Before\n\n```math\n\\delta^{(l)} = W^\\top \\delta^{(l+1)}\n```\n\n~~~~ math\ny = x\n~~~~\n"
    assert extract_math(md) == [
        ("\\delta^{(l)} = W^\\top \\delta^{(l+1)}", True),
        ("y = x", True),
    ]


def test_extract_document_order_and_mixed():
    md = (
        "# Backprop\n\n"
        "For $z = Wx$ we have\n\n"
        "$$\n\\frac{\\partial L}{\\partial W} = \\delta x^\\top\n$$\n\n"
        "```math\n\\delta = \\sigma'(z) \\odot g\n```\n\n"
        "where $\\odot$ is the Hadamard product.\n"
    )
    assert extract_math(md) == [
        ("z = Wx", False),
        ("\\frac{\\partial L}{\\partial W} = \\delta x^\\top", True),
        ("\\delta = \\sigma'(z) \\odot g", True),
        ("\\odot", False),
    ]


def test_extract_ignores_code_escapes_and_prices():
    md = (
        "Prices: $5 and $10.\n\n"
        "Escaped \\$x\\$ is not math.\n\n"
        "Inline code `echo $HOME $PATH` and ``a ` $b$`` is not math.\n\n"
        "```bash\nexport A=$B\necho \"$x$\"\n```\n\n"
        "~~~\n$$ not math $$\n~~~\n\n"
        "Spaces inside: $ x $ is not math.\n"
    )
    assert extract_math(md) == []


def test_extract_inline_does_not_cross_paragraphs():
    assert extract_math("cost $a\n\nb$ here") == []
    assert extract_math("over $a\nb$ lines") == [("a\nb", False)]


def test_extract_escaped_dollar_inside_math():
    assert extract_math("money $\\$5 + x$ ok") == [("\\$5 + x", False)]
