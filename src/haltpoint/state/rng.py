"""Capture and restore the random-number state of Python, NumPy, torch CPU and CUDA.

The captured value is a plain dict (tuples, ints, a numpy array, tensors) that
`flatten_state` stores like any other value::

    {"python": (3, (... 625 ints ...), None),
     "numpy": {"bit_generator": "MT19937", "state": {"key": uint32 array, "pos": 624}, ...},
     "torch": uint8 tensor,
     "cuda": [uint8 tensor per device]}      # only if CUDA was initialized
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from haltpoint.state._common import type_name

__all__ = ["RNG_KEY", "capture_rng", "plan_rng", "restore_rng"]

RNG_KEY = "rng"
"""The conventional state name of the captured random state (informational)."""
_GENERATORS = ("python", "numpy", "torch")


def capture_rng() -> dict[str, Any]:
    """Capture the global random states: Python, NumPy, torch CPU, and each CUDA device.

    CUDA is captured only if it is already initialized, so capturing never starts it.

    >>> state = capture_rng()
    >>> sorted(state)[:3]
    ['numpy', 'python', 'torch']
    """
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(saved: Mapping[str, Any]) -> None:
    """Restore the random states captured by `capture_rng`.

    Every part is checked before any is restored. A generator absent from ``saved`` is left
    alone with a warning. CUDA states are restored for the devices both sides have; when
    the device counts differ, or CUDA is unavailable, that is a warning.

    Raises:
        TypeError: ``saved`` is not a mapping.
        ValueError: a part of ``saved`` is not a random state of its generator.

    >>> state = capture_rng()
    >>> first = (random.random(), np.random.rand(), torch.rand(1).item())
    >>> restore_rng(state)
    >>> first == (random.random(), np.random.rand(), torch.rand(1).item())
    True
    """
    plan_rng(saved)()


def plan_rng(saved: Mapping[str, Any]) -> Callable[[], None]:
    """Every check (and warning) of `restore_rng` now; the result restores the states.

    For a restore that must know a random state is good before it loads anything else.
    """
    if not isinstance(saved, Mapping):
        raise TypeError(
            f"saved must be a mapping as returned by capture_rng, got {type_name(saved)}"
        )
    unknown = sorted(str(k) for k in saved if k not in (*_GENERATORS, "cuda"))
    if unknown:
        warnings.warn(
            f"haltpoint: ignoring unknown random states {unknown} (saved by a newer version?)",
            stacklevel=3,
        )
    absent = [name for name in _GENERATORS if name not in saved]
    if absent:
        warnings.warn(
            f"haltpoint: the checkpoint has no {', '.join(absent)} random state; "
            "that generator continues from its current state",
            stacklevel=3,
        )
    python = _python_state(saved["python"]) if "python" in saved else None
    numpy = _numpy_state(saved["numpy"]) if "numpy" in saved else None
    cpu = _byte_tensor(saved["torch"], "torch") if "torch" in saved else None
    cuda = _cuda_states(saved["cuda"]) if "cuda" in saved else None

    def apply() -> None:
        if python is not None:
            random.setstate(python)
        if numpy is not None:
            np.random.set_state(numpy)
        if cpu is not None:
            torch.set_rng_state(cpu)
        if cuda is not None:
            _restore_cuda(cuda)

    return apply


def _python_state(value: Any) -> tuple[Any, ...]:
    try:
        version, internal, gauss = value
        state = (int(version), tuple(int(x) for x in internal), gauss)
        # Validate on a throwaway generator, so that nothing is restored from a bad state.
        random.Random().setstate(state)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"saved['python'] is not a Python random state: {exc}") from None
    return state


def _numpy_state(value: Any) -> Any:
    try:
        if isinstance(value, Mapping):
            inner = dict(value["state"])
            inner["key"] = _as_array(inner["key"])
            state: Any = {**value, "state": inner}
        else:
            name, key, *rest = value
            state = (name, _as_array(key), *rest)
        np.random.RandomState().set_state(state)
    except (TypeError, ValueError, KeyError, IndexError, OverflowError) as exc:
        raise ValueError(f"saved['numpy'] is not a NumPy random state: {exc}") from None
    return state


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.uint32)


def _byte_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise ValueError(
            f"saved[{name!r}] is not a torch random state: expected a 1-d uint8 tensor, got "
            f"{type_name(value)} {getattr(value, 'dtype', '')}".rstrip()
        )
    value = value.detach().cpu().contiguous()
    if name == "torch":
        try:  # on a throwaway generator, so that nothing is restored from a bad state
            torch.Generator().set_state(value)
        except RuntimeError as exc:
            raise ValueError(f"saved['torch'] is not a torch random state: {exc}") from None
    return value


def _cuda_states(value: Any) -> list[torch.Tensor]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"saved['cuda'] must be a list of per-device states, got {type(value)}")
    return [_byte_tensor(v, "cuda") for v in value]


def _restore_cuda(states: list[torch.Tensor]) -> None:
    if not states:
        return
    if not torch.cuda.is_available():
        warnings.warn(
            f"haltpoint: the checkpoint has the CUDA random state of {len(states)} device(s) but "
            "CUDA is not available here; it was not restored",
            stacklevel=3,
        )
        return
    count = torch.cuda.device_count()
    for device, state in enumerate(states[:count]):
        torch.cuda.set_rng_state(state, device)
    if count != len(states):
        warnings.warn(
            f"haltpoint: the checkpoint has the CUDA random state of {len(states)} device(s), "
            f"this machine has {count}; restored devices 0 to {min(count, len(states)) - 1} only",
            stacklevel=3,
        )
