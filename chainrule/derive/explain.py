"""Explanations: a derivation is data (headings, paragraphs, display equations, recorded steps);
printers turn it into LaTeX, Markdown (GitHub math) or Jupyter output.

Nothing here knows any particular layer: every equation comes from the model or its derivation,
every matrix form from ``matrix.py``'s patterns, every justification from the step that made it.
"""
from __future__ import annotations

import itertools

from dataclasses import dataclass, field
from pathlib import PurePosixPath
import re

import sympy as sp

from .backprop import Gradients, derive
from .graph import Model
from .layers import B
from .matrix import matrix_form, self_check
from .patterns import describe as describe_patterns
from .notes import Note
from .printing import IndexPrinter
from .tensor import Equation


# -- the document -------------------------------------------------------------------------------------
@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str              # plain text with inline math between $...$


@dataclass
class Display:
    tex: str               # one display equation
    ref: str | None = None  # the tensor it defines (forward) or the adjoint it gives: an anchor for links


@dataclass
class Code:
    """A runnable snippet (Python), shown as is."""
    text: str
    language: str = "python"


@dataclass
class Figure:
    """An image file (a plot an experiment wrote), with its caption."""
    path: str
    caption: str


@dataclass
class Bullets:
    items: list


@dataclass
class Explanation:
    title: str
    blocks: list = field(default_factory=list)
    matrix_forms: list = field(default_factory=list)     # every MatrixForm printed (each one checked)

    def add(self, *blocks):
        self.blocks.extend(blocks)

    def to_markdown(self) -> str:
        return MarkdownPrinter().render(self)

    def to_latex(self, standalone=True) -> str:
        return LatexDocPrinter().render(self, standalone)

    def equations(self) -> list[str]:
        """Every display equation (for Jupyter's LaTeX view and for validation)."""
        return [b.tex for b in self.blocks if isinstance(b, Display)]

    def _repr_markdown_(self):
        return self.to_markdown()

    def _repr_latex_(self):
        return "$$\\begin{aligned}" + r" \\ ".join(
            e.replace("=", "&=", 1) for e in self.equations()) + "\\end{aligned}$$"


class MarkdownPrinter:
    """GitHub-flavoured Markdown: ``$...$`` inline, fenced ```math blocks for display equations."""

    def render(self, doc: Explanation) -> str:
        out = [f"# {doc.title}", ""]
        for b in doc.blocks:
            out += getattr(self, "_" + type(b).__name__)(b) + [""]
        return "\n".join(out).rstrip() + "\n"

    def _Heading(self, b):
        return ["#" * (b.level + 1) + " " + b.text]

    def _Para(self, b):
        return [b.text]

    def _Display(self, b):
        return ["```math", b.tex, "```"]

    def _Bullets(self, b):
        return [f"- {item}" for item in b.items]

    def _Code(self, b):
        return [f"```{b.language}", b.text.rstrip("\n"), "```"]

    def _Figure(self, b):
        return [f"![{b.caption}]({b.path})"]


_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def latex_text(text: str) -> str:
    r"""Escape the plain-text parts of a string; leave ``$...$`` math alone. The explanations' own
    inline markup (``*emphasis*`` and ```code```, as in Markdown) becomes ``\emph`` and ``\texttt``."""
    parts = re.split(r"(\$[^$]+\$)", text)
    return "".join(p if p.startswith("$") and p.endswith("$") and len(p) > 1 else _latex_prose(p) for p in parts)


def _latex_prose(text: str) -> str:
    out = []
    for k, piece in enumerate(re.split(r"(`[^`]+`|\*[^*\s][^*]*\*)", text)):
        if k % 2 == 0:
            out.append("".join(_LATEX_SPECIAL.get(c, c) for c in piece))
        else:
            inner = "".join(_LATEX_SPECIAL.get(c, c) for c in piece[1:-1])
            out.append(rf"\texttt{{{inner}}}" if piece[0] == "`" else rf"\emph{{{inner}}}")
    return "".join(_UNICODE_MATH.get(c) or _greek(c) or c for c in "".join(out))


