"""Tests of haltpoint.state.rng: capturing and restoring the global random states."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import pytest
import torch

from haltpoint.state.rng import capture_rng, restore_rng
from haltpoint.state.tree import flatten_state, unflatten_state

CUDA_STATE = torch.tensor([7, 0, 0, 0, 0, 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)
"""What `torch.cuda.get_rng_state()` returns: the Philox seed 7 and offset 12 (8 bytes each)."""


def draws() -> tuple[Any, ...]:
    """Draws from every generator, including NumPy's cached Gaussian."""
    return (
        [random.random() for _ in range(3)],
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        np.random.randn(),  # leaves a cached Gaussian in the NumPy state
        torch.rand(3).tolist(),
        torch.randint(0, 1000, (2,)).tolist(),
    )


def through_tree(saved: dict[str, Any]) -> dict[str, Any]:
    flat = flatten_state({"rng": saved})
    tree = json.loads(json.dumps(flat.tree, allow_nan=False))
    return unflatten_state(tree, flat.tensors)["rng"]


def test_restore_repeats_the_draws_made_after_capture() -> None:
    np.random.randn()  # a cached Gaussian at capture time too
    state = capture_rng()
    expected = draws()
    draws()
    restore_rng(state)
    assert draws() == expected


def test_restore_through_flatten_json_unflatten() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draws()
    state = capture_rng()
    expected = draws()
    flat = flatten_state({"rng": state})
    assert sorted(flat.tensors) == ["rng.numpy.state.key", "rng.torch"]
    restored = through_tree(state)
    assert isinstance(restored["numpy"]["state"]["key"], np.ndarray)
    assert restored["numpy"]["state"]["key"].dtype == np.uint32
    assert type(restored["python"]) is tuple
    draws()
    restore_rng(restored)
    assert draws() == expected


def test_capture_does_not_initialize_cuda() -> None:
    initialized = torch.cuda.is_initialized()
    state = capture_rng()
    assert torch.cuda.is_initialized() == initialized
    assert ("cuda" in state) == initialized


def test_restore_accepts_lists_and_tensors_for_python_and_numpy() -> None:
    state = capture_rng()
    expected = draws()
    version, internal, gauss = state["python"]
    state["python"] = [version, list(internal), gauss]
    state["numpy"]["state"]["key"] = torch.from_numpy(state["numpy"]["state"]["key"].copy())
    restore_rng(state)
    assert draws() == expected


def test_restore_accepts_the_legacy_numpy_tuple() -> None:
    state = capture_rng()
    state["numpy"] = np.random.get_state()
    expected = draws()
    restore_rng(through_tree(state))
    assert draws() == expected


def _python(
    version: int = 3, words: list[int] | None = None, pos: int = 624, gauss: Any = None
) -> tuple[Any, ...]:
    """A Python random state with one part replaced."""
    internal = list(random.getstate()[1][:-1]) if words is None else words
    return (version, (*internal, pos), gauss)


def _numpy(**change: Any) -> dict[str, Any]:
    """A NumPy random state (the dict form) with one part replaced."""
    state: dict[str, Any] = np.random.get_state(legacy=False)  # type: ignore[assignment]
    for name in ("key", "pos"):
        if name in change:
            state["state"][name] = change.pop(name)
    return {**state, **change}


def _offset(state: torch.Tensor, offset: int) -> torch.Tensor:
    changed = state.clone()
    changed[8:].view(torch.int64)[0] = offset
    return changed


