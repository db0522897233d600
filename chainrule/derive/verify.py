"""Symbolic verification: the derived gradients against an independent reverse mode, exactly.

What is compared, and how:

* **Sizes.** Every symbolic size of the model (the batch ``B`` included) gets concrete values at two
  or more *size assignments* (``size_assignments``): small integers from 3 up, distinct from each
  other and from 2, different in each assignment, and chosen so that every tensor's shape evaluates
  to a whole positive number (a convolution's ``W-K+1``, a pooled ``(W-K)/S+1``). Integers written in
  a declaration (a stride of 2) stay as written.
* **Points.** At each assignment, every input, target and parameter element gets a random rational
  value (probability targets normalised so that their rows sum to one).
* **Direct gradient (the reference).** The forward equations are evaluated element by element on a
  scalar reverse-mode tape (``exact.Tape``): each scalar operation records its local partial
  derivatives from elementary calculus (primitives through their plain definitions, ``LogSumExp`` as
  ``log Σ exp``), and one backward sweep gives ∂C/∂(every element). No derived formula, and no
  derivative declared by a primitive, is used for the reference.
* **Derived gradient.** The engine's adjoint equations (``derive(model).composed`` by default) are
  evaluated element by element at the same point, reading the forward values.
* **Comparison.** Exactly (Python ``Fraction``s) when every value is rational; otherwise with ``mpmath``
  at 70 digits, and agreement means agreement to 50 significant digits. A point where a ``max``,
  ``abs``, step or branch is exactly at its kink is replaced by another.

A ``Check`` says which sizes and how many elements it compared; a check that would compare no element
is an error, never a pass. A claimed gradient (``check_claim``: a SymPy expression, or a string read
by the safe parser of ``claims.py``) is compared with the direct gradient the same way, and is
answered equal, or not equal with a counterexample naming the sizes and the element.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
import itertools
import random

import mpmath
import sympy as sp

from .backprop import Gradients, derive
from .claims import check_claim_expression, grammar_help, parse_claim, parse_expression  # noqa: F401
from .errors import ChainruleError, ShapeError, SpecError, UnsupportedError
from .exact import DIGITS, Compiler, Context, EvaluationError, Exact, Float, Inexact, Tape, WORK_DPS
from .graph import Model
from .tensor import Equation

__all__ = ["Check", "VerificationError", "check_claim", "verify_model", "size_assignments", "size_symbols",
           "parse_claim", "parse_expression", "builtin_declarations", "DIGITS"]

RESAMPLES = 20         # attempts to find a random point away from every kink
CLAIM_BUDGET = 200_000        # operations (terms of sums included) over all the evaluations of one claim


class VerificationError(ChainruleError):
    """Verification that cannot be carried out honestly (nothing to compare, no valid sizes)."""


@dataclass
class Check:
    """The result of comparing one gradient (all its elements) at several sizes and points."""

    name: str
    equal: bool = True
    method: str = "exact"                         # "exact" or "50 digits"
    counterexample: dict = field(default_factory=dict)
    checked: int = 0                              # element comparisons made
    sizes: list = field(default_factory=list)     # the size assignments compared at ({name: value})
    points: int = 0                               # random points per assignment

    def __bool__(self):
        return self.equal

    def sizes_text(self) -> str:
        return " and ".join("(" + (", ".join(f"{k}={v}" for k, v in s.items()) or "no symbolic sizes") + ")"
                            for s in self.sizes)

    def __str__(self):
        where = f"at sizes {self.sizes_text()}, {self.points} random point{'s' * (self.points != 1)} each"
        if self.equal:
            return f"{self.name}: equal: {self.checked} element comparisons ({self.method}) {where}"
        found = "; ".join(f"{k}: {', '.join(f'{n}={v}' for n, v in v.items()) if k == 'sizes' else v}"
                          for k, v in self.counterexample.items())
        return (f"{self.name}: NOT EQUAL ({self.method}, checking {where}); counterexample after "
                f"{self.checked} element comparison{'s' * (self.checked != 1)}: {found}")


# -- sizes ---------------------------------------------------------------------------------------------
def size_symbols(model: Model) -> list[sp.Symbol]:
    """The symbolic sizes of a model: the free symbols of its tensors' shapes (``B`` included), and
    any other positive-integer symbol its equations use (a size that only scales, like ``d`` in 1/√d)."""
    syms = set(model.sizes())
    for eq in model.equations:
        syms |= {s for s in eq.body.free_symbols if s.is_integer and s.is_positive}
    return sorted(syms, key=str)


def size_assignments(model: Model, count: int = 2, *, low: int = 3) -> list[dict]:
    """``count`` assignments {size symbol: int}, deterministic: every size gets a value ≥ ``low`` (so
    never 2), distinct from every other size's, different from its value in the other assignments,
    and every tensor's shape evaluates to whole positive numbers. Smallest values first."""
    syms = size_symbols(model)
    shapes = {sp.sympify(n) for t in model.tensors.values() for n in t.shape}
    ints = Compiler(Exact())
    checks = {k: [] for k in range(len(syms))}          # shape expressions, by their last symbol
    for n in shapes:
        if not n.free_symbols:
            if not (n.is_Integer and n > 0):
                raise ShapeError(f"a tensor of model {model.name} has the fixed size {n}, not a positive integer")
            continue
        last = max(syms.index(s) for s in n.free_symbols)
        checks[last].append((n, ints.compile(n)))
    if not syms:
        return [{}]

    def whole(expr_fn, env) -> bool:
        try:
            v = expr_fn(Context(env, {}))
        except (EvaluationError, ZeroDivisionError):
            return False
        return v == int(v) and v > 0

    def search(values, previous, strict, budget=200_000):
        """Depth-first, smallest values first; ``strict``: every size differs from its value in each of
        ``previous``, else the assignment as a whole differs from each of them."""
        env, used, steps = {}, set(), [0]

        def assign(k):
            if k == len(syms):
                return strict or all(env != p for p in previous)
            for v in values:
                steps[0] += 1
                if steps[0] > budget:
                    return False
                if v in used or (strict and any(p[syms[k]] == v for p in previous)):
                    continue
                env[syms[k]] = v
                if all(whole(fn, env) for _, fn in checks[k]):
                    used.add(v)
                    if assign(k + 1):
                        return True
                    used.discard(v)
                del env[syms[k]]
            return False
        return dict(env) if assign(0) else None

    found: list[dict] = []
    for strict in (True, False):      # a size the shapes pin down cannot change: then vary the others
        for top in (low + len(syms) + 5, low + 4 * len(syms) + 24):
            while len(found) < count:
                a = search(range(low, top), found, strict)
                if a is None:
                    break
                found.append(a)
        if len(found) == count:
            break
    if not found:
        raise VerificationError(
            f"model {model.name}: no assignment of the sizes {', '.join(map(str, syms))} (values ≥ {low}, distinct) "
            f"makes every shape a positive integer: {', '.join(sorted(str(n) for n, _ in sum(checks.values(), [])))}")
    return found


