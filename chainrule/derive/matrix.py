"""Lifting index form to matrix form, by pattern (never per layer), and checking the result.

The patterns: a read is a matrix or vector (transposed when its indices come in the other order); a
sum over one shared index of two factors is a matrix product; a sum over one index of one factor is a
product with a vector of ones; factors over the same indices multiply elementwise (⊙); a vector times a
matrix along one axis is a product with ``diag``; a vector added to a matrix is broadcast as an outer
product with ones; a scalar function of one read applies elementwise. Anything else has no matrix form
and the index form stands alone (a refusal, not a guess).

A matrix form is built as a small expression tree (``Read``, ``T``, ``MatMul``, ``Hadamard``, ...),
never as text: the LaTeX is printed from the tree, and ``MatrixForm.check`` evaluates the same tree
with real matrix semantics (column vectors, strict shapes: a misplaced transpose is a shape error or
a wrong number) against the index form read numerically (``numeric.py``). A form that fails or cannot
be checked is not printed.

With ``fixed`` indices (the batch index), the same patterns give the per-example form, where a
batch matrix ``Δ`` becomes the column vector ``δ``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import itertools
import re

import numpy as np
import sympy as sp
from sympy.core.function import Application

from .errors import ChainruleError
from .numeric import IndexEvaluator, concrete, evaluate
from .printing import IndexPrinter
from .recurrence import Delayed


class NoMatrixForm(Exception):
    """The expression matches none of the patterns."""


# -- the tree: each node prints itself and evaluates itself (2-D arrays: vectors are columns) ----------
def with_sup(tex: str, sup: str) -> str:
    """Add to a name's superscript: ``W^{(1)}`` -> ``W^{(1)\\top}``; never a double superscript."""
    if tex.endswith("}"):
        depth = 0
        for k in range(len(tex) - 1, -1, -1):
            depth += {"}": 1, "{": -1}.get(tex[k], 0)
            if depth == 0:
                if k > 0 and tex[k - 1] == "^" and tex[:k - 1].count("{") == tex[:k - 1].count("}"):
                    return f"{tex[:-1]}{sup}}}"
                break
    if "^" in tex:
        return f"{{{tex}}}^{{{sup}}}"
    return f"{tex}^{{{sup}}}"


class Node:
    tex: str
    atom: bool = True

    def paren(self) -> str:
        return self.tex if self.atom else rf"\left({self.tex}\right)"


class Read(Node):
    def __init__(self, tex, name, indices, fixed):
        self.tex, self.name, self.indices, self.fixed = tex, name, tuple(indices), fixed
        self.atom = not tex.startswith(r"\frac")

    def value(self, ctx):
        arr = np.asarray(ctx.env[self.name], dtype=float)
        sel = tuple(ctx.fixed[i] if i in self.fixed else slice(None) for i in self.indices)
        return _as_2d(arr[sel] if self.indices else arr)


class Const(Node):
    def __init__(self, expr, printer):
        self.expr = expr
        self.tex = printer.doprint(expr)
        self.atom = not (expr.is_Add or expr.could_extract_minus_sign())

    def value(self, ctx):
        return np.array([[ctx.scalar(self.expr)]])


class Ones(Node):
    def __init__(self, length):
        self.length, self.tex = length, r"\mathbf{1}"

    def value(self, ctx):
        return np.ones((concrete(self.length, ctx.sizes), 1))


class T(Node):
    def __init__(self, m: Node):
        self.m = m
        self.tex = with_sup(m.tex, r"\top") if m.atom else rf"\left({m.tex}\right)^{{\top}}"

    def value(self, ctx):
        return self.m.value(ctx).T


def transpose(m: Node) -> Node:
    return m.m if isinstance(m, T) else T(m)


class MatMul(Node):
    atom = False

    def __init__(self, a: Node, b: Node):
        self.a, self.b = a, b
        self.tex = f"{a.paren()} {b.paren()}"

    def value(self, ctx):
        a, b = self.a.value(ctx), self.b.value(ctx)
        if a.shape[1] != b.shape[0]:
            raise ValueError(f"matrix product of shapes {a.shape} and {b.shape}")
        return a @ b


class Hadamard(Node):
    atom = False

    def __init__(self, parts):
        self.parts = list(parts)
        self.tex = r" \odot ".join(p.paren() for p in self.parts)

    def value(self, ctx):
        vals = [p.value(ctx) for p in self.parts]
        if len({v.shape for v in vals}) != 1:
            raise ValueError(f"elementwise product of shapes {[v.shape for v in vals]}")
        out = vals[0]
        for v in vals[1:]:
            out = out * v
        return out


