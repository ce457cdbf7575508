"""Dedup: unchanged tensors are referenced, not written; kept files live exactly as long as
some kept manifest references them."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import safetensors
import torch

from haltpoint import Checkpointer, StepBehindError
from haltpoint.store.dedup import MIN_DEDUP_BYTES, ReferenceCheck, hash_tensor, plan_dedup
from haltpoint.store.manifest import Manifest
from haltpoint.store.storage import FsspecStorage, LocalStorage
from haltpoint.store.tensor_file import TensorRecord, dtype_code
from haltpoint.store.tensor_writer import write_tensor_file

BIG = MIN_DEDUP_BYTES // 4  # float32 elements in a tensor large enough to be deduplicated


def manifest_of(tensors: dict[str, torch.Tensor], file: str = "step-000000000/t") -> Manifest:
    records = {
        k: TensorRecord(file, dtype_code(t.dtype), tuple(t.shape), 8, t.nbytes, hash_tensor(t))
        for k, t in tensors.items()
    }
    return Manifest(step=0, time=0.0, metrics={}, tree={}, tensors=records, versions={})


@pytest.mark.parametrize(
    ("now", "changed"),
    [
        ({"w": torch.ones(BIG)}, []),  # same bytes, dtype and shape: referenced
        ({"w": torch.ones(BIG) * 2}, ["w"]),  # new bytes
        ({"w": torch.ones(BIG, dtype=torch.int32)}, ["w"]),  # same size, other dtype
        ({"w": torch.ones(BIG // 2, 2)}, ["w"]),  # same bytes, other shape
        ({"v": torch.ones(BIG)}, ["v"]),  # a new key
        ({"w": torch.ones(BIG), "s": torch.ones(3)}, ["s"]),  # small ones are always written
    ],
)
def test_plan_dedup_table(now: dict[str, torch.Tensor], changed: list[str]) -> None:
    previous = manifest_of({"w": torch.ones(BIG), "s": torch.ones(3)})
    plan = plan_dedup(now, previous)
    assert plan.changed == changed
    assert sorted(plan.reused) == sorted(set(now) - set(changed))
    for key, record in plan.reused.items():
        assert record == previous.tensors[key]


def test_no_previous_manifest_writes_everything_and_hashes_nothing_up_front() -> None:
    plan = plan_dedup({"w": torch.ones(BIG)}, None)
    assert plan.changed == ["w"] and plan.hashes == {} and plan.reused_nbytes == 0


def test_a_missing_or_short_file_is_not_referenced(tmp_path: Path) -> None:
    previous = manifest_of({"w": torch.ones(BIG)}, file="gone.safetensors")
    with pytest.warns(UserWarning, match="gone.safetensors: the bytes of 'w' are missing"):
        plan = plan_dedup({"w": torch.ones(BIG)}, previous, ReferenceCheck(LocalStorage(tmp_path)))
    assert plan.changed == ["w"]
    (tmp_path / "gone.safetensors").write_bytes(b"short")
    with pytest.warns(UserWarning, match="do not match the hash"):
        check = ReferenceCheck(LocalStorage(tmp_path))
        assert plan_dedup({"w": torch.ones(BIG)}, previous, check).changed == ["w"]


def test_the_check_reads_each_range_once_until_the_file_changes(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    w = torch.randn(BIG)
    records = write_tensor_file(storage, "a.safetensors", {"w": w})
    previous = Manifest(step=0, time=0.0, metrics={}, tree={}, tensors=records, versions={})
    check = ReferenceCheck(storage)
    for _ in range(3):
        assert plan_dedup({"w": w}, previous, check).reused == records
    assert check.bytes_read == w.nbytes  # read back once, not once per save
    path = tmp_path / "a.safetensors"
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 10**9))  # touched: read again
    assert plan_dedup({"w": w}, previous, check).reused == records
    assert check.bytes_read == 2 * w.nbytes


def test_rotten_bytes_are_written_afresh_and_the_rotten_file_is_kept(tmp_path: Path) -> None:
    backbone, head = torch.randn(BIG), torch.randn(BIG)
    rotten = tmp_path / "step-000000000" / "tensors.safetensors"
    with Checkpointer(tmp_path, keep_last=10, capture_rng=False, async_save=False) as ckpt:
        ckpt.save(0, {"backbone": backbone, "head": head})
    flip_byte(rotten, read_manifest(tmp_path, 0).tensors["backbone"].offset + 8)
    damaged = rotten.read_bytes()
    with Checkpointer(tmp_path, keep_last=10, capture_rng=False, async_save=False) as ckpt:
        with pytest.warns(UserWarning, match="'backbone' are missing or do not match") as seen:
            for step in (1, 2, 3):
                head.add_(1.0)
                ckpt.save(step, {"backbone": backbone, "head": head})
        assert sum("do not match" in str(w.message) for w in seen) == 1  # warned once
        for step in (1, 2, 3):
            state = {"backbone": torch.zeros(BIG), "head": torch.zeros(BIG)}
            ckpt.restore(state, step)
            assert torch.equal(state["backbone"], backbone)
    step1 = read_manifest(tmp_path, 1)
    assert step1.tensors["backbone"].file == "step-000000001/tensors.safetensors"
    assert read_manifest(tmp_path, 3).tensors["backbone"].file == step1.tensors["backbone"].file
    assert rotten.read_bytes() == damaged  # never overwritten: evidence, and step 0 uses it


def test_rotten_bytes_on_object_storage_are_written_afresh() -> None:
    url = f"memory://dedup-rot-{uuid.uuid4().hex}/run"
    backbone = torch.randn(BIG)
    options = {"keep_last": 10, "capture_rng": False, "async_save": False}
    with Checkpointer(url, **options) as ckpt:
        ckpt.save(0, {"backbone": backbone})
    storage = FsspecStorage(url)
    rel = "step-000000000/tensors.safetensors"
    data = bytearray(storage.read_bytes(rel))
    data[-1] ^= 1
    storage.publish(rel, bytes(data))
    with Checkpointer(url, **options) as ckpt, pytest.warns(UserWarning, match="do not match"):
        ckpt.save(1, {"backbone": backbone})
    manifest = Manifest.decode(storage.read_bytes("step-000000001/manifest.json"), source="t")
    assert manifest.tensors["backbone"].file == "step-000000001/tensors.safetensors"
    assert storage.read_bytes(rel) == bytes(data)
    storage.rmtree("")


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def read_manifest(run: Path, step: int) -> Manifest:
    return Manifest.decode((run / f"step-{step:09d}" / "manifest.json").read_bytes(), source="t")


def files_in(folder: Path) -> dict[str, list[str]]:
    """Tensor names per safetensors file in a checkpoint folder."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safetensors.safe_open(str(path), "pt") as f:
            out[path.name] = sorted(f.keys())
    return out


