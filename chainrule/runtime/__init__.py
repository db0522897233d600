"""Training on the generated kernels: networks, optimisers, the training loop, data, checkpoints."""
from .callbacks import Callback, EarlyStopping, LearningRateSchedule, ModelCheckpoint, ProgressBar
from .data import one_hot, train_test_split
from .errors import CheckpointError, DataError, LabelError, TrainingDiverged
from .model import History, Network, atomic_write
from .optim import SGD, Optimizer

__all__ = ["Network", "History", "Optimizer", "SGD", "Callback", "EarlyStopping", "ModelCheckpoint",
           "LearningRateSchedule", "ProgressBar", "DataError", "LabelError", "CheckpointError",
           "TrainingDiverged", "one_hot", "train_test_split", "atomic_write", "run_demo"]


def run_demo(*args, **kwargs):
    from .demo import run_demo as _run
    return _run(*args, **kwargs)
