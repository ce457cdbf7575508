"""One rank of a 2-rank gloo job whose ranks make haltpoint's collective calls differently;
launched by tests/test_distributed.py with torchrun.

Each case runs in its own run directory under `--root`, with a process-group timeout of 20 s,
and records on each rank the error it got (class and message, or None), how long the
diverging call took, and what a call every rank then makes alike gives (that nothing was
lost and the group still works). Results go to `<out>/rank<N>.json`, by case.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rank_exit import end_rank
from torch.distributed.fsdp import fully_shard

from haltpoint import Checkpointer, CheckpointError, EarlyStopping, ShardedState


def build(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))


def sharded(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build(seed)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters())


def plain(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build(seed)
    return model, torch.optim.AdamW(model.parameters())


def full_weights(model: torch.nn.Module) -> list[list[float]]:
    """Every parameter, whole (a collective for an FSDP2 model: every rank calls it)."""
    out = []
    for p in model.parameters():
        value = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.append(value.detach().flatten().tolist())
    return out


def local_weights(model: torch.nn.Module) -> list[list[float]]:
    """This rank's values of every parameter (its shards), with no collective."""
    out = []
    for p in model.parameters():
        value = p.to_local() if hasattr(p, "to_local") else p
        out.append(value.detach().flatten().tolist())
    return out


def attempt(fn: Callable[[], Any]) -> dict[str, Any]:
    start = time.monotonic()
    try:
        fn()
        error = None
    except CheckpointError as exc:
        error = {"type": type(exc).__name__, "message": str(exc)}
    return {"error": error, "seconds": time.monotonic() - start}


def restore_kinds(root: Path, rank: int, entries: bool) -> dict[str, Any]:
    """A sharded checkpoint restored by rank 0 into an FSDP2 model, by rank 1 into a plain
    one (`entries=False`) or into a state without the sharded entry (`entries=True`)."""
    model, optimizer = sharded()
    with Checkpointer(root, async_save=False) as ckpt:
        ckpt.save(0, {"train": ShardedState(model, optimizer), "epoch": 0})
        if rank == 0:
            target, _ = sharded(seed=1)
            state: dict[str, Any] = {"train": ShardedState(target, _), "epoch": -1}
        elif entries:
            target, state = build(seed=1), {"epoch": -1}
        else:
            target, opt = plain(seed=1)
            state = {"train": ShardedState(target, opt), "epoch": -1}
        before = local_weights(target)
        result = attempt(lambda: ckpt.restore(state))
        result["unchanged"] = local_weights(target) == before
        result["epoch"] = state["epoch"]
        again, _ = sharded(seed=2)  # every rank alike: it restores
        info = ckpt.restore({"train": ShardedState(again, _), "epoch": -1})
        result["then"] = None if info is None else info.step
        result["same_weights"] = full_weights(again) == full_weights(model)
    return result


def maybe_save_twice(root: Path, rank: int) -> dict[str, Any]:
    """`maybe_save` called twice at each step (after the optimizer step and after the
    evaluation, as its docstring allows), with every=1."""
    model = build()
    saved: list[int | None] = []
    with Checkpointer(root, every=1, async_save=False) as ckpt:

        def calls() -> None:
            for step in (0, 0, 1, 1):
                info = ckpt.maybe_save(step, {"model": model})
                saved.append(None if info is None else info.step)

        result = attempt(calls)
    result["saved"] = saved
    return result


def clear_stop_one_rank(root: Path, rank: int) -> dict[str, Any]:
    """A stopped run resumed, where rank 0 alone calls `stopper.clear_stop()` to train on
    past the stop, then every rank saves the next step."""
    model = build()
    stopper = EarlyStopping(patience=1)
    with Checkpointer(root, async_save=False) as ckpt:
        for step, loss in enumerate((1.0, 2.0)):  # stops at the second evaluation
            stopper.step(loss)
            ckpt.save(step, {"model": model, "stopper": stopper})
    resumed = EarlyStopping(patience=1)
    with Checkpointer(root, async_save=False) as ckpt:
        ckpt.restore({"model": model, "stopper": resumed})
        if rank == 0:
            resumed.clear_stop()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "step 2 not saved: the run ... had stopped"
            result = attempt(lambda: ckpt.save(2, {"model": model, "stopper": resumed}))
        result["then"] = [info.step for info in ckpt.list()]  # every rank alike: it works
    return result


class _Leave(Exception):
    """Leaves a `with` block without close()'s collective (a rank closed already)."""


def closed_one_rank(root: Path, rank: int) -> dict[str, Any]:
    """Rank 1 closes while rank 0 saves (both raise: different calls), then every rank
    calls save(1) again: rank 1's Checkpointer is closed."""
    state = {"model": build()}
    try:
        with Checkpointer(root, async_save=False) as ckpt:
            ckpt.save(0, state)
            parted = attempt(lambda: ckpt.close() if rank == 1 else ckpt.save(1, state))
            result = attempt(lambda: ckpt.save(1, state))
            result["parted"] = parted["error"] is not None
            raise _Leave
    except _Leave:
        pass
    with Checkpointer(root, async_save=False) as ckpt:  # every rank alike: it works
        result["then"] = [info.step for info in ckpt.list()]
    return result


def bad_argument_one_rank(root: Path, rank: int) -> dict[str, Any]:
    """save(1, pin=...) with a pin that is no bool on rank 1 only."""
    state = {"model": build()}
    with Checkpointer(root, async_save=False) as ckpt:
        pin: Any = "yes" if rank == 1 else False
        try:
            result = attempt(lambda: ckpt.save(1, state, pin=pin))
        except TypeError as exc:  # attempt records CheckpointErrors only
            result = {"error": {"type": "TypeError", "message": str(exc)}, "seconds": None}
        result["then"] = [info.step for info in ckpt.list()]
    return result


CASES: dict[str, Callable[[Path, int], dict[str, Any]]] = {
    "closed_one_rank": closed_one_rank,
    "bad_argument_one_rank": bad_argument_one_rank,
    "clear_stop_one_rank": clear_stop_one_rank,
    "maybe_save_twice": maybe_save_twice,
    "restore_kinds": lambda root, rank: restore_kinds(root, rank, entries=False),
    "restore_entries": lambda root, rank: restore_kinds(root, rank, entries=True),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    rank = dist.get_rank()
    results: dict[str, Any] = {}
    for name, case in CASES.items():
        results[name] = case(Path(args.root, name), rank)
        Path(args.out, f"rank{rank}.json").write_text(json.dumps(results))
    end_rank()


if __name__ == "__main__":
    main()
