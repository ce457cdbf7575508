"""2-rank save time of haltpoint's `Checkpointer.save` of sharded state against DCP alone.

Both save the same FSDP2 (`fully_shard`) model, gloo on CPU, to fresh folders, alternating,
`--repeats` times each; rank 0 prints the medians and the ratio. `Checkpointer.save` adds:
finding the sharded entries (an all-gather), the step check and folder creation on rank 0 (a
broadcast), hashing every DCP file (xxh3-128, each rank its own) and an all-gather of the
records, then rank 0's commit of the manifest (with the RNG state), history and retention
(a broadcast).

    python -m torch.distributed.run --nproc_per_node=2 benchmarks/sharded_speed.py --mib 256
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.fsdp import fully_shard

from haltpoint import Checkpointer


def build(mib: int) -> torch.nn.Module:
    width = 1024
    layers = max(1, (mib << 20) // (width * width * 4))
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256, help="model size in MiB (float32)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = build(args.mib)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())  # global sizes
    root = [args.dir or tempfile.mkdtemp(prefix="sharded-bench-")] if rank == 0 else [None]
    dist.broadcast_object_list(root, src=0)
    base = str(root[0])
    plain_times: list[float] = []
    ours_times: list[float] = []
    with Checkpointer(os.path.join(base, "run"), keep_last=2) as ckpt:
        for i in range(args.repeats):
            folder = os.path.join(base, f"plain-{i}")
            dist.barrier()
            start = time.perf_counter()
            dcp.save(model.state_dict(), storage_writer=dcp.FileSystemWriter(folder))
            dist.barrier()
            plain_times.append(time.perf_counter() - start)
            if rank == 0:
                shutil.rmtree(folder)

            dist.barrier()
            start = time.perf_counter()
            ckpt.save(i, {"model": model, "step": i})
            dist.barrier()
            ours_times.append(time.perf_counter() - start)
    if rank == 0:
        plain, ours = statistics.median(plain_times), statistics.median(ours_times)
        print(f"model {nbytes / 2**20:.0f} MiB (float32), 2 ranks gloo CPU, {args.repeats} repeats")
        print(f"{'what':<40} {'median s':>9} {'GiB/s':>7} {'ratio':>6}")
        for name, t in (
            ("torch.distributed.checkpoint.save", plain),
            ("haltpoint Checkpointer.save", ours),
        ):
            print(f"{name:<40} {t:>9.3f} {nbytes / 2**30 / t:>7.2f} {t / plain:>6.2f}")
        if args.dir is None:
            shutil.rmtree(base)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
