"""The documentation site (`chainrule docs`): built once per module from the registries, compared with
the committed copy, its links and anchors resolved, its formulas traced to the engine, its kernels
linked to their equations both ways, and opened in headless Chromium from file:// with no network.

Building the whole site derives every page (minutes on two cores), so the tests that need it (the
`site` fixture) are marked slow and run in CI (`.ci/run`); the default run rebuilds the demo model's
page alone against the committed copy and opens the committed pages in Chromium."""
from __future__ import annotations

import filecmp
import functools
from html.parser import HTMLParser
import os
from pathlib import Path
import re
import shutil
from urllib.parse import unquote, urlsplit

import pytest

from chainrule.cli import main
from chainrule.docs import catalog
from chainrule.docs.site import build_site

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "docs" / "site"
EXPERIMENTS = REPO / "docs" / "experiments"     # the committed runs of `chainrule experiment`: their plots


DOCS: dict = {}           # every page's Explanation, by path, from the site built below (for the book)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    build_site(out, experiments=EXPERIMENTS, log=lambda *a: None, docs=DOCS)
    return out


class _Page(HTMLParser):
    """Ids, links (href/src) and the text of every .tex element of one page."""

    def __init__(self):
        super().__init__()
        self.ids, self.links, self.tex, self._in_tex = set(), [], [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        for key in ("href", "src"):
            if a.get(key):
                self.links.append(a[key])
        if "tex" in (a.get("class") or "").split():
            self._in_tex = 1
            self.tex.append("")
        elif self._in_tex:
            self._in_tex += 1

    def handle_endtag(self, tag):
        if self._in_tex:
            self._in_tex -= 1

    def handle_data(self, data):
        if self._in_tex:
            self.tex[-1] += data


@functools.lru_cache(maxsize=None)
def parse(path: Path) -> _Page:
    p = _Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def pages(site: Path) -> list[Path]:
    return sorted(site.rglob("*.html"))


@pytest.mark.slow
def test_every_registry_entry_has_a_page_linked_from_the_index(site):
    index = parse(site / "index.html")
    entries = catalog.everything()
    kinds = {e.kind for e in entries}
    assert kinds == {"model", "layer", "loss", "optimizer", "generative"}
    for e in entries:
        assert (site / e.path).is_file(), e.path
        assert e.path in index.links, f"the index does not link {e.path}"
    from chainrule.derive import ACTIVATIONS, BUILTIN_MODELS, EXAMPLE_MODELS, LOSSES
    from chainrule.derive.optimizers import RULES
    names = {(e.kind, e.title) for e in entries}
    assert all(("model", m) in names for m in [*BUILTIN_MODELS, *EXAMPLE_MODELS])
    assert all(("layer", a) in names for a in ACTIVATIONS) and all(("loss", name) in names for name in LOSSES)
    assert len([e for e in entries if e.kind == "optimizer"]) == len(RULES) + 1     # + AdamW vs L2
    assert (site / "concepts.html").is_file()


def test_every_layer_class_declares_the_model_its_page_shows():
    """A layer without ``doc_example`` gets a page that says so; every built-in one has a derivation."""
    missing = [e.title for e in catalog.layers() if e.make_model is None]
    assert missing == [], f"layers without doc_example: {missing}"
    titles = {e.title for e in catalog.layers()}
    assert {"dense", "conv", "maxpool", "avgpool", "flatten", "dropout", "layer_norm", "softmax"} <= titles


@pytest.mark.slow
def test_links_and_anchors_resolve_and_nothing_is_fetched_from_the_network(site):
    checked = 0
    for page in pages(site):
        for link in parse(page).links:
            parts = urlsplit(link)
            assert not parts.scheme and not parts.netloc, f"{page.relative_to(site)} links outside the site: {link}"
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            assert target.is_file(), f"{page.relative_to(site)}: broken link {link}"
            if parts.fragment and target.suffix == ".html":
                assert parts.fragment in parse(target).ids, f"{page.relative_to(site)}: no #{parts.fragment} in {link}"
            checked += 1
    assert checked > 1000
    css = (site / "_static" / "katex" / "katex.min.css").read_text()
    fonts = re.findall(r"url\((fonts/[^)]+\.woff2)\)", css)
    assert fonts and all((site / "_static" / "katex" / f).is_file() for f in fonts)


def test_the_bundled_katex_is_the_version_the_latex_checks_pin():
    import json
    lock = json.loads((REPO / "tests" / "latex_check" / "package-lock.json").read_text())
    pinned = lock["packages"]["node_modules/katex"]["version"]
    js = (REPO / "chainrule" / "docs" / "assets" / "katex" / "katex.min.js").read_text()
    assert f'version:"{pinned}"' in js.replace(" ", "") or f'"{pinned}"' in js


@pytest.mark.slow
def test_model_page_formulas_are_the_engines(site):
    """The demo page shows the derived equations exactly as the engine prints them (nothing pasted)."""
    from chainrule.derive import build_model, derive
    from chainrule.derive.explain import Writer
    model = build_model("demo")
    grads = derive(model)
    w = Writer(model, grads)
    shown = parse(site / "models" / "demo.html").tex
    from html import unescape
    shown = {unescape(t) for t in shown}
    for eq in model.equations:
        assert w.equation(eq) in shown, eq.out.name
    for name in ("z2", "z1", "W1", "W2", "b1", "b2"):
        assert w.equation(grads.composed[name].equation) in shown, name
    assert r"\frac{p_{bo} - {y^{(2)}_{bo}}}{B}" in "".join(shown)      # δ² = (p - y)/B, derived


@pytest.mark.slow
def test_graph_svg_has_one_node_per_tensor_and_equation_and_an_edge_per_read(site):
    from chainrule.derive import build_model
    from chainrule.docs.graph_svg import graph_nodes
    for name in ("demo", "digits-cnn", "residual-mlp"):
        model = build_model(name)
        html = (site / "models" / f"{name}.html").read_text()
        svg = html[html.index("<svg"):html.index("</svg>")]
        used = {r for eq in model.equations for r, _ in eq.reads() if r in model.tensors} | \
               {eq.out.name for eq in model.equations}
        assert svg.count('<g class="node') == len(used) + len(model.equations), name
        reads = sum(len({r for r, _ in eq.reads() if r in model.tensors}) for eq in model.equations)
        assert svg.count('class="edge') == reads + len(model.equations), name
        nodes, edges = graph_nodes(model)
        assert len(edges) == svg.count('class="edge')
        # a residual connection skips rows: drawn apart (never hidden behind the nodes it skips)
        assert svg.count('class="edge skip"') == (2 if name == "residual-mlp" else 0), name
        for eq in model.equations:                 # every equation node links to its equation
            assert f'href="#eq-{eq.out.name}"' in svg


@pytest.mark.slow
def test_kernel_statements_link_to_their_equations_and_back(site):
    from html import unescape
    from chainrule.codegen import render_module
    from chainrule.derive import build_model
    model = build_model("demo")
    html = (site / "models" / "demo.html").read_text()
    page = parse(site / "models" / "demo.html")
    code = html[html.index('<pre class="kernel">'):]
    code = code[:code.index("</pre>")]
    assert unescape(re.sub(r"<[^>]+>", "", code)) + "\n" == render_module(model)   # the real module
    for name in ("z1", "a1", "z2", "C", "d_z2", "d_z1", "d_W1", "d_W2", "d_b1", "d_b2"):
        eq_id, k_id = f"eq-{name}", f"k-{name}-1"
        assert eq_id in page.ids and k_id in page.ids, name
        assert f'href="#{k_id}"' in html, f"equation {name} does not link to its code"
        statement = re.search(rf'<span class="line" id="{k_id}"><a class="to-eq" href="#([^"]+)"[^>]*>([^<]*)</a>', html)
        assert statement and statement.group(1) == eq_id, name
        assert unescape(statement.group(2)).strip().startswith(f"# {name}"), statement.group(2)


@pytest.mark.slow
def test_adjoint_derivations_are_collapsible_with_their_steps_and_justifications(site):
    html = (site / "models" / "demo.html").read_text()
    blocks = re.findall(r'<details class="derivation">(.*?)</details>', html, re.S)
    assert len(blocks) >= 10
    assert any("Step 1, <em>chain rule</em>" in b for b in blocks)
    assert any("forward result" in b for b in blocks) and any("declared fact" in b for b in blocks)
    assert "In matrix form, shape" in html and "The backward recursion" in html


@pytest.mark.slow
def test_concepts_guide_follows_the_course_order_with_derived_math(site):
    html = (site / "concepts.html").read_text()
    order = ["The perceptron", "Loss versus cost", "Gradient descent", "Backpropagation", "Activations",
             "Losses", "overfitting", "Vanishing gradients", "Convolutional", "Recurrent"]
    positions = [html.index(t) for t in order]
    assert positions == sorted(positions)
    tex = " ".join(parse(site / "concepts.html").tex)
    assert r"\frac{1}{4}" in tex                   # the peak of σ' = a(1 - a), found by SymPy
    assert "p_{bo} - {y^{(1)}_{bo}}" in tex           # softmax + cross-entropy: p - y
    assert "t + 1" in tex                              # the RNN's adjoint reads the next step (BPTT)
    from chainrule.docs.concepts import SNIPPETS
    assert html.count('<pre class="snippet">') == len(SNIPPETS) == 10


@pytest.mark.slow
def test_concepts_guide_shows_the_committed_experiments_plots(site):
    """Built with --experiments docs/experiments: each experiment's plot is copied beside the pages,
    byte for byte, and shown in the guide, after the section it illustrates."""
    html = (site / "concepts.html").read_text()
    for name, section in (("overfitting", "overfitting"), ("vanishing", "Vanishing gradients"),
                          ("vanishing_through_time", "Recurrent")):
        src = f"_static/figures/{name}.png"
        assert src in parse(site / "concepts.html").links, name
        assert (site / src).read_bytes() == (EXPERIMENTS / f"{name}.png").read_bytes()
        assert html.index(section) < html.index(src)
    assert "--experiments DIR" not in html             # no "run the experiment to see its plot" left


def test_concepts_snippets_run(capsys):
    """Every snippet but the training one (slow, below) runs as printed."""
    from chainrule.docs.concepts import SNIPPETS
    for key, code in SNIPPETS.items():
        if key != "descent":
            exec(compile(code, f"<snippet {key}>", "exec"), {})
    out = capsys.readouterr().out
    assert "d_z1" in out and "sigmoid" in out


@pytest.mark.slow
def test_concepts_training_snippet_runs(capsys):
    from chainrule.docs.concepts import SNIPPETS
    exec(compile(SNIPPETS["descent"], "<snippet descent>", "exec"), {})
    assert len(capsys.readouterr().out.splitlines()) == 3


@pytest.mark.slow
def test_committed_site_is_current(site):
    """docs/site is what `chainrule docs` builds from this checkout; rebuild it when this fails."""
    ours = {p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file()}
    committed = {p.relative_to(COMMITTED).as_posix() for p in COMMITTED.rglob("*")
                 if p.is_file() and p.name != "book.pdf"}           # the book is built on demand, not committed
    hint = ("docs/site is stale: run `chainrule docs --experiments docs/experiments` at the repository's "
            "root and commit docs/site")
    assert ours == committed, f"{hint} (files differ: {sorted(ours ^ committed)[:10]})"
    stale = [p for p in sorted(ours) if not filecmp.cmp(site / p, COMMITTED / p, shallow=False)]
    assert stale == [], f"{hint} (stale: {stale[:10]})"


@pytest.mark.slow
def test_user_model_page_is_added_to_an_existing_site(site, tmp_path, capsys):
    out = tmp_path / "site"
    shutil.copytree(site, out)
    spec = "3 -> dense(4) -> tanh -> dense(2) -> mse"
    assert main(["docs", spec, "--out", str(out), "--quiet"]) == 0
    page = out / "models" / "3-dense-4-tanh-dense-2-mse.html"
    assert page.is_file() and "<svg" in page.read_text()
    assert "models/3-dense-4-tanh-dense-2-mse.html" in parse(out / "index.html").links
    assert f"site: {(out / 'index.html').resolve().as_uri()}" in capsys.readouterr().out


def test_bad_model_spec_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "site"
    assert main(["docs", "3 -> dense(4) -> nope -> mse", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "chainrule docs: SpecError: item 3: unknown layer 'nope'" in err
    assert not any(out.rglob("*.html"))


def test_pdf_needs_pdflatex_and_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))          # no pdflatex on this PATH
    assert main(["docs", "--pdf", "--out", str(tmp_path / "s")]) == 2
    assert "--pdf needs pdflatex" in capsys.readouterr().err


@pytest.mark.latex
@pytest.mark.slow
def test_book_compiles_with_pdflatex(site, tmp_path):
    """The whole book (the concepts guide, then every page's derivation, as the site derived them):
    pdflatex compiles it with no error and no dropped glyph (build_book raises on either)."""
    if shutil.which("pdflatex") is None:
        if os.environ.get("CHAINRULE_REQUIRE_PDFLATEX"):
            pytest.fail("pdflatex is required (CHAINRULE_REQUIRE_PDFLATEX is set) but not installed")
        pytest.skip("pdflatex is not installed (apt-get install texlive-latex-recommended)")
    from chainrule.docs.book import book_latex, build_book
    entries = catalog.everything()
    pdf = build_book(tmp_path / "book.pdf", entries, experiments=EXPERIMENTS, log=lambda *a: None, docs=DOCS)
    assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 500_000
    tex = book_latex(entries, docs=DOCS)
    models = sum(e.kind == "model" for e in entries)           # each model chapter ends with its kernels
    assert tex.count("The generated kernels") == tex.count("def train_step(") == models
    assert r"{Σ}{{$\Sigma$}}1" in tex                     # the comments' Σ typeset, not dropped
    for name in ("overfitting", "vanishing", "vanishing_through_time"):     # the experiments' plots
        assert rf"\includegraphics[width=0.8\linewidth]{{{name}.png}}" in tex
    assert tex.count(r"\chapter{") == len(entries) + 1
    assert all(rf"\part{{{part}}}" in tex for part in ("Models", "Layers", "Losses", "Optimisers"))
    assert r"\emph{chain rule}" in tex and "Gradient descent and the learning rate" in tex


def test_the_index_links_the_book_once_where_it_was_built(tmp_path):
    """`chainrule docs --pdf` writes book.pdf beside the pages (built and typeset above) and the index
    links it, once; without the book there is no dead link."""
    from chainrule.docs.site import _index
    entries = catalog.everything()
    assert _index(tmp_path, entries, book=False).count('href="book.pdf"') == 0
    assert _index(tmp_path, entries, book=True).count('href="book.pdf"') == 1


# -- in a real browser ------------------------------------------------------------------------------
@pytest.mark.browser
@pytest.mark.slow
def test_every_page_renders_in_headless_chromium_offline(site, tmp_path):
    """Every page loads from file:// with the network off: each formula rendered by KaTeX, no error
    node, no `$` left in the text, a graph on every model page, nothing on the console."""
    from browser_tools import screenshot
    _check_in_chromium(site, [p.relative_to(site).as_posix() for p in pages(site)], tmp_path / "profile")
    shot = Path(os.environ.get("CHAINRULE_SCREENSHOT_DIR", tmp_path)) / "demo-model-page.png"
    screenshot(site / "models" / "demo.html", shot, tmp_path / "profile2")
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 20_000


def _check_in_chromium(root: Path, chosen: list[str], profile: Path):
    """Open ``chosen`` pages of the site at ``root`` in headless Chromium, offline: each loads, every
    formula is rendered by KaTeX with no error node, no `$` is left in the text, each model, layer and
    loss page has its graph, and nothing reaches the console."""
    from browser_tools import check_pages, need_chromium
    need_chromium()
    report, console = check_pages(root, chosen, profile)
    assert console == []
    assert set(report) == set(chosen)
    for page, r in report.items():
        assert r["loaded"], page
        assert r["formulas"] > 0 and r["rendered"] == r["formulas"] and r["errors"] == 0, (page, r)
        assert r["dollar"] is None, (page, r["dollar"])
        if page.startswith(("models/", "layers/", "losses/")):
            assert r["svg"] == 1, page


@pytest.mark.browser
def test_the_committed_pages_of_each_kind_render_in_headless_chromium(tmp_path):
    """The default run's browser check: the committed index, concepts guide and one page of each kind
    (the full sweep over a freshly built site is the slow test above)."""
    _check_in_chromium(COMMITTED, ["index.html", "concepts.html", "models/demo.html", "layers/conv.html",
                                   "layers/lstm.html", "layers/causal-attention.html", "losses/mse.html",
                                   "optimizers/adam.html", "generative/vae.html"], tmp_path / "profile")


def test_the_demo_page_is_current():
    """The default run's staleness check: the demo model's page, rebuilt, is the committed one (every
    page is rebuilt and compared by the slow `test_committed_site_is_current`)."""
    from chainrule.docs.site import entry_page
    demo = next(e for e in catalog.models() if e.path == "models/demo.html")
    assert entry_page(demo) == (COMMITTED / demo.path).read_text(encoding="utf-8"), (
        "docs/site is stale: run `chainrule docs --experiments docs/experiments` at the repository's root "
        "and commit docs/site")


@pytest.mark.browser
def test_the_browser_check_catches_a_broken_formula_and_a_raw_dollar(tmp_path):
    """The check can fail: a page with a formula KaTeX rejects and an unrendered `$` is reported."""
    from browser_tools import check_pages, need_chromium
    need_chromium()
    bad = tmp_path / "bad"
    shutil.copytree(COMMITTED / "_static", bad / "_static")
    html = (COMMITTED / "index.html").read_text()
    html = html.replace("<main>", '<main><p>cost $C$ <span class="tex">\\frac{1}{</span></p>', 1)
    (bad / "index.html").write_text(html)
    report, console = check_pages(bad, ["index.html"], tmp_path / "profile")
    r = report["index.html"]
    assert r["errors"] == 1 and r["rendered"] == r["formulas"] - 1
    assert r["dollar"] is not None and "$C$" in r["dollar"]
    assert any("KaTeX could not render" in line for line in console)


def test_an_experiments_plot_is_copied_into_the_guide_where_it_was_run(tmp_path):
    """`--experiments DIR`: a plot found there is copied beside the pages and shown; otherwise the
    guide names the command that makes it."""
    from chainrule.derive.explain import Figure, Para
    from chainrule.docs.concepts import Guide, _figure
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "overfitting.png").write_bytes(b"\x89PNG fake plot")
    g = Guide()
    _figure(g, runs, "overfitting", "the curves", tmp_path / "site" / "_static" / "figures", "_static/figures/")
    _figure(g, runs, "vanishing", "the norms", tmp_path / "site" / "_static" / "figures", "_static/figures/")
    first, second = g.doc.blocks
    assert isinstance(first, Figure) and first.path == "_static/figures/overfitting.png"
    assert (tmp_path / "site" / "_static" / "figures" / "overfitting.png").read_bytes() == b"\x89PNG fake plot"
    assert isinstance(second, Para) and "`chainrule experiment vanishing`" in second.text


def test_code_in_latex_wraps_and_typesets_every_non_ascii_character():
    """Code goes to a listing whose `literate` rules cover each non-ASCII character: Greek and math
    signs as prose prints them, anything else as its code point (visible, never silently dropped)."""
    from chainrule.derive.explain import Code, Explanation, LatexDocPrinter
    doc = Explanation("t")
    doc.add(Code("x = 1  # z[b] = Σ_i W[i] δ[i] ≥ 0 ☃\n"))
    tex = LatexDocPrinter().render(doc, standalone=False)
    assert tex.startswith(r"\begin{lstlisting}[literate=")
    for rule in (r"{Σ}{{$\Sigma$}}1", r"{δ}{{$\delta$}}1", r"{≥}{{$\ge$}}1", r"{☃}{{[U+2603]}}1"):
        assert rule in tex
