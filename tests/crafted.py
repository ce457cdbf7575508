"""What the hostile-run tests craft with: `benchmarks/hostile.py` (a manifest sealed with a
valid checksum, a run to tamper with) and a small trained Adam.

`from crafted import adam, hostile`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import torch

import hostile

__all__ = ["adam", "hostile"]


def adam() -> tuple[torch.nn.Linear, torch.optim.Adam]:
    """A 3-to-2 linear layer and an Adam that took one step on it (so it has state)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return model, optimizer
