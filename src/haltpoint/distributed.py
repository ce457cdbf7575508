"""Glue for `torch.distributed`: identical decisions on every rank, replicated state written once.

Everything here is a no-op without an initialized process group of two or more ranks, so
single-process code pays nothing and behaves exactly as before.

Rules (see docs/distributed.md, "Distributed training (DDP)"):

- Stopping: `synced(stopper)` all-gathers the evaluation on every rank, warns on rank 0 when
  the ranks saw different monitored values, and feeds every rank's stopper the same value
  (the mean over ranks by default, or rank 0's), so each rank's state machine reaches the
  same decision with no further communication.
- Checkpoints: rank 0 alone takes the writer lock and does the I/O; every method a rank 0
  error can come out of (`Checkpointer(...)`, `save`, `wait`, `close`, `restore`, `list`,
  `pin`, `unpin`) ends with one broadcast from rank 0 carrying either its result or its
  error, so an error is raised on every rank at the same call and no rank is left waiting.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from haltpoint import errors
from haltpoint.errors import CheckpointError
from haltpoint.stopping.inputs import as_float, read_metric

__all__ = [
    "DistributedEarlyStopping",
    "Replicas",
    "get_rank",
    "get_world_size",
    "is_distributed",
    "synced",
]

T = TypeVar("T")

_REDUCTIONS = ("mean", "rank0")


def _dist() -> Any:
    """`torch.distributed` when it is available and initialized, else None."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch built without distributed support
        return None
    if not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def get_rank() -> int:
    """This process's rank, or 0 without an initialized process group."""
    dist = _dist()
    return 0 if dist is None else int(dist.get_rank())


def get_world_size() -> int:
    """The number of ranks, or 1 without an initialized process group."""
    dist = _dist()
    return 1 if dist is None else int(dist.get_world_size())


def is_distributed() -> bool:
    """Whether a process group of two or more ranks is initialized.

    >>> is_distributed()
    False
    """
    return get_world_size() > 1


@dataclass(frozen=True)
class Replicas:
    """The ranks that hold the same (replicated) state; rank 0 writes it.

    `process_group` is the torch process group their collectives use (None: the default
    one); `ShardWriter` gives its background writes a gloo group of their own.
    """

    rank: int
    world_size: int
    process_group: Any = None

    @staticmethod
    def current() -> Replicas | None:
        """The default process group's ranks, or None when there is nothing to coordinate."""
        if not is_distributed():
            return None
        return Replicas(get_rank(), get_world_size())

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


def _broadcast(payload: Any) -> Any:
    """Broadcast one picklable object from rank 0; every rank gets rank 0's object."""
    dist = _dist()
    box = [payload]
    dist.broadcast_object_list(box, src=0, device=_device(dist))
    return box[0]


def _all_gather(payload: Any, process_group: Any = None) -> list[Any]:
    dist = _dist()
    out: list[Any] = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(out, payload, group=process_group)
    return out


def _device(dist: Any) -> Any:
    """Where object collectives stage their bytes: the current CUDA device for NCCL."""
    if dist.get_backend() == "nccl":
        import torch

        return torch.device("cuda", torch.cuda.current_device())
    return None


def _failure(what: str, exc: BaseException) -> tuple[bool, str, str, str | None]:
    """What rank 0 broadcasts when `what` failed: the message, error class and path."""
    kind = type(exc).__name__
    if not isinstance(exc, CheckpointError) or getattr(errors, kind, None) is not type(exc):
        kind = "CheckpointError"
    return False, f"on rank 0, {what} failed: {type(exc).__name__}: {exc}", kind, _path(exc)


def _path(exc: BaseException) -> str | None:
    path = getattr(exc, "path", None)
    return path if isinstance(path, str) else None


def _raise(failure: tuple[bool, str, str, str | None], cause: BaseException | None) -> None:
    """Raise the same error on every rank: rank 0's `CheckpointError` class, else the base."""
    _, message, kind, path = failure
    raise getattr(errors, kind)(message, path=path) from cause