_UNICODE_MATH = {"→": r"$\to$", "←": r"$\leftarrow$", "≤": r"$\le$", "≥": r"$\ge$", "×": r"$\times$",
                 "·": r"$\cdot$", "∂": r"$\partial$", "⊙": r"$\odot$", "ℓ": r"$\ell$", "−": "-",
                 "–": "--", "—": "---", "’": "'", "‘": "`", "√": r"$\surd$", "∑": r"$\sum$", "ᵀ": r"$^\top$"}


_SCRIPTS = {**{c: f"$^{{{k}}}$" for k, c in enumerate("⁰¹²³⁴⁵⁶⁷⁸⁹")},
            **{c: f"$_{{{k}}}$" for k, c in enumerate("₀₁₂₃₄₅₆₇₈₉")}}
_UNICODE_MATH.update(_SCRIPTS)


def _greek(c: str) -> str | None:
    """Greek letters in prose (σ, δ, Σ) as pdflatex math: σ -> $\\sigma$."""
    import unicodedata
    name = unicodedata.name(c, "")
    for prefix, case in (("GREEK SMALL LETTER ", str.lower), ("GREEK CAPITAL LETTER ", str.capitalize)):
        if name.startswith(prefix):
            letter = name[len(prefix):].replace("LAMDA", "LAMBDA")     # Unicode spells λ "lamda"
            return rf"$\{case(letter)}$"
    return None


LISTINGS_SETUP = (r"\usepackage{listings}\lstset{basicstyle=\ttfamily\footnotesize,breaklines=true,"
                  r"columns=fullflexible,keepspaces=true,upquote=false}")


def _literate(code: str) -> str:
    """A listings ``literate`` option typesetting each non-ASCII character of ``code`` as prose does
    (σ -> $\\sigma$); one with no LaTeX form is shown as its code point, never dropped."""
    rules = []
    for c in sorted({c for c in code if ord(c) > 127}):
        tex = _UNICODE_MATH.get(c) or _greek(c) or f"[U+{ord(c):04X}]"
        rules.append(f"{{{c}}}{{{{{tex}}}}}1")
    return "literate=" + " ".join(rules) if rules else ""


class LatexDocPrinter:
    """A LaTeX article (pdflatex-ready with amsmath, amssymb, bm)."""

    def render(self, doc: Explanation, standalone=True) -> str:
        body = []
        for b in doc.blocks:
            body += getattr(self, "_" + type(b).__name__)(b)
        text = "\n".join(body)
        if not standalone:
            return text
        return "\n".join([r"\documentclass{article}", r"\usepackage{amsmath,amssymb,bm}", LISTINGS_SETUP,
                          r"\usepackage[margin=2cm]{geometry}", r"\allowdisplaybreaks",
                          rf"\title{{{latex_text(doc.title)}}}", r"\author{chainrule}", r"\date{}", r"\begin{document}",
                          r"\maketitle", text, r"\end{document}", ""])

    def _Heading(self, b):
        return [("\\section*{" if b.level == 1 else "\\subsection*{") + latex_text(b.text) + "}"]

    def _Para(self, b):
        return [latex_text(b.text), ""]

    def _Display(self, b):
        return [r"\begin{equation*}", b.tex, r"\end{equation*}"]

    def _Bullets(self, b):
        return [r"\begin{itemize}"] + [r"\item " + latex_text(i) for i in b.items] + [r"\end{itemize}"]

    def _Code(self, b):
        # listings, not verbatim: long generated lines wrap, and the non-ASCII characters of the code's
        # comments (Σ, δ, ±) are typeset through `literate`, which pdflatex's verbatim cannot do
        return [rf"\begin{{lstlisting}}[{_literate(b.text)}]", b.text.rstrip("\n"), r"\end{lstlisting}"]

    def _Figure(self, b):      # needs graphicx; the file is looked up on the \graphicspath (the book's: figures/)
        return [r"\begin{center}", rf"\includegraphics[width=0.8\linewidth]{{{PurePosixPath(b.path).name}}}",
                r"\par " + latex_text(b.caption), r"\end{center}"]


