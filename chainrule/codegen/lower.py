"""Lowering: forward and adjoint equations -> kernel plans -> lines of Numba-compatible Python.

Every equation ``out[idx] = body`` becomes one of:

* ``dot``:  ``out = _matmul(A, B)`` on 2-D views (transposes as ``.T``; ``_matmul`` is the module
  header's direct call of BLAS's gemm, ``np.dot`` for a vector), when the body *is* a plain
  two-operand contraction ``Σ_k A[..k..] B[..k..]``;
* ``loop``: an elementwise loop nest over ``idx`` (last index innermost, so that the writes are
  contiguous), into which contractions found inside the body are first extracted as ``_matmul``
  temporaries, and whose remaining reductions (``Sum``, ``LogSumExp``) become accumulator loops,
  hoisted to the shallowest loop level at which their free indices are bound. Consecutive
  elementwise equations over the same iteration space that read each other only pointwise are
  fused into one loop nest;
* ``softmax``: ``out[.., u] = [u ∈ R] exp(f(u) - LSE_{v ∈ R} f(v))`` (a softmax, masked or not) as
  row loops that compute each ``exp`` once, normalise in place and only store zeros outside ``R``;
* ``accumulate``: ``out[idx] = Σ_r f`` with bounds independent of ``idx`` (a bias gradient): the
  reduction loop outermost and the output loop inside, so that the reads stay contiguous;
* ``scalar``: a rank-0 output (the cost);
* ``slices``: a run of equations that start with a batched contraction and all work per element of
  the same leading (batch, head) indices (attention's scores, softmax and weighted values; or the
  adjoints dA, dS, dV, dK, dQ) as one loop over those indices, each equation lowered on its 2-D
  slices by the cases above, so that each slice's intermediates stay in cache.

Nothing here knows about a particular layer: everything comes from the equations.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field

import sympy as sp

from ..derive.errors import UnsupportedError
from ..derive.layers import B as BATCH
from ..derive.deltas import GUARDS, eliminate_deltas, fold_guards
from ..derive.primitives import IsArgmax, LogSumExp, MaxOver, Primitive, step
from ..derive.recurrence import Delayed, TimeLoop, time_shift
from ..derive.tensor import Equation, Tensor, vanishes
from .printer import print_expr, to_conventions

REDUCTIONS = (sp.Sum, LogSumExp, MaxOver)
# the kernels that write an output declared ``preallocated`` in place (a slice loop's views)
WRITES_INTO_SLICES = ("dot", "loop", "softmax")
GEMM_MAX_WASTE = 4.0      # an im2col GEMM may compute this many times the products its limits keep
IND = "    "


def matmul(a: str, b: str, out: str | None = None) -> str:
    """The text of the product of two 2-D views ``a``, ``b`` (into the 2-D view ``out`` when
    given): the header's ``_matmul`` or ``_matmul_into``, BLAS's gemm called directly
    (templates/_header.py.j2)."""
    return f"_matmul_into({a}, {b}, {out})" if out else f"_matmul({a}, {b})"


def sanitise(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z]", "_", name)[:24]


def comment_text(text) -> str:
    """``text`` made safe for one ``#`` comment line of generated code: every character that is not
    printable (line breaks of any kind, NUL, other controls) becomes ``?``. Every user-chosen name
    or text that enters a comment of the template goes through here, whenever it was set."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


def pretty(eq) -> str:
    """One-line text of an equation, for the comment above the code implementing it."""
    idx = ",".join(str(i) for i in eq.indices)
    lhs = f"{eq.out.name}[{idx}]" if idx else eq.out.name
    text = f"{lhs} = {_pretty_body(to_conventions(eq.body))}"      # as lowered: step, not Heaviside
    return comment_text(" ".join(text.split()))   # never a newline inside a comment


def _pretty_body(body) -> str:
    def rec(e):
        if isinstance(e, sp.Sum):
            vs = ",".join(str(v) for v, _, _ in e.limits)
            return sp.Symbol(f"Σ_{vs}[{sp.sstr(rec(e.function))}]")
        if isinstance(e, LogSumExp):
            vs = ",".join(str(v) for v, _, _ in e.limits)
            return sp.Symbol(f"LSE_{vs}[{sp.sstr(rec(e.function))}]")
        if e.args and not isinstance(e, sp.Indexed):
            return e.func(*[rec(a) for a in e.args]) if not isinstance(e, sp.Tuple) else e
        return e
    try:
        return sp.sstr(rec(body))
    except Exception:                       # pragma: no cover - printing is best effort
        return sp.sstr(body)


@dataclass
class Kernel:
    """One step of a generated function: what it implements and the code lines doing it."""

    kind: str                    # dot | batched | loop | softmax | accumulate | scalar | update
    equations: list              # the equations it implements (pretty text)
    outputs: list                # tensor names written
    lines: list = field(default_factory=list)


class _Block:
    def __init__(self, bound: set):
        self.bound = set(bound)
        self.lines: list[str] = []
        self.cache: dict = {}


