"""`load_best`: the best weights of a run, into a model, for evaluation, in one line."""

from __future__ import annotations

import os
from typing import Any

import torch

from haltpoint.checkpointer import Checkpointer
from haltpoint.reader import CheckpointInfo

__all__ = ["load_best"]


def load_best(
    directory: str | os.PathLike[str],
    model: torch.nn.Module,
    *,
    monitor: str,
    mode: str | None = None,
    entry: str = "model",
    map_location: str | torch.device | None = None,
    storage_options: dict[str, Any] | None = None,
) -> CheckpointInfo:
    """Load the `entry` of a run's best checkpoint (by `monitor`) into `model`.

    A reader: it takes no writer lock (a run still training may be read), leaves the random
    state alone and loads nothing else (the optimizer and the stopper stay in the
    checkpoint; the returned info's `report.unexpected` names them). Strict inside the
    model: a key, shape or dtype that differs is a `StateMismatchError`, and nothing loads.
    `mode` is the `Checkpointer`'s: left out, the mode the run's checkpoints record for
    `monitor`, else "min" (refused for a monitor such as `val_acc`).

    Raises:
        CheckpointNotFoundError: the run has no intact checkpoint with a finite `monitor`.
        StateMismatchError: the checkpoint has no `entry`, or it does not fit `model`.

    >>> import tempfile
    >>> run, model = tempfile.mkdtemp(), torch.nn.Linear(2, 1)
    >>> with Checkpointer(run, monitor="loss", keep_best=1) as ckpt:
    ...     for step, loss in enumerate([0.5, 0.2, 0.4]):
    ...         info = ckpt.save(step, {"model": model, "epoch": step}, {"loss": loss})
    >>> info = load_best(run, torch.nn.Linear(2, 1), monitor="loss")
    >>> info.step, info.report.unexpected
    (1, ['epoch'])
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module to load into, got {type(model).__name__}")
    with Checkpointer(
        directory,
        monitor=monitor,
        mode=mode,
        read_only=True,
        capture_rng=False,
        storage_options=storage_options,
    ) as reader:
        info = reader.restore({entry: model}, "best", map_location=map_location)
    assert info is not None  # "best" raises rather than find nothing
    return info