# -- writing explanations ---------------------------------------------------------------------------
class Writer:
    """Turns a model and its derivation into an Explanation."""

    def __init__(self, model: Model, grads: Gradients):
        self.model, self.grads = model, grads
        self.tensors = {**model.tensors, **{a.name: a for a in grads.adjoints.values()}}
        self.printer = IndexPrinter(self.tensors, symbol_names=dict(getattr(model, "constant_latex", {})))
        self.forms = []

    def tex(self, expr) -> str:
        return self.printer.doprint(expr)

    def inline(self, expr) -> str:
        return f"${self.tex(expr)}$"

    def equation(self, eq: Equation, rhs=None) -> str:
        return f"{self.tex(eq.lhs)} = {self.tex(eq.body if rhs is None else rhs)}"

    def why(self, step) -> str:
        return "; ".join(w.render(self.inline) if isinstance(w, Note) else str(w) for w in step.why)

    def shape(self, t) -> str:
        return r" \times ".join(self.tex(s) for s in t.shape) if t.shape else "1"

    def matrix_blocks(self, eq: Equation, per_example=False) -> list:
        batched = bool(eq.indices) and eq.out.shape[0] == B
        if per_example and (not batched or eq.out.rank >= 3):     # rank 3: already per example
            return []
        # a rank-3 tensor (batch, time, feature) has a matrix form only per example
        per_example = per_example or (batched and eq.out.rank >= 3)
        fixed = [eq.indices[0]] if per_example else []
        mf = matrix_form(eq, self.tensors, fixed=fixed)      # None unless it passed its numeric check
        label = ("Per example (column vectors)" if eq.out.rank < 3 else "For each example") if per_example \
            else "In matrix form"
        axis = eq.out.meta.get("time_axis")
        if mf is None and per_example and axis is not None and eq.indices[axis] not in fixed:
            # a sequence that reads other steps (a recurrence, its adjoint): one step's form, the
            # other steps' reads as H_{t-1}, Δ_{t+1}
            step = eq.indices[axis]
            mf = matrix_form(eq, self.tensors, fixed=fixed + [step], time=[step])
            label = f"For each example and step ${self.tex(step)}$ (column vectors)"
        if mf is None and len(eq.indices) - len(fixed) > 2:
            mf, label = self.sliced_form(eq, fixed, label)
        if mf is None:
            return []
        self.forms.append(mf)
        blocks = [Para(f"{label}, shape ${mf['shape']}$:"), Display(f"{mf['lhs']} = {mf['rhs']}")]
        if mf["notes"]:
            blocks.append(Bullets(mf["notes"]))
        return blocks

    def sliced_form(self, eq: Equation, fixed: list, label: str):
        """A tensor of more than two free indices (attention's (B, heads, T, d)): a matrix form per
        slice, with all but two of its indices fixed and written as subscripts (``S_h = Q_h K_hᵀ/√d``
        for each example and head). Of the choices of indices that lift, the one with the fewest
        explicit sums (then the earliest indices) that passes its numeric check."""
        free = [i for i in eq.indices if i not in fixed]
        found = []
        for order, extra in enumerate(itertools.combinations(free, len(free) - 2)):
            mf = matrix_form(eq, self.tensors, fixed=fixed + list(extra), time=list(extra), check=False)
            if mf is not None:
                found.append((mf.rhs.count(r"\sum"), order, mf, extra))
        for _, _, mf, extra in sorted(found, key=lambda f: f[:2]):
            if self_check(mf, self.tensors):
                each = ", ".join(f"${self.tex(i)}$" for i in extra)
                whole = f" of the ${self.shape(eq.out)}$ tensor"
                return mf, (f"For each example and each {each}{whole}" if fixed else f"For each {each}{whole}")
        return None, label

    def contributions(self, d) -> list:
        """A tensor read by several equations: the term each use contributes, and that they add."""
        if len(d.contributions) < 2:
            return []
        lhs = self.tex(d.equation.lhs)
        items = []
        for eq, term in d.contributions:
            what = f"through ${eq.out.latex}$ ({eq.note or eq.layer})" if eq.note or eq.layer else f"through ${eq.out.latex}$"
            reads = term.atoms(sp.Indexed)
            identity = (len(reads) == 1 and term == next(iter(reads))
                        and tuple(next(iter(reads)).indices) == tuple(d.equation.indices))
            extra = (": the identity path, which passes the adjoint on unchanged, so that it cannot vanish "
                     "through this connection") if identity else ""
            items.append(f"{what}: ${self.tex(term)}${extra}")
        return [Para(f"${d.tensor.latex}$ is used {len(d.contributions)} times, so its adjoint is the sum of "
                     f"one contribution per use (${lhs}$ adds them):"), Bullets(items)]

    def patterns(self, eq: Equation) -> list:
        return [Para(t) for t in describe_patterns(eq, self.tensors, self.inline)]

    def steps(self, derivation) -> list:
        blocks = []
        lhs = derivation.equation.lhs
        for k, step in enumerate(derivation.steps, 1):
            blocks.append(Para(f"Step {k}, *{step.rule}*: {self.why(step)}"))
            blocks.append(Display(f"{self.tex(lhs)} = {self.tex(step.after)}"))
        return blocks


