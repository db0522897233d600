"""Rendering one Python/Numba module per (model, dtype) from the Jinja templates."""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass

import jinja2
import numpy as np

from ..derive.errors import UnsupportedError
from ..derive.recurrence import flatten
from .dtypes import DTYPES, check_dtype  # noqa: F401  (re-exported: render.check_dtype)
from .forward_values import keep_forward_values
from .kept_values import keep_forward_values_flat
from .lower import IND, Lowerer, comment_text, primitives_used, sanitise
from .split import SPLIT_ABOVE_LINES, DriverCode, KernelSplitter, fused_length
from .workspace import use_workspace

_ENV = jinja2.Environment(loader=jinja2.PackageLoader("chainrule.codegen", "templates"),
                          undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                          autoescape=False)


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
    input_grads: bool = False
    split: bool = False          # one compiled function per kernel, Python drivers (split.py)


def _adjoint_order(composed, model):
    """Adjoint equations as units in an order valid for evaluation (each after the adjoints it
    reads at the same step; a recurrence's adjoints as a time loop running backward in time)."""
    from ..derive.recurrence import ordered_units
    try:
        return ordered_units([d.equation for d in composed.values()])
    except UnsupportedError as err:
        raise UnsupportedError(f"codegen: {err}") from None


def _needed(equations, names):
    """The equations (of a list in evaluation order) needed to compute the given tensors."""
    defined = {e.out.name: e for e in equations}
    need, stack = set(), list(names)
    while stack:
        n = stack.pop()
        if n in need:
            continue
        need.add(n)
        if n in defined:
            stack.extend(r for r, _ in defined[n].reads())
    return [e for e in equations if e.out.name in need]


def _needed_units(model, names):
    """The units of ``model.schedule`` (equations and time loops) needed to compute the given tensors."""
    from ..derive.recurrence import TimeLoop
    need = {e.out.name for e in _needed(model.equations, names)}
    return [u for u in model.schedule
            if (set(u.names) & need if isinstance(u, TimeLoop) else u.out.name in need)]


def _lower_two_modes(lw, equations, eval_equations) -> list:
    """The forward equations, where a tensor with an evaluation form (batch norm's statistics) is
    computed in a branch: its training equation when ``u_seed >= 0``, its evaluation equation
    (the running average) otherwise. Without such tensors, the plain lowering of the equations."""
    blocks, group = [], []

    def flush():
        blocks.extend("\n".join(k.lines) for k in lw.lower(group))
        group.clear()
    for eq in equations:
        if eq.out.name not in eval_equations:
            group.append(eq)
            continue
        flush()
        train = "\n".join(ln for k in lw.lower([eq]) for ln in k.lines)
        evaluation = "\n".join(ln for k in lw.lower([eval_equations[eq.out.name]]) for ln in k.lines)
        blocks.append(f"if u_seed >= 0:  # training: {comment_text(eq.note)}\n"
                      + textwrap.indent(train, IND)
                      + f"\nelse:  # {comment_text(eval_equations[eq.out.name].note)}\n"
                      + textwrap.indent(evaluation, IND))
    flush()
    return blocks


def _lower_buffer_updates(model, tensors, lw) -> list:
    """The declared running-average updates, written in place into their buffers after a training
    step's forward pass (they read its batch statistics), lowered like every equation."""
    lines = []
    for eq in getattr(model, "buffer_updates", []):
        buf = eq.out.meta["buffer"]
        upd = Lowerer(model, {**tensors, eq.out.name: eq.out})   # same identifiers as ``lw``
        upd.names.update(lw.names)
        upd.names[eq.out.name] = lw.ident(buf)
        upd.preallocated.add(eq.out.name)
        lines.append("\n".join([f"# {comment_text(eq.note)} (declared running average, in place)"]
                                + [ln for k in upd.lower([eq]) for ln in k.lines]))
    return lines