class Diag(Node):
    def __init__(self, v: Node):
        self.v = v
        self.tex = rf"\operatorname{{diag}}\left({v.tex}\right)"

    def value(self, ctx):
        v = self.v.value(ctx)
        if v.shape[1] != 1:
            raise ValueError(f"diag of a {v.shape} matrix")
        return np.diagflat(v)


class Scale(Node):
    atom = False

    def __init__(self, s: Const, m: Node):
        self.s, self.m = s, m
        self.tex = f"- {m.paren()}" if s.expr == -1 else f"{s.paren()} {m.paren()}"

    def value(self, ctx):
        return self.s.value(ctx)[0, 0] * self.m.value(ctx)


class Sum(Node):
    atom = False

    def __init__(self, terms):                     # [(sign, node)]
        self.terms = terms
        tex = ("- " if terms[0][0] < 0 else "") + terms[0][1].tex
        for sign, m in terms[1:]:
            tex += (" + " if sign > 0 else " - ") + (m.tex if m.atom or isinstance(m, (MatMul, Hadamard, Guarded))
                                                     else m.paren())
        self.tex = tex

    def value(self, ctx):
        vals = [(s, m.value(ctx)) for s, m in self.terms]
        shapes = {v.shape for _, v in vals if v.shape != (1, 1)}
        if len(shapes) > 1:
            raise ValueError(f"sum of shapes {[v.shape for _, v in vals]}")
        if shapes and any(v.shape == (1, 1) for _, v in vals) and shapes != {(1, 1)}:
            shape = shapes.pop()            # a scalar added to every element (stated in the notes)
            vals = [(s, np.broadcast_to(v, shape)) for s, v in vals]
        return sum(s * v for s, v in vals)


class Power(Node):
    def __init__(self, m: Node, k: int):
        self.m, self.k = m, k
        base = m.paren() if "^" not in m.tex else rf"\left({m.tex}\right)"
        self.tex = rf"{base}^{{\circ {k}}}"

    def value(self, ctx):
        return self.m.value(ctx) ** self.k


class Apply(Node):
    """A scalar function applied elementwise: ``template`` has the placeholder where the argument goes."""

    def __init__(self, template, placeholder, m: Node, printer):
        self.template, self.placeholder, self.m = template, placeholder, m
        self.tex = printer.doprint(template).replace(printer.doprint(placeholder), m.tex)

    def value(self, ctx):
        inner = self.m.value(ctx)
        return np.vectorize(lambda x: ctx.scalar(self.template, {self.placeholder: float(x)}))(inner)


class StepRead(Node):
    """A read at a time step: a fixed index shifted by a constant (``H[b, t-1, j]`` with t fixed is
    the slice ``H_{t-1}``), printed with the step as a subscript."""

    def __init__(self, tex, name, indices, fixed):
        self.tex, self.name, self.indices, self.fixed = tex, name, tuple(indices), set(fixed)

    def value(self, ctx):
        arr = np.asarray(ctx.env[self.name], dtype=float)
        sel = []
        for axis, e in enumerate(self.indices):
            if not (sp.sympify(e).free_symbols & self.fixed):
                sel.append(slice(None))
                continue
            k = concrete(e, ctx.fixed)
            if not 0 <= k < arr.shape[axis]:            # a guard or the initial state decides this
                raise ValueError(f"step {e} = {k} is outside the sequence")
            sel.append(k)
        return _as_2d(arr[tuple(sel)])


def _zeros(lengths, ctx):
    return _as_2d(np.zeros(tuple(concrete(n, ctx.sizes) for n in lengths)))


def _holds(cond, ctx) -> bool:
    values = {**{k: sp.Integer(v) for k, v in ctx.sizes.items()},
              **{k: sp.Integer(v) for k, v in ctx.fixed.items()}}
    out = sp.sympify(cond).xreplace(values)
    if out not in (sp.true, sp.false):
        raise ValueError(f"condition {cond} is not decided at {values}")
    return bool(out)


class Guarded(Node):
    """``[cond] M``: M where the condition on the fixed indices (a time step) holds, zero elsewhere
    (an Iverson bracket: the branch of a piecewise adjoint, such as δ_{t+1} existing only for t < T-1)."""

    atom = False

    def __init__(self, cond, cond_tex, m: Node, lengths):
        self.cond, self.m, self.lengths = cond, m, lengths
        self.tex = rf"\left[{cond_tex}\right] {m.paren()}"

    def value(self, ctx):
        return self.m.value(ctx) if _holds(self.cond, ctx) else _zeros(self.lengths, ctx)


