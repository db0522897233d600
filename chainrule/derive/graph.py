"""A model: a directed acyclic graph of equations from inputs and parameters to a scalar cost."""
from __future__ import annotations

import sympy as sp

from .errors import ShapeError, SpecError, UnsupportedError
from .recurrence import explain_cycle, flatten, infer_time_axes, resolve, schedule, time_shift
from .tensor import Equation, Tensor, affine_bounds, provably_nonneg, shape_str


def same_step_reads(eq: Equation, tensors: dict):
    """The reads of ``eq`` except those of a declared recurrent tensor at an earlier time ``t - k``
    (which an order of the equations need not respect: a time loop computes them first)."""
    out = []
    for name, idx in eq.reads():
        t = tensors.get(name)
        if t is not None and "initial" in t.meta and idx:
            shift = time_shift(idx[t.meta["time_axis"]], eq.indices)
            if shift is not None and shift[1] < 0:
                continue
        out.append((name, idx))
    return out


class Model:
    """Equations in topological order, the tensors they use, and the sizes' values.

    ``cost`` is the rank-0 tensor being minimised (the batch mean of the per-example ``loss``).
    ``outputs`` are what prediction returns (e.g. the probabilities ``p``).
    """

    def __init__(self, equations, tensors, cost: Tensor, *, loss: Tensor | None = None,
                 outputs=(), size_values=None, name="model", layers=()):
        self.name = name
        self.tensors: dict[str, Tensor] = {t.name: t for t in tensors}
        self.cost = cost
        self.loss = loss
        self.outputs = list(outputs)
        self.size_values = dict(size_values or {})
        self.layers = list(layers)       # (layer name, description) pairs, for explanations
        self.constants: dict = {}        # named constants (regularisation strengths): symbol -> value
        self.constant_latex: dict = {}
        self.constraints: list = []      # projections of parameters after each update (max-norm)
        self.buffer_updates: list = []   # running averages: a buffer's new value after a training step
        self.eval_equations: dict = {}   # tensor name -> its equation in evaluation mode (batch norm)
        # a recurrence's reads before t = 0 give its declared initial state (recurrence.py)
        equations = resolve(list(equations), self.tensors)
        ordered = self._topological(equations)
        infer_time_axes(ordered, self.tensors)
        # units: equations, and time loops of equations that read each other across time
        self.schedule = schedule(ordered)
        self.equations = flatten(self.schedule)
        for eq in self.equations:
            check_equation(eq, self.tensors)

    # -- structure -------------------------------------------------------------------------
    def _topological(self, equations):
        defined = {}
        for eq in equations:
            if eq.out.name in defined:
                raise SpecError(f"tensor {eq.out.name} is defined twice "
                                f"(layers {defined[eq.out.name].layer} and {eq.layer})")
            if eq.out.role in ("input", "target", "param"):
                raise SpecError(f"layer {eq.layer}: {eq.out.role} {eq.out.name} cannot be defined by an equation")
            defined[eq.out.name] = eq
        order, state = [], {}

        def visit(name, path):
            if state.get(name) == "done" or name not in defined:
                return
            if state.get(name) == "active":
                raise UnsupportedError(explain_cycle(path[path.index(name):] + [name], defined))
            state[name] = "active"
            for dep, _ in same_step_reads(defined[name], self.tensors):
                visit(dep, path + [name])
            state[name] = "done"
            order.append(defined[name])

        for eq in equations:
            visit(eq.out.name, [])
        return order

    def equation_for(self, name: str) -> Equation | None:
        return next((e for e in self.equations if e.out.name == name), None)

    def consumers(self, name: str) -> list[Equation]:
        return [e for e in self.equations if any(r == name for r, _ in e.reads())]

    @property
    def params(self) -> list[Tensor]:
        return [t for t in self.tensors.values() if t.role == "param"]

    @property
    def buffers(self) -> list[Tensor]:
        """Non-trainable state (running averages), in declaration order."""
        return [t for t in self.tensors.values() if t.role == "buffer"]

    def evaluation_equations(self) -> list[Equation]:
        """The equations of evaluation mode: those with a declared evaluation form replaced by it."""
        return [self.eval_equations.get(e.out.name, e) for e in self.equations]

    @property
    def inputs(self) -> list[Tensor]:
        return [t for t in self.tensors.values() if t.role in ("input", "target")]

    def sizes(self) -> list[sp.Symbol]:
        syms = set()
        for t in self.tensors.values():
            for s in t.shape:
                syms |= s.free_symbols
        return sorted(syms, key=str)

    def concrete_shape(self, tensor: Tensor, **overrides) -> tuple[int, ...]:
        values = {**self.size_values, **{sp.Symbol(k, integer=True, positive=True): v
                                         for k, v in overrides.items()}}
        out = []
        for s in tensor.shape:
            v = s.subs(values)
            if not v.is_Integer:
                raise ShapeError(f"tensor {tensor.name} {shape_str(tensor.shape)}: size {s} has no value")
            out.append(int(v))
        return tuple(out)

    def __repr__(self):
        return f"Model({self.name}: {len(self.equations)} equations, params {[p.name for p in self.params]})"