def _adjoints_needed(units, names):
    """The adjoint units (equations or time loops, in the given evaluation order) that the adjoints
    ``names`` read: a time loop is kept whole when it defines any of them."""
    from ..derive.recurrence import flatten
    by_name = {e.out.name: e for e in flatten(units)}
    need, stack = set(), list(names)
    while stack:
        n = stack.pop()
        if n in need or n not in by_name:
            continue
        need.add(n)
        stack.extend(r for r, _ in by_name[n].reads())
    return [u for u in units if set(getattr(u, "names", None) or [u.out.name]) & need]


def plan_model(model, dtype="float64", grads=None, optimizer="sgd", input_grads=False,
               split=None) -> Plan:
    """Everything the template needs. ``split``: one compiled function per kernel called from
    Python drivers (True), one fused function per driver (False), or by size (None: split when the
    fused ``loss_and_grads`` would exceed ``split.SPLIT_ABOVE_LINES`` lines)."""
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
    if not inputs or not targets:
        raise UnsupportedError(f"codegen: models with {len(inputs)} inputs and {len(targets)} targets "
                               "are not supported yet (one or more inputs, one or more targets)")
    x, y = inputs[0], targets[0]
    target_names = {t.name for t in targets}
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
    composed_in = _input_adjoints(model, inputs) if input_grads else {}
    for d in composed_in.values():
        tensors.setdefault(d.adjoint.name, d.adjoint)
    lw = Lowerer(model, tensors, cost_adjoint="d_" + model.cost.name, dtype=dtype)
    ident = lw.ident

    out = model.outputs[0]
    eval_eqs = getattr(model, "eval_equations", {})
    from ..derive.recurrence import TimeLoop
    recurrent = any(isinstance(u, TimeLoop) for u in model.schedule)
    if recurrent:
        if eval_eqs:
            raise UnsupportedError("codegen: a recurrent model with evaluation-mode equations (batch "
                                   "norm's running averages) is not supported yet")
        # time loops: each recurrence (and its adjoint) as one loop over t; a value the forward
        # step computes and the backward pass needs again (the LSTM's tanh(c)) is kept
        forward_units, backward_units = keep_forward_values(model.schedule, _adjoint_order(composed, model), lw)
        forward_k = lw.lower_units(forward_units)
        forward_modes = ["\n".join(k.lines) for k in forward_k]
        predict_units = _needed_units(model, [model.outputs[0].name])
        if any(r in target_names for e in flatten(predict_units) for r, _ in e.reads()):
            raise UnsupportedError(f"codegen: output {model.outputs[0].name} depends on a target "
                                   f"({', '.join(sorted(target_names))})")
        predict_k = lw.lower_units(predict_units)
    else:
        # what the training forward's later code reads (the backward pass, the running-average
        # updates) or returns stays an array; the rest may be a scalar local of a fused loop
        # a function value the backward evaluates again (GELU's tanh) is kept by the training forward
        forward_eqs, backward_eqs = model.equations, _adjoint_order(composed, model)
        if not eval_eqs and not input_grads:
            forward_eqs, backward_eqs = keep_forward_values_flat(forward_eqs, flatten(backward_eqs), lw)
        read_later = {r for e in flatten(backward_eqs) for r, _ in e.reads()}
        read_later |= {r for e in flatten(_adjoint_order(composed_in, model)) for r, _ in e.reads()} \
            if input_grads else set()
        read_later |= {r for e in model.buffer_updates for r, _ in e.reads()}
        lw.shared_cols = {}                         # the im2col buffers of the training forward
        forward_k = lw.lower(forward_eqs,           # training mode: what loss_and_grads differentiates
                             keep={model.cost.name} | {t.name for t in model.outputs} | read_later)
        train_cols, lw.shared_cols = lw.shared_cols, None
        forward_modes = _lower_two_modes(lw, model.equations, eval_eqs) if eval_eqs else \
            ["\n".join(k.lines) for k in forward_k]
        predict_eqs = _needed(model.evaluation_equations() if eval_eqs else model.equations,
                              [model.outputs[0].name])
        if any(r in target_names for e in predict_eqs for r, _ in e.reads()):
            raise UnsupportedError(f"codegen: output {model.outputs[0].name} depends on a target "
                                   f"({', '.join(sorted(target_names))})")
        predict_k = lw.lower(predict_eqs, keep={out.name})
    buffer_update = _lower_buffer_updates(model, tensors, lw)
    buffers = [ident(t.name) for t in model.buffers]
    # loss_and_grads and input_grads run the backward right after the training forward, in one
    # function: an im2col buffer that forward gathered is read again, not gathered twice
    train_cols = {} if recurrent else train_cols
    lw.shared_cols = dict(train_cols)
    # after the backward pass only its parameter gradients are read (returned, or the update's): a
    # backward time loop stores only the sequences read after it, and the fused kernels know what
    # is live after them
    returned = {adjoints[p.name] for p in params if p.name in adjoints}
    lw.live_after = None if recurrent else returned
    backward_k = lw.lower_units(backward_units if recurrent else backward_eqs, keep=returned)
    lw.shared_cols, lw.live_after = None, None
    outputs_units = (_needed_units(model, [t.name for t in model.outputs]) if recurrent else
                     _needed(model.evaluation_equations() if eval_eqs else model.equations,
                             [t.name for t in model.outputs]))
    outputs_k = lw.lower_units(outputs_units)
    if any(r in target_names for e in flatten(outputs_units) for r, _ in e.reads()):
        raise UnsupportedError(f"codegen: an output of {comment_text(model.name)!r} depends on a target "
                               f"({', '.join(sorted(target_names))})")
    input_adjoints = [composed_in[t.name].adjoint.name for t in inputs] if input_grads else []
    lw.shared_cols = dict(train_cols)
    input_backward_k = lw.lower_units(_adjoints_needed(_adjoint_order(composed_in, model), input_adjoints),
                                      keep=set(input_adjoints)) \
        if input_grads else []
    lw.shared_cols = None

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
        [e.body for e in model.equations] + [e.body for e in model.buffer_updates]
        + [e.body for e in eval_eqs.values()] + [e.body for e in (d.equation for d in composed.values())]
        + update_eqs)]
    context = dict(
        **_header_context(dtype, sanitise(model.name), prims, _has_simplex_fact(model, [*inputs, *targets]),
                          ", ".join(f"{ident(t.name)} = {comment_text(t.name)}"
                                    for t in [*params, *model.buffers, *inputs, *targets])),
        params=[ident(p.name) for p in params], x=", ".join(ident(t.name) for t in inputs),
        x_first=ident(x.name), y=", ".join(ident(t.name) for t in targets),
        output_doc=f"{ident(out.name)} = {comment_text(out.name)}",
        forward=forward_modes, forward_train=["\n".join(k.lines) for k in forward_k], buffers=buffers, buffer_update=buffer_update,
        arguments=[ident(p.name) for p in params] + buffers,
        predict=["\n".join(k.lines) for k in predict_k],
        backward=["\n".join(k.lines) for k in backward_k] + zero_lines,
        outputs_body=["\n".join(k.lines) for k in outputs_k],
        outputs=[ident(t.name) for t in model.outputs],
        outputs_doc=", ".join(f"{ident(t.name)} = {comment_text(t.name)}" for t in model.outputs),
        input_grads=input_grads,
        input_backward=["\n".join(k.lines) for k in input_backward_k],
        input_adjoints=[ident(n) for n in input_adjoints],
        update=update, cost=ident(model.cost.name), output=ident(out.name), grads=grad_codes,
        optimizer=rule.name, optimizer_title=rule.title, states=state_args,
        noise_train=noise_train, noise_eval=noise_eval,
        hyper=[(k, f"u_hp_{h}") for k, h in enumerate(hyper)],
        train_args=", ".join([ident(p.name) for p in params] + state_args + buffers
                             + [ident(t.name) for t in inputs] + [ident(t.name) for t in targets]))
    # written once here, for the fused template and the split drivers alike
    context.update(noise_block_train=_noise_block(context, True), noise_block_eval=_noise_block(context, False),
                   clip_block=_clip_block([math.prod(int(d) for d in lw.concrete_shape(p)) for p in params]))
    if split is None:
        split = fused_length(context) > SPLIT_ABOVE_LINES
    if split:
        _split_drivers(context, rule, params, state_args)
    _workspace_blocks(context, dtype, fused=not split)
    return Plan([p.name for p in params], x.name, y.name, [t.name for t in model.outputs],
                model.cost.name, forward_k, predict_k, backward_k, context,
                optimizer=rule.name, state_names=[s for s in rule.state], hyper_names=hyper,
                input_grads=input_grads, split=bool(split))


