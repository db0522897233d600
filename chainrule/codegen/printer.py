"""Printing scalar SymPy expressions as Numba-compatible Python source.

A SymPy code printer (``_print_<Class>`` methods). Every tensor and symbol is looked up in a name
map built by the lowering: user-chosen names never reach the generated code as raw text.
Reductions (``Sum``, ``LogSumExp``) are never printed here: the lowering hoists them into
accumulator loops first and replaces them by the accumulator's name.
"""
from __future__ import annotations

import sympy as sp
from sympy.printing.pycode import PythonCodePrinter

from ..derive.errors import UnsupportedError
from ..derive.primitives import LogSumExp, Primitive, step


def _float_literal(value) -> str:
    text = repr(float(value))
    if text in ("inf", "-inf", "nan"):
        return {"inf": "np.inf", "-inf": "-np.inf", "nan": "np.nan"}[text]
    return text


class KernelPrinter(PythonCodePrinter):
    """Prints one scalar expression; ``names`` maps tensor names / Symbols to code identifiers."""

    printmethod = "_kernelcode"

    def __init__(self, names: dict, settings=None, cast: str | None = None):
        super().__init__(settings or {"fully_qualified_modules": True})
        self.names = names            # str (tensor name) or Symbol -> identifier
        # ``cast="DT"`` (a float32 module): numbers and integer symbols used as *values* print as
        # ``DT(...)``, since Numba widens float32 op int64 (or a float64 literal) to float64, and
        # the whole loop would then run in double precision. Indices, bounds, exponents and
        # comparisons stay integers (``_plain`` > 0 while they are printed).
        self.cast = cast
        self._plain = 0

    def _value(self, text: str) -> str:
        return f"{self.cast}({text})" if self.cast and not self._plain else text

    def _print_plain(self, expr) -> str:
        self._plain += 1
        try:
            return self._print(expr)
        finally:
            self._plain -= 1

    # -- leaves ---------------------------------------------------------------------------
    def _lookup(self, key):
        if key in self.names:
            return self.names[key]
        raise UnsupportedError(f"codegen: no value for {key} (not a tensor, index or size of the model)")

    def _print_Symbol(self, expr):
        name = self.names.get(expr, self.names.get(expr.name))
        if name is not None:
            return self._value(name) if expr.is_integer else name
        raise UnsupportedError(f"codegen: symbol {expr} is neither a tensor, an index nor a known size")

    _print_Dummy = _print_Symbol

    def _print_Indexed(self, expr):
        base = self._lookup(str(expr.base.label))
        self._plain += 1
        try:
            return "%s[%s]" % (base, ", ".join(self._print_index(i) for i in expr.indices))
        finally:
            self._plain -= 1

    def _print_index(self, e):
        """An index with a rational coefficient (a strided map solved for its index, guarded by a
        divisibility test) is an exact quotient: printed with integer division, never ``/``."""
        if isinstance(e, sp.Indexed):            # a token id (stored as a float): an integer index
            return "int(%s)" % self._print(e)
        num, den = sp.fraction(sp.together(sp.sympify(e)))
        if den == 1:
            return self._print(e)
        if not den.is_Integer:
            raise UnsupportedError(f"codegen: index {e} divides by {den}, not by an integer")
        return "((%s) // %d)" % (self._print(sp.expand(num)), int(den))

    def _print_floor(self, expr):
        num, den = sp.fraction(sp.together(expr.args[0]))
        if not den.is_Integer:
            raise UnsupportedError(f"codegen: {expr} is not a rounding of an integer quotient")
        return "((%s) // %d)" % (self._print(sp.expand(num)), int(den))

    def _print_ceiling(self, expr):
        num, den = sp.fraction(sp.together(expr.args[0]))
        if not den.is_Integer:
            raise UnsupportedError(f"codegen: {expr} is not a rounding of an integer quotient")
        return "(-((%s) // %d))" % (self._print(sp.expand(-num)), int(den))

    def _print_Mod(self, expr):
        a, m = expr.args
        return "((%s) %% (%s))" % (self._print_index(a), self._print_index(m))

    def _print_Integer(self, expr):
        return self._value(str(int(expr)))

    def _print_Rational(self, expr):
        return self._value(_float_literal(expr))

    def _print_Half(self, expr):
        return self._value("0.5")

    def _print_Float(self, expr):
        return self._value(_float_literal(expr))

    def _print_Infinity(self, expr):
        return self._value("np.inf")

    def _print_NegativeInfinity(self, expr):
        return self._value("-np.inf")

    def _print_Pow(self, expr, rational=False):
        base, exp = expr.args
        if self.cast and not self._plain and exp.is_Integer:
            # an integer power stays a product (never a float pow); 1/x divides a DT one
            b = self.parenthesize(base, sp.printing.precedence.PRECEDENCE["Pow"])
            if exp == -1:
                return f"{self._value('1')}/{b}"
            if exp < 0:
                return f"{self._value('1')}/{b}**{-int(exp)}"
            return f"{b}**{int(exp)}"
        return super()._print_Pow(expr, rational=rational)

    def _print_Exp1(self, expr):
        return "math.e"

    def _print_Pi(self, expr):
        return "math.pi"

    # -- functions ------------------------------------------------------------------------
    def _print_exp(self, expr):
        return "_exp(%s)" % self._print(expr.args[0])   # the module's vectorisable exp

    def _print_log(self, expr):
        # clipped log: log(max(x, tiny)), so log(0) of a saturated probability stays finite
        return "math.log(max(%s, TINY))" % self._print(expr.args[0])

    def _print_sin(self, expr):
        return "math.sin(%s)" % self._print(expr.args[0])

    def _print_cos(self, expr):
        return "math.cos(%s)" % self._print(expr.args[0])

    def _print_tanh(self, expr):
        return "_tanh(%s)" % self._print(expr.args[0])  # the module's vectorisable tanh

    def _print_Abs(self, expr):
        return "abs(%s)" % self._print(expr.args[0])

    def _print_sign(self, expr):
        return "_sign(%s)" % self._print(expr.args[0])

    def _print_Max(self, expr):
        args = [self._print(a) for a in expr.args]
        out = args[0]
        for a in args[1:]:
            out = "max(%s, %s)" % (out, a)
        return out

    def _print_Min(self, expr):
        args = [self._print(a) for a in expr.args]
        out = args[0]
        for a in args[1:]:
            out = "min(%s, %s)" % (out, a)
        return out

    def _print_Primitive(self, expr):
        return "%s(%s)" % (type(expr).__name__, ", ".join(self._print(a) for a in expr.args))

    def _print_Piecewise(self, expr):
        parts = []
        for value, cond in expr.args:
            if cond == sp.true:
                parts.append(self._print(value))
                break
            parts.append("(%s) if (%s) else " % (self._print(value), self._print(cond)))
        else:
            parts.append("np.nan")      # no branch matched: undefined, never silently 0
        return "(" + "".join(parts) + ")"

    def _print_Relational(self, expr):
        return "(%s %s %s)" % (self._print_plain(expr.lhs), expr.rel_op, self._print_plain(expr.rhs))

    def _print_Sum(self, expr):
        raise UnsupportedError("codegen internal error: a Sum reached the scalar printer unhoisted")

    def _print_LogSumExp(self, expr):
        raise UnsupportedError("codegen internal error: a LogSumExp reached the scalar printer unhoisted")

    def _print_Function(self, expr):
        if isinstance(expr, Primitive):
            return self._print_Primitive(expr)
        raise UnsupportedError(f"codegen: function {type(expr).__name__} has no lowering "
                               f"(in {expr}); supported: exp, log, tanh, sin, cos, Abs, sign, Max, "
                               f"Min, Heaviside (as step), Piecewise and chainrule primitives")

    def _print_not_supported(self, expr):
        raise UnsupportedError(f"codegen: cannot lower {type(expr).__name__} ({expr})")

    emptyPrinter = _print_not_supported


