"""Saving sharded state across ranks: agree on the split, write every rank's shards, commit once.

`Checkpointer.save` calls `split_agreed` on every rank. When entries of the state hold
`DTensor` shards it hands them to `save_sharded`, which runs the save as a protocol of
collectives: rank 0 prepares the checkpoint's `dcp/` folder, every rank writes and hashes its
shards (`sharded.write_shards`; DCP is synchronous), and once every rank's files are durable
rank 0 commits the rest of the state with the manifest's sharded record
(`store.run_dir.ShardedRecord` reads it back). A failure on any rank raises on every rank and
commits nothing; its leftover folder is removed by the next writer to open the run. See
docs/distributed.md, "Sharded state".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from haltpoint import distributed as _dist
from haltpoint.errors import CheckpointError
from haltpoint.reader import CheckpointInfo
from haltpoint.sharded import split_sharded
from haltpoint.store.run_dir import SHARDED_KEY, RunDirectory, checkpoint_dirname, dcp_folder

__all__ = ["save_sharded", "split_agreed"]


def split_agreed(step: int, state: Mapping[str, Any]) -> tuple[dict[str, Any], Mapping[str, Any]]:
    """`split_sharded` on every rank, agreed: one rank's failure raises on all.

    Raises:
        CheckpointError: some ranks hold DTensor shards and others do not, or a rank failed.
    """
    group = _dist.Replicas.current()
    if group is None:
        return split_sharded(state)
    mine: list[tuple[dict[str, Any], Mapping[str, Any]]] = []

    def split() -> bool:
        mine.append(split_sharded(state))
        return bool(mine[0][0])

    if len(set(_dist.all_results(group, split, f"save({step})"))) > 1:
        raise CheckpointError(
            f"save({step}): some ranks hold DTensor shards and others do not; every rank "
            "must pass the same kind of state"
        )
    return mine[0]


def save_sharded(
    run: RunDirectory,
    step: int,
    entries: Iterable[str],
    write: Callable[[int], Mapping[str, Mapping[str, Any]]],
    commit: Callable[[dict[str, Any]], CheckpointInfo],
) -> CheckpointInfo:
    """Save the sharded `entries` of `step`: every rank writes its shards, rank 0 commits.

    Args:
        run: the run directory (rank 0 checks that `step` is new and empties its `dcp/`).
        step: the checkpoint's step.
        entries: the names of the state's sharded entries.
        write: this rank's part, given its rank: write its shards into the checkpoint's
            `dcp/` folder, fsync'ed, and return `{file name: {"size", "xxh3_128"}}`.
        commit: run on rank 0 once every rank's files are durable: commit the rest of the
            state with the manifest's `extra` it is given.

    Returns:
        The committed checkpoint's info, its size counting the DCP files. The shards are
        written and hashed before this returns; with `async_save`, rank 0 then commits the
        manifest, history and retention in the background, as for any save.
    """
    group = _dist.Replicas.current()  # None for one process (world size 1)
    rank = 0 if group is None else group.rank
    folder = dcp_folder(checkpoint_dirname(step))

    def prepare() -> None:
        run.new_dirname(step)
        run.storage.rmtree(folder)  # an interrupted save of this step
        run.storage.makedirs(folder)

    _dist.on_writer(group, prepare, f"save({step})")
    parts = _dist.all_results(group, lambda: write(rank), f"save({step}): writing shards")
    files = {name: record for part in parts for name, record in part.items()}
    extra = {
        SHARDED_KEY: {
            "format": "torch.distributed.checkpoint",
            "world_size": 1 if group is None else group.world_size,
            "entries": sorted(entries),
            "files": files,
        }
    }
    info = _dist.on_writer(group, lambda: commit(extra), f"save({step}): commit")
    return replace(info, size=info.size + sum(int(r["size"]) for r in files.values()))