class DelayedRead(Node):
    """The previous state ``h_{t-k}``: its step while ``when`` ≥ 0, the declared initial state (zeros,
    or a parameter or input shared by the steps) before the start."""

    def __init__(self, read: Node, initial: Node | None, when, lengths):
        self.read, self.initial, self.when, self.lengths = read, initial, when, lengths
        self.tex, self.atom = read.tex, read.atom

    def value(self, ctx):
        if concrete(self.when, ctx.fixed) >= 0:
            return self.read.value(ctx)
        if self.initial is None:
            return _zeros(self.lengths, ctx)
        init = self.initial.value(ctx)
        want = tuple(concrete(n, ctx.sizes) for n in self.lengths)
        if len(want) == 2 and init.shape == (want[1], 1):      # one state shared by the batch's rows
            return np.repeat(init.T, want[0], axis=0)
        return init


class SumOver(Node):
    """``Σ_{t=lo}^{hi} M_t``: a sum over an index kept as a sum of matrices, one per value of the
    index (a weight's gradient over the time steps)."""

    atom = False

    def __init__(self, var, lo, hi, m: Node, lengths, printer):
        self.var, self.lo, self.hi, self.m, self.lengths = var, lo, hi, m, lengths
        self.tex = (rf"\sum_{{{printer.doprint(var)}={printer.doprint(lo)}}}^{{{printer.doprint(hi)}}} "
                    rf"{m.tex if isinstance(m, MatMul) else m.paren()}")

    def value(self, ctx):
        at = {**ctx.sizes, **ctx.fixed}
        total = _zeros(self.lengths, ctx)
        for k in range(concrete(self.lo, at), concrete(self.hi, at) + 1):
            total = total + self.m.value(Context(ctx.env, ctx.sizes, {**ctx.fixed, self.var: k}))
        return total


def _as_2d(a):
    a = np.asarray(a, dtype=float)
    return a.reshape(1, 1) if a.ndim == 0 else a.reshape(-1, 1) if a.ndim == 1 else a


@dataclass
class Context:
    env: dict
    sizes: dict
    fixed: dict

    def scalar(self, expr, extra=None) -> float:
        ev = IndexEvaluator(self.env, self.sizes)
        at = dict(self.fixed)
        if extra:
            expr = expr.xreplace({k: sp.Float(v, 30) for k, v in extra.items()})
        return ev.value(expr, at)


# -- the lifter -------------------------------------------------------------------------------------------
@dataclass
class Mat:
    node: Node
    idx: tuple                 # the loop index of each axis (0, 1 or 2 of them)
    notes: list = field(default_factory=list)

    @property
    def tex(self):
        return self.node.tex


_UPPER = {r"\delta": r"\Delta", r"\ell": r"\boldsymbol{\ell}"}
PLACEHOLDER = sp.Symbol("PLACEHOLDER")


