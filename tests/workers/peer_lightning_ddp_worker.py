"""One rank (gloo, CPU) of Lightning's two-process early-stopping cases, ported.

Launched by tests/test_peer_lightning.py with torchrun. Each case is one `Trainer.fit` with
`strategy="ddp"` on two CPU ranks (both started once by torchrun, where Lightning's own tests
spawn two fresh ones per case), two `HaltpointCallback`s watching `abc` and `cba`. Writes the
epoch each fit ended at and the haltpoint log lines of this rank to `<out>/rank<N>.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from rank_exit import end_rank

from haltpoint import EarlyStopping
from haltpoint.integrations.lightning import HaltpointCallback

ABC = [8.0, 4, 2, 3, 4, 5, 8, 10]  # best at epoch 2: patience 3 would stop at 5, patience 1 at 3


class TwoMetrics(BoringModel):  # type: ignore[misc]
    """Logs abc and a flat cba (patience 3 stops at 3), at validation or train epoch end.

    From `diverge_epoch` on, rank 0 alone logs abc = 10 (worse than its best).
    """

    def __init__(self, at_train_end: bool, diverge_epoch: int | None) -> None:
        super().__init__()
        self.at_train_end = at_train_end
        self.diverge_epoch = diverge_epoch

    def _log_both(self) -> None:
        epoch = self.current_epoch
        diverged = self.diverge_epoch is not None and epoch >= self.diverge_epoch
        abc = 10.0 if diverged and self.trainer.global_rank == 0 else ABC[epoch]
        self.log("abc", torch.tensor(abc))
        self.log("cba", torch.tensor(0.0))

    def on_train_epoch_end(self) -> None:
        if self.at_train_end:
            self._log_both()

    def on_validation_epoch_end(self) -> None:
        if not self.at_train_end:
            self._log_both()


# name: (abc's patience, cba's patience, cba first, check at train epoch end, diverge epoch)
CASES: dict[str, tuple[int, int, bool, bool, int | None]] = {
    "diverge": (1, 3, False, False, 2),
    "abc_first": (3, 3, False, False, None),
    "cba_first": (3, 3, True, False, None),
    "train_end_abc_first": (3, 3, False, True, None),
    "train_end_cba_first": (3, 3, True, True, None),
}


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def fit(case: tuple[int, int, bool, bool, int | None], root: Path) -> dict[str, Any]:
    abc_patience, cba_patience, cba_first, at_train_end, diverge = case
    callbacks = [
        HaltpointCallback(
            EarlyStopping("abc", patience=abc_patience), check_on_train_epoch_end=at_train_end
        ),
        HaltpointCallback(
            EarlyStopping("cba", patience=cba_patience), check_on_train_epoch_end=at_train_end
        ),
    ]
    if cba_first:
        callbacks.reverse()
    lines = Lines()
    logging.getLogger("haltpoint").addHandler(lines)
    logging.getLogger("haltpoint").setLevel(logging.INFO)
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=20,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=callbacks,
    )
    trainer.fit(TwoMetrics(at_train_end, diverge))
    logging.getLogger("haltpoint").removeHandler(lines)
    return {"stop_epoch": trainer.current_epoch - 1, "lines": lines.lines}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # Lightning's advice on num_workers and the like
    out = Path(args.out)
    results = {name: fit(case, out / name) for name, case in CASES.items()}
    rank = torch.distributed.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    end_rank()


if __name__ == "__main__":
    main()