class Lowerer:
    """Turns a model's equations (forward and composed adjoints) into kernels."""

    def __init__(self, model, tensors: dict, *, cost_adjoint: str | None = None,
                 dtype: str = "float64"):
        self.model = model
        self.dtype = dtype
        # a float32 module computes its values in float32 (see KernelPrinter's ``cast``)
        self.value_cast = "DT" if dtype == "float32" else None
        self.tensors = tensors                # name -> Tensor (forward and adjoint)
        self.names: dict = {}                 # tensor name / Symbol -> identifier
        for k, name in enumerate(tensors):
            self.names[name] = f"t{k}_{sanitise(name)}"
            t = tensors[name]
            if t.rank == 0 and t.role in ("param", "input", "target"):
                # a rank-0 argument is passed as a 0-d array (so train_step can update it in
                # place): its read is the element ``a[()]``
                self.names[t.symbol] = f"{self.names[name]}[()]"
        self.names[BATCH] = "n_batch"
        self.sizes = {}
        for sym, val in model.size_values.items():
            self.sizes[sym] = sp.Integer(int(val))
        for sym, val in getattr(model, "constants", {}).items():   # regularisation strengths
            self.sizes[sym] = sp.Float(val)
        self.cost_adjoint = cost_adjoint
        self._counter = 0
        self.preallocated: set = set()        # outputs written into existing arrays (in place)
        self.outer_bound: set = set()         # indices bound around every kernel (a time loop's step)
        # inside a time loop's step: weights laid out once before the loop (name -> (identifier,
        # lines), ``step_transposed``) and the tensors the step computes (never laid out ahead)
        self.step_layouts: dict | None = None
        self.step_computed: set = set()
        # a step's results written straight into their sequences (name -> (the sequence's
        # name, time axis, step index)), and those a fused loop did write so
        self.step_targets: dict = {}
        self.step_written: set = set()
        # im2col buffers gathered so far in the function being lowered (key -> name), to be read
        # again by a later equation gathering the same values; None: no sharing (render.py opens a
        # scope for the training forward and hands it to the backward that follows it in one function)
        self.shared_cols: dict | None = None
        # tensors known to be zero outside a range of their last axis (a masked softmax: the
        # causal attention weights) -> (axis, lo, hi), lo and hi in the loop variables of the
        # earlier axes; reductions and loops that multiply by them skip the zeros
        self.zero_outside: dict = {}
        # the tensors that code after the function being lowered reads (its returned gradients), when
        # ``lower`` is given no ``keep``: a slice loop's intermediate outside this set and read by no
        # later equation is one slice, reused, never a whole array; None: every output is kept
        self.live_after: set | None = None
        self.loop_vars = [sp.Symbol(f"i{k}", integer=True) for k in range(8)]
        for v in self.loop_vars:
            self.names[v] = str(v)

    # -- helpers ------------------------------------------------------------------------------
    def fresh(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}{self._counter}"

    def ident(self, name: str) -> str:
        return self.names[name]

    def concrete_shape(self, t) -> tuple:
        out = []
        for s in t.shape:
            v = sp.sympify(s).xreplace(self.sizes)
            bad = v.free_symbols - {BATCH}
            if bad:
                raise UnsupportedError(f"codegen: tensor {t.name} has size {s} with no value")
            out.append(v)
        return tuple(out)

    def pe(self, expr) -> str:
        """An index, bound or size (integers)."""
        return print_expr(expr, self.names)

    def pv(self, expr) -> str:
        """A value, computed in the module's dtype."""
        return print_expr(expr, self.names, cast=self.value_cast)

    def range_code(self, lo, hi) -> str:
        """``range(lo, hi + 1)`` over the integers between two bounds. A bound with a rational
        coefficient (a strided map solved for its index, under a divisibility guard) is rounded
        inward, so the loop runs over integers and stays inside [lo, hi]."""
        return f"range({self.pe(_rounded(lo, up=True))}, {self.pe(_rounded(hi, up=False) + 1)})"

    def shape_code(self, t) -> str:
        dims = [self.pe(d) for d in self.concrete_shape(t)]
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"

    def prepare(self, eq):
        """Sizes substituted, bound indices renamed apart (fresh r-names), output indices to i0..
        A body written with Kronecker deltas (zero padding: the input embedded in zeros) is lowered in
        gather form: the engine's delta elimination, with the branch folded outward so that a read
        outside the tensor is never evaluated."""
        body = sp.sympify(eq.body)
        if body.has(Delayed):              # outside a time loop: the read, or the initial state before t = 0
            body = body.replace(lambda e: isinstance(e, Delayed), lambda e: e.as_piecewise())
        if body.has(sp.KroneckerDelta):
            body, _ = eliminate_deltas(body, eq.ranges())
        if body.has(*GUARDS):              # a declared mask ([u ≤ t] · exp(...)): a branch, not a product
            body = fold_guards(body.replace(lambda e: isinstance(e, GUARDS), lambda e: e.as_piecewise()))
        body = to_conventions(body.xreplace(self.sizes))
        if self.cost_adjoint is not None:
            body = body.xreplace({sp.Symbol(self.cost_adjoint, real=True): sp.S.One})
        # bound indices first: a reduction may bind a name that is free elsewhere in the body
        # (even an output index: SymPy's Sum shadows it), so it is renamed before the output
        # indices are mapped to loop variables
        body = self.rename_bound(body)
        rename = {old: self.loop_vars[p] for p, old in enumerate(eq.indices)}
        body = body.xreplace(rename)
        for s in body.free_symbols:
            if s.is_integer and s not in self.names and s not in self.sizes:
                raise UnsupportedError(f"codegen: index {s} in {pretty(eq)} is unbound")
        return body, tuple(self.loop_vars[p] for p in range(len(eq.indices)))

    def rename_bound(self, expr):
        """Alpha-rename every reduction's bound indices to fresh loop names, bottom-up.

        Reductions that are equal up to the names of their bound indices (nested ones included)
        become one and the same expression, which the lowering computes once (``_Block.cache``);
        any two others get different names, so a nested loop never reuses (and clobbers) the
        variable of an enclosing loop, and a sum may bind a name that is free around it.
        """
        table: dict = {}          # canonical form of a reduction -> the renamed reduction
        renamed: set = set()      # the fresh names given so far
        memo: dict = {}

        def canonical(r):
            order = [v for v, _, _ in r.limits]
            for node in sp.preorder_traversal(r):
                if node in renamed and node not in order:
                    order.append(node)
            return sp.srepr(r.xreplace({v: sp.Symbol(f"·{k}", integer=True) for k, v in enumerate(order)}))

        def rec(e):
            if e in memo:
                return memo[e]
            if not e.args or isinstance(e, sp.Indexed):
                return e
            args = [rec(a) for a in e.args]
            new = e.func(*args) if any(a is not b for a, b in zip(args, e.args)) else e
            if isinstance(new, REDUCTIONS):
                key = canonical(new)
                if key not in table:
                    fresh = {}
                    for v, _, _ in new.limits:
                        fresh[v] = sp.Symbol(self.fresh("r"), integer=True)
                        self.names[fresh[v]] = str(fresh[v])
                    renamed.update(fresh.values())
                    table[key] = new.xreplace(fresh)
                new = table[key]
            memo[e] = new
            return new
        return rec(expr)

    # -- contraction detection ----------------------------------------------------------------
    def match_dot(self, s, loop_vars):
        """``Σ_k A[..] B[..]`` with plain indices and full range -> (A, B, k, coefficient) or None."""
        if not isinstance(s, sp.Sum) or len(s.limits) != 1:
            return None
        k, lo, hi = s.limits[0]
        if lo != 0:
            return None
        split = _two_reads(s.function)
        if split is None:
            return None
        coeff, factors = split
        A, Bm = factors
        for t in (A, Bm):
            if not all(isinstance(i, sp.Symbol) for i in t.indices):
                return None
            if list(t.indices).count(k) != 1 or len(set(t.indices)) != len(t.indices):
                return None
            if t.rank > 2:
                return None
            name = str(t.base.label)
            if name not in self.tensors:
                return None
            shp = self.concrete_shape(self.tensors[name])
            if not vanishes(shp[list(t.indices).index(k)] - 1 - hi):
                return None
        fa = [i for i in A.indices if i != k]
        fb = [i for i in Bm.indices if i != k]
        if set(fa) & set(fb) or not set(fa + fb) <= set(loop_vars):
            return None
        return A, Bm, k, coeff

    def materialise_operands(self, body, loop_vars, info):
        """``Σ F(..) · G[..]`` where ``F`` is a product of several factors that read one and the same
        index tuple (a gate's adjoint times its derivative, ``(1 - r) r δ_r``) and ``G`` one other
        read: ``F`` is computed once into a temporary array (an elementwise loop), so that the sum
        becomes a two-operand contraction that ``_matmul`` or an im2col GEMM computes. Done only
        where the contraction then matches."""
        for s in sorted(body.atoms(sp.Sum), key=sp.default_sort_key):
            if not isinstance(s, sp.Sum) or any(isinstance(a, REDUCTIONS) for a in sp.preorder_traversal(s.function)
                                                if a is not s.function):
                continue
            factors = [f for f in sp.Mul.make_args(s.function) if not f.is_number]
            coeff = sp.Mul(*[f for f in sp.Mul.make_args(s.function) if f.is_number])
            reads = [f for f in factors if isinstance(f, sp.Indexed)]
            for G in reads:
                rest = [f for f in factors if f is not G]
                if len(rest) < 2:
                    continue
                idx = {tuple(r.indices) for f in rest for r in sp.sympify(f).atoms(sp.Indexed)}
                if len(idx) != 1:
                    continue
                own, = idx
                if not all(isinstance(v, sp.Symbol) for v in own) or len(set(own)) != len(own):
                    continue
                if set().union(*[sp.sympify(f).free_symbols for f in rest]) & set(self.sizes):
                    continue
                first = next(r for f in rest for r in sp.sympify(f).atoms(sp.Indexed))
                shape = self.tensors[str(first.base.label)].shape
                tmp = self.fresh("operand")
                t = Tensor(tmp, shape, role="hidden")
                self.tensors[tmp], self.names[tmp] = t, tmp
                candidate = sp.Sum(coeff * t[own] * G, *s.limits)
                if self.match_dot(candidate, loop_vars) is None and \
                        self.match_gemm(candidate, loop_vars, info["shape"]) is None:
                    del self.tensors[tmp]
                    continue
                value = sp.Mul(*rest).xreplace({v: sp.Symbol(f"_m{k}", integer=True) for k, v in enumerate(own)})
                fresh = tuple(sp.Symbol(f"_m{k}", integer=True) for k in range(len(own)))
                saved = self.outer_bound
                kernels = self.lower([Equation(t, fresh, value, note="an operand of a contraction")])
                self.outer_bound = saved
                lines = [f"# the operand {tmp}[{', '.join(map(str, own))}] = {comment_text(sp.sstr(sp.Mul(*rest)))}, "
                         f"computed once for the contraction"] + [ln for k in kernels for ln in k.lines]
                info["pre"].append((lines, tmp, str(G.base.label)))
                body = body.xreplace({s: candidate})
                break
        return body

    def dot_code(self, A, Bm, k, loop_vars, out: str | None = None):
        """Code for ``T[free] = Σ_k A B`` (written into the array ``out`` when given) and the order
        of T's indices (out-index order)."""
        fa = [i for i in A.indices if i != k]
        fb = [i for i in Bm.indices if i != k]
        if fa and fb and loop_vars.index(fa[0]) > loop_vars.index(fb[0]):
            A, Bm, fa, fb = Bm, A, fb, fa
        if not fa and fb:                        # vector . matrix -> matrix . vector
            A, Bm, fa, fb = Bm, A, fb, fa

        def view(t, k_first: bool):
            code = self.ident(str(t.base.label))
            if t.rank == 2 and (list(t.indices).index(k) == 0) != k_first:
                return self.step_transposed(str(t.base.label)) or code + ".T"
            return code
        a = view(A, k_first=False)                # A as (free, k)
        b = view(Bm, k_first=True)                # B as (k, free)
        if A.rank == 2 and Bm.rank == 2:
            product = matmul(a, b, out)
        else:                                    # (a vector: NumPy's product, which takes one)
            product = f"np.dot({a}, {b}, {out})" if out else f"np.dot({a}, {b})"
        return product, tuple(fa + fb)

    def dot_into(self, m, loop_vars, out: str) -> str | None:
        """The product ``m`` (a ``match_dot``) written into ``out`` when ``out`` is an existing array
        (``preallocated``: a slice loop's view), else None."""
        if out not in self.preallocated:
            return None
        return self.dot_code(m[0], m[1], m[2], loop_vars, out=self.ident(out))[0]

    def step_transposed(self, name: str) -> str | None:
        """Inside a time loop's step, the transpose of ``name`` laid out once before the loop, when
        the step does not compute ``name`` (a recurrent weight): the identifier of that contiguous
        copy, whose line ``time_loop_kernel`` puts before the loop. None elsewhere (a product
        computed once gains nothing from a copy of its operand). Why: OpenBLAS multiplies a
        (32 x 64) state by a (64 x 64) transposed view at half the speed of a plain one (0.50 against
        0.24 ms for an LSTM's 4 x 32 per-step products), and the copy costs one pass per call."""
        if self.step_layouts is None or name in self.step_computed:
            return None
        if name not in self.step_layouts:
            ident = self.ident(name)
            self.step_layouts[name] = (f"{ident}_T", [
                f"# {comment_text(name)} transposed once, before the loop: each step's product reads it "
                f"as a contiguous matrix (a transposed view is twice slower at these sizes)",
                f"{ident}_T = np.ascontiguousarray({ident}.T)"])
        return self.step_layouts[name][0]

    def match_batched(self, s, loop_vars):
        """``Σ_k A[β.., α.., k..] B[β.., k.., γ..]`` with plain indices over full ranges, where the
        *batch* indices β are read by both operands and are output indices (attention's
        ``S[b,h,t,u] = Σ_e Q[b,h,t,e] K[b,h,u,e]``) -> a plan for one ``_matmul`` per batch element,
        or None. (A contraction with no batch index is ``match_dot``'s or ``match_gemm``'s.)"""
        if not isinstance(s, sp.Sum):
            return None
        ks = [v for v, _, _ in s.limits]
        split = _two_reads(s.function)
        if split is None or len(set(ks)) != len(ks):
            return None
        coeff, (A, Bm) = split
        size = {}
        for t in (A, Bm):
            name = str(t.base.label)
            if name not in self.tensors or not all(isinstance(i, sp.Symbol) for i in t.indices) \
                    or len(set(t.indices)) != len(t.indices) or not set(ks) <= set(t.indices):
                return None
            for i, n in zip(t.indices, self.concrete_shape(self.tensors[name])):
                size.setdefault(i, n)
        for v, lo, hi in s.limits:
            if lo != 0 or not vanishes(hi - (size[v] - 1)):
                return None
        batch = [v for v in loop_vars if v in A.indices and v in Bm.indices and v not in ks]
        fa = [i for i in A.indices if i not in ks and i not in batch]
        fb = [i for i in Bm.indices if i not in ks and i not in batch]
        if not batch or not set(fa + fb) <= set(loop_vars) or set(fa) & set(fb) or not (fa and fb):
            return None
        if loop_vars.index(fa[0]) > loop_vars.index(fb[0]):
            A, Bm, fa, fb = Bm, A, fb, fa
        return dict(A=A, B=Bm, ks=ks, batch=batch, fa=fa, fb=fb, size=size, coeff=coeff)

    def batched_code(self, m, tmp, target=None) -> tuple[list, tuple]:
        """Lines computing ``tmp[β.., α.., γ..] = Σ_k A B`` (see ``match_batched``) by one ``_matmul``
        per batch element on 2-D views (a transposed view where an operand reads (k, free), a
        contiguous copy only where its axes are interleaved), and tmp's index order. With ``target``
        (an output whose index order is that one), the products go straight into it, times the
        coefficient."""
        pe, size, batch, ks = self.pe, m["size"], m["batch"], m["ks"]
        prod = lambda vs: " * ".join(f"({pe(size[v])})" for v in vs) or "1"
        names = {str(v): self.names[v] for v in batch}
        lines, views = [], []
        for t, free, free_first in ((m["A"], m["fa"], True), (m["B"], m["fb"], False)):
            ident = self.ident(str(t.base.label))
            idx = list(t.indices)
            rest = [i for i in idx if i not in batch]
            if idx[:len(batch)] == batch and rest in (free + ks, ks + free):
                base = ident
                natural_free_first = rest == free + ks
            else:                          # interleaved axes: one contiguous, reordered copy
                base = f"{tmp}_{'a' if free_first else 'b'}"
                order = batch + (free + ks if free_first else ks + free)
                lines.append(f"{base} = np.ascontiguousarray({ident}.transpose(({', '.join(str(idx.index(v)) for v in order)},)))")
                natural_free_first = free_first
            sl = f"{base}[{', '.join(names[str(v)] for v in batch)}]"
            if natural_free_first:
                shape2 = f"({prod(free)}, {prod(ks)})"
            else:
                shape2 = f"({prod(ks)}, {prod(free)})"
            view = f"{sl}.reshape({shape2})"
            if natural_free_first != free_first:
                view += ".T"
            views.append(view)
        order = tuple(batch + m["fa"] + m["fb"])
        out_dims = [pe(size[v]) for v in m["fa"] + m["fb"]]
        dest = target or tmp
        if target is None:
            lines.append(f"{tmp} = np.empty(({', '.join(pe(size[v]) for v in order)},), dtype=DT)")
        header = [f"for {names[str(v)]} in range({pe(size[v])}):" for v in batch]
        # each product written straight into its slice of the result (_matmul's ``out``): no
        # temporary per batch element, no copy
        view = f"{dest}_o"
        stmts = [f"{view} = {dest}[{', '.join(names[str(v)] for v in batch)}]"
                 + (f".reshape(({prod(m['fa'])}, {prod(m['fb'])}))" if len(out_dims) != 2 else ""),
                 matmul(views[0], views[1], view)]
        if target is not None and m["coeff"] != 1:
            stmts.append(f"{view} *= {self.pv(m['coeff'])}")
        for depth, h in enumerate(header):
            lines.append(IND * depth + h)
        lines += [IND * len(header) + st for st in stmts]
        return lines, order

    def match_gemm(self, s, loop_vars, shape):
        """``Σ_{k1..km} P[..] G[..]`` over several indices with full constant ranges, where ``P``
        reads every summation index as a plain index (the rest of its indices output indices) and
        ``G`` reads affine expressions of the summation indices and of the other output indices (a
        convolution: ``W[f, c, p, q] x[b, c, h + p, w + q]``, or its kernel gradient
        ``δ[b, f, h, w] x[b, c, h + p, w + q]``) -> a GEMM plan, or None.

        Lowered as im2col: ``col[Fg.., K..] = G[..]`` gathered into a contiguous buffer, then
        ``out[Fg.., Fp..] = col(Fg, K) · P(K, Fp)`` by ``_matmul`` on 2-D views."""
        if not isinstance(s, sp.Sum):           # (a plain matrix product is match_dot's)
            return None
        ks = [v for v, _, _ in s.limits]
        if len(set(ks)) != len(ks):
            return None
        limits = {v: (lo, hi) for v, lo, hi in s.limits}
        bounds = set().union(*[sp.sympify(lo).free_symbols | sp.sympify(hi).free_symbols
                               for lo, hi in limits.values()])
        if not bounds <= set(ks) | set(loop_vars) | set(self.sizes) | {BATCH}:
            return None                          # limits bound by an enclosing reduction
        split = _two_reads(s.function)
        if split is None:
            return None
        coeff, factors = split
        if not all(str(t.base.label) in self.tensors for t in factors):
            return None
        lv = set(loop_vars)
        for P, G in (factors, factors[::-1]):
            pidx = list(P.indices)
            if not all(isinstance(i, sp.Symbol) for i in pidx) or len(set(pidx)) != len(pidx):
                continue
            if not set(ks) <= set(pidx) or not set(pidx) <= set(ks) | lv:
                continue
            fp = [i for i in pidx if i not in ks]
            gfree = set().union(*[sp.sympify(e).free_symbols for e in G.indices]) - {BATCH}
            gfree -= set(self.sizes)
            if not gfree <= set(ks) | lv or gfree & set(fp):
                continue
            if not all(_affine(e, gfree) for e in G.indices):
                continue
            fg = [v for v in loop_vars if v in gfree]
            size = {v: shape[loop_vars.index(v)] for v in fp + fg}
            # each summation index runs over P's axis that reads it; a narrower range (limits that
            # depend on output indices: the input gradient's full correlation, or padding) is a
            # guard of the gather, which writes zero outside it
            pshape = self.concrete_shape(self.tensors[str(P.base.label)])
            guards = []
            for v in ks:
                size[v] = pshape[pidx.index(v)]
                lo, hi = limits[v]
                if not vanishes(lo):
                    guards.append((v, "lo", lo))
                if not vanishes(hi - (size[v] - 1)):
                    guards.append((v, "hi", hi))
            if guards and self.gather_waste(ks, limits, size, loop_vars, shape) > GEMM_MAX_WASTE:
                return None
            return dict(P=P, G=G, ks=ks, fp=fp, fg=fg, size=size, coeff=coeff, guards=guards)
        return None

    def gather_waste(self, ks, limits, size, loop_vars, shape) -> float:
        """How many times more products the zero-filled GEMM computes than the summation limits
        keep: the full axis of each summation index over the widest range its limits allow (found
        by evaluating them at every value of the output indices they depend on). The buffer grows
        with the square of the image for an input gradient, so a large waste keeps the loop nest."""
        waste = 1.0
        for v in ks:
            lo, hi = (_rounded(b, up=u) for b, u in zip(limits[v], (True, False)))
            dep = sorted((sp.sympify(lo).free_symbols | sp.sympify(hi).free_symbols) - set(self.sizes) - {BATCH},
                         key=str)
            if not dep:
                width = hi - lo + 1
            else:
                if not set(dep) <= set(loop_vars):
                    return float("inf")          # limits bound by another summation index
                extents = [shape[loop_vars.index(d)] for d in dep]
                if not all(e.is_Integer for e in extents) or math.prod(int(e) for e in extents) > 100_000:
                    return float("inf")
                f = sp.lambdify(dep, hi - lo + 1, modules="math")
                width = max(f(*pt) for pt in itertools.product(*[range(int(e)) for e in extents]))
            if not (sp.sympify(size[v]).is_Integer and sp.sympify(width).is_number):
                if not vanishes(size[v] - width):
                    return float("inf")
                continue
            if width <= 0:
                return float("inf")
            waste *= float(size[v]) / float(width)
        return waste

    def gemm_code(self, m, tmp, loop_vars=None) -> tuple[list, tuple]:
        """The lines of an im2col GEMM (see ``match_gemm``) into ``tmp``, and tmp's index order.

        The product is ``col(Fg, K) · P(K, Fp)``, laid out (Fg, Fp); when the output's own index order
        is (Fp, Fg) (a dense layer's weight gradient ``d_W[o, i] = Σ_{b,t} δ[b, t, o] x[b, t, i]``),
        it is ``P(K, Fp)ᵀ · col(K, Fg)`` instead, on transposed views: the result lands in the
        output's order and needs no transposing copy."""
        P, G, ks, fp, fg, size = m["P"], m["G"], m["ks"], m["fp"], m["fg"], m["size"]
        pe = self.pe
        p_first = loop_vars is not None and bool(fp and fg) and list(loop_vars) == fp + fg
        col = tmp + "_col"
        cvars = ks + fg if p_first else fg + ks
        cdims = [pe(size[v]) for v in cvars]
        prod = lambda vs: " * ".join(f"({pe(size[v])})" for v in vs) or "1"
        gtxt = comment_text(sp.sstr(G))
        colmat = self.operand_as_matrix(m)
        in_place = colmat is not None
        if in_place:
            col = sp.sstr(G.base.label)
            lines = [f"# {gtxt} read in place as a ({', '.join(map(str, fg))}) x ({', '.join(map(str, ks))}) "
                     f"matrix (its axes are already in that order: no gather)"]
            if p_first:                     # the same view, as (K) x (Fg)
                colmat = colmat[:-2] if colmat.endswith(".T") else f"{colmat}.T"
        else:
            rows, cols = (ks, fg) if p_first else (fg, ks)
            colmat = f"{col}.reshape(({prod(rows)}, {prod(cols)}))"
            if self.copies_along_last_axis(G, cols + rows) and not self.copies_along_last_axis(G, cvars):
                # the buffer laid out the other way round, used through its transpose: the gather's
                # inner loop then runs along the operand's contiguous last axis instead of striding
                # across it (d_Wo[h, e, o] = Σ_{b,t} O[b, h, t, e] δ[b, t, o]: col[b, t, h, e])
                cvars = cols + rows
                cdims = [pe(size[v]) for v in cvars]
                colmat = f"{col}.reshape(({prod(cols)}, {prod(rows)})).T"
            lines = [f"# im2col: {col}[{', '.join(map(str, cvars))}] = {gtxt}",
                     f"{col} = np.empty(({', '.join(cdims)},), dtype=DT)"]
        if not in_place:
            lines += self.gather_loop(m, col, cvars)
        pname = self.ident(str(P.base.label))
        perm = [list(P.indices).index(v) for v in ks + fp]
        ptxt = comment_text(sp.sstr(P))
        lines.append(f"# {ptxt} as a ({', '.join(map(str, ks))}) x ({', '.join(map(str, fp))}) matrix")
        if perm == sorted(perm):
            pmat = f"{pname}.reshape(({prod(ks)}, {prod(fp)}))"
        elif list(P.indices) == fp + ks:
            # laid out (Fp, K): its transpose, a view (no copy), as _matmul reads either layout
            # (a dense layer's W[o, i] in z = x Wᵀ; measured 3-8 % faster than a transposed copy)
            pmat = f"{pname}.reshape(({prod(fp)}, {prod(ks)})).T"
        else:
            pmat = (f"np.ascontiguousarray({pname}.transpose(({', '.join(map(str, perm))},)))"
                    f".reshape(({prod(ks)}, {prod(fp)}))")
        order = fp + fg if p_first else fg + fp
        out_dims = [pe(size[v]) for v in order]
        gathered = gtxt if in_place else f"{col}[{', '.join(map(str, cvars))}]"
        lines.append(f"# GEMM: {tmp}[{', '.join(map(str, order))}] = Σ_{','.join(map(str, ks))} "
                     f"{gathered} * {ptxt}" + (" (as the product of the transposes: the output's order)"
                                                if p_first else ""))
        pmat_t = pmat[:-2] if pmat.endswith(".T") else f"{pmat}.T"
        product = matmul(pmat_t, colmat) if p_first else matmul(colmat, pmat)
        lines.append(f"{tmp} = {product}.reshape(({', '.join(out_dims)},))")
        return lines, tuple(order)

    @staticmethod
    def copies_along_last_axis(G, cvars) -> bool:
        """Whether a gather laid out in the order ``cvars`` has the read ``G``'s last index (its
        contiguous axis, a plain index) as its innermost loop."""
        last = G.indices[-1]
        return isinstance(last, sp.Symbol) and bool(cvars) and cvars[-1] == last

    def gather_loop(self, m, col, cvars) -> list[str]:
        """The loop nest copying an im2col GEMM's gathered operand (``match_gemm``) into its buffer
        ``col``, laid out in the order ``cvars``: zero outside the summation limits."""
        pe, G = self.pe, m["G"]
        lines = [IND * depth + f"for {self.names[v]} in range({pe(m['size'][v])}):" for depth, v in enumerate(cvars)]
        depth = len(cvars)
        target = f"{col}[{', '.join(self.names[v] for v in cvars)}]"
        if not m["guards"]:
            return lines + [IND * depth + f"{target} = {self.pv(G)}"]
        cond = " and ".join(
            f"{self.names[v]} >= {pe(_rounded(b, up=True))}" if side == "lo"
            else f"{self.names[v]} <= {pe(_rounded(b, up=False))}" for v, side, b in m["guards"])
        return lines + [IND * depth + f"# zero outside the summation limits: {comment_text(cond)}",
                        IND * depth + f"if {cond}:", IND * (depth + 1) + f"{target} = {self.pv(G)}",
                        IND * depth + "else:", IND * (depth + 1) + f"{target} = 0.0"]

    def operand_as_matrix(self, m) -> str | None:
        """The gathered operand of an im2col GEMM (``match_gemm``) as a 2-D view of its own array,
        when no gather is needed: it reads plain indices over its whole axes, no guard, in the
        order (output indices, summation indices) or the reverse (a transposed view). A
        time-distributed input projection ``Σ_i W[o, i] x[b, t, i]`` is then one ``_matmul`` on
        ``x`` seen as a (B·T) x I matrix, and the weight gradient ``Σ_{b,t} δ[b, t, o] x[b, t, i]``
        one on its transpose."""
        G, ks, fg, size = m["G"], m["ks"], m["fg"], m["size"]
        idx = list(G.indices)
        if m["guards"] or not all(isinstance(i, sp.Symbol) for i in idx) or len(set(idx)) != len(idx):
            return None
        shape = self.concrete_shape(self.tensors[str(G.base.label)])
        if any(not vanishes(n - size[i]) for i, n in zip(idx, shape)):
            return None
        prod = lambda vs: " * ".join(f"({self.pe(size[v])})" for v in vs) or "1"
        name = self.ident(str(G.base.label))
        if idx == fg + ks:
            return f"{name}.reshape(({prod(fg)}, {prod(ks)}))"
        if idx == ks + fg:
            return f"{name}.reshape(({prod(ks)}, {prod(fg)})).T"
        return None

    def gemm_batched_code(self, m, tmp, loop_vars):
        """An im2col GEMM (see ``match_gemm``) laid out per element of a batch index, when that
        makes the product land in the output's own index order, or None. Two shapes qualify:

        * the output's leading indices β are read by the gathered operand G only (a forward
          convolution ``y[b, f, h, w]``): ``col[β, K.., rest..]``, and per β one
          ``_matmul(P(fp, K), col[β](K, rest))`` written straight into ``tmp[β]``;
        * P's leading index σ is summed and read by G as a plain index (a kernel gradient
          ``Σ_{b,h,w} δ[b, f, h, w] x[b, c, h + p, w + q]``): ``col[σ, fg.., K'..]`` and
          ``tmp(fp, fg) = Σ_σ P[σ](fp, K') · col[σ](fg, K')ᵀ``.

        Either way the result needs no transposed copy, and the gather walks G in memory order.
        Neither is used when G is already a matrix in memory (``operand_as_matrix``) and one GEMM
        lands in the output's order: an input projection over a whole sequence ``Σ_i W[o, i]
        x[b, t, i]`` stays one (B·T) x n by n x m product, not B·T matrix-vector products."""
        P, G, ks, fp, fg, size = m["P"], m["G"], m["ks"], m["fp"], m["fg"], m["size"]
        pidx = list(P.indices)
        loop_vars = list(loop_vars)
        if tuple(fg + fp) == tuple(loop_vars) and self.operand_as_matrix(m) is not None:
            return None
        beta = []
        for v in loop_vars:
            if v not in fg:
                break
            beta.append(v)
        rest = [v for v in fg if v not in beta]
        # (with nothing but β free in G, as a dense layer's z[b, o], one GEMM over all of β is better)
        if beta and rest and loop_vars == beta + fp + [v for v in loop_vars if v in rest]:
            kord = [v for v in pidx if v in ks]
            rest = [v for v in loop_vars if v in rest]
            return self._gemm_per_batch(m, tmp, beta, kord, rest, sum_over=None)
        sigma = pidx[0]
        gplain = [e for e in G.indices if isinstance(e, sp.Symbol)]
        if sigma in ks and sigma in gplain and loop_vars == fp + fg:
            kord = [v for v in pidx[1:] if v in ks]
            if kord and pidx[1:] in (fp + kord, kord + fp):    # (no K' left: one plain GEMM is better)
                return self._gemm_per_batch(m, tmp, [sigma], kord, fg, sum_over=sigma)
        return None

    def _gemm_per_batch(self, m, tmp, lead, kord, rest, sum_over):
        P, G, size, fp = m["P"], m["G"], m["size"], m["fp"]
        pe = self.pe
        prod = lambda vs: " * ".join(f"({pe(size[v])})" for v in vs) or "1"
        col = tmp + "_col"
        cvars = lead + (kord + rest if sum_over is None else rest + kord)
        gtxt = comment_text(sp.sstr(G))
        lines = [f"# im2col, per {', '.join(map(str, lead))}: {col}[{', '.join(map(str, cvars))}] = {gtxt}"]
        canon = {v: sp.Symbol(f"·{k}", integer=True) for k, v in enumerate(cvars)}
        # the same gather: the same read, extents and guards (the zeros outside the summation
        # limits), up to the names of the loop indices
        key = (sp.srepr(G.xreplace(canon)), tuple(pe(size[v]) for v in cvars),
               tuple((sp.srepr(v.xreplace(canon)), side, sp.srepr(sp.sympify(b).xreplace(canon)))
                     for v, side, b in m["guards"]))
        shared = self.shared_cols if self.shared_cols is not None and not self.outer_bound else None
        if shared is not None and key in shared:
            return self._gemm_per_batch_product(m, tmp, lead, kord, rest, sum_over,
                                                lines + [f"{col} = {shared[key]}  # gathered by an earlier equation"])
        if shared is not None:
            shared[key] = col
        lines.append(f"{col} = np.empty(({', '.join(pe(size[v]) for v in cvars)},), dtype=DT)")
        lines += self.gather_loop(m, col, cvars)
        return self._gemm_per_batch_product(m, tmp, lead, kord, rest, sum_over, lines)

    @staticmethod
    def _as_matrix(name, idx, rows, cols, copy, lines, prod, transposed_view=True) -> str:
        """The array ``name`` (read at indices ``idx``) as a (rows) x (cols) matrix: a reshape when its
        axes are in that order, a transposed view when they are reversed (if ``transposed_view``),
        else a contiguous copy ``copy`` in that order, whose line is appended to ``lines``."""
        if idx == rows + cols:
            return f"{name}.reshape(({prod(rows)}, {prod(cols)}))"
        if transposed_view and idx == cols + rows:
            return f"{name}.reshape(({prod(cols)}, {prod(rows)})).T"
        perm = ", ".join(str(idx.index(v)) for v in rows + cols)
        lines.append(f"{copy} = np.ascontiguousarray({name}.transpose(({perm},)))")
        return f"{copy}.reshape(({prod(rows)}, {prod(cols)}))"

    def _gemm_per_batch_product(self, m, tmp, lead, kord, rest, sum_over, lines):
        P, size, fp = m["P"], m["size"], m["fp"]
        pe = self.pe
        prod = lambda vs: " * ".join(f"({pe(size[v])})" for v in vs) or "1"
        col = tmp + "_col"
        cvars = lead + (kord + rest if sum_over is None else rest + kord)
        pname, pidx = self.ident(str(P.base.label)), list(P.indices)
        ptxt = comment_text(sp.sstr(P))
        at = ", ".join(self.names[v] for v in lead)
        head = [f"for {self.names[v]} in range({pe(size[v])}):" for v in lead]
        if sum_over is None:
            pmat = self._as_matrix(pname, pidx, fp, kord, f"{tmp}_p", lines, prod, transposed_view=False)
            lines += [f"# GEMM per {', '.join(map(str, lead))}: {tmp}[{', '.join(map(str, lead + fp + rest))}] = "
                      f"Σ_{','.join(map(str, kord))} {ptxt} * {col}[{', '.join(map(str, cvars))}]",
                      f"{tmp}_flat = np.empty(({', '.join([pe(size[v]) for v in lead] + [prod(fp), prod(rest)])},), dtype=DT)"]
            lines += [IND * d + h for d, h in enumerate(head)]
            lines.append(IND * len(head) + matmul(pmat, f"{col}[{at}].reshape(({prod(kord)}, {prod(rest)}))", f"{tmp}_flat[{at}]"))
            order = lead + fp + rest
        else:
            psel = f"{pname}[{at}]"
            pmat = (f"{psel}.reshape(({prod(fp)}, {prod(kord)}))" if pidx[1:] == fp + kord
                    else f"{psel}.reshape(({prod(kord)}, {prod(fp)})).T")
            lines += [f"# GEMM summed over {sum_over}: {tmp}[{', '.join(map(str, fp + rest))}] = "
                      f"Σ_{','.join(map(str, [sum_over] + kord))} {ptxt} * {col}[{', '.join(map(str, cvars))}]",
                      f"{tmp}_flat = np.zeros(({prod(fp)}, {prod(rest)}), dtype=DT)"]
            lines += head
            lines.append(IND + f"{tmp}_flat += " + matmul(pmat, f"{col}[{at}].reshape(({prod(rest)}, {prod(kord)})).T"))
            order = fp + rest
        lines.append(f"{tmp} = {tmp}_flat.reshape(({', '.join(pe(size[v]) for v in order)},))")
        return lines, tuple(order)

    # -- scatter forms: an adjoint that adds each term at one computed position ------------------
    def match_argmax_scatter(self, s, loop_vars, shape):
        """``Σ_k [point = argmax_j M(k, j)] · v(k)`` (max pooling's adjoint in gather form, in which
        every output element would search the argmax of each window covering it) -> a scatter plan,
        or None. Each coordinate of the point must be ``ℓ + r``: a distinct output index ℓ with
        coefficient 1 and a rest ``r`` free of the solved indices, so that the bracket holds at the
        one element ``ℓ = argmax - r``; the scatter then searches each window's argmax once (the
        same loop and tie rule as the gather form) and adds its term there."""
        if not isinstance(s, sp.Sum):
            return None
        brackets = [f for f in sp.Mul.make_args(s.function) if isinstance(f, IsArgmax)]
        if len(brackets) != 1:
            return None
        m, *point = brackets[0].args
        first_lo = sp.sympify(m.limits[0][1])
        if not (first_lo.is_Integer and first_lo >= 0):
            return None                          # -1 marks "no argmax" (see argmax_scatter_code)
        value = sp.Mul(*[f for f in sp.Mul.make_args(s.function) if f is not brackets[0]])
        solved, marks = {}, []            # output index -> its position in terms of the argmax
        for k, e in enumerate(point):
            e = sp.expand(e)
            outs = [v for v in loop_vars if v in e.free_symbols]
            if len(outs) != 1 or outs[0] in solved or sp.diff(e, outs[0]) != 1:
                return None
            marks.append(sp.Symbol(f"_argmax{k}", integer=True))
            solved[outs[0]] = marks[k] - (e - outs[0])
        if any(r.free_symbols & set(solved) for r in solved.values()) or m.free_symbols & set(solved) \
                or value.has(IsArgmax, *REDUCTIONS):
            return None
        domains = {mk: (lo, hi) for mk, (_, lo, hi) in zip(marks, m.limits)}
        loops, guards = [], []
        for v in loop_vars:
            if v not in solved:
                loops.append((v, 0, shape[loop_vars.index(v)] - 1))
        for v, lo, hi in s.limits:        # each summation index over the hull of its limits
            lo, hi = _rounded(lo, up=True), _rounded(hi, up=False)
            dep = (lo.free_symbols | hi.free_symbols) - set(self.sizes) - {BATCH}
            if not dep <= set(solved):
                return None
            hull = self.limit_hull(lo, hi, dep, loop_vars, shape)
            if hull is None:
                return None
            loops.append((v, *hull))
            if dep:                       # the limits at the position the bracket selects
                guards += [lo.xreplace(solved) <= v, v <= hi.xreplace(solved)]
        for v, at in solved.items():      # the selected position inside the output
            guards += [0 <= at, at <= shape[loop_vars.index(v)] - 1]
        if any(g in (sp.false, False) for g in guards):
            return None
        domains.update({v: (lo, hi) for v, lo, hi in loops})
        guards = [g for g in guards if not _holds_everywhere(g, domains)]
        return dict(m=m, value=value, solved=solved, marks=marks, loops=loops, guards=guards)

    def limit_hull(self, lo, hi, dep, loop_vars, shape):
        """(min lo, max hi) over every value of the output indices ``dep`` the limits depend on."""
        if not dep:
            return (lo, hi)
        dep = sorted(dep, key=str)
        extents = [shape[loop_vars.index(d)] for d in dep]
        if not all(sp.sympify(e).is_Integer for e in extents) or math.prod(int(e) for e in extents) > 100_000:
            return None
        f = sp.lambdify(dep, [lo, hi], modules="math")
        values = [f(*pt) for pt in itertools.product(*[range(int(e)) for e in extents])]
        return (min(v[0] for v in values), max(v[1] for v in values))

    def argmax_scatter_code(self, plan, tmp, loop_vars, shape) -> list[str]:
        """The lines of an argmax scatter (see ``match_argmax_scatter``) into a zeroed ``tmp``."""
        header = [f"for {self.names[v]} in {self.range_code(lo, hi)}:" for v, lo, hi in plan["loops"]]
        order = [v for v, _, _ in plan["loops"]]
        blocks = [_Block(set(order[:d]) | self.outer_bound) for d in range(len(order) + 1)]
        where = self.recorded_argmax(plan["m"], blocks) or self.emit_argmax(plan["m"], blocks)
        found = {}
        for mk, w in zip(plan["marks"], where):
            found[mk] = sp.Symbol(w, integer=True)
            self.names[found[mk]] = w
        at = {v: e.xreplace(found) for v, e in plan["solved"].items()}
        value = self.emit_expr(plan["value"].xreplace(at), blocks)
        index = ", ".join(self.pe(at[v]) if v in at else self.names[v] for v in loop_vars)
        stmt = [f"{tmp}[{index}] += {value}"]
        # a window of NaN or -inf values has no argmax (its position stays -1): nothing is added,
        # as in the gather form, where no point equals it
        cond = " and ".join([f"{where[0]} >= 0"] + [f"{self.pe(g.lhs)} {g.rel_op} {self.pe(g.rhs)}" for g in
                                                    (g.xreplace(found) for g in plan["guards"])])
        stmt = [f"if {cond}:", IND + stmt[0]]
        nested = [f"# the bracket holds at one element: {comment_text(', '.join(f'{v} = {self.pe(e)}' for v, e in at.items()))}"] + stmt
        for d in range(len(order), 0, -1):
            nested = [header[d - 1]] + [IND + ln for ln in blocks[d].lines + nested]
        return ([f"# scatter: each window's argmax found once, its term added where the bracket selects",
                 f"{tmp} = np.zeros(({', '.join(self.pe(d) for d in shape)},), dtype=DT)"]
                + blocks[0].lines + nested)

    def match_shift_scatter(self, s, loop_vars, shape):
        """``Σ_{C, S} K[.., ℓ + r(S), ..] · D[β.., C.., S..]`` whose limits move with the output
        indices (a convolution's input gradient: the full correlation ``Σ W[f, c, h - h', w - w']
        δ[b, f, h', w']``, whose gather GEMM would compute a zero-padded buffer) -> a scatter plan,
        or None. Each read index of K that is not a plain index is ``ℓ + r`` with an output index ℓ
        (coefficient 1) read nowhere else; naming it ``p`` (an index over K's axis) solves
        ``ℓ = p - r``, after which both reads are plain: a contraction over the indices C they share
        (one GEMM per element of D's leading output indices β, which K does not read), whose
        products are then added at ``out[.., p - r, ..]`` (col2im)."""
        if not isinstance(s, sp.Sum):
            return None
        ks = [v for v, _, _ in s.limits]
        lv = set(loop_vars)
        if not any((sp.sympify(lo).free_symbols | sp.sympify(hi).free_symbols) & lv for _, lo, hi in s.limits):
            return None                          # fixed limits: the gather GEMM wastes nothing
        split = _two_reads(s.function)
        if split is None or not all(str(t.base.label) in self.tensors for t in split[1]):
            return None
        coeff, factors = split
        for K, D in (factors, factors[::-1]):
            plan = self._shift_scatter_plan(s, K, D, ks, loop_vars, shape)
            if plan is not None:
                plan["coeff"] = coeff
                return plan
        return None

    def _shift_scatter_plan(self, s, K, D, ks, loop_vars, shape):
        didx = list(D.indices)
        if not all(isinstance(i, sp.Symbol) for i in didx) or len(set(didx)) != len(didx) \
                or not set(ks) <= set(didx):
            return None
        kshape = self.concrete_shape(self.tensors[str(K.base.label)])
        kidx, solved, marks = [], {}, []
        for axis, e in enumerate(K.indices):
            e = sp.expand(e)
            if isinstance(e, sp.Symbol):
                kidx.append(e)
                continue
            outs = [v for v in loop_vars if v in e.free_symbols]
            rest = e - outs[0] if len(outs) == 1 else None
            if rest is None or outs[0] in solved or sp.diff(e, outs[0]) != 1 or not _affine(rest, ks) \
                    or not rest.free_symbols <= set(ks) | set(self.sizes):
                return None
            mark = sp.Symbol(f"_k{len(marks)}", integer=True)
            marks.append((mark, kshape[axis]))
            kidx.append(mark)
            solved[outs[0]] = mark - rest
        if not solved or len(set(kidx)) != len(kidx) or set(solved) & (set(didx) | set(kidx)):
            return None
        if not set(loop_vars) <= set(solved) | set(didx) | set(kidx):
            return None
        contracted = [v for v in didx if v in ks and v in kidx]
        if not contracted or not set(ks) <= set(contracted) | set().union(*[r.free_symbols for r in solved.values()]):
            return None
        if any(v in kidx and v not in didx for v in ks):
            return None
        batch = []
        for v in didx:                           # D's leading output indices that K does not read
            if v in ks or v in kidx:
                break
            batch.append(v)
        dfree = [v for v in didx if v not in contracted and v not in batch]
        kfree = [v for v in kidx if v not in contracted]
        size = {}
        for t, idx in ((D, didx), (K, kidx)):
            for v, n in zip(idx, self.concrete_shape(self.tensors[str(t.base.label)])):
                size.setdefault(v, n)
        limits = {v: (_rounded(lo, up=True), _rounded(hi, up=False)) for v, lo, hi in s.limits}
        guards = []
        for v in contracted:
            lo, hi = limits[v]
            if not vanishes(lo) or not vanishes(hi - (size[v] - 1)):
                return None                      # a contraction over part of an axis
        for v, (lo, hi) in limits.items():
            if v not in contracted:
                guards += [lo.xreplace(solved) <= v, v <= hi.xreplace(solved)]
        for v, at in solved.items():
            guards += [0 <= at, at <= shape[loop_vars.index(v)] - 1]
        if any(g in (sp.false, False) for g in guards):
            return None
        domains = {v: (0, size[v] - 1) for v in size}
        domains.update({v: (0, shape[loop_vars.index(v)] - 1) for v in loop_vars if v not in solved})
        domains.update({mk: (0, n - 1) for mk, n in marks})
        guards = [g for g in guards if not _holds_everywhere(g, domains)]
        return dict(K=K, D=D, kidx=kidx, didx=didx, batch=batch, contracted=contracted, kfree=kfree,
                    dfree=dfree, size=size, solved=solved, guards=guards)

    def shift_scatter_code(self, plan, tmp, loop_vars, shape) -> list[str]:
        """The lines of a shift scatter (see ``match_shift_scatter``): per element of the batch
        indices β one ``_matmul`` into ``tmp_cols[K's free.., D's free..]``, then the col2im loop
        adding each product at the output element its solved indices select."""
        pe, size = self.pe, plan["size"]
        K, D, kidx, didx = plan["K"], plan["D"], plan["kidx"], plan["didx"]
        batch, con, kfree, dfree = plan["batch"], plan["contracted"], plan["kfree"], plan["dfree"]
        names = dict(self.names)
        for v in kidx + didx:
            if v not in names:
                names[v] = self.fresh("k")
        prod = lambda vs: " * ".join(f"({pe(size[v])})" for v in vs) or "1"
        col = tmp + "_cols"
        sym = {v: sp.Symbol(names[v], integer=True) for v in kidx + didx}
        kread = K.base[tuple(sym[v] for v in kidx)]
        lines = [f"# scatter form: {col}[{', '.join(names[v] for v in batch + kfree + dfree)}] = "
                 f"Σ_{','.join(names[v] for v in con)} {comment_text(sp.sstr(kread))} * {comment_text(sp.sstr(D))}, "
                 f"added at {comment_text(', '.join(f'{v} = {e.xreplace(sym)}' for v, e in plan['solved'].items()))}"]
        kname, dname = self.ident(str(K.base.label)), self.ident(str(D.base.label))
        kmat = self._as_matrix(kname, kidx, kfree, con, f"{tmp}_k", lines, prod)
        rest = didx[len(batch):]
        dbase, dorder = dname, rest
        if rest not in (con + dfree, dfree + con):
            perm = ", ".join(str(didx.index(v)) for v in batch + con + dfree)
            lines.append(f"{tmp}_d = np.ascontiguousarray({dname}.transpose(({perm},)))")
            dbase, dorder = f"{tmp}_d", con + dfree
        at = ", ".join(names[v] for v in batch)
        dsel = f"{dbase}[{at}]" if batch else dbase
        dmat = (f"{dsel}.reshape(({prod(con)}, {prod(dfree)}))" if dorder == con + dfree
                else f"{dsel}.reshape(({prod(dfree)}, {prod(con)})).T")
        nm = lambda vs: ", ".join(names[v] for v in vs)
        if batch:
            # one batch element's products at a time, added into the output right after its GEMM
            # while they are still in cache (the whole batch's products were 6.5 MB for the 28x28
            # CNN, written and read back once each)
            return lines + self._shift_scatter_per_batch(plan, tmp, loop_vars, shape, names, sym, kmat, dmat, col)
        lines.append(f"{col} = np.empty(({prod(kfree)}, {prod(dfree)}), dtype=DT)")
        lines.append(f"# GEMM: ({nm(kfree)}) x ({nm(con)}) times ({nm(con)}) x ({nm(dfree)})")
        lines.append(matmul(kmat, dmat, col))
        order = kfree + dfree
        lines.append(f"{col}_v = {col}.reshape(({', '.join(pe(size[v]) for v in order)},))")
        lines.append(f"# col2im: add each product at the output element it belongs to")
        lines.append(f"{tmp} = np.zeros(({', '.join(pe(d) for d in shape)},), dtype=DT)")
        for v in order:
            self.names.setdefault(sym[v], names[v])
        for depth, v in enumerate(order):
            lines.append(IND * depth + f"for {names[v]} in range({pe(size[v])}):")
        lines += [IND * len(order) + ln
                  for ln in self._col2im_statement(plan, tmp, loop_vars, names, sym, f"{col}_v", order)]
        return lines

    def _col2im_statement(self, plan, tmp, loop_vars, names, sym, col_view, order) -> list[str]:
        """``tmp[solved position] += product`` (times the coefficient), under the guards that remain."""
        target = [self.pe(plan["solved"][v].xreplace(sym)) if v in plan["solved"] else names[v] for v in loop_vars]
        value = f"{col_view}[{', '.join(names[v] for v in order)}]"
        if plan["coeff"] != 1:
            value = f"{self.pv(plan['coeff'])} * {value}"
        stmt = [f"{tmp}[{', '.join(target)}] += {value}"]
        if plan["guards"]:
            cond = " and ".join(f"{self.pe(g.lhs)} {g.rel_op} {self.pe(g.rhs)}"
                                for g in (g.xreplace(sym) for g in plan["guards"]))
            stmt = [f"# inside the output and the summation limits", f"if {cond}:", IND + stmt[-1]]
        return stmt

    def _shift_scatter_per_batch(self, plan, tmp, loop_vars, shape, names, sym, kmat, dmat, col) -> list[str]:
        """The shift scatter's GEMM and col2im, one element of the batch indices at a time: a product
        buffer of one element, reused, added into ``tmp`` right after its GEMM."""
        pe, size = self.pe, plan["size"]
        batch, con, kfree, dfree = plan["batch"], plan["contracted"], plan["kfree"], plan["dfree"]
        prod = lambda vs: " * ".join(f"({pe(size[v])})" for v in vs) or "1"
        nm = lambda vs: ", ".join(names[v] for v in vs)
        order = kfree + dfree
        for v in batch + order:
            self.names.setdefault(sym[v], names[v])
        lines = [f"{col} = np.empty(({prod(kfree)}, {prod(dfree)}), dtype=DT)  # one {nm(batch)}'s products",
                 f"{col}_v = {col}.reshape(({', '.join(pe(size[v]) for v in order)},))",
                 f"{tmp} = np.zeros(({', '.join(pe(d) for d in shape)},), dtype=DT)",
                 f"# GEMM per {nm(batch)}: ({nm(kfree)}) x ({nm(con)}) times ({nm(con)}) x ({nm(dfree)}), "
                 f"each followed by its col2im"]
        for depth, v in enumerate(batch):
            lines.append(IND * depth + f"for {names[v]} in range({pe(size[v])}):")
        inner = [matmul(kmat, dmat, col),
                 "# col2im: add each product at the output element it belongs to"]
        for depth, v in enumerate(order):
            inner.append(IND * depth + f"for {names[v]} in range({pe(size[v])}):")
        inner += [IND * len(order) + ln
                  for ln in self._col2im_statement(plan, tmp, loop_vars, names, sym, f"{col}_v", order)]
        return lines + [IND * len(batch) + ln for ln in inner]

    # -- max pooling: the training forward records each window's argmax for the backward -------
    def argmax_record_key(self, body, loop_vars):
        """The key under which the training forward records the argmax of ``body``, when ``body``
        is a whole max over a window (max pooling: ``m[b, c, h, w] = max_{p,q} a[b, c, 2h + p,
        2w + q]``) with constant limits from 0, lowered inside one function with a backward pass
        after it (``shared_cols`` open); else None. The key is the max with its window indices
        and the output's indices renamed by position, so that the adjoint's bracket
        ``[point = argmax_{p,q} a[b, f, 2h' + p, 2w' + q]]`` finds it whatever its index names."""
        if self.shared_cols is None or self.outer_bound or not isinstance(body, MaxOver):
            return None
        if not all(sp.sympify(lo) == 0 and sp.sympify(hi).is_Integer for _, lo, hi in body.limits):
            return None
        if not set(loop_vars) <= body.free_symbols:
            return None
        return self._max_key(body, loop_vars)

    @staticmethod
    def _max_key(m, free_order):
        rename = {v: sp.Symbol(f"·w{k}", integer=True) for k, (v, _, _) in enumerate(m.limits)}
        rename.update({v: sp.Symbol(f"·o{k}", integer=True) for k, v in enumerate(free_order)})
        return ("argmax", sp.srepr(m.xreplace(rename)))

    def argmax_record_kernel(self, info) -> Kernel:
        """``out = max over a window`` (see ``argmax_record_key``), computed with the argmax
        search of the adjoint's bracket (the same loop and strict ``>``: the tie rule), which also
        writes each window's argmax, as one flat position in the window (-1: none, a window of NaN
        or -inf), into an integer array: the backward pass reads it instead of searching again."""
        body, loop_vars, shape = info["body"], info["loop_vars"], info["shape"]
        sizes = [int(hi) + 1 for _, _, hi in body.limits]
        record = self.fresh("argmax")
        itype = "np.int8" if math.prod(sizes) <= 127 else "np.int32"
        out = self.ident(info["out"])
        lines = [f"# {info['text']}",
                 f"# with the position of each maximum, recorded for the backward pass: {record}[...] = "
                 f"the flat index in the window ({' x '.join(map(str, sizes))}) of the first largest value, -1 if none",
                 f"{out} = np.empty({self.shape_code(self.tensors[info['out']])}, dtype=DT)",
                 f"{record} = np.empty({self.shape_code(self.tensors[info['out']])}, dtype={itype})"]
        blocks = [_Block(set(loop_vars[:d]) | self.outer_bound) for d in range(len(loop_vars) + 1)]
        where = self.emit_argmax(body, blocks)
        value = blocks[-1].cache["max" + "argmax" + sp.srepr(body)]
        flat = " + ".join(f"{w} * {math.prod(sizes[k + 1:])}" if k < len(where) - 1 else w
                          for k, w in enumerate(where))
        at = ", ".join(str(v) for v in loop_vars)
        stmts = [f"{out}[{at}] = {value}", f"{record}[{at}] = {flat} if {where[0]} >= 0 else -1"]
        nested = stmts
        for d in range(len(loop_vars), 0, -1):
            nested = [f"for {loop_vars[d - 1]} in range({self.pe(shape[d - 1])}):"] + \
                [IND + ln for ln in blocks[d].lines + nested]
        self.shared_cols[self._max_key(body, loop_vars)] = (record, sizes)
        return Kernel("loop", [info["text"]], [info["out"]], lines + blocks[0].lines + nested)

    def recorded_argmax(self, m, blocks):
        """The argmax of ``m`` read from the training forward's record (``argmax_record_kernel``),
        as the window position's variables, emitted where ``m``'s indices are bound; None when the
        forward recorded no such max (then the scatter searches each window itself)."""
        if self.shared_cols is None or self.outer_bound:
            return None
        free = [s for s in sorted(m.free_symbols, key=str)
                if s.is_integer and s not in self.sizes and s != BATCH]
        for order in itertools.permutations(free):
            found = self.shared_cols.get(self._max_key(m, order))
            if found is not None:
                break
        else:
            return None
        record, sizes = found
        target = next(b for b in blocks if set(free) <= b.bound)
        flat = self.fresh("amax")
        where = [f"{flat}_{k}" for k in range(len(sizes))]
        lines = [f"# the argmax of each window, recorded by the forward pass: {record}",
                 f"{flat} = {record}[{', '.join(self.names[v] for v in order)}]"]
        for k, w in enumerate(where):      # -1 (no argmax) stays negative in the first coordinate
            stride = math.prod(sizes[k + 1:])
            whole = f"{flat} // {stride}" if stride > 1 else flat
            lines.append(f"{w} = {whole}" if k == 0 else f"{w} = ({whole}) % {sizes[k]}")
        target.lines.extend(lines)
        return where

    # -- lowering one equation ----------------------------------------------------------------
    @staticmethod
    def _scattered(body, s, tmp, code, reads, info, loop_vars):
        """``body`` with the sum ``s`` read from the scatter ``tmp`` (computed by ``code``, which
        reads the tensors ``reads``) at the output's own indices."""
        info["pre"].append((code, reads[0], reads[-1]))
        info["dot_reads"] |= set(reads)
        info.setdefault("whole_dots", []).append(tmp)
        return body.xreplace({s: sp.IndexedBase(tmp)[loop_vars]})

    def classify(self, eq):
        body, loop_vars = self.prepare(eq)
        info = {"eq": eq, "text": pretty(eq), "out": eq.out.name, "loop_vars": loop_vars,
                "shape": self.concrete_shape(eq.out), "pre": [], "dot_reads": set()}
        # a softmax over the last output index: its own fused row loops
        sm = self.match_softmax(body, loop_vars, info["shape"]) if eq.out.rank > 0 else None
        if sm is not None:
            info.update(kind="softmax", plan=sm, body=body)
            if sm["guarded"]:
                self.zero_outside[eq.out.name] = (len(loop_vars) - 1, sm["lo"], sm["hi"])
            return info
        body = self.skip_known_zeros(body, loop_vars, info)
        # the whole body a contraction: out = _matmul(...)
        m = self.match_dot(body, loop_vars) if eq.out.rank > 0 else None
        if m is not None and m[3] == 1:
            code, order = self.dot_code(m[0], m[1], m[2], loop_vars)
            if order == loop_vars:
                info.update(kind="dot", code=code, into=self.dot_into(m, loop_vars, eq.out.name),
                            dot_reads={str(m[0].base.label), str(m[1].base.label)})
                return info
        # a scaled product into an existing matrix (a slice of a slice loop: attention's Q Kᵀ / √E):
        # _matmul into it, then scaled in place (no temporary). (BLAS's own alpha, through an intrinsic
        # calling ?gemm, measured level with this: the slice is in cache; benchmarks/README.md)
        c = _coefficient(body)
        m = self.match_dot(body / c, loop_vars) if eq.out.name in self.preallocated and eq.out.rank == 2 \
            and c != 1 else None
        if m is not None and m[3] == 1:
            code, order = self.dot_code(m[0], m[1], m[2], loop_vars)
            if order == loop_vars:
                info.update(kind="dot", code=code, scale=self.pv(c),
                            into=self.dot_into(m, loop_vars, eq.out.name),
                            dot_reads={str(m[0].base.label), str(m[1].base.label)})
                return info
        # the whole body a batched contraction (per batch element and head): one _matmul each
        bm = self.match_batched(body / _coefficient(body), loop_vars) if eq.out.rank > 0 else None
        if bm is not None:
            bm["coeff"] = bm["coeff"] * _coefficient(body)
            if tuple(bm["batch"] + bm["fa"] + bm["fb"]) == loop_vars:
                info.update(kind="batched", plan=bm, dot_reads={str(bm["A"].base.label), str(bm["B"].base.label)})
                return info
        # extract contractions into _matmul temporaries
        if eq.out.rank > 0:
            body = self.materialise_operands(body, loop_vars, info)
            for s in sorted(body.atoms(sp.Sum), key=sp.default_sort_key):
                sc = self.match_argmax_scatter(s, loop_vars, info["shape"])
                if sc is not None:
                    tmp = self.fresh("scatter")
                    self.names[tmp] = tmp
                    gate = _step_gate(body, s)
                    if gate is not None:             # δ routed to the argmax, times ReLU' there
                        sc["value"] = sc["value"] * gate
                        body = s
                    code = self.argmax_scatter_code(sc, tmp, loop_vars, info["shape"])
                    reads = sorted({str(x.base.label) for x in s.atoms(sp.Indexed)})
                    body = self._scattered(body, s, tmp, code, reads, info, loop_vars)
                    continue
                sh = self.match_shift_scatter(s, loop_vars, info["shape"])
                if sh is not None:
                    tmp = self.fresh("scatter")
                    self.names[tmp] = tmp
                    code = self.shift_scatter_code(sh, tmp, loop_vars, info["shape"])
                    body = self._scattered(body, s, tmp, code, [str(sh["K"].base.label), str(sh["D"].base.label)],
                                           info, loop_vars)
                    continue
                m = self.match_dot(s, loop_vars)
                bm = self.match_batched(s, loop_vars) if m is None else None
                if bm is not None:
                    tmp = self.fresh("bmm")
                    self.names[tmp] = tmp
                    code, order = self.batched_code(bm, tmp)
                    body = body.xreplace({s: bm["coeff"] * sp.IndexedBase(tmp)[order]})
                    a, b_ = str(bm["A"].base.label), str(bm["B"].base.label)
                    info["pre"].append(([f"# batched contraction: {comment_text(sp.sstr(s))}"] + code, a, b_))
                    info["dot_reads"] |= {a, b_}
                    continue
                if m is None:
                    g = self.match_gemm(s, loop_vars, info["shape"])
                    if g is None:
                        continue
                    tmp = self.fresh("gemm")
                    self.names[tmp] = tmp
                    # an operand read in place needs no gather: one GEMM over all of it beats a
                    # product per batch element; a gathered one (a convolution's window) goes per element
                    in_place = self.operand_as_matrix(g) is not None
                    # a gather that only reorders axes (no window, no guard) is one transposing
                    # copy: then one GEMM over everything beats a product per batch element too
                    reorder = all(isinstance(i, sp.Symbol) for i in g["G"].indices) and not g["guards"]
                    code, order = ((not in_place and not reorder and self.gemm_batched_code(g, tmp, loop_vars))
                                   or self.gemm_code(g, tmp, loop_vars))
                    body = body.xreplace({s: g["coeff"] * sp.IndexedBase(tmp)[order]})
                    a, b = str(g["P"].base.label), str(g["G"].base.label)
                    info["pre"].append((code, a, b))
                    info["dot_reads"] |= {a, b}
                    if order == loop_vars:          # the output can be written in place
                        info.setdefault("whole_dots", []).append(tmp)
                    continue
                A, Bm, k, coeff = m
                code, order = self.dot_code(A, Bm, k, loop_vars)
                tmp = self.fresh("dot")
                base = sp.IndexedBase(tmp)
                self.names[tmp] = tmp
                read = base[order] if order else sp.Symbol(tmp, real=True)
                if not order:
                    self.names[sp.Symbol(tmp, real=True)] = tmp
                body = body.xreplace({s: coeff * read})
                info["pre"].append((f"{tmp} = {code}", str(A.base.label), str(Bm.base.label)))
                info["dot_reads"] |= {str(A.base.label), str(Bm.base.label)}
                if order == loop_vars:          # a fresh array of the output's shape
                    info.setdefault("whole_dots", []).append(tmp)
        info["body"] = body
        if eq.out.rank == 0:
            info["kind"] = "scalar"
            return info
        if self.argmax_record_key(body, loop_vars) is not None:
            info["kind"] = "argmax"
            return info
        if (isinstance(body, sp.Sum) and not any(isinstance(a, REDUCTIONS) for a in
                                                  sp.preorder_traversal(body.function))
                and not any(set(loop_vars) & (lo.free_symbols | hi.free_symbols)
                            for _, lo, hi in body.limits)
                and not info["pre"]):
            info["kind"] = "accumulate"
            return info
        info["kind"] = "loop"
        return info

    # -- reductions ---------------------------------------------------------------------------
    def emit_expr(self, expr, blocks: list[_Block]) -> str:
        """Print ``expr``; each reduction in it is emitted as an accumulator loop in the shallowest
        block of ``blocks`` where its free indices are bound, and replaced by the accumulator."""
        args = []

        def find(e):                   # indicators outside every reduction (inner ones: recursively)
            if isinstance(e, IsArgmax):
                args.append(e)
            elif not isinstance(e, REDUCTIONS) and not isinstance(e, sp.Indexed):
                for a in e.args:
                    find(a)
        find(expr)
        if args:        # the indicator of the argmax: compare the point with the argmax loop's result
            repl = {}
            for a in args:
                m, *point = a.args
                where = self.emit_argmax(m, blocks)
                syms = [sp.Symbol(w, integer=True) for w in where]
                for sym in syms:
                    self.names[sym] = str(sym)
                repl[a] = sp.Piecewise((1, sp.And(*[sp.Eq(sym, pt) for sym, pt in zip(syms, point)])), (0, True))
            expr = expr.xreplace(repl)
        repl = {}
        for r in outermost_reductions(expr):
            repl[r] = sp.Symbol(self.emit_reduction(r, blocks), real=True)
            self.names[repl[r]] = str(repl[r])
        return self.pv(expr.xreplace(repl))

    @staticmethod
    def loop_order(r):
        """The limits of a reduction, innermost first: where no limit depends on another index of the
        same reduction (a sum, not a max: the tie rule fixes a max's order), the index that the reads
        use in their last axes goes innermost, so that the innermost loop walks contiguous memory."""
        limits = list(r.limits)
        vars_ = {v for v, _, _ in limits}
        if isinstance(r, MaxOver) or any((lo.free_symbols | hi.free_symbols) & vars_ for _, lo, hi in limits):
            return limits
        reads = list(r.function.atoms(sp.Indexed))

        def depth(v):           # larger = nearer the last axis in the reads that use v
            best = -100
            for x in reads:
                for pos, e in enumerate(x.indices):
                    if v in sp.sympify(e).free_symbols:
                        best = max(best, pos - len(x.indices))
            return best
        return sorted(limits, key=lambda lim: -depth(lim[0]))

    def emit_argmax(self, m, blocks: list[_Block]) -> list[str]:
        """The first position of the maximum of ``m`` (a MaxOver): loops in the order of its limits
        (first outermost) with a strict ``>``, which is the tie rule stated by ``MaxOver``."""
        free = {s for s in m.free_symbols if s.is_integer and s not in self.sizes and s != BATCH}
        target = next((b for b in blocks if free <= b.bound), None)
        if target is None:
            raise UnsupportedError(f"codegen: maximum {m} uses unbound indices {free}")
        key = "argmax" + sp.srepr(m)
        if key in target.cache:
            return target.cache[key]
        depth = blocks.index(target)
        acc = self.fresh("amax")
        where = [f"{acc}_{k}" for k in range(len(m.limits))]
        inner_blocks, bound, headers = list(blocks[:depth + 1]), set(target.bound), []
        for v, lo, hi in m.limits:
            bound = bound | {v}
            headers.append(f"for {self.names[v]} in {self.range_code(lo, hi)}:")
            inner_blocks.append(_Block(bound))
        value = self.emit_expr(m.function, inner_blocks)
        # selects, not a branch: on real data "is this one larger" is a coin toss that the
        # branch predictor loses (the same strict > either way: the tie rule)
        update = [f"{acc}_v = {value}", f"{acc}_up = {acc}_v > {acc}", f"{acc} = {acc}_v if {acc}_up else {acc}"]
        update += [f"{w} = {self.names[v]} if {acc}_up else {w}" for w, (v, _, _) in zip(where, m.limits)]
        nested: list[str] = []
        for k in range(len(headers) - 1, -1, -1):
            blk = inner_blocks[depth + 1 + k]
            inner = blk.lines + (update if k == len(headers) - 1 else []) + nested
            nested = [headers[k]] + [IND + ln for ln in inner]
        target.lines.extend([f"{acc} = -np.inf"] + [f"{w} = -1" for w in where] + nested)
        target.cache[key] = where
        target.cache["max" + key] = acc             # the maximum itself (argmax_record_kernel)
        return where

    def emit_reduction(self, r, blocks: list[_Block]) -> str:
        free = {s for s in r.free_symbols if s.is_integer and s not in self.sizes and s != BATCH}
        target = next((b for b in blocks if free <= b.bound), None)
        if target is None:
            raise UnsupportedError(f"codegen: reduction {r} uses unbound indices {free}")
        key = sp.srepr(r)
        if key in target.cache:
            return target.cache[key]
        depth = blocks.index(target)
        acc = self.fresh("acc")
        # nested loops over the limits (Sum(f, (i, ..), (j, ..)): i innermost)
        inner_blocks = list(blocks[:depth + 1])
        bound = set(target.bound)
        headers = []
        for v, lo, hi in reversed(self.loop_order(r)):
            bound = bound | {v}
            headers.append(f"for {self.names[v]} in {self.range_code(lo, hi)}:")
            inner_blocks.append(_Block(bound))
        body_block = inner_blocks[-1]
        value = self.emit_expr(r.function, inner_blocks)
        if isinstance(r, LogSumExp) and not any(b.lines for b in inner_blocks[depth + 1:]):
            lines = self.two_pass_logsumexp(acc, value, headers)
            target.lines.extend(lines)
            target.cache[key] = acc
            return acc
        lines = []
        if isinstance(r, LogSumExp):
            mx, sm = acc + "_max", acc + "_sum"
            lines += [f"{mx} = -np.inf", f"{sm} = 0.0"]
            v = acc + "_v"
            update = [f"{v} = {value}",       # one pass, max-shifted: never exp of a large number
                      f"if {v} > {mx}:",
                      f"{IND}{sm} = {sm} * _exp({mx} - {v}) + 1.0",
                      f"{IND}{mx} = {v}",
                      "else:",
                      f"{IND}{sm} += _exp({v} - {mx})"]
        elif isinstance(r, MaxOver):
            lines.append(f"{acc} = -np.inf")
            update = [f"{acc}_v = {value}", f"if {acc}_v > {acc}:", f"{IND}{acc} = {acc}_v"]
        else:
            # in the module's dtype, as the log-sum-exp above: a float32 module sums in float32 (as
            # PyTorch does), which LLVM vectorises 8 lanes wide; a float64 accumulator converted
            # every term (a layer norm's row means: 0.039 -> 0.021 ms at 1024 rows of 64)
            lines.append(f"{acc} = {'DT(0)' if self.value_cast else '0.0'}")
            update = [f"{acc} += {value}"]
        # the pre-lines of each intermediate block go inside the matching loop
        nested: list[str] = []
        for depth_k in range(len(headers) - 1, -1, -1):
            blk = inner_blocks[depth + 1 + depth_k]
            inner = blk.lines + (update if depth_k == len(headers) - 1 else []) + nested
            nested = [headers[depth_k]] + [IND + ln for ln in inner]
        lines += nested
        if isinstance(r, LogSumExp):
            lines.append(f"{acc} = {mx} + math.log({sm})")
        del body_block
        target.lines.extend(lines)
        target.cache[key] = acc
        return acc

    def two_pass_logsumexp(self, acc, value, headers) -> list[str]:
        """A log-sum-exp whose terms are cheap to compute twice (no reduction inside them): the
        maximum first, then the sum of ``exp(term - max)``. Each pass is a plain reduction, which LLVM
        vectorises (``_exp`` is arithmetic); the one-pass form rescales its sum whenever a larger
        term comes along, a branch around an ``exp`` at every term, which it does not. The
        accumulators are in the module's dtype (as PyTorch's float32 ``logsumexp``)."""
        mx, sm = acc + "_max", acc + "_sum"

        def loops(body):
            nested = body
            for h in reversed(headers):
                nested = [h] + [IND + ln for ln in nested]
            return nested
        return ([f"# log-sum-exp in two passes: the largest term, then Σ exp(term - largest)",
                 f"{mx} = {self.pv(sp.S.NegativeInfinity)}"]
                + loops([f"{acc}_v = {value}", f"{mx} = {acc}_v if {acc}_v > {mx} else {mx}"])
                + [f"{sm} = {self.pv(sp.S.Zero)}"]
                + loops([f"{sm} += _exp({value} - {mx})"])
                # (a +inf term: the sum is NaN, the log-sum-exp +inf)
                + [f"{acc} = {mx} + math.log({sm}) if {mx} < np.inf else {mx}"])

    # -- softmax: exp(f(u) - LSE_v f(v)), normalised in place -------------------------------------
    def match_softmax(self, body, loop_vars, shape):
        """``out[.., u] = [u ∈ R] · exp(f(u) - LSE_{v ∈ R} f(v))`` over the last output index ``u``
        (a softmax; the causal attention weights, whose bracket restricts both the point and the
        normaliser to the same range ``R``), or without a bracket when ``R`` is u's whole axis ->
        a plan, or None. ``softmax_kernel`` then computes each ``exp`` once and skips the points
        outside ``R`` (zeros, written without computing anything)."""
        if not loop_vars:
            return None
        u, n = loop_vars[-1], shape[-1]
        guard = None
        if isinstance(body, sp.Piecewise) and len(body.args) == 2 and body.args[1].cond == sp.true \
                and body.args[1].expr == 0:
            body, guard = body.args[0].expr, body.args[0].cond
        if not isinstance(body, sp.exp):
            return None
        terms = sp.Add.make_args(body.args[0])
        lses = [t for t in terms if isinstance(-t, LogSumExp)]
        if len(lses) != 1 or len((-lses[0]).limits) != 1:
            return None
        L = -lses[0]
        v, lo, hi = L.limits[0]
        f = L.function
        if f.has(*REDUCTIONS, IsArgmax) or u in f.free_symbols or \
                u in (sp.sympify(lo).free_symbols | sp.sympify(hi).free_symbols):
            return None
        if sp.expand(sp.Add(*[t for t in terms if t is not lses[0]]) - f.xreplace({v: u})) != 0:
            return None
        inside = sp.And(lo <= u, u <= hi)
        if guard is None:
            if not vanishes(lo) or not vanishes(hi - (n - 1)):
                return None
        elif not self._same_predicate(guard, inside, loop_vars, shape):
            return None
        return dict(f=f, v=v, lo=lo, hi=hi, guarded=guard is not None)

    def _support_of(self, read):
        """(axis, lo, hi) of a read of a tensor known to be zero outside [lo, hi] on that axis, the
        bounds written in the read's own indices; None for any other read."""
        if not isinstance(read, sp.Indexed) or str(read.base.label) not in self.zero_outside:
            return None
        axis, lo, hi = self.zero_outside[str(read.base.label)]
        at = dict(zip(self.loop_vars, read.indices))
        return axis, sp.sympify(lo).xreplace(at), sp.sympify(hi).xreplace(at)

    def skip_known_zeros(self, body, loop_vars, info):
        """A sum whose every term is a multiple of a read that is zero outside a range of its summation
        index (``Σ_u' A[b, h, t, u'] dA[b, h, t, u']`` over a causal softmax's weights, zero for
        u' > t) runs over that range only, unless it is a product for BLAS (``O = A V`` stays one
        GEMM per (b, h) over the whole range); and an output that is such a multiple at its own indices
        (``dS = A ⊙ (..)``) is marked, so that ``loop_kernel`` computes it inside the range and only
        stores zeros outside (``info["support"]``). Exact: the terms skipped are products with 0."""
        if not self.zero_outside:
            return body

        def tighten(e):
            if len(e.limits) != 1 or e.function.has(*REDUCTIONS):
                return e
            if self.match_dot(e, loop_vars) or self.match_batched(e, loop_vars) or \
                    self.match_gemm(e, loop_vars, info["shape"]):
                return e                 # a BLAS product over the whole range beats skipping zeros
            v, lo, hi = e.limits[0]
            for f in sp.Mul.make_args(e.function):
                sup = self._support_of(f)
                if sup is None or f.indices[sup[0]] != v or \
                        v in (sup[1].free_symbols | sup[2].free_symbols):
                    continue
                return sp.Sum(e.function, (v, self._tighter(lo, sup[1], loop_vars, info["shape"], max),
                                           self._tighter(hi, sup[2], loop_vars, info["shape"], min)))
            return e
        body = body.replace(lambda e: isinstance(e, sp.Sum), tighten)
        for f in sp.Mul.make_args(body):
            sup = self._support_of(f)
            if sup is not None and tuple(f.indices) == tuple(loop_vars) and sup[0] == len(loop_vars) - 1:
                info["support"] = (sup[1], sup[2])
        return body

    def _tighter(self, old, new, loop_vars, shape, pick):
        """The tighter of two summation bounds (``pick`` is max for a lower bound, min for an upper
        one): ``new`` alone where it is at least as tight at every point of the output indices."""
        domains = {v: (0, shape[k] - 1) for k, v in enumerate(loop_vars)}
        tighter = (new >= old) if pick is max else (new <= old)
        if _holds_everywhere(tighter, domains):
            return new
        return sp.Max(old, new) if pick is max else sp.Min(old, new)

    def _same_predicate(self, a, b, loop_vars, shape) -> bool:
        """Two conditions on output indices agree at every point of their extents (checked point by
        point, at most 100 000 points); False when that cannot be checked."""
        syms = sorted((a.free_symbols | b.free_symbols), key=str)
        if not set(syms) <= set(loop_vars):
            return False
        extents = [shape[loop_vars.index(s)] for s in syms]
        if not all(sp.sympify(e).is_Integer for e in extents) or math.prod(int(e) for e in extents) > 100_000:
            return False
        fa, fb = (sp.lambdify(syms, c, modules="math") for c in (a, b))
        return all(bool(fa(*pt)) == bool(fb(*pt)) for pt in itertools.product(*[range(int(e)) for e in extents]))

    def softmax_kernel(self, info) -> Kernel:
        """A softmax (see ``match_softmax``) per row: the largest term, then each ``exp(f(u) - max)``
        written once and summed, then the row scaled by 1 / sum; the points outside the range are
        zeros, filled without computing a term (a causal mask: u > t costs nothing but the store).
        ``exp(f - max) / Σ`` is ``exp(f - LSE)`` up to rounding."""
        plan, loop_vars, shape = info["plan"], info["loop_vars"], info["shape"]
        u, n = loop_vars[-1], shape[-1]
        name = self.ident(info["out"])
        lo, hi = _rounded(plan["lo"], up=True), _rounded(plan["hi"], up=False)
        domains = {w: (0, shape[k] - 1) for k, w in enumerate(loop_vars[:-1])}
        if not _holds_everywhere(lo >= 0, domains):
            lo = sp.Max(lo, 0)
        if not _holds_everywhere(hi <= n - 1, domains):
            hi = sp.Min(hi, n - 1)
        out = f"{name}[{', '.join(str(w) for w in loop_vars)}]"
        term = self.pv(plan["f"].xreplace({plan["v"]: u}))
        acc = self.fresh("softmax")
        outer = ", ".join(str(w) for w in loop_vars[:-1])
        largest = [f"{acc}_max = {self.pv(sp.S.NegativeInfinity)}",
                   f"for {u} in {self.range_code(lo, hi)}:",
                   IND + f"{acc}_v = {term}",
                   IND + f"{acc}_max = {acc}_v if {acc}_v > {acc}_max else {acc}_max"]
        if outer:
            # every row's largest term first, in a loop nest of its own: each row's max is a chain of
            # dependent compares, and rows that do not wait for each other's exps overlap in the
            # processor (measured on causal attention rows: 0.73 -> 0.53 ms per layer)
            largest.append(f"{acc}_rowmax[{outer}] = {acc}_max")
            row = [f"{acc}_max = {acc}_rowmax[{outer}]"]
        else:
            row = largest
        row += [f"# {info['text']}: each exp once, summed, then the row scaled by 1 / sum",
                f"{acc}_sum = {self.pv(sp.S.Zero)}",
                f"for {u} in {self.range_code(lo, hi)}:",
                IND + f"{acc}_e = _exp({term} - {acc}_max)",
                IND + f"{out} = {acc}_e",
                IND + f"{acc}_sum += {acc}_e",
                f"{acc}_inv = {self.pv(sp.S.One)} / {acc}_sum",
                f"for {u} in {self.range_code(lo, hi)}:",
                IND + f"{out} *= {acc}_inv"]
        if plan["guarded"]:
            row += [f"# outside {comment_text(sp.sstr(lo))} <= {u} <= {comment_text(sp.sstr(hi))}: zero, "
                    f"nothing computed"]
            if lo != 0:
                row += [f"for {u} in range(0, {self.pe(lo)}):", IND + f"{out} = {self.pv(sp.S.Zero)}"]
            if hi != n - 1:
                row += [f"for {u} in range({self.pe(hi + 1)}, {self.pe(n)}):", IND + f"{out} = {self.pv(sp.S.Zero)}"]

        def over_rows(body):
            for d in range(len(loop_vars) - 1, 0, -1):
                body = [f"for {loop_vars[d - 1]} in range({self.pe(shape[d - 1])}):"] + [IND + ln for ln in body]
            return body
        lines = [f"# {info['text']}",
                 f"# softmax over {u}: each exp computed once, then the row normalised in place"]
        if info["out"] not in self.preallocated:
            lines.append(f"{name} = np.empty({self.shape_code(self.tensors[info['out']])}, dtype=DT)")
        if outer:
            rows = ", ".join(self.pe(d) for d in shape[:-1])
            lines += [f"# the largest term of each row", f"{acc}_rowmax = np.empty(({rows},), dtype=DT)"]
            lines += over_rows(largest)
        return Kernel("softmax", [info["text"]], [info["out"]], lines + over_rows(row))

    # -- kernels ------------------------------------------------------------------------------
    def lower(self, equations, keep=None) -> list[Kernel]:
        """Lower equations (in evaluation order) to kernels, fusing elementwise chains.

        ``keep``: the tensors needed after these kernels (returned, or read by later code); when
        given, an output of a fused loop that nothing else reads is a scalar local of the loop,
        never an array. ``None`` keeps every output as an array."""
        equations = self.share_reductions(list(equations))
        self.scalars = set()
        if keep is not None:
            self.scalars = self.loop_locals(equations, set(keep))
        self.readers = {}
        for eq in equations:
            for name, _ in eq.reads():
                self.readers.setdefault(name, set()).add(eq.out.name)
        groups = self.slice_groups(equations)
        for plan in groups.values():          # a slice loop's tensors are arrays, never loop locals
            self.scalars -= {e.out.name for e in plan["equations"]} | \
                {name for e in plan["equations"] for name, _ in e.reads()}
        infos, pos = [], 0
        while pos < len(equations):
            kernel = self.slice_loop_kernel(groups[pos], keep) if pos in groups else None
            if kernel is not None:
                infos.append({"kind": "slices", "kernel": kernel})
                pos += len(groups[pos]["equations"])
                continue
            infos.append(self.classify(equations[pos]))
            pos += 1
        kernels: list[Kernel] = []
        group: list[dict] = []

        def flush():
            if group:
                kernels.append(self.loop_kernel(group))
                group.clear()

        for info in infos:
            if info["kind"] == "loop" and group and self.can_fuse(group, info):
                group.append(info)
                continue
            flush()
            if info["kind"] == "loop":
                group.append(info)
            elif info["kind"] == "dot":
                name = self.ident(info["out"])
                if info["out"] in self.preallocated:     # into the existing array (a slice)
                    code = [info["into"]] + \
                        ([f"{name} *= {info['scale']}"] if "scale" in info else [])
                else:
                    code = [f"{name} = {info['code']}"]
                kernels.append(Kernel("dot", [info["text"]], [info["out"]], [f"# {info['text']}"] + code))
            elif info["kind"] == "slices":
                kernels.append(info["kernel"])
            elif info["kind"] == "batched":
                name = self.ident(info["out"])
                code, _ = self.batched_code(info["plan"], name, target=name)
                kernels.append(Kernel("batched", [info["text"]], [info["out"]],
                                      [f"# {info['text']}", "# one matrix product per batch element "
                                       f"({', '.join(str(info['eq'].indices[info['loop_vars'].index(v)]) for v in info['plan']['batch'])})",
                                       f"{name} = np.empty({self.shape_code(self.tensors[info['out']])}, dtype=DT)"]
                                      + code))
            elif info["kind"] == "softmax":
                kernels.append(self.softmax_kernel(info))
            elif info["kind"] == "accumulate":
                kernels.append(self.accumulate_kernel(info))
            elif info["kind"] == "argmax":
                kernels.append(self.argmax_record_kernel(info))
            else:
                kernels.append(self.scalar_kernel(info))
        flush()
        return kernels

    # -- slice loops: a run of per-(batch, head) equations in one loop ------------------------
    def slice_groups(self, equations) -> dict:
        """Runs of consecutive equations computed per element of the same leading indices: each run
        starts with a batched contraction whose batch indices lead its output (attention's
        ``S[b,h,t,u] = Σ_e Q[b,h,t,e] K[b,h,u,e] / √E``), and goes on while the next equation reads
        every tensor that carries those leading axes at its own (b, h) only (the softmax ``A`` of
        ``S``, then ``O = A V``). -> {position of the run's first equation: plan}. A run of one
        equation stays a ``batched`` kernel."""
        groups, pos = {}, 0
        while pos < len(equations):
            counter = self._counter
            plan = self._slice_run(equations, pos)
            if plan is not None and len(plan["equations"]) > 1:
                groups[pos] = plan
                pos += len(plan["equations"])
            else:
                self._counter = counter           # a look that found nothing names nothing
                pos += 1
        return groups

    def _slice_run(self, equations, pos):
        """The run starting at ``equations[pos]`` (see ``slice_groups``), or None."""
        eq = equations[pos]
        if eq.out.rank < 3 or not sp.sympify(eq.body).has(sp.Sum) or eq.body.has(Delayed) \
                or eq.body.has(sp.KroneckerDelta):
            return None
        body, loop_vars = self.prepare(eq)
        bm = self.match_batched(body / _coefficient(body), loop_vars)
        if bm is None:
            return None
        k = len(bm["batch"])
        if tuple(bm["batch"]) != loop_vars[:k] or eq.out.rank - k < 2:
            return None
        extent = self.concrete_shape(eq.out)[:k]
        outer = [sp.Symbol(self.fresh("s"), integer=True) for _ in range(k)]
        plan = dict(k=k, extent=extent, outer=outer, equations=[], sliced=[])
        for e in equations[pos:]:
            sliced = self._slice_equation(e, plan)
            if sliced is None:
                break
            plan["equations"].append(e)
            plan["sliced"].append(sliced)
        return plan if plan["equations"] else None

    def _slice_equation(self, eq, plan):
        """``eq`` on one slice: its leading k indices fixed to the loop's, every read of a tensor at
        those indices a read of that tensor's slice -> the sliced Equation, or None where ``eq``
        is not computed per slice (a sum over a leading index, a read at another position)."""
        k, extent, outer = plan["k"], plan["extent"], plan["outer"]
        if eq.out.rank - k < 1 or self.concrete_shape(eq.out)[:k] != extent or \
                eq.body.has(Delayed) or eq.body.has(sp.KroneckerDelta):
            return None
        lead = tuple(eq.indices[:k])
        if not all(isinstance(i, sp.Symbol) for i in lead) or len(set(lead)) != k:
            return None
        bound = {lim[0] for r in sp.preorder_traversal(sp.sympify(eq.body)) if isinstance(r, REDUCTIONS)
                 for lim in r.limits}
        if bound & set(lead):
            return None
        body = sp.sympify(eq.body).xreplace(dict(zip(lead, outer)))

        def sliced_read(r):
            t = self.tensors[str(r.base.label)]
            return self._batch_slice(t, k)[tuple(r.indices[k:])]

        def per_slice(r):
            name = str(r.base.label)
            return (name in self.tensors and tuple(r.indices[:k]) == tuple(outer)
                    and self.tensors[name].rank > k
                    and self.concrete_shape(self.tensors[name])[:k] == extent)
        body = body.replace(lambda e: isinstance(e, sp.Indexed) and per_slice(e), sliced_read)
        if set(outer) & body.free_symbols:
            return None
        return Equation(self._batch_slice(eq.out, k), tuple(eq.indices[k:]), body, layer=eq.layer,
                        note=eq.note)

    def _batch_slice(self, t, k) -> Tensor:
        """The tensor of one slice ``t[b, h]`` of ``t``'s leading k axes (registered once)."""
        name = f"{t.name}__slice"
        if name not in self.tensors:
            self.tensors[name] = Tensor(name, t.shape[k:], role="hidden", layer=t.layer)
            self.names[name] = f"{self.ident(t.name)}_s"
        return self.tensors[name]

    def _shift_support(self, support, by):
        """A ``zero_outside`` entry of a tensor re-expressed for its slice (``by = -k``) or for the
        whole tensor from its slice (``by = k``): axis and loop variables moved by ``by``."""
        axis, lo, hi = support
        lv = self.loop_vars
        if axis + by < 0 or any(s in lv[:max(-by, 0)] for s in
                                (sp.sympify(lo).free_symbols | sp.sympify(hi).free_symbols)):
            return None
        move = {v: lv[j + by] for j, v in enumerate(lv) if 0 <= j + by < len(lv)}
        return axis + by, sp.sympify(lo).xreplace(move), sp.sympify(hi).xreplace(move)

    def slice_loop_kernel(self, plan, keep) -> Kernel:
        """One loop over the leading (batch, head) indices of a run of equations (``slice_groups``),
        computing every equation of the run on the slice before the next slice: each slice's scores,
        weights and products (16 kB each at T = 64) are still in cache when the next equation reads
        them, where whole-tensor kernels wrote and read them back through memory (1 MB each).
        The equations are lowered on their 2-D slices by the same machinery (products are
        ``_matmul`` into the slice). An output read after the run is a whole array whose slices the
        loop writes in place; an intermediate nothing after the run reads is one slice, reused.
        None when an equation's kernel on the slice would allocate its own output (an accumulation):
        the run is then lowered as whole tensors."""
        k, outer, eqs, sliced = plan["k"], plan["outer"], plan["equations"], plan["sliced"]
        for v in outer:
            self.names[v] = str(v)
        outs = {e.out.name for e in eqs}
        later = {name for name, readers in self.readers.items() if readers - outs}
        kept = {name for name in outs if name in later or
                (name in keep if keep is not None else self.live_after is None or name in self.live_after)}
        lines = [f"# one loop over ({', '.join(str(i) for i in eqs[0].indices[:k])}): "
                 + "; ".join(comment_text(e.out.name) for e in eqs)
                 + ", each slice computed while its data is in cache"]
        lines += [f"# {pretty(e)}" for e in eqs]
        views, inputs = [], []
        for e in eqs:
            s = self._batch_slice(e.out, k)
            self.preallocated.add(s.name)
            if e.out.name in kept:
                lines.append(f"{self.ident(e.out.name)} = np.empty({self.shape_code(e.out)}, dtype=DT)")
                views.append(s)
            else:
                lines.append(f"{self.ident(s.name)} = np.empty({self.shape_code(s)}, dtype=DT)"
                             f"  # {comment_text(e.out.name)}: one slice at a time, read by nothing after")
        for e in sliced:                          # in a fixed order: the module's text is deterministic
            for r in sorted(sp.sympify(e.body).atoms(sp.Indexed), key=sp.default_sort_key):
                name = str(r.base.label)
                if name.endswith("__slice") and name[:-7] not in outs and name not in [t.name for t in inputs]:
                    inputs.append(self.tensors[name])
        for t in inputs:                          # what the slices know to be zero, from the whole
            whole = self.zero_outside.get(t.name[:-7])
            moved = whole and self._shift_support(whole, -k)
            if moved:
                self.zero_outside[t.name] = moved
        saved = self.scalars, self.readers, self.outer_bound
        self.outer_bound = self.outer_bound | set(outer)
        try:
            inner = self.lower(sliced)
        finally:
            self.scalars, self.readers, self.outer_bound = saved
        if any(kern.kind not in WRITES_INTO_SLICES for kern in inner):
            return None                           # a kernel that allocates its own output: whole tensors
        for e in eqs:                             # and what the whole is known to be from its slices
            part = self.zero_outside.get(self._batch_slice(e.out, k).name)
            moved = part and self._shift_support(part, k)
            if moved:
                self.zero_outside[e.out.name] = moved
        at = ", ".join(str(v) for v in outer)
        body = [f"{self.ident(t.name)} = {self.ident(t.name[:-7])}[{at}]" for t in inputs + views]
        body += [ln for kern in inner for ln in kern.lines]
        nested = body
        for d in range(k, 0, -1):
            nested = [f"for {outer[d - 1]} in range({self.pe(plan['extent'][d - 1])}):"] + [IND + ln for ln in nested]
        return Kernel("slices", [pretty(e) for e in eqs], sorted(kept), lines + nested)

    def share_reductions(self, equations):
        """Common subexpressions across equations: a sum or log-sum-exp that several equations
        compute over the same values (the log-sum-exp of the logits, in the loss and in the
        probabilities) becomes an array of its own, computed once before its first use and read
        by every equation that needs it. (Within one equation, ``_Block.cache`` already computes
        a repeated reduction once.)"""
        found: dict = {}                  # key -> [(equation position, reduction, free indices)]
        for pos, eq in enumerate(equations):
            body = sp.sympify(eq.body)
            if body.has(sp.KroneckerDelta) or eq.out.rank == 0:
                continue
            seen = set()
            for r in sp.preorder_traversal(body):
                if not isinstance(r, (sp.Sum, LogSumExp)):
                    continue
                key, free, shape = self._reduction_key(r, eq)
                if key is not None and key not in seen:
                    seen.add(key)
                    found.setdefault(key, []).append((pos, r, free, shape))
        shared = {k: uses for k, uses in found.items() if len(uses) > 1}
        if not shared:
            return equations
        from ..derive.tensor import Equation, Tensor
        before: dict = {}                 # position -> new equations to insert before it
        replace: dict = {}                # position -> {reduction: read of the shared array}
        for key, uses in shared.items():
            pos0, r0, free0, shape = uses[0]
            eq0 = equations[pos0]
            name = self.fresh("cse")
            t = Tensor(name, shape, role="hidden")
            self.tensors[name] = t
            self.names[name] = name
            if not free0:
                self.names[t.symbol] = name
            before.setdefault(pos0, []).append(Equation(t, free0, r0, layer=eq0.layer,
                                                        note="computed once, read by several equations"))
            for pos, r, free, _ in uses:
                replace.setdefault(pos, {})[r] = t[tuple(free)] if free else t.symbol
        out = []
        for pos, eq in enumerate(equations):
            out += before.get(pos, [])
            if pos in replace:
                eq = type(eq)(eq.out, eq.indices, sp.sympify(eq.body).xreplace(replace[pos]),
                              layer=eq.layer, note=eq.note)
            out.append(eq)
        return out

    def _reduction_key(self, r, eq):
        """A key equal for two reductions that compute the same values (bound indices renamed
        in order, free indices by position and extent), the reduction's free indices and their
        extents (the shape of an array of its values); (None, None, None) when the reduction reads
        an index that a sum around it binds over less than a whole axis (it cannot be computed on
        its own). A free index is an output index or the index of a sum around the reduction from 0
        (the log-sum-exp of the logits at every position t, inside the loss's sum over t)."""
        around = self._summed_around(r, eq)
        free = [i for i in eq.indices if i in r.free_symbols] + [v for v in around if v in r.free_symbols]
        ints = {x for x in r.free_symbols if x.is_integer} - set(self.sizes) - {BATCH}
        if not ints <= set(free):
            return None, None, None
        bound = []
        for node in sp.preorder_traversal(r):
            if isinstance(node, REDUCTIONS):
                bound += [v for v, _, _ in node.limits if v not in bound]
        rename = {v: sp.Symbol(f"·b{k}", integer=True) for k, v in enumerate(bound)}
        rename.update({v: sp.Symbol(f"·f{k}", integer=True) for k, v in enumerate(free)})
        shape = tuple(around[i] if i in around else eq.out.shape[list(eq.indices).index(i)] for i in free)
        extents = tuple(sp.srepr(e) for e in shape)
        return (sp.srepr(r.xreplace(rename)), extents), free, shape

    def _summed_around(self, r, eq) -> dict:
        """{index: extent} of the sums of ``eq``'s body around ``r`` that run from 0 to a size
        (``Σ_t`` from 0 to T - 1: extent T); an index summed twice with other limits is left out."""
        around, clash = {}, set()
        for s in sp.preorder_traversal(sp.sympify(eq.body)):
            if not isinstance(s, sp.Sum) or s is r or not s.function.has(r):
                continue
            for v, lo, hi in s.limits:
                extent = sp.sympify(hi) + 1
                if lo != 0 or not extent.free_symbols <= set(self.sizes) | {BATCH} \
                        or around.get(v, extent) != extent:
                    clash.add(v)
                around[v] = extent
        return {v: e for v, e in around.items() if v not in clash}

    def loop_locals(self, equations, keep: set) -> set:
        """Outputs read by nothing but the next equations, pointwise (at their own indices), and
        not kept: candidates to be a scalar local of a fused loop instead of an array
        (``loop_kernel`` decides, once the fused groups are known)."""
        reads: dict = {}
        for eq in equations:
            for name, idx in eq.reads():
                reads.setdefault(name, []).append((eq, tuple(idx)))
        out = set()
        for eq in equations:
            name = eq.out.name
            if name in keep or eq.out.rank == 0 or name in self.preallocated:
                continue
            if all(tuple(idx) == tuple(other.indices) and other.out.shape == eq.out.shape
                   for other, idx in reads.get(name, [])):
                out.add(name)
        return out
    def lower_units(self, units, keep=None) -> list[Kernel]:
        """Lower a schedule (equations and time loops, ``derive.recurrence.schedule``): consecutive
        equations as ``lower`` does, each time loop as one loop over t. A backward loop's gate
        adjoints are named first (``step_operands``): computed once per step, not once per reader.

        ``keep``: the tensors the caller needs after these units (returned); when given, a backward
        loop's sequence that no later unit reads is not stored (``unread_sequences``). ``None``
        stores every sequence."""
        from .step_operands import share_step_operands
        units = share_step_operands(units, self)
        kernels, run = [], []
        for pos, u in enumerate(units):
            if isinstance(u, TimeLoop):
                kernels += self.lower(run)
                run = []
                unread = None if keep is None or u.direction > 0 else \
                    unread_sequences(u, units[pos + 1:], keep)
                kernels.append(self.time_loop_kernel(u, unread))
            else:
                run.append(u)
        return kernels + self.lower(run)

    # -- time loops ---------------------------------------------------------------------------
    def time_loop_kernel(self, loop: TimeLoop, unread=None) -> Kernel:
        """A recurrence (or its adjoint) as one loop over t, never unrolled. Each step computes
        every equation of the loop on one time slice: a read at ``t + c`` of a sequence becomes a
        read of a contiguous copy of that slice (the declared initial state, or zeros, where
        ``t + c`` is outside the sequence), so the per-step contractions are ``_matmul`` on 2-D
        arrays; each result is stored into its full sequence for the steps and the adjoints after.

        ``unread``: the loop's results that nothing after the loop reads. Those that no step reads
        from the sequence either (only at their own step, or from the step before's array) are
        never stored, and within the step each is a scalar local of the fused loop where only that
        loop reads it (an LSTM's backward step stored 10 sequences, of which 4 are read)."""
        ts = sp.Symbol(self.fresh("t"), integer=True)
        self.names[ts] = str(ts)
        first = loop.equations[0]
        length = self.concrete_shape(first.out)[loop.time_axes[first.out.name]]
        steps = (f"range({self.pe(length)})" if loop.direction > 0
                 else f"range({self.pe(length)} - 1, -1, -1)")
        what = "forward in time (a recurrence)" if loop.direction > 0 else \
            "backward in time (backpropagation through time)"
        lines = [f"# time loop, {what}: " + "; ".join(comment_text(e.out.name) for e in loop.equations)]
        lines += [f"# {pretty(e)}" for e in loop.equations]
        hoisted, step_sources = self.hoist_out_of_time_loop(loop)
        allocations = {e.out.name: f"{self.ident(e.out.name)} = np.empty({self.shape_code(e.out)}, dtype=DT)"
                       for e in loop.equations if e.out.name not in self.preallocated}
        at = len(lines)                    # the sequences' allocations go here, once known
        for kern in self.lower(hoisted):
            lines += kern.lines
        slices, produced, step_eqs, stores = {}, {}, [], []
        for e in step_sources:
            axis = loop.time_axes[e.out.name]
            body = self._sliced(substitute_index(e.body, e.indices[axis], ts), ts, slices, produced,
                                computed=set(loop.names))
            out = self._slice_tensor(e.out, axis, "now")
            step_eqs.append(Equation(out, e.indices[:axis] + e.indices[axis + 1:], body, layer=e.layer,
                                     note=e.note))
            produced[e.out.name] = out
            sel = ", ".join(str(ts) if k == axis else ":" for k in range(e.out.rank))
            stores.append((e.out.name, f"{self.ident(e.out.name)}[{sel}] = {self.ident(out.name)}"
                                       f"  # store {comment_text(e.out.name)} at step {ts}"))
        carried_keys = {key for key in slices if key[0] in produced and key[1] == -loop.direction}
        carried_names = {key[0] for key in carried_keys}
        dropped = set(unread or ()) - {key[0] for key in slices if key not in carried_keys}
        stores = [(name, line) for name, line in stores if name not in dropped]
        lines[at:at] = [line for name, line in allocations.items() if name not in dropped]
        if dropped:
            lines.insert(at, "# not stored (nothing after the loop reads them): " +
                         "; ".join(comment_text(e.out.name) for e in loop.equations if e.out.name in dropped))
        self.outer_bound = self.outer_bound | {ts}
        self.step_layouts = {}
        self.step_computed = set(loop.names) | {sl.name for _, _, sl in slices.values()} | \
            {p.name for p in produced.values()}
        # a result neither stored nor carried to the next step may be a scalar of the step's loop
        keep = None if unread is None else \
            {p.name for n, p in produced.items() if n not in dropped or n in carried_names}
        try:
            direct = self._stored_in_place(step_eqs, produced, {n for n, _ in stores} - carried_names, ts, loop)
            kernels = self._lower_step(step_eqs, keep, direct)
            if self.step_written != set(direct):   # one was not a fused loop's output: store them all
                kernels = self._lower_step(step_eqs, keep, {})
            for _, layout in self.step_layouts.values():
                lines += layout
            stores = [(n, line) for n, line in stores if produced[n].name not in self.step_written]
        finally:
            self.outer_bound = self.outer_bound - {ts}
            self.step_layouts, self.step_computed = None, set()
            self.step_targets, self.step_written = {}, set()
        body, carried = [], []
        for (name, c, init), (t, axis, sl) in slices.items():
            if name in produced and c == -loop.direction:
                # the step before's result, still in its own array: no copy
                lines += self._carried_slice_lines(t, sl, ts, c, init)
                carried.append(f"{self.ident(sl.name)} = {self.ident(produced[name].name)}"
                               f"  # {comment_text(name)} at this step, read by the next one")
                continue
            body += self._slice_lines(t, axis, sl, ts, c, init, length)
        done = set()
        for kern in kernels:
            body += kern.lines
            for name, line in stores:
                if name not in done and self.ident(produced[name].name) and \
                        produced[name].name in kern.outputs:
                    body.append(line)
                    done.add(name)
        body += carried
        lines.append(f"for {ts} in {steps}:")
        lines += [IND + ln for ln in body]
        return Kernel("time_loop", [pretty(e) for e in loop.equations], [e.out.name for e in loop.equations],
                      lines)

    def _stored_in_place(self, step_eqs, produced, stored, ts, loop) -> dict:
        """The step's results to write straight into their sequences (``x[i0, t, i1] = ...``)
        instead of into an array of the step copied into the sequence after the loop nest: those
        stored and not carried to the next step (a carried one is the next step's contiguous
        operand), that are not a bare contraction (``_matmul`` returns its own array), and that the
        step reads only pointwise, outside every reduction (a later statement then reads the
        sequence in place, as it reads the forward values). name of the step's tensor -> (the
        sequence's name, time axis, ts). Why: the copies were a tenth of an LSTM's step."""
        direct = {}
        for name in stored:
            now = produced[name]
            eq = next(e for e in step_eqs if e.out is now)
            if isinstance(sp.sympify(eq.body), REDUCTIONS):
                continue
            if all(self._read_pointwise(e, now.name) for e in step_eqs):
                direct[now.name] = (name, loop.time_axes[name], ts)
        return direct

    @staticmethod
    def _read_pointwise(eq, name) -> bool:
        """Every read of ``name`` in ``eq``'s body is at ``eq``'s own indices, outside reductions."""
        body = sp.sympify(eq.body)
        inner = set()
        for r in sp.preorder_traversal(body):
            if isinstance(r, REDUCTIONS):
                inner |= {x for x in r.atoms(sp.Indexed) if str(x.base.label) == name}
        return not inner and all(tuple(x.indices) == tuple(eq.indices) for x in body.atoms(sp.Indexed)
                                 if str(x.base.label) == name)

    def _lower_step(self, step_eqs, keep, direct) -> list[Kernel]:
        """Lower one step's equations, the results in ``direct`` written into their sequences and
        read from them by the later equations of the step."""
        self.step_targets, self.step_written = dict(direct), set()
        eqs = step_eqs
        if direct:
            def in_sequence(read):
                name, axis, ts = direct[str(read.base.label)]
                idx = list(read.indices)
                return self.tensors[name][tuple(idx[:axis] + [ts] + idx[axis:])]
            eqs = [Equation(e.out, e.indices, sp.sympify(e.body).replace(
                       lambda x: isinstance(x, sp.Indexed) and str(x.base.label) in direct, in_sequence),
                       layer=e.layer, note=e.note) for e in step_eqs]
        return self.lower(eqs, keep=keep)

    def hoist_out_of_time_loop(self, loop: TimeLoop):
        """The loop's equations with every part that reads nothing the loop computes taken out of
        the loop: (the hoisted equations, to compute before the loop; the loop's equations reading
        them instead).

        A hoisted part is a contraction (with the terms of its sum that also read nothing the loop
        computes: ``Σ_i W[o, i] x[b, t, i] + c[o]``). When it reads the step's time index it becomes
        a tensor over the whole sequence, one GEMM for every step at once instead of one small
        product per step; when it does not (``Σ_k V[k, o] δ[b, k]``, a later layer's adjoint), it
        is computed once instead of at every step. Inside the loop there remain the reads of the
        recurrence's own past (or future), which one step cannot know before the previous one."""
        inside = set(loop.names)
        hoisted, out = [], []
        for e in loop.equations:
            body = sp.sympify(e.body)
            new = self._hoisted_body(body, e, inside, hoisted)
            out.append(e if new is body else
                       Equation(e.out, e.indices, new, layer=e.layer, note=e.note))
        return hoisted, out

    def _loop_invariant(self, expr, eq, inside) -> bool:
        """``expr`` (a part of ``eq``'s body) reads no tensor that the loop computes, and uses no
        index but ``eq``'s own (none bound by an enclosing sum)."""
        if expr.has(Delayed):
            return False
        if any(str(r.base.label) in inside for r in expr.atoms(sp.Indexed)):
            return False
        ints = {x for x in expr.free_symbols if x.is_integer} - set(self.sizes) - {BATCH}
        return ints <= set(eq.indices)

    def _hoisted_body(self, expr, eq, inside, hoisted):
        """``expr`` with its loop-invariant contractions replaced by reads of hoisted tensors
        (appended to ``hoisted``), rebuilt bottom-up; the same object when nothing was hoisted."""
        if isinstance(expr, sp.Indexed) or not expr.args:
            return expr
        if isinstance(expr, sp.Add):
            # (a term that reads the time index only outside its contractions, a branch on t
            # around a constant product, is left in the loop: its contraction alone is hoisted)
            fixed = [a for a in expr.args if self._loop_invariant(a, eq, inside)
                     and not self._time_outside_sums(a, eq)]
            if any(a.has(sp.Sum) for a in fixed):
                rest = [self._hoisted_body(a, eq, inside, hoisted) for a in expr.args if a not in fixed]
                return sp.Add(self._hoist(sp.Add(*fixed), eq, hoisted), *rest)
        elif isinstance(expr, sp.Sum) and self._loop_invariant(expr, eq, inside):
            return self._hoist(expr, eq, hoisted)
        args = [self._hoisted_body(a, eq, inside, hoisted) for a in expr.args]
        return expr.func(*args) if any(a is not b for a, b in zip(args, expr.args)) else expr

    def _hoist(self, expr, eq, hoisted):
        """A tensor over the indices of ``eq`` that ``expr`` uses (in ``eq``'s order, so its
        layout follows the output's), defined by ``expr``: its read replaces ``expr``."""
        idx = tuple(i for i in eq.indices if i in expr.free_symbols)
        shape = tuple(eq.out.shape[list(eq.indices).index(i)] for i in idx)
        name = self.fresh("hoisted")
        t = Tensor(name, shape, role="hidden", layer=eq.layer)
        self.tensors[name], self.names[name] = t, name
        if not idx:
            self.names[t.symbol] = name
        over = "every step at once" if any(i in idx for i in eq.indices
                                           if self._is_time_index(i, eq)) else "once, for every step"
        hoisted.append(Equation(t, idx, expr, layer=eq.layer,
                                note=f"hoisted out of the time loop of {eq.out.name}: computed {over}"))
        return t[idx] if idx else t.symbol

    def _time_outside_sums(self, expr, eq) -> bool:
        """``expr`` reads ``eq``'s time index, but none of its sums does."""
        t = [i for i in eq.indices if self._is_time_index(i, eq)]
        return bool(t) and t[0] in expr.free_symbols and \
            not any(t[0] in s.free_symbols for s in expr.atoms(sp.Sum))

    @staticmethod
    def _is_time_index(i, eq) -> bool:
        axis = eq.out.meta.get("time_axis")
        return axis is not None and eq.indices[axis] == i

    def _slice_tensor(self, t, axis, tag) -> Tensor:
        name = f"{t.name}__{tag}"
        if name not in self.tensors:
            s = Tensor(name, t.shape[:axis] + t.shape[axis + 1:], role="hidden", layer=t.layer)
            self.tensors[name] = s
            self.names[name] = f"{self.ident(t.name)}_{sanitise(tag)}"
        return self.tensors[name]

    def _sliced(self, body, ts, slices, produced, computed=()):
        """``body`` at one step: every read of a sequence at ``ts + c`` (and every delayed read of
        a recurrence) replaced by a read of its time slice; a read at ``ts + c`` outside every
        reduction of a sequence the loop does not compute is indexed in place instead
        (``_nearby_in_place``)."""
        inner = set()
        for r in sp.preorder_traversal(body):
            if isinstance(r, REDUCTIONS):
                inner |= r.atoms(sp.Indexed) | r.atoms(Delayed)

        def nearby(read, outside):
            """The in-place read of ``read`` (at ts + c, c != 0) when it qualifies, else None."""
            name = str(read.base.label)
            axis = time_axis(read)
            if read in inner or name in computed or name not in self.tensors or axis is None:
                return None
            c = time_shift(read.indices[axis], [ts])[1]
            return None if c == 0 else self._nearby_in_place(read, axis, ts, c, outside)
        def time_axis(read):
            hits = [k for k, e in enumerate(read.indices) if ts in sp.sympify(e).free_symbols]
            if len(hits) != 1 or time_shift(read.indices[hits[0]], [ts]) is None:
                return None
            return hits[0]

        def slice_read(read, init):
            name = str(read.base.label)
            axis = time_axis(read)
            if axis is None:
                return None
            c = time_shift(read.indices[axis], [ts])[1]
            rest = read.indices[:axis] + read.indices[axis + 1:]
            if c == 0 and name in produced:           # computed earlier in this step
                return produced[name][tuple(rest)]
            t = self.tensors[name]
            tag = ("now" if c == 0 else (f"m{-c}" if c < 0 else f"p{c}")) + ("i" if init != 0 else "")
            key = (name, c, init)
            if key not in slices:
                sl = self._slice_tensor(t, axis, "s" + tag)
                slices[key] = (t, axis, sl)
            return slices[key][2][tuple(rest)]

        def delayed(e):
            initial, read, _ = e.args
            if e not in inner:
                here = nearby(read, initial)
                if here is not None:
                    return here
            # the initial state, written in the read's own indices (the time entry aside)
            axis = time_axis(read)
            rest = [v for k, v in enumerate(read.indices) if k != axis]
            fresh = tuple(sp.Symbol(f"_s{k}", integer=True) for k in range(len(rest)))
            init = initial.xreplace(dict(zip(rest, fresh))) if all(isinstance(v, sp.Symbol) for v in rest) else initial
            out = slice_read(read, init if initial != 0 else 0)
            if out is None:
                raise UnsupportedError(f"codegen: delayed read {read} in a time loop has no time slice")
            return out
        body = body.replace(lambda e: isinstance(e, Delayed), delayed)
        direct = self._read_in_place(body, ts, produced)
        here = {e: nearby(e, sp.S.Zero) for e in body.atoms(sp.Indexed) if e not in direct}
        here = {e: v for e, v in here.items() if v is not None}
        return body.replace(lambda e: isinstance(e, sp.Indexed) and str(e.base.label) in self.tensors
                            and e not in direct and (e in here or slice_read(e, 0) is not None),
                            lambda e: here[e] if e in here else slice_read(e, 0))

    def _nearby_in_place(self, read, axis, ts, c, outside):
        """A read of a sequence at ``ts + c`` (c != 0) indexed in place: ``x[.., min(ts + c, T - 1),
        ..]`` where ``ts + c`` is inside the sequence, ``outside`` (zeros or the declared initial
        state) where it is not. The clamp keeps the index inside the array at every step, so the
        select costs no branch and the step's loop stays vectorisable; a slice copied at every step
        (`np.ascontiguousarray`) is what it replaces."""
        last = self.concrete_shape(self.tensors[str(read.base.label)])[axis] - 1
        at = sp.Min(ts + c, last) if c > 0 else sp.Max(ts + c, 0)
        inside = sp.Le(ts + c, last) if c > 0 else sp.Ge(ts + c, 0)
        idx = list(read.indices)
        return sp.Piecewise((read.base[tuple(idx[:axis] + [at] + idx[axis + 1:])], inside), (outside, True))

    @staticmethod
    def _read_in_place(body, ts, produced) -> set:
        """The reads of a sequence at the step's own time ``ts`` that the step's loops can index
        in place (``c1[i0, t, i1]``): outside every reduction (a contraction's operand is copied
        into a contiguous slice for ``_matmul``), and not computed by this step (those are read
        from the step's own result)."""
        inner = set()
        for r in sp.preorder_traversal(body):
            if isinstance(r, REDUCTIONS):
                inner |= r.atoms(sp.Indexed)
        return {e for e in body.atoms(sp.Indexed) if e not in inner and str(e.base.label) not in produced
                and any(sp.sympify(i) == ts for i in e.indices)}

    def _slice_lines(self, t, axis, sl, ts, c, init, length):
        """Set the slice variable ``sl`` to ``t`` at step ``ts + c``: a contiguous copy inside the
        sequence, the initial state (or zeros) outside it."""
        name = self.ident(sl.name)
        sel = ", ".join(self.pe(ts + c) if k == axis else ":" for k in range(t.rank))
        copy = f"{name} = np.ascontiguousarray({self.ident(t.name)}[{sel}])"
        if c == 0:
            return [f"# {comment_text(t.name)} at step {ts}", copy]
        cond = f"{self.pe(ts + c)} >= 0" if c < 0 else f"{self.pe(ts + c)} <= {self.pe(length - 1)}"
        lines = [f"# {comment_text(t.name)} at step {ts}{'+' if c > 0 else ''}{c if c else ''}"
                 f"{' (the initial state before the start)' if init != 0 else ' (zeros outside the sequence)'}",
                 f"if {cond}:", IND + copy, "else:"]
        if init == 0:
            lines.append(IND + f"{name} = np.zeros({self.shape_code(sl)}, dtype=DT)")
        else:
            fresh = tuple(sp.Symbol(f"_s{k}", integer=True) for k in range(sl.rank))
            kern = self.lower([Equation(sl, fresh, init, note="initial state")])
            lines += [IND + ln for k in kern for ln in k.lines]
        return lines

    def _carried_slice_lines(self, t, sl, ts, c, init) -> list[str]:
        """Before the loop: ``sl`` (``t`` at the step before, ``ts + c``) at the first step, where
        the step before is outside the sequence: the initial state, or zeros. Each step then
        hands its own result on (a fresh array every step, so nothing overwrites it)."""
        name = self.ident(sl.name)
        lines = [f"# {comment_text(t.name)} at step {ts}{c:+d}, carried from step to step: before the first "
                 f"step, {'the initial state' if init != 0 else 'zeros (outside the sequence)'}"]
        if init == 0:
            return lines + [f"{name} = np.zeros({self.shape_code(sl)}, dtype=DT)"]
        fresh = tuple(sp.Symbol(f"_s{k}", integer=True) for k in range(sl.rank))
        kern = self.lower([Equation(sl, fresh, init, note="initial state")])
        return lines + [ln for k in kern for ln in k.lines]

    def can_fuse(self, group, info) -> bool:
        if info["shape"] != group[0]["shape"]:
            return False
        written = {g["out"] for g in group}
        if info["dot_reads"] & written:
            return False
        body = info["body"]
        inside = set()
        for r in sp.preorder_traversal(body):
            if isinstance(r, REDUCTIONS):
                inside |= {str(x.base.label) for x in r.atoms(sp.Indexed)}
        if inside & written:
            return False
        for x in body.atoms(sp.Indexed):
            if str(x.base.label) in written and tuple(x.indices) != info["loop_vars"]:
                return False
        return True

    def loop_kernel(self, group) -> Kernel:
        loop_vars = group[0]["loop_vars"]
        shape = group[0]["shape"]
        lines = [f"# {g['text']}" for g in group]
        outs = {g["out"] for g in group}
        local = {g["out"] for g in group
                 if g["out"] in self.scalars and self.readers.get(g["out"], set()) <= outs}
        alias = {}
        for g in group:
            if g["out"] in self.preallocated or g["out"] in local or g["out"] in self.step_targets:
                continue
            if g.get("whole_dots"):
                # the output overwrites its own _matmul temporary (read at the same element just
                # before): one array fewer
                alias[g["out"]] = g["whole_dots"][0]
                continue
            lines.append(f"{self.ident(g['out'])} = np.empty({self.shape_code(self.tensors[g['out']])}, dtype=DT)")
        for g in group:
            for code, _, _ in g["pre"]:
                if isinstance(code, list):          # an im2col GEMM: commented line by line
                    lines += [f"# contraction in {comment_text(g['out'])}: {g['text']}"] + code
                else:
                    lines.append(f"{code}  # contraction in {comment_text(g['out'])}")
            if g["out"] in alias:
                lines.append(f"{self.ident(g['out'])} = {alias[g['out']]}  # written in place")
        blocks = [_Block(set(loop_vars[:d]) | self.outer_bound) for d in range(len(loop_vars) + 1)]
        stmts = []
        point = {}                                  # reads of loop locals -> the local
        for g in group:
            value = self.emit_expr(g["body"].xreplace(point), blocks)
            if g["out"] in local:                   # read only here, pointwise: no array
                sym = sp.Symbol(self.ident(g["out"]), real=True)
                self.names[sym] = str(sym)
                point[self.tensors[g["out"]].base[tuple(loop_vars)]] = sym
                stmts += [f"# {g['text']} (a local: nothing else reads it)", f"{sym} = {value}"]
                continue
            target = "%s[%s]" % (self.ident(g["out"]), ", ".join(str(v) for v in loop_vars))
            if g["out"] in self.step_targets:       # a time loop's result, written into its sequence
                seq, axis, ts = self.step_targets[g["out"]]
                at = [str(v) for v in loop_vars]
                target = "%s[%s]" % (self.ident(seq), ", ".join(at[:axis] + [str(ts)] + at[axis:]))
                self.step_written.add(g["out"])
            if g["out"] in alias and g["body"] == sp.IndexedBase(alias[g["out"]])[tuple(loop_vars)]:
                continue                            # the temporary is the whole value: nothing to copy
            stmts += [f"# {g['text']}", f"{target} = {value}"]
        lines += blocks[0].lines
        nested = stmts
        support = group[0].get("support") if len(group) == 1 and not local else None
        for d in range(len(loop_vars), 0, -1) if stmts else ():
            header = f"for {loop_vars[d - 1]} in range({self.pe(shape[d - 1])}):"
            if support is not None and d == len(loop_vars):
                header = f"for {loop_vars[d - 1]} in {self.range_code(*support)}:"
            nested = [header] + [IND + ln for ln in blocks[d].lines + nested]
            if support is not None and d == len(loop_vars):
                nested += self.zeros_outside(group[0]["out"], loop_vars, shape, *support)
        lines += nested
        return Kernel("loop", [g["text"] for g in group], [g["out"] for g in group], lines)

    def zeros_outside(self, out, loop_vars, shape, lo, hi) -> list[str]:
        """The loops storing zeros where the last index is outside [lo, hi] (nothing computed there)."""
        u, n = loop_vars[-1], shape[-1]
        target = f"{self.ident(out)}[{', '.join(str(v) for v in loop_vars)}]"
        lines = [f"# outside {comment_text(sp.sstr(lo))} <= {u} <= {comment_text(sp.sstr(hi))}: a multiple of "
                 f"zero, stored without computing it"]
        if lo != 0:
            lines += [f"for {u} in range(0, {self.pe(lo)}):", IND + f"{target} = {self.pv(sp.S.Zero)}"]
        if hi != n - 1:
            lines += [f"for {u} in range({self.pe(hi + 1)}, {self.pe(n)}):", IND + f"{target} = {self.pv(sp.S.Zero)}"]
        return lines

    def accumulate_kernel(self, info) -> Kernel:
        body, loop_vars, shape = info["body"], info["loop_vars"], info["shape"]
        name = self.ident(info["out"])
        lines = [f"# {info['text']}",
                 f"{name} = np.zeros({self.shape_code(self.tensors[info['out']])}, dtype=DT)"]
        limits = list(body.limits)
        red_vars = [v for v, _, _ in limits]
        function, at = _scatter(body.function, loop_vars)
        blocks = [_Block(set(red_vars) | set(loop_vars) | self.outer_bound)]
        value = self.emit_expr(function, blocks)
        target = (self.pe(self.tensors[info["out"]].base[tuple(at.get(v, v) for v in loop_vars)]) if at
                  else "%s[%s]" % (name, ", ".join(str(v) for v in loop_vars)))
        nested = blocks[0].lines + [f"{target} += {value}"]
        if at:       # an output index fixed by the term's condition: written there, not looped over
            nested = [f"# scatter: the condition {comment_text(', '.join(f'{v} = {e}' for v, e in at.items()))} "
                      f"picks the one entry each term adds to"] + nested
        for header in reversed(self.accumulate_order(function, limits, loop_vars, shape, at)):
            nested = [header] + [IND + ln for ln in nested]
        lines += nested
        return Kernel("accumulate", [info["text"]], [info["out"]], lines)

    def accumulate_order(self, function, limits, loop_vars, shape, at) -> list[str]:
        """The loop headers of an accumulation, outermost first. A plain sum may run its loops in
        any order: where no limit depends on another index, they follow the axes of the largest
        read (``d_b[f] = Σ_{b,h,w} δ[b, f, h, w]`` walks δ in memory order, the innermost loop
        adding into one entry); otherwise the reduction loops go outermost, the output's inside."""
        outs = [(v, f"for {v} in range({self.pe(shape[d])}):") for d, v in enumerate(loop_vars) if v not in at]
        reds = [(v, f"for {self.names[v]} in {self.range_code(lo, hi)}:") for v, lo, hi in limits]
        vars_ = {v for v, _ in outs + reds}
        moving = any((sp.sympify(lo).free_symbols | sp.sympify(hi).free_symbols) & vars_ for _, lo, hi in limits)
        reads = [r for r in sp.sympify(function).atoms(sp.Indexed)
                 if all(isinstance(i, sp.Symbol) for i in r.indices)]
        if moving or not reads:
            return [h for _, h in reversed(reds)] + [h for _, h in outs]
        widest = max(reads, key=lambda r: (len(set(r.indices) & vars_), sp.default_sort_key(r)))
        position = {v: k for k, v in enumerate(widest.indices)}
        ordered = sorted(reversed(reds + outs), key=lambda vh: position.get(vh[0], -1))
        return [h for _, h in ordered]

    def scalar_kernel(self, info) -> Kernel:
        blocks = [_Block(set(self.outer_bound))]
        value = self.emit_expr(info["body"], blocks)
        lines = [f"# {info['text']}"]
        for code, _, _ in info["pre"]:
            lines += code if isinstance(code, list) else [code]
        lines += blocks[0].lines
        lines.append(f"{self.ident(info['out'])} = {value}")
        return Kernel("scalar", [info["text"]], [info["out"]], lines)