def _named(sizes: dict) -> dict:
    return {str(k): int(v) for k, v in sizes.items()}


def _normalise_sizes(model, sizes):
    if sizes is None:
        return size_assignments(model)
    by_name = {str(s): s for s in size_symbols(model)}
    out = []
    for a in sizes:
        a = {by_name.get(str(k), k): int(v) for k, v in a.items()}
        missing = set(by_name.values()) - set(a)
        if missing:
            raise VerificationError(f"size assignment {_named(a)} gives no value to {sorted(map(str, missing))}")
        out.append(a)
    return out


def _shape(tensor, sizes) -> tuple:
    out = []
    for n in tensor.shape:
        v = sp.sympify(n).xreplace({k: sp.Integer(v) for k, v in sizes.items()})
        if not (v.is_Integer and v > 0):
            raise VerificationError(f"tensor {tensor.name} {tensor.shape} has size {v} at {_named(sizes)}")
        out.append(int(v))
    return tuple(out)


def _elements(tensor, sizes):
    return itertools.product(*[range(n) for n in _shape(tensor, sizes)])


# -- random points ---------------------------------------------------------------------------------------
def random_point(model: Model, sizes, rng: random.Random) -> dict:
    """{tensor name: {index: Fraction}} for every input, target and parameter: values in [-1, 1] with
    denominator 20 (never 0), targets in (0, 1); probability targets' rows normalised to sum to one."""
    point = {}
    # a maximum over a window ties often on a 40-value grid: a model with one draws from a finer grid
    from .primitives import MaxOver
    den = 1000 if any(eq.body.has(MaxOver) for eq in model.equations) else 20
    choices = [k for k in range(-den, den + 1) if k]
    for t in model.tensors.values():
        if t.role not in ("input", "target", "param", "noise"):
            continue
        shape = _shape(t, sizes)
        values = {}
        vocab = t.meta.get("vocab")
        if vocab is not None:             # token ids: integers in the vocabulary
            top = int(sp.sympify(vocab).xreplace({k: sp.Integer(v) for k, v in sizes.items()}))
            point[t.name] = {idx: Fraction(rng.randrange(top)) for idx in itertools.product(*[range(n) for n in shape])}
            continue
        for idx in itertools.product(*[range(n) for n in shape]):
            v = rng.randint(1, den - 1) if t.role == "target" else rng.choice(choices)
            values[idx] = Fraction(v, den)
        if t.simplex_axis is not None:
            axis = t.simplex_axis
            for rest in itertools.product(*[range(n) for k, n in enumerate(shape) if k != axis]):
                row = [rest[:axis] + (j,) + rest[axis:] for j in range(shape[axis])]
                total = sum(values[r] for r in row)
                for r in row:
                    values[r] = values[r] / total
        point[t.name] = values
    return point


