"""One rank of a 2-rank gloo DDP job running docs/guide.md's preemption loop; launched by
tests/test_preemption.py with torchrun.

Every rank runs the guide's block as written (a DDP model, the same data on every rank). With
`--signal-at N`, rank `--signal-rank` alone sends itself SIGTERM once it has trained N + 1
steps of this job, as SLURM or a node's agent may signal one rank only. Each rank writes the
steps it trained, what `ckpt.preempted` said at the end, its weights and any error to
`<out>/rank<N>.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rank_exit import end_rank
from torch.nn.parallel import DistributedDataParallel

from haltpoint import Checkpointer, CheckpointError

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guide.md"


def guide_loop() -> str:
    """The guide's preemption block (the one that names save_on_signal=[signal.SIGTERM...)."""
    (block,) = [
        b.split("```")[0]
        for b in GUIDE.read_text().split("```python\n")[1:]
        if "save_on_signal=[signal.SIGTERM" in b.split("```")[0]
    ]
    return block


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--signal-at", type=int, default=-1)
    parser.add_argument("--signal-rank", type=int, default=1)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    rank = dist.get_rank()

    torch.manual_seed(0)  # the same weights and dropout masks on every rank
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
    trained: list[int] = []

    def train_step(batch: Any) -> None:
        inputs, targets = batch
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(ddp(inputs), targets).backward()  # an all-reduce
        optimizer.step()
        trained.append(len(trained))
        if rank == args.signal_rank and len(trained) == args.signal_at + 1:
            os.kill(os.getpid(), signal.SIGTERM)

    namespace: dict[str, Any] = {
        "torch": torch,
        "Checkpointer": Checkpointer,
        "dataset": torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)),
        "max_epochs": 3,
        "state": {"model": model, "optimizer": optimizer},
        "train_step": train_step,
    }
    result: dict[str, Any] = {"rank": rank, "error": None}
    os.chdir(args.root)
    try:
        exec(compile(guide_loop(), "docs/guide.md (preemption)", "exec"), namespace)
        result["preempted"] = namespace["ckpt"].preempted
        result["step"] = namespace["step"]
    except CheckpointError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["trained"] = trained
    result["weights"] = [p.detach().flatten().tolist() for p in model.parameters()]
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    end_rank()


if __name__ == "__main__":
    main()
