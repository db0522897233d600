"""Claimed formulas: a small, safe parser of our own (never ``eval`` or ``sympify`` on the text).

A claim is one element of a gradient in index notation, in the adjoint's own index names::

    claim   := expr
    expr    := term (('+' | '-') term)*
    term    := unary (('*' | '/') unary)*
    unary   := ('-' | '+')* power
    power   := atom (('^' | '**') unary)*            right-associative: 2^3^2 = 2^9
    atom    := number | size | index | tensor '[' expr (',' expr)* ']' | scalar tensor
             | function '(' expr (',' expr)* ')' | 'sum' '(' new_index ',' expr ')' | '(' expr ')'

``sum(k, expr)`` sums over a new index ``k`` whose range is the axis it indexes in ``expr``.
Every input gets a formula or a ``SpecError`` that says why, quickly: numbers are limited in size,
nesting in depth, indices are range-checked against the tensors' axes, and a formula with an
undefined value (division by zero, ``log(0)``) is refused rather than compared.
"""
from __future__ import annotations

import math
import re

import sympy as sp

from .errors import SpecError
from .primitives import PRIMITIVES, sigmoid
from .tensor import Equation, Tensor, affine_bounds, provably_nonneg, shape_str

MAX_LENGTH = 2000      # characters
MAX_DEPTH = 40         # nested parentheses, calls, brackets and sums
MAX_DIGITS = 300       # digits of any number written or computed while reading
MAX_EXPONENT = 1000    # |exponent| of a power of a non-constant base

