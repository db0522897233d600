"""Printing index-notation bodies as whole-tensor code (PyTorch, JAX): the shared array printer.

The Numba printer prints one *scalar* inside a loop nest; a tensor framework wants the opposite: one
expression over whole arrays. This printer turns the body of ``out[i, j] = body`` into array code by
giving every sub-expression a **term**: its code and the index symbols its array is laid out over
(its *axes*, always in the order the symbols were brought into scope: the output indices first,
then each reduction's indices as it is entered). Two terms combine by broadcasting after missing
axes are inserted as ``None``; a read ``T[e..]`` is a view of ``T`` (sliced, transposed) when its
indices are plain, else a gather with integer index arrays (clamped into the tensor, so a read a
guard discards never leaves it); a sum of a product is one ``einsum`` (a matrix product, an
attention score, im2col + GEMM for a convolution); a sum whose limits depend on an outer index (a
convolution's input gradient) is masked first; ``LogSumExp`` and ``MaxOver`` use the framework's
stable reductions; ``IsArgmax`` compares the first argmax (the tie rule of ``MaxOver``) with a point.

Dispatch is SymPy's (``_print_<Class>``, found through the expression's class hierarchy). What
differs between frameworks (function names, ``dim=`` or ``axis=``) lives in small hooks that a
subclass per target fills in (``torch.py``, ``jax.py``): a new target is a subclass.
"""
from __future__ import annotations

import keyword
import re
from dataclasses import dataclass

import sympy as sp
from sympy.printing.printer import Printer

from ...derive.errors import UnsupportedError
from ...derive.layers import B as BATCH
from ...derive.primitives import IsArgmax, MaxOver

RESERVED = {"torch", "jax", "jnp", "np", "math", "ctx", "dt", "n_batch", "self", "cls", "saved",
            "grad", "params", "key", "rng", "apply", "Function", "Module", "None", "True", "False"}


def identifier(name: str, taken: set) -> str:
    """A Python identifier for a user-chosen name: ASCII letters, digits and ``_`` kept, the rest
    (a prime, a Greek letter) replaced; a keyword, a name of the generated module or one already
    taken gets a suffix. ``taken`` is updated."""
    base = re.sub(r"[^0-9A-Za-z_]", "_", name.replace("'", "p")) or "t"
    if base[0].isdigit() or base.startswith("_"):
        base = "t" + base
    out, k = base, 2
    while out in taken or keyword.iskeyword(out) or out in RESERVED:
        out, k = f"{base}_{k}", k + 1
    taken.add(out)
    return out


@dataclass(frozen=True)
class Term:
    """Array code and the index symbols its axes stand for (in scope order).

    ``kind``: "float", "int" (an index array) or "bool" (a condition); ``number``: a plain Python
    literal, which broadcasts against anything."""

    code: str
    axes: tuple = ()
    kind: str = "float"
    number: bool = False
    steps: tuple | None = None     # per axis, its step through memory in elements (None: row-major)


