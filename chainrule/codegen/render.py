"""Rendering one Python/Numba module per (model, dtype) from the Jinja templates."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass

import jinja2
import numpy as np

from ..derive.errors import UnsupportedError
from .lower import IND, Lowerer, comment_text, primitives_used, sanitise

DTYPES = ("float64", "float32")

_ENV = jinja2.Environment(loader=jinja2.PackageLoader("chainrule.codegen", "templates"),
                          undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                          autoescape=False)


def check_dtype(dtype) -> str:
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported: use float64 or float32")
    return name


@dataclass
class Plan:
    """Everything needed to render a model's module, and what the runtime wrapper needs to know."""

    param_names: list
    input_name: str
    target_name: str
    output_names: list
    cost_name: str
    forward: list
    predict: list
    backward: list
    context: dict


def _adjoint_order(composed, model):
    """Adjoint equations in an order valid for evaluation (each after the adjoints it reads)."""
    eqs = {d.adjoint.name: d.equation for d in composed.values()}
    order, state = [], {}

    def visit(name):
        if state.get(name) == "done":
            return
        if state.get(name) == "active":
            raise UnsupportedError(f"codegen: adjoint equations form a cycle through {name}")
        state[name] = "active"
        for dep, _ in eqs[name].reads():
            if dep in eqs:
                visit(dep)
        state[name] = "done"
        order.append(eqs[name])

    for name in eqs:
        visit(name)
    return order


def _needed(model, names):
    """Forward equations needed to compute the given tensors, in model order."""
    need, stack = set(), list(names)
    while stack:
        n = stack.pop()
        if n in need:
            continue
        need.add(n)
        eq = model.equation_for(n)
        if eq is not None:
            stack.extend(r for r, _ in eq.reads())
    return [e for e in model.equations if e.out.name in need]


def plan_model(model, dtype="float64", grads=None) -> Plan:
    from ..derive import derive
    dtype = check_dtype(dtype)
    grads = grads if grads is not None else derive(model)
    from ..derive.backprop import compose, recomputed_inside_reductions
    keep = recomputed_inside_reductions(grads)
    # an adjoint that inlining would recompute inside another reduction gets an array of its own
    composed = compose(grads, keep=keep) if keep else grads.composed
    inputs = [t for t in model.inputs if t.role == "input"]
    targets = [t for t in model.inputs if t.role == "target"]
    if not inputs or len(targets) != 1:
        raise UnsupportedError(f"codegen: models with {len(inputs)} inputs and {len(targets)} targets "
                               "are not supported yet (one or more inputs, exactly one target)")
    x, y = inputs[0], targets[0]
    if not model.outputs:
        raise UnsupportedError("codegen: the model declares no output for predict")
    params = model.params
    if not params:
        raise UnsupportedError(f"codegen: model {comment_text(model.name)!r} has no parameters, so "
                               "there is nothing to train: add a layer with parameters, e.g. dense(N)")
    tensors = dict(model.tensors)
    adjoints = {}
    for name, d in composed.items():
        tensors[d.adjoint.name] = d.adjoint
        adjoints[name] = d.adjoint.name
    lw = Lowerer(model, tensors, cost_adjoint="d_" + model.cost.name)
    ident = lw.ident

    forward_k = lw.lower(model.equations)
    predict_eqs = _needed(model, [model.outputs[0].name])
    if any(r == y.name for e in predict_eqs for r, _ in e.reads()):
        raise UnsupportedError(f"codegen: output {model.outputs[0].name} depends on the target {y.name}")
    predict_k = lw.lower(predict_eqs)
    backward_k = lw.lower(_adjoint_order(composed, model))

    grad_codes, zero_lines, update = [], [], []
    for p in params:
        if p.name in adjoints and p.rank == 0:
            # a rank-0 gradient is computed as a number; returned as a 0-d array like its parameter
            g = f"grad_{sanitise(p.name)}"
            zero_lines.append(f"# d_{p.name} as a 0-d array, like {p.name}\n"
                              f"{g} = np.empty((), dtype=DT)\n{g}[()] = {ident(adjoints[p.name])}")
            grad_codes.append(g)
        elif p.name in adjoints:
            grad_codes.append(ident(adjoints[p.name]))
        else:                                 # does not reach the cost: its gradient is zero
            g = f"zero_{sanitise(p.name)}"
            zero_lines.append(f"# d_{comment_text(p.name)} = 0 (does not reach the cost)\n"
                              f"{g} = np.zeros({lw.shape_code(p)}, dtype=DT)")
            grad_codes.append(g)
    for k, p in enumerate(params):
        loop_vars = [f"i{j}" for j in range(p.rank)]
        shape = lw.concrete_shape(p)
        idx = ", ".join(loop_vars) if loop_vars else "()"
        stmt = [f"{ident(p.name)}[{idx}] -= lr * g{k}[{idx}]"]
        for d in range(p.rank, 0, -1):
            stmt = [f"for {loop_vars[d - 1]} in range({lw.pe(shape[d - 1])}):"] + [IND + s for s in stmt]
        pn = comment_text(p.name)
        update.append("\n".join([f"# {pn} <- {pn} - lr * d_{pn}  (plain SGD, in place)",
                                 f"g{k} = grads[{k}]"] + stmt))

    prims = [textwrap.dedent(c.lowering).strip() for c in primitives_used(
        [e.body for e in model.equations] + [e.body for e in (d.equation for d in composed.values())])]
    tiny = repr(float(np.finfo(np.dtype(dtype)).tiny))
    out = model.outputs[0]
    context = dict(
        model_label=sanitise(model.name), dtype=dtype, tiny=tiny, primitives=prims,
        params=[ident(p.name) for p in params], x=", ".join(ident(t.name) for t in inputs),
        x_first=ident(x.name), y=ident(y.name),
        arg_doc=", ".join(f"{ident(t.name)} = {comment_text(t.name)}" for t in [*params, *inputs, y]),
        output_doc=f"{ident(out.name)} = {comment_text(out.name)}",
        forward=["\n".join(k.lines) for k in forward_k],
        predict=["\n".join(k.lines) for k in predict_k],
        backward=["\n".join(k.lines) for k in backward_k] + zero_lines,
        update=update, cost=ident(model.cost.name), output=ident(out.name), grads=grad_codes)
    return Plan([p.name for p in params], x.name, y.name, [t.name for t in model.outputs],
                model.cost.name, forward_k, predict_k, backward_k, context)


def render_plan(plan: Plan, cache: bool = True) -> str:
    """The module's source; ``cache=False`` renders ``@njit(cache=False)`` (for a module compiled
    in memory, which Numba cannot cache)."""
    return _ENV.get_template("module.py.j2").render(**plan.context, njit_cache=bool(cache))


def render_module(model, dtype="float64") -> str:
    """The generated module's source (what ``chainrule codegen`` prints)."""
    return render_plan(plan_model(model, dtype))
