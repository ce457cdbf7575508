"""haltpoint: stop PyTorch training at the right moment and never lose a good model.

Importing `haltpoint` is cheap: each public name imports its module (and torch) on first use,
so that the `haltpoint` command can handle Ctrl-C before its heavy imports start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from haltpoint.best import load_best
    from haltpoint.checkpointer import Checkpointer, CheckpointInfo
    from haltpoint.distributed import DistributedEarlyStopping, synced
    from haltpoint.distributed.sharded import ShardedState
    from haltpoint.errors import (
        CheckpointError,
        CheckpointExistsError,
        CheckpointNotFoundError,
        CorruptCheckpointError,
        CorruptHistoryError,
        HistoryNotWrittenError,
        InsufficientSpaceError,
        LinkedFileError,
        LockedError,
        NotRegularFileError,
        StateMismatchError,
        StepBehindError,
        UnreadableCheckpointError,
        UnsupportedStateError,
        UnwritableRunError,
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

_EXPORTS = {
    "load_best": "haltpoint.best",
    "Checkpointer": "haltpoint.checkpointer",
    "CheckpointInfo": "haltpoint.checkpointer",
    "DistributedEarlyStopping": "haltpoint.distributed",
    "synced": "haltpoint.distributed",
    "ShardedState": "haltpoint.distributed.sharded",
    "CheckpointError": "haltpoint.errors",
    "CheckpointExistsError": "haltpoint.errors",
    "CheckpointNotFoundError": "haltpoint.errors",
    "CorruptCheckpointError": "haltpoint.errors",
    "CorruptHistoryError": "haltpoint.errors",
    "HistoryNotWrittenError": "haltpoint.errors",
    "InsufficientSpaceError": "haltpoint.errors",
    "LinkedFileError": "haltpoint.errors",
    "LockedError": "haltpoint.errors",
    "NotRegularFileError": "haltpoint.errors",
    "StateMismatchError": "haltpoint.errors",
    "StepBehindError": "haltpoint.errors",
    "UnreadableCheckpointError": "haltpoint.errors",
    "UnsupportedStateError": "haltpoint.errors",
    "UnwritableRunError": "haltpoint.errors",
    "ConsecutiveIncreases": "haltpoint.stopping",
    "Decision": "haltpoint.stopping",
    "Divergence": "haltpoint.stopping",
    "EarlyStopping": "haltpoint.stopping",
    "GeneralizationLoss": "haltpoint.stopping",
    "Observation": "haltpoint.stopping",
    "ProgressQuotient": "haltpoint.stopping",
    "RelativeDelta": "haltpoint.stopping",
    "Rule": "haltpoint.stopping",
    "StatefulRule": "haltpoint.stopping",
    "Stop": "haltpoint.stopping",
    "StopReason": "haltpoint.stopping",
    "Target": "haltpoint.stopping",
    "TimeBudget": "haltpoint.stopping",
}
"""Each public name and the module it comes from, imported on first access."""


__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "Checkpointer",
    "ConsecutiveIncreases",
    "CorruptCheckpointError",
    "CorruptHistoryError",
    "Decision",
    "DistributedEarlyStopping",
    "Divergence",
    "EarlyStopping",
    "GeneralizationLoss",
    "HistoryNotWrittenError",
    "InsufficientSpaceError",
    "LinkedFileError",
    "LockedError",
    "NotRegularFileError",
    "Observation",
    "ProgressQuotient",
    "RelativeDelta",
    "Rule",
    "ShardedState",
    "StateMismatchError",
    "StatefulRule",
    "StepBehindError",
    "Stop",
    "StopReason",
    "Target",
    "TimeBudget",
    "UnreadableCheckpointError",
    "UnsupportedStateError",
    "UnwritableRunError",
    "__version__",
    "load_best",
    "synced",
]


if not TYPE_CHECKING:  # type checkers see the imports above; a misspelt name stays an error

    def __getattr__(name: str) -> Any:
        module = _EXPORTS.get(name)
        if module is None:
            raise AttributeError(f"module 'haltpoint' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