def _sizes_line(model: Model) -> str:
    parts = [f"${sp.latex(s)} = {v}$" for s, v in sorted(model.size_values.items(), key=lambda kv: str(kv[0]))]
    return "Sizes: $B$ is the batch size (any), " + ", ".join(parts) + "."


def explain_model(model: Model, grads: Gradients | None = None, title: str | None = None) -> Explanation:
    """The whole story: forward pass, loss and cost, each adjoint step by step, the backward recursion."""
    grads = grads or derive(model)
    w = Writer(model, grads)
    doc = Explanation(title or f"Backpropagation in the model `{model.name}`")
    layers = " → ".join(layer.describe() for _, layer in model.layers)
    doc.add(Para(f"Layers: input → {layers} → {model.loss.layer.split(':', 1)[-1] if model.loss else ''}. "
                 + _sizes_line(model)),
            Para("Notation: $C$ is the cost being minimised, $\\ell_b$ the loss of example $b$; "
                 "$\\frac{\\partial C}{\\partial T}$ is the adjoint of a tensor $T$, and "
                 "$\\delta^{(l)} = \\frac{\\partial C}{\\partial z^{(l)}}$. Every formula below was derived "
                 "by chainrule from the forward equations. A bracket $[P]$ is 1 where $P$ holds and 0 "
                 "otherwise (Iverson's notation). Every matrix form was checked numerically against its "
                 "index form."))

    doc.add(Heading(1, "Forward pass"))
    for eq in model.equations:
        if eq.out.role in ("loss", "cost"):
            continue
        doc.add(Para(f"Layer {eq.layer.replace(':', ' (', 1)}): {eq.note}; ${eq.out.latex}$ has shape ${w.shape(eq.out)}$."),
                Display(w.equation(eq), ref=eq.out.name), *w.matrix_blocks(eq))

    doc.add(Heading(1, "Loss and cost"))
    for eq in model.equations:
        if eq.out.role == "loss":
            doc.add(Para(f"The loss is per example ({eq.note}):"), Display(w.equation(eq), ref=eq.out.name))
        if eq.out.role == "cost":
            doc.add(Para("The cost averages the per-example losses over the batch; "
                         "gradient descent minimises the cost:"), Display(w.equation(eq), ref=eq.out.name))

    doc.add(Heading(1, "Backward pass, one tensor at a time"))
    doc.add(Para("For each tensor read by an equation, the chain rule sums the upstream adjoint times "
                 "the local derivative over everything that reads it; the steps show how the engine "
                 "reaches the textbook form."))
    for name, d in grads.derivations.items():
        doc.add(Heading(2, f"Adjoint of ${w.tex(d.tensor[d.equation.indices] if d.tensor.rank else d.tensor.read())}$"))
        doc.add(*w.steps(d))
        doc.add(Para("Result:"), Display(w.equation(d.equation)), *w.patterns(d.equation),
                *w.contributions(d), *w.matrix_blocks(d.equation))

    doc.add(*_through_time(model, grads, w))
    doc.add(Heading(1, "The backward recursion"))
    doc.add(Para("Inserting the adjoints of the activations and of the loss into the layers below gives "
                 "the recursion for $\\delta^{(l)}$ and the parameter gradients:"))
    for name, d in grads.composed.items():
        doc.add(Heading(2, f"${w.tex(d.equation.lhs)}$"))
        result = w.steps(d) if d.steps else [Display(w.equation(d.equation))]   # last step = result
        result[-1].ref = d.equation.out.name          # what the kernels compute: linked to their code
        doc.add(*result)
        doc.add(*w.patterns(d.equation))
        doc.add(*w.matrix_blocks(d.equation), *w.matrix_blocks(d.equation, per_example=True))
    constraints = getattr(model, "constraints", [])
    if constraints:
        doc.add(Heading(1, "Constraints, applied after each update"))
        for eq in constraints:
            param = model.tensors[eq.out.meta["param"]]
            doc.add(Para(f"{eq.note}. A projection, not a term of the cost (so it adds nothing to the "
                         f"gradient): after each optimiser step, a row of ${param.latex}$ whose norm "
                         f"exceeds the bound is rescaled onto it, and any other row is left alone:"),
                    Display(f"{w.tex(param[eq.indices])} \\leftarrow {w.tex(eq.body)}"))
    _running_averages(doc, model, w)
    doc.matrix_forms = w.forms
    return doc