def unread_sequences(loop: TimeLoop, later, keep) -> set:
    """The results of ``loop`` that no unit in ``later`` reads and that are not in ``keep``."""
    read = set(keep)
    for u in later:
        for eq in (u.equations if isinstance(u, TimeLoop) else [u]):
            read |= {name for name, _ in eq.reads()}
    return {e.out.name for e in loop.equations} - read


def substitute_index(expr, old, new):
    from ..derive.tensor import substitute
    return substitute(expr, {old: new})


def _affine(e, syms) -> bool:
    """``e`` is affine (integer coefficients) in ``syms``."""
    e = sp.sympify(e)
    if not (e.free_symbols & set(syms)):
        return True
    try:
        poly = sp.Poly(e, *sorted(e.free_symbols & set(syms), key=str))
    except sp.PolynomialError:
        return False
    return poly.total_degree() <= 1 and all(c.is_integer for c in poly.coeffs())


def _rounded(e, up: bool):
    """``ceiling(e)`` (up) or ``floor(e)`` of an index bound, through Max and Min; unchanged if whole."""
    e = sp.sympify(e)
    if isinstance(e, (sp.Max, sp.Min)):
        return e.func(*[_rounded(a, up) for a in e.args])
    if isinstance(e, (sp.floor, sp.ceiling)):
        return e
    if sp.fraction(sp.together(e))[1] == 1:
        return e
    return sp.ceiling(e) if up else sp.floor(e)


