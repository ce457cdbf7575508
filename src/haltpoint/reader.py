"""The read side of a run directory: listing, choosing a checkpoint, reading it, loading it.

`RunReader` answers from the manifests on disk only. `Checkpointer` uses it for `list` and
`restore`, and for the records retention ranks; reading and loading are two calls so that,
under `torch.distributed`, every rank has read (and verified) a checkpoint before any rank
loads it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import replace
from typing import Any

import torch

from haltpoint.distributed.sharded import plan_shards, verify_shards
from haltpoint.errors import CheckpointNotFoundError, CorruptCheckpointError
from haltpoint.policies.retention import best_record, commit_order
from haltpoint.state._common import type_name
from haltpoint.state.load import check_claims, plan_load
from haltpoint.state.optimizer import check_optimizer_state
from haltpoint.state.rng import plan_rng
from haltpoint.state.tree import check_tree, referenced_tensors, unflatten_state
from haltpoint.stopping.inputs import whole_number
from haltpoint.store.background import warn_user
from haltpoint.store.info import CheckpointInfo, Found, Planned
from haltpoint.store.run_dir import (
    Entry,
    RunDirectory,
    ShardedRecord,
    checkpoint_dirname,
    checkpoint_nbytes,
    dcp_folder,
    is_sharded,
)
from haltpoint.store.tensor_file import TensorRecord, torch_dtype
from haltpoint.store.tensor_reader import (
    check_headers,
    read_tensors,
    verify_file,
    verify_tensors,
)

__all__ = [
    "CHOICES",
    "RNG_ENTRY",
    "RNG_MAX_BYTES",
    "CheckpointInfo",
    "Found",
    "RunReader",
    "check_payloads",
    "check_structure",
    "payload_tensors",
]

RNG_ENTRY = "__rng__"
"""The name under which random-number state is stored beside the user's entries."""
RNG_MAX_BYTES = 1 << 20
"""The most bytes the tensors of a saved random state may claim: torch's CPU state is 5,056
bytes, NumPy's key 2,496 and each CUDA device's 16, so 1 MiB is far beyond any real one."""
CHOICES = 10
"""How many times `RunReader.read` chooses "latest" or "best" again, each time a writer's
retention removed what it chose while it read it, before it gives up."""
_NOT_READ = object()  # in place of a saved entry restore was not asked for, and did not read


