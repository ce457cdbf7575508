"""Helpers shared by the state modules: paths in the state, type names, stateful objects."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["child_path", "is_stateful", "short_repr", "type_name", "unwrap_module"]

_MAX_REPR = 60


def child_path(path: str, key: Any) -> str:
    """Return the Python subscript path of ``key`` inside the value at ``path``.

    >>> child_path(child_path('state["optimizer"]', "param_groups"), 0)
    'state["optimizer"]["param_groups"][0]'
    """
    if isinstance(key, str):
        text = '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
    elif type(key) is int or type(key) is bool:
        text = repr(key)
    else:
        text = repr(key)
        if len(text) > _MAX_REPR:
            text = text[: _MAX_REPR - 3] + "..."
    return f"{path}[{text}]"


def short_repr(value: Any, limit: int = _MAX_REPR) -> str:
    """``repr(value)``, cut to ``limit`` characters; a value holding an int too long to print
    (more than 4,300 digits, which a checkpoint's tagged int may hold: repr raises
    ValueError) is named by its type.

    >>> short_repr((0.9, 10**5000)), short_repr("x" * 100, 10)
    ('<a tuple holding an int too long to print>', "'xxxxxx...")
    >>> short_repr(2**20000)
    '<an int of 20001 bits, too long to print>'
    """
    try:
        text = repr(value)
    except ValueError:
        if isinstance(value, int):
            return f"<an int of {value.bit_length()} bits, too long to print>"
        return f"<a {type_name(value)} holding an int too long to print>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def type_name(value: Any) -> str:
    """Return the qualified name of ``type(value)``; builtins go without their module.

    >>> type_name(3), type_name(nn.Linear(1, 1))
    ('int', 'torch.nn.modules.linear.Linear')
    """
    cls = type(value)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def is_stateful(value: Any) -> bool:
    """Whether ``value`` is an object with callable ``state_dict()`` and ``load_state_dict()``.

    >>> is_stateful(nn.Linear(1, 1)), is_stateful({"a": 1}), is_stateful(nn.Linear)
    (True, False, False)
    """
    if isinstance(value, type):
        return False
    return callable(getattr(value, "state_dict", None)) and callable(
        getattr(value, "load_state_dict", None)
    )


def unwrap_module(module: nn.Module) -> nn.Module:
    """Strip ``DistributedDataParallel``/``DataParallel`` and ``torch.compile`` wrappers.

    Their ``state_dict()`` keys carry ``module.`` / ``_orig_mod.`` prefixes; the wrapped
    module's keys are clean.

    >>> model = nn.Linear(2, 2)
    >>> unwrap_module(nn.DataParallel(model)) is model
    True
    """
    while True:
        if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            module = module.module
        elif type(module).__name__ == "OptimizedModule" and isinstance(
            getattr(module, "_orig_mod", None), nn.Module
        ):
            module = getattr(module, "_orig_mod")  # noqa: B009 (typed as Tensor | Module)
        else:
            return module
