"""Turning what users pass to `step()` into floats: numbers, NumPy scalars, tensors, mappings."""

from __future__ import annotations

import sys
from collections.abc import Mapping

__all__ = ["as_float", "read_metric", "shown", "too_large_for_a_float"]

_ALLOWED = "a float, an int, a NumPy scalar, or a one-element array or tensor"


def _is_bool(value: object) -> bool:
    if isinstance(value, bool):
        return True
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return False
    kind = getattr(dtype, "kind", None)  # NumPy dtypes have a kind; "b" is boolean
    return kind == "b" if kind is not None else str(dtype) == "torch.bool"


def too_large_for_a_float(value: object) -> bool:
    """Whether `value` is an int no float holds (over about 1.8e308 in size).

    >>> too_large_for_a_float(10**308), too_large_for_a_float(10**309), too_large_for_a_float(1e308)
    (False, True, False)
    """
    return isinstance(value, int) and abs(value) > _FLOAT_MAX


def shown(value: object) -> str:
    """`repr(value)` for a message, cut at 80 characters; an int too large for a float by its
    size (its repr may be thousands of digits long, or refused by Python's limit on
    int-to-str conversion).

    >>> shown(0.5), shown(10**5000)
    ('0.5', 'an int of 16610 bits')
    """
    if isinstance(value, int) and too_large_for_a_float(value):
        return f"an int of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_FLOAT_MAX = int(sys.float_info.max)


def as_float(value: object, name: str = "value") -> float:
    """Convert a number-like value to a Python float without importing torch or NumPy.

    Args:
        value: a float, int, NumPy scalar, one-element NumPy array or tensor (any number of
            dimensions), or anything with `.item()` or `__float__`. Booleans are refused: a
            bool is never a metric.
        name: how to call the value in error messages.

    Returns:
        The value as a float (inf and nan pass through).

    Raises:
        TypeError: for booleans and values that are not numbers.
        ValueError: for an int too large for a float.

    Example:
        >>> import numpy as np
        >>> as_float(3), as_float(0.5), as_float(np.array([0.25], dtype=np.float32))
        (3.0, 0.5, 0.25)
    """
    if type(value) is float:
        return value
    if _is_bool(value):
        raise TypeError(
            f"{name} must be a number ({_ALLOWED}); got the boolean {shown(value)}. "
            "Pass the metric itself, not a comparison"
        )
    if isinstance(value, (int, float)):
        if too_large_for_a_float(value):
            raise ValueError(
                f"{name} must be a number a float holds (at most about 1.8e308 in size); got "
                f"{shown(value)}"
            )
        return float(value)
    try:
        item = getattr(value, "item", None)
        if callable(item):  # NumPy and torch: also a one-element 1-D array, as Keras logs F1
            return as_float(item(), name)
        if hasattr(value, "__float__"):
            return float(value)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise TypeError(
            f"{name} must be a number ({_ALLOWED}); got {type(value).__name__} "
            f"{shown(value)}, which does not convert to one float: {exc}"
        ) from None
    raise TypeError(
        f"{name} must be a number ({_ALLOWED}); got {type(value).__name__} {shown(value)}"
    )


def read_metric(metrics: Mapping[str, object], key: str, needed_by: str) -> float:
    """Read `metrics[key]` as a float, with an error that names the keys that were there.

    Args:
        metrics: the mapping passed to `step()`.
        key: the metric to read.
        needed_by: who needs it, for the error message (e.g. ``"monitor"``).

    Raises:
        ValueError: when `key` is not in `metrics`.
        TypeError: when the value is not a number.

    Example:
        >>> read_metric({"val_loss": 0.25}, "val_loss", "monitor")
        0.25
    """
    try:
        raw = metrics[key]
    except KeyError:
        raise ValueError(
            f"{needed_by}={key!r} is not among the metrics passed to step(); the keys were "
            f"{sorted(map(str, metrics))}. Log {key!r} before calling step(), or change "
            f"{needed_by}"
        ) from None
    return as_float(raw, f"metrics[{key!r}]")
