"""One rank of a DDP run on CPU (gloo), launched by tests/test_distributed.py with torchrun.

Trains a small DDP model, stops with `synced(EarlyStopping)` on a rank-dependent metric, saves
every evaluation, restores the best, resumes the latest after a rewind (in `<run-dir>-rewind`),
then makes rank 0's background write fail; it writes what it saw to `<out>/rank<N>.json` for
the parent test to compare across ranks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import warnings

import torch
import torch.distributed as dist
from rank_exit import end_rank
from torch.nn.parallel import DistributedDataParallel

import haltpoint.checkpointer
import haltpoint.reader
from haltpoint import Checkpointer, CheckpointError, EarlyStopping, synced

# the "true" validation curve: best at evaluation 2, then patience=2 runs out at evaluation 4
CURVE = [1.0, 0.8, 0.7, 0.75, 0.72, 0.74, 0.6, 0.5]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--fail-dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    result: dict = {"rank": rank, "pid": os.getpid()}

    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(rank)
    stopper = synced(EarlyStopping("val_loss", patience=2))
    by_rank0 = synced(EarlyStopping("val_loss", patience=2), reduce="rank0")
    state = {"model": model, "optimizer": optimizer}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Checkpointer(args.run_dir, monitor="val_loss", keep_last=100) as ckpt:
            for epoch, level in enumerate(CURVE):
                x = torch.randn(16, 4, generator=data)
                loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                val_loss = level + 0.01 * rank  # each rank sees a slightly different value
                decision = stopper.step({"val_loss": val_loss, "epoch": epoch})
                second = by_rank0.step(val_loss)
                ckpt.save(epoch, state, {"val_loss": decision.value})
                if decision:
                    break
            ckpt.wait()  # every rank: rank 0 has committed everything
            try:  # rank 0 finds the step taken: the same error class on every rank
                ckpt.save(2, state)
            except CheckpointError as exc:
                result["exists"] = type(exc).__name__
            result["saved"] = [info.step for info in ckpt.list()]
            with torch.no_grad():  # spoil the weights, then restore the best
                for p in model.parameters():
                    p.add_(100.0 + rank)
            info = ckpt.restore(state, "best")
            result["restored"] = info.step
            result["weights"] = [p.detach().flatten().tolist() for p in model.parameters()]
            # rank 1 cannot read the step rank 0 chose: every rank raises, none has loaded
            real_read = haltpoint.reader.read_tensors
            if rank == 1:

                def unreadable(*args: object, **kwargs: object) -> object:
                    raise OSError("rank 1 cannot see the shared disk")

                haltpoint.reader.read_tensors = unreadable  # type: ignore[assignment]
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
            spoiled = [p.detach().flatten().tolist() for p in model.parameters()]
            try:
                ckpt.restore(state, "best")
                result["read_failure"] = None
            except CheckpointError as exc:
                result["read_failure"] = str(exc)
            finally:
                haltpoint.reader.read_tensors = real_read
            now = [p.detach().flatten().tolist() for p in model.parameters()]
            result["unchanged_after_read_failure"] = now == spoiled
    result["warnings"] = [str(w.message) for w in caught if "disagree" in str(w.message)]
    result["stop"] = {
        "evaluation": decision.step,
        "code": str(decision.code),
        "reason": decision.reason,
        "best": stopper.best,
        "best_step": stopper.best_step,
    }
    result["rank0_reduce"] = {"stop": bool(second), "step": second.step, "best": by_rank0.best}

    # a rewind (steps 10, 20, 30; restore 10, save 15), then a new job resumes "latest": the
    # branch saved last (15) on every rank, not the abandoned branch's highest step
    rewind_dir = args.run_dir + "-rewind"
    with Checkpointer(rewind_dir, keep_last=10) as ckpt:
        for step in (10, 20, 30):
            ckpt.save(step, state)
    with Checkpointer(rewind_dir, keep_last=10) as ckpt:
        ckpt.restore(state, which=10)
        ckpt.save(15, state)
    with Checkpointer(rewind_dir, keep_last=10) as ckpt:
        resumed = ckpt.restore(state)
        result["rewound"] = None if resumed is None else resumed.step

    # a background write that fails on rank 0 only: every rank raises at wait()
    if rank == 0:

        def broken(*args: object, **kwargs: object) -> None:
            raise OSError("simulated disk failure")

        haltpoint.checkpointer.write_checkpoint = broken  # type: ignore[assignment]
    ckpt = Checkpointer(args.fail_dir)
    ckpt.save(0, state)  # returns at once; rank 0 fails in the background
    try:
        ckpt.wait()
        result["failure"] = None
    except CheckpointError as exc:
        result["failure"] = {"type": type(exc).__name__, "message": str(exc)}
    ckpt.close()  # the error was raised once; closing is clean and synchronised
    dist.barrier()
    result["finished"] = True
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    end_rank()


if __name__ == "__main__":
    main()