class RunReader:
    """Lists, chooses, reads and loads the checkpoints of one run directory.

    Args:
        run: the run directory.
        monitor: the metric that ranks checkpoints for `"best"`, or None.
        mode: "min" or "max".
        mode_given: whether the user chose `mode`; if not, `"best"` ranks by the mode the
            run's newest checkpoint ranked by `monitor` records, when one does.
    """

    def __init__(
        self, run: RunDirectory, monitor: str | None, mode: str, mode_given: bool = True
    ) -> None:
        self.run = run
        self.monitor = monitor
        self.mode = mode
        self.mode_given = mode_given

    @property
    def directory(self) -> str:
        return self.run.storage.url

    def info(self, entry: Entry) -> CheckpointInfo:
        manifest = entry.manifest
        assert manifest is not None
        return CheckpointInfo(
            step=manifest.step,
            time=manifest.time,
            metrics=manifest.metrics,
            size=checkpoint_nbytes(manifest),
            path=f"{self.directory}/{entry.dirname}",
            pinned=entry.pinned,
            sequence=manifest.sequence,
        )

    def checkpoints(self) -> list[CheckpointInfo]:
        """The committed checkpoints, oldest step first."""
        return [self.info(e) for e in self.run.committed()]

    def entry(self, step: int, entries: list[Entry] | None = None) -> Entry:
        """The committed checkpoint of `step`; `CheckpointNotFoundError` naming the others,
        or the `CorruptCheckpointError` of its damaged manifest."""
        entries = self.run.committed() if entries is None else entries
        for entry in entries:
            if entry.step == step:
                return entry
        for entry in self.run.scan():
            if entry.step == step and entry.error is not None:
                raise entry.error
        raise CheckpointNotFoundError(
            f"no intact checkpoint for step {step} in {self.directory}; "
            f"available: {_steps(entries)}",
            path=f"{self.directory}/{checkpoint_dirname(step)}",
        )

    def candidates(self, entries: list[Entry], which: str | int) -> list[Entry]:
        """The checkpoints `which` may mean, in the order to try them."""
        if which == "latest":  # the newest committed first (after a rewind: the new branch)
            return sorted(entries, key=commit_order, reverse=True)
        if which == "best":
            if self.monitor is None:
                raise ValueError(
                    "which='best' needs the Checkpointer's monitor=... to rank checkpoints"
                )
            mode = self._best_mode(entries)
            remaining, ranked = [self.info(e) for e in entries], []
            while (best := best_record(remaining, self.monitor, mode)) is not None:
                ranked.append(best.step)
                remaining = [r for r in remaining if r.step != best.step]
            by_step = {e.step: e for e in entries}
            return [by_step[s] for s in ranked]
        step = whole_number(which)
        if step is None or step < 0:
            raise ValueError(
                f"which must be 'latest', 'best' or a step (an int >= 0), got {which!r}"
            )
        return [self.entry(step, entries)]

    def _best_mode(self, entries: list[Entry]) -> str:
        """The mode "best" ranks by: the recorded one for `monitor` when none was given (a
        run ranked by `score` "max" is not read the wrong way up), said when they differ."""
        manifests = sorted((e.manifest for e in entries if e.manifest), key=commit_order)
        recorded = [
            m.ranking.mode
            for m in manifests  # the newest committed last: after a rewind, the new branch
            if m.ranking is not None and m.ranking.monitor == self.monitor
        ]
        if not recorded or recorded[-1] == self.mode:
            return self.mode
        if not self.mode_given:
            return recorded[-1]
        warn_user(
            f"{self.directory}: its checkpoints rank {self.monitor} by mode={recorded[-1]!r}; "
            f"choosing the best by mode={self.mode!r}, as given"
        )
        return self.mode

    def read(
        self,
        which: str | int,
        check_shards: bool = True,
        skip: Mapping[int, str] | None = None,
        *,
        state: MutableMapping[str, Any] | None = None,
        strict: bool = True,
    ) -> Found | None:
        """Find the checkpoint `which` names and read its tensors, verified.

        With `state` (the live objects `plan` loads into next), what each candidate claims is
        checked against them before any tensor is read (`state.load.check_claims`: a tensor
        whose shape or dtype cannot fit its target raises the `StateMismatchError` the load
        would, and no memory is taken for it), and only the tensors of the entries `state`
        names are read into memory, with the random state's; the others are verified as
        they stream through a fixed buffer (a checkpoint with any damaged tensor is passed
        over, as `haltpoint verify` reports it). Without `state`, every tensor is read.

        Damaged candidates of "latest" or "best" are warned about and skipped. One that a
        writer's retention removed while it was read is no damage, and says that a newer
        checkpoint was committed meanwhile (retention removes one only then): "latest" and
        "best" choose again among the checkpoints committed now, not among the older ones
        listed before (`CHOICES` times at most). A sharded
        checkpoint's DCP files are checked too, unless `check_shards` is false (under a process
        group the ranks check them together: `check_shard_part`). `skip` maps the steps found
        damaged that way to what is wrong with them: they are passed over as damaged. None for
        "latest" in a run without checkpoints.
        """
        entries = self.run.committed()
        candidates = self.candidates(entries, which)
        passed = [(e, skip[e.step]) for e in candidates if skip and e.step in skip]
        if skip and which not in ("latest", "best"):  # a step asked for by number: no fallback
            if passed:
                raise CorruptCheckpointError(passed[0][1], path=self.directory)
        elif skip:
            candidates = [e for e in candidates if e.step not in skip]
            damage = list(skip.values())[-1]
            if not candidates:  # every candidate is damaged: the last one's damage
                raise CorruptCheckpointError(damage, path=self.directory)
            _warn_falling_back(damage, candidates[0].step)
        if not candidates:
            if which == "latest":
                return None
            if not entries:  # a mistyped path reads as an empty run: say both
                raise CheckpointNotFoundError(
                    f"no checkpoint in {self.directory}: it holds none, or does not exist; "
                    "pass the folder a Checkpointer wrote",
                    path=self.directory,
                )
            if not any(e.manifest and self.monitor in e.manifest.metrics for e in entries):
                raise CheckpointNotFoundError(  # a typo, or another run's name: no step helps
                    f"no checkpoint in {self.directory} has a finite {self.monitor!r} metric to "
                    f"rank by ({_metric_names(entries)}); pass monitor= one of those, the name "
                    "the metrics were saved under",
                    path=self.directory,
                )
            raise CheckpointNotFoundError(
                f"no checkpoint in {self.directory} has a finite {self.monitor!r} metric to "
                f"rank by (every {self.monitor!r} recorded is NaN or infinite); no checkpoint "
                f"is the best by it: restore(state, 'latest') or a step ({_steps(entries)}) "
                "instead",
                path=self.directory,
            )
        tried = set(skip or ())
        damaged: tuple[Entry, CorruptCheckpointError] | None = None  # the last, if damaged
        for _ in range(CHOICES):
            gone: tuple[Entry, CorruptCheckpointError] | None = None  # removed while read
            for index, entry in enumerate(candidates):
                tried.add(entry.step)
                try:
                    tensors = self._read_one(entry, state, strict, check_shards)
                except CorruptCheckpointError as exc:
                    if self.run.removed(entry.dirname):  # a reader raced the writer: no damage
                        gone = (entry, exc)
                        break  # and the writer committed a newer one: choose among those now
                    if index + 1 < len(candidates):
                        _warn_falling_back(str(exc), candidates[index + 1].step)
                        passed.append((entry, str(exc)))
                    else:
                        damaged = (entry, exc)
                    continue
                return Found(entry, tensors, tuple(passed))
            if gone is None or which not in ("latest", "best"):
                break
            # retention removes a checkpoint only once a newer one is committed, which may be
            # the latest or the best now: the older candidates listed before are not
            now = self.candidates(self.run.committed(), which)
            candidates = [e for e in now if e.step not in tried]
            if not candidates:
                break
        else:
            raise CheckpointNotFoundError(
                f"the writer of {self.directory} removed {CHOICES} checkpoints in turn while "
                "restore read them (it saves faster than this reader reads one); restore "
                "again, or keep more checkpoints (keep_last)",
                path=self.directory,
            )
        if damaged is not None:
            raise damaged[1]
        assert gone is not None
        again = "restore again" if which in ("latest", "best") else "restore another step"
        raise CheckpointNotFoundError(
            f"the checkpoint of step {gone[0].step} was removed by the writer's retention while "
            f"it was being read; {again}",
            path=f"{self.directory}/{gone[0].dirname}",
        ) from gone[1]

    def _read_one(
        self,
        entry: Entry,
        state: MutableMapping[str, Any] | None,
        strict: bool,
        check_shards: bool,
    ) -> dict[str, torch.Tensor]:
        """The tensors restore reads of `entry`, every tensor of it verified (see `read`).

        Raises:
            CorruptCheckpointError: it is damaged, or was removed while it was read.
        """
        assert entry.manifest is not None
        storage = self.run.storage
        records = self._to_read(entry, state, strict)
        tensors = read_tensors(storage, records, verify=True)
        rest = {k: r for k, r in entry.manifest.tensors.items() if k not in records}
        verify_tensors(storage, rest)  # not asked for, but part of the checkpoint
        _check_random_state(entry, tensors)
        if check_shards and is_sharded(entry.manifest):
            self.check_shards(entry)
        return tensors

    def _to_read(
        self, entry: Entry, state: MutableMapping[str, Any] | None, strict: bool
    ) -> dict[str, TensorRecord]:
        """The records of the tensors restore reads into memory for `state` (all, without
        one), once the checks that need none of them have passed: the saved values'
        structure and the random state's size (`CorruptCheckpointError`), their records
        against their files' headers, then what the entries of `state` claim against its
        objects (`StateMismatchError`)."""
        manifest = entry.manifest
        assert manifest is not None
        keys = payload_tensors(entry)
        check_structure(entry)
        if state is None:
            return dict(manifest.tensors)
        if not isinstance(state, MutableMapping):
            raise TypeError(f"state must be a mutable mapping of names, got {type_name(state)}")
        record = self._shards(entry)
        tree = {k: v for k, v in manifest.tree.items() if k != RNG_ENTRY}
        if record is not None:  # the sharded entries load through DCP: not in the tree
            tree = {k: v for k, v in tree.items() if k not in record.entries}
            state = {k: v for k, v in state.items() if k not in record.entries}
        for name in state:
            if name in tree:
                keys |= referenced_tensors(tree[name])
        records = {k: r for k, r in manifest.tensors.items() if k in keys}
        check_headers(self.run.storage, records)  # a record at odds with its file is damage
        claims = {k: (r.shape, torch_dtype(r.dtype)) for k, r in records.items()}
        check_claims(state, tree, claims, strict=strict)
        return records

    def plan(
        self,
        found: Found,
        state: MutableMapping[str, Any],
        *,
        strict: bool,
        device: torch.device | None,
        rng: bool,
    ) -> Planned:
        """Check that what `read` found fits `state` (the sharded entries against DCP's
        metadata too); the returned plan's `load()` loads it (sharded entries through DCP, on
        every rank) and, with `rng`, restores the saved random state last. Under a process
        group every rank checks before any rank loads, since the load of sharded entries may
        be collective (DCP): the plan says which entries load with every rank."""
        entry, tensors = found.entry, found.tensors
        assert entry.manifest is not None
        if device is not None:
            tensors = {k: t.to(device) for k, t in tensors.items()}
        tree = entry.manifest.tree
        read = {k: v for k, v in tree.items() if k in state or k == RNG_ENTRY}
        saved = unflatten_state(read, tensors)
        random_state = saved.pop(RNG_ENTRY, None)
        # the entries not asked for are not read: plan_load names them in report.unexpected
        saved = {k: saved.get(k, _NOT_READ) for k in tree if k != RNG_ENTRY}
        put_rng = _plan_rng(random_state, entry) if random_state is not None and rng else None
        record = self._shards(entry)
        if record is None:
            load_all = plan_load(state, saved, strict=strict)

            def load_plain() -> CheckpointInfo:
                report = load_all()
                if put_rng is not None:
                    put_rng()
                return replace(self.info(entry), report=report)

            return Planned(load_plain)
        names = [n for n in record.entries if n in state]  # the others are not asked for
        rest = {k: v for k, v in state.items() if k not in names}
        saved_rest = {k: v for k, v in saved.items() if k not in record.entries}
        load_rest = plan_load(rest, saved_rest, strict=strict)  # checked before DCP loads
        targets = {n: state[n] for n in names}
        folder = dcp_folder(entry.dirname)
        load_sharded = plan_shards(self.run.storage, folder, targets, record.files, strict)

        def load_both() -> CheckpointInfo:
            missing = load_sharded()
            report = load_rest()
            report.missing.extend(missing)
            report.unexpected.extend(n for n in record.entries if n not in state)
            state.update(rest)  # plain values were replaced in `rest`
            if put_rng is not None:
                put_rng()
            return replace(self.info(entry), report=report)

        if load_sharded.together:
            return Planned(load_both, together=tuple(names))
        return Planned(load_both, alone=tuple(names))

    def damage(self, entry: Entry) -> str | None:
        """What is wrong with a committed checkpoint's data (every hash checked, and the saved
        values restore checks before it loads: `check_payloads`), or None. What retention
        and `haltpoint gc` keep in place of another checkpoint passes this, so it is one that
        `restore` loads, never one it refuses as damaged.

        Raises:
            UnreadableCheckpointError: a file of it cannot be read now (not damage).
        """
        assert entry.manifest is not None
        records = entry.manifest.tensors
        bad = verify_file(self.run.storage, records)
        if bad:
            names = ", ".join(bad[:5])
            return f"{len(bad)} tensor(s) missing or not matching their hash ({names})"
        try:
            self.check_shards(entry)
            keys = {k: records[k] for k in payload_tensors(entry) if k in records}
            check_payloads(entry, read_tensors(self.run.storage, keys, verify=True))
        except (CorruptCheckpointError, ValueError) as exc:
            return str(exc)
        return None

    def check_shards(self, entry: Entry) -> None:
        """Check a sharded checkpoint's DCP files against its manifest (size and xxh3-128);
        a checkpoint without sharded state has none to check.

        Raises:
            CorruptCheckpointError: naming the first file missing, of the wrong size or hash,
                or a malformed sharded record.
        """
        record = self._shards(entry)
        if record is not None:
            verify_shards(self.run.storage, dcp_folder(entry.dirname), record.files)

    def check_shard_part(self, entry: Entry, rank: int, world_size: int) -> str | None:
        """Check this rank's share of a sharded checkpoint's DCP files (every `world_size`-th,
        from the `rank`-th, by name): what is damaged, or None (also without sharded state)."""
        try:
            record = self._shards(entry)
            if record is not None:
                mine = sorted(record.files.items())[rank::world_size]
                folder = dcp_folder(entry.dirname)
                verify_shards(self.run.storage, folder, dict(mine), record.files)
        except CorruptCheckpointError as exc:
            return str(exc)
        return None

    def _shards(self, entry: Entry) -> ShardedRecord | None:
        """The checkpoint's sharded record, None when it has no sharded state."""
        assert entry.manifest is not None
        return ShardedRecord.from_manifest(entry.manifest, f"{self.directory}/{entry.dirname}")