def _through_time(model: Model, grads: Gradients, w: Writer) -> list:
    """For a model with recurrences: what backpropagation through time is, said of this model's own
    derived equations (which tensors recur, what each adjoint reads at t+1, which sums run over t)."""
    from .recurrence import Delayed, TimeLoop, ordered_units, time_shift
    loops = [u for u in model.schedule if isinstance(u, TimeLoop)]
    if not loops:
        return []
    blocks = [Heading(1, "Through time")]
    for loop in loops:
        names = ", ".join(f"${e.out.latex}$" for e in loop.equations)
        starts = []
        for e in loop.equations:
            for d in e.body.atoms(Delayed):
                t = model.tensors[str(d.args[1].base.label)]
                init = d.args[0]
                starts.append(f"${t.latex}$ starts from "
                              + ("$0$" if init == 0 else f"${w.tex(init)}$"))
        blocks.append(Para(
            f"The equations of {names} read their own past ({'; '.join(sorted(set(starts)))} before the "
            f"first step), so the forward pass runs them one time step at a time, $t = 0, 1, \\dots$; the "
            f"sequence length stays a symbol in every formula below."))
    backward = [u for u in ordered_units([d.equation for d in grads.composed.values()]) if isinstance(u, TimeLoop)]
    for loop in backward:
        for e in loop.equations:
            t_index = e.indices[loop.time_axes[e.out.name]]
            ahead = {}
            for r in sorted(e.body.atoms(sp.Indexed), key=sp.default_sort_key):   # not set order: same text every run
                shifts = [time_shift(i, [t_index]) for i in r.indices]
                if any(sh is not None and sh[1] > 0 for sh in shifts):
                    ahead.setdefault(str(r.base.label), w.tex(r))
            if not ahead:                  # computed within the step from adjoints that do
                continue
            reads = ", ".join(f"${tex}$" for _, tex in sorted(ahead.items()))
            blocks.append(Para(
                f"Backpropagation through time: the adjoint ${e.out.latex}$ at step ${w.tex(t_index)}$ receives "
                f"what the layers above send at that step and, through the recurrence, what the next step "
                f"${w.tex(t_index + 1)}$ sends back (it reads {reads} there; at the last step nothing comes "
                f"from the future). So it is computed backward in time, from the last step to the first:"))
            blocks.append(Display(w.equation(e)))
    time_sizes = {model.tensors[e.out.name].shape[loop.time_axes[e.out.name]] for loop in loops
                  for e in loop.equations}
    summed = [d for d in grads.composed.values() if d.tensor.role == "param"
              and any(any(sp.sympify(hi).free_symbols & set().union(*[sp.sympify(n).free_symbols for n in time_sizes])
                          for _, _, hi in s.limits) for s in d.equation.body.atoms(sp.Sum))]
    if summed:
        blocks.append(Para("The weights are shared by every step, so each weight's gradient is a sum over "
                           "the steps (" + ", ".join(f"${w.tex(d.equation.lhs)}$" for d in summed) + "). "
                           "A product of many such backward steps shrinks or grows geometrically with the "
                           "distance in time: the vanishing (or exploding) gradient of recurrent networks, "
                           "which an LSTM's cell, updated by a sum rather than a matrix product, avoids."))
    return blocks


