"""The records of a committed checkpoint: `CheckpointInfo` (what `save`, `list` and `restore`
return) and `Found` (a checkpoint chosen for restore, its tensors read and verified).

They live here, below the read side (`haltpoint.reader`) and the ranks (`distributed`), which
both pass them on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from haltpoint.state.load import LoadReport
from haltpoint.store.run_dir import Entry

__all__ = ["CheckpointInfo", "Found", "Planned"]


@dataclass(frozen=True)
class CheckpointInfo:
    """What is known about one committed checkpoint.

    Attributes:
        step: the step it was saved at.
        time: when it was saved (unix seconds).
        metrics: the metrics passed to `save`.
        size: bytes of tensor data the checkpoint references (DCP files included).
        path: where it lives (a folder path or URL).
        pinned: kept forever, whatever the retention rules say.
        sequence: its place in the run's commit order (0 for the first commit, one more for
            each commit after it), which ranks "latest" and `keep_last`: after a rewind, the
            checkpoints saved since come after the abandoned run's higher steps. None for a
            checkpoint of an older haltpoint (it sorts before every one with a sequence, and
            by step among those without), and in what an async `save` returns (the sequence
            is taken at the commit, in the background: `list()` has it).
        report: after `restore`, what did not match: entries of the checkpoint not asked
            for (`unexpected`), and in non-strict loads the names and keys missing or
            unexpected.
    """

    step: int
    time: float
    metrics: Mapping[str, float]
    size: int
    path: str
    pinned: bool = False
    sequence: int | None = None
    report: LoadReport | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Found:
    """A checkpoint chosen for restore, every tensor of it verified and those restore loads
    read (`tensors`), and the damaged checkpoints passed over to reach it (each with what
    is wrong with it)."""

    entry: Entry
    tensors: dict[str, torch.Tensor]
    passed: tuple[tuple[Entry, str], ...] = ()


@dataclass(frozen=True)
class Planned:
    """A restore checked against the state: `load()` loads it. `together` names the sharded
    entries DCP loads with every rank (into DTensor shards: a collective), `alone` those this
    rank loads by itself (into unsharded objects); the ranks compare them before any loads."""

    load: Callable[[], CheckpointInfo]
    together: tuple[str, ...] = ()
    alone: tuple[str, ...] = ()