def _workspace_blocks(context, dtype, fused: bool):
    """``loss_and_grads``'s blocks with its large temporaries read from the workspace ``u_ws``
    (see workspace.py), and the workspace's allocations; a split module's kernels allocate their
    own (its workspace is empty)."""
    blocks = context["forward_train"] + context["backward"]
    allocations = []
    if fused:
        blocks, allocations = use_workspace(blocks, [context["cost"], *context["grads"]],
                                            np.dtype(dtype).itemsize)
    n = len(context["forward_train"])
    context.update(step_forward=blocks[:n], step_backward=blocks[n:], workspace=allocations)


def _has_simplex_fact(model, arguments) -> bool:
    """Whether an argument of the kernels carries a declared probability fact (Σ_k y[b, k] = 1):
    then the module gets the compiled check the wrapper runs before each kernel call."""
    from .facts import SimplexFact, declared_facts
    return any(isinstance(f, SimplexFact) for f in declared_facts(model, names={t.name for t in arguments}))


def _noise_block(context, training: bool) -> list:
    """The random tensors as one block: drawn from the seed in training, their mean otherwise."""
    if not context["noise_train"]:
        return []
    evaluation = "\n".join(context["noise_eval"])
    if not training:
        return ["# random tensors in evaluation: their mean\n" + evaluation]
    return ["# random tensors (dropout masks, noise): drawn from a seeded generator in training (seed >= 0),\n"
            "# their mean in evaluation (seed < 0)\nif u_seed >= 0:\n"
            + textwrap.indent("np.random.seed(u_seed)\n" + "\n".join(context["noise_train"]), IND)
            + "\nelse:\n" + textwrap.indent(evaluation, IND)]


