"""What an exported function computes: a declaration -> a model -> forward and derived adjoint
equations -> array statements printed by a target's printer.

Three kinds of declaration, one path:

* a **model** (a ``Model``, a built-in name or a layer-list spec): the function of its parameters,
  inputs and targets (and random tensors) that returns the cost; its backward is the derived
  gradient of the cost, times the incoming gradient of the cost;
* a **loss** (a ``Loss`` or a loss name, with the width of its prediction): the same, for the model
  made of that loss alone (prediction and target in, batch-mean loss out);
* a **layer** (any ``Layer``: a built-in, an ``Activation``, a user's own, with its input shape): the
  function of its input and parameters that returns the layer's output. Its backward is a
  vector-Jacobian product: chainrule derives it as the gradient of the cost ``C = Σ g ⊙ out`` over a
  probe tensor ``g``, which *is* the incoming gradient of the output. (Penalties a layer adds to a
  model's cost, such as a dense layer's ``l2``, are not part of the layer's function.)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp
from sympy import KroneckerDelta

from ...derive.backprop import compose, derive, recomputed_inside_reductions
from ...derive.deltas import eliminate_deltas
from ...derive.errors import UnsupportedError
from ...derive.graph import Model
from ...derive.layers import B, LOSSES, Builder, Layer, Loss, sequential
from ...derive.recurrence import TimeLoop, flatten
from ...derive.tensor import Equation, Tensor, index, rename_bound
from ..lower import comment_text, pretty
from ..printer import to_conventions
from ..render import _adjoint_order, _needed as needed_equations
from .arrays import identifier
from .loops import loop_block

MODES = ("model", "loss", "layer")


@dataclass
class Argument:
    """One argument of the exported function."""

    name: str            # the chainrule tensor name
    ident: str           # its identifier in the generated code
    role: str            # input | target | noise | param
    shape: tuple         # concrete, with "n_batch" for the batch axis
    init: str | None = None
    meta: dict = field(default_factory=dict)
    simplex_axis: int | None = None


@dataclass
class ExportPlan:
    model: Model
    mode: str
    label: str
    args: list                       # Argument, in the function's order: inputs, targets, noise, params
    forward: list                    # blocks of lines (each starts with the equation's comment)
    result: str                      # the identifier returned
    result_doc: str
    saved: list                      # identifiers the backward pass reads
    backward: list
    grads: list                      # per argument: code of its gradient
    first_input: str
    notes: list = field(default_factory=list)
    float_first: str = ""                         # a float argument: the data's dtype
    integer: list = field(default_factory=list)   # identifiers of integer arguments (token ids)
    id_checks: list = field(default_factory=list)  # IdCheck: the ranges token ids must lie in
    predict: list = field(default_factory=list)   # a model's prediction (its first output), no target
    prediction: str | None = None
    buffers: list = field(default_factory=list)   # Argument: non-trainable state (running averages)
    running: list = field(default_factory=list)   # blocks: the buffers' new values after a step
    running_out: list = field(default_factory=list)
    evaluate: list = field(default_factory=list)  # blocks: the result in evaluation mode


def model_of(declaration, inputs=None) -> tuple[Model, str]:
    """(model, mode) for a declaration; ``inputs``: the input width or shape of a layer or a loss."""
    from ...derive import build_model
    if isinstance(declaration, Model):
        return declaration, "model"
    if isinstance(declaration, str) and declaration.strip() in LOSSES:
        declaration = LOSSES[declaration.strip()]()
    if isinstance(declaration, str):
        return build_model(declaration), "model"
    if isinstance(declaration, Loss):
        if inputs is None:
            raise UnsupportedError(f"export: loss {declaration.name} needs the width of its prediction "
                                   f"(inputs=N)")
        return sequential(inputs, [], declaration, name=f"loss-{declaration.name}"), "loss"
    if isinstance(declaration, Layer):
        if inputs is None:
            raise UnsupportedError(f"export: layer {declaration.describe()} needs its input shape "
                                   f"(inputs=N for (batch, N), or (C, H, W) / (C, L), or (T, N) for a sequence)")
        return layer_probe(declaration, inputs), "layer"
    raise UnsupportedError(f"export: cannot export a {type(declaration).__name__}: give a Model, a "
                           f"model name or spec, a Layer or a Loss")


def layer_probe(layer: Layer, inputs) -> Model:
    """The layer applied to an input, and the cost ``C = Σ g ⊙ out`` over a probe ``g`` of the
    output's shape: the derived gradient of C is the layer's vector-Jacobian product at ``g``."""
    d = Builder()
    shape = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    names = {1: ("n",), 2: ("C", "L"), 3: ("C", "H", "W")}.get(len(shape))
    declared = getattr(layer, "input_names", None)       # a sequence layer's (T, n)
    if declared is not None and len(declared) == len(shape):
        names = tuple(declared)
    if names is None or not all(isinstance(v, int) and v >= 1 for v in shape):
        raise UnsupportedError(f"export: input shape {inputs!r} of layer {layer.describe()}: give N, "
                               f"(C, L), (T, N) or (C, H, W) positive integers")
    dims = tuple(d.size(n, v) for n, v in zip(names, shape))
    x = d.tensor("x", (B, *dims), role="input", latex="x")
    if layer.has_params:
        d.level += 1
    d.layer = f"1:{layer.describe()}"
    out = layer.build(d, x)
    if out is x:
        raise UnsupportedError(f"export: layer {layer.describe()} defines no equation (it returns its "
                               f"input unchanged): there is nothing to export")
    d.layer = "upstream"
    taken = {t.name for t in d.tensors}
    name = next(n for n in ("grad", "grad_out", "grad_probe") + tuple(f"grad{k}" for k in range(99))
                if n not in taken)
    g = Tensor(name, out.shape, role="target", latex=r"\bar{g}", layer="upstream")
    d.tensors.append(g)
    idx = tuple(index(f"q{k}") for k in range(out.rank))
    body = g[idx] * out[idx]
    for v, n in reversed(list(zip(idx, out.shape))):
        body = sp.Sum(body, (v, 0, n - 1))
    cost = Tensor("C", (), role="cost", latex="C", layer="upstream")
    eqs = d.equations + [Equation(cost, (), body, layer="upstream",
                                  note="the probe cost: the incoming gradient g times the output")]
    model = Model(eqs, d.tensors + [cost], cost, outputs=[out], size_values=d.size_values,
                  name=type(layer).__name__ if layer.describe() == "layer" else layer.describe(),
                  layers=d.layer_log)
    d.finish(model)                  # constants, buffers and evaluation forms, as a model gets them
    model.probe = g.name
    model.dropped_penalties = [note for _, note, _ in d.penalties]
    return model


def plan_export(declaration, printer_cls, inputs=None) -> ExportPlan:
    model, mode = model_of(declaration, inputs)
    probe = getattr(model, "probe", None)
    sizes = {s: sp.Integer(int(v)) for s, v in model.size_values.items()}
    consts = {s: sp.Float(v) for s, v in getattr(model, "constants", {}).items()}

    def concrete(t):
        shape = tuple(sp.sympify(s).xreplace(sizes) for s in t.shape)
        bad = [s for s in shape if s.free_symbols - {B}]
        if bad:
            raise UnsupportedError(f"export: tensor {t.name} has size {bad[0]} with no value")
        return shape

    roles = ("input", "target", "noise", "param")
    tensors = [t for r in roles for t in model.tensors.values() if t.role == r and t.name != probe]
    if not any(t.role == "input" for t in tensors):
        raise UnsupportedError(f"export: model {comment_text(model.name)!r} has no input")
    _refuse_what_cannot_be_printed(model)
    integer = index_tensors(model)       # token ids: integer tensors with no gradient
    wrt = [t.name for t in tensors if t.role != "param" and t.name not in integer]
    composed = _derived(model, wrt)

    taken: set = set()
    names, shapes = {}, {}
    for t in list(model.tensors.values()) + [d.adjoint for d in composed.values()]:
        if t.name == probe:
            continue
        names[t.name] = identifier(t.name, taken)
        if t.rank == 0:
            names[t.symbol] = names[t.name]
        shapes[t.name] = concrete(t)
    if probe is not None:                          # the probe is the incoming gradient
        names[probe] = "grad"
        shapes[probe] = concrete(model.tensors[probe])

    args = []
    for t in tensors:
        shape = tuple("n_batch" if s == B else int(s) for s in shapes[t.name])
        args.append(Argument(t.name, names[t.name], t.role, shape, init=t.init, meta=dict(t.meta),
                             simplex_axis=t.simplex_axis))
    first = next(a.ident for a in args if a.role == "input")
    # the data's dtype comes from a float argument (token ids are integers)
    float_first = next(a.ident for a in args if a.name not in integer)

    result_tensor = model.outputs[0] if mode == "layer" else model.cost
    bwd_eqs = _adjoint_order(composed, model)        # units: a recurrence's adjoints are a time loop
    read = {r for e in flatten(bwd_eqs) for r, _ in e.reads()}
    # the forward pass computes the result and every forward tensor the backward pass reads
    fwd_eqs = _needed(model, [result_tensor.name] + [n for n in read if model.equation_for(n) is not None
                                                      and model.tensors[n].role != "cost"])
    printer = printer_cls(names, shapes)
    printer.integer = {names[n] for n in integer}
    printer.taken = taken              # temporaries never take a tensor's name
    forward = [_block(printer, eq, sizes, consts) for eq in fwd_eqs]
    backward = [_block(printer, eq, sizes, consts) for eq in bwd_eqs]

    computed = {e.out.name for e in flatten(fwd_eqs)}
    saved = list(dict.fromkeys([first, float_first])) + [names[n] for n in model.tensors if n in read and n != probe and names[n] not in (first, float_first)
                       and (n in computed or n in {a.name for a in args})]
    scale = "" if mode == "layer" else "grad * "
    grad_codes = []
    for a in args:
        if a.name in composed:
            grad_codes.append(scale + names[composed[a.name].adjoint.name])
        else:                                    # does not reach the result: its gradient is zero
            grad_codes.append(None)
    notes = []
    for what in getattr(model, "dropped_penalties", []):
        notes.append(f"{comment_text(what)}: a term of a model's cost, not of the layer's function "
                     f"(use the optimiser's weight decay, or export the whole model)")
    for eq in getattr(model, "constraints", []):
        notes.append(f"{comment_text(eq.note)}: a projection after each update, not part of the "
                     f"exported function (apply it in the training loop)")
    label = comment_text(model.name)
    doc = (f"{names[result_tensor.name]} = {comment_text(result_tensor.name)}, the layer's output"
           if mode == "layer" else f"{names[result_tensor.name]}, the cost (the batch mean of the loss)")
    plan = ExportPlan(model, mode, label, args, forward, names[result_tensor.name], doc, saved,
                      backward, grad_codes, first, notes, float_first=float_first,
                      integer=[a.ident for a in args if a.name in integer],
                      id_checks=id_checks(model, names, shapes))
    buffers = [t for t in model.tensors.values() if t.role == "buffer"]
    updates = list(getattr(model, "buffer_updates", []))
    # evaluation mode: the equations with their evaluation forms (none in a recurrent model: refused)
    eval_eqs = model.evaluation_equations() if getattr(model, "eval_equations", {}) else model.schedule
    if buffers:
        for t in buffers:
            shape = tuple("n_batch" if v == B else int(v) for v in shapes[t.name])
            plan.buffers.append(Argument(t.name, names[t.name], "buffer", shape, init=t.init or "zeros"))
        for eq in updates:
            names[eq.out.name] = identifier(eq.out.name, taken)
            shapes[eq.out.name] = concrete(eq.out)
        reads = [r for eq in updates for r, _ in eq.reads()]
        plan.running = [_block(printer, eq, sizes, consts) for eq in _needed(model, reads)] + \
                       [_block(printer, eq, sizes, consts) for eq in updates]
        by_buffer = {eq.out.meta["buffer"]: names[eq.out.name] for eq in updates}
        plan.running_out = [by_buffer.get(t.name, names[t.name]) for t in buffers]
        plan.evaluate = [_block(printer, eq, sizes, consts)
                         for eq in _needed(model, [result_tensor.name], equations=eval_eqs)]
    if mode != "layer" and model.outputs:
        out = model.outputs[0]
        pred_eqs = _needed(model, [out.name], equations=eval_eqs)
        targets = {a.name for a in args if a.role == "target"}
        if not any(r in targets for e in flatten(pred_eqs) for r, _ in e.reads()):
            plan.predict = [_block(printer, eq, sizes, consts) for eq in pred_eqs]
            plan.prediction = names[out.name]
    return plan


@dataclass
class IdCheck:
    """Token ids ``ident`` select positions ``0 <= id < rows`` of axis ``axis`` of ``table``: checked
    on entry (a clear error, never a silent clamp)."""

    ident: str
    label: str          # the ids' name
    shape: str          # the ids' declared shape, e.g. (B, 4)
    rows: int
    layer: str
    table: str          # the table's name and shape, e.g. E1 (6, 3)


def id_checks(model, names, shapes) -> list:
    """The checks the token ids of ``model`` need: for each read ``E[.., x[b, t], ..]`` whose index is
    a plain read of an integer tensor, the range of the axis it selects (once per ids and range)."""
    integer = index_tensors(model)
    out, seen = [], set()
    for eq in model.equations:
        for read in sorted(sp.sympify(eq.body).atoms(sp.Indexed), key=sp.default_sort_key):
            table = str(read.base.label)
            for axis, e in enumerate(read.indices):
                if not (isinstance(e, sp.Indexed) and str(e.base.label) in integer):
                    continue
                ids = str(e.base.label)
                rows = int(shapes[table][axis])
                if (ids, rows) in seen:
                    continue
                seen.add((ids, rows))
                dims = ", ".join("B" if d == B else str(d) for d in shapes[ids])
                tdims = ", ".join("B" if d == B else str(d) for d in shapes[table])
                out.append(IdCheck(names[ids], comment_text(ids), f"({dims}{',' if len(shapes[ids]) == 1 else ''})",
                                   rows, comment_text(eq.layer or "?"), f"{comment_text(table)} ({tdims})"))
    return out


def index_tensors(model) -> set:
    """Names of the tensors whose values are positions in another tensor (token ids, read as
    ``E[x[b, t], o]``): they hold integers and have no gradient."""
    out = set()
    for eq in model.equations:
        for x in sp.sympify(eq.body).atoms(sp.Indexed):
            for i in x.indices:
                out |= {str(y.base.label) for y in sp.sympify(i).atoms(sp.Indexed)}
    return out


def _needed(model, names, equations=None):
    """The units (equations and time loops, in evaluation order) of ``equations`` (default: the
    model's schedule) that the given tensors need: the Numba lowering's own selection."""
    units = model.schedule if equations is None else equations
    need = {e.out.name for e in needed_equations(flatten(units), names)}
    return [u for u in units if (set(u.names) & need if isinstance(u, TimeLoop) else u.out.name in need)]


def _refuse_what_cannot_be_printed(model):
    """Constructs the array printers cannot print yet, refused with the layer that declared them
    (before anything is derived or written): a recurrence with evaluation-mode equations (batch
    norm's running averages inside a recurrent model; the Numba target refuses it too)."""
    loops = [u for u in model.schedule if isinstance(u, TimeLoop)]
    if loops and getattr(model, "eval_equations", {}):
        eq = loops[0].equations[0]
        raise UnsupportedError(
            f"export: layer {comment_text(eq.layer or '?')}: a recurrent model with evaluation-mode "
            f"equations (running averages) is not supported yet")


_DERIVED: dict = {}


def _derived(model, wrt) -> dict:
    """The composed adjoint equations of ``model`` (w.r.t. its parameters and ``wrt``), derived once
    per process and model: the torch and the JAX export of one declaration share the derivation."""
    from ..cache import model_fingerprint
    key = (model_fingerprint(model), tuple(wrt))
    if key not in _DERIVED:
        grads = derive(model, wrt=wrt)
        keep = recomputed_inside_reductions(grads)
        _DERIVED[key] = compose(grads, keep=keep) if keep else grads.composed
    return _DERIVED[key]


def _prepared(eq, sizes, consts):
    """An equation's body ready to print: zero padding as the engine's gather form (guarded reads),
    sizes and constants substituted, the step convention applied, no bound index named as a free one."""
    body = sp.sympify(eq.body)
    if body.has(KroneckerDelta):
        body, _ = eliminate_deltas(body, eq.ranges())
    body = to_conventions(body.xreplace(sizes).xreplace(consts))
    return rename_bound(body, set(eq.indices))


def _block(printer, unit, sizes, consts) -> str:
    """The lines computing one unit of a schedule (an equation, after a comment naming it; or a time
    loop, ``loops.loop_block``)."""
    if isinstance(unit, TimeLoop):
        return loop_block(printer, unit, lambda eq: _prepared(eq, sizes, consts))
    eq = unit
    body = _prepared(eq, sizes, consts)
    out = printer.names[eq.out.name]
    shape = printer.shapes[eq.out.name]
    for i, n in zip(eq.indices, shape):
        printer.enter(i, 0, n - 1)
    try:
        lines = printer.statement(out, eq.indices, body)
    finally:
        for i in eq.indices:
            printer.leave(i)
    note = f" ({comment_text(eq.note)})" if eq.note else ""
    return "\n".join([f"# {pretty(eq)}{note}"] + lines)
