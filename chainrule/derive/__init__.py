"""The math: index notation, the chain rule, simplification, explanation, verification.

Only the errors are imported with the package. Everything else (SymPy and the engine, about
0.4-1 s of imports) is imported on the first use of any of its names: a warm run that reads its
kernels and its model's description from the cache (a warm `chainrule demo`) raises the errors
but never needs the engine.
"""
from .errors import ChainruleError, ShapeError, SpecError, UnsupportedError

# the explanation (and the matrix forms it lifts to): only when asked for by name
_LAZY = {"Explanation": "explain", "explain_model": "explain"}


def _load_engine():
    """The names the package has always exported, imported together on the first use of any (in
    the order the package imported them before it was lazy)."""
    from . import tensor, graph, primitives, backprop, layers, spec  # noqa: I001
    names = {
        tensor: ("Tensor", "Equation", "size", "index", "indices"),
        graph: ("Model",),
        primitives: ("sigmoid", "softplus", "relu", "leaky_relu", "step", "LogSumExp"),
        backprop: ("derive", "Gradients"),
        layers: ("Activation", "BatchNorm", "Builder", "Dense", "Dropout", "Layer", "LayerNorm", "Loss",
                 "Term", "LogSoftmax", "Softmax", "ACTIVATIONS", "LOSSES", "sequential"),
        spec: ("BUILTIN_MODELS", "EXAMPLE_MODELS", "build_model", "parse_spec"),
    }
    for module, exported in names.items():
        for name in exported:
            globals()[name] = getattr(module, name)


def __getattr__(name):
    import importlib
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in __all__:
        _load_engine()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ChainruleError", "ShapeError", "SpecError", "UnsupportedError", "Tensor", "Equation", "size", "index",
    "indices", "Model", "sigmoid", "softplus", "relu", "leaky_relu", "step", "LogSumExp", "derive",
    "Gradients", "Activation", "BatchNorm", "Builder", "Dense", "Dropout", "LayerNorm", "Layer", "Loss", "Term", "LogSoftmax", "Softmax", "ACTIVATIONS",
    "LOSSES", "sequential", "BUILTIN_MODELS", "EXAMPLE_MODELS", "build_model", "parse_spec", "Explanation", "explain_model",
]