def _clip_block(numels) -> str:
    """Global-norm gradient clipping's scale, as one block of train_step (fused or split);
    ``numels``: the number of elements of each gradient. Each gradient is summed as a flat view by
    an indexed loop: iterating over ``.ravel()`` made Numba compile an array iterator per gradient
    (the demo's train_step took about 0.6 s of CPU longer to compile)."""
    sums = "".join(f"\n{IND}u_c{k} = np.ascontiguousarray(u_grads[{k}]).reshape({n})"
                   f"\n{IND}for u_i in range({n}):\n{IND}{IND}u_sq += u_c{k}[u_i] * u_c{k}[u_i]"
                   for k, n in enumerate(numels))
    return ("# global-norm gradient clipping: g <- g * min(1, clip / ||g||) (off when clip <= 0)\n"
            "u_gscale = 1.0\nif u_hp_clip > 0.0:\n" + IND + "u_sq = 0.0" + sums
            + f"\n{IND}u_norm = math.sqrt(u_sq)\n{IND}if u_norm > u_hp_clip:\n{IND}{IND}u_gscale = u_hp_clip / u_norm")


def _split_drivers(c, rule, params, state_args):
    """A large model's drivers as kernel calls (``split.KernelSplitter``): the same blocks the
    fused functions hold, each a compiled function of its own (the optimiser's update one function
    for every parameter); sets ``kernels`` and ``split`` in the context ``c``."""
    splitter = KernelSplitter()
    args = c["arguments"] + c["x"].split(", ") + c["y"].split(", ") + ["n_batch", "u_seed"]
    buffer_update = [f"# running average, in place in a training step (seed >= 0)\nif u_seed >= 0:\n"
                     + textwrap.indent(b, IND) for b in c["buffer_update"]]
    splitter.add("forward", c["noise_block_train"] + c["forward"], args, [c["cost"], c["output"]])
    splitter.add("predict", c["noise_block_eval"] + c["predict"], args, [c["output"]])
    splitter.add("loss_and_grads", c["noise_block_train"] + c["forward_train"] + c["backward"] + buffer_update,
                 args, [c["cost"], *c["grads"]])
    splitter.add("outputs", c["noise_block_eval"] + c["outputs_body"], args, c["outputs"])
    updates = _generic_update(rule, params, c["params"], c["dtype"]) \
        + c["update"][len(c["params"]):]                   # then the declared projections, if any
    splitter.add("train_step", [c["clip_block"]] + updates,
                 args + state_args + ["u_hp", "u_cost", "u_grads"] + [h for _, h in c["hyper"]], [])
    if c["input_grads"]:
        splitter.add("input_grads", c["noise_block_train"] + c["forward_train"] + c["input_backward"],
                     args, [c["cost"], *c["input_adjoints"]])
    c["kernels"], c["split"] = splitter.finish()


