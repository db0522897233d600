"""Lifting index form to matrix form, by pattern (never per layer).

The patterns: a read is a matrix or vector (transposed when its indices come in the other order); a
sum over one shared index of two factors is a matrix product; a sum over one index of one factor is a
product with a vector of ones; factors over the same indices multiply elementwise (⊙); a vector times a
matrix along one axis is a product with ``diag``; a vector added to a matrix is broadcast as an outer
product with ones; a scalar function of one read applies elementwise. Anything else has no matrix form
and the index form stands alone (a refusal, not a guess).

With ``fixed`` indices (the batch index), the same patterns give the per-example form, where a
batch matrix ``Δ`` becomes the column vector ``δ``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import re

import sympy as sp

from .printing import IndexPrinter


class NoMatrixForm(Exception):
    """The expression matches none of the patterns."""


@dataclass
class Mat:
    tex: str
    idx: tuple                 # the loop index of each axis (0, 1 or 2 of them)
    atom: bool = True          # prints without parentheses as a factor
    notes: list = field(default_factory=list)


_UPPER = {r"\delta": r"\Delta", r"\ell": r"\boldsymbol{\ell}"}


def _with_sup(tex: str, sup: str) -> str:
    """Append to the superscript: W^{(1)} -> W^{(1)\\top}."""
    m = re.fullmatch(r"(.*)\^\{(.*)\}", tex)
    if m and "{" not in m.group(1):
        return f"{m.group(1)}^{{{m.group(2)}{sup}}}"
    return f"{tex}^{{{sup}}}"


class Lifter:
    def __init__(self, tensors: dict, ranges: dict, fixed=()):
        self.tensors = tensors
        self.ranges = ranges            # index -> (lo, hi)
        self.fixed = set(fixed)
        self.printer = IndexPrinter(tensors)

    # names -------------------------------------------------------------------------------------
    def name(self, t) -> str:
        if t.role == "adjoint":
            of = self.tensors.get(t.meta["of"])
            if not t.meta.get("custom_latex") and of is not None:
                return rf"\frac{{\partial C}}{{\partial {self.name(of)}}}"
        tex = t.latex
        if self.fixed or t.role == "param" or t.rank < 2:
            return tex
        for small, big in _UPPER.items():
            if tex.startswith(small):
                return big + tex[len(small):]
        if tex[:1].isalpha() and tex[:1].islower():
            return tex[0].upper() + tex[1:]
        return tex

    def size_tex(self, idx) -> str:
        if not idx:
            return "1 \\times 1"
        sizes = [self.printer.doprint(sp.simplify(self.ranges[i][1] - self.ranges[i][0] + 1)) for i in idx]
        return " \\times ".join(sizes) if len(sizes) == 2 else sizes[0]

    # building blocks ---------------------------------------------------------------------------
    def transpose(self, m: Mat) -> Mat:
        if len(m.idx) < 2:
            return m
        tex = _with_sup(m.tex, r"\top") if m.atom else rf"\left({m.tex}\right)^{{\top}}"
        return Mat(tex, m.idx[::-1], True, m.notes)

    def paren(self, m: Mat) -> str:
        return m.tex if m.atom else rf"\left({m.tex}\right)"

    def aligned(self, m: Mat, order) -> Mat:
        if tuple(m.idx) == tuple(order):
            return m
        if tuple(m.idx[::-1]) == tuple(order):
            return self.transpose(m)
        raise NoMatrixForm(f"indices {m.idx} cannot be arranged as {order}")

    # the patterns ------------------------------------------------------------------------------
    def lift(self, expr, order=None) -> Mat:
        if isinstance(expr, sp.Indexed):
            t = self.tensors[str(expr.base.label)]
            idx = tuple(i for i in expr.indices if i not in self.fixed)
            if not all(isinstance(i, sp.Symbol) for i in idx) or len(set(idx)) != len(idx):
                raise NoMatrixForm(f"{expr}: not a plain read")
            return Mat(self.name(t), idx)
        if expr.is_Number or (isinstance(expr, sp.Symbol) and not (expr.free_symbols & set(self.ranges))):
            return Mat(self.printer.doprint(expr), (), atom=not expr.is_negative)
        if isinstance(expr, sp.Sum):
            return self.lift_sum(expr, order)
        if expr.is_Add:
            return self.lift_add(expr, order)
        if expr.is_Mul:
            return self.lift_mul(expr, order)
        if expr.is_Pow and expr.exp.is_Integer and expr.exp > 0:
            base = self.lift(expr.base, order)
            tex = rf"\left({base.tex}\right)" if ("^" in base.tex or not base.atom) else base.tex
            return Mat(rf"{tex}^{{\circ {expr.exp}}}", base.idx, True, base.notes)
        if isinstance(expr, sp.Function) and len(expr.args) >= 1:
            return self.lift_function(expr, order)
        raise NoMatrixForm(f"no pattern for {type(expr).__name__}")

    def lift_function(self, expr, order):
        inner = [a for a in expr.args if a.free_symbols & (set(self.ranges) - self.fixed)]
        if len(inner) != 1:
            raise NoMatrixForm(f"{expr}: not an elementwise function of one argument")
        arg = self.lift(inner[0], order)
        placeholder = sp.Symbol("PLACEHOLDER")
        tex = self.printer.doprint(expr.xreplace({inner[0]: placeholder}))
        return Mat(tex.replace("PLACEHOLDER", arg.tex), arg.idx, True, arg.notes)

    def lift_sum(self, expr, order):
        if len(expr.limits) != 1:
            raise NoMatrixForm("a sum over several indices")
        k, lo, hi = expr.limits[0]
        full = self.ranges.get(k)
        if full is None or sp.simplify(lo - full[0]) != 0 or sp.simplify(hi - full[1]) != 0:
            raise NoMatrixForm("a sum over part of a range")
        factors = sp.Mul.make_args(expr.function)
        scalars = [f for f in factors if not (f.free_symbols & set(self.ranges))]
        rest = [f for f in factors if f.free_symbols & set(self.ranges)]
        scale = sp.Mul(*scalars)
        if len(rest) == 1:
            m = self.lift(rest[0])
            if k not in m.idx:
                raise NoMatrixForm("the summed index is not an axis")
            free = tuple(i for i in m.idx if i != k)
            if not free:
                out = Mat(rf"\mathbf{{1}}^{{\top}} {self.paren(m)}", (), True, m.notes)
            else:
                out = Mat(rf"{self.aligned(m, free + (k,)).tex} \mathbf{{1}}", free, True,
                          m.notes + [f"$\\mathbf{{1}}$ is the vector of ${self.size_tex((k,))}$ ones: "
                                     f"multiplying by it sums over ${self.printer.doprint(k)}$"])
        elif len(rest) == 2:
            out = self.contraction(k, *[self.lift(f) for f in rest], order)
        else:
            raise NoMatrixForm("a sum of a product of more than two factors")
        return self.scaled(scale, out)

    def contraction(self, k, a: Mat, b: Mat, order) -> Mat:
        if k not in a.idx or k not in b.idx:
            raise NoMatrixForm("the summed index is missing from a factor")
        fa = tuple(i for i in a.idx if i != k)
        fb = tuple(i for i in b.idx if i != k)
        if len(fa) + len(fb) > 2:
            raise NoMatrixForm("a contraction with too many free indices")
        want = tuple(order) if order else fa + fb
        if fb and fb[0] == want[0] and fa != fb:        # b supplies the first output index: swap
            a, b, fa, fb = b, a, fb, fa
        notes = a.notes + b.notes
        left = self.aligned(a, fa + (k,)) if fa else a
        right = self.aligned(b, (k,) + fb) if fb else b
        for m, orig, pos in ((left, a, "second"), (right, b, "first")):
            if m is not orig and m.tex != orig.tex and fa:
                notes.append(
                    f"the sum runs over ${self.printer.doprint(k)}$, which is not the {pos} index of "
                    f"${orig.tex}$; a matrix product $AB$ sums the second index of $A$ against the first "
                    f"index of $B$, so ${orig.tex}$ enters transposed as ${m.tex}$")
        if not fa and not fb:
            tex, idx = rf"{self.transpose_vec(left)} {self.paren(right)}", ()
        elif not fa:                                    # vector · matrix: write as matrixᵀ vector
            right_t = self.transpose(right)
            tex, idx = rf"{right_t.tex} {self.paren(left)}", fb
            kk, q = self.printer.doprint(k), self.printer.doprint(fb[0])
            notes.append(f"the sum runs over ${kk}$, the first index of ${right.tex}$: "
                         f"$\\sum_{{{kk}}} {right.tex}_{{{kk}{q}}} v_{{{kk}}} = ({right_t.tex} v)_{{{q}}}$, "
                         f"hence the transpose")
            left, right = right_t, left
        else:
            tex, idx = rf"{self.paren(left)} {self.paren(right)}", fa + fb
        shapes = (f"${left.tex}$ is ${self.size_tex(fa + (k,))}$ and ${right.tex}$ is "
                  f"${self.size_tex((k,) + fb)}$, so the product is ${self.size_tex(fa + fb)}$")
        return Mat(tex, idx, False, notes + [shapes])

    @staticmethod
    def transpose_vec(m: Mat) -> str:
        return _with_sup(m.tex, r"\top") if m.atom else rf"\left({m.tex}\right)^{{\top}}"

    def scaled(self, scale, m: Mat) -> Mat:
        if scale == 1:
            return m
        s = self.printer.doprint(scale)
        return Mat(rf"{s} {self.paren(m)}" if scale != -1 else rf"- {self.paren(m)}", m.idx, False, m.notes)

    def lift_mul(self, expr, order):
        scalars = [f for f in expr.args if not (f.free_symbols & (set(self.ranges) - self.fixed))
                   and not isinstance(f, (sp.Indexed, sp.Sum))]
        rank = lambda f: 0 if isinstance(f, sp.Sum) else 1 if isinstance(f, sp.Indexed) else 2  # noqa: E731
        parts = [self.lift(f, order) for f in sorted(expr.args, key=rank) if f not in scalars]
        if not parts:
            raise NoMatrixForm("no tensor factor")
        full = max(parts, key=lambda m: len(m.idx)).idx
        target = tuple(order) if order and set(order) == set(full) else full
        mats = [p for p in parts if set(p.idx) == set(target)]
        vecs = [p for p in parts if p not in mats]
        if len(mats) == 1 and not vecs:
            return self.scaled(sp.Mul(*scalars), self.aligned(mats[0], target))
        tex = r" \odot ".join(self.paren(self.aligned(m, target)) for m in mats)
        notes = [n for p in parts for n in p.notes]
        if len(mats) > 1:
            notes.append(r"$\odot$ is the elementwise (Hadamard) product")
        for v in vecs:
            if len(v.idx) != 1 or v.idx[0] not in target:
                raise NoMatrixForm("a factor broadcast along an unsupported axis")
            if len(target) == 1:
                tex = rf"{self.paren(v)} \odot {tex}"
            elif target.index(v.idx[0]) == 0:
                tex = rf"\operatorname{{diag}}\left({v.tex}\right) {tex}"
            else:
                tex = rf"{tex} \operatorname{{diag}}\left({v.tex}\right)"
        return self.scaled(sp.Mul(*scalars), Mat(tex, target, False, notes))

    def lift_add(self, expr, order):
        signed = [(-1, -t) if t.as_coeff_Mul()[0].is_negative else (1, t) for t in expr.args]
        signed.sort(key=lambda st: st[0] < 0)                       # P - Y, 1 - A
        lifted = [(sign, self.lift(t, order)) for sign, t in signed]
        lifted.sort(key=lambda sm: (sm[0] < 0, -len(sm[1].idx)))   # X W^T before the broadcast bias
        signs = [sign for sign, _ in lifted]
        terms = [m for _, m in lifted]
        full = max(terms, key=lambda m: len(m.idx)).idx
        target = tuple(order) if order and set(order) == set(full) else full
        out, notes = [], []
        for m in terms:
            notes += m.notes
            if set(m.idx) == set(target):
                out.append(self.aligned(m, target).tex)
            elif not m.idx:
                out.append(m.tex)                        # a scalar, broadcast to every element
            elif len(m.idx) == 1 and len(target) == 2:
                if m.idx[0] == target[1]:
                    out.append(rf"\mathbf{{1}} {_with_sup(m.tex, chr(92) + 'top')}")
                    row = _with_sup(m.tex, chr(92) + "top")
                    notes.append(f"$\\mathbf{{1}} {row}$ repeats the row ${row}$ for every one of the "
                                 f"${self.size_tex(target[:1])}$ rows (broadcasting)")
                else:
                    out.append(rf"{m.tex} \mathbf{{1}}^{{\top}}")
            else:
                raise NoMatrixForm("terms over different indices")
        tex = out[0] if signs[0] > 0 else f"- {out[0]}"
        for sign, t in zip(signs[1:], out[1:]):
            tex += (" + " if sign > 0 else " - ") + t
        return Mat(tex, target, False, notes)


def matrix_form(eq, tensors: dict, extra_ranges=None, fixed=()) -> dict | None:
    """The matrix form of an index-form equation, with its shape and notes, or None."""
    ranges = {**(extra_ranges or {}), **eq.ranges()}
    for s in eq.body.atoms(sp.Sum):
        for v, lo, hi in s.limits:
            ranges.setdefault(v, (lo, hi))
    lifter = Lifter(tensors, ranges, fixed)
    order = tuple(i for i in eq.indices if i not in lifter.fixed)
    try:
        rhs = lifter.lift(eq.body, order)
        rhs = lifter.aligned(rhs, order) if len(rhs.idx) == 2 else rhs
        if set(rhs.idx) != set(order):
            raise NoMatrixForm("free indices differ")
    except (NoMatrixForm, KeyError):
        return None
    lhs = lifter.name(eq.out)
    notes = list(dict.fromkeys(rhs.notes))
    return {"lhs": lhs, "rhs": rhs.tex, "shape": lifter.size_tex(order), "notes": notes}