class ArrayPrinter(Printer):
    """Prints equation bodies as whole-array statements; subclasses supply the framework's names."""

    printmethod = "_arraycode"
    # the framework's spellings (subclasses)
    lib = ""                # "torch" / "jnp"
    dim_kw = "dim"          # keyword of a reduction's axes

    def __init__(self, names: dict, shapes: dict):
        super().__init__()
        self.names = names          # tensor name / rank-0 Symbol / cost symbol -> identifier
        self.shapes = shapes        # tensor name -> concrete shape (ints; BATCH for the batch axis)
        self.lines: list[str] = []
        self.scope: list = []       # index symbols in scope, in order
        self.box: dict = {}         # index symbol -> (lo, hi): the values its array axis holds
        self.index_code: dict = {}  # index symbol -> variable holding arange(lo, hi + 1)
        self.memo: dict = {}
        self.taken: set = set()
        self.integer: set = set()   # identifiers of tensors holding integers (token ids)
        self.loop_vars: dict = {}   # the time loop's variable (a Dummy) -> its identifier
        self._counter = 0

    # -- statements -------------------------------------------------------------------------
    def statement(self, target: str, indices, body) -> list[str]:
        """Lines computing ``target`` (an identifier) as the array of ``body`` over ``indices``,
        whose boxes are the output's axes (``(lo, hi)`` pairs, via ``enter``)."""
        self.lines, self.memo = [], {}
        term = self._print(body)
        full = tuple(indices)
        code = Term(self.to_float(term), term.axes) if term.kind == "bool" and not term.number else term
        if term.number or code.axes != full:
            code = self.broadcast(code, full)
        else:
            code = code.code
        last = self.lines[-1] if self.lines else ""
        if last.startswith(f"{code} = "):          # the body is one reduction: name it directly
            self.lines[-1] = f"{target} = " + last[len(code) + 3:]
        else:
            self.lines.append(f"{target} = {code}")
        return self.lines

    def enter(self, sym, lo, hi):
        if sym in self.box:
            raise UnsupportedError(f"export: index {sym} is bound twice")
        self.scope.append(sym)
        self.box[sym] = (sp.sympify(lo), sp.sympify(hi))

    def leave(self, sym):
        self.scope.remove(sym)
        self.box.pop(sym)
        self.index_code.pop(sym, None)

    def fresh(self, prefix="r") -> str:
        self._counter += 1
        return identifier(f"{prefix}{self._counter}", self.taken)

    def emit(self, prefix: str, code: str, comment: str | None = None) -> str:
        name = self.fresh(prefix)
        self.lines.append(f"{name} = {code}" + (f"  # {comment}" if comment else ""))
        return name

    # -- axes ---------------------------------------------------------------------------------
    def sort_axes(self, syms) -> tuple:
        pos = {s: k for k, s in enumerate(self.scope)}
        return tuple(sorted(set(syms), key=pos.__getitem__))

    def align(self, term: Term, axes: tuple) -> str:
        """``term``'s code laid out over ``axes`` (a superset, same order): missing axes as ``None``."""
        if term.number or not term.axes or term.axes == axes:
            return term.code
        sel = ", ".join(":" if a in term.axes else "None" for a in axes)
        return f"{self.paren(term.code)}[{sel}]"

    @staticmethod
    def paren(code: str) -> str:
        return code if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\[[^\[\]]*\])?", code) else f"({code})"

    def combine(self, terms):
        axes = self.sort_axes([a for t in terms for a in t.axes])
        return axes, [self.align(t, axes) for t in terms]

    def extent(self, sym) -> sp.Expr:
        lo, hi = self.box[sym]
        return hi - lo + 1

    def shape_of(self, axes) -> str:
        dims = [self.size_code(self.extent(a)) for a in axes]
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"

    # -- sizes and bounds ---------------------------------------------------------------------
    def size_code(self, e) -> str:
        """A size or bound (integers and the batch size) as Python code."""
        e = sp.sympify(e)
        if e.is_Integer:
            return str(int(e))
        if e.free_symbols <= {BATCH}:
            return _IntCode().doprint(e)
        raise UnsupportedError(f"export: size {e} has no value")

    def interval(self, e):
        """(lo, hi) bounds of an index expression over the boxes of the indices in scope."""
        e = sp.sympify(e)
        if not (e.free_symbols & set(self.box)):
            return e, e
        if isinstance(e, sp.Symbol):
            return self.box[e]
        if e.is_Add:
            los, his = zip(*(self.interval(a) for a in e.args))
            return sp.Add(*los), sp.Add(*his)
        if e.is_Mul:
            coeff, rest = e.as_coeff_Mul()
            if coeff != 1:
                lo, hi = self.interval(rest)
                return (coeff * lo, coeff * hi) if coeff >= 0 else (coeff * hi, coeff * lo)
        if isinstance(e, (sp.Max, sp.Min)):
            los, his = zip(*(self.interval(a) for a in e.args))
            return e.func(*los), e.func(*his)
        if isinstance(e, (sp.floor, sp.ceiling)):
            lo, hi = self.interval(e.args[0])
            return e.func(lo), e.func(hi)
        raise UnsupportedError(f"export: cannot bound the index expression {e}")

    def constant_bound(self, e, up: bool):
        """A bound without scope symbols, rounded to an integer inward of ``e``'s range."""
        lo, hi = self.interval(e)
        v = sp.simplify(hi if up else lo)
        return sp.floor(v) if up else sp.ceiling(v)

    def depends_on_scope(self, e) -> bool:
        return bool(sp.sympify(e).free_symbols & set(self.box))

    # -- leaves -------------------------------------------------------------------------------
    def _print(self, expr, **kwargs):
        if isinstance(expr, (bool, sp.logic.boolalg.BooleanTrue, sp.logic.boolalg.BooleanFalse)):
            return Term("True" if bool(expr) else "False", kind="bool", number=True)
        expr = sp.sympify(expr)
        if expr.is_number and not isinstance(expr, sp.Indexed):
            if expr.is_Integer:
                return Term(str(int(expr)), kind="int", number=True)
            value = complex(sp.N(expr, 17))
            if value.imag:
                raise UnsupportedError(f"export: the constant {expr} is not real")
            return Term(_float(value.real), number=True)
        return super()._print(expr, **kwargs)

    def emptyPrinter(self, expr):
        raise UnsupportedError(f"export: cannot lower {type(expr).__name__} ({expr}) to array code")

    def _print_Symbol(self, expr):
        if expr in self.loop_vars:                   # a time loop's t: a scalar at each step
            return Term(self.loop_vars[expr], kind="int", number=True)
        if expr in self.box:                         # an index: the values of its axis
            if expr not in self.index_code:
                lo, hi = self.box[expr]
                self.index_code[expr] = self.emit(
                    "ix_" + identifier(expr.name, set()) + "_",
                    self.arange(self.size_code(lo), self.size_code(hi + 1)), f"index {expr}")
            return Term(self.index_code[expr], (expr,), kind="int")
        if expr == BATCH:
            return Term("n_batch", kind="int", number=True)
        for key in (expr, expr.name):
            if key in self.names:                    # a rank-0 tensor (a scalar parameter)
                return Term(self.names[key])
        raise UnsupportedError(f"export: symbol {expr} is neither a tensor, an index nor a size")

    _print_Dummy = _print_Symbol

    def _print_Indexed(self, expr):
        name = str(expr.base.label)
        if name not in self.names:
            raise UnsupportedError(f"export: no value for tensor {name}")
        code, shape, idx = self.names[name], self.shapes[name], list(expr.indices)
        term = self.plain_view(code, shape, idx) or self.gather(code, shape, idx)
        if code in self.integer:                     # token ids: an index array
            return Term(term.code, term.axes, kind="int")
        return term

    def plain_view(self, code, shape, idx):
        """``T[i, j]`` with distinct in-scope indices whose boxes lie inside the axes: a slice and a
        transpose of ``T`` (no copy), or None."""
        if not all(isinstance(i, sp.Symbol) and i in self.box for i in idx) or len(set(idx)) != len(idx):
            return None
        sel, sliced = [], False
        for i, n in zip(idx, shape):
            lo, hi = self.box[i]
            if not (_le(0, lo) and _le(hi, n - 1)):
                return None
            if sp.simplify(lo) == 0 and sp.simplify(hi - (n - 1)) == 0:
                sel.append(":")
            else:
                sel.append(f"{self.size_code(lo)}:{self.size_code(hi + 1)}")
                sliced = True
        if sliced:
            code = f"{code}[{', '.join(sel)}]"
        axes = self.sort_axes(idx)
        perm = [idx.index(a) for a in axes]
        if perm != list(range(len(idx))):
            code = self.transpose(code, perm)
        return Term(code, axes)

    def gather(self, code, shape, idx, memory_order=False):
        """``T[e1, e2, ..]`` with index arrays broadcast over every index they use, each clamped
        into its axis unless its bounds already lie inside (guards discard what a clamp changed).
        Reads that stay inside with affine indices may become a strided view (``window``).
        ``memory_order``: a window's axes in the order of T's memory (largest step first), not the
        scope's: an einsum operand (its subscripts line it up), which the framework then copies
        into a matrix walking T forwards (im2col) rather than across it."""
        inside = []
        for e, n in zip(idx, shape):
            if sp.sympify(e).atoms(sp.Indexed):
                # a plain read of token ids is checked on entry (``plan.id_checks``: an id outside
                # the table is an error); any other index computed from them is clamped
                inside.append(isinstance(e, sp.Indexed) and self.names.get(str(e.base.label)) in self.integer)
                continue
            lo, hi = self.interval(e)
            inside.append(_le(0, lo) and _le(hi, n - 1))
        ids_free = not any(sp.sympify(e).atoms(sp.Indexed) for e in idx)
        if ids_free:
            used = set().union(*[sp.sympify(e).free_symbols for e in idx]) & set(self.box)
            axes = self.sort_axes(used)
            affine = self.affine_map(idx, axes)
            if affine is not None and memory_order:
                axes, affine = _by_memory(axes, affine, shape)
            if affine is not None and all(inside):
                view = self.window(code, shape, axes, *affine)
                if view is not None:
                    return Term(view, axes, steps=_steps(affine[0], shape))
            elif affine is not None:
                # an affine read that leaves the tensor where a guard discards it (a convolution's
                # δ read at h' + t - 1): a window of a zero-padded copy instead of a gather
                view = self.padded_window(code, shape, idx, axes, *affine)
                if view is not None:
                    return Term(view, axes, steps=_steps(affine[0], self.padded_shape(shape, idx)))
        terms = [self.int_term(e) for e in idx]
        axes = self.sort_axes([a for t in terms for a in t.axes])
        parts = []
        for t, n, ok in zip(terms, shape, inside):
            c = self.align(t, axes)
            parts.append(c if ok else self.clamp(c, "0", self.size_code(n - 1)))
        return Term(self.index(code, shape, parts), axes)

    def affine_map(self, idx, axes):
        """``e_j = c_j + Σ_s a_js s`` with integer ``a``, ``c``: (per axis s its column a_·s, and the
        offset of the box's first point per tensor axis), or None."""
        cols = {s: [] for s in axes}
        offset = []
        for e in idx:
            e = sp.expand(sp.sympify(e))
            c = e
            for s in axes:
                a = e.coeff(s)
                if not (a.is_Integer and not a.free_symbols):
                    return None
                cols[s].append(int(a))
                c -= a * s
            if c.free_symbols or not c.is_Integer:
                return None
            offset.append(int(c) + sum(cols[s][-1] * int(self.box[s][0]) if self.box[s][0].is_Integer else 0
                                       for s in axes))
            if any(not self.box[s][0].is_Integer for s in axes if cols[s][-1]):
                return None
        return [cols[s] for s in axes], offset

    def window(self, code, shape, axes, cols, offset):
        """A view of ``code`` with axis s stepping by Σ_j a_js along tensor axis j (no copy); None
        where the framework has no strided views (the gather is printed instead)."""
        return None

    def pads_for(self, idx, shape):
        """Per axis, how far (before, after) the read ``idx`` leaves a tensor of ``shape``; None
        where that is not a known number."""
        pads = []
        for e, n in zip(idx, shape):
            lo, hi = self.interval(e)
            if _le(0, lo) and _le(hi, n - 1):        # inside on this axis (the batch axis, say)
                pads.append((0, 0))
                continue
            lo, hi = sp.simplify(lo), sp.simplify(hi)
            if not (lo.is_Integer and hi.is_Integer and sp.sympify(n).is_Integer):
                return None
            pads.append((max(0, -int(lo)), max(0, int(hi) - (int(n) - 1))))
        return pads

    def padded_shape(self, shape, idx):
        return tuple(n + a + b for n, (a, b) in zip(shape, self.pads_for(idx, shape)))

    def padded_window(self, code, shape, idx, axes, cols, offset):
        """``window`` over a copy of ``code`` padded with zeros on each axis by as much as the read
        leaves it (the padded copy is emitted once per statement); None where there are no windows."""
        pads = self.pads_for(idx, shape)
        if pads is None or self.window(code, shape, axes, cols, offset) is None:   # no view of this shape
            return None
        key = ("pad", code, tuple(pads))
        if key not in self.memo:
            padded = self.pad(code, pads)
            if padded is None:
                return None
            self.memo[key] = self.emit("pad", padded, f"{code} in zeros, padded by {pads}")
        big = tuple(n + a + b for n, (a, b) in zip(shape, pads))
        return self.window(self.memo[key], big, axes, cols, [o + a for o, (a, _) in zip(offset, pads)])

    def pad(self, code, pads):
        """``code`` padded with zeros by ``pads`` ((before, after) per axis), or None."""
        return None

    def index(self, code, shape, parts) -> str:
        """``code`` read at broadcast index arrays ``parts`` (one per axis)."""
        return f"{code}[{', '.join(parts)}]"

    def int_term(self, e) -> Term:
        """An index expression as an integer array; a rational coefficient (a strided map solved
        under a divisibility guard) is an exact quotient: floor division."""
        e = sp.sympify(e)
        num, den = sp.fraction(sp.together(e))
        if den != 1:
            if not den.is_Integer:
                raise UnsupportedError(f"export: index {e} divides by {den}, not by an integer")
            t = self.int_term(sp.expand(num))
            return Term(f"{self.paren(t.code)} // {int(den)}", t.axes, kind="int", number=t.number)
        t = self._print(e)
        if t.kind == "float" and not t.number:
            raise UnsupportedError(f"export: index {e} is not an integer expression")
        return Term(t.code, t.axes, kind="int", number=t.number)

    # -- arithmetic ---------------------------------------------------------------------------
    def _print_Add(self, expr):
        args = _ordered(expr.args)
        signs = ["-" if a.could_extract_minus_sign() else "+" for a in args]
        terms = [self._print(-a if sg == "-" else a) for a, sg in zip(args, signs)]
        axes, codes = self.combine(terms)
        text = ("-" + self.paren(codes[0])) if signs[0] == "-" else codes[0]
        for sg, c, a in zip(signs[1:], codes[1:], args[1:]):
            text += f" - {self.paren(c)}" if sg == "-" else f" + {c}"
        return Term(text, axes, kind=_kind(terms), number=all(t.number for t in terms))

    def _print_Mul(self, expr):
        coeff, factors = expr.as_coeff_mul()
        num, den = [], []
        for f in factors:
            if f.is_Pow and f.exp.is_number and f.exp < 0:
                den.append(f.base if f.exp == -1 else f.base ** -f.exp)
            else:
                num.append(f)
        terms = [self._print(f) for f in num]
        dterms = [self._print(f) for f in den]
        axes, codes = self.combine(terms + dterms)
        codes = [self.paren(c) if not re.fullmatch(r"[A-Za-z0-9_.]+(\[[^\[\]]*\])?", c) else c for c in codes]
        ncodes, dcodes = codes[:len(terms)], codes[len(terms):]
        parts = ncodes
        text = " * ".join(parts) if parts else "1.0"
        if coeff == -1:
            text = "-" + text
        elif coeff != 1:
            text = f"{self._print(coeff).code} * {text}"
        if dcodes:
            text = f"{text} / " + (dcodes[0] if len(dcodes) == 1 else "(" + " * ".join(dcodes) + ")")
        kinds = terms + dterms
        kind = "float" if dcodes or not coeff.is_Integer else _kind(kinds)
        return Term(text, axes, kind=kind, number=all(t.number for t in kinds))

    def _print_Pow(self, expr):
        base, exp = expr.args
        b = self._print(base)
        if exp == sp.S.Half:
            return Term(f"{self.lib}.sqrt({b.code})", b.axes) if not b.number else Term(_float(sp.sqrt(base)), number=True)
        if exp == -sp.S.Half:
            return Term(f"1.0 / {self.lib}.sqrt({b.code})", b.axes)
        if exp == -1:
            return Term(f"1.0 / {self.paren(b.code)}", b.axes, number=b.number)
        e = self._print(exp)
        if not e.number:
            raise UnsupportedError(f"export: power with a non-constant exponent {expr}")
        return Term(f"{self.paren(b.code)} ** {e.code}", b.axes, kind=b.kind, number=b.number)

    def _print_Mod(self, expr):
        a, m = (self.int_term(x) for x in expr.args)
        axes, (ca, cm) = self.combine([a, m])
        return Term(f"{self.paren(ca)} % {self.paren(cm)}", axes, kind="int")

    def _print_floor(self, expr):
        num, den = sp.fraction(sp.together(expr.args[0]))
        if not den.is_Integer:
            raise UnsupportedError(f"export: {expr} is not a rounding of an integer quotient")
        t = self.int_term(sp.expand(num))
        return Term(f"{self.paren(t.code)} // {int(den)}", t.axes, kind="int", number=t.number)

    def _print_ceiling(self, expr):
        num, den = sp.fraction(sp.together(expr.args[0]))
        if not den.is_Integer:
            raise UnsupportedError(f"export: {expr} is not a rounding of an integer quotient")
        t = self.int_term(sp.expand(-num))
        return Term(f"-({self.paren(t.code)} // {int(den)})", t.axes, kind="int", number=t.number)

    # -- conditions ---------------------------------------------------------------------------
    def _print_Relational(self, expr):
        a, b = self._print(expr.lhs), self._print(expr.rhs)
        axes, (ca, cb) = self.combine([a, b])
        op = {"==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}[expr.rel_op]
        return Term(f"{self.paren(ca)} {op} {self.paren(cb)}", axes, kind="bool",
                    number=a.number and b.number)

    def _print_And(self, expr):
        return self._logic(expr.args, "&")

    def _print_Or(self, expr):
        return self._logic(expr.args, "|")

    def _print_Not(self, expr):
        t = self._print(expr.args[0])
        return Term(f"~{self.paren(t.code)}", t.axes, kind="bool")

    def _logic(self, args, op):
        terms = [self._print(a) for a in args]
        axes, codes = self.combine(terms)
        return Term(f" {op} ".join(self.paren(c) for c in codes), axes, kind="bool",
                    number=all(t.number for t in terms))

    def _print_Piecewise(self, expr):
        pieces = list(expr.args)
        if pieces[-1].cond != sp.true:
            pieces.append(sp.functions.elementary.piecewise.ExprCondPair(sp.nan, sp.true))
        out = self._print(pieces[-1].expr)
        for value, cond in reversed(pieces[:-1]):
            v, c = self._print(value), self._print(cond)
            axes, (cc, cv, co) = self.combine([c, v, out])
            if c.code in ("True", "False"):
                out = v if c.code == "True" else out
                continue
            if c.number:                          # a scalar condition (on a time loop's t)
                out = Term(self.conditional(c.code, v, out, axes), axes,
                           number=v.number and out.number)
                continue
            if v.number and out.number:           # both branches constants: in the data's dtype
                out = Term(self.where(cc, self.constant(cv), self.constant(co)), axes)
            else:
                out = Term(self.where(cc, cv, co), axes)
        return out

    def _print_NaN(self, expr):
        return Term("float('nan')", number=True)

    def _print_Function(self, expr):
        if hasattr(expr, "as_piecewise"):            # an Iverson bracket left by delta elimination
            return self._print(expr.as_piecewise())
        raise UnsupportedError(f"export: function {type(expr).__name__} has no array lowering "
                               f"(in {expr}); supported: exp, log, tanh, sin, cos, Abs, sign, Max, "
                               f"Min, Piecewise and chainrule primitives")

    # -- elementwise functions ----------------------------------------------------------------
    def _unary(self, fn, expr):
        t = self._print(expr.args[0])
        return Term(f"{fn}({t.code})", t.axes)

    def _print_exp(self, expr):
        return self._unary(f"{self.lib}.exp", expr)

    def _print_log(self, expr):
        # clipped log, as in the Numba kernels: log(max(x, tiny)) stays finite at a saturated 0
        return self._unary("_log", expr)

    def _print_tanh(self, expr):
        return self._unary(f"{self.lib}.tanh", expr)

    def _print_sin(self, expr):
        return self._unary(f"{self.lib}.sin", expr)

    def _print_cos(self, expr):
        return self._unary(f"{self.lib}.cos", expr)

    def _print_Abs(self, expr):
        return self._unary(f"{self.lib}.abs", expr)

    def _print_sign(self, expr):
        return self._unary(f"{self.lib}.sign", expr)

    def _print_Max(self, expr):
        return self._extremum(expr, "_maximum")

    def _print_Min(self, expr):
        return self._extremum(expr, "_minimum")

    def _extremum(self, expr, fn):
        terms = [self._print(a) for a in expr.args]
        axes, codes = self.combine(terms)
        out = codes[0]
        for c in codes[1:]:
            out = f"{fn}({out}, {c})"
        return Term(out, axes, kind=_kind(terms))

    # the primitives: the same stable formulas as their Numba lowerings
    def _print_sigmoid(self, expr):
        return self._unary("_sigmoid", expr)

    def _print_softplus(self, expr):
        return self._unary("_softplus", expr)

    def _print_step(self, expr):
        return self._unary("_step", expr)

    def _print_relu(self, expr):
        return self._unary("_relu", expr)

    def _print_leaky_relu(self, expr):
        x, alpha = (self._print(a) for a in expr.args)
        if not alpha.number:
            raise UnsupportedError(f"export: leaky_relu slope {expr.args[1]} is not a constant")
        return Term(f"_leaky_relu({x.code}, {alpha.code})", x.axes)

    def _print_Primitive(self, expr):
        raise UnsupportedError(f"export: primitive {type(expr).__name__} has no array lowering")

    # -- reductions ---------------------------------------------------------------------------
    def _enter_limits(self, expr):
        """Enter a reduction's indices (a sum's outermost first, a maximum's in the order of its
        limits, which is the order of its tie rule); returns (indices entered, masks, body).

        A limit that moves with an index in scope (a convolution's input gradient sums over the
        outputs that saw a pixel) gets a mask. When its window is narrower than the whole range, a
        sum or log-sum-exp runs over the window's offset instead: ``v = lo + t``, ``0 ≤ t ≤ hi - lo``,
        so its arrays span the window (K), not the whole axis (H). A maximum keeps its index, so
        that its argmax stays a position of the window."""
        masks, entered, shift, hulls = [], [], {}, {}
        body = expr.function
        limits = list(expr.limits) if isinstance(expr, MaxOver) else list(reversed(expr.limits))
        for v, lo, hi in limits:
            if v in self.box:
                raise UnsupportedError(f"export: index {v} shadows an index in scope in {expr}")
            lo, hi = sp.sympify(lo).xreplace(shift), sp.sympify(hi).xreplace(shift)
            moving = self.depends_on_scope(lo) or self.depends_on_scope(hi)
            clo = self.constant_bound(lo, up=False)
            chi = self.constant_bound(hi, up=True)
            hulls[v] = (clo, chi)
            width = self.window_width(lo, hi) if moving and not isinstance(expr, MaxOver) else None
            if width is not None and width < chi - clo + 1:
                t = sp.Symbol(f"{v.name}_off", integer=True)
                while t in self.box or t in body.free_symbols:
                    t = sp.Symbol(t.name + "_", integer=True)
                base, top = self.unclipped(lo, sp.Max), self.unclipped(hi, sp.Min)
                wide = self.window_width(base, top) if self.is_affine(base) else None
                if wide is not None and (base, top) != (lo, hi):
                    # the window from the unclipped bound (a convolution's input gradient: h'' from
                    # h' - 1, not Max(0, h' - 1)): every read stays affine (a kernel read plainly,
                    # a zero-padded window of δ), and the clipped limits become the mask
                    shift[v] = base + t
                    self.enter(t, 0, max(wide - 1, 0))
                    entered.append(t)
                    masks += self.limit_conditions(base + t, lo, hi, base, top)
                    continue
                shift[v] = lo + t
                self.enter(t, 0, max(width - 1, 0))
                entered.append(t)
                masks.append(t <= hi - lo)
                continue
            self.enter(v, clo, chi)
            entered.append(v)
            if moving:
                masks.append(sp.And(v >= lo, v <= hi))
        masks = [m for m in masks if m is not sp.true]
        if shift and body.has(IsArgmax):
            body = self.hoist_argmax(body, hulls)
        return entered, masks, body.xreplace(shift) if shift else body

    def unimplied(self, masks, factors) -> list:
        """The conjuncts of ``masks`` that no factor implies: ``0 <= e`` or ``e <= n - 1`` where a
        factor reads a tensor of axis length n at ``e`` through a zero-padded window is zero anyway
        (the guard of a convolution's input gradient, once δ is padded)."""
        bounds = []
        for f in factors:
            if isinstance(f, sp.Indexed) and str(f.base.label) in self.names and self.zero_outside(f):
                for e, n in zip(f.indices, self.shapes[str(f.base.label)]):
                    bounds += [(sp.expand(e), ">="), (sp.expand(e - (n - 1)), "<=")]
        out = []
        for m in masks:
            for c in (m.args if isinstance(m, sp.And) else (m,)):
                if isinstance(c, (sp.GreaterThan, sp.StrictGreaterThan, sp.LessThan, sp.StrictLessThan)):
                    ge = isinstance(c, (sp.GreaterThan, sp.StrictGreaterThan))
                    strict = isinstance(c, (sp.StrictGreaterThan, sp.StrictLessThan))
                    d = sp.expand(c.lhs - c.rhs) + ((-1 if ge else 1) if strict else 0)
                    if (d, ">=" if ge else "<=") in bounds:
                        continue
                out.append(c)
        return out

    def zero_outside(self, read) -> bool:
        """Is ``read`` printed as a window of a zero-padded copy (zero wherever it leaves its tensor)?"""
        idx = list(read.indices)
        if any(sp.sympify(e).atoms(sp.Indexed) for e in idx) or self.pad("t", [(0, 0)] * len(idx)) is None:
            return False
        used = set().union(*[sp.sympify(e).free_symbols for e in idx]) & set(self.box)
        axes = self.sort_axes(used)
        affine = self.affine_map(idx, axes)
        shape = self.shapes[str(read.base.label)]
        return affine is not None and self.pads_for(idx, shape) is not None \
            and self.window("t", shape, axes, *affine) is not None

    def unclipped(self, e, clip):
        """``Max(0, h' - 1)`` -> ``h' - 1``: a bound clipped to a constant by ``clip`` (Max for a
        lower bound, Min for an upper one), without its clipping; else the bound itself."""
        e = sp.sympify(e)
        if isinstance(e, clip):
            moving = [a for a in e.args if self.depends_on_scope(a)]
            if len(moving) == 1 and all(a.is_number for a in e.args if a is not moving[0]):
                return self.unclipped(moving[0], clip)
        return e

    def is_affine(self, e) -> bool:
        """``e`` is an integer-coefficient affine expression of the indices in scope."""
        e = sp.expand(sp.sympify(e))
        syms = e.free_symbols & set(self.box)
        rest = e - sum(e.coeff(s) * s for s in syms)
        return all(e.coeff(s).is_Integer for s in syms) and not (rest.free_symbols & set(self.box)) \
            and not rest.has(sp.Max, sp.Min, sp.floor, sp.ceiling)

    def limit_conditions(self, v, lo, hi, base, top) -> list:
        """The conditions ``lo <= v <= hi`` for ``v = base + t`` (``0 <= t <= top - base``), each
        clipping of a bound its own conjunct; those the window implies are left out."""
        out = []
        for bound, clip, ok in ((lo, sp.Max, lambda a: sp.simplify(a - base) == 0),
                                (hi, sp.Min, lambda a: sp.simplify(a - top) == 0)):
            parts = bound.args if isinstance(bound, clip) else (bound,)
            for a in parts:
                if ok(a):
                    continue
                cond = (v >= a) if clip is sp.Max else (v <= a)
                if cond is not sp.true:
                    out.append(cond)
        if not (sp.simplify(top - base).is_number):   # a window narrower at some points
            out.append(v <= top)
        return out

    def window_width(self, lo, hi):
        """The largest ``hi - lo + 1`` over the values of the indices in scope it depends on (found
        by trying them all: image-sized boxes), or None when that is not possible here."""
        import itertools
        import math
        syms = sorted((lo.free_symbols | hi.free_symbols) & set(self.box), key=str)
        if not syms or BATCH in (lo.free_symbols | hi.free_symbols):
            return None
        ranges, points = [], 1
        for v in syms:
            a, b = self.box[v]
            if not (a.is_Integer and b.is_Integer):
                return None
            ranges.append(range(int(a), int(b) + 1))
            points *= len(ranges[-1])
        if points > 20000:
            return None
        f = sp.lambdify(syms, hi - lo, modules=[{"Max": max, "Min": min, "floor": math.floor,
                                                  "ceiling": math.ceil}, "math"])
        widest = max(f(*pt) for pt in itertools.product(*ranges))
        return max(int(math.floor(widest)) + 1, 0)

    def scope_key(self):
        return tuple((s, self.box[s]) for s in self.scope)

    def _leave_all(self, syms):
        for v in syms:
            self.leave(v)

    def reduce_dims(self, term: Term, syms) -> list[int]:
        return [term.axes.index(v) for v in syms if v in term.axes]

    def _print_Sum(self, expr):
        key = ("sum", expr, self.scope_key())
        if key in self.memo:
            return self.memo[key]
        scattered = self.scatter_sum(expr)
        if scattered is not None:
            self.memo[key] = scattered
            return scattered
        outer = tuple(self.scope)
        entered, masks, body = self._enter_limits(expr)
        coeff, factors = body.as_coeff_mul()
        factors = [g for f in factors for g in _one_hot_factors(f)]
        masks = self.unimplied(masks, factors)
        terms = [self.einsum_operand(f) for f in factors]
        if masks:
            mask = self._print(sp.And(*masks))
            terms.append(Term(self.to_float(mask), mask.axes))
        scalars = [t for t in terms if t.number or not t.axes]
        arrays = [t for t in terms if not (t.number or not t.axes)]
        arrays = [Term(self.to_float(t), t.axes) if t.kind == "bool" else t for t in arrays]
        present = {a for t in arrays for a in t.axes}
        out_axes = self.sort_axes([a for a in present if a not in entered])
        count = sp.Integer(1)
        for v in entered:                           # an index no factor reads: a multiplicity
            if v not in present:
                count *= self.extent(v)
        if arrays:
            code = self.einsum(arrays, out_axes)
        else:
            code = "1.0"
        self._leave_all(entered)
        factor = [self.size_code(count)] if count != 1 else []
        if coeff not in (1, -1):
            factor.append(self._print(coeff).code)
        factor += [self.paren(t.code) for t in scalars]
        if factor:
            code = " * ".join(factor + [self.paren(code)])
        if coeff == -1:
            code = f"-{self.paren(code)}"
        name = self.emit("s", code, _comment(expr))
        term = Term(name, tuple(a for a in outer if a in out_axes))
        self.memo[key] = term
        return term

    def scatter_sum(self, expr):
        """``Σ_bt [j = x[b, t]] v[b, t, o]`` (an embedding's derived adjoint: token ids ``x`` over all
        of the summed indices, ``j`` an output index no other factor reads) as a scatter-add of the
        rows ``v[b, t, :]`` into row ``x[b, t]``: no one-hot of the vocabulary's size. None when the
        sum is not of that form, or the target has no scatter (the one-hot einsum is printed)."""
        coeff, factors = sp.sympify(expr.function).as_coeff_mul()
        factors = [g for f in factors for g in _one_hot_factors(f)]
        limits = [v for v, _, _ in expr.limits]
        for k, f in enumerate(factors):
            if not isinstance(f, sp.Eq):
                continue
            for row, ids in ((f.lhs, f.rhs), (f.rhs, f.lhs)):
                if not (row in self.box and isinstance(ids, sp.Indexed) and self.names.get(str(ids.base.label)) in self.integer):
                    continue
                if sorted(map(str, ids.indices)) != sorted(map(str, limits)) or len(set(ids.indices)) != len(limits):
                    continue
                rest = factors[:k] + factors[k + 1:]
                if any(row in sp.sympify(g).free_symbols for g in rest):
                    continue
                shape = self.shapes[str(ids.base.label)]
                if any(not (sp.sympify(lo) == 0 and sp.sympify(hi - (n - 1)) == 0)
                       for (v, lo, hi) in expr.limits for i, n in zip(ids.indices, shape) if i == v):
                    continue                         # a partial range: the one-hot einsum masks it
                return self._scatter(coeff * sp.Mul(*rest), row, ids, expr.limits)
        return None

    def _scatter(self, value, row, ids, limits):
        idx = list(ids.indices)                      # entered in the order the token ids are laid out
        for v in idx:
            lo, hi = next((lo, hi) for w, lo, hi in limits if w == v)
            self.enter(v, lo, hi)
        try:
            t = self.einsum_operand(value)           # a plain read keeps its own axis order
            outer = tuple(a for a in self.sort_axes(t.axes) if a not in idx)
            want = tuple(idx) + outer                # laid out as the token ids, then the row
            if t.number or set(t.axes) != set(want):
                full = outer + tuple(idx)
                t = Term(self.broadcast(t, full), full)
            values = t.code
            if t.axes != want:
                values = self.transpose(values, [t.axes.index(a) for a in want])
            ids_code = self._print(ids)
            rows = self.size_code(self.extent(row))
            # the token ids were checked on entry: every id is a row of the table
            code = self.scatter_add(rows, ids_code.code, values,
                                    [self.size_code(self.extent(a)) for a in outer])
        finally:
            self._leave_all(idx)
        if code is None:
            return None
        axes = (row,) + outer
        name = self.emit("s", code, f"scatter-add into the rows selected by {ids}")
        order = self.sort_axes(axes)
        if order != axes:
            name = self.emit("s", self.transpose(name, [axes.index(a) for a in order]))
        return Term(name, order)

    def scatter_add(self, rows, ids, values, sizes):
        """Zeros of shape ``(rows, *sizes)`` plus each slice ``values[p, ...]`` added to row
        ``ids[p]``, over every position p of ``ids`` (``values`` is laid out as ``ids`` then
        ``sizes``); None where the target has no scatter."""
        return None

    def einsum_operand(self, f) -> Term:
        """A factor of a summed product; a plain read keeps its own axis order (einsum's subscripts
        say how it lines up: no transpose is written)."""
        if isinstance(f, sp.Indexed):
            name = str(f.base.label)
            idx = list(f.indices)
            if name in self.names and all(isinstance(i, sp.Symbol) and i in self.box for i in idx) \
                    and len(set(idx)) == len(idx):
                shape = self.shapes[name]
                if all(sp.simplify(self.box[i][0]) == 0 and sp.simplify(self.box[i][1] - (n - 1)) == 0
                       for i, n in zip(idx, shape)):
                    return Term(self.names[name], tuple(idx), steps=_steps([[int(k == j) for k in range(len(idx))]
                                                                            for j in range(len(idx))], shape))
            if name in self.names and self.names[name] not in self.integer:
                return self.gather(self.names[name], self.shapes[name], idx, memory_order=True)
        return self._print(f)

    def _print_LogSumExp(self, expr):
        return self._reduction(expr, "logsumexp", fill="-inf")

    def _print_MaxOver(self, expr):
        return self._reduction(expr, "amax", fill="-inf")

    def _reduction(self, expr, op, fill):
        key = (op, expr, self.scope_key())
        if key in self.memo:
            return self.memo[key]
        outer = tuple(self.scope)
        entered, masks, body = self._enter_limits(expr)
        t = self._print(body)
        if masks:
            m = self._print(sp.And(*masks))
            axes, (cm, ct) = self.combine([m, t])
            t = Term(self.where(cm, ct, self.fill(fill)), axes)
        dims = self.reduce_dims(t, entered)
        missing = sp.Integer(1)
        for v in entered:
            if v not in t.axes:
                missing *= self.extent(v)
        self._leave_all(entered)
        code = self.reduce(op, t.code, dims) if dims else t.code
        if op == "logsumexp" and missing != 1:      # an index the body does not read: log(count)
            code = f"{self.paren(code)} + {_float(sp.log(missing))}" if missing.is_number else \
                f"{self.paren(code)} + math.log({self.size_code(missing)})"
        name = self.emit("s", code, _comment(expr))
        term = Term(name, tuple(a for a in t.axes if a not in entered))
        self.memo[key] = term
        return term

    def _print_IsArgmax(self, expr):
        """``[point = argmax f]``: the first maximum in the order of the limits (the tie rule of
        ``MaxOver``: row-major over the window), compared with the point."""
        m, *point = expr.args
        keep, where, lows = self.argmax_at(m)
        conds = []
        for v, p in zip([v for v, _, _ in m.limits], point):
            pt = self.int_term(p)
            at = Term(where[v], keep, kind="int") if where[v] else Term(self.size_code(lows[v]), kind="int", number=True)
            axes, (ca, cp) = self.combine([at, pt])
            conds.append(Term(f"{self.paren(ca)} == {self.paren(cp)}", axes, kind="bool"))
        axes, codes = self.combine(conds)
        return Term(" & ".join(self.paren(c) for c in codes), axes, kind="bool")

    def argmax_at(self, m):
        """The first argmax of the maximum ``m`` over its window, for every point of the indices in
        scope it reads: (those indices, per limit the array of its coordinate or None, the window's
        lowest point)."""
        key = ("argmax", m, self.scope_key())
        if key not in self.memo:
            entered, masks, body = self._enter_limits(m)
            t = self._print(body)
            if masks:
                mk = self._print(sp.And(*masks))
                axes, (cm, ct) = self.combine([mk, t])
                t = Term(self.where(cm, ct, self.fill("-inf")), axes)
            present = [v for v in entered if v in t.axes]   # in the order of the limits
            lows = {v: self.box[v][0] for v in entered}
            sizes = {v: self.extent(v) for v in entered}
            self._leave_all(entered)
            keep = tuple(a for a in t.axes if a not in entered)
            flat = t.code
            if len(present) > 1:
                flat = self.flatten_last(t.code, len(present))
            where = {}
            if present:
                arg = self.emit("am", self.argmax(flat), f"first argmax of {_comment(m)}")
                stride = sp.Integer(1)
                for v in reversed(present):
                    pos = f"{self.paren(arg)} // {self.size_code(stride)}" if stride != 1 else arg
                    if v != present[0]:
                        pos = f"({pos}) % {self.size_code(sizes[v])}"
                    where[v] = self.emit("am", f"{pos} + {self.size_code(lows[v])}" if lows[v] != 0 else pos)
                    stride *= sizes[v]
            limits = [v for v, _, _ in m.limits]
            self.memo[key] = (keep, {v: where.get(v) for v in limits}, lows)
        return self.memo[key]

    def hoist_argmax(self, body, hulls):
        """``[point = argmax m]`` inside a sum whose window moves (max pooling's input gradient sums
        over the windows that saw a pixel, ``h`` from ``ceil((j - 1)/2)``): the argmax is computed
        once per window, over the whole range of ``h`` (``hulls``), from the maximum's own (strided)
        view, and read at the moving ``h`` like a tensor; not recomputed from a gather of the input
        per pixel and window offset."""
        def hoist(e):
            m, *point = e.args
            moving = [v for v in hulls if v in m.free_symbols]
            scoped = m.free_symbols & set(self.box)
            if not moving or any(hulls[v][0] != 0 for v in moving) \
                    or any(sp.simplify(self.box[v][0]) != 0 for v in scoped):
                return e
            for v in moving:
                self.enter(v, *hulls[v])
            try:
                keep, where, lows = self.argmax_at(m)
                shape = tuple(self.extent(a) for a in keep)
            finally:
                self._leave_all(moving)
            conds = []
            for (v, _, _), p in zip(m.limits, point):
                if where[v] is None:
                    conds.append(sp.Eq(lows[v], p))
                    continue
                name = f"argmax {where[v]}"
                self.names[name], self.shapes[name] = where[v], shape
                self.integer.add(where[v])
                conds.append(sp.Eq(sp.IndexedBase(name)[keep], p))
            return sp.Piecewise((1, sp.And(*conds)), (0, True))
        return body.replace(lambda e: isinstance(e, IsArgmax), hoist)

    # -- framework hooks (subclasses) ------------------------------------------------------------
    def shape_code_of(self, shape) -> str:
        """A concrete shape (ints, the batch size) as a tuple's code."""
        dims = [self.size_code(n) for n in shape]
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"

    def conditional(self, cond: str, a: Term, b: Term, axes) -> str:
        """``a`` where the scalar condition ``cond`` holds, else ``b`` (laid out over ``axes``)."""
        raise NotImplementedError

    def step_slice(self, seq: str, axis: int, rank: int, at: str, length: int) -> str:
        """``seq`` at time ``at`` (inside the sequence) along ``axis``: its time slice."""
        raise NotImplementedError

    def slice_or_initial(self, name, seq, axis, rank, at, inside, length, init_lines, shape) -> list:
        """Lines setting ``name`` to ``seq`` at time ``at`` where ``inside`` holds, else to the
        initial state (``init_lines`` set ``name`` to it), or zeros of ``shape`` when there are none."""
        raise NotImplementedError

    def store(self, seq: str, axis: int, rank: int, t: str, value: str) -> str:
        """The line writing one step's ``value`` into its sequence at time ``t``."""
        raise NotImplementedError

    def time_loop(self, t: str, length: int, direction: int, sequences, body) -> list:
        """The loop over ``t`` (upward for direction 1, downward for -1) running ``body`` (lines),
        which reads and stores the ``sequences`` ((identifier, shape code) pairs) it computes."""
        raise NotImplementedError

    def arange(self, lo: str, hi: str) -> str:
        raise NotImplementedError

    def transpose(self, code: str, perm) -> str:
        raise NotImplementedError

    def clamp(self, code: str, lo: str, hi: str) -> str:
        raise NotImplementedError

    def where(self, cond: str, a: str, b: str) -> str:
        return f"{self.lib}.where({cond}, {a}, {b})"

    def to_float(self, term) -> str:
        raise NotImplementedError

    def constant(self, code: str) -> str:
        """A Python number as a 0-d array of the data's dtype."""
        raise NotImplementedError

    def broadcast(self, term: Term, axes) -> str:
        raise NotImplementedError

    def einsum(self, terms, out_axes) -> str:
        """``Σ Π terms`` keeping ``out_axes``: one einsum (subscripts: the indices' own letters
        where they are single distinct letters); a plain sum when there is one operand; a matrix
        product where the target prints one (``contract``)."""
        if len(terms) == 1:
            t = terms[0]
            kept = tuple(a for a in t.axes if a in out_axes)
            if kept == tuple(out_axes):
                dims = [k for k, a in enumerate(t.axes) if a not in out_axes]
                if not dims:
                    return t.code
                return self.reduce("sum", t.code, dims)
        if len(terms) == 2:
            code = self.contract(terms[0], terms[1], tuple(out_axes))
            if code is not None:
                return code
        pool = [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"]
        axes = []
        for t in terms:
            axes += [a for a in t.axes if a not in axes]
        letters = {}
        for a in axes:
            if len(a.name) == 1 and a.name in pool:
                letters[a] = a.name
                pool.remove(a.name)
        for a in axes:
            if a not in letters:
                letters[a] = pool.pop(0)
        spec = ",".join("".join(letters[a] for a in t.axes) for t in terms)
        spec += "->" + "".join(letters[a] for a in out_axes)
        return f"{self.lib}.einsum('{spec}', {', '.join(t.code for t in terms)})"

    def contract(self, a: Term, b: Term, out_axes) -> str | None:
        """``Σ a b`` over their shared axes, keeping ``out_axes``, as a matrix product (None: an
        einsum is printed)."""
        return None

    def reduce(self, op: str, code: str, dims) -> str:
        raise NotImplementedError

    def fill(self, what: str) -> str:
        return {"-inf": "-math.inf", "0": "0.0"}[what]

    def flatten_last(self, code: str, k: int) -> str:
        raise NotImplementedError

    def argmax(self, code: str) -> str:
        raise NotImplementedError


class _IntCode(Printer):
    """Plain Python for an integer size expression (the batch size as ``n_batch``)."""

    def _print_Symbol(self, expr):
        if expr == BATCH:
            return "n_batch"
        raise UnsupportedError(f"export: size {expr} has no value")

    def _print_Integer(self, expr):
        return str(int(expr))

    def _print_Add(self, expr):
        return "(" + " + ".join(self._print(a) for a in expr.args) + ")"

    def _print_Mul(self, expr):
        return "(" + " * ".join(self._print(a) for a in expr.args) + ")"

    def _print_Rational(self, expr):
        raise UnsupportedError(f"export: size {expr} is not whole")


def _row_major(shape) -> list:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= int(n) if sp.sympify(n).is_Integer else 1 << 20      # the batch size: large
    return strides[::-1]


def _steps(cols, shape) -> tuple:
    """Per window axis, its step through a row-major tensor of ``shape``."""
    strides = _row_major(shape)
    return tuple(sum(a * st for a, st in zip(col, strides)) for col in cols)


def _by_memory(axes, affine, shape):
    """A window's axes (and its columns) sorted by the step each takes through the tensor's
    row-major memory, largest first (the batch size counted as large)."""
    cols, offset = affine
    step = _steps(cols, shape)
    order = sorted(range(len(axes)), key=lambda k: -abs(step[k]))
    return tuple(axes[k] for k in order), ([cols[k] for k in order], offset)


def _one_hot_factors(f) -> list:
    """``Piecewise((v, cond), (0, True))`` under a sum as the two factors ``[cond]`` and ``v``: an
    embedding's derived adjoint ``Σ_bt [j = x[b, t]] d_e[b, t, o]`` becomes one einsum of a one-hot
    with ``d_e`` (the rows a token selected receive its gradient); other factors are kept whole."""
    if isinstance(f, sp.Piecewise) and len(f.args) == 2 and f.args[1].cond == sp.true \
            and f.args[1].expr == 0:
        value, cond = f.args[0]
        return [cond, *sp.Mul.make_args(value)]
    return [f]


def _le(a, b) -> bool:
    """``a <= b`` provably (batch-size bounds compare symbolically)."""
    d = sp.simplify(sp.sympify(b) - sp.sympify(a))
    return bool(d.is_nonnegative)


def _float(value) -> str:
    v = float(value)
    if v != v:
        return "float('nan')"
    if v in (float("inf"), float("-inf")):
        return "math.inf" if v > 0 else "-math.inf"
    return repr(v)


def _kind(terms) -> str:
    kinds = {t.kind for t in terms}
    return "float" if "float" in kinds else ("int" if "int" in kinds else "bool")


def _ordered(args):
    """Addends with non-negated ones first, so that code reads ``a - b`` rather than ``-b + a``."""
    return sorted(args, key=lambda a: a.could_extract_minus_sign())


def _comment(expr) -> str:
    from ..lower import comment_text
    text = " ".join(sp.sstr(expr).split())
    return comment_text(text if len(text) <= 90 else text[:87] + "...")