def test_only_changed_tensors_are_written_and_restore_is_exact(tmp_path: Path) -> None:
    backbone = torch.randn(BIG)
    head = torch.randn(BIG)
    expected = []
    with Checkpointer(tmp_path, keep_last=3, capture_rng=False) as ckpt:
        for step in range(3):
            head.add_(1.0)
            ckpt.save(step, {"backbone": backbone, "head": head})
            expected.append(head.clone())
        ckpt.wait()
        first = files_in(tmp_path / "step-000000000")
        assert first == {"tensors.safetensors": ["backbone", "head"]}
        for step in (1, 2):
            assert files_in(tmp_path / f"step-00000000{step}") == {"tensors.safetensors": ["head"]}
            manifest = Manifest.decode(
                (tmp_path / f"step-00000000{step}" / "manifest.json").read_bytes(), source="t"
            )
            assert manifest.tensors["backbone"].file == "step-000000000/tensors.safetensors"
        for step in range(3):
            state = {"backbone": torch.zeros(BIG), "head": torch.zeros(BIG)}
            ckpt.restore(state, step)
            assert torch.equal(state["backbone"], backbone)
            assert torch.equal(state["head"], expected[step])


def test_frozen_backbone_file_lives_while_referenced_then_is_collected(tmp_path: Path) -> None:
    backbone, head = torch.randn(BIG), torch.randn(BIG)
    first = tmp_path / "step-000000000" / "tensors.safetensors"
    with Checkpointer(tmp_path, keep_last=2) as ckpt:
        for step in range(8):
            head.add_(1.0)
            ckpt.save(step, {"backbone": backbone, "head": head})
        ckpt.wait()
        assert [i.step for i in ckpt.list()] == [6, 7]
        assert first.exists()  # step 0 is dropped, but its backbone bytes are referenced
        assert not (tmp_path / "step-000000000" / "manifest.json").exists()
        assert not (tmp_path / "step-000000003").exists()
        state = {"backbone": torch.zeros(BIG), "head": torch.zeros(BIG)}
        ckpt.restore(state)
        assert torch.equal(state["backbone"], backbone) and torch.equal(state["head"], head)

        backbone.add_(1.0)  # unfreeze: the old bytes stop being referenced
        head.add_(1.0)
        for step in (8, 9):
            ckpt.save(step, {"backbone": backbone, "head": head})
        ckpt.wait()
    assert not (tmp_path / "step-000000000").exists()
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000000008", "step-000000009"]
    with Checkpointer(tmp_path, read_only=True) as reader:
        state = {"backbone": torch.zeros(BIG), "head": torch.zeros(BIG)}
        assert reader.restore(state).step == 9
        assert torch.equal(state["backbone"], backbone)


