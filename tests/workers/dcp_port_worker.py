"""2-rank gloo cases for tests/test_peer_dcp.py: DCP's own test behaviours, and a fault
campaign, through haltpoint's sharded save and restore.

`--mode port` runs every case in one launch (each in a run directory of its own under
`--root`) and writes what each rank saw to `<out>/rank<N>.json`: values, or the error a
haltpoint call raised as `{"error": class, "message": ...}`. `--mode kill` saves step 0, then
rank 1 exits (os._exit) in the middle of DCP's write of step 1; rank 0 records what it got
and how long it took. `--mode restore1` restores a run saved by one rank onto these two.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import json
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from fsdp_worker import shard, train_step
from rank_exit import end_rank
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from haltpoint import Checkpointer, CheckpointError, EarlyStopping, ShardedState

TIMEOUT = datetime.timedelta(seconds=30)
TIMEOUT_HANG = datetime.timedelta(seconds=3)  # the process group's, for --case hang


def build(seed: int, hidden: int = 16, extra: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = [torch.nn.Linear(8, hidden), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(hidden, 4))
    if extra:
        layers.append(torch.nn.Linear(4, 4))
    return torch.nn.Sequential(*layers)


def trained(seed: int = 0, steps: int = 2) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = shard(build(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    for step in range(steps):
        train_step(model, optimizer, step)
    return model, optimizer


def full(value: Any) -> Any:
    """A state dict with every DTensor gathered whole (a collective), as plain data."""
    if isinstance(value, dict):
        return {k: full(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(full(v) for v in value)
    if isinstance(value, DTensor):
        return value.full_tensor().detach().clone()
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return value


def same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and a == b


def outcome(fn: Callable[[], Any]) -> Any:
    """`fn()`, or the error it raised: haltpoint's (a CheckpointError, or one of the argument
    errors), or anything else as `raw` (a bug: haltpoint let it through)."""
    try:
        return fn()
    except (CheckpointError, TypeError, ValueError) as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    except BaseException as exc:
        return {"error": type(exc).__name__, "message": str(exc), "raw": True}


def done(*calls: object) -> None:
    """The calls' results discarded: what `outcome` records for a call that went well."""
    return None


def steps(run_dir: str) -> list[int]:
    with Checkpointer(run_dir, read_only=True) as reader:
        return [info.step for info in reader.list()]


class Patch:
    """Replace `owner.name` with `new` on `ranks` only, for the `with` block."""

    def __init__(self, owner: Any, name: str, new: Any, ranks: tuple[int, ...]) -> None:
        self.owner, self.name, self.new, self.ranks = owner, name, new, ranks
        self.old = getattr(owner, name)

    def __enter__(self) -> None:
        if dist.get_rank() in self.ranks:
            setattr(self.owner, self.name, self.new)

    def __exit__(self, *exc: object) -> None:
        setattr(self.owner, self.name, self.old)


# -- the ports --------------------------------------------------------------------------------


def round_trip(root: str, out: str, r: dict[str, Any]) -> None:
    """A trained FSDP2 model and AdamW with replicated state beside it, saved and restored
    (synchronous and async), then one more training step on both gives the same loss."""
    run = f"{root}/round-trip"
    model, optimizer = trained()
    extras = {"name": "run", "ids": (1, 2), "none": None, "rate": 0.5, "big": 2**40}
    state = {
        "train": ShardedState(model, optimizer),
        "epoch": 2,
        "extras": extras,
        "replicated": torch.arange(6.0),
    }
    saved = full(state["train"].state_dict())
    if dist.get_rank() == 0:  # for the restores in one process (tensors only: weights_only)
        torch.save(saved, f"{out}/round-trip-full.pt")
    with Checkpointer(run, async_save=False) as ckpt:
        ckpt.save(0, state)
    fresh = shard(build(1))
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.5)
    target = {
        "train": ShardedState(fresh, fresh_optimizer),
        "epoch": None,
        "extras": None,
        "replicated": torch.zeros(6),
    }
    with Checkpointer(run, read_only=True) as reader:
        info = reader.restore(target)
    r["round_trip"] = {
        "step": info.step if info else None,
        "equal": same(saved, full(target["train"].state_dict())),
        "lr": fresh_optimizer.param_groups[0]["lr"],
        "epoch": target["epoch"],
        "extras": target["extras"] == extras and isinstance(target["extras"]["ids"], tuple),
        "replicated": target["replicated"].tolist(),
        "losses": [train_step(model, optimizer, 9), train_step(fresh, fresh_optimizer, 9)],
    }
    # async: the save returns before the write; training on does not change what is saved
    async_run = f"{root}/round-trip-async"
    with Checkpointer(async_run) as ckpt:
        snapshot = full(ShardedState(model, optimizer).state_dict())
        ckpt.save(1, {"train": ShardedState(model, optimizer)})
        train_step(model, optimizer, 10)
        ckpt.wait()
        fresh = shard(build(2))
        fresh_optimizer = torch.optim.AdamW(fresh.parameters())
        back = ShardedState(fresh, fresh_optimizer)
        ckpt.restore({"train": back})
    r["round_trip_async"] = same(snapshot, full(back.state_dict()))


