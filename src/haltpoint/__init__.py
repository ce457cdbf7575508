"""haltpoint: stop PyTorch training at the right moment and never lose a good model."""

from haltpoint.best import load_best
from haltpoint.checkpointer import Checkpointer, CheckpointInfo
from haltpoint.distributed import DistributedEarlyStopping, synced
from haltpoint.distributed.sharded import ShardedState
from haltpoint.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InsufficientSpaceError,
    LinkedFileError,
    LockedError,
    StateMismatchError,
    UnsupportedStateError,
)
from haltpoint.stopping import (
    ConsecutiveIncreases,
    Decision,
    Divergence,
    EarlyStopping,
    GeneralizationLoss,
    Observation,
    ProgressQuotient,
    RelativeDelta,
    Rule,
    StatefulRule,
    Stop,
    StopReason,
    Target,
    TimeBudget,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "Checkpointer",
    "ConsecutiveIncreases",
    "CorruptCheckpointError",
    "Decision",
    "DistributedEarlyStopping",
    "Divergence",
    "EarlyStopping",
    "GeneralizationLoss",
    "InsufficientSpaceError",
    "LinkedFileError",
    "LockedError",
    "Observation",
    "ProgressQuotient",
    "RelativeDelta",
    "Rule",
    "ShardedState",
    "StateMismatchError",
    "StatefulRule",
    "Stop",
    "StopReason",
    "Target",
    "TimeBudget",
    "UnsupportedStateError",
    "__version__",
    "load_best",
    "synced",
]
