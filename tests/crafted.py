"""What the hostile-run and write-side tests craft with: `benchmarks/hostile.py` (a manifest
sealed with a valid checksum, a run to tamper with), a small trained Adam, and models whose
weights say which step saved them.

`from crafted import adam, hostile, model_at, saved_step, writer`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import torch

import hostile
from haltpoint import Checkpointer

__all__ = ["adam", "hostile", "model_at", "saved_step", "writer"]


def adam() -> tuple[torch.nn.Linear, torch.optim.Adam]:
    """A 3-to-2 linear layer and an Adam that took one step on it (so it has state)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def model_at(step: int) -> torch.nn.Linear:
    """A model whose weights say which step saved them."""
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.fill_(float(step))
        model.bias.fill_(-float(step))
    return model


def saved_step(model: torch.nn.Linear) -> int:
    """The step whose `model_at` weights `model` holds (checked whole)."""
    step = int(model.weight[0, 0])
    assert torch.equal(model.weight, torch.full((3, 4), float(step)))
    assert torch.equal(model.bias, torch.full((3,), -float(step)))
    return step


def writer(run: Path, **kwargs: Any) -> Checkpointer:
    """A synchronous writer on `run` ranking by "loss", keeping the newest (`kwargs` win)."""
    options: dict[str, Any] = {
        "monitor": "loss",
        "keep_last": 1,
        "async_save": False,
        "capture_rng": False,
    }
    return Checkpointer(run, **{**options, **kwargs})
