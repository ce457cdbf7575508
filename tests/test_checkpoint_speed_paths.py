"""The fast paths of saving and restoring, functionally (no timing): same results every way."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import safetensors
import torch

import haltpoint.store.direct_io as direct_io
from haltpoint import Checkpointer
from haltpoint.errors import CorruptCheckpointError
from haltpoint.store.direct_io import BOUNCE_BYTES
from haltpoint.store.manifest import Manifest
from haltpoint.store.storage import LocalStorage
from haltpoint.store.tensor_reader import read_tensors


def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "big": torch.randn(BOUNCE_BYTES // 4 * 2 + 11),  # several bounce buffers, odd tail
        "strided": torch.randn(64, 32).t(),
        "bf16": torch.randn(1000).bfloat16(),
        "n": torch.tensor(3),
    }


@pytest.mark.parametrize("async_save", [True, False])
def test_async_and_sync_saves_round_trip_exactly(tmp_path: Path, async_save: bool) -> None:
    saved = state()
    with Checkpointer(tmp_path, async_save=async_save, capture_rng=False) as ckpt:
        ckpt.save(0, saved)
        target = {k: torch.zeros_like(v) for k, v in saved.items()}
        ckpt.restore(target)
    for key, value in saved.items():
        assert torch.equal(target[key], value), key
    with safetensors.safe_open(str(tmp_path / "step-000000000" / "tensors.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(saved)


def test_sync_saves_need_no_staging_memory(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, state())
        assert ckpt._staging.nbytes == 0
    with Checkpointer(tmp_path / "async") as ckpt:
        ckpt.save(0, state())
        ckpt.wait()
        assert ckpt._staging.nbytes > 0  # kept for the next save


def test_async_and_sync_files_are_identical(tmp_path: Path) -> None:
    for name, async_save in (("a", True), ("s", False)):
        with Checkpointer(tmp_path / name, async_save=async_save, capture_rng=False) as ckpt:
            ckpt.save(5, state())
    rel = Path("step-000000005") / "tensors.safetensors"
    assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "s" / rel).read_bytes()


def test_read_tensors_into_fills_matching_targets_in_place(tmp_path: Path) -> None:
    saved = state()
    with Checkpointer(tmp_path, capture_rng=False) as ckpt:
        ckpt.save(0, saved)
    manifest = Manifest.decode(
        (tmp_path / "step-000000000" / "manifest.json").read_bytes(), source="t"
    )
    into = {
        "big": torch.zeros_like(saved["big"]),
        "bf16": torch.zeros(1000),  # wrong dtype: a fresh tensor is returned instead
    }
    out = read_tensors(LocalStorage(tmp_path), manifest.tensors, into=into)
    assert out["big"].data_ptr() == into["big"].data_ptr()
    assert torch.equal(into["big"], saved["big"])
    assert out["bf16"].data_ptr() != into["bf16"].data_ptr()
    assert torch.equal(out["bf16"], saved["bf16"]) and not into["bf16"].any()
    assert torch.equal(out["strided"], saved["strided"])


def test_a_background_write_error_is_raised_next_and_staging_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd, data, offset):
        raise OSError(errno.EIO, "Input/output error")  # ENOSPC is translated, see test_space

    with Checkpointer(tmp_path, capture_rng=False) as ckpt:
        monkeypatch.setattr(direct_io.os, "pwrite", full)
        ckpt.save(0, state())
        with pytest.raises(OSError, match="Input/output error"):
            ckpt.wait()
        monkeypatch.undo()
        ckpt.save(1, state())
        assert [i.step for i in ckpt.list()] == [1]
    assert not (tmp_path / "step-000000000" / "tensors.safetensors").exists()


def test_restore_of_large_tensors_refuses_damage_without_touching_the_model(
    tmp_path: Path,
) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(512, 600), torch.nn.Linear(600, 600))
    with Checkpointer(tmp_path, capture_rng=False) as ckpt:
        ckpt.save(0, {"model": model})
    path = tmp_path / "step-000000000" / "tensors.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # inside the last (large) tensor in the file
    path.write_bytes(bytes(data))
    fresh = torch.nn.Sequential(torch.nn.Linear(512, 600), torch.nn.Linear(600, 600))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CorruptCheckpointError, match="hash"):
        Checkpointer(tmp_path, read_only=True).restore({"model": fresh}, which=0)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("map_location", ["cpu", torch.device("cpu"), None])
def test_restore_of_large_tensors_with_map_location(tmp_path: Path, map_location) -> None:
    saved = state()
    with Checkpointer(tmp_path, capture_rng=False) as ckpt:
        ckpt.save(0, saved)
    target = {k: torch.zeros_like(v) for k, v in saved.items()}
    Checkpointer(tmp_path, read_only=True).restore(target, map_location=map_location)
    for key, value in saved.items():
        assert torch.equal(target[key], value), key
        assert target[key].device.type == "cpu"
