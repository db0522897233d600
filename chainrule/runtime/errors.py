"""Errors the runtime raises: all subclass :class:`chainrule.derive.errors.ChainruleError`."""
from __future__ import annotations

from chainrule.derive.errors import ChainruleError, ShapeError, SpecError

__all__ = [
    "ChainruleError",
    "CheckpointError",
    "DataError",
    "LabelError",
    "ShapeError",
    "SpecError",
    "TrainingDiverged",
]


class DataError(ChainruleError, ValueError):
    """Data that cannot be trained on: NaN/inf values, targets that break a declared fact."""


class LabelError(DataError):
    """Class labels outside the range of the model's classes, or not integers."""


class CheckpointError(ChainruleError, ValueError):
    """A parameter file that does not fit the network (names, shapes) or is not a chainrule file."""


class TrainingDiverged(ChainruleError, RuntimeError):
    """The loss became NaN/inf or exploded; the last good parameters have been restored.

    ``epoch`` (1-based) and ``step`` (1-based within the epoch) say where it happened, ``cost`` is
    the offending value.
    """

    def __init__(self, message: str, *, epoch: int, step: int, cost: float):
        super().__init__(message)
        self.epoch, self.step, self.cost = epoch, step, cost
