"""FSDP2 runs on CPU (gloo) for tests/test_sharded.py: saved on 2 ranks, restored on 1, 2 or 4.

`--mode train` (torchrun, 2 ranks): trains a `fully_shard`ed model with AdamW for 4 steps and
saves `{"train": ShardedState(model, optimizer), "stopper": ..., "epoch": ...}` after each
(keep_last=2, the first pinned); writes the full weights and optimizer state of the last
step (gathered) to `<out>/full.safetensors`; restores into a fresh FSDP2 model and optimizer
(2 -> 2); then a rank failing while taking its state dict, and one failing after writing its
shards (nothing may be committed, nobody may hang), and a reopen that removes the leftover.
`--mode restore` (torchrun, any world size): restores the latest checkpoint into a fresh
FSDP2 model and optimizer and compares with the full state. `--mode unsharded` (plain
python, no process group): the same into an unsharded model. Each writes JSON to `<out>`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
from rank_exit import end_rank
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.fsdp import fully_shard

import haltpoint.distributed.strategy
import haltpoint.reader
from haltpoint import (
    Checkpointer,
    CheckpointError,
    CorruptCheckpointError,
    EarlyStopping,
    ShardedState,
)


def build(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def shard(model: torch.nn.Module) -> torch.nn.Module:
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every weight and optimizer value, whole (a collective under a process group)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
    weights, optim = get_state_dict(model, optimizer, options=options)
    out = {f"model.{k}": v for k, v in weights.items()}
    for name, values in optim.get("state", {}).items():
        for key, value in values.items():
            out[f"optim.{name}.{key}"] = torch.as_tensor(value)
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def equal_to_saved(state: dict[str, torch.Tensor], out: str) -> bool:
    full = load_file(f"{out}/full.safetensors")
    return state.keys() == full.keys() and all(torch.equal(state[k], full[k]) for k in full)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> float:
    torch.manual_seed(100 + step)  # the same batch on every rank
    loss = model(torch.randn(16, 8)).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.detach())


class FailsOnRank1:
    def state_dict(self) -> dict[str, Any]:
        if dist.get_rank() == 1:
            raise RuntimeError("rank 1 broke while taking its state dict")
        return {"x": torch.zeros(2)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def fresh(sharded: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    model = build(1)  # other weights than the saved ones until restored
    if sharded:
        shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    state = {
        "train": ShardedState(model, optimizer),
        "stopper": EarlyStopping(mode="min", patience=9),
        "epoch": None,
    }
    return model, optimizer, state


def restore(args: argparse.Namespace, sharded: bool, name: str) -> None:
    model, optimizer, state = fresh(sharded)
    with Checkpointer(args.run_dir, read_only=True) as reader:
        info = reader.restore(state)
    result: dict[str, Any] = {
        "restored_step": None if info is None else info.step,
        "epoch": state["epoch"],
        "stopper_best": state["stopper"].best,
    }
    full = full_state(model, optimizer)  # whole on rank 0 only, under a process group
    if not dist.is_initialized() or dist.get_rank() == 0:
        result["equal"] = equal_to_saved(full, args.out)
    with open(f"{args.out}/{name}.json", "w") as f:
        json.dump(result, f)


def train(args: argparse.Namespace) -> None:
    rank = dist.get_rank()
    model = shard(build(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    stopper = EarlyStopping(mode="min", patience=9)
    result: dict[str, Any] = {
        "state_types": sorted({type(v).__name__ for v in model.state_dict().values()})
    }
    real = haltpoint.distributed.strategy.write_shards

    def slow(*a: Any) -> Any:  # the background write starts after training changed its tensors
        time.sleep(0.5)
        return real(*a)

    groups = len(dist.distributed_c10d._world.pg_map)  # an async sharded writer adds one
    with Checkpointer(args.run_dir, monitor="loss", keep_last=2) as ckpt:
        for step in range(4):
            loss = train_step(model, optimizer, step)
            stopper.step(loss)
            state = {"train": ShardedState(model, optimizer), "stopper": stopper, "epoch": step}
            haltpoint.distributed.strategy.write_shards = slow if step == 3 else real  # type: ignore
            ckpt.save(step, state, {"loss": loss}, pin=step == 0)  # pinned: kept with its shards
            haltpoint.distributed.strategy.write_shards = real
        manifest = os.path.join(args.run_dir, "step-000000003", "manifest.json")
        result["committed_when_save_returned"] = os.path.exists(manifest)  # the write sleeps
        full = full_state(model, optimizer)  # as saved: the save copied it
        if rank == 0:
            save_file(full, f"{args.out}/full.safetensors")
        train_step(model, optimizer, 4)  # while step 3 is written in the background
        result["listed"] = [info.step for info in ckpt.list()]
        result["best"] = stopper.best

        other, other_optimizer, state = fresh(sharded=True)
        info = ckpt.restore(state)
        result["restored_step"] = None if info is None else info.step
        result["restored_epoch"] = state["epoch"]
        result["restored_stopper_best"] = state["stopper"].best
        restored = full_state(other, other_optimizer)  # a collective: every rank
        result["restored_equal"] = equal_to_saved(restored, args.out) if rank == 0 else None

        try:
            ckpt.save(10, {"train": ShardedState(model, optimizer), "boom": FailsOnRank1()})
            result["split_error"] = None
        except CheckpointError as exc:
            result["split_error"] = str(exc)

        try:
            ckpt.save(12, {"model": model, "optim": optimizer})
            result["optimizer_error"] = None
        except TypeError as exc:
            result["optimizer_error"] = str(exc)

        def fails_after_writing(*a: Any) -> Any:
            records = real(*a)
            if rank == 1:
                raise OSError("disk gone on rank 1 after writing")
            return records

        haltpoint.distributed.strategy.write_shards = fails_after_writing  # type: ignore[assignment]
        try:
            ckpt.save(11, {"train": ShardedState(model, optimizer)})
            ckpt.wait()  # the shards are written in the background: the error comes here
            result["write_error"] = None
        except CheckpointError as exc:
            result["write_error"] = str(exc)
        finally:
            haltpoint.distributed.strategy.write_shards = real
        damaged_restore(args, ckpt, result)
        leftover = os.path.join(args.run_dir, "step-000000011")
        result["leftover"] = sorted(os.listdir(leftover)) if os.path.isdir(leftover) else None
        result["listed_after_crash"] = [info.step for info in ckpt.list()]
    dist.barrier()
    with Checkpointer(args.run_dir, monitor="loss", keep_last=2) as ckpt:  # removes leftovers
        result["listed_after_reopen"] = [info.step for info in ckpt.list()]
    result["groups_left"] = len(dist.distributed_c10d._world.pg_map) - groups  # after close
    # a synchronous sharded save: DCP on the default group, done before save returns
    with Checkpointer(f"{args.run_dir}-sync", async_save=False) as ckpt:
        info = ckpt.save(20, {"train": ShardedState(model, optimizer), "epoch": 20})
        result["sync_listed"] = [info.step for info in ckpt.list()]
        result["sync_files"] = sorted(os.listdir(f"{args.run_dir}-sync/step-000000020/dcp"))
    with open(f"{args.out}/rank{rank}.json", "w") as f:
        json.dump(result, f)


def damaged_restore(args: argparse.Namespace, ckpt: Checkpointer, result: dict[str, Any]) -> None:
    """Flip a byte of step 3's `__0_0.distcp`, which rank 1 alone checks (the ranks share the
    check of the DCP files), restore (rank 0 quarantines step 3: moved back here), restore
    step 3 by number, then put the byte back."""
    path = os.path.join(args.run_dir, "step-000000003", "dcp", "__0_0.distcp")

    def flip() -> None:
        if dist.get_rank() == 0:
            with open(path, "r+b") as f:
                f.seek(os.path.getsize(path) // 2)
                byte = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte[0] ^ 0xFF]))
        dist.barrier()

    real = haltpoint.reader.verify_shards
    checked: list[str] = []

    def recording(storage: Any, folder: str, files: Any, hashed: Any = None) -> None:
        checked.extend(f"{os.path.dirname(folder)}/{n}" for n in sorted(files))
        real(storage, folder, files, hashed)

    haltpoint.reader.verify_shards = recording  # type: ignore[assignment]
    flip()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, _, state = fresh(sharded=True)
            info = ckpt.restore(state)
        result["fallback_step"] = None if info is None else info.step
        result["fallback_epoch"] = state["epoch"]
        result["fallback_warnings"] = [str(w.message) for w in caught]
        dist.barrier()  # rank 0, the writer, has set step 3 aside: a rename, undone here
        quarantine = os.path.join(args.run_dir, "quarantine")
        result["quarantined"] = sorted(os.listdir(quarantine))
        dist.barrier()
        if dist.get_rank() == 0:
            manifest = os.path.join(os.path.dirname(os.path.dirname(path)), "manifest.json")
            os.rename(os.path.join(quarantine, "step-000000003-1.json"), manifest)
            os.rmdir(quarantine)
        dist.barrier()
        try:
            ckpt.restore(fresh(sharded=True)[2], 3)
            result["step_error"] = None
        except CorruptCheckpointError as exc:
            result["step_error"] = str(exc)
    finally:
        flip()
        haltpoint.reader.verify_shards = real
    result["checked"] = checked


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("train", "restore", "unsharded"), required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.mode == "unsharded":  # one process, no process group
        restore(args, sharded=False, name="unsharded")
        return
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    if args.mode == "train":
        train(args)
    else:
        restore(args, sharded=True, name=f"restore{dist.get_world_size()}-rank{dist.get_rank()}")
    dist.barrier()
    end_rank()


if __name__ == "__main__":
    main()
