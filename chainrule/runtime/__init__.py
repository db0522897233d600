"""Training on the generated kernels: networks, optimisers, the training loop, data, checkpoints."""
from .callbacks import (
    Callback,
    EarlyStopping,
    LearningRateSchedule,
    ModelCheckpoint,
    ProgressBar,
)
from .data import one_hot, train_test_split
from .errors import CheckpointError, DataError, LabelError, TrainingDiverged
from .model import History, Network
from .optim import SGD, Optimizer

__all__ = [
    "SGD",
    "Callback",
    "CheckpointError",
    "DataError",
    "EarlyStopping",
    "History",
    "LabelError",
    "LearningRateSchedule",
    "ModelCheckpoint",
    "Network",
    "Optimizer",
    "ProgressBar",
    "TrainingDiverged",
    "one_hot",
    "run_demo",
    "train_test_split",
]


def run_demo(*args, **kwargs):
    from .demo import run_demo as _run
    return _run(*args, **kwargs)
