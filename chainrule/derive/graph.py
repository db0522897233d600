"""A model: a directed acyclic graph of equations from inputs and parameters to a scalar cost."""
from __future__ import annotations

import sympy as sp

from .errors import ShapeError, SpecError, UnsupportedError
from .tensor import Equation, Tensor, affine_bounds, provably_nonneg, shape_str


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
        self.equations = self._topological(equations)
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
                raise UnsupportedError("cycle through " + " -> ".join(path + [name])
                                       + " (recurrences need a time index and a read at t-1)")
            state[name] = "active"
            for dep, _ in defined[name].reads():
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
    for name, idx in eq.reads():
        if name not in tensors:
            if idx:
                raise SpecError(f"{where}{eq.out.name} reads unknown tensor {name}")
            continue                       # a real constant symbol, not a tensor
        t = tensors[name]
        if len(idx) != t.rank:
            raise ShapeError(f"{where}{eq.out.name} reads {name} with {len(idx)} indices "
                             f"but {name} has shape {shape_str(t.shape)}")
        for axis, (e, n) in enumerate(zip(idx, t.shape)):
            unknown = {s for s in sp.sympify(e).free_symbols if s.is_integer and not s.is_positive} - set(ranges)
            if unknown:
                raise ShapeError(f"{where}index {sorted(map(str, unknown))} in {name}{list(idx)} "
                                 f"is neither an index of {eq.out.name} nor summed over")
            bounds = affine_bounds(e, ranges)
            if bounds is None:
                raise UnsupportedError(f"{where}index expression {e} in {name}{list(idx)} is not affine")
            lo, hi = bounds
            if not (provably_nonneg(lo) and provably_nonneg(n - 1 - hi)):
                raise ShapeError(
                    f"{where}{eq.out.name}{list(eq.indices)} {shape_str(eq.out.shape)} reads "
                    f"{name}{list(idx)}: index {e} runs over [{lo}, {hi}] but axis {axis} of "
                    f"{name} {shape_str(t.shape)} has size {n}")
