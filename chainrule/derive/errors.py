"""The errors chainrule raises. Each names the layer, the tensor and the shapes involved."""


class ChainruleError(Exception):
    """Base class: every error chainrule raises on purpose."""


class ShapeError(ChainruleError, ValueError):
    """Tensors whose shapes do not fit together, or an index used outside its axis."""


class SpecError(ChainruleError, ValueError):
    """A model, layer or claim that cannot be parsed or names something unknown."""


class UnsupportedError(ChainruleError, NotImplementedError):
    """A construct the engine cannot derive correctly: refused rather than answered wrongly."""
