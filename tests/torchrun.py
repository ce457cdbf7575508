"""Launch a test worker on several gloo ranks with torchrun, and read what each rank wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ports import free_port

__all__ = ["rank_results", "run_checked", "torchrun"]


def torchrun(worker: Path, *args: str, nproc: int = 2, timeout: float = 120) -> None:
    """Run `worker` with `args` on `nproc` ranks of one node; a hang or a failure fails the test."""
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}", str(worker), *args,
    ]  # fmt: skip
    run_checked(command, what=worker.name, timeout=timeout)


def run_checked(command: list[str], *, what: str, timeout: float) -> None:
    """Run `command` with one OpenMP thread; a hang or a non-zero exit fails the test."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # a hang is a failure, never a stuck CI job
        pytest.fail(f"{what} did not finish within {timeout} s (a hang?): {exc.stderr!r}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def rank_results(out: Path, nproc: int = 2) -> list[dict[str, Any]]:
    """The JSON each rank wrote to `out/rank{r}.json`."""
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
