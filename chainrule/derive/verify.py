"""Symbolic verification: fix the sizes to small integers, expand the model to scalars, differentiate
the expanded cost directly with SymPy, and compare with the derived gradient at random rational points.

A claimed gradient (a SymPy expression, or a string read by a small parser of our own: never ``eval``
or ``sympify`` on untrusted text) is answered equal, or not equal with a counterexample.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import itertools
import random
import re

import sympy as sp

from .backprop import Gradients, derive
from .errors import SpecError
from .graph import Model
from .primitives import PRIMITIVES, expand_primitives
from .tensor import Equation

DIGITS = 50


@dataclass
class Check:
    """The result of comparing one gradient element, or a whole tensor."""

    name: str
    equal: bool
    method: str = ""                         # "exact" or "50 digits"
    counterexample: dict = field(default_factory=dict)
    checked: int = 0

    def __bool__(self):
        return self.equal

    def compare(self, element, reference, candidate, point: dict, sizes: dict, labels=("derived", "claimed")) -> bool:
        """Compare two scalar expressions at ``point``; on disagreement keep it as the counterexample."""
        ref, cand = reference.xreplace(point), candidate.xreplace(point)
        ok, method = same_value(cand, ref)
        self.checked += 1
        if method != "exact":
            self.method = method
        if not ok:
            self.equal = False
            self.counterexample = {
                "sizes": {str(k): v for k, v in sizes.items()}, "element": str(element),
                labels[1]: sp.N(expand_primitives(cand), 8), labels[0]: sp.N(expand_primitives(ref), 8),
                "at": {str(k): v for k, v in point.items()}}
        return ok


def small_sizes(model: Model, cap: int = 2) -> dict:
    return {s: min(cap, v) for s, v in model.size_values.items()} | {sp.Symbol("B", integer=True, positive=True): 2}


class Expanded:
    """Every tensor element as a scalar SymPy expression of the inputs and parameters."""

    def __init__(self, model: Model, sizes: dict):
        self.model, self.sizes = model, sizes
        self.values: dict = {}

    def elements(self, tensor):
        shape = [int(sp.sympify(n).subs(self.sizes)) for n in tensor.shape]
        for idx in itertools.product(*[range(n) for n in shape]):
            yield idx, (tensor.base[idx] if idx else tensor.symbol)

    def evaluate(self, eq: Equation):
        for idx, read in self.elements(eq.out):
            body = eq.body.subs(self.sizes).xreplace(dict(zip(eq.indices, map(sp.Integer, idx))))
            body = body.doit()
            self.values[read] = body.xreplace(self.values)

    def run(self, equations):
        for eq in equations:
            self.evaluate(eq)
        return self


def _leaves(model: Model, sizes) -> list:
    out = []
    for t in model.tensors.values():
        if t.role in ("input", "target", "param"):
            shape = [int(sp.sympify(n).subs(sizes)) for n in t.shape]
            out += [t.base[idx] for idx in itertools.product(*[range(n) for n in shape])]
    return out


def random_point(model: Model, sizes, rng: random.Random) -> dict:
    """Random rationals for every leaf; probability targets normalised so their rows sum to one."""
    point = {}
    for t in model.tensors.values():
        if t.role not in ("input", "target", "param"):
            continue
        shape = [int(sp.sympify(n).subs(sizes)) for n in t.shape]
        for idx in itertools.product(*[range(n) for n in shape]):
            lo = 1 if t.role == "target" else -9
            point[t.base[idx]] = sp.Rational(rng.randint(lo, 9), 10) or sp.Rational(1, 7)
        if t.simplex_axis is not None:
            axis = t.simplex_axis
            for idx in itertools.product(*[range(n) for k, n in enumerate(shape) if k != axis]):
                row = [t.base[idx[:axis] + (j,) + idx[axis:]] for j in range(shape[axis])]
                total = sum(point[r] for r in row)
                for r in row:
                    point[r] = point[r] / total
    return point


def same_value(a, b) -> tuple[bool, str]:
    """Exact when the difference simplifies to zero, otherwise agreement to 50 significant digits."""
    diff = expand_primitives(sp.sympify(a) - sp.sympify(b))
    if diff.is_Rational:
        return diff == 0, "exact"
    value = sp.N(diff, DIGITS)
    scale = max(1, abs(sp.N(expand_primitives(sp.sympify(a)), DIGITS)))
    if abs(value) > sp.Float(10) ** (-(DIGITS - 10)) * scale:
        return False, f"{DIGITS} digits"
    return True, f"{DIGITS} digits"


def verify_model(model: Model, grads: Gradients | None = None, *, points: int = 2, seed: int = 0,
                 composed: bool = True) -> list[Check]:
    """Compare every derived parameter gradient with direct differentiation of the expanded cost."""
    grads = grads or derive(model)
    sizes = small_sizes(model)
    forward = Expanded(model, sizes).run(model.equations)
    cost = forward.values[model.cost.symbol]
    backward = Expanded(model, sizes)
    backward.values = dict(forward.values)
    derivs = grads.composed if composed else grads.derivations
    backward.run([d.equation for d in derivs.values()])
    rng = random.Random(seed)
    pts = [random_point(model, sizes, rng) for _ in range(points)]
    checks = []
    for name, d in derivs.items():
        t = model.tensors[name]
        if t.role not in ("param", "input"):
            continue
        check = Check(f"{model.name}: dC/d{name}", True, "exact")
        for idx, read in backward.elements(d.adjoint):
            wrt = t.base[idx] if idx else t.symbol
            direct, derived = sp.diff(cost, wrt), backward.values[read]
            if not all(check.compare(wrt, direct, derived, point, sizes, ("direct", "derived"))
                       for point in pts):
                break
        checks.append(check)
    return checks


# -- claims -------------------------------------------------------------------------------------------
def check_claim(model: Model, tensor: str, claim, *, grads: Gradients | None = None, points: int = 3,
                seed: int = 0) -> Check:
    """Is ``claim`` (index form, using the adjoint's own indices) the gradient ∂C/∂tensor?

    The claim may read forward tensors (``p2[b,o]``), targets and parameters, and the sizes (``B``).
    """
    grads = grads or derive(model)
    derivs = grads.composed if tensor in grads.composed else grads.derivations
    if tensor not in derivs:
        raise SpecError(f"model {model.name} derives no gradient for {tensor!r}; "
                        f"known: {', '.join(derivs)}")
    d = derivs[tensor]
    if isinstance(claim, str):
        claim = parse_expression(claim, model, d.equation, extra=list(grads.adjoints.values()))
    sizes = small_sizes(model)
    values = Expanded(model, sizes)
    values.run(model.equations)
    values.run([x.equation for x in derivs.values()])
    claimed = {}
    for idx, read in values.elements(d.adjoint):          # the claim, expanded once per element
        body = claim.subs(sizes).xreplace(dict(zip(d.equation.indices, map(sp.Integer, idx)))).doit()
        claimed[read] = body.xreplace(values.values)
    rng = random.Random(seed)
    result = Check(f"claim for dC/d{tensor}", True, "exact")
    for _ in range(points):
        point = random_point(model, sizes, rng)
        for read, mine in claimed.items():
            if not result.compare(read, values.values[read], mine, point, sizes):
                return result
    return result


# -- a small, safe expression parser -------------------------------------------------------------------
_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|([A-Za-z_][A-Za-z0-9_']*)|(\*\*|[-+*/^()\[\],]))")
FUNCTIONS = {"exp": sp.exp, "log": sp.log, "tanh": sp.tanh, "abs": sp.Abs, "sign": sp.sign,
             "sqrt": sp.sqrt, **PRIMITIVES}


def _tokens(text: str):
    pos, out = 0, []
    while pos < len(text.rstrip()):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise SpecError(f"cannot read {text[pos:pos + 12]!r} at position {pos} of {text!r}")
        out.append(m.group(m.lastindex))
        pos = m.end()
    return out


class _Parser:
    """expr := term (± term)* ; term := unary (*|/ unary)* ; unary := -unary | power ;
    power := atom (^ unary)? ; atom := number | name | name[idx, ...] | f(expr) | sum(k, expr) | (expr)"""

    def __init__(self, text, names: dict, eq: Equation):
        self.toks, self.k, self.text = _tokens(text), 0, text
        self.names, self.eq = names, eq

    def peek(self):
        return self.toks[self.k] if self.k < len(self.toks) else None

    def take(self, want=None):
        tok = self.peek()
        if tok is None or (want is not None and tok != want):
            raise SpecError(f"in {self.text!r}: expected {want or 'more'} but found {tok or 'the end'}")
        self.k += 1
        return tok

    def parse(self):
        e = self.expr()
        if self.peek() is not None:
            raise SpecError(f"in {self.text!r}: unexpected {self.peek()!r}")
        return e

    def expr(self):
        e = self.term()
        while self.peek() in ("+", "-"):
            e = e + self.term() if self.take() == "+" else e - self.term()
        return e

    def term(self):
        e = self.unary()
        while self.peek() in ("*", "/"):
            e = e * self.unary() if self.take() == "*" else e / self.unary()
        return e

    def unary(self):
        if self.peek() == "-":
            self.take()
            return -self.unary()
        return self.power()

    def power(self):
        e = self.atom()
        if self.peek() in ("^", "**"):
            self.take()
            e = e ** self.unary()
        return e

    def atom(self):
        tok = self.take()
        if tok == "(":
            e = self.expr()
            self.take(")")
            return e
        if tok[0].isdigit():
            return sp.Rational(tok)
        if tok == "sum" and self.peek() == "(":
            self.take("(")
            var = sp.Symbol(self.take(), integer=True)
            self.take(",")
            shadowed = self.names.get(str(var))
            self.names[str(var)] = var
            body = self.expr()
            self.take(")")
            if shadowed is None:
                del self.names[str(var)]
            else:
                self.names[str(var)] = shadowed
            return sp.Sum(body, (var, 0, _range_of(var, body, self.names) - 1))
        if tok in FUNCTIONS and self.peek() == "(":
            self.take("(")
            e = self.expr()
            self.take(")")
            return FUNCTIONS[tok](e)
        if tok in self.names:
            t = self.names[tok]
            if self.peek() == "[":
                self.take("[")
                idx = [self.expr()]
                while self.peek() == ",":
                    self.take(",")
                    idx.append(self.expr())
                self.take("]")
                return t[tuple(idx)]
            return t if isinstance(t, sp.Basic) else t.read()
        raise SpecError(f"in {self.text!r}: unknown name {tok!r} (tensors, indices and sizes of the model, "
                        f"and the functions {', '.join(sorted(FUNCTIONS))} are allowed)")


def _range_of(var, body, names):
    for read in body.atoms(sp.Indexed):
        for axis, e in enumerate(read.indices):
            if e == var:
                return names[str(read.base.label)].shape[axis]
    raise SpecError(f"summation index {var} is not used as a tensor index")


def parse_expression(text: str, model: Model, eq: Equation, extra=()) -> sp.Expr:
    """Read a claimed formula. Only the model's tensors (and adjoints), the equation's indices and
    the sizes are names."""
    if len(text) > 2000:
        raise SpecError("claim too long")
    names = dict(model.tensors) | {t.name: t for t in extra}
    names.update({str(i): i for i in eq.indices})
    names.update({str(s): s for s in model.sizes()})
    return _Parser(text, names, eq).parse()


def builtin_declarations() -> dict[str, str]:
    """A small model exercising each built-in declaration (every one contains the dense layer)."""
    from .layers import ACTIVATIONS
    cases = {f"activation {a}": f"3 -> dense(2) -> {a} -> dense(2) -> mse" for a in ACTIVATIONS}
    cases.update({
        "softmax": "3 -> dense(3) -> softmax -> cross_entropy",
        "log_softmax": "3 -> dense(3) -> log_softmax -> nll",
        "loss mse": "3 -> dense(2) -> mse",
        "loss mae": "3 -> dense(2) -> mae",
        "loss bce (probabilities)": "3 -> dense(2) -> sigmoid -> bce",
        "loss bce_logits": "3 -> dense(2) -> bce_logits",
        "loss cross_entropy (probabilities)": "3 -> dense(3) -> softmax -> cross_entropy",
        "loss softmax_cross_entropy (fused)": "3 -> dense(3) -> softmax_cross_entropy",
        "loss nll (log-softmax)": "3 -> dense(3) -> log_softmax -> nll",
        "demo model": "demo",
    })
    return cases