# -- one evaluation: forward on the tape, backward sweep, derived equations ----------------------------------
def _compiled_units(units, compiler, consts):
    """Each unit (an equation, or a time loop of equations) with its equations' bodies compiled."""
    from .recurrence import TimeLoop
    out = []
    for u in units:
        eqs = u.equations if isinstance(u, TimeLoop) else [u]
        out.append((u, [(eq, compiler.compile(eq.body.xreplace(consts))) for eq in eqs]))
    return out


def _element_order(units, sizes, store):
    """(equation, compiled body, element) in an order where every element comes after the elements
    it reads: equation by equation, and inside a time loop step by step (upward for a recurrence,
    downward for its adjoint), every equation of the loop at each step. Each output starts empty
    in ``store``."""
    from .recurrence import TimeLoop
    for u, compiled in units:
        for eq, _ in compiled:
            store[eq.out.name] = {}
        if not isinstance(u, TimeLoop):
            (eq, fn), = compiled
            for idx in _elements(eq.out, sizes):
                yield eq, fn, idx
            continue
        axis0 = u.time_axes[compiled[0][0].out.name]
        steps = range(_shape(compiled[0][0].out, sizes)[axis0])
        for t in (steps if u.direction > 0 else reversed(steps)):
            for eq, fn in compiled:
                axis = u.time_axes[eq.out.name]
                for idx in _elements(eq.out, sizes):
                    if idx[axis] == t:
                        yield eq, fn, idx


def _ordered(equations: list[Equation]) -> list:
    """Adjoint equations as units, each after the adjoints it reads (a recurrence's adjoints, which
    read each other at t+1, as a time loop running t downward)."""
    from .recurrence import ordered_units
    try:
        return ordered_units(equations)
    except UnsupportedError as err:
        raise VerificationError(f"the adjoint equations cannot be ordered: {err}") from None


class _Evaluator:
    """Compiled once per model and arithmetic; ``run`` evaluates one size assignment at one point."""

    def __init__(self, model: Model, derived: list[Equation], exact: bool, claim=None):
        self.model = model
        self.base = Exact() if exact else Float()
        self.tape = Tape(self.base)
        scalars = {t.name for t in model.tensors.values() if t.rank == 0}
        scalars |= {"d_" + n for n in scalars} | {eq.out.name for eq in derived if eq.out.rank == 0}
        fwd = Compiler(self.tape, scalars)
        # the model's named constants (regularisation strengths) at their exact decimal values
        consts = {s: sp.Rational(repr(float(v))) for s, v in getattr(model, "constants", {}).items()}
        self.forward = _compiled_units(getattr(model, "schedule", None) or model.equations, fwd, consts)
        plain = Compiler(self.base, scalars)
        self.derived = _compiled_units(_ordered(derived), plain, consts)
        self.claim = plain.compile(claim.xreplace(consts)) if claim is not None else None
        self.claim_budget = CLAIM_BUDGET

    def run(self, sizes: dict, point: dict):
        tape, model = self.tape, self.model
        tape.reset()
        env = dict(sizes)
        store = {name: {idx: tape.leaf(v) for idx, v in values.items()} for name, values in point.items()}
        ctx = Context(env, store)
        for eq, fn, idx in _element_order(self.forward, sizes, store):
            env.update(zip(eq.indices, idx))
            try:
                store[eq.out.name][idx] = tape.element(fn(ctx))
            except (EvaluationError, ZeroDivisionError) as err:
                raise EvaluationError(f"model {model.name}: the forward equation for {_element(eq.out.name, idx)}"
                                      f" has no value at sizes {_named(sizes)} and a random point: {err}") from None
            for i in eq.indices:
                env.pop(i, None)
        cost = store[model.cost.name][()]
        tape.backward(cost)
        values = {name: {i: n.value for i, n in elems.items()} for name, elems in store.items()}
        direct = {"d_" + name: {i: n.grad for i, n in elems.items()} for name, elems in store.items()}
        derived, errors = dict(values), {}
        ctx = Context(env, derived)
        for eq, fn, idx in _element_order(self.derived, sizes, derived):
            if eq.out.name in errors:
                continue
            env.update(zip(eq.indices, idx))
            try:
                derived[eq.out.name][idx] = fn(ctx)
            except (EvaluationError, ZeroDivisionError) as err:
                errors[eq.out.name] = f"{eq.out.name}: {err}"
                derived.pop(eq.out.name, None)
                derived[eq.out.name + "__failed"] = {}
            for i in eq.indices:
                env.pop(i, None)
        for name in errors:
            derived.pop(name, None)
            derived.pop(name + "__failed", None)
        return values, direct, derived, errors

    def evaluate_claim(self, sizes, values, direct, idx, indices):
        """The claim at one element; all evaluations of one claim share ``CLAIM_BUDGET`` sum terms."""
        env = dict(sizes)
        env.update(zip(indices, idx))
        ctx = Context(env, {**values, **direct}, self.claim_budget)
        try:
            return self.claim(ctx)
        finally:
            self.claim_budget = ctx.budget


