"""The per-checkpoint manifest: step, time, metrics, the state tree and where every tensor lives.

The manifest is canonical, strict JSON (sorted keys, no whitespace, ASCII, no NaN) ending in a
newline, with a `"checksum"` field: the xxh3-128 of the canonical encoding of every other
field. Decoding re-encodes what it parsed and demands the very same bytes, so any change to
the file, even one that leaves the JSON valid and the meaning unchanged, is detected. Its
presence, complete and valid, is what makes a checkpoint exist.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from haltpoint.errors import CheckpointError, CorruptCheckpointError
from haltpoint.store.hashing import HASH_HEX_LENGTH, hash_bytes
from haltpoint.store.tensor_file import REMEDY, TensorRecord, strict_loads

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "MAX_MANIFEST_CONTAINERS",
    "MAX_MANIFEST_DEPTH",
    "MAX_MANIFEST_VALUES",
    "MAX_TIME",
    "RANKING_KEY",
    "SEQUENCE_KEY",
    "DamagedManifestError",
    "Manifest",
    "NewerFormatError",
    "Ranking",
    "check_save_time",
    "next_sequence",
    "recorded_rankings",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# A manifest takes ~310 bytes, 6.3 JSON containers and 11.7 values per tensor (measured on a
# model of 10,000 tensors with Adam's two states each): the limits hold ~200,000 tensors, and
# keep the memory a crafted manifest costs to parse near that of a real one (docs/reliability.md).
MAX_MANIFEST_BYTES = 64 << 20
MAX_MANIFEST_CONTAINERS = 2_000_000
"""The most `{` and `[` a manifest's bytes may hold (counted before parsing)."""
MAX_MANIFEST_VALUES = 4_000_000
"""The most `,` a manifest's bytes may hold (counted before parsing)."""
MAX_MANIFEST_DEPTH = 100
"""The deepest nesting of JSON containers in a manifest's `tree` and `extra`."""
MAX_TIME = 32503680000.0
"""3000-01-01: a manifest's time is a unix time from 0 (1970) to this."""
_INT64 = 2**63


def check_save_time(now: float, step: int, where: str) -> float:
    """`now`, the system clock's time for a save of `step` into `where`, when a reader accepts
    it in a manifest (a unix time from 0, 1970, to the year 3000); else `CheckpointError`,
    one line naming the clock, before anything is written: a manifest of another time would
    be committed and then refused by every read.

    >>> check_save_time(1700000000.0, 3, "run")
    1700000000.0
    >>> check_save_time(-1.0, 3, "run")
    Traceback (most recent call last):
    ...
    haltpoint.errors.CheckpointError: cannot save step 3 in run: the system clock says -1.0 ...
    """
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not 0 <= now <= MAX_TIME:
        raise CheckpointError(
            f"cannot save step {step} in {where}: the system clock says {now!r} (a unix time "
            "in seconds), and a checkpoint's time must be from 1970 to the year 3000 for "
            "readers to accept it; nothing was written: set the clock right (date, NTP) and "
            "save again",
            path=where,
        )
    return float(now)


