"""Index notation: tensors with named axes of symbolic size, and equations that define them.

``Equation(out, (b, o), body)`` means ``out[b, o] = body`` for every ``b``, ``o`` in range, where
``body`` is a SymPy expression over reads ``T[e...]`` of other tensors (``e`` a loop index or an
affine expression of loop indices) and ``Sum`` over reduction indices.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import sympy as sp
from sympy.concrete.expr_with_intlimits import ExprWithIntLimits

from .errors import ShapeError, UnsupportedError

ROLES = ("input", "target", "param", "hidden", "loss", "cost", "adjoint", "noise", "buffer")


def size(name: str) -> sp.Symbol:
    """A symbolic axis length (a positive integer)."""
    return sp.Symbol(name, integer=True, positive=True)


def index(name: str) -> sp.Symbol:
    """A loop or reduction index (an integer)."""
    return sp.Symbol(name, integer=True)


def indices(names: str) -> tuple[sp.Symbol, ...]:
    return tuple(index(n) for n in names.split())


def shape_str(shape, values=None) -> str:
    """``(B, T_0, n_1)``; with ``values`` (size symbol -> int, a model's ``size_values``) the sizes the
    model declares are printed as numbers, ``(B, 64, 128)``, which is what a user recognises."""
    if values:
        shape = tuple(sp.sympify(s).xreplace(values) for s in shape)
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def affine_bounds(expr, ranges):
    """(min, max) of an affine integer expression over a box of index ranges, or None if not affine."""
    expr = sp.expand(expr)
    lo = hi = expr
    for var in expr.free_symbols & set(ranges):
        if not sp.Poly(expr, var).degree() == 1:
            return None
        c = expr.coeff(var)
        if c.free_symbols & set(ranges) or c.is_nonnegative is None:
            return None
        vlo, vhi = ranges[var]
        lo = lo.subs(var, vlo if c.is_nonnegative else vhi)
        hi = hi.subs(var, vhi if c.is_nonnegative else vlo)
    return _simplest(lo), _simplest(hi)


def _simplest(e):
    """A bound in its simplest form: a polynomial in the sizes is already canonical once expanded
    (``simplify`` would return the same, 100 times slower: it was most of building a model);
    anything with a function in it (floor, Max, ...) is simplified."""
    e = sp.expand(e)
    return e if e.is_polynomial() and not e.has(sp.Function) else sp.simplify(e)


def simplified(limit):
    """``sp.simplify(limit)`` for a summation limit, skipped where it is the identity: a number, a
    symbol, or a sum of integer multiples of symbols and an integer (every limit of a dense,
    convolutional or recurrent model: 0, B - 1, T - t - 1). Why: SymPy's first ``simplify`` imports
    ``sympy.physics.units`` (0.1-0.2 s of a cold ``chainrule demo``, before its kernels can
    compile), and a derivation calls it about a hundred times. A limit with ``Min``, ``Max`` or a
    product of symbols is simplified as before."""
    def linear(term):
        return term.is_Integer or term.is_Symbol or (
            term.is_Mul and len(term.args) == 2 and term.args[0].is_Integer and term.args[1].is_Symbol)
    limit = sp.sympify(limit)
    if limit.is_Number or limit.is_Symbol or (limit.is_Add and all(linear(t) for t in limit.args)):
        return limit
    return sp.simplify(limit)


def vanishes(e) -> bool:
    """``e`` is identically 0 (a difference of two bounds or sizes), decided on its simplest form
    (:func:`_simplest`: a polynomial is canonical once expanded, exact without ``simplify``)."""
    return _simplest(e) == 0


def provably_nonneg(e) -> bool:
    return bool(sp.simplify(e).is_nonnegative)


# -- bound indices ------------------------------------------------------------------------------
# ``Sum`` and ``LogSumExp`` bind their summation index, but SymPy's ``xreplace`` does not respect
# binding: replacing a free ``o`` also rewrites an inner ``Σ_o``. So the engine keeps one invariant:
# no summation index shadows a free index or an enclosing summation index. ``rename_bound``
# restores it and ``substitute`` replaces free indices without capture.
BINDERS = (sp.Sum, ExprWithIntLimits)       # Sum, and reductions such as LogSumExp


def _symbols(expr) -> set:
    return {s for s in sp.preorder_traversal(expr) if isinstance(s, sp.Symbol)}


def _fresh(var, taken: set):
    w = var
    while w in taken:
        w = index(w.name + "'")
    return w


def rename_bound(expr, avoid=frozenset()):
    """Rename every summation index that is in ``avoid`` or shadows an enclosing one (to a primed
    name that is neither in scope nor free in its body), so that replacing free indices can never
    reach a bound one. Sibling sums may share a name; nested ones never do."""
    expr = sp.sympify(expr)
    binders = BINDERS
    if not any(isinstance(e, binders) for e in sp.preorder_traversal(expr)):
        return expr

    def walk(e, blocked):
        if isinstance(e, binders):
            mapping, limits = {}, []
            for var, lo, hi in e.limits:
                lo = walk(lo.xreplace(mapping), blocked)
                hi = walk(hi.xreplace(mapping), blocked)
                new = var
                if var in blocked:
                    new = _fresh(var, blocked | _symbols(e))
                    mapping[var] = new
                limits.append((new, lo, hi))
                blocked = blocked | {new}
            return type(e)(walk(e.function.xreplace(mapping), blocked), *limits)
        if not e.args or isinstance(e, sp.Indexed):
            return e
        args = [walk(a, blocked) for a in e.args]
        return e.func(*args) if any(a is not b for a, b in zip(args, e.args)) else e

    return walk(expr, frozenset(avoid))


def substitute(expr, mapping: dict):
    """``expr`` with free indices replaced by ``mapping`` (index -> expression), without capture."""
    avoid = set(mapping)
    for value in mapping.values():
        avoid |= sp.sympify(value).free_symbols
    return rename_bound(expr, avoid).xreplace(mapping)


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(eq=False)
class Tensor:
    """A named tensor. ``T[i, j]`` is a read of one element (a SymPy ``Indexed``)."""

    name: str
    shape: tuple
    role: str = "hidden"
    latex: str | None = None
    layer: str = ""
    init: str | None = None          # parameters: "glorot", "he", "zeros"
    # role "noise": a random tensor drawn afresh at every training step (meta["dist"] says how:
    # "bernoulli" with meta["keep"], or "normal"), replaced by its mean in evaluation
    # role "buffer": non-trainable state kept between steps (batch norm's running averages),
    # updated by the model's declared ``buffer_updates`` and read by its ``eval_equations``
    grad_latex: str | None = None    # how its adjoint is written (e.g. δ for pre-activations)
    simplex_axis: int | None = None  # declared fact: sums to one over this axis (probability target)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not _IDENT.match(self.name):
            raise ShapeError(f"tensor name {self.name!r} is not an identifier")
        if self.role not in ROLES:
            raise ShapeError(f"tensor {self.name}: unknown role {self.role!r}")
        self.shape = tuple(sp.sympify(s) for s in self.shape)
        self.latex = self.latex or self.name
        self.base = sp.IndexedBase(self.name, real=True)
        self.symbol = sp.Symbol(self.name, real=True)   # rank-0 tensors are plain symbols

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __getitem__(self, idx) -> sp.Expr:
        idx = idx if isinstance(idx, tuple) else (idx,)
        if len(idx) != self.rank:
            where = f" in layer {self.layer}" if self.layer else ""
            raise ShapeError(f"tensor {self.name}{where} has shape {shape_str(self.shape)} "
                             f"(rank {self.rank}) but is read with {len(idx)} indices {list(idx)}")
        if self.rank == 0:
            return self.symbol
        return self.base[idx]

    def read(self) -> sp.Expr:
        """The read of a rank-0 tensor (a scalar)."""
        return self[()]

    def __repr__(self):
        return f"Tensor({self.name}, {shape_str(self.shape)}, {self.role})"


def reads_of(expr: sp.Expr) -> list[tuple[str, tuple]]:
    """Every tensor read in ``expr`` as (tensor name, index expressions), rank-0 reads included, in a
    fixed order (SymPy's atoms are a set, whose order changes with the hash seed: what is derived and
    printed from these reads must not)."""
    indexed = expr.atoms(sp.Indexed)
    labels = {r.base.label for r in indexed}
    out = [(str(r.base.label), tuple(r.indices)) for r in indexed]
    out += [(s.name, ()) for s in expr.free_symbols - labels
            if isinstance(s, sp.Symbol) and not s.is_integer and s.is_real]
    return sorted(out, key=lambda read: (read[0], [sp.default_sort_key(i) for i in read[1]]))


@dataclass(eq=False)
class Equation:
    """``out[indices] = body``: defines every element of ``out``."""

    out: Tensor
    indices: tuple
    body: sp.Expr
    layer: str = ""
    note: str = ""                   # what the equation is, in words (for explanations)

    def __post_init__(self):
        self.indices = tuple(self.indices)
        self.body = rename_bound(sp.sympify(self.body), set(self.indices))   # no shadowed index
        if len(self.indices) != self.out.rank:
            raise ShapeError(f"layer {self.layer or '?'}: equation for {self.out.name} "
                             f"{shape_str(self.out.shape)} has {len(self.indices)} indices")
        if len(set(self.indices)) != len(self.indices):
            raise UnsupportedError(f"layer {self.layer or '?'}: repeated output index in "
                                   f"{self.out.name}{list(self.indices)} (a diagonal is not a definition)")

    @property
    def lhs(self) -> sp.Expr:
        return self.out[self.indices]

    def ranges(self) -> dict:
        """Index -> (lo, hi) for the output indices (inclusive bounds)."""
        return {i: (sp.S.Zero, n - 1) for i, n in zip(self.indices, self.out.shape)}

    def reads(self):
        return reads_of(self.body)

    def __repr__(self):
        return f"Equation({self.lhs} = {self.body})"
