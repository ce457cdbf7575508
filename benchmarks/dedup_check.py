"""What dedup's read-back check costs: the first deduplicated save of a writer session against
the later ones.

Run: python benchmarks/dedup_check.py [--frozen-mib 1024] [--head-mib 64] [--saves 6] [--dir PATH]

The state is a frozen backbone (`--frozen-mib` of float32, never changed) and a head
(`--head-mib`, changed before every save). Saves are synchronous, so each one's time is the time
to a durable commit. Save 0 writes everything; the first deduplicated save of a session reads
the backbone's bytes back and hashes them before referencing them (`ReferenceCheck`); later
saves of the session trust what they checked and write only the head. The run is then reopened
(a new writer session, the backbone's file evicted from the page cache) and saved again.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from haltpoint import Checkpointer

MiB = 1 << 20


def evict(root: Path) -> None:
    """Drop the run's files from the page cache, so that a read-back comes from the disk."""
    for path in root.rglob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_save(ckpt: Checkpointer, step: int, state: dict[str, torch.Tensor]) -> float:
    state["head"].add_(1.0)
    start = time.perf_counter()
    ckpt.save(step, state)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frozen-mib", type=int, default=1024)
    parser.add_argument("--head-mib", type=int, default=64)
    parser.add_argument("--saves", type=int, default=6, help="saves in the first session")
    parser.add_argument("--dir", default=None, help="scratch folder on the disk to measure")
    args = parser.parse_args()
    state = {
        "backbone": torch.randn(args.frozen_mib * MiB // 4),
        "head": torch.randn(args.head_mib * MiB // 4),
    }
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        run = Path(tmp) / "run"
        options = {"keep_last": 2, "capture_rng": False, "async_save": False}
        with Checkpointer(run, **options) as ckpt:  # type: ignore[arg-type]
            times = [timed_save(ckpt, step, state) for step in range(args.saves)]
            read = ckpt._references.bytes_read
        evict(run)
        with Checkpointer(run, **options) as ckpt:  # type: ignore[arg-type]
            resumed = [timed_save(ckpt, step, state) for step in range(args.saves, args.saves + 2)]
            read_again = ckpt._references.bytes_read
    later = statistics.median(times[2:])
    print(f"frozen {args.frozen_mib} MiB + head {args.head_mib} MiB, sync saves, keep_last=2")
    print(f"save 0 (writes everything):         {times[0]:.3f} s")
    print(
        f"save 1 (first dedup, reads back):   {times[1]:.3f} s "
        f"({read / MiB:.0f} MiB read back in the session)"
    )
    print(f"saves 2-{args.saves - 1} (later dedup), median: {later:.3f} s")
    print(f"check's cost on the first dedup save: {times[1] - later:+.3f} s")
    print(
        f"reopened, evicted: first save {resumed[0]:.3f} s, second {resumed[1]:.3f} s "
        f"({read_again / MiB:.0f} MiB read back)"
    )


if __name__ == "__main__":
    main()
