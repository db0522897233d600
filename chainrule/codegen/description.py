"""A model's plain-data description: what running its generated kernels needs, without SymPy.

The symbolic model (SymPy expressions, the derivation engine: about half a second of imports and
model building) is needed to derive, explain, verify and generate code. Running the generated
kernels needs much less: the parameters' names, integer shapes and initialisers, the inputs' and
targets' shapes, the facts declared on them, the optimiser's state and hyperparameters, and the
layer names and sizes that error messages quote. :class:`ModelDescription` is that, computed once
from the model (:meth:`ModelDescription.of`) and cached as JSON beside the generated module
(``cache.save_description``), keyed by what a later run knows before it builds anything: the
model's name or layer-list spec, the dtype, the optimiser and the sources of chainrule
(``cache.recipe_key``). A warm run (``compile_model("demo")`` with everything cached) reads it and
never imports SymPy; the symbolic model is built on first use (``CompiledModel.model``).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from .facts import facts_from_data, facts_to_data

FORMAT = "chainrule-model-description-v1"


@dataclass
class Argument:
    """An input or target of the kernels."""

    name: str
    role: str                  # "input" or "target"
    dims: tuple                # axis lengths, None for the batch axis
    example_shape: tuple       # the shape of one example (the model's shape at B = 1, first axis dropped)
    reader: str = ""           # the first layer that reads it (named when its array has the wrong shape)
    sizes: tuple = ()          # per axis: the size's name as declared ("T", "n_0"), "" for the batch
    also_shapes: tuple = ()    # per axis: ", which also shapes parameter P (8, 16) of layer ..." (or "")


@dataclass
class RuleData:
    """An optimiser's declared update rule as plain data: its state tensors, its hyperparameters in
    the order of the kernels' ``hp`` vector and their defaults, and the keyword names a user gives."""

    name: str
    state: list
    hyper_names: list          # "t", "clip", "seed", then the rule's hyperparameters ("eta", ...)
    defaults: dict             # declared name -> default value ("eta": 0.1, "beta_1": 0.9, ...)
    keywords: dict             # keyword -> declared name ("lr": "eta", "beta1": "beta_1", ...)

    @classmethod
    def of(cls, rule) -> "RuleData":
        from ..derive.optimizers import HYPER_NAMES
        return cls(rule.name, list(rule.state), ["t", "clip", "seed"] + [h.name for h in rule.hyperparameters],
                   {h.name: float(v) for h, v in rule.defaults.items()},
                   {k: s.name for k, s in HYPER_NAMES.items()})


