"""The static site: ``chainrule docs [MODEL ...] [--out DIR] [--pdf]``.

Pages are Jinja templates (``templates/*.html.j2``) filled with what the engine derives; formulas are
rendered in the browser by the KaTeX bundled with the package (``assets/katex``, copied to
``_static/``), so the site opens from the file system with no network and building it needs no node.
The output is deterministic (no dates, no paths of the machine), so a committed copy can be checked
for staleness by rebuilding it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
import os
from pathlib import Path
import shutil

import jinja2

from ..atomic import atomic_write_text
from ..derive import derive, explain_model
from . import catalog
from .catalog import Entry, slugify
from .graph_svg import model_svg
from .html import HtmlPrinter, prose
from .kernel import linked_source

ASSETS = Path(__file__).parent / "assets"
KINDS = (("models", "Models", "model"), ("layers", "Layers", "layer"), ("losses", "Losses", "loss"),
         ("optimizers", "Optimisers", "optimizer"), ("generative", "Generative models", "generative"))

_ENV = jinja2.Environment(loader=jinja2.PackageLoader("chainrule.docs", "templates"),
                          undefined=jinja2.StrictUndefined, autoescape=True, keep_trailing_newline=True)


def _render(template: str, root: str, title: str, heading: str, **context) -> str:
    return _ENV.get_template(template).render(root=root, title=title, heading=heading, **context)


def model_page(model, about: str = "", spec: str | None = None, root: str = "../", doc=None) -> str:
    """One model's page: graph, forward equations, each adjoint step by step (collapsible), matrix
    forms, the backward recursion, and the generated kernels linked to the equations both ways."""
    return _model_page(model, about, spec, root, doc)[0]


def _model_page(model, about, spec, root, doc) -> tuple[str, str | None, str | None]:
    """(the page, the generated module's source or None, why it could not be generated or None)."""
    from ..codegen.render import plan_model, render_plan
    from ..derive.errors import ChainruleError
    grads = derive(model)
    doc = doc or explain_model(model, grads)
    shown = {b.ref for b in doc.blocks if getattr(b, "ref", None)}
    try:
        source, error = render_plan(plan_model(model, grads=grads)), None
    except ChainruleError as err:
        source, error = None, f"{type(err).__name__}: {err}"
    kernel, links = linked_source(source, shown) if source else ("", {})
    body = HtmlPrinter(kernel_links=links).render(doc)
    page = _render("model.html.j2", root, model.name, prose(doc.title), about=prose(about), spec=spec,
                   svg=model_svg(model), explanation=body, kernel=kernel, kernel_error=error)
    return page, source, error


def with_kernel(doc, source: str | None, error: str | None):
    """The Explanation followed by its generated kernels (what the book typesets; the page shows
    them linked to the equations instead)."""
    from ..derive.explain import Code, Heading, Para
    book = copy.copy(doc)
    book.blocks = list(doc.blocks) + [Heading(2, "The generated kernels")]
    book.blocks.append(Code(source) if source else Para(f"No kernels: {error}"))
    return book


def text_page(doc, about: str = "", root: str = "../", collapsible: bool = True) -> str:
    return _render("text.html.j2", root, doc.title.replace("`", ""), prose(doc.title), about=prose(about),
                   explanation=HtmlPrinter(collapsible=collapsible).render(doc))


def entry_doc(entry: Entry, model=None):
    """The Explanation an entry's page (and the book's chapter) shows."""
    from ..derive.explain import Explanation, Para
    from ..derive.optimizers import explain_decoupled_decay, explain_optimizer
    if entry.kind == "optimizer":
        return explain_decoupled_decay() if entry.slug == "adamw-vs-l2" else explain_optimizer(entry.slug)
    if entry.kind == "generative":
        from ..derive.generative import generative_documents
        return generative_documents()[entry.slug]
    if entry.make_model is None:
        doc = Explanation(entry.title)
        doc.add(Para("This layer declares no `doc_example`, so no model shows it at work here yet: set the "
                     "class attribute `doc_example` to a layer-list spec (or a function returning a model)."))
        return doc
    return explain_model(model if model is not None else entry.make_model())


def entry_page(entry: Entry, docs: dict | None = None) -> str:
    """The entry's page; its Explanation is kept in ``docs`` (by path) for the book."""
    model = entry.make_model() if entry.kind not in ("optimizer", "generative") and entry.make_model else None
    doc = entry_doc(entry, model)
    if model is None:
        if docs is not None:
            docs[entry.path] = doc
        return text_page(doc, entry.about)
    page, source, error = _model_page(model, entry.about, entry.spec, "../", doc)
    if docs is not None:           # the book prints the models' kernels (the layers' pages, on the site only)
        docs[entry.path] = with_kernel(doc, source, error) if entry.kind == "model" else doc
    return page


@dataclass
class Written:
    path: Path
    entry: Entry | None = None


def copy_assets(out: Path) -> list[Path]:
    """KaTeX (its JS, CSS, woff2 fonts and licence) and the site's CSS and script, into ``_static``."""
    written = []
    for src in sorted(ASSETS.rglob("*")):
        if src.is_file():
            dst = out / "_static" / src.relative_to(ASSETS)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists() or dst.read_bytes() != src.read_bytes():
                shutil.copyfile(src, dst)
            written.append(dst)
    return written


def _index(out: Path, entries: list[Entry], book: bool) -> str:
    known = {e.path for e in entries}
    user = sorted(p.relative_to(out).as_posix() for p in (out / "models").glob("*.html")
                  if p.relative_to(out).as_posix() not in known) if (out / "models").is_dir() else []
    sections = []
    for folder, title, kind in KINDS:
        items = [dict(path=e.path, title=e.title, about_html=prose(e.about)) for e in entries if e.kind == kind]
        if items:
            sections.append(dict(id=folder, title=title, entries=items))
    if user:
        sections.append(dict(id="your-models", title="Your models", entries=[
            dict(path=p, title=Path(p).stem, about_html="built with <code>chainrule docs MODEL</code>")
            for p in user]))
    return _render("index.html.j2", "", "chainrule docs", "chainrule: backpropagation, derived",
                   sections=sections, book=book)


def _render_entry(position: int):
    """(page, Explanation) of the catalog's entry at ``position``: what a worker process computes."""
    docs = {}
    entry = catalog.everything()[position]
    return entry_page(entry, docs), docs[entry.path]


def _render_all(entries, jobs: int | None, guide_args: dict):
    """Every entry's (page, Explanation), in order, and the concepts guide. They are independent, so
    with ``jobs`` > 1 they are derived in that many processes (spawned: fresh interpreters, no forked
    locks); a worker re-reads the catalog and renders one entry by its position."""
    from .concepts import concepts_doc
    jobs = min(len(entries), jobs if jobs is not None else min(4, len(os.sched_getaffinity(0))
                                                              if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    if jobs <= 1 or [e.path for e in entries] != [e.path for e in catalog.everything()]:
        docs = {}
        pages = [(entry_page(e, docs), docs[e.path]) for e in entries]
        return pages, concepts_doc(**guide_args)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        guide = pool.submit(concepts_doc, **guide_args)
        pages = list(pool.map(_render_entry, range(len(entries))))
        return pages, guide.result()


def build_site(out, experiments: str | Path | None = None, pdf: bool = False, log=print,
               docs: dict | None = None, jobs: int | None = None) -> list[Path]:
    """Every page (models, layers, losses, optimisers, the concepts guide, the index) into ``out``.
    ``docs``, when given, receives every page's Explanation by path (what the book typesets);
    ``jobs`` processes derive the pages (default: the CPUs, at most 4)."""
    out = Path(out)
    written = copy_assets(out)
    entries = catalog.everything()
    docs = {} if docs is None else docs
    guide_args = dict(experiments=experiments, figure_dir=out / "_static" / "figures", figure_prefix="_static/figures/")
    log(f"deriving {len(entries)} pages and the concepts guide")
    pages, guide = _render_all(entries, jobs, guide_args)
    for e, (html, doc) in zip(entries, pages):
        written.append(_write(out / e.path, html))
        docs[e.path] = doc
        log(f"  {e.path}")
    written.append(_write(out / "concepts.html", text_page(guide, root="", collapsible=False)))
    docs["concepts"] = guide         # the book typesets it too (its figures looked up by file name)
    if pdf:
        from .book import build_book
        written.append(build_book(out / "book.pdf", entries, experiments=experiments, log=log, docs=docs))
    written.append(_write(out / "index.html", _index(out, entries, book=(out / "book.pdf").exists())))
    return written


def build_user_pages(specs: list[str], out, log=print) -> list[Path]:
    """Pages for a user's models (built-in names or layer-list specs), added to the site in ``out``
    (built first when ``out`` has no site yet)."""
    from ..derive import BUILTIN_MODELS, EXAMPLE_MODELS, build_model
    out = Path(out)
    models = [(spec, build_model(spec)) for spec in specs]     # a bad spec fails before any work
    written = [] if (out / "index.html").exists() else build_site(out, log=log)
    for spec, model in models:
        if spec in BUILTIN_MODELS or spec in EXAMPLE_MODELS:
            name, shown = spec, BUILTIN_MODELS.get(spec) or EXAMPLE_MODELS[spec]
        else:
            name, shown = slugify(spec), spec
            model.name = name
        path = out / "models" / f"{slugify(name)}.html"
        written.append(_write(path, model_page(model, f"The layer-list spec `{shown}`.", shown)))
        log(f"  {path}")
    written.append(_write(out / "index.html", _index(out, catalog.everything(), book=(out / "book.pdf").exists())))
    return written


def _write(path: Path, text: str) -> Path:
    atomic_write_text(path, text)
    return path


__all__ = ["build_site", "build_user_pages", "model_page"]