# -- validation -----------------------------------------------------------------------------
def check_equation(eq: Equation, tensors: dict[str, Tensor]):
    """Every read names a known tensor of the right rank, with indices inside its axes."""
    where = f"layer {eq.layer}: " if eq.layer else ""
    ranges = dict(eq.ranges())
    for s in eq.body.atoms(sp.Sum):
        for var, lo, hi in s.limits:
            ranges[var] = (lo, hi)
    from .primitives import LogSumExp, MaxOver
    for s in eq.body.atoms(LogSumExp, MaxOver):
        for var, lo, hi in s.limits:
            ranges[var] = (lo, hi)
    for name, idx, ranges in _reads_with_ranges(eq.body, ranges):
        if name not in tensors:
            if idx:
                raise SpecError(f"{where}{eq.out.name} reads unknown tensor {name}")
            continue                       # a real constant symbol, not a tensor
        t = tensors[name]
        if len(idx) != t.rank:
            raise ShapeError(f"{where}{eq.out.name} reads {name} with {len(idx)} indices "
                             f"but {name} has shape {shape_str(t.shape)}")
        for axis, (e, n) in enumerate(zip(idx, t.shape)):
            if isinstance(e, sp.Indexed):            # an embedding: a table row selected by a token id
                check_token_index(eq, where, name, idx, axis, e, n, tensors)
                continue
            unknown = {s for s in sp.sympify(e).free_symbols if s.is_integer and not s.is_positive} - set(ranges)
            if unknown:
                raise ShapeError(f"{where}index {sorted(map(str, unknown))} in {name}{list(idx)} "
                                 f"is neither an index of {eq.out.name} nor summed over")
            bounds = affine_bounds(e, ranges)
            if bounds is None:
                raise UnsupportedError(f"{where}index expression {e} in {name}{list(idx)} is not affine")
            lo, hi = _outer_bounds(bounds, ranges)
            if not (provably_nonneg(lo) and provably_nonneg(n - 1 - hi)):
                raise ShapeError(
                    f"{where}{eq.out.name}{list(eq.indices)} {shape_str(eq.out.shape)} reads "
                    f"{name}{list(idx)}: index {e} runs over [{lo}, {hi}] but axis {axis} of "
                    f"{name} {shape_str(t.shape)} has size {n}")


def _outer_bounds(bounds, ranges, depth=4):
    """Bounds free of indices: a limit that is itself an index (``Σ_{v=0}^{t}``: the causal softmax's
    normaliser) is replaced by that index's own bound, from the inside out."""
    lo, hi = bounds
    for _ in range(depth):
        if not ((sp.sympify(lo).free_symbols | sp.sympify(hi).free_symbols) & set(ranges)):
            break
        lo_b, hi_b = affine_bounds(lo, ranges), affine_bounds(hi, ranges)
        if lo_b is None or hi_b is None:
            break
        lo, hi = lo_b[0], hi_b[1]
    return lo, hi


