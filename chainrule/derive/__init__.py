"""The math: index notation, the chain rule, simplification, explanation, verification."""
from .errors import ChainruleError, ShapeError, SpecError, UnsupportedError
from .tensor import Tensor, Equation, size, index, indices
from .graph import Model
from .primitives import sigmoid, softplus, relu, leaky_relu, step, LogSumExp
from .backprop import derive, Gradients
from .layers import (Activation, BatchNorm, Builder, Dense, Dropout, Layer, LayerNorm, Loss, Term, LogSoftmax,
                     Softmax, ACTIVATIONS, LOSSES, sequential)
from .spec import BUILTIN_MODELS, EXAMPLE_MODELS, build_model, parse_spec
from .explain import Explanation, explain_model

__all__ = [
    "ChainruleError", "ShapeError", "SpecError", "UnsupportedError", "Tensor", "Equation", "size", "index",
    "indices", "Model", "sigmoid", "softplus", "relu", "leaky_relu", "step", "LogSumExp", "derive",
    "Gradients", "Activation", "BatchNorm", "Builder", "Dense", "Dropout", "LayerNorm", "Layer", "Loss", "Term", "LogSoftmax", "Softmax", "ACTIVATIONS",
    "LOSSES", "sequential", "BUILTIN_MODELS", "EXAMPLE_MODELS", "build_model", "parse_spec", "Explanation", "explain_model",
]