class Lifter:
    def __init__(self, tensors: dict, ranges: dict, fixed=(), time=()):
        self.tensors = tensors
        self.ranges = ranges            # index -> (lo, hi)
        self.fixed = set(fixed)
        self.time = set(time)           # fixed indices that are time steps: printed as subscripts
        self.printer = IndexPrinter(tensors)

    # names -------------------------------------------------------------------------------------
    def name(self, t) -> str:
        if t.role == "adjoint":
            of = self.tensors.get(t.meta["of"])
            if not t.meta.get("custom_latex") and of is not None:
                return rf"\frac{{\partial C}}{{\partial {self.name(of)}}}"
        tex = t.latex
        if (self.fixed - self.time) or t.role == "param" or t.rank < 2:
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
        sizes = [self.printer.doprint(self.length(i)) for i in idx]
        return " \\times ".join(sizes) if len(sizes) == 2 else sizes[0]

    def length(self, i):
        return sp.simplify(self.ranges[i][1] - self.ranges[i][0] + 1)

    def const(self, expr) -> Const:
        return Const(sp.sympify(expr), self.printer)

    def aligned(self, m: Mat, order) -> Mat:
        if tuple(m.idx) == tuple(order):
            return m
        if len(m.idx) == 2 and tuple(m.idx[::-1]) == tuple(order):
            return Mat(transpose(m.node), tuple(order), m.notes)
        raise NoMatrixForm(f"indices {m.idx} cannot be arranged as {order}")

    # the patterns ------------------------------------------------------------------------------
    def is_scalar(self, expr) -> bool:
        return not (expr.free_symbols & (set(self.ranges) - self.fixed)) and not expr.has(sp.Sum)

    def lift(self, expr, order=None) -> Mat:
        if isinstance(expr, sp.Indexed) and self.at_step(expr):
            return self.lift_step_read(expr)
        if isinstance(expr, Delayed):
            return self.lift_delayed(expr)
        if isinstance(expr, sp.Piecewise):
            return self.lift_piecewise(expr, order)
        if isinstance(expr, sp.Indexed):
            t = self.tensors[str(expr.base.label)]
            if not all(isinstance(i, sp.Symbol) for i in expr.indices) or len(set(expr.indices)) != len(expr.indices):
                raise NoMatrixForm(f"{expr}: not a plain read")
            idx = tuple(i for i in expr.indices if i not in self.fixed)
            return Mat(Read(self.name(t), t.name, expr.indices, self.fixed), idx)
        if self.is_scalar(expr) and not isinstance(expr, sp.Indexed):
            return Mat(self.const(expr), ())
        if isinstance(expr, sp.Sum):
            return self.lift_sum(expr, order)
        if expr.is_Add:
            return self.lift_add(expr, order)
        if expr.is_Mul:
            return self.lift_mul(expr, order)
        if expr.is_Pow and expr.exp.is_Integer and expr.exp > 0:
            base = self.lift(expr.base, order)
            return Mat(Power(base.node, int(expr.exp)), base.idx, base.notes)
        if isinstance(expr, (Application, sp.Pow)) and len(expr.args) >= 1:
            return self.lift_function(expr, order)
        raise NoMatrixForm(f"no pattern for {type(expr).__name__}")

    def lift_function(self, expr, order):
        inner = [a for a in expr.args if not self.is_scalar(a)]
        if len(inner) != 1 or isinstance(inner[0], sp.Sum) and len(expr.args) > 1:
            raise NoMatrixForm(f"{expr}: not an elementwise function of one argument")
        arg = self.lift(inner[0], order)
        template = expr.xreplace({inner[0]: PLACEHOLDER})
        if template.has(sp.Indexed) or template.has(sp.Sum):
            raise NoMatrixForm(f"{expr}: the argument appears more than once")
        return Mat(Apply(template, PLACEHOLDER, arg.node, self.printer), arg.idx, arg.notes)

    # time steps ---------------------------------------------------------------------------------
    def at_step(self, read) -> bool:
        """Does ``read`` read a time step (an index that is a fixed time index plus a constant)?"""
        return any(sp.sympify(e).free_symbols & self.time for e in read.indices)

    def lift_step_read(self, read) -> Mat:
        """A slice at fixed subscripted indices (a time step ``H_{t-1}``, a head ``Q_h``, both
        ``Δ_{h,t}``): each such index is a fixed index plus a constant."""
        t = self.tensors[str(read.base.label)]
        idx = []
        steps = []
        for e in read.indices:
            e = sp.sympify(e)
            if e.free_symbols & self.time:
                shift = e - next(iter(e.free_symbols & self.time))
                if len(e.free_symbols) != 1 or not shift.is_Integer:
                    raise NoMatrixForm(f"{read}: not one time step")
                steps.append(e)
            elif isinstance(e, sp.Symbol):
                if e not in self.fixed:
                    idx.append(e)
            else:
                raise NoMatrixForm(f"{read}: not a plain read")
        if len(set(idx)) != len(idx):
            raise NoMatrixForm(f"{read}: a repeated index")
        name = self.name(t)
        base = rf"\left({name}\right)" if name.startswith(r"\frac") else "{" + name + "}" if "_" in name else name
        tex = f"{base}_{{{','.join(self.printer.doprint(e) for e in steps)}}}"
        return Mat(StepRead(tex, t.name, read.indices, self.fixed), tuple(idx))

    def lift_delayed(self, expr) -> Mat:
        initial, read, when = expr.args
        m = self.lift(read)
        init = None
        if initial != 0:
            init = self.lift(initial).node
        lengths = [self.length(i) for i in m.idx]
        note = (f"before the first step, ${m.tex}$ is the initial state "
                + (f"${init.tex}$" if init is not None else "$0$"))
        return Mat(DelayedRead(m.node, init, when, lengths), m.idx, m.notes + [note])

    def lift_piecewise(self, expr, order) -> Mat:
        if len(expr.args) != 2 or expr.args[1].expr != 0 or expr.args[1].cond != sp.true:
            raise NoMatrixForm("a piecewise expression that is not one branch or zero")
        value, cond = expr.args[0]
        if not (cond.free_symbols <= self.fixed | {s for s in cond.free_symbols if s.is_positive}):
            raise NoMatrixForm(f"a branch on {cond}, not on a fixed index")
        m = self.lift(value, order)
        lengths = [self.length(i) for i in m.idx]
        return Mat(Guarded(cond, self.printer.doprint(cond), m.node, lengths), m.idx, m.notes)

    def time_indices(self, expr) -> set:
        """The indices that ``expr`` uses on the time axis of a sequence it reads."""
        out = set()
        for r in expr.atoms(sp.Indexed):
            t = self.tensors.get(str(r.base.label))
            axis = t.meta.get("time_axis") if t is not None else None
            if axis is not None and axis < len(r.indices):
                out |= sp.sympify(r.indices[axis]).free_symbols
        for d in expr.atoms(Delayed):
            out |= sp.sympify(d.args[2]).free_symbols
        return out

    def lift_sum_over_time(self, expr, order) -> Mat:
        """``Σ_{b,t} f``: the sum over the time index kept as a sum of one matrix form per step
        (``Σ_t Δ_tᵀ H_{t-1}``), the other indices lifted with the step fixed. A sum over several
        indices none of which is a time step (the heads and a head's features, ``Σ_{h,e}``) keeps
        its first index that lifts as such a sum (``Σ_h O_h W_h``)."""
        times = self.time_indices(expr.function)
        positions = range(len(expr.limits))
        candidates = [p for p in reversed(positions) if expr.limits[p][0] in times] + \
            [p for p in positions if expr.limits[p][0] not in times and len(expr.limits) > 1]
        for pos in candidates:
            v, lo, hi = expr.limits[pos]
            rest = [lim for q, lim in enumerate(expr.limits) if q != pos]
            inner = sp.Sum(expr.function, *rest) if rest else expr.function
            sub = Lifter(self.tensors, self.ranges, self.fixed | {v}, self.time | {v})
            try:
                m = sub.lift(inner, order)
            except NoMatrixForm:
                continue
            vv = self.printer.doprint(v)
            note = (f"the sum over the steps ${vv}$ stays a sum: one matrix product per step, each "
                    f"step's contribution added") if v in times else \
                (f"the sum over ${vv}$ stays a sum: one matrix form per value of ${vv}$ (the slices "
                 f"subscripted ${vv}$), added")
            return Mat(SumOver(v, lo, hi, m.node, [self.length(i) for i in m.idx], self.printer),
                       m.idx, m.notes + [note])
        raise NoMatrixForm("a sum over several indices")

    def lift_sum(self, expr, order):
        if len(expr.limits) != 1 or (expr.limits[0][0] in self.time_indices(expr.function)
                                     and expr.limits[0][0] not in self.fixed):
            return self.lift_sum_over_time(expr, order)
        k, lo, hi = expr.limits[0]
        full = self.ranges.get(k)
        if full is None or sp.simplify(lo - full[0]) != 0 or sp.simplify(hi - full[1]) != 0:
            raise NoMatrixForm("a sum over part of a range")
        factors = sp.Mul.make_args(expr.function)
        scalars = [f for f in factors if self.is_scalar(f) and not isinstance(f, sp.Indexed)]
        rest = [f for f in factors if f not in scalars]
        shared = {frozenset(self.lift(f).idx) for f in rest} if len(rest) > 1 else set()
        if len(shared) == 1 and len(next(iter(shared))) == 2:
            # factors over the same two indices, one summed (a row sum Σ_u A_tu dA_tu, no matrix
            # product): their elementwise product times the vector of ones
            rest = [sp.Mul(*rest)]
        if len(rest) == 1:
            m = self.lift(rest[0])
            if k not in m.idx:
                raise NoMatrixForm("the summed index is not an axis")
            free = tuple(i for i in m.idx if i != k)
            ones = Ones(self.length(k))
            note = (f"$\\mathbf{{1}}$ is the vector of ${self.size_tex((k,))}$ ones: "
                    f"multiplying by it sums over ${self.printer.doprint(k)}$")
            if not free:
                out = Mat(MatMul(T(ones), m.node), (), m.notes + [note])
            else:
                out = Mat(MatMul(self.aligned(m, free + (k,)).node, ones), free, m.notes + [note])
        elif len(rest) == 2:
            out = self.contraction(k, *[self.lift(f) for f in rest], order)
        else:
            out = self.contraction(k, *self.two_operands(rest), order)
        return self.scaled(sp.Mul(*scalars), out)

    def two_operands(self, factors) -> list:
        """Factors of a sum's product grouped by the indices they read into two operands, each the
        elementwise product of its group (``Σ_k (1 - h_k²) δ_k U_kj``: ``(1 - h²) ⊙ δ`` and ``U``)."""
        groups: dict = {}
        for f in factors:
            groups.setdefault(frozenset(self.lift(f).idx), []).append(f)
        if len(groups) != 2:
            raise NoMatrixForm("a sum of a product of more than two operands")
        return [self.lift(sp.Mul(*g)) for g in groups.values()]

    def contraction(self, k, a: Mat, b: Mat, order) -> Mat:
        if k not in a.idx or k not in b.idx:
            raise NoMatrixForm("the summed index is missing from a factor")
        fa = tuple(i for i in a.idx if i != k)
        fb = tuple(i for i in b.idx if i != k)
        if len(fa) + len(fb) > 2 or (fa and fa == fb):
            raise NoMatrixForm("not a matrix product")
        want = tuple(order) if order else fa + fb
        if fb and fb[0] == want[0]:                     # b supplies the first output index: swap
            a, b, fa, fb = b, a, fb, fa
        notes = a.notes + b.notes
        left = self.aligned(a, fa + (k,)) if fa else a
        right = self.aligned(b, (k,) + fb) if fb else b
        kk = self.printer.doprint(k)
        for m, orig, pos in ((left, a, "second"), (right, b, "first")):
            if m is not orig and fa:
                notes.append(
                    f"the sum runs over ${kk}$, which is not the {pos} index of "
                    f"${orig.tex}$; a matrix product $AB$ sums the second index of $A$ against the first "
                    f"index of $B$, so ${orig.tex}$ enters transposed as ${m.tex}$")
        if not fa and not fb:                           # two vectors: an inner product
            node, idx = MatMul(T(left.node), right.node), ()
            shapes = f"${left.tex}$ and ${right.tex}$ are vectors of length ${self.size_tex((k,))}$"
        elif not fa:                                    # vector · matrix: write as matrixᵀ vector
            right_t = transpose(right.node)
            node, idx = MatMul(right_t, left.node), fb
            q = self.printer.doprint(fb[0])
            entry = "{" + right.tex + "}" if "_" in right.tex else right.tex     # no double subscript
            notes.append(f"the sum runs over ${kk}$, the first index of ${right.tex}$: "
                         f"$\\sum_{{{kk}}} {entry}_{{{kk}{q}}} v_{{{kk}}} = ({right_t.tex} v)_{{{q}}}$, "
                         f"hence the transpose")
            shapes = (f"${right_t.tex}$ is ${self.size_tex(fb + (k,))}$ and ${left.tex}$ has length "
                      f"${self.size_tex((k,))}$, so the product has length ${self.size_tex(fb)}$")
        else:
            node, idx = MatMul(left.node, right.node), fa + fb
            shapes = (f"${left.tex}$ is ${self.size_tex(fa + (k,))}$ and ${right.tex}$ is "
                      f"${self.size_tex((k,) + fb)}$, so the product is ${self.size_tex(fa + fb)}$")
        return Mat(node, idx, notes + [shapes])

    def scaled(self, scale, m: Mat) -> Mat:
        if scale == 1:
            return m
        return Mat(Scale(self.const(scale), m.node), m.idx, m.notes)

    def lift_mul(self, expr, order):
        scalars = [f for f in expr.args if self.is_scalar(f) and not isinstance(f, sp.Indexed)]
        rank = lambda f: 0 if isinstance(f, sp.Sum) else 1 if isinstance(f, sp.Indexed) else 2  # noqa: E731
        parts = [self.lift(f, order) for f in sorted(expr.args, key=rank) if f not in scalars]
        if not parts:
            raise NoMatrixForm("no tensor factor")
        full = max(parts, key=lambda m: len(m.idx)).idx
        target = tuple(order) if order and set(order) == set(full) else full
        mats = [p for p in parts if set(p.idx) == set(target)]
        vecs = [p for p in parts if p not in mats]
        notes = [n for p in parts for n in p.notes]
        if len(mats) == 1 and not vecs:
            return self.scaled(sp.Mul(*scalars), Mat(self.aligned(mats[0], target).node, target, notes))
        if len(parts) == 2 and all(len(p.idx) == 1 for p in parts) and \
                order and len(order) == 2 and {p.idx[0] for p in parts} == set(order):
            first, second = sorted(parts, key=lambda v: order.index(v.idx[0]))
            notes.append(f"${first.tex} {T(second.node).tex}$ is an outer product: column times row")
            return self.scaled(sp.Mul(*scalars), Mat(MatMul(first.node, T(second.node)), tuple(order), notes))
        if not mats:
            raise NoMatrixForm("a product of factors over different indices")
        node = Hadamard([self.aligned(m, target).node for m in mats]) if len(mats) > 1 \
            else self.aligned(mats[0], target).node
        if len(mats) > 1:
            notes.append(r"$\odot$ is the elementwise (Hadamard) product")
        for v in vecs:
            if len(v.idx) == 0:
                node = _scalar_times(v.node, node)
                continue
            if len(v.idx) != 1 or v.idx[0] not in target:
                raise NoMatrixForm("a factor broadcast along an unsupported axis")
            if len(target) == 1:
                node = Hadamard([v.node, node])
            elif target.index(v.idx[0]) == 0:
                node = MatMul(Diag(v.node), node)
                notes.append(rf"$\operatorname{{diag}}\left({v.tex}\right)$ scales row ${self.printer.doprint(v.idx[0])}$ by the entry ${self.printer.doprint(v.idx[0])}$ of ${v.tex}$")
            else:
                node = MatMul(node, Diag(v.node))
                notes.append(rf"$\operatorname{{diag}}\left({v.tex}\right)$ on the right scales each column by an entry of ${v.tex}$")
        return self.scaled(sp.Mul(*scalars), Mat(node, target, notes))

    def lift_add(self, expr, order):
        signed = [(-1, -t) if t.could_extract_minus_sign() else (1, t) for t in expr.args]
        lifted = [(sign, self.lift(t, order)) for sign, t in signed]
        lifted.sort(key=lambda sm: (sm[0] < 0, -len(sm[1].idx)))   # X W^T before the broadcast bias
        full = max((m for _, m in lifted), key=lambda m: len(m.idx)).idx
        target = tuple(order) if order and set(order) == set(full) else full
        terms, notes = [], []
        for sign, m in lifted:
            notes += m.notes
            if set(m.idx) == set(target):
                terms.append((sign, self.aligned(m, target).node))
            elif not m.idx:
                terms.append((sign, m.node))          # a scalar, added to every element
                if target:
                    notes.append(f"${m.tex}$ is added to every element")
            elif len(m.idx) == 1 and len(target) == 2:
                ones = Ones(self.length(target[0] if m.idx[0] == target[1] else target[1]))
                if m.idx[0] == target[1]:
                    node = MatMul(ones, T(m.node))
                    notes.append(f"$\\mathbf{{1}} {T(m.node).tex}$ repeats the row ${T(m.node).tex}$ for every "
                                 f"one of the ${self.size_tex(target[:1])}$ rows (broadcasting)")
                else:
                    node = MatMul(m.node, T(ones))
                    notes.append(f"${m.node.paren()} \\mathbf{{1}}^{{\\top}}$ repeats the column for every one "
                                 f"of the ${self.size_tex(target[1:])}$ columns (broadcasting)")
                terms.append((sign, node))
            else:
                raise NoMatrixForm("terms over different indices")
        return Mat(Sum(terms), target, notes)


