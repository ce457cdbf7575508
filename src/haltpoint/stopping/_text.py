"""Formatting numbers for the sentences in stop reasons."""

from __future__ import annotations

import math

__all__ = ["evaluations", "fmt", "label"]


def fmt(x: float | None) -> str:
    """Format a metric value for a message: four decimals in the usual range, else 4 digits.

    Example:
        >>> fmt(0.231), fmt(1.5e-06), fmt(None)
        ('0.2310', '1.5e-06', 'none')
    """
    if x is None:
        return "none"
    if not math.isfinite(x) or x == 0:
        return str(x)
    if 1e-3 <= abs(x) < 1e5:
        return f"{x:.4f}"
    return f"{x:.4g}"


def label(monitor: str | None) -> str:
    """Name the monitored value in a message.

    Example:
        >>> label("val_loss"), label(None)
        ('val_loss', 'the monitored value')
    """
    return monitor if monitor is not None else "the monitored value"


def evaluations(n: int) -> str:
    """Count evaluations in a message, singular for one.

    Example:
        >>> evaluations(1), evaluations(3)
        ('1 evaluation', '3 evaluations')
    """
    return f"{n} evaluation" if n == 1 else f"{n} evaluations"
