"""An Explanation printed as HTML: the site's printer, beside Markdown and LaTeX in ``derive/explain.py``.

Math is never typeset here: each formula becomes ``<span class="tex">`` (inline) or ``<div class="tex
display">`` holding its LaTeX source, HTML-escaped, which the bundled KaTeX renders in the page
(``assets/render.js``). A section under a level-2 heading (one adjoint's derivation) is collapsible.
"""
from __future__ import annotations

from html import escape
import re

from ..derive.explain import Explanation, Heading

_INLINE_MATH = re.compile(r"(\$[^$]+\$)")
_MARKUP = re.compile(r"(`[^`]+`|\*[^*\s][^*]*\*)")


def anchor(name: str) -> str:
    """The id of the element that shows tensor ``name``'s equation (``eq-z1``, ``eq-d_z1``)."""
    return "eq-" + re.sub(r"[^0-9A-Za-z_-]", "-", name)


def tex_span(tex: str, display: bool = False) -> str:
    if display:
        return f'<div class="tex display">{escape(tex, quote=False)}</div>'
    return f'<span class="tex">{escape(tex, quote=False)}</span>'


def prose(text: str) -> str:
    """Plain text with inline ``$math$``, ``*emphasis*`` and ```code``` (the explanations' markup)."""
    out = []
    for part in _INLINE_MATH.split(text):
        if len(part) > 2 and part.startswith("$") and part.endswith("$"):
            out.append(tex_span(part[1:-1]))
            continue
        for k, piece in enumerate(_MARKUP.split(part)):
            if k % 2 == 0:
                out.append(escape(piece, quote=False))
            elif piece.startswith("`"):
                out.append(f"<code>{escape(piece[1:-1], quote=False)}</code>")
            else:
                out.append(f"<em>{escape(piece[1:-1], quote=False)}</em>")
    return "".join(out)


class HtmlPrinter:
    """Blocks to HTML. ``kernel_links`` maps a tensor name to the id of the first generated statement
    computing it: its equation then links to that code (and the code links back, see ``kernel.py``)."""

    def __init__(self, kernel_links: dict | None = None, collapsible: bool = True, heading_offset: int = 1):
        self.kernel_links = kernel_links or {}
        self.collapsible = collapsible
        self.offset = heading_offset
        self.seen_refs: set = set()

    def render(self, doc: Explanation) -> str:
        out, open_details = [], False
        for b in doc.blocks:
            if isinstance(b, Heading) and open_details:
                out.append("</details>")
                open_details = False
            if isinstance(b, Heading) and b.level == 2 and self.collapsible:
                out.append(f'<details class="derivation"><summary>{prose(b.text)}</summary>')
                open_details = True
                continue
            out.append(getattr(self, "_" + type(b).__name__)(b))
        if open_details:
            out.append("</details>")
        return "\n".join(out)

    def _Heading(self, b):
        level = min(6, b.level + self.offset)
        slug = re.sub(r"[^0-9a-z]+", "-", re.sub(r"\$[^$]*\$", "", b.text).lower()).strip("-")
        ident = f' id="{slug}"' if slug and b.level == 1 else ""
        return f"<h{level}{ident}>{prose(b.text)}</h{level}>"

    def _Para(self, b):
        return f"<p>{prose(b.text)}</p>"

    def _Display(self, b):
        body = tex_span(b.tex, display=True)
        if not b.ref or b.ref in self.seen_refs:
            return body
        self.seen_refs.add(b.ref)
        link = ""
        if b.ref in self.kernel_links:
            link = f'<a class="to-code" href="#{self.kernel_links[b.ref]}" title="the generated code">code ↓</a>'
        return f'<div class="equation" id="{anchor(b.ref)}">{body}{link}</div>'

    def _Bullets(self, b):
        return "<ul>" + "".join(f"<li>{prose(i)}</li>" for i in b.items) + "</ul>"

    def _Code(self, b):
        return f'<pre class="snippet"><code class="language-{b.language}">{escape(b.text.rstrip())}</code></pre>'

    def _Figure(self, b):
        return (f'<figure><img src="{escape(b.path)}" alt="{escape(b.caption)}">'
                f"<figcaption>{prose(b.caption)}</figcaption></figure>")