def _scalar_times(s: Node, m: Node) -> Node:
    """A rank-0 tensor times a matrix (a scalar read such as a learned temperature)."""
    return Scale(_ConstNode(s), m)


class _ConstNode(Const):
    def __init__(self, node: Node):
        self.node, self.tex, self.atom, self.expr = node, node.tex, node.atom, None

    def value(self, ctx):
        return self.node.value(ctx)


# -- the result: printed only when checked ------------------------------------------------------------
@dataclass
class MatrixForm:
    """``lhs = rhs`` (shape ``shape``) for equation ``eq``, with the reasons in ``notes``."""

    eq: object
    lhs: str
    rhs: str
    shape: str
    notes: list
    node: Node
    order: tuple
    fixed: tuple

    def __getitem__(self, key):
        return getattr(self, key)

    def evaluate(self, env: dict, sizes: dict, fixed_values: dict | None = None) -> np.ndarray:
        """The matrix form's value with real matrix semantics (vectors as columns)."""
        return self.node.value(Context(env, sizes, dict(fixed_values or {})))

    def reference(self, env: dict, sizes: dict, fixed_values: dict | None = None) -> np.ndarray:
        """The index form read numerically, arranged as the matrix form claims (order, columns)."""
        fixed_values = dict(fixed_values or {})
        arr = evaluate(self.eq, env, sizes, {i: fixed_values[i] for i in self.fixed if i in self.eq.indices})
        kept = [i for i in self.eq.indices if i not in self.fixed]
        if len(kept) == 2 and tuple(kept) != tuple(self.order):
            arr = arr.T
        return _as_2d(arr)

    def check(self, env: dict, sizes: dict, fixed_values=None, rtol=1e-9) -> bool:
        try:
            got = self.evaluate(env, sizes, fixed_values)
        except (ValueError, ChainruleError):
            return False
        want = self.reference(env, sizes, fixed_values)
        return got.shape == want.shape and bool(np.allclose(got, want, rtol=rtol, atol=rtol))


