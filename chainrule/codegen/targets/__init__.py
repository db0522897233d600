"""Export to PyTorch and JAX: a declaration's forward equations and its *derived* backward, printed
as tensor code (a printer per target, SymPy-style dispatch), rendered through a Jinja template into
a real, cached ``.py`` module.

    from chainrule.codegen.targets import to_torch
    layer = to_torch(Bilinear(units=4), inputs=8)          # an nn.Module with the derived backward
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), layer, torch.nn.Tanh())

``render_export`` returns the source (what ``chainrule codegen MODEL --target torch|jax`` prints);
``export`` returns the imported module (``Function``, ``Module`` for torch; ``apply``,
``init_params`` for JAX). torch and jax are optional: only the generated modules import them.
"""
from __future__ import annotations

from ...derive.errors import UnsupportedError
from ..lower import comment_text
from .jax import JaxPrinter
from .plan import ExportPlan, model_of, plan_export
from .torch import TorchPrinter

PRINTERS = {"torch": TorchPrinter, "jax": JaxPrinter}

__all__ = ["PRINTERS", "export", "render_export", "to_jax", "to_torch", "model_of", "plan_export"]


def _printer(target: str):
    if target not in PRINTERS:
        raise UnsupportedError(f"export: unknown target {target!r}; known: numba, {', '.join(PRINTERS)}")
    return PRINTERS[target]