@dataclass
class ModelDescription:
    name: str
    recipe: str | None         # the name or layer-list spec build_model rebuilds it from (None: hand-built)
    fingerprint: str           # cache.model_fingerprint: the checkpoints' architecture
    module_key: str
    dtype: str
    input_grads: bool
    rule: RuleData
    params: list               # [name, shape, init, layer]
    buffers: list              # [name, shape, init]
    batch_counts: list         # [layer, values per feature per example] of each running average
    inputs: list               # Argument
    targets: list              # Argument
    outputs: list
    facts: list                # facts.Fact on the inputs and targets
    has_noise: bool
    loss_name: str             # "softmax_cross_entropy", "mse", ... ("loss" when the model has none)
    target_is_simplex: bool    # the (first) target declares Σ_k y[b, k] = 1
    spec: str | None           # the layer-list spec of a sequential model (None for a graph)

    # -- from the symbolic model ----------------------------------------------------------------
    @classmethod
    def of(cls, model, rule, dtype, input_grads, module_key, recipe=None, fingerprint=None) -> "ModelDescription":
        """``fingerprint``: the model's ``cache.model_fingerprint``, when the caller has it."""
        from ..derive.layers import B
        from .cache import model_fingerprint
        from .facts import declared_facts
        values = model.size_values
        inputs = [t for t in model.inputs if t.role == "input"]
        targets = [t for t in model.inputs if t.role == "target"]
        readers = {}
        for eq in model.equations:
            for name, _ in eq.reads():
                if eq.layer:
                    readers.setdefault(name, eq.layer)
        loss = model.loss
        return cls(
            name=model.name, recipe=recipe, fingerprint=fingerprint or model_fingerprint(model),
            module_key=module_key,
            dtype=dtype, input_grads=bool(input_grads), rule=RuleData.of(rule),
            params=[[p.name, list(model.concrete_shape(p)), p.init, p.layer or ""] for p in model.params],
            buffers=[[t.name, list(model.concrete_shape(t)), t.init] for t in model.buffers],
            batch_counts=[[eq.layer, _per_example(eq.out.meta["count"], values, B)]
                          for eq in model.buffer_updates if "count" in eq.out.meta],
            inputs=[_argument(model, t, readers, B) for t in inputs],
            targets=[_argument(model, t, readers, B) for t in targets],
            outputs=[t.name for t in model.outputs],
            facts=declared_facts(model, names={t.name for t in (*inputs, *targets)}),
            has_noise=any(t.role == "noise" for t in model.tensors.values()),
            loss_name=(loss.layer.split(":", 1)[-1] if loss is not None else "") or "loss",
            target_is_simplex=bool(targets) and targets[0].simplex_axis is not None,
            spec=_layer_spec(model, inputs[0]) if inputs else None)

    # -- JSON ------------------------------------------------------------------------------------
    def to_json(self) -> str:
        data = asdict(self)
        data["facts"] = facts_to_data(self.facts)
        return json.dumps({"format": FORMAT, **data}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelDescription | None":
        """The description, or None when the text is another format's (a description written by
        another version of chainrule is rebuilt, never half-read)."""
        try:
            data = json.loads(text)
        except ValueError:
            return None
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            return None
        try:
            data["rule"] = RuleData(**data["rule"])
            for kind in ("inputs", "targets"):
                data[kind] = [Argument(**{k: tuple(v) if isinstance(v, list) else v for k, v in a.items()})
                              for a in data[kind]]
            data["facts"] = facts_from_data(data["facts"])
            return cls(**data)
        except (KeyError, TypeError, ValueError):
            return None


def _argument(model, t, readers, B) -> Argument:
    values = model.size_values
    dims, sizes, also = [], [], []
    for s in t.shape:
        v = s.subs(values)
        dims.append(None if v == B else int(v))
        sizes.append("" if v == B else str(s))
        also.append("" if v == B else _also_shapes(model, s))
    return Argument(t.name, t.role, tuple(dims), tuple(model.concrete_shape(t, B=1)[1:]),
                    readers.get(t.name, ""), tuple(sizes), tuple(also))


def _also_shapes(model, size) -> str:
    """The parameters (at most two) whose shapes a size of an argument also sets: what a user
    who passes arrays of another length must change too (the position table of a longer context)."""
    import sympy as sp

    from ..derive.tensor import shape_str
    shaped = [p for p in model.params if any(size in sp.sympify(s).free_symbols for s in p.shape)]
    return "".join(f", which also shapes parameter {p.name} {shape_str(p.shape, model.size_values)} of layer "
                   f"{p.layer}" for p in shaped[:2])


def _per_example(count, values, B) -> int | None:
    """A running average's values per feature in one example's worth of batch (a batch of n has n
    times as many): batch norm's ``count`` is B times the other axes' lengths. None for a count of
    another form (then the symbolic model evaluates it)."""
    import sympy as sp
    per = sp.simplify(count.subs(values) / B)
    return int(per) if per.is_Integer else None


def _layer_spec(model, x) -> str | None:
    """The layer-list spec of a sequential model (None for a hand-built graph)."""
    if not model.layers:
        return None
    from ..derive.spec import input_item
    shape = model.concrete_shape(x, B=1)[1:]
    if "time_axis" in x.meta:             # a sequence: seq(T, N), or token ids: tokens(T, V)
        vocab = x.meta.get("vocab")
        first = (f"tokens({shape[0]}, {int(vocab.subs(model.size_values))})" if vocab is not None
                 else f"seq({shape[0]}, {shape[1]})")
    else:
        first = input_item(shape)
    loss = model.loss
    loss_name = (loss.layer.split(":", 1)[-1] if loss is not None else "") or "loss"
    items = [first] + [layer.describe() for _, layer in model.layers]
    return " -> ".join(items + [loss_name])
