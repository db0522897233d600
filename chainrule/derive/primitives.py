"""Scalar and reduction primitives.

Each primitive carries three things together, so that nothing about it is written twice:

* its derivative (``fdiff``, used by SymPy's ``diff``),
* its LaTeX form (``_latex``, used by every printer), and
* a numerically stable lowering (``lowering``: the source of a scalar Python function that the
  code generator copies into generated modules verbatim; it computes in the module's dtype ``DT``,
  so a float32 module never widens to float64, and without branches where a select will do),
  plus ``definition()``: the plain SymPy formula, used only by verification when it expands a
  model to scalars.

With ``sigmoid``, ``softplus`` and ``LogSumExp`` as primitives, softmax is ``exp(z_k - LSE(z))``,
log-softmax is ``z_k - LSE(z)`` and BCE on logits is ``softplus(z) - y z``; their derivatives come
out as ``σ(1-σ)``, ``σ`` and ``softmax``, so the textbook form and the stable kernel coincide.
"""
from __future__ import annotations

import sympy as sp
from sympy.concrete.expr_with_intlimits import ExprWithIntLimits


def with_power(tex: str, exp=None) -> str:
    """``f(x)`` raised to ``exp`` (SymPy's printer passes the exponent of a power of a function)."""
    return tex if exp is None else rf"\left({tex}\right)^{{{exp}}}"


class Primitive(sp.Function):
    """A scalar function with a derivative, a LaTeX form and a stable lowering."""

    latex_name: str = ""
    lowering: str = ""          # source of `def <name>(x): ...`, Numba-compatible

    def _latex(self, printer, exp=None):
        return with_power(self._latex_plain(printer), exp)

    def _latex_plain(self, printer):
        args = ", ".join(printer._print(a) for a in self.args)
        return rf"{self.latex_name}\left({args}\right)"

    def definition(self) -> sp.Expr:
        raise NotImplementedError


class sigmoid(Primitive):
    latex_name = r"\sigma"
    lowering = '''
def sigmoid(x):
    # branch-free and overflow-free, in the module's dtype DT: e = exp(-|x|) is in (0, 1], so
    # 1/(1+e) is sigma(|x|), and sigma(x) = e/(1+e) below 0 (a select, not a jump: the loop
    # calling it stays straight-line code)
    x = DT(x)
    e = _exp(-abs(x))
    r = DT(1.0) / (DT(1.0) + e)
    return r if x >= DT(0.0) else e * r
'''

    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)

    def definition(self):
        return 1 / (1 + sp.exp(-self.args[0]))


class softplus(Primitive):
    latex_name = r"\operatorname{softplus}"
    lowering = '''
def softplus(x):
    # log(1 + e^x) = max(x, 0) + log1p(e^{-|x|}): never exp of a positive number; in DT
    x = DT(x)
    return max(x, DT(0.0)) + math.log1p(_exp(-abs(x)))
'''

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])

    def definition(self):
        return sp.log(1 + sp.exp(self.args[0]))


class step(Primitive):
    """The unit step, with step(0) = 0: the derivative of ReLU at 0 is *chosen* as 0 (as PyTorch)."""

    latex_name = "step"
    lowering = '''
def step(x):
    return DT(1.0) if x > 0.0 else DT(0.0)
'''

    def _latex_plain(self, printer):
        # the Iverson bracket [x > 0]: 1 where it holds, else 0 (as the range guards print)
        return rf"\left[{printer._print(self.args[0])} > 0\right]"

    def fdiff(self, argindex=1):
        return sp.S.Zero            # almost everywhere

    def definition(self):
        return sp.Heaviside(self.args[0], 0)


class relu(Primitive):
    latex_name = r"\operatorname{ReLU}"
    lowering = '''
def relu(x):
    x = DT(x)
    return x if x > DT(0.0) else DT(0.0)
'''

    def fdiff(self, argindex=1):
        return step(self.args[0])

    def definition(self):
        return sp.Max(self.args[0], 0)


class leaky_relu(Primitive):
    """leaky_relu(x, alpha) = x for x > 0, alpha x otherwise; its slope at 0 is alpha (as PyTorch)."""

    latex_name = r"\operatorname{LeakyReLU}"
    nargs = 2
    lowering = '''
def leaky_relu(x, alpha):
    x = DT(x)
    return x if x > DT(0.0) else DT(alpha) * x
'''

    def _latex_plain(self, printer):
        x, alpha = self.args
        return rf"\operatorname{{LeakyReLU}}_{{{printer._print(alpha)}}}\left({printer._print(x)}\right)"

    def fdiff(self, argindex=1):
        x, alpha = self.args
        if argindex != 1:
            raise sp.ArgumentIndexError(self, argindex)
        return step(x) + alpha * (1 - step(x))

    def definition(self):
        x, alpha = self.args
        return sp.Piecewise((x, x > 0), (alpha * x, True))