def check_payloads(entry: Entry, tensors: Mapping[str, torch.Tensor]) -> None:
    """The checks of a checkpoint's saved values that need no live object, made by `restore`
    while it chooses a checkpoint (so a checkpoint failing them is passed over like damaged
    tensors) and by `haltpoint verify`: the structure of each optimizer state dict
    (`check_structure`) and the random state (`plan_rng`, which `plan` runs again to restore
    it). `tensors` holds at least the tensors `payload_tensors` names.

    Raises:
        CorruptCheckpointError: naming the entry and what is wrong with it.
    """
    check_structure(entry)
    _check_random_state(entry, tensors)


def _check_random_state(entry: Entry, tensors: Mapping[str, torch.Tensor]) -> None:
    """`plan_rng` on the saved random state, if there is one (its tensors in `tensors`)."""
    manifest = entry.manifest
    assert manifest is not None
    if RNG_ENTRY in manifest.tree:
        random_state = unflatten_state({RNG_ENTRY: manifest.tree[RNG_ENTRY]}, tensors)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _plan_rng(random_state[RNG_ENTRY], entry)


def check_structure(entry: Entry) -> None:
    """The part of `check_payloads` that reads no tensor: the structure of each optimizer
    state dict saved (`check_optimizer_state`), which `restore` checks before it reads.

    Raises:
        CorruptCheckpointError: naming the entry and what is wrong with it.
    """
    manifest = entry.manifest
    assert manifest is not None
    stateful = {
        name: node
        for name, node in manifest.tree.items()
        if name != RNG_ENTRY
        and isinstance(node, dict)
        and node.get("kind") == "stateful"
        and "container" not in node
    }  # modules have a container: their state dict is an OrderedDict
    dtypes = {key: torch_dtype(r.dtype) for key, r in manifest.tensors.items()}
    for name, value in check_tree(stateful, dtypes).items():  # tensors as placeholders
        if isinstance(value, Mapping) and "param_groups" in value:
            try:
                check_optimizer_state(value)
            except ValueError as exc:
                raise CorruptCheckpointError(
                    f"the optimizer state saved in step {entry.step} ({name}) is damaged: {exc}",
                    path=entry.dirname,
                ) from None