def _step_gate(body, s):
    """``body = s · g`` where ``g`` is a product of unit steps (ReLU' after max pooling): g, else None.
    A step is 0 or 1 for every input, NaN included, so ``0 · g = 0`` wherever the scatter adds
    nothing: g can be applied inside the scatter, at the positions it writes, with the same result."""
    if not body.is_Mul or s not in body.args:
        return None
    rest = [a for a in body.args if a is not s]
    if not rest or not all(isinstance(a, step) and not a.has(*REDUCTIONS) for a in rest):
        return None
    return sp.Mul(*rest)


def _holds_everywhere(cond, domains) -> bool:
    """``cond`` (a relation of integer expressions) is true at every point of ``domains`` (symbol ->
    inclusive integer bounds), checked point by point where there are at most 100 000 points; False
    when it cannot be checked, so that the guard is kept."""
    syms = sorted(cond.free_symbols, key=str)
    if cond in (sp.true, True):
        return True
    if not syms or not all(s in domains for s in syms):
        return False
    bounds = [tuple(sp.sympify(b) for b in domains[s]) for s in syms]
    if not all(b.is_Integer for pair in bounds for b in pair):
        return False
    ranges = [range(int(lo), int(hi) + 1) for lo, hi in bounds]
    if math.prod(len(r) for r in ranges) > 100_000:
        return False
    f = sp.lambdify(syms, cond, modules="math")
    return all(f(*pt) for pt in itertools.product(*ranges))