def dtensors(fill: bool) -> dict[str, Any]:
    """DTensors of many dtypes and shapes sharded on dim 0 over the 2 ranks (uneven, one
    rank's shard empty, all empty), with non-tensor values beside them."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(5)
    shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
        "f16": (torch.float16, (5, 3)),
        "bf16": (torch.bfloat16, (4, 2)),
        "f64": (torch.float64, (3,)),
        "i64": (torch.int64, (7,)),
        "i8": (torch.int8, (2, 2)),
        "bool": (torch.bool, (5,)),
        "c64": (torch.complex64, (4,)),
        "one": (torch.float32, (1, 3)),  # rank 1's shard is empty
        "empty": (torch.float32, (0, 4)),  # every shard is empty
    }
    out: dict[str, Any] = {}
    for name, (dtype, shape) in shapes.items():
        if not fill:
            value = torch.zeros(shape, dtype=dtype)
        elif dtype == torch.bool:
            value = torch.rand(shape) > 0.5
        elif dtype.is_floating_point or dtype.is_complex:
            value = torch.randn(shape, dtype=dtype)
        else:
            value = torch.randint(-100, 100, shape, dtype=dtype)
        out[name] = distribute_tensor(value, mesh, [Shard(0)])
    # DCP loads the keys of the target: a restore's template names every value
    out["meta"] = (
        {"count": 7, "tag": "x", "pair": (1, 2.5)}
        if fill
        else {"count": 0, "tag": "", "pair": (0, 0.0)}
    )
    return out


def dtypes_and_empty(root: str, r: dict[str, Any]) -> None:
    run = f"{root}/dtypes"
    saved = dtensors(fill=True)
    local = {k: list(v.to_local().shape) for k, v in saved.items() if isinstance(v, DTensor)}
    with Checkpointer(run, async_save=False) as ckpt:
        ckpt.save(0, {"tensors": saved})
    target = dtensors(fill=False)
    with Checkpointer(run, read_only=True) as reader:
        reader.restore({"tensors": target})
    r["dtypes"] = {
        "local_shapes": local,
        "equal": {k: same(full(saved[k]), full(target[k])) for k in saved},
    }
    # a float32 template for a float16 checkpoint: a plain entry is refused (haltpoint
    # never converts dtypes); see what a sharded one does
    wider = dtensors(fill=False)
    wider["f16"] = distribute_tensor(torch.zeros(5, 3), wider["f16"].device_mesh, [Shard(0)])
    with Checkpointer(run, read_only=True) as reader:
        got = outcome(lambda: reader.restore({"tensors": wider}))
    r["dtype_mismatch"] = {
        "outcome": got if isinstance(got, dict) else "loaded",
        "dtype": str(wider["f16"].dtype),
        "changed": bool(wider["f16"].full_tensor().abs().sum() > 0),
    }


def placements(root: str, r: dict[str, Any]) -> None:
    """Saved row-wise (Shard(0)) and replicated (Replicate(): DCP writes it once), loaded
    column-wise (Shard(1)), replicated, and row-wise."""
    from torch.distributed.tensor import Replicate

    run = f"{root}/placements"
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(9)
    rows, same_everywhere = torch.randn(4, 6), torch.randn(3, 5)
    saved = {
        "rows": distribute_tensor(rows, mesh, [Shard(0)]),
        "replicated": distribute_tensor(same_everywhere, mesh, [Replicate()]),
    }
    with Checkpointer(run, async_save=False) as ckpt:
        ckpt.save(0, {"tensors": saved})
    result = {}
    for name, placement in (
        ("colwise", Shard(1)),
        ("replicate", Replicate()),
        ("rowwise", Shard(0)),
    ):
        target = {
            "rows": distribute_tensor(torch.zeros(4, 6), mesh, [placement]),
            "replicated": distribute_tensor(torch.zeros(3, 5), mesh, [placement]),
        }
        with Checkpointer(run, read_only=True) as reader:
            got = outcome(lambda t=target: reader.restore({"tensors": t}).step)
        result[name] = {
            "outcome": got,
            "rows": torch.equal(target["rows"].full_tensor(), rows),
            "replicated": torch.equal(target["replicated"].full_tensor(), same_everywhere),
        }
    r["placements"] = result

    from haltpoint.distributed.safe_metadata import check_metadata

    with open(f"{run}/step-000000000/dcp/.metadata", "rb") as f:
        metadata = check_metadata(f, "m")
    r["placements_chunks"] = {k: len(v.chunks) for k, v in metadata.state_dict_metadata.items()}


def overwrite(root: str, r: dict[str, Any]) -> None:
    """A committed step is never written again: the second save raises on every rank and
    the checkpoint keeps the first save's values."""
    run = f"{root}/overwrite"
    model, optimizer = trained(seed=0)
    first = full(ShardedState(model, optimizer).state_dict())
    with Checkpointer(run, async_save=False) as ckpt:
        ckpt.save(0, {"train": ShardedState(model, optimizer)})
        other, other_optimizer = trained(seed=3, steps=3)
        r["overwrite_error"] = outcome(
            lambda: ckpt.save(0, {"train": ShardedState(other, other_optimizer)})
        )
        fresh = shard(build(4))
        back = ShardedState(fresh, torch.optim.AdamW(fresh.parameters()))
        ckpt.restore({"train": back}, 0)
    r["overwrite_kept"] = same(first, full(back.state_dict()))
    r["overwrite_files"] = sorted(os.listdir(f"{run}/step-000000000/dcp"))


