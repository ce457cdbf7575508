"""Checks of the arguments users pass to `Checkpointer`: steps, devices and metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from haltpoint.errors import first_line
from haltpoint.stopping.inputs import as_float, whole_number

__all__ = ["check_device", "check_step", "coerce_metrics"]


def check_step(step: Any) -> int:
    """`step` as an int if it is a non-negative int or NumPy integer (not a bool) that a
    manifest holds (below 2**63), else a ValueError naming it.

    >>> import numpy as np
    >>> check_step(3), type(check_step(np.int64(4)))
    (3, <class 'int'>)
    """
    count = whole_number(step)
    if count is None or not 0 <= count < 2**63:
        raise ValueError(f"step must be a non-negative int below 2**63, got {step!r}")
    return count


def check_device(map_location: Any) -> torch.device | None:
    """`map_location` as a `torch.device` (None stays None), else a ValueError naming it."""
    if map_location is None:
        return None
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"map_location must be a device such as 'cpu' or 'cuda:0', got {map_location!r}"
        ) from exc
    if device.type == "meta":
        raise ValueError("map_location='meta' holds no data: restore onto 'cpu' or a GPU")
    try:
        torch.empty(0, device=device)  # what this torch and machine can use
    except (RuntimeError, AssertionError) as exc:
        why = (first_line(exc) or type(exc).__name__).split(". ")[0]  # torch's are long
        raise ValueError(
            f"map_location={map_location!r} is not a device this torch can use here ({why})"
        ) from None
    return device


def coerce_metrics(metrics: Mapping[str, Any] | None, monitor: str | None) -> dict[str, float]:
    """The metrics as floats (0-d tensors and NumPy scalars too); the monitor must be there.

    >>> coerce_metrics({"loss": 1}, "loss")
    {'loss': 1.0}
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"metrics must be a mapping of names to numbers, got {type(metrics).__name__}"
        )
    result = {}
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise TypeError(f"metrics keys must be str, got {name!r}")
        result[name] = as_float(value, f"metrics[{name!r}]")
    if monitor is not None and result and monitor not in result:
        raise ValueError(
            f"metrics has no {monitor!r} (the monitor); it holds {sorted(result)}. "
            "Pass the monitored metric, or save without metrics"
        )
    return result
