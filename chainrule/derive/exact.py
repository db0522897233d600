"""Exact evaluation of index notation at concrete sizes, and a scalar reverse-mode tape (verification only).

An expression (an equation's body, a claim) is compiled once into nested Python closures and then
evaluated element by element, at concrete sizes, in one of two arithmetics:

* ``Exact``: Python ``Fraction``s and ``int``s. Any step that leaves the rationals (``exp``, ``log``,
  a square root, a float) raises ``Inexact``, and the caller starts again in
* ``Float``: ``mpmath`` numbers at ``WORK_DPS`` digits (comparisons then ask for ``DIGITS``).

``Tape`` wraps either arithmetic into a scalar reverse-mode autodiff: every value computed from a
leaf is a ``Node`` that records its parents and the local partial derivatives, which come from
elementary calculus on the scalar operations (``+``, ``*``, powers, and ``sp.diff`` of each scalar
function of one variable). A primitive (``sigmoid``, ``relu``, ...) is evaluated through its plain
SymPy ``definition()``, a ``LogSumExp`` as ``log Σ exp``: the tape never uses a derivative the engine
declared, so it is an independent reference for the engine's derivation.

Nothing here is allowed to hang or to recurse without bound on hostile input: powers and function
arguments are limited in size, sums count their iterations against a budget, and every failure is
an ``EvaluationError`` that says what was undefined.
"""
from __future__ import annotations

from fractions import Fraction
import itertools
import math

import mpmath
import sympy as sp

from .errors import ChainruleError, UnsupportedError
from .primitives import IsArgmax, LogSumExp, MaxOver, Primitive

DIGITS = 50            # what a "50 digits" comparison guarantees
WORK_DPS = 70          # the working precision of the Float arithmetic
MAX_BITS = 100_000     # no number beyond about 10^30000 is ever built
MAX_ARG_BITS = 40      # elementary functions refuse arguments beyond about 10^12


class EvaluationError(ChainruleError, ArithmeticError):
    """A value that is undefined (division by zero, log of a non-positive number) or too large."""


class Inexact(Exception):
    """Exact arithmetic met a value that is not rational: evaluate again with ``Float``."""


# -- the two arithmetics -------------------------------------------------------------------------------
class Exact:
    """Rationals, exactly. ``kink`` is set when a comparison of values (not of indices) is a tie."""

    name = "exact"

    def __init__(self):
        self.kink = False

    def const(self, number):
        if number.is_Integer:
            return int(number)
        if number.is_Rational:
            return Fraction(int(number.p), int(number.q))
        raise Inexact(str(number))

    def leaf(self, fraction: Fraction):
        return fraction

    @staticmethod
    def add(xs):
        return sum(xs)

    @staticmethod
    def mul(xs):
        out = 1
        for x in xs:
            out = out * x
        return out

    def pow(self, a, b):
        if isinstance(b, Fraction):
            if b.denominator != 1:
                raise Inexact("a root")
            b = b.numerator
        if not isinstance(b, int):
            raise Inexact("a power")
        if a == 0 and b < 0:
            raise EvaluationError("division by zero")
        if a not in (0, 1, -1):
            f = Fraction(a)
            bits = max(f.numerator.bit_length(), f.denominator.bit_length())
            if bits * abs(b) > MAX_BITS:
                raise EvaluationError(f"a power with about {int(bits * abs(b) * 0.30103)} digits is too large")
        return Fraction(a) ** b if b < 0 else a ** b

    def func(self, cls, args):
        raise Inexact(cls.__name__)

    def cmp(self, a, b) -> int:
        if a == b:
            if not (type(a) is int and type(b) is int):
                self.kink = True
            return 0
        return -1 if a < b else 1

    @staticmethod
    def sympy(x):
        return sp.Rational(x.numerator, x.denominator) if isinstance(x, Fraction) else sp.Integer(x)

    @staticmethod
    def same(a, b) -> bool:
        return a == b


