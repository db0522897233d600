"""The math: index notation, the chain rule, simplification, explanation, verification."""
from .errors import ChainruleError, ShapeError, SpecError, UnsupportedError
from .tensor import Tensor, Equation, size, index, indices
from .graph import Model
from .primitives import sigmoid, softplus, relu, leaky_relu, step, LogSumExp
from .backprop import derive, Gradients
from .layers import (Activation, BatchNorm, Builder, Dense, Dropout, Layer, LayerNorm, Loss, Term, LogSoftmax,
                     Softmax, ACTIVATIONS, LOSSES, sequential)
from .spec import BUILTIN_MODELS, EXAMPLE_MODELS, build_model, parse_spec

# the explanation (and the matrix forms it lifts to) is imported when first used: a run that reads
# its derivation from the cache (a warm `chainrule demo`) never needs it (about 0.25 s of imports)
_LAZY = {"Explanation": "explain", "explain_model": "explain"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ChainruleError", "ShapeError", "SpecError", "UnsupportedError", "Tensor", "Equation", "size", "index",
    "indices", "Model", "sigmoid", "softplus", "relu", "leaky_relu", "step", "LogSumExp", "derive",
    "Gradients", "Activation", "BatchNorm", "Builder", "Dense", "Dropout", "LayerNorm", "Layer", "Loss", "Term", "LogSoftmax", "Softmax", "ACTIVATIONS",
    "LOSSES", "sequential", "BUILTIN_MODELS", "EXAMPLE_MODELS", "build_model", "parse_spec", "Explanation", "explain_model",
]