_FIELDS = ("extra", "format_version", "metrics", "step", "tensors", "time", "tree", "versions")
_TAG = "$float"
RANKING_KEY = "ranking"  # the manifest's `extra` key of the writer's monitor and mode
SEQUENCE_KEY = "sequence"  # the manifest's `extra` key of its place in commit order
_MODES = ("min", "max")
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _canonical(obj: dict[str, Any]) -> bytes:
    text = json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return text.encode("ascii")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_json(value: Any, where: str) -> None:
    """Raise TypeError/ValueError naming `where` unless `value` is strict JSON as-is."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value}, which strict JSON cannot hold")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has the key {key!r}; JSON object keys must be str")
            _check_json(item, f"{where}[{key!r}]")
    else:
        raise TypeError(
            f"{where} is a {type(value).__name__}; only dict, list, str, int, float, bool and "
            "None are strict JSON (encode tuples, bytes and the like in the state layer)"
        )


def _encode_metric(name: str, value: object) -> int | float | dict[str, str]:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"metrics[{name!r}] must be an int or float, got {type(value).__name__} "
            f"{value!r} (convert tensors with .item())"
        )
    if isinstance(value, numbers.Integral):
        return int(value)
    number = float(value)
    if math.isfinite(number):
        return number
    return {_TAG: "nan" if math.isnan(number) else ("inf" if number > 0 else "-inf")}


def _decode_metric(value: Any) -> float:
    if (_is_int(value) and -_INT64 <= value < _INT64) or isinstance(value, float):
        return value
    if isinstance(value, dict) and list(value) == [_TAG] and value[_TAG] in _NONFINITE:
        return _NONFINITE[value[_TAG]]
    raise ValueError(f"{value!r} is not a number")


class NewerFormatError(CorruptCheckpointError):
    """The manifest has a newer `format_version` than this haltpoint reads: written by a
    newer haltpoint, not damage."""


class DamagedManifestError(CorruptCheckpointError):
    """The manifest's bytes are damaged (too large, not strict JSON, a checksum mismatch, not
    canonical, a malformed field): proven damage, unlike a file that could not be read or a
    manifest of a newer format."""


@dataclass(frozen=True)
class Ranking:
    """The writer's `monitor` (None: it had none) and `mode`, recorded in every manifest.

    Stored under `extra["ranking"]`, inside the checksum, so what ranks a run's checkpoints
    is read from the checkpoints themselves. Manifests of older haltpoint versions lack it.

    >>> Ranking.parse({"monitor": "val_loss", "mode": "min"}, "manifest")
    Ranking(monitor='val_loss', mode='min')
    >>> Ranking.parse({"monitor": "val_loss"}, "manifest")
    Traceback (most recent call last):
    ...
    ValueError: manifest: extra['ranking'] needs a monitor (a name or null) and a mode ...
    """

    monitor: str | None
    mode: str

    def to_json(self) -> dict[str, Any]:
        """The record as it is stored."""
        return {"monitor": self.monitor, "mode": self.mode}

    @classmethod
    def parse(cls, value: Any, where: str) -> Ranking:
        """The record stored as `value`; ValueError naming `where` if it is malformed."""
        monitor = value.get("monitor", 0) if isinstance(value, dict) else 0
        if (
            not isinstance(value, dict)
            or sorted(value) != ["mode", "monitor"]
            or not (monitor is None or (isinstance(monitor, str) and monitor))
            or value["mode"] not in _MODES
        ):
            raise ValueError(
                f"{where}: extra[{RANKING_KEY!r}] needs a monitor (a name or null) and a mode "
                f"(min or max), and nothing else; got {value!r}"
            )
        return cls(monitor, value["mode"])


def _check_sequence(value: Any) -> None:
    """ValueError unless `value` is a commit sequence: an int in [0, 2**63)."""
    if not _is_int(value) or not 0 <= value < _INT64:
        raise ValueError(
            f"extra[{SEQUENCE_KEY!r}] must be an int in [0, 2**63) (the checkpoint's place in "
            f"commit order), got {value!r}"
        )


def next_sequence(manifests: Iterable[Manifest]) -> int:
    """The sequence of the next commit: one more than the highest of `manifests` (those
    committed in the run), or 0 when none records one.

    >>> old = Manifest(step=9, time=0.0, metrics={}, tree={}, tensors={}, versions={})
    >>> next_sequence([]), next_sequence([old]), next_sequence([Manifest(
    ...     step=4, time=0.0, metrics={}, tree={}, tensors={}, versions={},
    ...     extra={"sequence": 7}), old])
    (0, 0, 8)

    Raises:
        CorruptCheckpointError: one of `manifests` records the last sequence there is
            (2**63 - 1, which no writer counts to: it was crafted), so nothing can follow it.
    """
    last = max(
        (m for m in manifests if m.sequence is not None),
        key=lambda m: m.sequence or 0,
        default=None,
    )
    if last is None:
        return 0
    assert last.sequence is not None
    if last.sequence >= _INT64 - 1:
        raise CorruptCheckpointError(
            f"cannot commit a checkpoint: step {last.step} records commit sequence "
            f"{last.sequence} (extra[{SEQUENCE_KEY!r}]), the last place in commit order, so "
            "none can come after it (no writer counts that far: the manifest was crafted); "
            f"move its folder step-{last.step:09d} out of the run directory, then save again",
            path=f"step-{last.step:09d}",
        )
    return last.sequence + 1


def recorded_rankings(manifests: Iterable[Manifest | None]) -> set[tuple[str, str]]:
    """The (monitor, mode) pairs that ranked `manifests` (None entries and writers without a
    monitor name none): what retention keeps the best by, besides the current writer's own.

    >>> ranked = Manifest(step=1, time=0.0, metrics={}, tree={}, tensors={}, versions={},
    ...     extra={"ranking": {"monitor": "loss", "mode": "min"}})
    >>> recorded_rankings([ranked, None])
    {('loss', 'min')}
    """
    return {
        (m.ranking.monitor, m.ranking.mode)
        for m in manifests
        if m is not None and m.ranking is not None and m.ranking.monitor is not None
    }


def _over_limits(data: bytes) -> str | None:
    """What makes `data` too large to parse, counted without parsing (an over-count: the
    characters inside strings count too), or None."""
    if len(data) > MAX_MANIFEST_BYTES:
        return f"{len(data)} bytes is over the limit of {MAX_MANIFEST_BYTES} bytes (64 MiB)"
    containers = data.count(b"{") + data.count(b"[")
    if containers > MAX_MANIFEST_CONTAINERS:
        return f"{containers} JSON containers is over the limit of {MAX_MANIFEST_CONTAINERS}"
    values = data.count(b",")
    if values > MAX_MANIFEST_VALUES:
        return f"{values} JSON values is over the limit of {MAX_MANIFEST_VALUES}"
    return None


def _check_depth(value: Any, where: str, limit: int) -> None:
    """ValueError naming `where` if containers nest more than `limit` levels under it (one
    iterator per level: no memory for wide containers)."""
    stack = [iter([value])]
    while stack:
        for item in stack[-1]:
            if isinstance(item, (dict, list)) and item:
                if len(stack) > limit:
                    raise ValueError(
                        f"{where} nests containers deeper than {MAX_MANIFEST_DEPTH} levels"
                    )
                stack.append(iter(item.values() if isinstance(item, dict) else item))
                break
        else:
            stack.pop()


@dataclass
class Manifest:
    """Everything about one checkpoint except its tensor bytes; `encode`/`decode` to disk.

    >>> m = Manifest(step=3, time=1700000000.0, metrics={"val_loss": 0.25}, tree={"w": 1},
    ...              tensors={}, versions={"haltpoint": "0.1.0"})
    >>> data = m.encode()
    >>> Manifest.decode(data, source="run/step-000000003") == m
    True
    >>> Manifest.decode(data.replace(b'"step":3', b'"step":4'), source="run/step-000000003")
    Traceback (most recent call last):
    ...
    haltpoint.store.manifest.DamagedManifestError: manifest run/step-000000003: checksum ...
    """

    step: int
    time: float
    metrics: dict[str, float]
    tree: dict[str, Any]
    tensors: dict[str, TensorRecord]
    versions: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def nbytes(self) -> int:
        """The total size of the tensor data this manifest references."""
        return sum(record.nbytes for record in self.tensors.values())

    def files(self) -> set[str]:
        """The tensor files (relative to the run directory) this manifest references."""
        return {record.file for record in self.tensors.values()}

    @property
    def sequence(self) -> int | None:
        """Its place in the run's commit order (`extra["sequence"]`: each commit records one
        more than the highest committed before it), or None for a manifest of an older
        haltpoint, which sorts before every one that records it."""
        if SEQUENCE_KEY not in self.extra:
            return None
        value: int = self.extra[SEQUENCE_KEY]
        _check_sequence(value)  # decode has checked it; a Manifest made in memory may not be
        return value

    @property
    def checksum(self) -> str:
        """The xxh3-128 of its content, as `encode` records it in the `"checksum"` field: two
        manifests (read from different disks, say) are the same checkpoint when it is equal."""
        return hash_bytes(_canonical(self._body()))

    @property
    def ranking(self) -> Ranking | None:
        """The writer's monitor and mode, or None for a manifest that does not record them."""
        if RANKING_KEY not in self.extra:
            return None
        return Ranking.parse(self.extra[RANKING_KEY], "manifest")

    def _body(self) -> dict[str, Any]:
        """The JSON form of every field but the checksum; TypeError/ValueError if unencodable."""
        if not _is_int(self.step) or not 0 <= self.step < _INT64:
            raise ValueError(f"step must be a non-negative int below 2**63, got {self.step!r}")
        if not _is_int(self.format_version) or self.format_version < 1:
            raise ValueError(f"format_version must be a positive int, got {self.format_version!r}")
        if isinstance(self.time, bool) or not isinstance(self.time, numbers.Real):
            raise TypeError(f"time must be a unix time in seconds, got {self.time!r}")
        if not math.isfinite(self.time):
            raise ValueError(f"time must be finite, got {self.time!r}")
        for name in ("metrics", "tree", "tensors", "versions", "extra"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise TypeError(f"{name} must be a dict with str keys, got {value!r}")
        if not all(isinstance(v, str) for v in self.versions.values()):
            raise TypeError(f"versions must map names to version strings, got {self.versions!r}")
        bad = [k for k, v in self.tensors.items() if not isinstance(v, TensorRecord)]
        if bad:
            raise TypeError(f"tensors[{bad[0]!r}] is not a TensorRecord")
        _check_json(self.tree, "tree")
        _check_json(self.extra, "extra")
        if SEQUENCE_KEY in self.extra:
            _check_sequence(self.extra[SEQUENCE_KEY])
        return {
            "extra": self.extra,
            "format_version": self.format_version,
            "metrics": {k: _encode_metric(k, v) for k, v in self.metrics.items()},
            "step": self.step,
            "tensors": {k: v.to_json() for k, v in self.tensors.items()},
            "time": float(self.time),
            "tree": self.tree,
            "versions": self.versions,
        }

    def encode(self) -> bytes:
        """Canonical JSON bytes with a checksum; the same manifest always gives the same bytes.

        Raises:
            TypeError, ValueError: a field holds something strict JSON cannot (the message
                names it), or the step is not a non-negative int.
        """
        body = self._body()
        body["checksum"] = hash_bytes(_canonical(body))
        return _canonical(body) + b"\n"

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview, *, source: str) -> Manifest:
        """Parse and fully validate manifest bytes read from `source` (named in errors).

        Raises:
            CorruptCheckpointError: the bytes are not exactly a manifest this haltpoint wrote:
                too large, not strict JSON, duplicate keys, missing, extra or mistyped fields,
                a checksum mismatch, a newer format (upgrade haltpoint), or invalid tensor
                records (paths outside the run, absurd shapes, sizes that do not add up).
        """

        def corrupt(problem: str) -> CorruptCheckpointError:
            return DamagedManifestError(f"manifest {source}: {problem}; {REMEDY}", path=source)

        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        data = bytes(data)
        problem = _over_limits(data)
        if problem is not None:
            raise corrupt(problem)
        try:
            obj = strict_loads(data.decode("utf-8"))
            if not isinstance(obj, dict):
                raise ValueError("the top level is not a JSON object")
            checksum = obj.pop("checksum", None)
            expected = hash_bytes(_canonical(obj))
            canonical = _canonical({**obj, "checksum": checksum}) + b"\n"
        except (ValueError, RecursionError) as e:
            raise corrupt(f"not valid strict JSON ({str(e)[:200]})") from None
        version = obj.get("format_version")
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            damaged = "" if checksum == expected else " (or the manifest is damaged)"
            raise NewerFormatError(
                f"manifest {source} has format_version {version}, but this haltpoint reads up to "
                f"{FORMAT_VERSION}: it was written by a newer haltpoint{damaged}; upgrade "
                "haltpoint (pip install -U haltpoint) to read it",
                path=source,
            )
        if not isinstance(checksum, str) or len(checksum) != HASH_HEX_LENGTH:
            raise corrupt(f"the checksum field is missing or malformed: {checksum!r}")
        if checksum != expected:
            raise corrupt(f"checksum mismatch (recorded {checksum}, computed {expected})")
        if data != canonical:
            raise corrupt("the bytes are not in canonical form (the file was altered)")
        try:
            return cls._from_body(obj, source)
        except ValueError as e:
            raise corrupt(str(e)) from None

    @classmethod
    def _from_body(cls, obj: dict[str, Any], source: str) -> Manifest:
        """Build from a checksummed body; ValueError (or CorruptCheckpointError) if malformed."""
        if sorted(obj) != sorted(_FIELDS):
            missing, extra = sorted(set(_FIELDS) - set(obj)), sorted(set(obj) - set(_FIELDS))
            raise ValueError(f"wrong fields (missing {missing}, unexpected {extra})")
        step, time, version = obj["step"], obj["time"], obj["format_version"]
        if not _is_int(version) or version < 1:
            raise ValueError(f"format_version {version!r} is not a positive int")
        if not _is_int(step) or not 0 <= step < _INT64:
            raise ValueError(f"step {step!r} is not an int in [0, 2**63)")
        if not (_is_int(time) or isinstance(time, float)) or not 0 <= time <= MAX_TIME:
            raise ValueError(f"time {time!r} is not a unix time in seconds before the year 3000")
        for name in ("metrics", "tree", "tensors", "versions", "extra"):
            if not isinstance(obj[name], dict):
                raise ValueError(f"{name} is not a JSON object")
        if RANKING_KEY in obj["extra"]:
            Ranking.parse(obj["extra"][RANKING_KEY], "the record")
        if SEQUENCE_KEY in obj["extra"]:
            _check_sequence(obj["extra"][SEQUENCE_KEY])
        for name in ("tree", "extra"):
            for key, value in obj[name].items():
                _check_depth(value, f"{name}[{key!r}]", MAX_MANIFEST_DEPTH - 2)
        if not all(isinstance(v, str) for v in obj["versions"].values()):
            raise ValueError("versions holds a value that is not a string")
        metrics = {}
        for name, value in obj["metrics"].items():
            try:
                metrics[name] = _decode_metric(value)
            except ValueError as e:
                raise ValueError(f"metric {name!r}: {e}") from None
        tensors = {}
        for key, record in obj["tensors"].items():
            try:
                tensors[key] = TensorRecord.from_json(record, source=f"{source}, tensor {key!r}")
            except CorruptCheckpointError as e:
                raise CorruptCheckpointError(f"manifest {e}", path=source) from None
        return cls(
            step=step,
            time=float(time),
            metrics=metrics,
            tree=obj["tree"],
            tensors=tensors,
            versions=obj["versions"],
            extra=obj["extra"],
            format_version=version,
        )