def matrix_form(eq, tensors: dict, extra_ranges=None, fixed=(), check=True, time=()) -> MatrixForm | None:
    """The matrix form of an index-form equation, or None when no pattern fits or it fails its check
    (``check=False`` skips the numeric self-check: tests call ``MatrixForm.check`` themselves).
    ``time``: fixed indices that are time steps (the form of one step of a recurrence, its reads at
    other steps as ``H_{t-1}``, ``Δ_{t+1}``)."""
    ranges = {**(extra_ranges or {}), **eq.ranges()}
    for s in eq.body.atoms(sp.Sum):
        for v, lo, hi in s.limits:
            ranges.setdefault(v, (lo, hi))
    lifter = Lifter(tensors, ranges, fixed, time)
    order = tuple(i for i in eq.indices if i not in lifter.fixed)
    try:
        rhs = lifter.lift(eq.body, order)
        rhs = lifter.aligned(rhs, order) if len(rhs.idx) == 2 else rhs
        if set(rhs.idx) != set(order):
            raise NoMatrixForm("free indices differ")
    except (NoMatrixForm, KeyError):
        return None
    lhs = lifter.name(eq.out)
    steps = [i for i in eq.indices if i in lifter.time]
    if steps:                       # one step of a sequence (one head): its name carries the step
        lhs = (rf"\left({lhs}\right)" if lhs.startswith(r"\frac") else "{" + lhs + "}" if "_" in lhs else lhs) \
            + f"_{{{','.join(lifter.printer.doprint(i) for i in steps)}}}"
    form = MatrixForm(eq, lhs, rhs.tex, lifter.size_tex(order),
                      list(dict.fromkeys(rhs.notes)), rhs.node, order, tuple(lifter.fixed))
    if check and not self_check(form, tensors):
        return None
    return form


