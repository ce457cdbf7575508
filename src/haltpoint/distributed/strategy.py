"""How a `Checkpointer`'s ranks cooperate, chosen once when it is made.

`strategy_for(...)` gives `OneProcess` without an initialized process group (and for a
read-only instance): `save` goes straight to the manager's commit and `restore` reads, checks
and loads in this process, with no collective and no search for sharded state. Under a
process group it gives `Ranks`: rank 0 writes replicated state and every call ends with one
agreement (`collectives`), and entries holding `DTensor` shards are written by every rank
through `sharded_save`. The bytes are the store's either way (Lightning's split of `Strategy`
from `CheckpointIO`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from haltpoint.distributed import collectives
from haltpoint.distributed.ranks import Replicas, initialized, number_buffer
from haltpoint.distributed.sharded import write_shards
from haltpoint.distributed.sharded_save import ShardWriter, save_sharded, split_agreed
from haltpoint.store.info import CheckpointInfo, Found, Planned
from haltpoint.store.run_dir import Entry, RunDirectory, checkpoint_dirname, dcp_folder

__all__ = ["CheckPart", "Commit", "OneProcess", "Prepare", "Ranks", "Read", "strategy_for"]

T = TypeVar("T")

Commit = Callable[[Mapping[str, Any], Callable[[], Mapping[str, Any]] | None], CheckpointInfo]
"""`commit(state, extra)`: the manager writes `state` (and the manifest's `extra()`)."""

Read = Callable[[str | int, dict[int, str], bool], Found | None]
"""`read(which, skip, check_shards)`: the reader finds and verifies a checkpoint."""

Prepare = Callable[[Found], Planned]
"""`prepare(found)`: every check of loading `found` into the state; the plan's `load()`
loads (on every rank only once every rank's checks passed and the ranks load the sharded
entries alike: the load may be collective)."""

CheckPart = Callable[[Entry, int, int], str | None]
"""`check_part(entry, rank, world_size)`: the reader checks one rank's share of the DCP files,
returning what is wrong or None."""


class OneProcess:
    """No process group: every call is this process's own.

    `wait()` is the manager's wait for its own background writer.
    """

    group: Replicas | None = None

    def __init__(self, wait: Callable[[], None]) -> None:
        self._wait = wait

    def agree(self, fn: Callable[[], T], what: str) -> T:
        """Run `fn` where the writer is (here) and return its result."""
        return fn()

    def gather(self, fn: Callable[[], T], what: str) -> list[T]:
        """Every rank's `fn()`, by rank: here, this process's."""
        return [fn()]

    def largest(self, value: int, what: str) -> int:
        """The largest of every rank's `value`: here, this process's."""
        return value

    def save(self, step: int, state: Mapping[str, Any], commit: Commit) -> CheckpointInfo:
        """Save `state` as `step`: the manager's `commit`, straight."""
        return commit(state, None)

    def restore(self, which: str | int, read: Read, prepare: Prepare) -> CheckpointInfo | None:
        """Read `which` (checking every file), check the state against it (`prepare`), then
        load it; None when there is none."""
        found = read(which, {}, True)
        return None if found is None else prepare(found).load()

    def wait(self) -> None:
        """Wait for the save in flight; raise its error."""
        self._wait()

    def close(self) -> None:
        """Nothing to release."""


class Ranks:
    """An initialized process group: rank 0 writes replicated state, every rank its shards.

    `group` is None for a group of one rank (nothing to agree on, but DTensor state may still
    be sharded). A failure on any rank raises on every rank (see `collectives`).
    """

    def __init__(
        self, run: RunDirectory, check_part: CheckPart, async_save: bool, wait: Callable[[], None]
    ) -> None:
        self.group = Replicas.current()
        self._run = run
        self._check_part = check_part
        self._async_save = async_save
        self._wait = wait
        self._shard_writer: ShardWriter | None = None  # every rank's, at its first sharded save
        self._number: Any = None  # `largest`'s one-number tensor, made at its first call

    def agree(self, fn: Callable[[], T], what: str) -> T:
        """Run `fn` on rank 0; every rank returns its result or raises its error."""
        result: T = collectives.on_writer(self.group, fn, what)
        return result

    def gather(self, fn: Callable[[], T], what: str) -> list[T]:
        """Run `fn` on every rank; every rank gets every rank's (picklable) result, by rank,
        or the same error (`collectives.all_results`)."""
        return collectives.all_results(self.group, fn, what)

    def largest(self, value: int, what: str) -> int:
        """The largest of every rank's `value` (one all-reduce of one number)."""
        if self.group is None:
            return value
        if self._number is None:
            self._number = number_buffer(self.group.process_group)
        return collectives.largest(self.group, what, value, self._number)

    def save(self, step: int, state: Mapping[str, Any], commit: Commit) -> CheckpointInfo:
        """Save `state` as `step`: sharded entries by every rank, the rest by rank 0."""
        shards, rest = split_agreed(step, state)
        if not shards:  # rank 0 saves; one broadcast shares its info or error
            return self.agree(lambda: commit(state, None), f"save({step})")
        # every rank writes its shards; rank 0 commits (see sharded_save)
        folder, storage = dcp_folder(checkpoint_dirname(step)), self._run.storage
        self.wait()
        if self._async_save and self._shard_writer is None:
            self._shard_writer = ShardWriter()  # on every rank, here: it makes a group
        write = lambda part, rank, group: write_shards(storage, folder, part, rank, group)  # noqa: E731
        finish = lambda extra: commit(rest, extra)  # noqa: E731
        return save_sharded(self._run, step, shards, write, finish, self._shard_writer)

    def restore(self, which: str | int, read: Read, prepare: Prepare) -> CheckpointInfo | None:
        """Rank 0 chooses, every rank reads that step, the ranks check the DCP files together
        (each its share), every rank checks its state against it, then every rank loads it."""
        if self.group is None:
            return OneProcess(self._wait).restore(which, read, prepare)
        check = self._check_part
        return collectives.restore_agreed(
            self.group,
            lambda which, skip: read(which, skip, False),
            lambda found, rank, world_size: check(found.entry, rank, world_size),
            prepare,
            which,
        )

    def wait(self) -> None:
        """Every rank returns once rank 0 has committed the save in flight (or raises its error)."""
        if self._shard_writer is not None:
            self._shard_writer.settle()  # its error, if any, comes from rank 0's commit
        self.agree(self._wait, "wait()")

    def close(self) -> None:
        """Stop the shards' background writer, if one was started."""
        if self._shard_writer is not None:
            self._shard_writer.close()


def strategy_for(
    run: RunDirectory,
    check_part: CheckPart,
    wait: Callable[[], None],
    *,
    read_only: bool,
    async_save: bool,
) -> OneProcess | Ranks:
    """`Ranks` under an initialized process group (unless `read_only`), else `OneProcess`.

    `wait()` waits for the manager's own background writer; `check_part` is the reader's
    `check_shard_part`.
    """
    if read_only or initialized() is None:
        return OneProcess(wait)
    return Ranks(run, check_part, async_save, wait)