_UNDEFINED = (sp.zoo, sp.nan, sp.oo, -sp.oo)
_GROWING = {"exp", "cosh", "sinh", "softplus"}    # functions whose value grows like exp
_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|([A-Za-z_][A-Za-z0-9_']*)|(\*\*|[-+*/^()\[\],]))")


def _arity(cls) -> int:
    """The number of arguments of a SymPy function class (one, unless it declares otherwise)."""
    nargs = getattr(cls, "nargs", None)
    if isinstance(nargs, sp.FiniteSet) and len(nargs) == 1:
        return int(next(iter(nargs)))
    return 1


def _max(*args):
    return sp.Max(*args)


def _min(*args):
    return sp.Min(*args)


# name -> (SymPy function, number of arguments: an int, or None for "one or more")
FUNCTIONS = {
    "exp": (sp.exp, 1), "log": (sp.log, 1), "sqrt": (sp.sqrt, 1), "abs": (sp.Abs, 1), "sign": (sp.sign, 1),
    "tanh": (sp.tanh, 1), "cosh": (sp.cosh, 1), "sinh": (sp.sinh, 1), "sech": (sp.sech, 1),
    "max": (_max, None), "min": (_min, None), "sigmoid": (sigmoid, 1),
    **{name: (cls, None) for name, cls in PRIMITIVES.items()},
}
FUNCTIONS = {name: (fn, nargs if nargs is not None or fn in (_max, _min) else _arity(fn))
             for name, (fn, nargs) in FUNCTIONS.items()}


def grammar_help(names=(), sizes=(), lhs=None) -> str:
    """The claim grammar in a few lines (for ``--help`` and for errors)."""
    tensors = f"the model's tensors and gradients ({', '.join(names)})" if names else \
        "the model's tensors and gradients (p2[b,o], d_z1[b,o], ...)"
    where = f"with the index names of {lhs}" if lhs is not None else "with the gradient's own index names"
    return (f"A claim may use {tensors}, read as T[i, j] {where}; the sizes "
            f"({', '.join(map(str, sizes)) if sizes else 'B, n_0, ...'}); numbers; + - * / ^ and parentheses; "
            f"the functions {', '.join(sorted(FUNCTIONS))}; and sums written sum(k, expr), k a new index "
            f"name used as a tensor index in expr (its range is that axis)")


def _check_number(value, what):
    if value.is_Rational:
        for part in (value.p, value.q):
            if abs(part) >= 10 ** MAX_DIGITS:
                raise SpecError(f"{what}: a number with more than {MAX_DIGITS} digits")


def _digits_of_power(base, exp) -> float:
    """About how many digits ``base ** exp`` has (both rational numbers)."""
    size = max(abs(base.p), abs(base.q))
    return abs(float(exp)) * math.log10(size) if size > 1 else 0.0


class _Parser:
    def __init__(self, text: str, names: dict, eq: Equation, tensor_names: list[str], sizes=()):
        self.toks, self.k, self.text = self._tokens(text), 0, text
        self.names, self.eq, self.tensor_names, self.sizes = names, eq, tensor_names, sizes
        self.depth = 0
        self.bound: list = []                  # summation indices in scope

    # -- tokens ------------------------------------------------------------------------------------
    @staticmethod
    def _tokens(text):
        pos, out, end = 0, [], len(text.rstrip())
        while pos < end:
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise SpecError(f"cannot read {text[pos:pos + 12]!r} at position {pos} of the claim")
            tok = m.group(m.lastindex)
            if tok[0].isdigit() and len(tok) > 40:
                raise SpecError(f"the number {tok[:20]}... is too long (at most 40 characters)")
            out.append(tok)
            pos = m.end()
        if not out:
            raise SpecError("the claim is empty")
        return out

    def peek(self):
        return self.toks[self.k] if self.k < len(self.toks) else None

    def take(self, want=None):
        tok = self.peek()
        if tok is None or (want is not None and tok != want):
            raise SpecError(f"in the claim {self.text!r}: expected {want or 'more'} but found "
                            f"{repr(tok) if tok else 'the end'}")
        self.k += 1
        return tok

    def enter(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise SpecError(f"the claim is nested too deeply (more than {MAX_DEPTH} levels of parentheses, "
                            f"calls or sums)")

    def leave(self):
        self.depth -= 1

    # -- safe construction --------------------------------------------------------------------------
    def checked(self, value, what):
        """Refuse a value that is undefined or a number that is too large, where it first appears."""
        for part in (value, *value.args):
            if part in _UNDEFINED:
                why = {sp.nan: "is not a number (0/0, or 0 times infinity)",
                       sp.zoo: "is undefined (infinite)"}.get(part, "is infinite")
                raise SpecError(f"the claim has no value: {what} {why}")
            if part.is_Rational:
                _check_number(part, what)
        return value

    def add(self, a, b, sign):
        return self.checked(a + b if sign > 0 else a - b, "a sum")

    def mul(self, a, b):
        return self.checked(a * b, "a product")

    def div(self, a, b):
        if b.is_zero:
            raise SpecError(f"the claim has no value: division by zero ({_show(a)} / {_show(b)})")
        return self.checked(a / b, "a quotient")

    def pow(self, a, b):
        if a.is_zero and (b.is_negative or b.is_zero is None and b.is_number):
            raise SpecError(f"the claim has no value: 0 to the power {_show(b)} divides by zero")
        if b.is_Number and not b.is_Rational:
            raise SpecError(f"exponent {_show(b)} is not a rational number")
        if b.is_Rational and abs(b) > MAX_EXPONENT and not (a.is_Number and abs(a) in (0, 1)):
            raise SpecError(f"the exponent {_show(b)} is too large (at most {MAX_EXPONENT})")
        if a.is_number and b.is_Rational:
            digits = _digits_of_power(a, b) if a.is_Rational else \
                abs(float(b)) * abs(math.log10(abs(self._constant(a, "^")) or 1))
            if digits > MAX_DIGITS:
                raise SpecError(f"{_show(a)}^{_show(b)} has about {digits:.3g} digits; numbers are "
                                f"limited to {MAX_DIGITS} digits")
        return self.checked(a ** b, "a power")

    def call(self, name, args):
        fn, nargs = FUNCTIONS[name]
        if nargs is not None and len(args) != nargs:
            raise SpecError(f"{name} takes {nargs} argument{'s' * (nargs != 1)}, got {len(args)}")
        for a in args:
            if a.is_number:
                v = self._constant(a, name)
                if name in _GROWING and abs(v) > 690:
                    raise SpecError(f"{name}({_show(a)}) has more than {MAX_DIGITS} digits (numbers are limited to "
                                    f"{MAX_DIGITS} digits)")
        try:
            value = fn(*args)
        except (TypeError, ValueError) as err:
            raise SpecError(f"cannot apply {name} to {', '.join(map(_show, args))}: {err}") from None
        return self.checked(value, f"{name}({', '.join(map(_show, args))})")

    @staticmethod
    def _constant(a, name):
        """The value of a constant operand (guarded: exp(exp(exp(100))) is refused, not computed)."""
        from .exact import Compiler, Context, EvaluationError, Float, WORK_DPS
        import mpmath
        try:
            with mpmath.workdps(WORK_DPS):
                return Compiler(Float()).compile(a)(Context({}, {}, budget=10_000))
        except EvaluationError as err:
            raise SpecError(f"the operand {_show(a)} of {name}: {err}") from None
        except Exception as err:                   # an unevaluable constant (e.g. a complex one)
            raise SpecError(f"the operand {_show(a)} of {name} is not a real number ({err})") from None

    # -- grammar -------------------------------------------------------------------------------------
    def parse(self):
        e = self.expr()
        if self.peek() is not None:
            raise SpecError(f"in the claim {self.text!r}: unexpected {self.peek()!r}")
        return e

    def expr(self):
        e = self.term()
        while self.peek() in ("+", "-"):
            sign = 1 if self.take() == "+" else -1
            e = self.add(e, self.term(), sign)
        return e

    def term(self):
        e = self.unary()
        while self.peek() in ("*", "/"):
            if self.take() == "*":
                e = self.mul(e, self.unary())
            else:
                e = self.div(e, self.unary())
        return e

    def unary(self):
        negative = False
        while self.peek() in ("-", "+"):
            negative ^= self.take() == "-"
        e = self.power()
        return self.mul(sp.S.NegativeOne, e) if negative else e

    def power(self):
        operands, signs = [self.atom()], []
        while self.peek() in ("^", "**"):
            self.take()
            negative = False
            while self.peek() in ("-", "+"):
                negative ^= self.take() == "-"
            signs.append(negative)
            operands.append(self.atom())
        e = operands[-1]
        for base, negative in zip(reversed(operands[:-1]), reversed(signs)):
            if negative:
                e = self.mul(sp.S.NegativeOne, e)
            e = self.pow(base, e)
        return e

    def atom(self):
        tok = self.take()
        if tok == "(":
            self.enter()
            e = self.expr()
            self.take(")")
            self.leave()
            return e
        if tok[0].isdigit():
            whole, _, frac = tok.partition(".")
            value = sp.Rational(int(whole + frac), 10 ** len(frac)) if frac else sp.Integer(int(whole))
            return self.checked(value, f"the number {tok}")
        if tok == "sum" and self.peek() == "(":
            return self.sum()
        if tok in FUNCTIONS and self.peek() == "(":
            self.take("(")
            self.enter()
            args = [self.expr()]
            while self.peek() == ",":
                self.take(",")
                args.append(self.expr())
            self.take(")")
            self.leave()
            return self.call(tok, args)
        bound = next((v for v in reversed(self.bound) if v.name == tok), None)
        if bound is not None:
            return bound
        if tok in self.names:
            return self.read(tok, self.names[tok])
        if tok in ("+", "-", "*", "/", "^", "**", ")", "]", ","):
            raise SpecError(f"in the claim {self.text!r}: expected a number, a name or '(' but found {tok!r}")
        raise SpecError(f"in the claim {self.text!r}: unknown name {tok!r}. "
                        f"{grammar_help(self.tensor_names, self.sizes, self.eq.lhs)}")

    def read(self, tok, t):
        if not isinstance(t, Tensor):
            if self.peek() == "[":
                raise SpecError(f"{tok} is an index or a size, not a tensor: it cannot be indexed")
            return t
        if self.peek() != "[":
            if t.rank:
                names = [str(i) for i in self.eq.indices] if len(self.eq.indices) == t.rank else \
                    [f"i{k}" for k in range(t.rank)]
                raise SpecError(f"{tok} has shape {shape_str(t.shape)}: read one element with {t.rank} "
                                f"ind{'ex' if t.rank == 1 else 'ices'}, e.g. {tok}[{', '.join(names)}]")
            return t.read()
        self.take("[")
        self.enter()
        idx = [self.expr()]
        while self.peek() == ",":
            self.take(",")
            idx.append(self.expr())
        self.take("]")
        self.leave()
        if len(idx) != t.rank:
            raise SpecError(f"{tok} has shape {shape_str(t.shape)} (rank {t.rank}) but is read with "
                            f"{len(idx)} ind{'ex' if len(idx) == 1 else 'ices'}")
        allowed = set(self.eq.indices) | set(self.bound) | {s for s in self.names.values()
                                                            if isinstance(s, sp.Symbol) and s.is_positive}
        for e in idx:
            if not e.free_symbols <= allowed or e.has(sp.Indexed):
                raise SpecError(f"the index {_show(e)} of {tok} must be made of indices and sizes")
            if not e.is_integer:
                raise SpecError(f"the index {_show(e)} of {tok} is not an integer expression")
        return t[tuple(idx)] if t.rank else t.read()

    def sum(self):
        self.take("(")
        self.enter()
        name = self.take()
        if not re.match(r"[A-Za-z_][A-Za-z0-9_']*\Z", name):
            raise SpecError(f"sum(k, expr): the first argument must be a new index name, got {name!r}")
        taken = {str(i) for i in self.eq.indices} | {v.name for v in self.bound}
        if name in taken:
            raise SpecError(f"sum({name}, ...): {name} is already an index here; use a new name")
        if name in self.names or name in FUNCTIONS or name == "sum":
            kind = "a tensor" if isinstance(self.names.get(name), Tensor) else "taken"
            raise SpecError(f"sum({name}, ...): {name} is {kind}; the first argument must be a new index name")
        var = sp.Symbol(name, integer=True)
        self.take(",")
        self.bound.append(var)
        body = self.expr()
        self.bound.pop()
        self.take(")")
        self.leave()
        return sp.Sum(body, (var, 0, self.range_of(var, body) - 1))

    def range_of(self, var, body):
        sizes = []
        for read in body.atoms(sp.Indexed):
            for axis, e in enumerate(read.indices):
                if e == var:
                    sizes.append((self.names[str(read.base.label)].shape[axis], read))
        if not sizes:
            raise SpecError(f"sum({var}, ...): {var} is not used as a tensor index (e.g. W2[{var}, o]), so its "
                            f"range is unknown")
        for n, read in sizes[1:]:
            if sp.simplify(n - sizes[0][0]) != 0:
                raise SpecError(f"sum({var}, ...): {var} runs over {sizes[0][0]} in {sizes[0][1]} but over {n} "
                                f"in {read}")
        return sizes[0][0]


def _show(e) -> str:
    text = str(e)
    return text if len(text) < 60 else text[:57] + "..."


def check_ranges(expr, ranges: dict, tensors: dict):
    """Every read's indices stay inside the axes of the tensor read (for every index value in range)."""
    def walk(e, ranges):
        if isinstance(e, sp.Sum):
            inner = dict(ranges)
            for var, lo, hi in e.limits:
                inner[var] = (lo, hi)
            walk(e.function, inner)
            return
        if isinstance(e, sp.Indexed):
            t = tensors[str(e.base.label)]
            for axis, (i, n) in enumerate(zip(e.indices, t.shape)):
                bounds = affine_bounds(i, ranges)
                if bounds is None:
                    raise SpecError(f"the index {i} of {e} is not an affine expression of the indices")
                lo, hi = bounds
                if not (provably_nonneg(lo) and provably_nonneg(n - 1 - hi)):
                    raise SpecError(f"{e}: the index {i} runs over [{lo}, {hi}] but axis {axis} of {t.name} "
                                    f"{shape_str(t.shape)} has size {n} (indices run from 0 to {n - 1})")
            return
        for a in e.args:
            walk(a, ranges)
    walk(expr, dict(ranges))


def parse_claim(text: str, model, eq: Equation, extra=()) -> sp.Expr:
    """Read a claimed formula for the element ``eq.lhs`` of a gradient. Names: the model's tensors
    and the adjoints in ``extra``, the equation's indices, and the sizes."""
    if not isinstance(text, str):
        raise SpecError("a claim is a string")
    if len(text) > MAX_LENGTH:
        raise SpecError(f"the claim is too long ({len(text)} characters, at most {MAX_LENGTH})")
    tensors = dict(model.tensors) | {t.name: t for t in extra}
    names = dict(tensors)
    names.update({str(i): i for i in eq.indices})
    names.update({str(s): s for s in model.sizes()})
    tensor_names = [n for n in sorted(tensors, key=lambda n: (n.startswith("d_"), n))
                    if tensors[n].role != "cost"]
    try:
        expr = _Parser(text, names, eq, tensor_names, model.sizes()).parse()
    except RecursionError:
        raise SpecError("the claim is nested too deeply") from None
    return check_claim_expression(expr, model, eq, extra)


def check_claim_expression(expr, model, eq: Equation, extra=()) -> sp.Expr:
    """A claim given as a SymPy expression: defined, real, reading known tensors inside their axes,
    with no free index but the equation's own."""
    expr = sp.sympify(expr)
    tensors = dict(model.tensors) | {t.name: t for t in extra}
    for part in sp.preorder_traversal(expr):
        if part in _UNDEFINED:
            raise SpecError("the claim has no value: it contains an infinite or undefined part")
    if expr.has(sp.I):
        raise SpecError("the claim is not real (it contains the imaginary unit)")
    for read in expr.atoms(sp.Indexed):
        if str(read.base.label) not in tensors:
            raise SpecError(f"the claim reads {read}, but the model has no tensor {read.base.label}")
    stray = {s for s in expr.free_symbols if s.is_integer and not s.is_positive} - set(eq.indices)
    if stray:
        raise SpecError(f"the claim uses the indices {sorted(map(str, stray))}, which are neither indices of "
                        f"{eq.lhs} nor summed over")
    try:
        check_ranges(expr, eq.ranges(), tensors)
    except RecursionError:
        raise SpecError("the claim is nested too deeply") from None
    return expr


parse_expression = parse_claim          # the older name