def on_writer(
    group: Replicas | None,
    fn: Callable[[], T],
    what: str,
    share: Callable[[T], Any] | None = None,
) -> Any:
    """Run `fn` on rank 0 only and agree on the outcome with one broadcast.

    Without a group this is `fn()`. With one, rank 0 runs `fn` and broadcasts its result
    (through `share`, if given); the other ranks return that. If `fn` fails, every rank
    raises the same error: rank 0's class when it is one of haltpoint's `CheckpointError`s
    (e.g. `CheckpointExistsError`), else `CheckpointError`, with the same message naming the
    original error (on rank 0 chained to it).
    """
    if group is None:
        return fn()
    if not group.is_writer:
        payload = _broadcast(None)
        if not payload[0]:
            _raise(payload, None)
        return payload[1]
    try:
        result = fn()
    except Exception as exc:
        failure = _failure(what, exc)
        _broadcast(failure)
        _raise(failure, exc)
    except BaseException as exc:  # KeyboardInterrupt, SystemExit: release the others, re-raise
        _broadcast(_failure(what, exc))
        raise
    _broadcast((True, result if share is None else share(result)))
    return result


def all_succeed(group: Replicas | None, fn: Callable[[], T], what: str) -> T:
    """Run `fn` on every rank; if it fails on any, raise the same error on all.

    That is a `CheckpointError` naming the first rank that failed or, when every rank
    failed with the same message (a bad argument), each rank's own error.
    """
    return _everywhere(group, fn, what, gather=False)[0]


def all_results(group: Replicas | None, fn: Callable[[], T], what: str) -> list[T]:
    """Like `all_succeed`, and every rank gets every rank's (picklable) result, by rank."""
    return _everywhere(group, fn, what, gather=True)


def _everywhere(group: Replicas | None, fn: Callable[[], T], what: str, gather: bool) -> list[T]:
    if group is None:
        return [fn()]
    error: BaseException | None = None
    result: Any = None
    try:
        result = fn()
    except Exception as exc:
        error = exc
    message = None if error is None else f"{type(error).__name__}: {error}"
    gathered = _all_gather((message, result if gather else None), group.process_group)
    failed = [rank for rank, (said, _) in enumerate(gathered) if said is not None]
    if error is not None and all(said == message for said, _ in gathered):
        raise error  # the same failure on every rank (a bad argument): keep its type
    if failed:
        raise CheckpointError(
            f"{what} failed on rank {failed[0]}: {gathered[failed[0]][0]}"
        ) from error
    return [value for _, value in gathered] if gather else [result]


def restore_agreed(
    group: Replicas,
    read: Callable[[str | int, dict[int, str]], Any],
    check: Callable[[Any, int, int], str | None],
    load: Callable[[Any], T],
    which: str | int,
) -> T | None:
    """Rank 0 chooses the checkpoint; every rank reads that step, the ranks check its other
    files together, then every rank loads it.

    `read(which, skip)` finds and reads (verifying) a checkpoint: rank 0 calls it to resolve
    `which` ("latest", "best", a step; with its fall-backs over damaged checkpoints, passing
    over the steps in `skip`, which maps them to their damage) and broadcasts the step; the
    other ranks then read that exact step from the shared directory, so all load the same one
    even if the directory changed in between. `check(found, rank, world_size)` checks this
    rank's share of the checkpoint's other files (a sharded checkpoint's DCP files) and says
    what is damaged, or None: every rank reads only its share. Damage found by any rank sends
    rank 0 back to choose past that step (or raises on every rank, for a step or when no
    checkpoint is left). Every round ends with a collective that carries failures, so every
    rank enters the load (which may be collective: DCP) or none does. Returns None on every
    rank when rank 0 found no checkpoint.
    """
    what = f"restore({which!r})"
    skip: dict[int, str] = {}
    while True:
        found = _read_agreed(group, read, which, skip, what)
        if found is None:
            return None
        step = found.entry.step
        reports = all_results(
            group,
            partial(check, found, group.rank, group.world_size),
            f"{what}: checking step {step}",
        )
        damage = next((r for r in reports if r is not None), None)
        if damage is None:
            return all_succeed(group, partial(load, found), f"{what}: loading step {step}")
        skip[step] = damage  # rank 0 chooses again, past it, or raises


def _read_agreed(
    group: Replicas,
    read: Callable[[str | int, dict[int, str]], Any],
    which: str | int,
    skip: dict[int, str],
    what: str,
) -> Any:
    """Rank 0 resolves and reads `which`; then every other rank reads the step it chose."""
    mine: Any = None

    def choose() -> int | None:
        nonlocal mine
        mine = read(which, skip)
        return None if mine is None else mine.entry.step

    step = on_writer(group, choose, what)
    if step is None:
        return None
    if not group.is_writer:
        return all_succeed(group, partial(read, step, {}), f"{what} of step {step}")
    all_succeed(group, lambda: None, f"{what} of step {step}")
    return mine


# -- stopping ---------------------------------------------------------------------------------


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
        gathered = _all_gather(
            ("error", repr(payload)) if isinstance(payload, Exception) else payload
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
