"""Identical stopping decisions on every rank of `torch.distributed`.

Without an initialized process group of two or more ranks `synced(stopper)` changes nothing.

`synced(stopper)` all-gathers the evaluation on every rank, warns on rank 0 when the ranks
saw different monitored values, and feeds every rank's stopper the same value (the mean over
ranks by default, or rank 0's), so each rank's state machine reaches the same decision with no
further communication (see docs/distributed.md, "Distributed training (DDP)"). How the ranks
agree on checkpoint calls is `haltpoint.distributed.collectives`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

from haltpoint.distributed.collectives import exchange
from haltpoint.distributed.ranks import Replicas, get_rank, get_world_size, is_distributed
from haltpoint.stopping.inputs import as_float, read_metric

__all__ = ["DistributedEarlyStopping", "synced"]

_REDUCTIONS = ("mean", "rank0")


class DistributedEarlyStopping:
    """Wraps a stopper (e.g. `EarlyStopping`) so that every rank takes the same decision.

    Every rank calls `step(value)` with its own evaluation. The wrapper all-gathers the
    values, warns on rank 0 when the monitored values differ by more than `tolerance`
    (relative), and passes every rank's stopper the same value: the mean over ranks
    (`reduce="mean"`, the default) or rank 0's (`reduce="rank0"`). Since the stoppers are
    deterministic state machines fed identical inputs, their decisions are identical; nothing
    else is exchanged. For a mapping, every numeric entry is reduced the same way (rules such
    as `GeneralizationLoss` read them); the mappings must have the same keys on every rank.

    Without a process group (or with one rank) `step` is the wrapped stopper's `step`.
    Attributes other than `step` (`best`, `stopped`, `reason`, `state_dict`, ...) are the
    wrapped stopper's.

    Args:
        stopper: an object with `step(value)`, such as `EarlyStopping`.
        reduce: "mean" or "rank0": which value every rank's stopper gets.
        tolerance: relative difference between ranks' monitored values above which rank 0
            warns (once per evaluation).

    Raises:
        TypeError, ValueError: for a stopper without `step`, an unknown `reduce`, or a
            negative or non-finite `tolerance`.
    """

    def __init__(self, stopper: Any, *, reduce: str = "mean", tolerance: float = 1e-6) -> None:
        if not callable(getattr(stopper, "step", None)):
            raise TypeError(
                "stopper must have a step(value) method, such as EarlyStopping; got "
                f"{type(stopper).__name__} {stopper!r}"
            )
        if reduce not in _REDUCTIONS:
            raise ValueError(f"reduce must be 'mean' or 'rank0'; got reduce={reduce!r}")
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
            raise TypeError(f"tolerance must be a float >= 0; got {tolerance!r}")
        if not math.isfinite(tolerance) or tolerance < 0:
            raise ValueError(f"tolerance must be a finite float >= 0; got tolerance={tolerance!r}")
        self.stopper = stopper
        self.reduce = reduce
        self.tolerance = float(tolerance)

    def step(self, value: object) -> Any:
        """Gather this evaluation from every rank and step the stopper with the agreed value."""
        if not is_distributed():
            return self.stopper.step(value)
        monitor = getattr(self.stopper, "monitor", None)
        payload: Any
        try:  # read locally, but raise only after the gather so no rank is left in it
            if isinstance(value, Mapping):
                if monitor is None:
                    raise TypeError("a mapping needs the stopper's monitor to name the metric")
                read_metric(value, monitor, "monitor")
                payload = {str(k): _number(v) for k, v in value.items()}
            else:
                payload = as_float(value)
        except Exception as exc:
            payload = exc
        gathered = exchange(
            Replicas(get_rank(), get_world_size()),
            "a synced stopper's step()",
            ("error", repr(payload)) if isinstance(payload, Exception) else payload,
        )
        if isinstance(payload, Exception):
            raise payload
        for rank, item in enumerate(gathered):
            if isinstance(item, tuple):
                raise ValueError(f"the evaluation on rank {rank} is not usable: {item[1]}")
        if isinstance(payload, dict):
            keys = [sorted(item) if isinstance(item, dict) else None for item in gathered]
            if any(k != keys[0] for k in keys):
                raise ValueError(
                    f"step() needs the same metrics on every rank; got keys {keys} by rank"
                )
            agreed: Any = {
                k: self._reduce([item[k] for item in gathered], k == monitor) for k in keys[0] or ()
            }
            agreed = {k: v for k, v in agreed.items() if v is not None}
            assert isinstance(value, Mapping)
            original = {str(k): v for k, v in value.items()}
            agreed = {**original, **agreed}
        else:
            if any(not isinstance(item, float) for item in gathered):
                raise ValueError(
                    "every rank must pass the same kind of value (a number or a mapping)"
                )
            agreed = self._reduce(gathered, True)
        return self.stopper.step(agreed)

    def _reduce(self, values: list[Any], monitored: bool) -> float | None:
        if any(v is None for v in values):
            return None  # not a number on some rank: left as this rank's own value
        if monitored:
            self._check_agreement(values)
        if self.reduce == "rank0":
            return float(values[0])
        return math.fsum(values) / len(values)

    def _check_agreement(self, values: list[float]) -> None:
        low, high = min(values), max(values)
        finite = all(math.isfinite(v) for v in values)
        same = (
            high - low <= self.tolerance * max(abs(low), abs(high), 1e-12)
            if finite
            else all(v == values[0] or (math.isnan(v) and math.isnan(values[0])) for v in values)
        )
        if not same and get_rank() == 0:
            what = getattr(self.stopper, "monitor", None) or "the monitored value"
            used = "their mean" if self.reduce == "mean" else "rank 0's value"
            warnings.warn(
                f"haltpoint: ranks disagree on {what}: {values} (by rank); every rank's stopper "
                f"gets {used}. Reduce the "
                "metric over ranks before step() (e.g. all_reduce) to silence this",
                stacklevel=3,
            )

    def state_dict(self) -> Any:
        return self.stopper.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.stopper.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:
        if name == "stopper":  # not yet set (during unpickling): avoid recursion
            raise AttributeError(name)
        return getattr(self.stopper, name)

    def __repr__(self) -> str:
        return f"synced({self.stopper!r}, reduce={self.reduce!r})"


def synced(
    stopper: Any, *, reduce: str = "mean", tolerance: float = 1e-6
) -> DistributedEarlyStopping:
    """Make `stopper`'s decisions identical on every rank; see `DistributedEarlyStopping`.

    >>> from haltpoint import EarlyStopping
    >>> stopper = synced(EarlyStopping("val_loss", patience=1))
    >>> bool(stopper.step({"val_loss": 1.0})), stopper.best
    (False, 1.0)
    """
    return DistributedEarlyStopping(stopper, reduce=reduce, tolerance=tolerance)


def _number(value: object) -> float | None:
    try:
        return as_float(value)
    except (TypeError, ValueError):
        return None