def _exactly_or_to_50_digits(attempt):
    """Run ``attempt(exact: bool)`` exactly; if a value leaves the rationals, again at 70 digits."""
    try:
        return attempt(True)
    except Inexact:
        with mpmath.workdps(WORK_DPS):
            return attempt(False)


def _points(ev: _Evaluator, model, sizes, rng, count):
    """``count`` evaluated random points at ``sizes``, each away from every kink."""
    out = []
    for _ in range(count):
        for attempt in range(RESAMPLES):
            point = random_point(model, sizes, rng)
            result = ev.run(sizes, point)
            if not ev.base.kink:
                break
        else:
            raise VerificationError(f"model {model.name}: every random point at sizes {_named(sizes)} sits on a "
                                    f"kink (a tie in max/min/abs/step), so the derivative there is a convention")
        out.append(result)
    return out


def _number(ev, x):
    return ev.base.sympy(x)


# -- verifying a model ------------------------------------------------------------------------------------
def verify_model(model: Model, grads: Gradients | None = None, *, points: int = 2, seed: int = 0,
                 composed: bool = True, sizes=None) -> list[Check]:
    """Compare every derived parameter (and requested input) gradient with the direct gradient of the
    cost, element by element, at ≥ 2 size assignments × ``points`` random points (see the module
    docstring). Returns one ``Check`` per gradient; raises ``VerificationError`` if there is nothing
    to compare."""
    grads = grads or derive(model)
    derivs = grads.composed if composed else grads.derivations
    names = [n for n in derivs if model.tensors[n].role in ("param", "input")]
    if not names:
        raise VerificationError(f"model {model.name} has no parameter gradient to verify")
    assignments = _normalise_sizes(model, sizes)

    def attempt(exact):
        ev = _Evaluator(model, [d.equation for d in derivs.values()], exact)
        checks = {n: Check(f"{model.name}: dC/d{n}", True, ev.base.name, sizes=[_named(a) for a in assignments],
                           points=points) for n in names}
        rng = random.Random(seed)
        for a in assignments:
            for values, direct, derived, errors in _points(ev, model, a, rng, points):
                for n in names:
                    check, adj = checks[n], derivs[n].adjoint.name
                    if not check.equal:
                        continue
                    if adj in errors or adj not in derived:
                        check.equal = False
                        check.counterexample = {"sizes": _named(a), "error": errors.get(adj) or
                                                f"{adj} could not be evaluated ({'; '.join(errors.values())})"}
                        continue
                    for idx in _elements(derivs[n].adjoint, a):
                        mine, ref = derived[adj][idx], direct[adj][idx]
                        check.checked += 1
                        if not ev.base.same(mine, ref):
                            check.equal = False
                            check.counterexample = {"sizes": _named(a), "element": _element(adj, idx),
                                                    "derived": _number(ev, mine), "direct": _number(ev, ref)}
                            break
        return list(checks.values())

    checks = _exactly_or_to_50_digits(attempt)
    for c in checks:
        if c.checked == 0 and c.equal:
            raise VerificationError(f"{c.name}: no element was compared at sizes {c.sizes_text()} "
                                    f"(an empty check is not a pass)")
    return checks


