"""Sharded state across nodes for tests/test_multinode.py: FSDP2 on CPU (gloo), launched by
`torchrun --nnodes=2 --nproc_per_node=2` as two node processes on this machine.

`--mode train` (4 ranks on 2 nodes): trains a `fully_shard`ed model with AdamW and saves steps
0 and 1 to every run directory given (a local one and an `s3://` one on moto's loopback
server, reached through the `FSSPEC_S3_*` variables); rank 0 writes the full weights and
optimizer state of step 1 to `<out>/full.safetensors`. Then step 2 is saved to the last run
directory; node 1's ranks, once inside the write of their shards, write their pid to
`<out>/dying-<rank>.pid` and wait there, and the test kills every process of node 1 with
SIGKILL (its torchrun agent included), as a node that dies would be: the surviving ranks
record what their save raised and how long it took to fail.
`--mode restore` (any number of ranks and nodes): restores the latest checkpoint of every run
directory into a fresh FSDP2 model and optimizer; rank 0 compares with the full state.
Each rank writes JSON to `<out>`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from typing import Any

import torch
import torch.distributed as dist
from fsdp_worker import build, equal_to_saved, full_state, shard, train_step
from rank_exit import end_rank
from safetensors.torch import save_file

import haltpoint.distributed.strategy
from haltpoint import Checkpointer, CheckpointError, ShardedState


def node_rank() -> int:
    return int(os.environ["GROUP_RANK"])  # torchrun's name for the node's rank


def train(args: argparse.Namespace) -> dict[str, Any]:
    model = shard(build(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    result: dict[str, Any] = {"world_size": dist.get_world_size(), "node": node_rank()}
    for step in range(2):
        loss = train_step(model, optimizer, step)
        for run_dir in args.run_dir:
            with Checkpointer(run_dir, monitor="loss", keep_last=2) as ckpt:
                state = {"train": ShardedState(model, optimizer), "epoch": step}
                ckpt.save(step, state, {"loss": loss})
    full = full_state(model, optimizer)  # a collective: every rank takes part
    if dist.get_rank() == 0:
        save_file(full, f"{args.out}/full.safetensors")
    train_step(model, optimizer, 2)
    real = haltpoint.distributed.strategy.write_shards

    def node_1_dies(*a: Any) -> Any:
        if node_rank() == 1:
            with open(os.path.join(args.out, f"dying-{dist.get_rank()}.pid"), "w") as f:
                f.write(str(os.getpid()))
            time.sleep(300)  # killed here by the test
        return real(*a)

    haltpoint.distributed.strategy.write_shards = node_1_dies  # type: ignore[assignment]
    try:
        with Checkpointer(args.run_dir[-1], monitor="loss", keep_last=2) as ckpt:
            ckpt.save(2, {"train": ShardedState(model, optimizer), "epoch": 2})
            ckpt.wait()
        result["kill_error"] = None
    except CheckpointError as exc:
        result["kill_error"] = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # anything else is a finding: the test says which
        result["kill_error"] = f"not a CheckpointError: {type(exc).__name__}: {exc}"
    result["failed_at"] = time.time()  # the test compares with when it killed node 1
    return result


def restore(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"world_size": dist.get_world_size()}
    for i, run_dir in enumerate(args.run_dir):
        torch.manual_seed(1)
        model = shard(build(1))  # other weights than the saved ones until restored
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
        state: dict[str, Any] = {"train": ShardedState(model, optimizer), "epoch": None}
        with Checkpointer(run_dir, read_only=True) as reader:
            info = reader.restore(state)
        full = full_state(model, optimizer)  # whole on rank 0 only
        result[f"dir{i}"] = {
            "step": None if info is None else info.step,
            "epoch": state["epoch"],
            "equal": equal_to_saved(full, args.out) if dist.get_rank() == 0 else None,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("train", "restore"), required=True)
    parser.add_argument("--run-dir", action="append", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    result = train(args) if args.mode == "train" else restore(args)
    name = f"{args.mode}{dist.get_world_size()}-rank{dist.get_rank()}.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(result, f)
    if args.mode == "train":
        os._exit(0)  # the survivors' group is broken since the kill: no tear-down
    dist.barrier()
    end_rank()


if __name__ == "__main__":
    main()
