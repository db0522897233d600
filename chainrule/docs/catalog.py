"""What the site documents, enumerated from the package's registries (never a list kept here):

- models: ``BUILTIN_MODELS`` and ``EXAMPLE_MODELS`` (``derive/spec.py``);
- layers: every subclass of ``Layer`` in ``chainrule.derive`` (its ``doc_example`` is the model its
  page derives), and one page per entry of ``ACTIVATIONS``;
- losses: ``LOSSES``; optimisers: ``optimizers.RULES``;
- the generative models' math: ``derive.generative.generative_documents()``.

A layer, loss or optimiser another module declares appears here as soon as it is in its registry.
"""
from __future__ import annotations

from dataclasses import dataclass
import importlib
import inspect
import pkgutil
import re
from typing import Callable

from ..derive import ACTIVATIONS, BUILTIN_MODELS, EXAMPLE_MODELS, LOSSES, build_model
from ..derive.layers import Activation, Layer


FOLDERS = {"model": "models", "layer": "layers", "loss": "losses", "optimizer": "optimizers",
           "generative": "generative"}


@dataclass
class Entry:
    kind: str               # "model", "layer", "loss", "optimizer"
    slug: str               # file name without .html
    title: str
    about: str              # one paragraph: the declaration's docstring or its spec
    make_model: Callable | None = None      # () -> Model, for pages that derive a model
    spec: str | None = None                  # the layer-list spec, where there is one

    @property
    def path(self) -> str:
        return f"{FOLDERS[self.kind]}/{self.slug}.html"


def slugify(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", "-", text.lower()).strip("-") or "page"


def _doc(obj) -> str:
    text = " ".join((inspect.getdoc(obj) or "").split("\n\n")[0].split())
    return text.replace("``", "`")                  # reST literals read as the explanations' code


def models() -> list[Entry]:
    out = []
    for table, about in ((BUILTIN_MODELS, "A built-in model: `chainrule derive {name}`, `chainrule codegen {name}`."),
                         (EXAMPLE_MODELS, "The model of an example: `chainrule train {name}` trains it.")):
        for name, spec in table.items():
            out.append(Entry("model", slugify(name), name, about.format(name=name),
                             lambda name=name: build_model(name), spec))
    return out


def _layer_classes() -> list[type]:
    """Every Layer subclass of chainrule.derive, once every module of it is imported."""
    import chainrule.derive as pkg
    for info in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(info.name)
    found, stack = [], list(Layer.__subclasses__())
    while stack:
        cls = stack.pop(0)
        stack.extend(cls.__subclasses__())
        if cls.__module__.startswith("chainrule.derive") and not cls.__name__.startswith("_") \
                and cls is not Activation:       # activations: one page per ACTIVATIONS entry
            found.append(cls)
    return found


def _layer_title(cls) -> str:
    name = cls.__dict__.get("name") or getattr(cls, "kind", None) or cls.__name__
    return (name if isinstance(name, str) and name != "layer" else cls.__name__).lower()


def layers() -> list[Entry]:
    out, taken = [], set()
    for cls in _layer_classes():
        title = _layer_title(cls)
        slug = slugify(title)
        if slug in taken:                            # two classes of one name (two residual blocks)
            title = f"{title} ({cls.__module__.rsplit('.', 1)[-1]})"
            slug = slugify(title)
        taken.add(slug)
        example = cls.__dict__.get("doc_example")
        if isinstance(example, staticmethod):
            example = example.__func__
        if isinstance(example, str):
            make, spec = (lambda s=example, t=title: _named(build_model(s), t)), example
        elif callable(example):
            make, spec = (lambda f=example, t=title: _named(f(), t)), None
        else:
            make, spec = None, None
        out.append(Entry("layer", slug, title, _doc(cls) + f" (`{cls.__module__}.{cls.__name__}`)", make, spec))
    for name, fn in ACTIVATIONS.items():
        spec = f"5 -> dense(4) -> {name} -> dense(3) -> mse"
        out.append(Entry("layer", slugify(name), name, f"The activation `{name}`, applied elementwise: "
                         "$a = f(z)$ with its derivative found by the engine.",
                         lambda s=spec, t=name: _named(build_model(s), t), spec))
    return sorted(out, key=lambda e: e.slug)


# what a loss's prediction must be: a probability for the cross-entropies on probabilities, the
# log-probabilities for NLL (a presentation choice for the example model, not math)
_LOSS_INPUT = {"bce": " -> sigmoid", "cross_entropy": " -> softmax", "nll": " -> log_softmax"}


def losses() -> list[Entry]:
    out = []
    for name, make in LOSSES.items():
        loss = make()
        spec = f"5 -> dense(3){_LOSS_INPUT.get(name, '')} -> {name}"
        out.append(Entry("loss", slugify(name), name, f"{loss.label or loss.name}: the per-example loss "
                         "$\\ell_b$ summed over the outputs" + (", divided by their number" if loss.mean else "")
                         + ".", lambda s=spec, t=name: _named(build_model(s), t), spec))
    return out


def optimizers() -> list[Entry]:
    from ..derive.optimizers import RULES, get_rule
    out = [Entry("optimizer", slugify(name), get_rule(name).title, get_rule(name).reference) for name in RULES]
    out.append(Entry("optimizer", "adamw-vs-l2", "AdamW vs L2", "Why decoupled weight decay is not L2 in the loss."))
    return out


def _named(model, name):
    model.name = name
    return model


def generative() -> list[Entry]:
    from ..derive.generative import generative_documents
    return [Entry("generative", name, doc.title, "Derived by SymPy from the declarations, each step checked.")
            for name, doc in generative_documents().items()]


def everything() -> list[Entry]:
    return [*models(), *layers(), *losses(), *optimizers(), *generative()]