def _element(name, idx) -> str:
    return f"{name}[{', '.join(map(str, idx))}]" if idx else name


# -- claims ---------------------------------------------------------------------------------------------------
def check_claim(model: Model, tensor: str, claim, *, grads: Gradients | None = None, points: int = 2,
                seed: int = 0, sizes=None) -> Check:
    """Is ``claim`` the gradient ∂C/∂``tensor``? ``claim`` is index notation in the adjoint's own index
    names (a string for the safe parser, or a SymPy expression); it may read forward tensors
    (``p2[b,o]``), targets, parameters, adjoints (``d_z1[b,o]``, their true values) and the sizes.

    The claim is compared with the direct gradient (see the module docstring) at every element, at
    ≥ 2 size assignments × ``points`` random points; the counterexample names the sizes, the element,
    the claimed value and the derived one. A claim without a value somewhere (a division by zero)
    raises ``SpecError``."""
    grads = grads or derive(model)
    derivs = grads.composed if tensor in grads.composed else grads.derivations
    if tensor not in derivs:
        raise SpecError(f"model {model.name} derives no gradient for {tensor!r}; known: {', '.join(derivs)}. "
                        f"{grammar_help()}")
    d = derivs[tensor]
    if isinstance(claim, str):
        claim = parse_claim(claim, model, d.equation, extra=list(grads.adjoints.values()))
    elif isinstance(claim, (sp.Basic, int)):
        claim = check_claim_expression(claim, model, d.equation, extra=list(grads.adjoints.values()))
    else:
        raise SpecError(f"a claim is a string or a SymPy expression, not {type(claim).__name__}")
    assignments = _normalise_sizes(model, sizes)
    adj = d.adjoint.name
    work = sum(_claim_cost(claim, a) * len(list(_elements(d.adjoint, a))) * points for a in assignments)
    if work > CLAIM_BUDGET:
        raise SpecError(f"the claim would take about {work:.2g} operations to check at sizes "
                        f"{' and '.join(map(str, map(_named, assignments)))} (at most {CLAIM_BUDGET}): "
                        f"too many nested sums")

    def attempt(exact):
        ev = _Evaluator(model, [x.equation for x in derivs.values()], exact, claim=claim)
        result = Check(f"claim for dC/d{tensor}", True, ev.base.name, sizes=[_named(a) for a in assignments],
                       points=points)
        rng = random.Random(seed)
        for a in assignments:
            for values, direct, derived, errors in _points(ev, model, a, rng, points):
                for idx in _elements(d.adjoint, a):
                    try:
                        mine = ev.evaluate_claim(a, values, direct, idx, d.equation.indices)
                    except (EvaluationError, ZeroDivisionError) as err:
                        raise SpecError(f"the claim has no value at sizes {_named(a)}, element "
                                        f"{_element(adj, idx)}: {err}") from None
                    ref = direct[adj][idx]
                    result.checked += 1
                    if not ev.base.same(mine, ref):
                        result.equal = False
                        result.counterexample = {"sizes": _named(a), "element": _element(adj, idx),
                                                 "claimed": _number(ev, mine)}
                        mine_derived = derived.get(adj, {}).get(idx)
                        if mine_derived is not None and ev.base.same(mine_derived, ref):
                            result.counterexample["derived"] = _number(ev, ref)
                        else:      # the derivation disagrees too: show both (and say so)
                            result.counterexample["direct"] = _number(ev, ref)
                            result.counterexample["derived"] = (_number(ev, mine_derived) if mine_derived is not None
                                                                else errors.get(adj, "not evaluated"))
                        return result
        return result

    result = _exactly_or_to_50_digits(attempt)
    if result.checked == 0:
        raise VerificationError(f"{result.name}: no element was compared (an empty check is not a pass)")
    return result


def _claim_cost(expr, sizes) -> int:
    """About how many operations one evaluation of ``expr`` takes at ``sizes`` (sums multiply)."""
    if isinstance(expr, sp.Sum):
        terms = 1
        for _, lo, hi in expr.limits:
            n = (hi - lo + 1).xreplace({k: sp.Integer(v) for k, v in sizes.items()})
            terms *= int(n) if n.is_Integer and n > 0 else 1
        return 1 + terms * _claim_cost(expr.function, sizes)
    return 1 + sum(_claim_cost(a, sizes) for a in expr.args)


# -- the built-in declarations -----------------------------------------------------------------------------------
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