def payload_tensors(entry: Entry) -> set[str]:
    """The tensors `check_payloads` reads: those of the saved random state, once their size
    is known to be one a random state has (at most `RNG_MAX_BYTES`), so that reading them
    takes little memory.

    Raises:
        CorruptCheckpointError: the random state's tensors claim more.
    """
    manifest = entry.manifest
    assert manifest is not None
    keys = referenced_tensors(manifest.tree.get(RNG_ENTRY, {}))
    claimed = sum(manifest.tensors[k].nbytes for k in keys if k in manifest.tensors)
    if claimed > RNG_MAX_BYTES:
        raise CorruptCheckpointError(
            f"the random state saved in step {entry.step} ({RNG_ENTRY}) is damaged: its "
            f"tensors claim {claimed} bytes, where a random state takes a few KiB",
            path=entry.dirname,
        )
    return keys


def _plan_rng(random_state: Any, entry: Entry) -> Callable[[], None]:
    """Check the saved random state before anything is loaded; the result restores it."""
    try:
        return plan_rng(random_state)
    except (TypeError, ValueError) as exc:
        raise CorruptCheckpointError(
            f"the random state saved in step {entry.step} ({RNG_ENTRY}) is damaged: {exc}",
            path=entry.dirname,
        ) from None


def _warn_falling_back(damage: str, step: int) -> None:
    """Say what is damaged and which checkpoint is tried instead (from `restore`'s caller)."""
    warn_user(f"{damage}\nhaltpoint: falling back to the checkpoint of step {step}")


def _metric_names(entries: list[Entry]) -> str:
    """The metrics the checkpoints record, for a monitor none of them has (a typo, often).

    >>> _metric_names([])
    'they record no metrics'
    """
    names = sorted({name for e in entries if e.manifest for name in e.manifest.metrics})
    if not names:
        return "they record no metrics"
    shown = ", ".join(map(repr, names[:10])) + (", ..." if len(names) > 10 else "")
    return f"their metrics: {shown}"


def _steps(entries: list[Entry]) -> str:
    steps = [e.step for e in entries]
    if not steps:
        return "none"
    if len(steps) > 10:
        return ", ".join(map(str, steps[:5])) + ", ..., " + ", ".join(map(str, steps[-3:]))
    return ", ".join(map(str, steps))