def outermost_reductions(expr) -> list:
    """The reductions of ``expr`` that are not inside another reduction, found top-down.

    (A reduction may also occur *inside* another one, e.g. a mean used alone and within a
    variance: it is still outermost where it occurs alone; its nested occurrence is handled when
    the enclosing reduction's body is emitted, and reuses the same accumulator.)"""
    out, seen, stack = [], set(), [expr]
    while stack:
        e = stack.pop()
        if isinstance(e, REDUCTIONS):
            if e not in seen:
                seen.add(e)
                out.append(e)
            continue
        if not isinstance(e, sp.Indexed):
            stack.extend(reversed(e.args))
    return out


def _scatter(function, loop_vars):
    """``Piecewise((f, Eq(j, e)), (0, True))`` with ``j`` an output index that ``f`` and ``e`` do not
    read (an embedding's gradient ``Σ_{b,t} [j = x[b, t]] δ[b, t, o]``) -> (f, {j: e}): each term
    adds to one entry, so the kernel scatters into ``out[e]`` instead of testing every ``j``."""
    if isinstance(function, sp.Piecewise) and len(function.args) == 2 and function.args[1].expr == 0 \
            and isinstance(function.args[0].cond, sp.Eq):
        f, cond = function.args[0]
        for j, e in ((cond.lhs, cond.rhs), (cond.rhs, cond.lhs)):
            if j in loop_vars and j not in f.free_symbols and j not in sp.sympify(e).free_symbols \
                    and not (set(sp.sympify(e).free_symbols) & set(loop_vars)):
                return f, {j: e}
    return function, {}


def _coefficient(body):
    """The numeric factor of a product (``1/√E`` of scaled scores), 1 for anything else."""
    if body.is_Mul:
        c = sp.Mul(*[f for f in body.args if f.is_number])
        return c if c != 0 else sp.S.One
    return sp.S.One


def _two_reads(product):
    """``c · A[..] · B[..]`` (a number times exactly two reads) -> (c, [A, B]), else None."""
    coeff, factors = sp.S.One, []
    for f in sp.Mul.make_args(product):
        if f.is_number:
            coeff *= f
        elif isinstance(f, sp.Indexed):
            factors.append(f)
        else:
            return None
    return (coeff, factors) if len(factors) == 2 else None


def primitives_used(exprs) -> list[type]:
    seen = {}
    for e in exprs:
        for node in sp.preorder_traversal(to_conventions(e)):
            if isinstance(node, Primitive):
                seen.setdefault(type(node).__name__, type(node))
    return [seen[k] for k in sorted(seen)]