def to_conventions(expr):
    """SymPy's step-function constructs, mapped onto chainrule's one stated convention.

    The value of a step at its kink is a convention, stated once, by the ``step`` primitive:
    ``step(0) = 0`` (ReLU'(0) = 0, as PyTorch). SymPy differentiates ``Max``/``Min`` (hence
    hinge, Huber, clipping, ELU written with ``Min``) into ``Heaviside(x)``, whose own default at 0
    is ½; the design replaces that default by the convention, so

    * ``Heaviside(x)`` (SymPy's default ½) and ``Heaviside(x, 0)`` lower as ``step(x)``;
    * ``Heaviside(x, h0)`` with any other explicit ``h0`` keeps the value it states at 0;
    * ``DiracDelta(x)`` (the derivative of ``sign``, ``Heaviside`` or ``step``) is 0: the derivative
      of a step is zero almost everywhere, as ``step``'s own derivative is declared.

    ``Abs`` lowers as ``abs`` and its derivative ``sign`` as ``sign(0) = 0``; ``Max``/``Min`` as
    ``max``/``min``. (The same map is what the explanation prints: ``1[x > 0]``.)
    """
    expr = sp.sympify(expr)
    if not expr.has(sp.Heaviside, sp.DiracDelta):
        return expr

    def heaviside(*args):
        x = args[0]
        h0 = args[1] if len(args) > 1 else sp.S.Half
        if h0 in (sp.S.Half, sp.S.Zero):
            return step(x)
        return sp.Piecewise((sp.S.One, x > 0), (h0, sp.Eq(x, 0)), (sp.S.Zero, True))
    expr = expr.replace(sp.Heaviside, heaviside)
    return expr.replace(sp.DiracDelta, lambda *args: sp.S.Zero)


