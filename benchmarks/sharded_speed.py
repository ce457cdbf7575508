"""2-rank save time of haltpoint's `Checkpointer.save` of sharded state against DCP alone.

All save the same FSDP2 (`fully_shard`) model, gloo on CPU, to fresh folders, in turn,
`--repeats` times each; rank 0 prints the medians of two times per save: "blocked", until the
call returns and training may go on, and "total", until the files are durable (`wait()` or the
future's result). The four ways:

- `dcp.save`: DCP alone, synchronous.
- `dcp.async_save`: DCP alone, asynchronous, on a gloo group of its own, with DCP's stager
  configured for CPU (no pinned or shared memory), as haltpoint's `ShardWriter` uses it.
- `Checkpointer(async_save=False).save`: adds finding the sharded entries (an all-gather), the
  step check and folder creation on rank 0 (a broadcast), hashing every DCP file (xxh3-128,
  each rank its own) and an all-gather of the records, then rank 0's commit of the manifest
  (with the RNG state), history and retention (a broadcast).
- `Checkpointer().save` (async, the default): the same, with the shards copied and written in
  the background, and the commit in rank 0's background writer once they are durable.

    python -m torch.distributed.run --nproc_per_node=2 benchmarks/sharded_speed.py --mib 256

`--store s3` writes the same four ways to S3 instead of a local folder: moto's server on
127.0.0.1 in a child process started by rank 0 (tests/s3_server.py), DCP through its own
fsspec writer and reader (`FsspecWriter`, `FsspecReader`), haltpoint through an `s3://` run
directory with `storage_options`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.fsdp import fully_shard

from haltpoint import Checkpointer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from s3_server import moto_s3


def build(mib: int) -> torch.nn.Module:
    width = 1024
    layers = max(1, (mib << 20) // (width * width * 4))
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    return model


class Target:
    """Where the saves go: a local folder, or an S3 prefix (with its storage options)."""

    def __init__(self, base: str, options: dict[str, Any] | None) -> None:
        self.base, self.options = base, options
        if options is not None:
            import fsspec

            self.fs = fsspec.filesystem("s3", **options)

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def remove(self, name: str) -> None:
        if self.options is None:
            shutil.rmtree(self.url(name), ignore_errors=True)
        elif self.fs.exists(self.url(name)):
            self.fs.rm(self.url(name), recursive=True)

    def writer(self, name: str) -> Any:
        if self.options is None:
            return dcp.FileSystemWriter(self.url(name))
        return FsspecWriter(self.url(name), sync_files=True, **self.options)

    def reader(self, name: str) -> Any:
        if self.options is None:
            return dcp.FileSystemReader(self.url(name))
        return FsspecReader(self.url(name), **self.options)


def timed(save: Callable[[int], Any], finish: Callable[[Any], None], i: int) -> tuple[float, float]:
    """(blocked, total) seconds of one save on every rank, between barriers."""
    dist.barrier()
    start = time.perf_counter()
    handle = save(i)
    blocked = time.perf_counter() - start
    finish(handle)
    dist.barrier()
    return blocked, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256, help="model size in MiB (float32)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--store", choices=("local", "s3"), default="local")
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank = dist.get_rank()
    with contextlib.ExitStack() as stack:
        where: list[Any] = [None]
        if rank == 0 and args.store == "s3":
            endpoint = stack.enter_context(moto_s3(process=True))
            where = [(endpoint.url("bench"), endpoint.storage_options)]
        elif rank == 0:
            where = [(args.dir or tempfile.mkdtemp(prefix="sharded-bench-"), None)]
        dist.broadcast_object_list(where, src=0)
        target = Target(*where[0])
        run(args, target)
        if rank == 0 and args.dir is None and target.options is None:
            shutil.rmtree(target.base)
        dist.barrier()
    dist.destroy_process_group()


def run(args: argparse.Namespace, target: Target) -> None:
    """Time the four ways of saving and the three of restoring; rank 0 prints the table."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = build(args.mib)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())  # global sizes
    group = dist.new_group(backend="gloo")
    stager = DefaultStager(StagingOptions(False, False, False, False))

    def folder(name: str, i: int) -> str:
        if rank == 0:
            target.remove(f"{name}-{i - 2}")  # keep two, as the runs do
        return f"{name}-{i}"

    def dcp_sync(i: int) -> None:
        dcp.save(model.state_dict(), storage_writer=target.writer(folder("sync", i)))

    def dcp_async(i: int) -> Any:
        writer = target.writer(folder("async", i))
        return dcp.async_save(
            model.state_dict(), storage_writer=writer, process_group=group, async_stager=stager
        )

    times: dict[str, list[tuple[float, float]]] = {}
    options = target.options
    with (
        Checkpointer(
            target.url("run-sync"), keep_last=2, async_save=False, storage_options=options
        ) as sync,
        Checkpointer(target.url("run-async"), keep_last=2, storage_options=options) as ours,
    ):
        ways: list[tuple[str, Callable[[int], Any], Callable[[Any], None]]] = [
            ("dcp.save", dcp_sync, lambda _: None),
            ("dcp.async_save", dcp_async, lambda future: future.result()),
            (
                "Checkpointer(async_save=False).save",
                lambda i: sync.save(i, {"model": model, "step": i}),
                lambda _: None,
            ),
            (
                "Checkpointer().save (async)",
                lambda i: ours.save(i, {"model": model, "step": i}),
                lambda _: ours.wait(),
            ),
        ]
        for i in range(args.repeats):
            for name, save, finish in ways:
                times.setdefault(name, []).append(timed(save, finish, i))
        last = args.repeats - 1
        restores: list[tuple[str, Callable[[int], Any]]] = [
            (
                "dcp.load (no check)",
                lambda _: dcp.load(
                    model.state_dict(), storage_reader=target.reader(f"async-{last}")
                ),
            ),
            ("Checkpointer().restore (ranks share the check)", lambda _: ours.restore(state)),
            ("read-only restore (each rank checks all)", lambda _: reader.restore(state)),
        ]
        state = {"model": model, "step": 0}
        with Checkpointer(
            target.url("run-async"), read_only=True, storage_options=options
        ) as reader:
            for i in range(args.repeats):
                for name, restore in restores:
                    times.setdefault(name, []).append(timed(restore, lambda _: None, i))
    stager.close()
    if rank == 0:
        medians = {
            name: (statistics.median(b for b, _ in t), statistics.median(w for _, w in t))
            for name, t in times.items()
        }
        restored = {name: medians.pop(name)[1] for name, _ in restores}
        base_blocked, base_total = medians["dcp.save"]
        print(
            f"model {nbytes / 2**20:.0f} MiB (float32), {dist.get_world_size()} ranks gloo CPU, "
            f"{args.store}, {args.repeats} repeats"
        )
        print(
            f"{'what':<38} {'blocked s':>9} {'x dcp.save':>10} {'total s':>8} {'GiB/s':>6} "
            f"{'x dcp.save':>10}"
        )
        for name, (blocked, total) in medians.items():
            print(
                f"{name:<38} {blocked:>9.3f} {blocked / base_blocked:>10.2f} {total:>8.3f} "
                f"{nbytes / 2**30 / total:>6.2f} {total / base_total:>10.2f}"
            )
        print(f"\n{'restore of the last save':<48} {'s':>6} {'x dcp.load':>10}")
        for name, seconds in restored.items():
            ratio = seconds / restored["dcp.load (no check)"]
            print(f"{name:<48} {seconds:>6.3f} {ratio:>10.2f}")


if __name__ == "__main__":
    main()
