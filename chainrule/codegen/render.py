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
    optimizer: str = "sgd"
    state_names: list = None
    hyper_names: list = None


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


def plan_model(model, dtype="float64", grads=None, optimizer="sgd") -> Plan:
    from ..derive import derive
    from ..derive.optimizers import get_rule
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
    lw = Lowerer(model, tensors, cost_adjoint="d_" + model.cost.name, dtype=dtype)
    ident = lw.ident

    out = model.outputs[0]
    # what each function returns (or its next part reads) stays an array; the rest may be a
    # scalar local of a fused loop
    forward_k = lw.lower(model.equations, keep={model.cost.name, out.name})
    predict_eqs = _needed(model, [out.name])
    if any(r == y.name for e in predict_eqs for r, _ in e.reads()):
        raise UnsupportedError(f"codegen: output {out.name} depends on the target {y.name}")
    predict_k = lw.lower(predict_eqs, keep={out.name})
    backward_eqs = _adjoint_order(composed, model)
    backward_k = lw.lower(backward_eqs, keep=set(adjoints.values()))
    read_by_backward = {r for e in backward_eqs for r, _ in e.reads()}
    train_k = lw.lower(model.equations, keep={model.cost.name} | read_by_backward)

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
    rule = get_rule(optimizer)
    update, state_args, update_eqs = _lower_update(rule, params, [ident(p.name) for p in params], lw)
    for eq in getattr(model, "constraints", []):
        # a projection after the update: lowered like every equation, written into the parameter
        proj = Lowerer(model, {eq.out.name: eq.out, eq.out.meta["param"]: model.tensors[eq.out.meta["param"]]},
                       dtype=dtype)
        proj.names[eq.out.meta["param"]] = ident(eq.out.meta["param"])
        proj.names[eq.out.name] = ident(eq.out.meta["param"])
        proj.preallocated.add(eq.out.name)
        update.append("\n".join([f"# {comment_text(eq.note)} (declared projection, after the update)"]
                                 + [ln for k in proj.lower([eq]) for ln in k.lines]))
        update_eqs.append(eq.body)
    hyper = ["t", "clip", "seed"] + [h.name for h in rule.hyperparameters]
    noise_train, noise_eval = [], []
    for t in model.tensors.values():
        if t.role != "noise":
            continue
        shape, name, dist = lw.shape_code(t), ident(t.name), t.meta.get("dist")
        if dist == "bernoulli":
            keep = repr(float(t.meta["keep"]))
            noise_train.append(f"{name} = (np.random.random({shape}) < {keep}).astype(DT)  # {t.name} ~ Bernoulli({keep})")
            noise_eval.append(f"{name} = np.full({shape}, {keep}, dtype=DT)  # {t.name}: its mean")
        elif dist == "normal":
            noise_train.append(f"{name} = np.random.standard_normal({shape}).astype(DT)  # {t.name} ~ N(0, 1)")
            noise_eval.append(f"{name} = np.zeros({shape}, dtype=DT)  # {t.name}: its mean")
        else:
            raise UnsupportedError(f"codegen: random tensor {t.name} has unknown distribution {dist!r}")

    prims = [textwrap.dedent(c.lowering).strip() for c in primitives_used(
        [e.body for e in model.equations] + [e.body for e in (d.equation for d in composed.values())]
        + update_eqs)]
    tiny = repr(float(np.finfo(np.dtype(dtype)).tiny))
    context = dict(
        model_label=sanitise(model.name), dtype=dtype, tiny=tiny, primitives=prims,
        params=[ident(p.name) for p in params], x=", ".join(ident(t.name) for t in inputs),
        x_first=ident(x.name), y=ident(y.name),
        arg_doc=", ".join(f"{ident(t.name)} = {comment_text(t.name)}" for t in [*params, *inputs, y]),
        output_doc=f"{ident(out.name)} = {comment_text(out.name)}",
        forward=["\n".join(k.lines) for k in forward_k],
        forward_train=["\n".join(k.lines) for k in train_k],
        predict=["\n".join(k.lines) for k in predict_k],
        backward=["\n".join(k.lines) for k in backward_k] + zero_lines,
        update=update, cost=ident(model.cost.name), output=ident(out.name), grads=grad_codes,
        optimizer=rule.name, optimizer_title=rule.title, states=state_args,
        noise_train=noise_train, noise_eval=noise_eval,
        hyper=[(k, f"u_hp_{h}") for k, h in enumerate(hyper)],
        train_args=", ".join([ident(p.name) for p in params] + state_args + [ident(t.name) for t in inputs] + [ident(y.name)]))
    return Plan([p.name for p in params], x.name, y.name, [t.name for t in model.outputs],
                model.cost.name, forward_k, predict_k, backward_k, context,
                optimizer=rule.name, state_names=[s for s in rule.state], hyper_names=hyper)