def mismatch(root: str, r: dict[str, Any]) -> None:
    """Loads into a model that does not fit the checkpoint, and partial loads."""
    run = f"{root}/mismatch"
    model, optimizer = trained()
    with Checkpointer(run, async_save=False) as ckpt:
        ckpt.save(0, {"train": ShardedState(model, optimizer), "epoch": 0})
    saved = full(ShardedState(model).state_dict())

    def into(fresh: torch.nn.Module, **kwargs: Any) -> Any:
        optimizer = torch.optim.AdamW(fresh.parameters())
        before = full(ShardedState(fresh).state_dict())
        with Checkpointer(run, read_only=True) as reader:
            got = outcome(
                lambda: reader.restore(
                    {"train": ShardedState(fresh, optimizer), "epoch": None}, **kwargs
                )
            )
        after = full(ShardedState(fresh).state_dict())
        return {
            "outcome": got if isinstance(got, dict) else "loaded",
            "unchanged": same(before, after),
            "missing": None if isinstance(got, dict) or got.report is None else got.report.missing,
            "loaded_saved": all(same(after["model"].get(k), v) for k, v in saved["model"].items()),
        }

    r["mismatch_shape"] = into(shard(build(1, hidden=32)))
    r["mismatch_extra_layer"] = into(shard(build(1, extra=True)))
    r["mismatch_extra_layer_lax"] = into(shard(build(1, extra=True)), strict=False)
    # only the model of a checkpoint of model and optimizer, and no epoch
    fresh = shard(build(1))
    with Checkpointer(run, read_only=True) as reader:
        got = outcome(lambda: reader.restore({"train": ShardedState(fresh)}))
    r["partial_model_only"] = {
        "outcome": got if isinstance(got, dict) else "loaded",
        "equal": same(saved, full(ShardedState(fresh).state_dict())),
    }
    # saved sharded, loaded on the same 2 ranks into plain (unsharded) models
    plain = build(1)
    plain_optimizer = torch.optim.AdamW(plain.parameters())
    with Checkpointer(run, read_only=True) as reader:
        got = outcome(
            lambda: reader.restore({"train": ShardedState(plain, plain_optimizer), "epoch": None})
        )
    r["sharded_into_plain"] = {
        "outcome": got if isinstance(got, dict) else "loaded",
        "equal": same(saved, full(ShardedState(plain).state_dict())),
    }
    # saved plain (replicated, rank 0 writes it), loaded into an FSDP2 model
    replicated = f"{root}/replicated"
    with Checkpointer(replicated, async_save=False) as ckpt:
        ckpt.save(0, {"model": build(0)})
    fresh = shard(build(1))
    with Checkpointer(replicated, read_only=True) as reader:
        got = outcome(lambda: reader.restore({"model": fresh}))
    r["plain_into_sharded"] = {
        "outcome": got if isinstance(got, dict) else "loaded",
        "equal": same(full(build(0).state_dict()), full(fresh.state_dict())),
    }