def _shape_code(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _noise(a, target: str) -> dict:
    shape = _shape_code(a.shape)
    lib = "torch" if target == "torch" else "jnp"
    dev = ", device=dev" if target == "torch" else ""
    dist = a.meta.get("dist")
    if dist == "bernoulli":
        keep = repr(float(a.meta["keep"]))
        train = f"(torch.rand({shape}, dtype=dt{dev}) < {keep}).to(dt)"
        mean = f"{lib}.full({shape}, {keep}, dtype=dt{dev})"
    elif dist == "normal":
        train = f"torch.randn({shape}, dtype=dt{dev})"
        mean = f"{lib}.zeros({shape}, dtype=dt{dev})"
    else:
        raise UnsupportedError(f"export: random tensor {a.name} has unknown distribution {dist!r}")
    return dict(ident=a.ident, train=train, eval=mean, eval_jax=mean)


def context(plan: ExportPlan, target: str) -> dict:
    # no gradient: None in torch; zeros in JAX, of dtype float0 for an integer argument (token ids)
    zero = {"torch": lambda a: "None",
            "jax": lambda a: (f"np.zeros({a.ident}.shape, dtype=jax.dtypes.float0)" if a.ident in plan.integer
                              else f"jnp.zeros_like({a.ident})")}[target]
    saved = list(plan.saved)
    grads = []
    for a, g in zip(plan.args, plan.grads):
        if g is None:
            if target == "jax" and a.ident not in saved:
                saved.append(a.ident)
            grads.append(zero(a))
        else:
            grads.append(g)
    arg_list = []
    for a in plan.args:
        arg_list.append(dict(ident=a.ident, role=a.role, label=comment_text(a.name).replace('"', "'"),
                             check_shape=_shape_code(tuple(None if s == "n_batch" else s for s in a.shape))))
    simplex = []
    for a in plan.args:
        if a.simplex_axis is not None:
            fact = f"sum over axis {a.simplex_axis} of {comment_text(a.name)} = 1".replace('"', "'")
            simplex.append(dict(ident=a.ident, label=comment_text(a.name).replace('"', "'"),
                                axis=a.simplex_axis, fact=fact))
    ids = [dict(ident=c.ident, rows=c.rows,
                where=f"layer {c.layer}: token ids {c.label} {c.shape} select rows of {c.table}".replace('"', "'"))
           for c in plan.id_checks]
    params = [dict(ident=a.ident, shape=_shape_code(a.shape), init=a.init or "glorot")
              for a in plan.args if a.role == "param"]
    noise = [_noise(a, target) for a in plan.args if a.role == "noise"]
    call = [a.ident for a in plan.args if a.role in ("input", "target")]
    apply_args = [a.ident if a.role != "param" else f"self.{a.ident}" for a in plan.args]
    label = comment_text(plan.label).replace('"', "'").replace("{", "(").replace("}", ")")
    return dict(
        label=label, mode=plan.mode, notes=plan.notes,
        arg_doc=", ".join(f"{a.ident} = {comment_text(a.name)} ({a.role}, {_shape_code(a.shape)})"
                          for a in plan.args),
        result=plan.result, result_doc=plan.result_doc, args=[a.ident for a in plan.args],
        arg_list=arg_list, simplex=simplex, ids=ids, first=plan.first_input, float_first=plan.float_first, forward=plan.forward,
        backward=plan.backward, saved=saved, grads=grads, params=params, noise=noise,
        call_args=call, apply_args=apply_args, predict=plan.predict, prediction=plan.prediction,
        predict_args=[a.ident for a in plan.args if a.role != "target"] + [b.ident for b in plan.buffers],
        predict_call=[a.ident for a in plan.args if a.role == "input"],
        predict_apply=[a.ident if a.role != "param" else f"self.{a.ident}" for a in plan.args
                       if a.role != "target"] + [f"self.{b.ident}" for b in plan.buffers],
        buffers=[dict(ident=b.ident, shape=_shape_code(b.shape), init=b.init) for b in plan.buffers],
        running=plan.running, running_out=plan.running_out, evaluate=plan.evaluate,
        running_args=[a.ident for a in plan.args if a.role != "target"] + [b.ident for b in plan.buffers],
        running_apply=[a.ident if a.role != "param" else f"self.{a.ident}" for a in plan.args
                       if a.role != "target"] + [f"self.{b.ident}" for b in plan.buffers],
        eval_args=[a.ident for a in plan.args] + [b.ident for b in plan.buffers],
        eval_apply=apply_args + [f"self.{b.ident}" for b in plan.buffers],
        param_doc=", ".join(f"{p['ident']} {p['shape']}" for p in params) or "none",
        function_class="Function", module_class="Module")


_ENV = None


def _template(name):
    global _ENV
    if _ENV is None:
        import jinja2
        _ENV = jinja2.Environment(loader=jinja2.PackageLoader("chainrule.codegen", "templates"),
                                  undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                                  trim_blocks=True, lstrip_blocks=True, autoescape=False)
    return _ENV.get_template(name)


def render_export(declaration, target: str = "torch", inputs=None) -> str:
    """The generated module's source for ``target`` ("torch" or "jax")."""
    printer = _printer(target)
    plan = plan_export(declaration, printer, inputs=inputs)
    return _template(printer.template).render(**context(plan, target))


def export(declaration, target: str = "torch", inputs=None, cache_dir=None):
    """The generated module for ``target``, from the on-disk cache (generated when missing):
    ``Function`` and ``Module`` (torch), ``apply`` and ``init_params`` (jax)."""
    from ..cache import cache_key, load_or_generate
    printer = _printer(target)
    model, mode = model_of(declaration, inputs)
    key = cache_key(model, target, extra=f"export|{mode}|{target}")

    def render(cache=True):
        plan = plan_export(model if mode == "model" else declaration, printer, inputs=inputs)
        return _template(printer.template).render(**context(plan, target))
    module, path, source, hit = load_or_generate(key, render, cache_dir)
    module.chainrule_source_path = path
    return module


def to_torch(declaration, inputs=None, *, seed=0, dtype=None, cache_dir=None):
    """An ``nn.Module`` for the declaration (a layer with its input width or shape, a loss with its
    prediction's width, or a whole model), its backward the derived one; parameters initialised as
    chainrule's ``init_params(seed)``."""
    import torch
    mod = export(declaration, "torch", inputs=inputs, cache_dir=cache_dir)
    return mod.Module(seed=seed, dtype=dtype or torch.get_default_dtype())


def to_jax(declaration, inputs=None, *, cache_dir=None):
    """The generated JAX module: ``apply`` (a ``jax.custom_vjp`` function with the derived
    backward), ``init_params(seed)``, ``ARGUMENTS``."""
    return export(declaration, "jax", inputs=inputs, cache_dir=cache_dir)