def _mpmath_function(cls):
    fn = getattr(mpmath, cls.__name__, None)
    if fn is None:
        raise UnsupportedError(f"verification cannot evaluate the function {cls.__name__}")
    return fn


class Float(Exact):
    """mpmath numbers at ``WORK_DPS`` digits; agreement means agreement to ``DIGITS`` digits."""

    name = f"{DIGITS} digits"

    def const(self, number):
        if number.is_Integer:
            return int(number)
        if number.is_Rational:
            return mpmath.mpf(int(number.p)) / int(number.q)
        value = sp.N(number, WORK_DPS + 5)
        if not value.is_Number:
            raise EvaluationError(f"{number} is not a real number")
        return mpmath.mpf(str(value))

    def leaf(self, fraction: Fraction):
        return mpmath.mpf(fraction.numerator) / fraction.denominator

    def pow(self, a, b):
        if isinstance(b, int) or (not isinstance(b, Fraction) and b == int(b)):
            b = int(b)
            if type(a) is int and b >= 0:
                return Exact.pow(self, a, b)
            return self._ipow(mpmath.mpf(a), b)
        if a == 0:
            if b < 0:
                raise EvaluationError("division by zero (0 to a negative power)")
            return 0
        if a < 0:
            raise EvaluationError(f"a negative number to the power {mpmath.nstr(b, 6)} is not real")
        self._guard(mpmath.mpf(b) * mpmath.log(abs(a), 2), "a power")
        return mpmath.power(a, b)

    def _ipow(self, a, b):
        if a == 0:
            if b < 0:
                raise EvaluationError("division by zero")
            return 0 if b else 1
        self._guard(b * mpmath.mag(a), "a power")
        return a ** b

    @staticmethod
    def _guard(bits, what):
        if abs(bits) > MAX_BITS:
            raise EvaluationError(f"{what} with about {int(abs(bits) * 0.30103)} digits is too large")

    def func(self, cls, args):
        fn = _mpmath_function(cls)
        for a in args:
            if a != 0 and mpmath.mag(a) > MAX_ARG_BITS:
                raise EvaluationError(f"{cls.__name__} of {mpmath.nstr(a, 6)}: argument too large")
        if cls is sp.log and args[0] <= 0:
            raise EvaluationError(f"log of {'zero' if args[0] == 0 else 'a negative number'} is undefined")
        try:
            value = fn(*args)
        except ZeroDivisionError:
            raise EvaluationError(f"{cls.__name__}({', '.join(mpmath.nstr(a, 6) for a in args)}) "
                                  f"divides by zero") from None
        if isinstance(value, mpmath.mpc):
            raise EvaluationError(f"{cls.__name__}({', '.join(mpmath.nstr(a, 6) for a in args)}) is not real")
        if not mpmath.isfinite(value):
            raise EvaluationError(f"{cls.__name__}({', '.join(mpmath.nstr(a, 6) for a in args)}) is not finite")
        self._guard(mpmath.mag(value) if value else 0, f"{cls.__name__} of a large argument")
        return value

    @staticmethod
    def sympy(x):
        if isinstance(x, (int, Fraction)):
            return Exact.sympy(x)
        return sp.Float(mpmath.nstr(x, 12), 12)

    @staticmethod
    def same(a, b) -> bool:
        scale = max(1, abs(a), abs(b))
        return abs(a - b) <= mpmath.mpf(10) ** (-DIGITS) * scale


# -- the tape: scalar reverse mode -------------------------------------------------------------------------
class Node:
    __slots__ = ("value", "parents", "grad")

    def __init__(self, value, parents):
        self.value, self.parents, self.grad = value, parents, 0


def value_of(x):
    return x.value if type(x) is Node else x


