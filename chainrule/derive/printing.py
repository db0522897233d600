"""LaTeX printing of index-notation expressions: SymPy's LatexPrinter, taught our tensors' names."""
from __future__ import annotations

import sympy as sp
from sympy.printing.latex import LatexPrinter

from .primitives import step


def _sub(indices, printer) -> str:
    parts = [printer._print(i) for i in indices]
    sep = "" if all(len(p) == 1 or (len(p) == 2 and p.endswith("'")) for p in parts) else ","
    return sep.join(parts)


def attach_subscript(tex: str, sub: str) -> str:
    return f"{{{tex}}}_{{{sub}}}" if "\\frac" in tex else f"{tex}_{{{sub}}}"


class IndexPrinter(LatexPrinter):
    """Prints reads ``T[b, o]`` as ``T_{bo}`` with each tensor's own LaTeX name.

    Adjoint tensors print as ``∂C/∂T_{bo}`` (or their declared symbol, e.g. ``δ^{(1)}_{bo}``).
    """

    def __init__(self, tensors: dict | None = None, **settings):
        super().__init__(settings)
        self.tensors = tensors or {}

    def _element(self, name: str, indices) -> str:
        t = self.tensors.get(name)
        if t is None:
            return attach_subscript(name.replace("_", r"\_"), _sub(indices, self)) if indices else name
        if t.role == "adjoint" and not t.meta.get("custom_latex"):
            of = self.tensors.get(t.meta["of"])
            inner = of.latex if of is not None else t.meta["of"]
            base = f"{{{inner}}}" if "_" in inner else inner
            inner = f"{base}_{{{_sub(indices, self)}}}" if indices else inner
            return rf"\frac{{\partial C}}{{\partial {inner}}}"
        base = f"{{{t.latex}}}" if "_" in t.latex else t.latex          # W_{q} read at ef: {W_{q}}_{ef}
        tex = f"{base}_{{{_sub(indices, self)}}}" if indices else t.latex
        return f"{{{tex}}}" if "^" in t.latex and indices else tex     # so a power's ^2 cannot clash

    def _print_Indexed(self, expr):
        return self._element(str(expr.base.label), expr.indices)

    def _print_Symbol(self, expr, style="plain"):
        t = self.tensors.get(expr.name)
        if t is not None and t.rank == 0:
            return self._element(expr.name, ())
        if expr.name.endswith("'"):
            return self._print_Symbol(sp.Symbol(expr.name[:-1])) + "'"
        return super()._print_Symbol(expr)

    def _print_Derivative(self, expr):
        num = self._print(expr.expr)
        den = " ".join(rf"\partial {self._print(v)}" for v, _ in expr.variable_count)
        return rf"\frac{{\partial {num}}}{{{den}}}"

    def _print_And(self, expr):
        a, b = expr.args
        if isinstance(a, sp.Le) and isinstance(b, sp.Le) and a.rhs == b.lhs:      # lo ≤ x ≤ hi
            return rf"{self._print(a.lhs)} \le {self._print(a.rhs)} \le {self._print(b.rhs)}"
        if isinstance(a, sp.Le) and isinstance(b, sp.Le) and b.rhs == a.lhs:
            return rf"{self._print(b.lhs)} \le {self._print(b.rhs)} \le {self._print(a.rhs)}"
        return super()._print_And(expr)

    def _print_Heaviside(self, expr, exp=None):
        # SymPy's derivative of Max/Min. Its default value ½ at 0 is replaced by chainrule's stated
        # convention step(0) = 0 (primitives.step; the code generator lowers it so), so it prints
        # exactly as the step does; an explicit other value at 0 keeps SymPy's θ with that value.
        x = expr.args[0]
        h0 = expr.args[1] if len(expr.args) > 1 else sp.S.Half
        if h0 in (sp.S.Half, sp.S.Zero):
            tex = self._print(step(x))
        else:
            tex = rf"\theta_{{{self._print(h0)}}}\left({self._print(x)}\right)"
        return rf"\left({tex}\right)^{{{exp}}}" if exp else tex

    def _print_KroneckerDelta(self, expr, exp=None):
        return rf"\delta_{{{_sub(expr.args, self)}}}"


def latex(expr, tensors=None) -> str:
    return IndexPrinter(tensors).doprint(expr)
