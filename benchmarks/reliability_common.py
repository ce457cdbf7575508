"""What the reliability campaigns share: damaging a file, a fresh copy of a pristine run, the
frozen state that dedup references, the command line run quietly, and the report they print.
"""

from __future__ import annotations

import contextlib
import io
import random
import shutil
from pathlib import Path

import torch

from haltpoint.cli import main as cli_main

TENSORS = "tensors.safetensors"
FROZEN = 1 << 18  # float32 elements of each frozen tensor: 1 MiB, large enough for dedup


def damage_file(path: Path, rng: random.Random) -> str:
    """Truncate `path` or flip 1-4 of its bits, at random; returns what was done."""
    data = bytearray(path.read_bytes())
    if rng.random() < 0.5 and data:
        cut = rng.randrange(len(data))
        path.write_bytes(bytes(data[:cut]))
        return f"truncated {path.name} to {cut} bytes"
    flips = rng.randint(1, 4)
    for _ in range(flips):
        index = rng.randrange(len(data))
        data[index] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return f"flipped {flips} bits of {path.name}"


def fresh_copy(pristine: Path, run: Path) -> None:
    """`run` made anew as a copy of `pristine`."""
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(pristine, run)


def frozen_state(step: int) -> dict[str, object]:
    """The state saved at `step`: two frozen tensors and a head that changes every step."""
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(FROZEN, generator=g), torch.randn(FROZEN, generator=g)
    return {"a": a, "b": b, "head": torch.full((64,), float(step)), "step": step}


def quiet_cli(args: list[str]) -> tuple[int, str]:
    """Run the `haltpoint` command with `args`, its output swallowed.

    Returns its exit status and what it wrote to stderr, in one line.
    """
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli_main(args)
    return code, " ".join(err.getvalue().split())


class Report:
    """Base of every campaign's report: whether nothing was lost, and what was found."""

    @property
    def ok(self) -> bool:
        raise NotImplementedError

    def summary(self) -> str:
        """The campaign's finding in one line."""
        raise NotImplementedError

    def details(self) -> list[str]:
        """Lines printed below the summary: none unless a campaign says more."""
        return []


def report(result: Report, seconds: float) -> int:
    """Print `result`'s summary with the time it took, then its details; the exit status."""
    print(f"{result.summary()} ({seconds:.0f} s)")
    for line in result.details():
        print(f"  {line}")
    return 0 if result.ok else 1
