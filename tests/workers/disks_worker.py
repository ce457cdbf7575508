"""One rank of a 2-rank gloo job whose ranks do not share the run directory, or where one
rank's call fails before any collective; launched by tests/test_distributed.py with torchrun.

"The same path on each node's own disk" is simulated with `/proc/self/cwd/run`: the same
string on every rank (so the same `Checkpointer.directory`), but each rank works in its own
folder `--root/<case>/rank<N>`, so each reads its own `run`. The checkpoints each rank's disk
holds are written before the process group exists (one process, no collective). Process-group
timeout 20 s; each rank records, by case, the error it got (class and message, or None), how
long the call took, and whether its model kept its weights. Results go to `<out>/rank<N>.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rank_exit import end_rank

from haltpoint import Checkpointer, CheckpointError

SAME_PATH = "/proc/self/cwd/run"  # one path, each rank's own folder


def build(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 2)


def weights(model: torch.nn.Module) -> list[list[float]]:
    return [p.detach().flatten().tolist() for p in model.parameters()]


def attempt(fn: Callable[[], Any]) -> dict[str, Any]:
    start = time.monotonic()
    try:
        fn()
        error = None
    except CheckpointError as exc:
        error = {"type": type(exc).__name__, "message": str(exc)}
    except Exception as exc:  # not a CheckpointError: the test says so
        error = {"type": type(exc).__name__, "message": str(exc), "foreign": True}
    return {"error": error, "seconds": time.monotonic() - start}


# -- what each rank's own disk holds, written before the process group ----------------------


def prepare_own_disks(folder: Path, rank: int) -> None:
    """Step 4 on every rank's disk, of different weights (saved from seed = rank)."""
    with Checkpointer(folder / "run", async_save=False) as ckpt:
        ckpt.save(4, {"model": build(seed=rank), "epoch": 4})


def prepare_missing_step(folder: Path, rank: int) -> None:
    """Step 4 on rank 0's disk, nothing on rank 1's (an empty run directory)."""
    if rank == 0:
        prepare_own_disks(folder, rank)


PREPARE: dict[str, Callable[[Path, int], None]] = {
    "own_disks": prepare_own_disks,
    "missing_step": prepare_missing_step,
}


# -- the cases, under the process group ------------------------------------------------------


def restore_own_disk(folder: Path, rank: int) -> dict[str, Any]:
    """Every rank restores "latest" from `SAME_PATH`, its own disk."""
    os.chdir(folder)
    target = build(seed=10)
    state: dict[str, Any] = {"model": target, "epoch": -1}
    before = weights(target)
    with Checkpointer(SAME_PATH, async_save=False) as ckpt:
        result = attempt(lambda: ckpt.restore(state))
    result["unchanged"] = weights(target) == before and state["epoch"] == -1
    return result


def different_paths(folder: Path, rank: int) -> dict[str, Any]:
    """Each rank opens a run directory of its own path."""
    result = attempt(lambda: Checkpointer(folder / f"disk{rank}", async_save=False).close())
    result["directory"] = str(folder / f"disk{rank}")
    return result


CASES: dict[str, Callable[[Path, int], dict[str, Any]]] = {
    "own_disks": restore_own_disk,
    "missing_step": restore_own_disk,
    "different_paths": different_paths,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    folders = {name: Path(args.root, name, f"rank{rank}") for name in CASES}
    for name, prepare in PREPARE.items():
        folders[name].mkdir(parents=True)
        prepare(folders[name], rank)  # no process group yet: one process, its own disk
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    results: dict[str, Any] = {}
    for name, case in CASES.items():
        folders[name].mkdir(parents=True, exist_ok=True)
        results[name] = case(folders[name], rank)
        Path(args.out, f"rank{rank}.json").write_text(json.dumps(results))
    end_rank()


if __name__ == "__main__":
    main()
