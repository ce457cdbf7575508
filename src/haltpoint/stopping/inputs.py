"""Turning what users pass to `step()` into floats: numbers, NumPy scalars, tensors, mappings."""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Mapping

__all__ = [
    "as_float",
    "json_number",
    "read_metric",
    "real_number",
    "shown",
    "too_large_for_a_float",
    "whole_number",
]

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
    try:
        text = repr(value)
    except ValueError:  # it holds an int beyond Python's limit on int-to-str conversion
        return f"a {type(value).__name__} holding an int too large to show"
    return text if len(text) <= 80 else text[:77] + "..."


_FLOAT_MAX = int(sys.float_info.max)


def real_number(value: object) -> float | None:
    """`value` as a float when it is a real number: an int, a float, or a NumPy integer or
    floating scalar (any `numbers.Real`) but not a bool; None for anything else (bools,
    arrays, tensors, strings, complex numbers). The one check of every real-valued argument.

    One too large for any float (`10**400`, `np.longdouble("1e4000")`) is inf of its sign,
    so that a finiteness check refuses it; inf and nan pass through.

    >>> import numpy as np
    >>> real_number(np.float32(0.5)), real_number(np.int64(3)), real_number(np.bool_(True))
    (0.5, 3.0, None)
    >>> real_number(np.longdouble("-1e4000"))
    -inf
    """
    if type(value) is float:
        return value
    if _is_bool(value) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)  # a longdouble beyond a float is inf already
    except OverflowError:  # an int (or a Fraction) beyond a float
        return math.inf if value > 0 else -math.inf  # type: ignore[operator]


def json_number(value: object) -> float | None:
    """`value` as a float when it is a number as a saved state holds one: an int or a float
    (not a bool) that a float holds, inf and nan included; None for anything else (an int
    beyond a float, a string, a list, ...).

    >>> json_number(3), json_number(float("inf")), json_number(10**400), json_number("1")
    (3.0, inf, None, None)
    """
    if type(value) is float:
        return value
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    number = real_number(value)
    return None if number is None or (math.isinf(number) and value != number) else number


def whole_number(value: object) -> int | None:
    """`value` as an int when it is an int or a NumPy integer scalar (any `numbers.Integral`)
    but not a bool; None for anything else. The one check of every count argument.

    >>> import numpy as np
    >>> whole_number(np.int64(3)), whole_number(3.0), whole_number(np.bool_(True))
    (3, None, None)
    """
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


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
        ValueError: for a number too large for a float (an int, a `np.longdouble`).

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
    inner, number = value, real_number(value)
    if number is None:  # not a plain number: a one-element array or tensor, a Decimal
        item = getattr(value, "item", None)
        convert = item if callable(item) else getattr(value, "__float__", None)
        if convert is None:
            raise TypeError(f"{name} must be a number ({_ALLOWED}); got {_typed(value)}")
        try:
            inner = convert()  # once: a longdouble's item() is the longdouble itself
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise TypeError(
                f"{name} must be a number ({_ALLOWED}); got {_typed(value)}, which does not "
                f"convert to one float: {exc}"
            ) from None
        number = real_number(inner)
        if number is None:  # a complex number, say
            raise TypeError(f"{name} must be a number ({_ALLOWED}); got {_typed(value)}")
    if math.isinf(number) and inner != number:
        raise ValueError(
            f"{name} must be a number a float holds (at most about 1.8e308 in size); got "
            f"{shown(value)}"
        )
    return number


def _typed(value: object) -> str:
    return f"{type(value).__name__} {shown(value)}"


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