def _input_adjoints(model, inputs):
    """The composed adjoints of a derivation that also reaches the inputs (``derive(..., wrt=)``):
    what a caller needs to pull a gradient back through this model (a GAN's generator is trained
    through the discriminator's input gradient)."""
    from ..derive import derive
    from ..derive.backprop import compose, recomputed_inside_reductions
    grads = derive(model, wrt=[t.name for t in inputs])
    missing = [t.name for t in inputs if t.name not in grads.derivations]
    if missing:
        raise UnsupportedError(f"codegen: the cost of {comment_text(model.name)!r} does not depend on "
                               f"the inputs {missing}, so they have no gradient")
    keep = recomputed_inside_reductions(grads)
    return compose(grads, keep=keep) if keep else grads.composed


def _lower_update(rule, params, param_codes, lw_main):
    """The optimiser's declared update equations, instantiated for every parameter (as a flat view
    of its elements) and lowered by the same ``Lowerer`` and printer as the model's equations.

    The gradient read ``g[i]`` becomes ``κ·g[i]`` with κ the global-norm clipping factor (1 when
    clipping is off); the last version of θ and of each state is written in place.
    """
    blocks, state_args, eqs_out = [], [], []
    for k, p in enumerate(params):
        numel = 1
        for d in lw_main.concrete_shape(p):
            numel *= int(d)
        lines, eqs = _update_lines(rule, str(k), numel, lw_main.dtype)
        state_args += [f"u_s{k}_{st}" for st in rule.state]
        eqs_out += eqs
        head = [f"# {rule.name} update of {comment_text(p.name)} (declared in chainrule.derive.optimizers, "
                f"lowered like every equation; theta = {p.name}, flat)",
                f"u_p{k} = {param_codes[k]}.reshape({numel})",
                f"u_g{k} = np.ascontiguousarray(u_grads[{k}]).reshape({numel})"]
        head += [f"u_f{k}_{st} = u_s{k}_{st}.reshape({numel})" for st in rule.state]
        blocks.append("\n".join(head + lines))
    return blocks, state_args, eqs_out