def _lower_update(rule, params, param_codes, lw_main):
    """The optimiser's declared update equations, instantiated for every parameter (as a flat view
    of its elements) and lowered by the same ``Lowerer`` and printer as the model's equations.

    The gradient read ``g[i]`` becomes ``κ·g[i]`` with κ the global-norm clipping factor (1 when
    clipping is off); the last version of θ and of each state is written in place.
    """
    from types import SimpleNamespace

    import sympy as sp

    from ..derive.optimizers import I, N, STEP
    from ..derive.tensor import Tensor, size
    kappa = sp.Symbol("gscale", positive=True)
    finals = rule.final_versions()
    blocks, state_args, eqs_out = [], [], []
    for k, p in enumerate(params):
        numel = 1
        for d in lw_main.concrete_shape(p):
            numel *= int(d)
        n_k = size(f"N_{k}")
        tensors, names = {}, {}
        for name, t in rule._all_tensors.items():
            tensors[name] = Tensor(name, (n_k,), role=t.role, latex=t.latex)
        lw = Lowerer(SimpleNamespace(size_values={n_k: numel}), tensors, dtype=lw_main.dtype)
        names["theta"] = f"u_p{k}"
        names["g"] = f"u_g{k}"
        for st in rule.state:
            names[st] = f"u_f{k}_{st}"                # a flat view of the state argument
            state_args.append(f"u_s{k}_{st}")
        for name in tensors:
            if name not in names:
                names[name] = f"u_{k}_{sanitise(name)}"
        for target, final in finals.items():
            names[final] = names[target]            # the new value overwrites the old, in place
            lw.preallocated.add(final)
        lw.names.update(names)
        for h in rule.hyperparameters:
            lw.names[h] = f"u_hp_{h.name}"
        lw.names[STEP] = "u_hp_t"
        lw.names[kappa] = "u_gscale"
        eqs = []
        for eq in rule.equations():
            body = eq.body.xreplace({rule.tensors["g"][I]: kappa * rule.tensors["g"][I]})
            body = body.xreplace({N: n_k})
            eqs.append(type(eq)(tensors[eq.out.name], eq.indices, body, layer=eq.layer, note=eq.note))
        eqs_out += [e.body for e in eqs]
        kernels = lw.lower(eqs)
        head = [f"# {rule.name} update of {comment_text(p.name)} (declared in chainrule.derive.optimizers, "
                f"lowered like every equation; theta = {p.name}, flat)",
                f"u_p{k} = {param_codes[k]}.reshape({numel})",
                f"u_g{k} = np.ascontiguousarray(u_grads[{k}]).reshape({numel})"]
        head += [f"u_f{k}_{st} = u_s{k}_{st}.reshape({numel})" for st in rule.state]
        blocks.append("\n".join(head + [ln for kern in kernels for ln in kern.lines]))
    return blocks, state_args, eqs_out


def render_plan(plan: Plan, cache: bool = True) -> str:
    """The module's source; ``cache=False`` renders ``@njit(cache=False)`` (for a module compiled
    in memory, which Numba cannot cache)."""
    return _ENV.get_template("module.py.j2").render(**plan.context, njit_cache=bool(cache))


def render_module(model, dtype="float64", optimizer="sgd") -> str:
    """The generated module's source (what ``chainrule codegen`` prints)."""
    return render_plan(plan_model(model, dtype, optimizer=optimizer))
