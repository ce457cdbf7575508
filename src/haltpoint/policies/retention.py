"""Retention rules: which committed checkpoints to keep, decided from records alone.

Each rule is a small frozen dataclass whose `select(records)` returns the steps it wants kept.
The kept set is the *union* of every rule's selection, so rules never fight: keeping the best
checkpoints can never evict the newest one (transformers #15089; Orbax `best_fn` with
`max_to_keep`), and a pinned or every-N checkpoint survives whatever the other rules say.
Nothing here touches the disk; records are whatever the caller rebuilt from the manifests.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from haltpoint.stopping.inputs import whole_number

__all__ = [
    "CheckpointRecord",
    "KeepBest",
    "KeepEvery",
    "KeepLatest",
    "KeepPinned",
    "RetentionRule",
    "best_record",
    "build_rules",
    "commit_order",
    "contested_steps",
    "recorded_best_rules",
    "retained_steps",
]

_MODES = ("min", "max")


class CheckpointRecord(Protocol):
    """What the rules read about one committed checkpoint."""

    @property
    def step(self) -> int: ...

    @property
    def metrics(self) -> Mapping[str, float]: ...

    @property
    def pinned(self) -> bool: ...

    @property
    def sequence(self) -> int | None:
        """Its place in commit order (None: a manifest of an older haltpoint)."""
        ...


class _Ordered(Protocol):
    @property
    def step(self) -> int: ...

    @property
    def sequence(self) -> int | None: ...


def commit_order(record: _Ordered) -> tuple[int, int]:
    """The key that sorts records (or manifests) oldest-committed first: by sequence, one without
    it (written before haltpoint recorded it) before any with one, then by step.

    After a rewind (saves 4, 5 after a restore of step 1, in a run that had reached 20) the
    new branch sorts last, above the abandoned branch's higher steps:

    >>> from types import SimpleNamespace as R
    >>> records = [R(step=s, sequence=q) for s, q in [(5, 4), (20, 2), (1, None), (4, 3)]]
    >>> [r.step for r in sorted(records, key=commit_order)]
    [1, 20, 4, 5]
    """
    return (-1 if record.sequence is None else record.sequence, record.step)


@runtime_checkable
class RetentionRule(Protocol):
    """A rule: the steps, among `records`, that it wants kept."""

    def select(self, records: Sequence[CheckpointRecord]) -> set[int]: ...


def _check_count(name: str, value: object, minimum: int, allowed: str = "") -> int:
    """`value` as a plain int (a NumPy integer is one; a bool is not), at least `minimum`;
    `allowed` replaces the message's "an int >= minimum"."""
    allowed = allowed or f"an int >= {minimum}"
    count = whole_number(value)
    if count is None:
        raise TypeError(f"{name} must be {allowed}, got {value!r}")
    if count < minimum:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return count


def _check_mode(mode: object) -> str:
    if mode not in _MODES:
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    return str(mode)


def _check_monitor(monitor: object) -> str:
    if not isinstance(monitor, str) or not monitor:
        raise TypeError(f"monitor must be a non-empty metric name (str), got {monitor!r}")
    return monitor


def _metric(record: CheckpointRecord, monitor: str) -> float | None:
    """The record's finite value of `monitor`, or None when it is missing or not finite."""
    value = record.metrics.get(monitor)
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _ranked(
    records: Sequence[CheckpointRecord], monitor: str, mode: str
) -> list[tuple[float, int]]:
    """(key, step) pairs best first; ties go to the earlier step."""
    ranked = []
    for record in records:
        value = _metric(record, monitor)
        if value is not None:
            ranked.append((value if mode == "min" else -value, record.step))
    ranked.sort()
    return ranked


@dataclass(frozen=True)
class KeepLatest:
    """Keep the `n` newest committed (`commit_order`; without sequences: the highest steps).

    >>> from types import SimpleNamespace as R
    >>> records = [R(step=s, metrics={}, pinned=False, sequence=None) for s in (3, 1, 2)]
    >>> sorted(KeepLatest(2).select(records))
    [2, 3]
    >>> rewound = [R(step=s, metrics={}, pinned=False, sequence=q) for s, q in [(9, 0), (4, 1)]]
    >>> KeepLatest(1).select(rewound)
    {4}
    """

    n: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", _check_count("KeepLatest.n", self.n, 1))  # frozen

    def select(self, records: Sequence[CheckpointRecord]) -> set[int]:
        return {r.step for r in sorted(records, key=commit_order, reverse=True)[: self.n]}


@dataclass(frozen=True)
class KeepBest:
    """Keep the `k` best steps by `monitor` (`mode` "min" or "max").

    Records that lack the metric, or whose value is NaN or infinite, are never among the best;
    on equal values the earlier step wins.

    >>> from types import SimpleNamespace as R
    >>> records = [R(step=s, metrics={"loss": v}, pinned=False)
    ...            for s, v in [(1, 0.5), (2, 0.3), (3, float("nan")), (4, 0.3)]]
    >>> sorted(KeepBest(2, "loss").select(records))
    [2, 4]
    >>> sorted(KeepBest(1, "loss", mode="max").select(records))
    [1]
    """

    k: int
    monitor: str
    mode: str = "min"

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", _check_count("KeepBest.k", self.k, 1))  # frozen
        _check_monitor(self.monitor)
        _check_mode(self.mode)

    def select(self, records: Sequence[CheckpointRecord]) -> set[int]:
        kept: set[int] = set()
        for _, step in _ranked(records, self.monitor, self.mode):
            if len(kept) == self.k:
                break
            kept.add(step)
        return kept