def test_saving_a_step_again_never_overwrites_a_referenced_file(tmp_path: Path) -> None:
    backbone, head = torch.randn(BIG), torch.randn(BIG)
    with Checkpointer(tmp_path, keep_last=2, capture_rng=False) as ckpt:
        for step in range(4):
            head.add_(1.0)
            ckpt.save(step, {"backbone": backbone, "head": head})
        ckpt.wait()
        with pytest.raises(StepBehindError):  # step 0 again: refused, nothing written
            ckpt.save(0, {"backbone": torch.zeros(BIG), "head": torch.zeros(BIG)})
        ckpt.wait()
        state = {"backbone": torch.zeros(BIG), "head": torch.zeros(BIG)}
        ckpt.restore(state, 3)
    assert torch.equal(state["backbone"], backbone) and torch.equal(state["head"], head)


@pytest.mark.parametrize(
    "error",
    [PermissionError(13, "Permission denied"), OSError(5, "Input/output error")],
    ids=["EACCES", "EIO"],
)
def test_a_file_that_cannot_be_read_back_is_not_referenced_and_the_save_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError
) -> None:
    """The read-back raised `UnreadableCheckpointError` out of `save` (EACCES), or warned of
    bit rot (EIO): the tensor is written afresh, with a warning that says why."""
    storage = LocalStorage(tmp_path)
    w = torch.randn(BIG)
    records = write_tensor_file(storage, "a.safetensors", {"w": w})
    previous = Manifest(step=0, time=0.0, metrics={}, tree={}, tensors=records, versions={})
    real_open = os.open

    def failing(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(path).endswith("a.safetensors"):
            raise type(error)(error.errno, error.strerror, str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing)
    said = rf"cannot read .*a.safetensors: .*{error.strerror}.*not damage.*written afresh"
    with pytest.warns(UserWarning, match=said) as seen:
        plan = plan_dedup({"w": w}, previous, ReferenceCheck(storage))
    assert plan.changed == ["w"] and plan.reused == {}
    assert not any("do not match" in str(w.message) for w in seen)