def _update_lines(rule, tag: str, numel, dtype) -> tuple[list, list]:
    """(lines, equation bodies) of the update of one flat parameter ``u_p{tag}`` with gradient
    ``u_g{tag}`` and states ``u_f{tag}_<state>``, of ``numel`` elements; ``numel=None``: of
    ``u_n`` elements, a run-time value (one kernel serves every parameter, see
    ``_generic_update``)."""
    from types import SimpleNamespace

    import sympy as sp

    from ..derive.layers import B as BATCH
    from ..derive.optimizers import I, N, STEP
    from ..derive.tensor import Tensor, size
    kappa = sp.Symbol("gscale", positive=True)
    # a run-time length is the one size the Lowerer knows only at run time: the batch's symbol,
    # printed here as u_n
    n_k = size(f"N_{tag}") if numel is not None else BATCH
    finals = rule.final_versions()              # (also declares rule._all_tensors)
    tensors, names = {}, {}
    for name, t in rule._all_tensors.items():
        tensors[name] = Tensor(name, (n_k,), role=t.role, latex=t.latex)
    lw = Lowerer(SimpleNamespace(size_values={} if numel is None else {n_k: numel}), tensors, dtype=dtype)
    if numel is None:
        lw.names[BATCH] = "u_n"
    names["theta"] = f"u_p{tag}"
    names["g"] = f"u_g{tag}"
    for st in rule.state:
        names[st] = f"u_f{tag}_{st}"                # a flat view of the state argument
    for name in tensors:
        if name not in names:
            names[name] = f"u_{tag}_{sanitise(name)}"
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
    return [ln for kern in lw.lower(eqs) for ln in kern.lines], [e.body for e in eqs]


def _generic_update(rule, params, param_codes, dtype) -> list:
    """A split module's updates: one kernel for every parameter (flat views of any length, bound
    by the Python driver before each call), so the optimiser is compiled once, not once per
    parameter. Returns the driver's steps: ``DriverCode`` bindings and the shared kernel block."""
    lines, _ = _update_lines(rule, "", None, dtype)
    kernel = "\n".join([f"# {rule.name} update of one parameter, flat (declared in "
                         "chainrule.derive.optimizers, lowered like every equation)"] + lines)
    steps = []
    for k, p in enumerate(params):
        flat = [f"u_p = {param_codes[k]}.reshape(-1)", f"u_g = np.ascontiguousarray(u_grads[{k}]).reshape(-1)"]
        flat += [f"u_f_{st} = u_s{k}_{st}.reshape(-1)" for st in rule.state]
        steps.append(DriverCode(f"# {rule.name} update of {comment_text(p.name)}, as flat views\n"
                                + "\n".join(flat) + "\nu_n = u_p.shape[0]"))
        steps.append(kernel)
    return steps


def render_plan(plan: Plan, cache: bool = True) -> str:
    """The module's source; ``cache=False`` renders ``@njit(cache=False)`` (for a module compiled
    in memory, which Numba cannot cache)."""
    template = "split_module.py.j2" if plan.split else "module.py.j2"
    return _ENV.get_template(template).render(**plan.context, njit_cache=bool(cache))


def _header_context(dtype, model_label, primitives, simplex_check, arg_doc) -> dict:
    """What the module header (``templates/_header.py.j2``) reads."""
    return dict(model_label=model_label, dtype=dtype, tiny=repr(float(np.finfo(np.dtype(dtype)).tiny)),
                primitives=primitives, simplex_check=simplex_check, arg_doc=arg_doc)


def render_header(dtype="float64", cache: bool = True) -> str:
    """The header every generated module starts with, alone: its helpers (``_exp``, ``_tanh``, the
    matrix product ``_matmul``), for testing them apart from any model."""
    return _ENV.get_template("_header.py.j2").render(
        **_header_context(dtype, "header", [], False, "-"), njit_cache=bool(cache))


def render_module(model, dtype="float64", optimizer="sgd", input_grads=False, split=None) -> str:
    """The generated module's source (what ``chainrule codegen`` prints)."""
    return render_plan(plan_model(model, dtype, optimizer=optimizer, input_grads=input_grads, split=split))