def memory_url(root: str, r: dict[str, Any]) -> None:
    """memory:// is each process's own: the ranks do not share it."""
    url = "memory://haltpoint-dcp-port/run"
    model, optimizer = trained()
    r["memory_save"] = outcome(
        lambda: _save_and_list(url, {"train": ShardedState(model, optimizer)})
    )
    fresh = shard(build(1))
    back = ShardedState(fresh, torch.optim.AdamW(fresh.parameters()))

    def restore() -> Any:
        with Checkpointer(url) as ckpt:
            info = ckpt.restore({"train": back})
            return None if info is None else info.step

    r["memory_restore"] = outcome(restore)
    r["memory_listed"] = outcome(lambda: steps(url))


def _save_and_list(url: str, state: dict[str, Any]) -> list[int]:
    with Checkpointer(url, async_save=False) as ckpt:
        ckpt.save(0, state)
        return [info.step for info in ckpt.list()]


# -- the fault campaign -----------------------------------------------------------------------


def _failing_write(message: str, code: int | None = None) -> Callable[..., Any]:
    def write_data(self: Any, plan: Any, planner: Any) -> Any:
        if code is not None:
            raise OSError(code, os.strerror(code))
        raise OSError(message)

    return write_data


def rank_raises_in_save(root: str, r: dict[str, Any], async_save: bool) -> None:
    """DCP's write raises on rank 1 only: every rank raises the same line, nothing is
    committed, step 0 still restores, and step 1 can be saved again."""
    key = "async" if async_save else "sync"
    run = f"{root}/raise-save-{key}"
    model, optimizer = trained()
    first = full(ShardedState(model, optimizer).state_dict())
    with Checkpointer(run, async_save=async_save) as ckpt:
        ckpt.save(0, {"train": ShardedState(model, optimizer)})
        ckpt.wait()
        train_step(model, optimizer, 5)
        start = time.monotonic()
        with Patch(FileSystemWriter, "write_data", _failing_write("rank 1's write broke"), (1,)):
            r[f"save_raise_{key}"] = outcome(
                lambda: done(ckpt.save(1, {"train": ShardedState(model, optimizer)}), ckpt.wait())
            )
        r[f"save_raise_{key}_seconds"] = time.monotonic() - start
        r[f"save_raise_{key}_listed"] = [i.step for i in ckpt.list()]
        fresh = shard(build(4))
        back = ShardedState(fresh, torch.optim.AdamW(fresh.parameters()))
        ckpt.restore({"train": back})
        r[f"save_raise_{key}_previous"] = same(first, full(back.state_dict()))
        r[f"save_raise_{key}_again"] = outcome(
            lambda: ckpt.save(1, {"train": ShardedState(model, optimizer)}).step
        )
        ckpt.wait()
        r[f"save_raise_{key}_listed_after"] = [i.step for i in ckpt.list()]