def in_evaluation(model: Model, body):
    """``body`` with every read of a tensor that has an evaluation form (batch norm's statistics)
    replaced by that form, at the read's indices: the formula evaluation mode computes."""
    for name, ev in getattr(model, "eval_equations", {}).items():
        base = model.tensors[name].base
        body = body.replace(lambda e, b=base: isinstance(e, sp.Indexed) and e.base == b,
                            lambda e, ev=ev: ev.body.xreplace(dict(zip(ev.indices, e.indices))))
    return body


def _running_averages(doc, model: Model, w: Writer):
    """The declared running averages and the evaluation-mode forward equations they feed."""
    updates, evals = getattr(model, "buffer_updates", []), getattr(model, "eval_equations", {})
    if not updates:
        return
    doc.add(Heading(1, "Running averages, and evaluation mode"))
    doc.add(Para("Some tensors are non-trainable state (buffers): they get no gradient. After each "
                 "training step each is updated from that step's forward pass, as declared:"))
    for eq in updates:
        buf = model.tensors[eq.out.meta["buffer"]]
        values = [f"${w.tex(c)} = {v:g}$" for c, v in model.constants.items() if eq.body.has(c)]
        doc.add(Para(f"{eq.note[0].upper()}{eq.note[1:]} (layer {eq.layer.replace(':', ' (', 1)}), "
                     f"starting at {0 if buf.init == 'zeros' else 1}"
                     + (f"; {', '.join(values)}" if values else "") + "):"),
                Display(f"{w.tex(buf[eq.indices])} \\leftarrow {w.tex(eq.body)}"))
    doc.add(Para("In evaluation (prediction, validation) the batch statistics are replaced by these "
                 "averages, so one example's output does not depend on the others in its batch:"),
            Display(r", \quad ".join(f"{w.tex(ev.lhs)} \\to {w.tex(ev.body)}" for ev in evals.values())))
    for eq in model.equations:
        if eq.out.name in evals or not any(r in evals for r, _ in eq.reads()):
            continue
        doc.add(Para(f"so layer {eq.layer.replace(':', ' (', 1)}) computes, in evaluation,"),
                Display(w.equation(eq, in_evaluation(model, eq.body))))


def derivation_markdown(model: Model) -> str:
    return explain_model(model).to_markdown()