# -- checking at small sizes ----------------------------------------------------------------------------
def check_sizes(eq, tensors: dict, count=2) -> list[dict]:
    """Up to ``count`` assignments of the sizes ``eq`` involves, each size distinct from the others and
    from 2 (so a swapped axis or a dropped factor shows), every shape a positive integer."""
    involved = [eq.out] + [tensors[n] for n, _ in eq.reads() if n in tensors]
    shapes = [sp.sympify(s) for t in involved for s in t.shape]
    limits = [e for r in eq.body.atoms(sp.Sum) for lim in r.limits for e in lim[1:]]
    symbols = sorted({s for e in shapes + limits for s in sp.sympify(e).free_symbols if s.is_positive}, key=str)
    values = [3, 4, 5, 6, 7, 8, 9, 10, 11]
    found = []
    for combo in itertools.permutations(values[:max(len(symbols) + 2, 4)], len(symbols)):
        sizes = dict(zip(symbols, combo))
        try:
            if all(concrete(s, sizes) > 0 for s in shapes):
                found.append(sizes)
        except ChainruleError:
            continue
        if len(found) == count:
            break
    return found


def random_env(eq, tensors: dict, sizes: dict, rng) -> dict:
    """Values in (0.1, 0.9) for every tensor ``eq`` reads (positive, so logs and roots are defined)."""
    env = {}
    for name, _ in eq.reads():
        t = tensors.get(name)
        if t is not None and name not in env:
            env[name] = rng.uniform(0.1, 0.9, size=tuple(concrete(n, sizes) for n in t.shape))
    return env


def self_check(form: MatrixForm, tensors: dict, seed=0) -> bool:
    rng = np.random.default_rng(seed)
    assignments = check_sizes(form.eq, tensors)
    if not assignments:
        return False
    for sizes in assignments:
        env = random_env(form.eq, tensors, sizes, rng)
        fixed_values = {i: concrete(form.eq.out.shape[list(form.eq.indices).index(i)], sizes) - 1
                        for i in form.fixed}
        try:
            if not form.check(env, sizes, fixed_values):
                return False
        except ChainruleError:
            return False
    return True