class Tape:
    """An arithmetic over ``Node``s: values from ``base``, partial derivatives recorded for ``backward``."""

    def __init__(self, base: Exact):
        self.base = base
        self.name = base.name
        self.nodes: list[Node] = []
        self._derivatives: dict = {}

    @property
    def kink(self):
        return self.base.kink

    @kink.setter
    def kink(self, flag):
        self.base.kink = flag

    def reset(self):
        self.nodes = []
        self.base.kink = False

    def node(self, value, parents=()) -> Node:
        n = Node(value, tuple(parents))
        self.nodes.append(n)
        return n

    def const(self, number):
        return self.base.const(number)

    def leaf(self, fraction):
        return self.node(self.base.leaf(fraction))

    def element(self, x) -> Node:
        """A tensor element of its own (so each tensor gets its own adjoint, even where values alias)."""
        return self.node(value_of(x), ((x, 1),) if type(x) is Node else ())

    def add(self, xs):
        if not any(type(x) is Node for x in xs):
            return self.base.add(xs)
        return self.node(self.base.add([value_of(x) for x in xs]), [(x, 1) for x in xs if type(x) is Node])

    def mul(self, xs):
        if not any(type(x) is Node for x in xs):
            return self.base.mul(xs)
        vals = [value_of(x) for x in xs]
        parents = []
        for k, x in enumerate(xs):
            if type(x) is Node:
                parents.append((x, self.base.mul(vals[:k] + vals[k + 1:])))
        return self.node(self.base.mul(vals), parents)

    def pow(self, a, b):
        va, vb = value_of(a), value_of(b)
        value = self.base.pow(va, vb)
        if type(a) is not Node and type(b) is not Node:
            return value
        parents = []
        if type(a) is Node and vb != 0:                        # d(a^b)/da = b a^(b-1)
            parents.append((a, self.base.mul([vb, self.base.pow(va, self.base.add([vb, -1]))])))
        if type(b) is Node:                                    # d(a^b)/db = a^b log a
            parents.append((b, self.base.mul([value, self.base.func(sp.log, [va])])))
        return self.node(value, parents)

    def func(self, cls, args):
        vals = [value_of(a) for a in args]
        value = self.base.func(cls, vals)
        parents = []
        for k, a in enumerate(args):
            if type(a) is Node:
                parents.append((a, self.derivative(cls, len(args), k)(vals)))
        return self.node(value, parents)

    def derivative(self, cls, nargs, k):
        """∂f/∂(argument k) of a scalar SymPy function, by ``sp.diff``, evaluated in the base arithmetic."""
        key = (cls, nargs, k)
        if key not in self._derivatives:
            us = [sp.Dummy(f"u{j}", real=True) for j in range(nargs)]
            d = sp.diff(cls(*us), us[k])
            if d.has(sp.Derivative, sp.Subs):
                raise UnsupportedError(f"verification cannot differentiate {cls.__name__}")
            fn = Compiler(self.base).compile(d)
            self._derivatives[key] = lambda vals, fn=fn, us=us: fn(Context(dict(zip(us, vals)), {}))
        return self._derivatives[key]

    def cmp(self, a, b) -> int:
        return self.base.cmp(value_of(a), value_of(b))

    def backward(self, root: Node):
        """Accumulate d root / d node into every node's ``grad``."""
        for n in self.nodes:
            n.grad = 0
        root.grad = 1
        for n in reversed(self.nodes):
            g = n.grad
            if g == 0:
                continue
            for p, d in n.parents:
                p.grad = p.grad + g * d


# -- compiling expressions to closures --------------------------------------------------------------------
class Context:
    """What a compiled expression reads: ``env`` (index, size and dummy symbols -> numbers) and
    ``store`` (tensor name -> {index tuple: value}); ``budget`` bounds the work of its sums."""

    __slots__ = ("env", "store", "budget")

    def __init__(self, env, store, budget=50_000_000):
        self.env, self.store, self.budget = env, store, budget


_MISSING = object()


def _reads_values(e) -> bool:
    """Does ``e`` depend on tensor values (not only on indices and sizes)?"""
    return e.has(sp.Indexed) or any(not s.is_integer for s in e.free_symbols)