class LogSumExp(ExprWithIntLimits):
    """``LSE_k f(k) = log Σ_k exp f(k)``: a reduction, written and lowered with the max shift."""

    is_commutative = True
    is_real = True
    lowering = "logsumexp"      # lowered by the code generator as a max-shifted two-pass reduction

    def __new__(cls, function, *limits, **assumptions):
        return super().__new__(cls, function, *limits, **assumptions)

    def _eval_derivative(self, x):
        # d/dx log Σ_k e^{f_k} = Σ_k (e^{f_k - LSE}) ∂f_k/∂x : softmax weights times inner derivative
        f = self.function
        for var, lo, hi in self.limits:
            if x in lo.free_symbols or x in hi.free_symbols:
                return None
        df = sp.diff(f, x)
        if df == 0:
            return sp.S.Zero
        # a fresh name for the outer summation index, so that substituting it later cannot
        # reach the index bound inside this LSE (xreplace does not respect bound variables)
        (var, lo, hi), = self.limits
        outer = var
        while outer in self.free_symbols | {var} or outer in df.free_symbols:
            outer = sp.Symbol(outer.name + "'", integer=True)
        return sp.Sum((sp.exp(f - self) * df).xreplace({var: outer}).xreplace({
            self.xreplace({var: outer}): self}), (outer, lo, hi))

    def doit(self, **hints):
        return sp.log(sp.Sum(sp.exp(self.function), *self.limits).doit(**hints))

    def definition(self):
        return self.doit()

    def _latex(self, printer, exp=None):
        (var, lo, hi), = self.limits
        sub = printer._print(var)
        if any(s.is_integer and not s.is_positive for s in sp.sympify(hi).free_symbols):
            # a limit that is an index (the causal softmax's v ≤ t) is part of the meaning: shown
            sub = rf"{sub}={printer._print(lo)}}}^{{{printer._print(hi)}"
        return with_power(rf"\operatorname{{LSE}}_{{{sub}}}"
                rf"\left({printer._print(self.function)}\right)", exp)

    def _sympystr(self, printer):
        return "LogSumExp(%s, %s)" % (printer._print(self.function),
                                      ", ".join(printer._print(tuple(lim)) for lim in self.limits))


class MaxOver(ExprWithIntLimits):
    """``max_{p,q} f(p, q)``: a reduction. Its derivative routes to the position of the maximum:

        ∂/∂x max_k f_k = Σ_k [k = argmax f] ∂f_k/∂x

    **Tie rule** (stated once, here): when several positions hold the maximum, the argmax is the
    *first* of them in the order of the limits (row-major over the window: the first limit is the
    outermost), as PyTorch's max pooling does. The kernels and verification follow this rule.
    """

    is_commutative = True
    is_real = True

    def __new__(cls, function, *limits, **assumptions):
        return super().__new__(cls, function, *limits, **assumptions)

    def _eval_derivative(self, x):
        for var, lo, hi in self.limits:
            if x in lo.free_symbols or x in hi.free_symbols:
                return None
        df = sp.diff(self.function, x)
        if df == 0:
            return sp.S.Zero
        mapping, limits, taken = {}, [], self.free_symbols | df.free_symbols | set(self.variables)
        for var, lo, hi in self.limits:            # fresh outer names (see LogSumExp)
            outer = var
            while outer in taken:
                outer = sp.Symbol(outer.name + "'", integer=True)
            taken.add(outer)
            mapping[var] = outer
            limits.append((outer, lo, hi))
        return sp.Sum(IsArgmax(self, *[mapping[v] for v in self.variables]) * df.xreplace(mapping), *limits)

    def _latex(self, printer, exp=None):
        vs = ", ".join(printer._print(v) for v in self.variables)
        return with_power(rf"\max_{{{vs}}}\left({printer._print(self.function)}\right)", exp)

    def _sympystr(self, printer):
        return "MaxOver(%s, %s)" % (printer._print(self.function),
                                    ", ".join(printer._print(tuple(lim)) for lim in self.limits))


class IsArgmax(sp.Function):
    """``[(k...) = argmax f]``: 1 at the position of the maximum of ``MaxOver`` (the first one, by the
    tie rule of ``MaxOver``), 0 elsewhere. Piecewise constant: its derivative is 0."""

    def fdiff(self, argindex=1):
        return sp.S.Zero

    def _latex(self, printer, exp=None):
        m, *point = self.args
        vs = ", ".join(printer._print(v) for v in m.variables)
        pt = ", ".join(printer._print(p) for p in point)
        pt = pt if len(point) == 1 else f"({pt})"
        return with_power(rf"\left[{pt} = \operatorname{{argmax}}_{{{vs}}}\left({printer._print(m.function)}"
                          rf"\right)\right]", exp)


PRIMITIVES = {cls.__name__: cls for cls in (sigmoid, softplus, step, relu, leaky_relu)}


def expand_primitives(expr: sp.Expr) -> sp.Expr:
    """Replace every primitive by its plain SymPy definition (verification only)."""
    expr = expr.replace(lambda e: isinstance(e, LogSumExp), lambda e: e.definition())
    return expr.replace(lambda e: isinstance(e, Primitive), lambda e: e.definition())