@pytest.mark.parametrize(
    ("part", "value", "message"),
    [
        ("python", (3, (1, 2), None), r"saved\['python'\] is not a Python random state"),
        ("python", "abc", r"saved\['python'\] is not a Python random state"),
        ("numpy", {"bit_generator": "MT19937"}, r"saved\['numpy'\] is not a NumPy random state"),
        ("numpy", ("PCG64", np.zeros(3)), r"saved\['numpy'\] is not a NumPy random state"),
        ("torch", torch.zeros(3, dtype=torch.int64), r"1-d uint8 tensor, got torch.Tensor"),
        ("torch", [1, 2], r"saved\['torch'\] is not a torch random state"),
        ("cuda", torch.zeros(3), r"saved\['cuda'\] must be a list of per-device states"),
        ("cuda", [torch.zeros(3)], r"saved\['cuda'\] is not a torch random state"),
        ("cuda", [torch.get_rng_state()], r"a CUDA state is 16 bytes .*, got 5056 bytes"),
        ("cuda", [CUDA_STATE[:15]], r"a CUDA state is 16 bytes .*, got 15 bytes"),
        ("cuda", [_offset(CUDA_STATE, 13)], r"an offset that is a multiple of 4"),
        ("python", _python(version=2), r"expected version 3 and 625 ints"),
        ("python", _python(words=[2**40] * 624), r"624 ints in \[0, 2\*\*32\)"),
        ("python", _python(words=[1] * 623), r"expected version 3 and 625 ints"),
        ("python", _python(pos=625), r"position must be an int in \[0, 624\], got 625"),
        ("python", _python(gauss="x"), r"cached Gaussian must be None or a float, got str"),
        ("numpy", _numpy(key=np.zeros(625, np.uint32)), r"shape \(624,\), got \(625,\)"),
        ("numpy", _numpy(key=np.zeros((2, 312), np.uint32)), r"shape \(624,\)"),
        ("numpy", _numpy(key=np.full(624, 0.5)), r"the key must be an integer array"),
        ("numpy", _numpy(key=np.full(624, -1)), r"outside \[0, 2\*\*32\)"),
        ("numpy", _numpy(pos=-1), r"position must be an int in \[0, 624\], got -1"),
        ("numpy", _numpy(pos=100000), r"position must be an int in \[0, 624\]"),
        ("numpy", _numpy(has_gauss=5), r"has_gauss must be 0 or 1"),
        ("numpy", _numpy(bit_generator="PCG64"), r"expected an MT19937 state"),
        ("numpy", (*np.random.get_state()[:2], 625, 0, 0.0), r"position must be an int"),
    ],
)
def test_bad_states_are_refused_before_anything_is_restored(
    part: str, value: Any, message: str
) -> None:
    state = capture_rng()
    state[part] = value
    random.seed(10)
    np.random.seed(10)
    torch.manual_seed(10)
    expected = draws()
    random.seed(10)
    np.random.seed(10)
    torch.manual_seed(10)
    with pytest.raises(ValueError, match=message):
        restore_rng(state)
    assert draws() == expected  # nothing was restored


def test_saved_must_be_a_mapping() -> None:
    with pytest.raises(TypeError, match="saved must be a mapping as returned by capture_rng"):
        restore_rng([1, 2])  # type: ignore[arg-type]


def test_absent_generators_warn_and_are_left_alone() -> None:
    state = capture_rng()
    expected_python = random.random()
    del state["numpy"], state["torch"]
    with pytest.warns(UserWarning, match="no numpy, torch random state"):
        restore_rng(state)
    assert random.random() == expected_python


def test_unknown_parts_warn() -> None:
    state = capture_rng()
    state["mps"] = torch.zeros(1, dtype=torch.uint8)
    with pytest.warns(UserWarning, match=r"ignoring unknown random states \['mps'\]"):
        restore_rng(state)


def test_cuda_state_without_cuda_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    state = capture_rng()
    state["cuda"] = [CUDA_STATE] * 2
    with pytest.warns(UserWarning, match="CUDA random state of 2 device.*CUDA is not available"):
        restore_rng(state)


@pytest.mark.parametrize(("saved_devices", "here", "restored"), [(3, 2, 2), (1, 4, 1), (2, 2, 2)])
def test_cuda_device_count_mismatch_restores_what_matches(
    monkeypatch: pytest.MonkeyPatch, saved_devices: int, here: int, restored: int
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: here)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(device))
    state = capture_rng()
    state["cuda"] = [CUDA_STATE.clone() for _ in range(saved_devices)]
    if saved_devices == here:
        restore_rng(state)
    else:
        with pytest.warns(
            UserWarning,
            match=f"{saved_devices} device.*this machine has {here}; restored devices 0 to "
            f"{restored - 1} only",
        ):
            restore_rng(state)
    assert calls == list(range(restored))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_round_trip() -> None:
    torch.cuda.init()
    state = capture_rng()
    assert len(state["cuda"]) == torch.cuda.device_count()
    expected = torch.rand(4, device="cuda").tolist()
    restored = through_tree(state)
    restore_rng(restored)
    assert torch.rand(4, device="cuda").tolist() == expected


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rng_tensors_moved_to_cuda_still_restore() -> None:
    torch.cuda.init()
    state = capture_rng()
    expected = draws()
    flat = flatten_state({"rng": state})
    tensors = {k: t.to("cuda") for k, t in flat.tensors.items()}  # what map_location does
    restore_rng(unflatten_state(flat.tree, tensors)["rng"])
    assert draws() == expected