def rank0_disk_full(root: str, r: dict[str, Any]) -> None:
    run = f"{root}/disk-full"
    model, optimizer = trained()
    first = full(ShardedState(model, optimizer).state_dict())
    with Checkpointer(run, async_save=False) as ckpt:
        ckpt.save(0, {"train": ShardedState(model, optimizer)})
        train_step(model, optimizer, 5)
        with Patch(FileSystemWriter, "write_data", _failing_write("", errno.ENOSPC), (0,)):
            r["disk_full"] = outcome(
                lambda: done(ckpt.save(1, {"train": ShardedState(model, optimizer)}))
            )
        r["disk_full_listed"] = [i.step for i in ckpt.list()]
        fresh = shard(build(4))
        back = ShardedState(fresh, torch.optim.AdamW(fresh.parameters()))
        ckpt.restore({"train": back})
        r["disk_full_previous"] = same(first, full(back.state_dict()))


def rank_raises_in_restore(root: str, r: dict[str, Any]) -> None:
    """DCP's read raises on rank 1 only (an I/O error, not damage)."""
    run = f"{root}/raise-restore"
    model, optimizer = trained()
    with Checkpointer(run, async_save=False) as ckpt:
        ckpt.save(0, {"train": ShardedState(model, optimizer)})

        def read_data(self: Any, plan: Any, planner: Any) -> Any:
            raise OSError(errno.EIO, "Input/output error")

        fresh = shard(build(4))
        back = ShardedState(fresh, torch.optim.AdamW(fresh.parameters()))
        before = {k: v.to_local().clone() for k, v in fresh.state_dict().items()}
        with Patch(FileSystemReader, "read_data", read_data, (1,)):
            r["restore_raise"] = outcome(lambda: done(ckpt.restore({"train": back})))
        after = fresh.state_dict()
        r["restore_raise_unchanged"] = all(
            torch.equal(v, after[k].to_local()) for k, v in before.items()
        )
        r["restore_raise_listed"] = [i.step for i in ckpt.list()]
        r["restore_raise_quarantine"] = os.path.isdir(f"{run}/quarantine")
        again = outcome(lambda: ckpt.restore({"train": back}).step)
        r["restore_raise_again"] = again


def tampered_dcp(root: str, r: dict[str, Any]) -> None:
    """The dcp/ folder of the latest step removed, or replaced by a file, or by another
    step's folder: the writer's restore on both ranks falls back to the previous step."""
    model, optimizer = trained()
    for how in ("removed", "file", "swapped"):
        run = f"{root}/tamper-{how}"
        with Checkpointer(run, async_save=False, keep_last=3) as ckpt:
            ckpt.save(0, {"train": ShardedState(model, optimizer)})
            first = full(ShardedState(model, optimizer).state_dict())
            train_step(model, optimizer, 6)
            ckpt.save(1, {"train": ShardedState(model, optimizer)})
            train_step(model, optimizer, 7)
            ckpt.save(2, {"train": ShardedState(model, optimizer)})
            dist.barrier()
            if dist.get_rank() == 0:
                dcp2 = f"{run}/step-000000002/dcp"
                import shutil

                shutil.rmtree(dcp2)
                if how == "file":
                    with open(dcp2, "w") as f:
                        f.write("not a folder")
                if how == "swapped":
                    shutil.copytree(f"{run}/step-000000000/dcp", dcp2)
                shutil.rmtree(f"{run}/step-000000001/dcp")
            dist.barrier()
            fresh = shard(build(4))
            back = ShardedState(fresh, torch.optim.AdamW(fresh.parameters()))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = outcome(lambda b=back: ckpt.restore({"train": b}).step)
            r[f"tamper_{how}"] = {
                "outcome": got,
                "equal": same(first, full(back.state_dict())),
                "warnings": [str(w.message) for w in caught if "falling back" in str(w.message)],
            }