def _reads_with_ranges(body, ranges):
    """(tensor, indices, index ranges) for every read of ``body``; a read inside a branch whose
    condition bounds one index (``t < 1``: the initial state of a recurrence) sees that index's range
    narrowed by the condition (and by the negation of the branches before it)."""
    from .recurrence import Delayed
    from .tensor import reads_of
    if isinstance(body, Delayed):            # the read where its time is >= 0, the initial state before
        initial, read, when = body.args
        return (_reads_with_ranges(initial, _narrow(ranges, sp.StrictLessThan(when, 0), False))
                + _reads_with_ranges(read, _narrow(ranges, sp.GreaterThan(when, 0), False)))
    if isinstance(body, sp.Piecewise):
        out, before = [], []
        for expr, cond in body.args:
            narrowed = dict(ranges)
            for c, negate in [(c, True) for c in before] + [(cond, False)]:
                narrowed = _narrow(narrowed, c, negate)
            out += _reads_with_ranges(expr, narrowed)
            before.append(cond)
        return out
    if isinstance(body, sp.Indexed) or not body.args:
        return [(n, i, ranges) for n, i in reads_of(body)]
    out = []
    for a in body.args:
        out += _reads_with_ranges(a, ranges)
    return out


def _narrow(ranges, cond, negate):
    """``ranges`` with the index bounded by ``cond`` (or its negation) narrowed: only a comparison of
    one index with an expression of sizes is understood; anything else leaves the ranges as they are."""
    if not isinstance(cond, (sp.StrictLessThan, sp.LessThan, sp.StrictGreaterThan, sp.GreaterThan)):
        return ranges
    if negate:
        cond = cond.negated
    diff = sp.expand(cond.lhs - cond.rhs)          # cond: diff < 0, <= 0, > 0 or >= 0
    var = [v for v in diff.free_symbols if v in ranges and diff.coeff(v) in (1, -1)]
    if len(var) != 1 or (diff.free_symbols - {var[0]}) & set(ranges):
        return ranges
    v = var[0]
    sign = diff.coeff(v)
    rest = sp.expand(diff - sign * v)
    op = {sp.StrictLessThan: "<", sp.LessThan: "<=", sp.StrictGreaterThan: ">", sp.GreaterThan: ">="}[type(cond)]
    if sign == -1:                                  # -v + rest op 0  <=>  v op' rest
        op = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}[op]
        bound = rest
    else:
        bound = -rest
    lo, hi = ranges[v]
    if op == "<":
        hi = sp.Min(hi, bound - 1)
    elif op == "<=":
        hi = sp.Min(hi, bound)
    elif op == ">":
        lo = sp.Max(lo, bound + 1)
    else:
        lo = sp.Max(lo, bound)
    return {**ranges, v: (lo, hi)}


def check_token_index(eq, where, name, idx, axis, e, n, tensors):
    """``E[x[b, t], o]``: an index that reads a tensor must read token ids (an input declared with a
    vocabulary, ``meta["vocab"]``) whose vocabulary is the length of the axis it indexes."""
    ids = tensors.get(str(e.base.label))
    if ids is None or ids.meta.get("vocab") is None or ids.role != "input":
        raise UnsupportedError(f"{where}index {e} in {name}{list(idx)} reads {e.base.label}, which is not "
                               f"an input of token ids (declared with a vocabulary)")
    if sp.simplify(ids.meta["vocab"] - n) != 0:
        raise ShapeError(f"{where}{eq.out.name} reads {name}{list(idx)}: token ids {ids.name} run over a "
                         f"vocabulary of {ids.meta['vocab']}, but axis {axis} of {name} "
                         f"{shape_str(tensors[name].shape)} has size {n}")
