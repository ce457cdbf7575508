"""One rank of a 2-rank gloo job whose plain (unsynced) stoppers disagree; run by
tests/test_distributed.py with torchrun.

Rank `--first` sees its validation loss rise and stops after two evaluations, the other rank's
keeps falling: the first leaves its loop and closes the Checkpointer while the other saves
again. Each rank writes the error it got to `<out>/rank<N>.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import torch.distributed as dist
from rank_exit import end_rank

from haltpoint import Checkpointer, CheckpointError, EarlyStopping


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    rising = rank == args.first
    model = torch.nn.Linear(2, 1)
    stopper = EarlyStopping("val_loss", patience=1)  # not synced(...): the mistake under test
    state = {"model": model, "stopper": stopper}
    result: dict = {"rank": rank, "error": None}
    try:
        with Checkpointer(args.run_dir, monitor="val_loss") as ckpt:
            info = ckpt.restore(state)
            for epoch in range(info.step + 1 if info else 0, 10):
                if stopper.stopped:
                    break
                loss = 1.0 + epoch if rising else 1.0 - 0.1 * epoch
                stopper.step({"val_loss": loss})
                ckpt.save(epoch, state, {"val_loss": loss})
    except CheckpointError as exc:
        result["error"] = str(exc)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    end_rank()


if __name__ == "__main__":
    main()