def diverging_stoppers(root: str, r: dict[str, Any], first: int) -> None:
    """Plain stoppers fed each rank's own metric: rank `first` stops and closes while the
    other saves sharded state again."""
    run = f"{root}/diverge-{first}"
    model, optimizer = trained()
    stopper = EarlyStopping("val_loss", patience=1)
    rising = dist.get_rank() == first

    def loop() -> None:
        with Checkpointer(run, monitor="val_loss") as ckpt:
            for epoch in range(6):
                if stopper.stopped:
                    break
                loss = 1.0 + epoch if rising else 1.0 - 0.1 * epoch
                stopper.step({"val_loss": loss})
                ckpt.save(
                    epoch,
                    {"train": ShardedState(model, optimizer), "stopper": stopper},
                    {"val_loss": loss},
                )

    start = time.monotonic()
    r[f"diverge_{first}"] = outcome(loop)
    r[f"diverge_{first}_seconds"] = time.monotonic() - start
    dist.barrier()
    r[f"diverge_{first}_listed"] = steps(run)


def maybe_save_decisions(root: str, r: dict[str, Any]) -> None:
    """`maybe_save` with every=100 and an improvement trigger: rank 1's metric improves at
    step 1, rank 0's does not; both ranks must take the same decision."""
    run = f"{root}/maybe-save"
    model, optimizer = trained()
    losses = {0: [1.0, 2.0, 3.0], 1: [1.0, 0.5, 3.0]}[dist.get_rank()]
    saved: list[int] = []

    def loop() -> None:
        with Checkpointer(run, monitor="val_loss", every=100) as ckpt:
            for step, loss in enumerate(losses, start=1):
                info = ckpt.maybe_save(
                    step, {"train": ShardedState(model, optimizer)}, {"val_loss": loss}
                )
                if info is not None:
                    saved.append(info.step)

    r["maybe_save"] = outcome(loop)
    r["maybe_save_saved"] = saved
    dist.barrier()
    r["maybe_save_listed"] = steps(run)


def dcp_steps_failing(root: str, r: dict[str, Any]) -> None:
    """DCP's other steps of a save failing on one rank: rank 1's local plan, rank 0's
    `finish` (the `.metadata` write), and (async) rank 1's copy of its shards."""
    from torch.distributed.checkpoint.staging import DefaultStager

    model, optimizer = trained()

    def fails(*args: Any, **kwargs: Any) -> Any:
        raise OSError("injected")

    points = (
        ("plan", FileSystemWriter, "prepare_local_plan", 1, False),
        ("finish", FileSystemWriter, "finish", 0, False),
        ("stage", DefaultStager, "stage", 1, True),
    )
    for key, owner, name, rank, async_save in points:
        run = f"{root}/dcp-step-{key}"
        with Checkpointer(run, async_save=async_save) as ckpt:
            ckpt.save(0, {"train": ShardedState(model, optimizer)})
            ckpt.wait()
            with Patch(owner, name, fails, (rank,)):
                r[f"dcp_step_{key}"] = outcome(
                    lambda c=ckpt: done(
                        c.save(1, {"train": ShardedState(model, optimizer)}), c.wait()
                    )
                )
            r[f"dcp_step_{key}_listed"] = [i.step for i in ckpt.list()]
            r[f"dcp_step_{key}_again"] = outcome(
                lambda c=ckpt: done(c.save(1, {"train": ShardedState(model, optimizer)}), c.wait())
            )
            r[f"dcp_step_{key}_listed_after"] = [i.step for i in ckpt.list()]


def rank1_cannot_make_its_writer(root: str, r: dict[str, Any]) -> None:
    """Making DCP's writer fails on rank 1 only (its mount not writable), before DCP's
    collective save starts; synchronous and async."""
    import haltpoint.distributed.sharded as sharded

    model, optimizer = trained()
    real = sharded._dcp_io

    def no_writer(storage: Any, folder: str, write: bool) -> Any:
        if write:
            raise PermissionError(errno.EACCES, "Permission denied", folder)
        return real(storage, folder, write)

    for key, async_save in (("sync", False), ("async", True)):
        run = f"{root}/no-writer-{key}"
        with Checkpointer(run, async_save=async_save) as ckpt:
            ckpt.save(0, {"train": ShardedState(model, optimizer)})
            ckpt.wait()
            start = time.monotonic()
            with Patch(sharded, "_dcp_io", no_writer, (1,)):
                state = {"train": ShardedState(model, optimizer)}
                r[f"no_writer_{key}"] = outcome(
                    lambda c=ckpt, s=state: done(c.save(1, s), c.wait())
                )
            r[f"no_writer_{key}_seconds"] = time.monotonic() - start
            r[f"no_writer_{key}_listed"] = outcome(lambda c=ckpt: [i.step for i in c.list()])