SUPPORTED_FUNCTIONS = (sp.exp, sp.log, sp.tanh, sp.sin, sp.cos, sp.Abs, sp.sign, sp.Max, sp.Min,
                       sp.Piecewise, sp.Mod, sp.floor, sp.ceiling, Primitive)


def fold_constants(expr):
    """Each product's irrational numeric factors (√2, 1/√π, √(2/π) of the tanh GELU) multiplied out
    into one float, and any other irrational constant evaluated: the kernel then multiplies by a
    literal of its own dtype. Printed as ``math.sqrt(2)`` and ``/math.sqrt(math.pi)``, they were
    float64 values (``math.pi`` is a double) that widened a float32 loop to float64 and divided at
    every element (the GELU's forward loop ran 1.5x as long)."""
    def irrational(e):
        return e.is_number and not e.is_Rational and not e.is_Float and e.is_finite is not False

    def rec(e):
        if not e.args or isinstance(e, (sp.Indexed, sp.Tuple)):
            return sp.Float(e.evalf(20)) if irrational(e) and e.is_real else e
        if irrational(e) and e.is_real:
            return sp.Float(e.evalf(20))
        args = [rec(a) for a in e.args]
        return e.func(*args) if any(a is not b for a, b in zip(args, e.args)) else e
    expr = sp.sympify(expr)
    return rec(expr) if any(irrational(a) for a in sp.preorder_traversal(expr)) else expr


def print_expr(expr, names, cast: str | None = None) -> str:
    expr = fold_constants(to_conventions(expr))
    if isinstance(expr, (sp.Sum, LogSumExp)):
        raise UnsupportedError("codegen internal error: unhoisted reduction")
    for node in sp.preorder_traversal(expr):
        if isinstance(node, sp.Function) and not isinstance(node, SUPPORTED_FUNCTIONS):
            raise UnsupportedError(
                f"codegen: function {type(node).__name__} has no lowering (in {node}); supported: "
                "exp, log, tanh, sin, cos, Abs, sign, Max, Min, Heaviside (as step), Piecewise and "
                "chainrule primitives")
    return KernelPrinter(names, cast=cast).doprint(expr)
