"""The generated kernel module as HTML, each statement linked to the equation it implements and back.

The code generator writes a comment naming the equation above every statement it emits
(``# z1[b,o] = ...``, ``# d_z1[b,o] = ...``; see ``codegen.lower.pretty``). A comment line whose
left-hand side names a tensor the page shows an equation for becomes a link to that equation, and the
equation links to its first statement.
"""
from __future__ import annotations

from html import escape
import re

from .html import anchor

_EQUATION_COMMENT = re.compile(r"^(?P<indent>\s*)# (?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:\[[^\]]*\])? = ")


def kernel_source(model, dtype: str = "float64") -> tuple[str | None, str | None]:
    """(the generated module's text, None) or (None, why it cannot be generated)."""
    from ..codegen import render_module
    from ..derive.errors import ChainruleError
    try:
        return render_module(model, dtype=dtype), None
    except ChainruleError as err:
        return None, f"{type(err).__name__}: {err}"


def linked_source(source: str, shown: set) -> tuple[str, dict]:
    """The source as HTML lines, and {tensor name: id of the first statement computing it}.
    ``shown`` is the set of tensor names that have an equation anchor on the page."""
    lines, first, count = [], {}, {}
    for number, line in enumerate(source.splitlines(), 1):
        m = _EQUATION_COMMENT.match(line)
        name = m["name"] if m else None
        if name in shown:
            count[name] = count.get(name, 0) + 1
            ident = f"k-{anchor(name)[3:]}-{count[name]}"
            first.setdefault(name, ident)
            lines.append(f'<span class="line" id="{ident}"><a class="to-eq" href="#{anchor(name)}" '
                         f'title="the equation this statement implements">{escape(line)}</a></span>')
        else:
            lines.append(f'<span class="line">{escape(line)}</span>')
    return '<pre class="kernel"><code>' + "\n".join(lines) + "</code></pre>", first