def different_entries(root: str, r: dict[str, Any]) -> None:
    """Rank 1 passes one more sharded entry than rank 0 (an EMA copy of the weights)."""
    run = f"{root}/different-entries"
    model, optimizer = trained()
    state: dict[str, Any] = {"train": ShardedState(model, optimizer)}
    if dist.get_rank() == 1:
        state["ema"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with Checkpointer(run, async_save=False) as ckpt:
        r["different_entries"] = outcome(lambda: done(ckpt.save(0, state)))
    dist.barrier()
    r["different_entries_listed"] = steps(run)


def one_rank_does_not_fit(root: str, r: dict[str, Any]) -> None:
    """The writer's restore where only rank 1's model does not fit the checkpoint (another
    hidden size): rank 1 fails its checks while rank 0 would go on into DCP's load."""
    run = f"{root}/rank-local-mismatch"
    model, optimizer = trained()
    with Checkpointer(run, async_save=False) as ckpt:
        ckpt.save(0, {"train": ShardedState(model, optimizer), "epoch": 0})
        fresh = shard(build(1, hidden=32 if dist.get_rank() == 1 else 16))
        before = {k: v.to_local().clone() for k, v in fresh.state_dict().items()}
        start = time.monotonic()
        state = {"train": ShardedState(fresh), "epoch": None}
        r["local_mismatch"] = outcome(lambda: done(ckpt.restore(state)))
        r["local_mismatch_seconds"] = time.monotonic() - start
        after = fresh.state_dict()
        r["local_mismatch_unchanged"] = (
            all(torch.equal(v, after[k].to_local()) for k, v in before.items())
            and state["epoch"] is None
        )
        r["local_mismatch_then"] = outcome(lambda: [i.step for i in ckpt.list()])


def rank0_reads_alone(root: str, r: dict[str, Any]) -> None:
    """Rank 0 alone restores a sharded checkpoint read-only into a plain model (to evaluate
    or export the best weights) while rank 1 waits at a barrier."""
    run = f"{root}/round-trip"  # saved by round_trip
    saved = torch.load(f"{os.path.dirname(root)}/out/round-trip-full.pt", weights_only=True)
    start = time.monotonic()
    if dist.get_rank() == 0:
        plain = build(5)
        with Checkpointer(run, read_only=True) as reader:
            got = outcome(lambda: reader.restore({"train": ShardedState(plain)}).step)
        r["alone"] = got
        r["alone_equal"] = same(saved["model"], full(plain.state_dict()))
    r["alone_barrier"] = outcome(lambda: done(dist.barrier()))
    r["alone_seconds"] = time.monotonic() - start


# -- modes ------------------------------------------------------------------------------------


def port(args: argparse.Namespace) -> None:
    r: dict[str, Any] = {}
    cases: list[tuple[str, Callable[[], None]]] = [
        ("round_trip", lambda: round_trip(args.root, args.out, r)),
        ("dtypes", lambda: dtypes_and_empty(args.root, r)),
        ("placements", lambda: placements(args.root, r)),
        ("overwrite", lambda: overwrite(args.root, r)),
        ("mismatch", lambda: mismatch(args.root, r)),
        ("memory", lambda: memory_url(args.root, r)),
        ("raise_sync", lambda: rank_raises_in_save(args.root, r, async_save=False)),
        ("raise_async", lambda: rank_raises_in_save(args.root, r, async_save=True)),
        ("disk_full", lambda: rank0_disk_full(args.root, r)),
        ("raise_restore", lambda: rank_raises_in_restore(args.root, r)),
        ("tamper", lambda: tampered_dcp(args.root, r)),
        ("diverge_0", lambda: diverging_stoppers(args.root, r, 0)),
        ("diverge_1", lambda: diverging_stoppers(args.root, r, 1)),
        ("maybe_save", lambda: maybe_save_decisions(args.root, r)),
        ("different_entries", lambda: different_entries(args.root, r)),
        ("dcp_steps", lambda: dcp_steps_failing(args.root, r)),
        ("local_mismatch", lambda: one_rank_does_not_fit(args.root, r)),
        ("no_writer", lambda: rank1_cannot_make_its_writer(args.root, r)),
        ("alone", lambda: rank0_reads_alone(args.root, r)),
    ]
    only = set(args.only.split(",")) if args.only else None
    for name, case in cases:
        if only is not None and name not in only:
            continue
        start = time.monotonic()
        try:
            case()
        except BaseException as exc:  # a case that broke: recorded, the next ones still run
            r[f"{name}_crashed"] = f"{type(exc).__name__}: {exc}"
        r[f"{name}_case_seconds"] = round(time.monotonic() - start, 2)
        dist.barrier()
    with open(f"{args.out}/rank{dist.get_rank()}.json", "w") as f:
        json.dump(r, f, default=str)


def kill(args: argparse.Namespace) -> None:
    """Rank 1 exits (or, `--case hang`, stops answering) in the middle of DCP's write of
    step 1 (`save`: synchronous; `async`: in the background), or of its read (`restore`);
    `--case writer`: rank 0 exits in the middle of its synchronous write."""
    rank = dist.get_rank()
    run = f"{args.root}/kill-{args.case}"
    model, optimizer = trained()
    r: dict[str, Any] = {}
    ckpt = Checkpointer(run, async_save=args.case in ("async", "hang-async"))
    ckpt.save(0, {"train": ShardedState(model, optimizer)})
    ckpt.wait()
    train_step(model, optimizer, 5)
    owner, name = (
        (FileSystemReader, "read_data")
        if args.case == "restore"
        else (FileSystemWriter, "write_data")
    )
    real = getattr(owner, name)

    dying = 0 if args.case == "writer" else 1

    def dies(self: Any, plan: Any, planner: Any) -> Any:
        if rank == dying:
            if args.case.startswith("hang"):  # silent past the group's timeout, then gone
                time.sleep((4 if args.case == "hang-async" else 2) * TIMEOUT_HANG.total_seconds())
            os._exit(0)
        return real(self, plan, planner)

    setattr(owner, name, dies)
    start = time.monotonic()
    if args.case == "restore":
        fresh = shard(build(4))
        call = lambda: done(ckpt.restore({"train": ShardedState(fresh)}))  # noqa: E731
    else:
        state = {"train": ShardedState(model, optimizer)}
        call = lambda: done(ckpt.save(1, state), ckpt.wait())  # noqa: E731
    r["kill"] = outcome(call)
    r["kill_seconds"] = time.monotonic() - start
    setattr(owner, name, real)
    r["kill_close"] = outcome(ckpt.close)  # a collective too: it raises, it does not hang
    with open(f"{args.out}/kill-rank{rank}.json", "w") as f:
        json.dump(r, f, default=str)
    os._exit(0)  # the group is broken: no barrier, no destroy


def restore1(args: argparse.Namespace) -> None:
    """A run saved by one rank, restored onto 2 ranks into FSDP2."""
    fresh = shard(build(1))
    optimizer = torch.optim.AdamW(fresh.parameters())
    back = ShardedState(fresh, optimizer)
    state = {"train": back, "epoch": None}
    with Checkpointer(args.root, read_only=True) as reader:
        got = outcome(lambda: reader.restore(state).step)
    result = {"outcome": got, "epoch": state["epoch"], "full": None}
    values = full(back.state_dict())
    if dist.get_rank() == 0:
        torch.save(values, f"{args.out}/restore1-full.pt")
    with open(f"{args.out}/restore1-rank{dist.get_rank()}.json", "w") as f:
        json.dump(result, f, default=str)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("port", "kill", "restore1"), required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default="")
    parser.add_argument(
        "--case",
        choices=("save", "async", "restore", "hang", "hang-async", "writer"),
        default="save",
    )
    args = parser.parse_args()
    dist.init_process_group(
        "gloo", timeout=TIMEOUT_HANG if args.case.startswith("hang") else TIMEOUT
    )
    {"port": port, "kill": kill, "restore1": restore1}[args.mode](args)
    dist.barrier()
    end_rank()


if __name__ == "__main__":
    main()
