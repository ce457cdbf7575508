"""One rank (gloo, CPU) of ignite's distributed early-stopping scenarios, ported.

Launched by tests/test_peer_ignite.py with torchrun. Each scenario is a loop over epochs
whose score differs per rank; `synced(EarlyStopping(...))` averages it over the ranks. Writes
the epoch each scenario stopped at, and the stopper's decision, to `<out>/rank<N>.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import torch.distributed as dist
from rank_exit import end_rank

from haltpoint import EarlyStopping, synced

SCORES = [1.0, 0.8, 1.2, 1.5, 0.9, 1.0, 0.99, 1.1, 0.9]  # the mean over ranks, per epoch


def run(stopper: object, score_of_epoch: object, max_epochs: int) -> dict[str, object]:
    for epoch in range(1, max_epochs + 1):
        decision = stopper.step(score_of_epoch(epoch))  # type: ignore[attr-defined, operator]
        if decision:
            return {"epoch": epoch, "reason": decision.reason, "best": decision.best}
    return {"epoch": max_epochs, "reason": None, "best": stopper.best}  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    result: dict[str, object] = {"rank": rank}

    # 1. A score that differs per rank, whose mean over ranks is SCORES.
    offset = 0.25 * (rank - (world - 1) / 2)
    scores = synced(EarlyStopping(mode="max", patience=3))
    result["scores"] = run(scores, lambda epoch: SCORES[epoch - 1] + offset, 10)

    # 2. Each rank's accuracy on its own predictions: random, except all right at epoch 2.
    gen = torch.Generator().manual_seed(12 + rank)

    def accuracy(epoch: int) -> float:
        truth = torch.randint(0, 2, (20,), generator=gen)
        guess = truth.clone() if epoch == 2 else torch.randint(0, 2, (20,), generator=gen)
        return float((guess == truth).float().mean())

    accuracies = synced(EarlyStopping("acc", mode="max", patience=3))
    result["accuracy"] = run(accuracies, lambda epoch: {"acc": accuracy(epoch)}, 10)

    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    end_rank()


if __name__ == "__main__":
    main()