def _index_value(k):
    """An index as an int: a token id read from a tensor is a value (a tape node, a Fraction)."""
    k = value_of(k)
    if isinstance(k, Fraction) and k.denominator == 1:
        return int(k.numerator)
    return k


def _index_cmp(a, b) -> int:
    a, b = value_of(a), value_of(b)
    return 0 if a == b else (-1 if a < b else 1)
_REL = {"<": lambda s: s < 0, "<=": lambda s: s <= 0, ">": lambda s: s > 0, ">=": lambda s: s >= 0,
        "==": lambda s: s == 0, "!=": lambda s: s != 0}


class Compiler:
    """SymPy expression -> ``fn(ctx)``. Index expressions and summation limits are compiled with
    exact integer arithmetic, values with ``ar``."""

    def __init__(self, ar, scalars=frozenset()):
        self.ar = ar
        self.scalars = set(scalars)          # names of rank-0 tensors (read as plain symbols)
        self.ints = self if type(ar) is Exact else Compiler(Exact(), scalars)
        self._primitives: dict = {}

    def compile(self, e):
        ar = self.ar
        if e.is_Number or isinstance(e, sp.NumberSymbol):
            c = ar.const(e)
            return lambda ctx: c
        if isinstance(e, sp.Symbol):
            return self._symbol(e)
        if isinstance(e, sp.Indexed):
            return self._read(e)
        if e.is_Add:
            fs = [self.compile(a) for a in e.args]
            return lambda ctx: ar.add([f(ctx) for f in fs])
        if e.is_Mul:
            fs = [self.compile(a) for a in e.args]
            return lambda ctx: ar.mul([f(ctx) for f in fs])
        if e.is_Pow:
            fb, fx = self.compile(e.base), self.compile(e.exp)
            return lambda ctx: ar.pow(fb(ctx), fx(ctx))
        if isinstance(e, sp.Sum):
            return self._sum(e, lambda terms: ar.add(terms))
        if isinstance(e, LogSumExp):
            exp, log = sp.exp, sp.log
            return self._sum(e, lambda terms: ar.func(log, [ar.add([ar.func(exp, [t]) for t in terms])]))
        if isinstance(e, MaxOver):
            return self._max_over(e)
        if isinstance(e, IsArgmax):
            return self._is_argmax(e)
        if isinstance(e, Primitive):
            return self._primitive(e)
        if isinstance(e, sp.Piecewise):
            return self._piecewise(e)
        if isinstance(e, (sp.Max, sp.Min, sp.Abs, sp.sign, sp.Heaviside, sp.core.relational.Relational)):
            cmp = ar.cmp if _reads_values(e) else _index_cmp     # only a tie between values is a kink
        if isinstance(e, (sp.Max, sp.Min)):
            fs, sign = [self.compile(a) for a in e.args], (1 if isinstance(e, sp.Max) else -1)

            def pick(ctx):
                best = None
                for f in fs:
                    v = f(ctx)
                    if best is None or cmp(v, best) * sign > 0:
                        best = v
                return best
            return pick
        if isinstance(e, sp.Abs):
            f = self.compile(e.args[0])

            def absolute(ctx):
                v = f(ctx)
                return v if cmp(v, 0) >= 0 else ar.mul([-1, v])
            return absolute
        if isinstance(e, sp.sign):
            f = self.compile(e.args[0])
            return lambda ctx: cmp(f(ctx), 0)
        if isinstance(e, sp.Heaviside):
            f = self.compile(e.args[0])
            at0 = ar.const(e.args[1] if len(e.args) > 1 else sp.S.Half)
            return lambda ctx: {1: 1, 0: at0, -1: 0}[cmp(f(ctx), 0)]
        if isinstance(e, sp.KroneckerDelta):
            fa, fb = self.ints.compile(e.args[0]), self.ints.compile(e.args[1])
            return lambda ctx: 1 if fa(ctx) == fb(ctx) else 0
        if isinstance(e, (sp.floor, sp.ceiling)):
            f, rnd = self.ints.compile(e.args[0]), (math.floor if isinstance(e, sp.floor) else math.ceil)
            return lambda ctx: int(rnd(f(ctx)))
        if isinstance(e, sp.Mod):                      # divisibility of indices (strides): exact integers
            fa, fb = self.ints.compile(e.args[0]), self.ints.compile(e.args[1])

            def mod(ctx):
                a, m = value_of(fa(ctx)), value_of(fb(ctx))
                if a != int(a) or m != int(m) or m == 0:
                    raise EvaluationError(f"{e}: {a} mod {m} is not a remainder of integers")
                return int(a) % int(m)
            return mod
        if isinstance(e, sp.core.relational.Relational):
            fa, fb, test = self.compile(e.lhs), self.compile(e.rhs), _REL[e.rel_op]
            if e.rel_op in ("==", "!="):       # an equality test is meant to hit: not a kink
                return lambda ctx: test(0 if value_of(fa(ctx)) == value_of(fb(ctx)) else 1)
            return lambda ctx: test(cmp(fa(ctx), fb(ctx)))
        if isinstance(e, sp.And):
            fs = [self.compile(a) for a in e.args]
            return lambda ctx: all(f(ctx) for f in fs)
        if isinstance(e, sp.Or):
            fs = [self.compile(a) for a in e.args]
            return lambda ctx: any(f(ctx) for f in fs)
        if isinstance(e, sp.Not):
            f = self.compile(e.args[0])
            return lambda ctx: not f(ctx)
        if e is sp.true or e is sp.false:
            return lambda ctx, v=bool(e): v
        if hasattr(e, "as_piecewise"):                 # an Iverson bracket (range guard)
            return self.compile(e.as_piecewise())
        if isinstance(e, sp.Function) and not isinstance(e, sp.core.function.AppliedUndef) \
                and getattr(mpmath, type(e).__name__, None) is not None:
            fs, cls = [self.compile(a) for a in e.args], type(e)
            return lambda ctx: ar.func(cls, [f(ctx) for f in fs])
        raise UnsupportedError(f"verification cannot evaluate {type(e).__name__}: {e}")

    def _symbol(self, s):
        name = s.name
        if name in self.scalars and not s.is_integer:
            def scalar(ctx):
                try:
                    return ctx.store[name][()]
                except KeyError:
                    raise EvaluationError(f"no value for the scalar {name}") from None
            return scalar

        def lookup(ctx):
            v = ctx.env.get(s, _MISSING)
            if v is _MISSING:
                raise EvaluationError(f"no value for the symbol {name}")
            return v
        return lookup

    def _read(self, e):
        name = str(e.base.label)
        fs = [self.ints.compile(i) for i in e.indices]

        def read(ctx):
            key = tuple(_index_value(f(ctx)) for f in fs)
            try:
                return ctx.store[name][key]
            except KeyError:
                pass
            except TypeError:
                raise EvaluationError(f"{e}: index {key} is not an integer") from None
            if name not in ctx.store:
                raise EvaluationError(f"no values for the tensor {name}")
            if any(not isinstance(k, int) and k != int(k) for k in key):
                raise EvaluationError(f"{e}: index {tuple(str(k) for k in key)} is not an integer")
            key2 = tuple(int(k) for k in key)
            if key2 in ctx.store[name]:
                return ctx.store[name][key2]
            raise EvaluationError(f"{e} reads {name}{list(key2)}, outside the tensor")
        return read

    def _sum(self, e, combine):
        f = self.compile(e.function)
        limits = [(v, self.ints.compile(lo), self.ints.compile(hi)) for v, lo, hi in e.limits]

        def total(ctx):
            terms, env = [], ctx.env
            saved = [env.get(v, _MISSING) for v, _, _ in limits]

            def loop(k):                       # the last limit is the outermost sum
                if k < 0:
                    terms.append(f(ctx))
                    return
                var, lo, hi = limits[k]
                a, b = int(lo(ctx)), int(hi(ctx))
                ctx.budget -= max(0, b - a + 1)
                if ctx.budget < 0:
                    raise EvaluationError("too much work: the sums run over too many terms")
                for v in range(a, b + 1):
                    env[var] = v
                    loop(k - 1)
            try:
                loop(len(limits) - 1)
            finally:
                for (v, _, _), old in zip(limits, saved):
                    if old is _MISSING:
                        env.pop(v, None)
                    else:
                        env[v] = old
            return combine(terms)
        return total

    def _window(self, limits, ctx):
        """Every point of a window, the first limit outermost (the tie rule's order)."""
        ranges = []
        for var, lo, hi in limits:
            a, b = int(lo(ctx)), int(hi(ctx))
            ctx.budget -= max(0, b - a + 1)
            if ctx.budget < 0:
                raise EvaluationError("too much work: the maxima run over too many terms")
            if b < a:
                raise EvaluationError("a maximum over an empty window")
            ranges.append(range(a, b + 1))
        return itertools.product(*ranges)

    def _argmax(self, e):
        """Compile a MaxOver into fn(ctx) -> (first position of the maximum, the maximal value)."""
        f = self.compile(e.function)
        limits = [(v, self.ints.compile(lo), self.ints.compile(hi)) for v, lo, hi in e.limits]
        names = [v for v, _, _ in limits]
        cmp = self.ar.cmp

        def best(ctx):
            env = ctx.env
            saved = [env.get(v, _MISSING) for v in names]
            top = where = None
            try:
                for point in self._window(limits, ctx):
                    env.update(zip(names, point))
                    v = f(ctx)
                    if top is None or cmp(v, top) > 0:      # strictly greater: the first maximum stays
                        top, where = v, point
            finally:
                for v, old in zip(names, saved):
                    if old is _MISSING:
                        env.pop(v, None)
                    else:
                        env[v] = old
            return where, top
        return best

    def _max_over(self, e):
        best = self._argmax(e)
        return lambda ctx: best(ctx)[1]      # on a tape: the maximal node itself, so the gradient routes to it

    def _is_argmax(self, e):
        m, *point = e.args
        best = self._argmax(m)
        fs = [self.ints.compile(p) for p in point]

        def indicator(ctx):
            where, _ = best(ctx)
            return 1 if tuple(value_of(f(ctx)) for f in fs) == where else 0
        return indicator

    def _primitive(self, e):
        """A primitive evaluates (and, on a tape, differentiates) through its plain definition."""
        key = (type(e), len(e.args))
        if key not in self._primitives:
            us = [sp.Dummy(f"u{j}", real=True) for j in range(len(e.args))]
            try:
                definition = type(e)(*us).definition()
            except NotImplementedError:
                raise UnsupportedError(f"verification evaluates a primitive through its plain definition, and "
                                       f"{type(e).__name__} has no definition()") from None
            self._primitives[key] = (us, self.compile(definition))
        us, body = self._primitives[key]
        fs = [self.compile(a) for a in e.args]

        def apply(ctx):
            vals = [f(ctx) for f in fs]
            saved = [ctx.env.get(u, _MISSING) for u in us]
            ctx.env.update(zip(us, vals))
            try:
                return body(ctx)
            finally:
                for u, old in zip(us, saved):
                    if old is _MISSING:
                        ctx.env.pop(u, None)
                    else:
                        ctx.env[u] = old
        return apply

    def _piecewise(self, e):
        branches = [(self.compile(v), self.compile(c)) for v, c in e.args]

        def choose(ctx):
            for value, cond in branches:
                if cond(ctx):
                    return value(ctx)
            raise EvaluationError(f"no branch of {e} applies")
        return choose