@dataclass(frozen=True)
class KeepEvery:
    """Keep every step divisible by `n`, forever (0 included).

    >>> from types import SimpleNamespace as R
    >>> records = [R(step=s, metrics={}, pinned=False) for s in range(1, 8)]
    >>> sorted(KeepEvery(3).select(records))
    [3, 6]
    """

    n: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", _check_count("KeepEvery.n", self.n, 1))  # frozen

    def select(self, records: Sequence[CheckpointRecord]) -> set[int]:
        return {r.step for r in records if r.step % self.n == 0}


@dataclass(frozen=True)
class KeepPinned:
    """Keep every record marked `pinned=True`.

    >>> from types import SimpleNamespace as R
    >>> records = [R(step=1, metrics={}, pinned=True), R(step=2, metrics={}, pinned=False)]
    >>> KeepPinned().select(records)
    {1}
    """

    def select(self, records: Sequence[CheckpointRecord]) -> set[int]:
        return {r.step for r in records if r.pinned}


def retained_steps(records: Sequence[CheckpointRecord], rules: Sequence[RetentionRule]) -> set[int]:
    """The steps to keep: the union of what every rule selects."""
    kept: set[int] = set()
    for rule in rules:
        kept |= rule.select(records)
    return kept


def contested_steps(
    records: Sequence[CheckpointRecord], rules: Sequence[RetentionRule]
) -> set[int]:
    """The steps kept by the rules that choose among checkpoints (`KeepLatest`, `KeepBest`):
    were one of them damaged, another checkpoint would take its place.

    >>> from types import SimpleNamespace as R
    >>> records = [R(step=s, metrics={}, pinned=s == 1, sequence=None) for s in (1, 2, 3)]
    >>> sorted(contested_steps(records, [KeepLatest(1), KeepPinned()]))
    [3]
    """
    kept: set[int] = set()
    for rule in rules:
        if isinstance(rule, (KeepLatest, KeepBest)):
            kept |= rule.select(records)
    return kept


def best_record(
    records: Sequence[CheckpointRecord], monitor: str, mode: str = "min"
) -> CheckpointRecord | None:
    """The record with the best finite `monitor` value (earliest step on ties), or None.

    >>> from types import SimpleNamespace as R
    >>> best_record([R(step=1, metrics={"acc": 0.9}, pinned=False)], "acc", "max").step
    1
    >>> best_record([R(step=1, metrics={}, pinned=False)], "acc", "max") is None
    True
    """
    _check_monitor(monitor)
    _check_mode(mode)
    ranked = _ranked(records, monitor, mode)
    if not ranked:
        return None
    best_step = ranked[0][1]
    return next(r for r in records if r.step == best_step)


def recorded_best_rules(
    rules: Sequence[RetentionRule], recorded: Iterable[tuple[str, str]]
) -> list[KeepBest]:
    """`KeepBest` rules, with the `k` of the `KeepBest` among `rules`, for each recorded
    (monitor, mode) other than its own: a writer that ranks by another monitor or mode than
    the run's checkpoints were kept by must not evict the best by theirs (the run's best
    `score` when a resumed job forgot `mode="max"`). None without a `KeepBest`.

    >>> rules = [KeepLatest(1), KeepBest(1, "score", "min")]
    >>> recorded_best_rules(rules, [("score", "max"), ("score", "min")])
    [KeepBest(k=1, monitor='score', mode='max')]
    >>> recorded_best_rules([KeepLatest(1)], [("score", "max")])
    []
    """
    own = next((r for r in rules if isinstance(r, KeepBest)), None)
    if own is None:
        return []
    others = sorted(set(recorded) - {(own.monitor, own.mode)})
    return [KeepBest(own.k, monitor, mode) for monitor, mode in others]


def build_rules(
    *,
    keep_last: int,
    keep_best: int,
    monitor: str | None,
    mode: str,
    keep_every: int | None,
) -> list[RetentionRule]:
    """Validate the user's retention settings and turn them into rules.

    `keep_last` is at least 1: the newest checkpoint is what a resume needs, so it is always
    kept. Pinned checkpoints are always kept too.

    >>> build_rules(keep_last=2, keep_best=1, monitor="loss", mode="min", keep_every=None)
    [KeepLatest(n=2), KeepBest(k=1, monitor='loss', mode='min'), KeepPinned()]

    Raises:
        TypeError: a count is not an int (bool is refused), or `monitor` is not a string.
        ValueError: a count is out of range, `mode` is not "min"/"max", or `keep_best > 0`
            without a `monitor`.
    """
    newest = "an int >= 1 (the newest checkpoint is always kept: a resume needs it)"
    keep_last = _check_count("keep_last", keep_last, 1, newest)
    keep_best = _check_count("keep_best", keep_best, 0)
    if keep_every is not None:
        keep_every = _check_count("keep_every", keep_every, 1, "None or an int >= 1")
    _check_mode(mode)
    if monitor is not None:
        _check_monitor(monitor)
    if keep_best > 0 and monitor is None:
        raise ValueError(
            f"keep_best={keep_best} needs monitor: the name of the metric that ranks "
            "checkpoints (e.g. monitor='val_loss'); or set keep_best=0"
        )

    rules: list[RetentionRule] = [KeepLatest(keep_last)]
    if keep_best > 0 and monitor is not None:
        rules.append(KeepBest(keep_best, monitor, mode))
    if keep_every is not None:
        rules.append(KeepEvery(keep_every))
    rules.append(KeepPinned())
    return rules
