"""Saving sharded state across ranks: agree on the split, write every rank's shards, commit once.

`Checkpointer.save` calls `split_agreed` on every rank. When entries of the state hold
`DTensor` shards it hands them to `save_sharded`, which runs the save as a protocol of
collectives: rank 0 prepares the checkpoint's `dcp/` folder, every rank writes and hashes its
shards (`sharded.write_shards`), and once every rank's files are durable rank 0 commits the
rest of the state with the manifest's sharded record (`store.run_dir.ShardedRecord` reads it
back). With `async_save`, a `ShardWriter` on every rank copies the shards and writes them in
the background on a gloo process group of its own, and rank 0's background commit waits for
them. A failure on any rank raises on every rank and commits nothing; its leftover folder is
removed by the next writer to open the run. See docs/distributed.md, "Sharded state".
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import torch

from haltpoint.distributed import collectives
from haltpoint.distributed.ranks import Replicas
from haltpoint.distributed.sharded import split_sharded
from haltpoint.errors import CheckpointError
from haltpoint.store.info import CheckpointInfo
from haltpoint.store.run_dir import SHARDED_KEY, RunDirectory, checkpoint_dirname, dcp_folder

__all__ = ["ShardWriter", "save_sharded", "split_agreed"]


def split_agreed(step: int, state: Mapping[str, Any]) -> tuple[dict[str, Any], Mapping[str, Any]]:
    """`split_sharded` on every rank, agreed: one rank's failure raises on all.

    Raises:
        CheckpointError: some ranks hold DTensor shards and others do not, or a rank failed.
    """
    group = Replicas.current()
    if group is None:
        return split_sharded(state)
    mine: list[tuple[dict[str, Any], Mapping[str, Any]]] = []

    def split() -> bool:
        mine.append(split_sharded(state))
        return bool(mine[0][0])

    if len(set(collectives.all_results(group, split, f"save({step})"))) > 1:
        raise CheckpointError(
            f"save({step}): some ranks hold DTensor shards and others do not; every rank "
            "must pass the same kind of state"
        )
    return mine[0]


Write = Callable[[dict[str, Any], int, Any], Mapping[str, Mapping[str, Any]]]


class ShardWriter:
    """Every rank's background writer of its shards, for `async_save`.

    `stage` copies the shards (DCP's own stager: host memory, pinned when CUDA is there), so
    training may change its tensors as soon as `save` returns. `submit` hands the write to a
    thread that runs DCP on a gloo process group of its own, so the write's collectives never
    meet training's; the thread ends with an all-gather of every rank's outcome, so every rank
    sees the same result: every rank's file records, or the same error. Create it on every
    rank at the same point (it creates a process group); at most one write is in flight.
    """

    def __init__(self) -> None:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        dist = torch.distributed
        group = dist.new_group(backend="gloo", timeout=_job_timeout())
        self._group = Replicas(dist.get_rank(), dist.get_world_size(), group)
        self._stager = DefaultStager(
            StagingOptions(
                use_pinned_memory=torch.cuda.is_available(),
                use_shared_memory=False,
                use_async_staging=False,
                use_non_blocking_copy=False,
            )
        )
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="haltpoint-shards")
        self._pending: Future[list[Mapping[str, Any]]] | None = None

    def stage(self, shards: dict[str, Any]) -> dict[str, Any]:
        """A private copy of `shards`, after the write in flight (whose buffers it may reuse)."""
        self.settle()
        staged: dict[str, Any] = self._stager.stage(shards)  # type: ignore[assignment]
        return staged

    def submit(self, write: Write, staged: dict[str, Any], what: str) -> None:
        """Write `staged` in the background: `write(staged, rank, process_group)` on every rank."""
        group = self._group
        self._pending = self._thread.submit(
            collectives.all_results,
            group,
            lambda: write(staged, group.rank, group.process_group),
            what,
        )

    def result(self) -> list[Mapping[str, Any]]:
        """Every rank's file records of the write in flight, by rank; its agreed error if it
        failed on any rank."""
        assert self._pending is not None
        return self._pending.result()

    def settle(self) -> None:
        """Wait for the write in flight, if any, leaving its error to rank 0's commit (which
        raises the same error on every rank)."""
        if self._pending is not None:
            self._pending.exception()  # waits; rank 0's commit still reads the result

    def close(self) -> None:
        """Wait for the write in flight, stop the thread and destroy the group (its threads
        and sockets: a process that opens many writers would leak one group each)."""
        self.settle()
        self._thread.shutdown()
        self._stager.close()
        if torch.distributed.is_initialized():
            # ValueError: destroyed already, with the default group (destroy_process_group())
            with contextlib.suppress(ValueError):
                torch.distributed.destroy_process_group(self._group.process_group)


def _job_timeout() -> Any:
    """The default process group's timeout (`init_process_group(timeout=...)`), for the
    background writer's group: `new_group` would give it torch's default (30 minutes for
    gloo), so a rank gone silent in a background write would hold the others that long.
    None (torch's default) where torch does not tell."""
    group = torch.distributed.distributed_c10d._get_default_group()
    for device in ("cpu", "cuda"):
        try:
            return group._get_backend(torch.device(device)).options._timeout
        except (AttributeError, RuntimeError, ValueError):
            continue
    return None


def save_sharded(
    run: RunDirectory,
    step: int,
    shards: dict[str, Any],
    write: Write,
    commit: Callable[[Callable[[], dict[str, Any]]], CheckpointInfo],
    writer: ShardWriter | None = None,
) -> CheckpointInfo:
    """Save the sharded entries `shards` of `step`: every rank writes its shards, rank 0 commits.

    Args:
        run: the run directory (rank 0 checks that `step` is new and empties its `dcp/`).
        step: the checkpoint's step.
        shards: this rank's sharded entries (name -> state dict of DTensors).
        write: `write(shards, rank, process_group)` writes this rank's part into the
            checkpoint's `dcp/` folder, fsync'ed, and returns `{file name: {"size",
            "xxh3_128"}}`; every rank of `process_group` (None: the default group) calls it.
        commit: run on rank 0: commit the rest of the state; it calls the function it is
            given for the manifest's `extra` just before writing the manifest.
        writer: with `async_save`, every rank's `ShardWriter`: the shards are copied, and
            written in the background while rank 0's background commit waits for them.

    Returns:
        The checkpoint's info. Its size counts the DCP files or, for a write still in the
        background, the bytes of the shards copied.
    """
    group = Replicas.current()  # None for one process (world size 1)
    rank = 0 if group is None else group.rank
    what = f"save({step})"
    folder = dcp_folder(checkpoint_dirname(step))

    def prepare() -> None:
        run.new_dirname(step)
        run.clear_dcp_folder(step)  # an interrupted save of this step
        run.storage.makedirs(folder)

    collectives.on_writer(group, prepare, what)
    if writer is None:  # write now; the manifest follows once every rank's files are durable
        parts = collectives.all_results(
            group, lambda: write(shards, rank, None), f"{what}: writing shards"
        )
        info = collectives.on_writer(
            group,
            lambda: commit(lambda: _extra(shards, _seen(run, step, parts))),
            f"{what}: commit",
        )
        return replace(
            info, size=info.size + sum(int(r["size"]) for p in parts for r in p.values())
        )
    staged: list[dict[str, Any]] = []

    def stage() -> int:
        staged.append(writer.stage(shards))
        return _nbytes(staged[0])

    copied = collectives.all_results(group, stage, f"{what}: copying shards")
    writer.submit(write, staged[0], f"{what}: writing shards")
    info = collectives.on_writer(
        group,
        lambda: commit(lambda: _extra(shards, _seen(run, step, writer.result()))),
        f"{what}: commit",
    )
    return replace(info, size=info.size + sum(copied))


def _seen(run: RunDirectory, step: int, parts: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """`parts`, once rank 0 sees every other rank's files where they were written, of the size
    recorded: the manifest it commits must name only files a restore can read. A run
    directory the ranks do not share (memory://, a node's own disk) is refused here.

    Raises:
        CheckpointError: naming the first file rank 0 does not see, and the remedy.
        OSError: rank 0 cannot look the file up (no permission, an I/O error).
    """
    folder = dcp_folder(checkpoint_dirname(step))
    for rank, part in enumerate(parts):
        for name, record in sorted(part.items()) if rank else ():
            rel = f"{folder}/{name}"
            try:
                size: int | None = run.storage.size(rel)
            except FileNotFoundError:
                size = None
            if size != int(record["size"]):
                where = run.storage.local_path(rel) or f"{run.storage.url}/{rel}"
                seen = "does not exist" if size is None else f"has {size} bytes"
                raise CheckpointError(
                    f"{where}, written by rank {rank} ({record['size']} bytes), "
                    f"{seen} for rank 0: every rank must see the run directory (a shared "
                    "file system or an object store; memory:// and a node's own disk are "
                    "not shared); nothing was committed",
                    path=where,
                )
    return parts


def _extra(shards: Mapping[str, Any], parts: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The manifest's `extra` for sharded `shards` written as every rank's `parts`."""
    return {
        SHARDED_KEY: {
            "format": "torch.distributed.checkpoint",
            "world_size": len(parts),
            "entries": sorted(shards),
            "files": {name: record for part in parts for name, record in part.items()},
        }
    }


def _nbytes(value: Any) -> int:
    """Bytes of the tensors in a state dict (local shards of DTensors)."""
    if isinstance(value, torch.Tensor):
        local = value.to_local() if hasattr(value, "to_local") else value  # a DTensor's shard
        return int(local.numel() * local.element_size())
    if isinstance(value, Mapping):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0
