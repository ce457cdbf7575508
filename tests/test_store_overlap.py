"""Overlapped saves: the optimizer-owned tensors are copied while training goes on, and no
checkpoint is ever torn (tensors from two steps)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import haltpoint.checkpointer
from haltpoint import Checkpointer, CheckpointError
from haltpoint.store.overlap import copy_tensor, deferred_copy, optimizer_owned


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 2)
    )


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    torch.manual_seed(seed)
    model(torch.randn(32, 8)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.fixture
def slow_copy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """Holds every overlapped copy back until an optimizer's `step()` is called (or 0.3 s
    when none is), so that training surely runs during it, however loaded the machine."""
    real = haltpoint.checkpointer.deferred_copy
    started: list[float] = []
    stepping = threading.Event()

    def slowed(*args: Any) -> Callable[[], None]:
        run = real(*args)
        stepping.clear()

        def later() -> None:
            started.append(time.monotonic())
            if stepping.wait(timeout=0.3):  # none comes in the tests that change in place
                time.sleep(0.05)  # and the step reaches the gate, which then waits
            run()

        return later

    def before_any_step(*_: Any) -> None:  # global hooks run before the gate's own hook
        stepping.set()

    monkeypatch.setattr(haltpoint.checkpointer, "deferred_copy", slowed)
    handle = register_optimizer_step_pre_hook(before_any_step)
    try:
        yield started
    finally:
        handle.remove()


def _hashes(run: Path, step: int) -> dict[str, str]:
    """Each tensor's xxh3-128, as the checkpoint's manifest records it (of the bytes written)."""
    manifest = json.loads((run / f"step-{step:09d}" / "manifest.json").read_text())
    return {key: record["hash"] for key, record in manifest["tensors"].items()}


def test_training_during_the_overlap_never_tears_the_checkpoint(
    tmp_path: Path, slow_copy: list[float]
) -> None:
    """Each save is compared, tensor by tensor, with a synchronous save of the same state
    made at the same moment; forward (BatchNorm's statistics change), backward and the
    optimizer's step run while the overlapped copy is in flight."""
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    _train_step(model, optimizer, 0)  # AdamW has state now
    keep = {"capture_rng": False, "keep_last": 5}
    overlapped = Checkpointer(tmp_path / "overlap", overlap=True, **keep)
    reference = Checkpointer(tmp_path / "sync", async_save=False, **keep)
    with overlapped, reference:
        for step in range(1, 4):
            state = {"model": model, "optimizer": optimizer, "epoch": step}
            reference.save(step, state)
            overlapped.save(step, state)
            _train_step(model, optimizer, step)  # forward at once; step() waits for the copy
            assert slow_copy  # the copy really was in flight
        overlapped.wait()
        assert overlapped._gate is not None and overlapped._gate.waits == 3
    for step in range(1, 4):
        want, got = _hashes(tmp_path / "sync", step), _hashes(tmp_path / "overlap", step)
        assert want.keys() == got.keys()
        assert [k for k in want if want[k] != got[k]] == []
    assert any("running_mean" in k for k in want)  # a buffer the next forward changes
    assert len({_hashes(tmp_path / "sync", s)["model.0.weight"] for s in (1, 2, 3)}) == 3


def test_a_change_in_place_outside_step_fails_the_save_and_commits_nothing(
    tmp_path: Path, slow_copy: list[float]
) -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Checkpointer(tmp_path / "run", overlap=True) as ckpt:
        ckpt.save(0, {"model": model, "optimizer": optimizer})
        ckpt.wait()
        ckpt.save(1, {"model": model, "optimizer": optimizer})
        with torch.no_grad():
            model[0].weight.mul_(0.5)  # not optimizer.step(): nothing waits for the copy
        with pytest.raises(CheckpointError, match=r"step 1 is not committed: 'model.0.weight'"):
            ckpt.wait()
        assert [info.step for info in ckpt.list()] == [0]
        ckpt.save(2, {"model": model, "optimizer": optimizer})  # the next save works
        ckpt.wait()
        assert [info.step for info in ckpt.list()] == [2]


def test_only_tensors_the_optimizers_own_are_deferred() -> None:
    model = _model()
    for p in model[0].parameters():
        p.requires_grad_(False)  # frozen: not given to the optimizer
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    _train_step(model, optimizer, 0)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for index, values in optimizer.state_dict()["state"].items():
        tensors.update({f"optim.{index}.{k}": v for k, v in values.items()})
    optimizers, later = optimizer_owned({"model": model, "optim": optimizer}, tensors)
    assert optimizers == [optimizer]
    assert "model.0.weight" not in later and "model.1.running_mean" not in later
    assert {"model.1.weight", "model.3.bias", "optim.0.exp_avg", "optim.0.step"} <= later


def test_overlap_needs_an_async_writer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"overlap=True .* needs async_save=True"):
        Checkpointer(tmp_path / "a", overlap=True, async_save=False)
    with pytest.raises(TypeError, match="overlap must be True or False"):
        Checkpointer(tmp_path / "b", overlap="yes")  # type: ignore[arg-type]


def test_a_save_without_optimizers_overlaps_nothing(tmp_path: Path, slow_copy: list[float]) -> None:
    model = _model()
    with Checkpointer(tmp_path / "run", overlap=True) as ckpt:
        ckpt.save(0, {"model": model})
        ckpt.wait()
    assert slow_copy == []  # everything was copied before save returned


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_copied_on_a_side_stream_without_tearing(
    tmp_path: Path, slow_copy: list[float]
) -> None:
    model = _model().cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    x = torch.randn(32, 8, device="cuda")
    for step in range(3):
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        state = {"model": model, "optimizer": optimizer}
        with Checkpointer(tmp_path / f"sync{step}", async_save=False, capture_rng=False) as ref:
            ref.save(step, state)
        with Checkpointer(tmp_path / f"ov{step}", overlap=True, capture_rng=False) as ckpt:
            ckpt.save(step, state)
            model(x).pow(2).mean().backward()  # queued on the current stream meanwhile
            optimizer.step()
            optimizer.zero_grad()
        assert _hashes(tmp_path / f"sync{step}", step) == _hashes(tmp_path / f"ov{step}", step)


@pytest.mark.parametrize(
    "src",
    [
        torch.randn(1000),
        torch.randn(33, 7).to(torch.bfloat16),
        torch.tensor(3, dtype=torch.int64),
        torch.tensor([True, False, True]),
        torch.randn(4, 6).t(),  # not contiguous: torch's own copy
        torch.zeros(0, 3),
    ],
    ids=["float32", "bfloat16", "scalar", "bool", "transposed", "empty"],
)
def test_copy_tensor_copies_every_value(src: torch.Tensor) -> None:
    dst = torch.empty(src.shape, dtype=src.dtype)
    copy_tensor(dst, src)
    assert torch.equal(dst, src)


def test_the_background_copy_of_cpu_tensors_is_a_memcpy_not_tensor_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tensor.copy_ would hand the copy to torch's OpenMP threads, which fight the training
    step's own while it runs."""
    live = {"w": torch.randn(1 << 18), "b": torch.randn(7, 3).to(torch.bfloat16)}
    pairs = {k: (torch.empty_like(t), t) for k, t in live.items()}

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("Tensor.copy_ was called")

    monkeypatch.setattr(torch.Tensor, "copy_", refused)
    deferred_copy(pairs, 0)()
    monkeypatch.undo()
    assert all(torch.equal(buffer, t) for buffer, t in pairs.values())
