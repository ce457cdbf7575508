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


_MT_WORDS = 624  # the Mersenne Twister state of Python and NumPy: 624 32-bit words
_CUDA_STATE_BYTES = (16, 8)  # a Philox seed and offset (8 bytes: the seed alone, older torch)


def _python_state(value: Any) -> tuple[Any, ...]:
    try:
        version, internal, gauss = value
        words = tuple(internal)
        if version != 3 or len(words) != _MT_WORDS + 1:
            raise ValueError(f"expected version 3 and {_MT_WORDS + 1} ints")
        _check_words(words[:-1], words[-1])
        if gauss is not None and type(gauss) is not float:
            raise ValueError(f"the cached Gaussian must be None or a float, got {type_name(gauss)}")
        state = (3, words, gauss)
        # Validate on a throwaway generator, so that nothing is restored from a bad state.
        random.Random().setstate(state)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"saved['python'] is not a Python random state: {exc}") from None
    return state


def _numpy_state(value: Any) -> Any:
    try:
        if isinstance(value, Mapping):
            if value.get("bit_generator") != "MT19937" or set(value) - _NUMPY_FIELDS:
                raise ValueError(
                    f"expected an MT19937 state with the fields {sorted(_NUMPY_FIELDS)}"
                )
            inner = dict(value["state"])
            inner["key"] = _key_array(inner["key"])
            _check_words(inner["key"], inner["pos"])
            _check_gauss(value.get("has_gauss", 0), value.get("gauss", 0.0))
            state: Any = {**value, "state": inner}
        else:
            name, key, pos, has_gauss, gauss = value
            if name != "MT19937":
                raise ValueError(f"expected an MT19937 state, got {name!r}"[:80])
            state = (name, _key_array(key), pos, has_gauss, gauss)
            _check_words(state[1], pos)
            _check_gauss(has_gauss, gauss)
        np.random.RandomState().set_state(state)
    except (TypeError, ValueError, KeyError, IndexError, OverflowError) as exc:
        raise ValueError(f"saved['numpy'] is not a NumPy random state: {exc}") from None
    return state


_NUMPY_FIELDS = frozenset({"bit_generator", "state", "has_gauss", "gauss"})


def _key_array(value: Any) -> np.ndarray:
    """The 624 words of a NumPy MT19937 key as uint32, from an integer array (or tensor)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iu":
        raise ValueError(f"the key must be an integer array, got {type_name(value)}")
    if value.shape != (_MT_WORDS,):
        raise ValueError(f"the key must have shape ({_MT_WORDS},), got {value.shape}")
    if int(value.min()) < 0 or int(value.max()) >= 2**32:
        raise ValueError("the key holds values outside [0, 2**32)")
    return value.astype(np.uint32)


def _check_words(words: Any, pos: Any) -> None:
    """624 ints in [0, 2**32) and a position in [0, 624]: what both Mersenne Twisters hold
    (a NumPy key array is checked by `_key_array`)."""
    if not isinstance(words, np.ndarray) and not all(
        type(w) is int and 0 <= w < 2**32 for w in words
    ):
        raise ValueError(f"expected {_MT_WORDS} ints in [0, 2**32)")
    if not isinstance(pos, (int, np.integer)) or isinstance(pos, bool) or not 0 <= pos <= _MT_WORDS:
        raise ValueError(f"the position must be an int in [0, {_MT_WORDS}], got {pos!r}"[:80])


def _check_gauss(has_gauss: Any, gauss: Any) -> None:
    if type(has_gauss) is not int or has_gauss not in (0, 1) or type(gauss) is not float:
        raise ValueError("has_gauss must be 0 or 1 and gauss a float")


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
    elif len(value) not in _CUDA_STATE_BYTES or (
        len(value) == 16 and int(value[8:].view(torch.int64).item()) % 4
    ):
        raise ValueError(
            f"saved[{name!r}] is not a torch random state: a CUDA state is 16 bytes (a seed and "
            f"an offset that is a multiple of 4), got {len(value)} bytes"
        )
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
