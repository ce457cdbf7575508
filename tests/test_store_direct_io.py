"""O_DIRECT aligned writes: exact bytes and lengths, a deliberate buffered fallback, errors."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import safetensors
import safetensors.torch
import torch

import haltpoint.store.direct_io as direct_io
from haltpoint.store.direct_io import ALIGN, BOUNCE_BYTES, AlignedFileWriter
from haltpoint.store.hashing import hash_bytes
from haltpoint.store.storage import LocalStorage, open_storage
from haltpoint.store.tensor_writer import write_tensor_file

O_DIRECT = getattr(os, "O_DIRECT", 0)
pytestmark = pytest.mark.skipif(not O_DIRECT, reason="O_DIRECT is Linux-only")


def random_bytes(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


SIZES = [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, BOUNCE_BYTES - 3, BOUNCE_BYTES, 2 * BOUNCE_BYTES + 5]


@pytest.mark.parametrize("size", SIZES)
def test_file_has_exactly_the_bytes_written(tmp_path: Path, size: int) -> None:
    data = random_bytes(size)
    path = tmp_path / "f.bin"
    with AlignedFileWriter(str(path)) as w:
        w.write(data[: size // 3])  # several writes, not aligned to anything
        w.write(data[size // 3 :])
    assert path.read_bytes() == data.numpy().tobytes()


def test_o_direct_is_used_where_the_file_system_allows_it(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | O_DIRECT))
    except OSError:
        pytest.skip("this file system refuses O_DIRECT")
    with AlignedFileWriter(str(tmp_path / "f.bin")) as w:
        w.write(random_bytes(ALIGN * 3 + 17))
    assert w.direct


def refuse_direct_open(monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def fake_open(path, flags, *args):
        if flags & O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument (as on tmpfs)")
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_io.os, "open", fake_open)


def refuse_direct_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    real_pwrite = os.pwrite

    def fake_pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(direct_io.os, "pwrite", fake_pwrite)


@pytest.mark.parametrize("refuse", [refuse_direct_open, refuse_direct_writes])
@pytest.mark.parametrize("size", [ALIGN + 1, BOUNCE_BYTES + 100])
def test_fallback_when_o_direct_is_refused_writes_an_identical_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refuse, size: int
) -> None:
    data = random_bytes(size, seed=1)
    with AlignedFileWriter(str(tmp_path / "direct.bin")) as w:
        w.write(data)
    refuse(monkeypatch)
    with AlignedFileWriter(str(tmp_path / "fallback.bin")) as w:
        w.write(data)
    assert not w.direct
    assert (tmp_path / "fallback.bin").read_bytes() == (tmp_path / "direct.bin").read_bytes()


def test_both_io_threads_refused_at_once_fall_back_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second thread's refusal arrives after the first has switched to buffered writes."""
    probe = tmp_path / "probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | O_DIRECT))
    except OSError:
        pytest.skip("this file system refuses O_DIRECT")
    real_pwrite = os.pwrite
    both = threading.Barrier(2, timeout=10)
    calls: list[int] = []

    def refuse_both(fd: int, data: Any, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT:
            calls.append(offset)
            late = len(calls) == 2
            both.wait()  # both writes are in flight, under O_DIRECT
            if late:
                time.sleep(0.2)  # the other thread switches the file to buffered meanwhile
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    data = random_bytes(BOUNCE_BYTES + 100, seed=2)
    monkeypatch.setattr(direct_io.os, "pwrite", refuse_both)
    with AlignedFileWriter(str(tmp_path / "f.bin")) as w:
        w.write(data)
    assert len(calls) == 2 and not w.direct
    assert (tmp_path / "f.bin").read_bytes() == data.numpy().tobytes()


def sample_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "big": torch.randn(BOUNCE_BYTES // 4 + 3),
        "half": torch.randn(33, 7).half(),
        "ids": torch.arange(5, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
    }


@pytest.mark.parametrize("fallback", [False, True])
def test_tensor_file_is_safetensors_with_matching_hashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fallback: bool
) -> None:
    if fallback:
        refuse_direct_open(monkeypatch)
    tensors = sample_tensors()
    records = write_tensor_file(LocalStorage(tmp_path), "t.safetensors", tensors)
    reference = tmp_path / "reference.safetensors"
    safetensors.torch.save_file(tensors, str(reference))
    data = (tmp_path / "t.safetensors").read_bytes()
    assert data == reference.read_bytes()  # exactly the right size and bytes
    with safetensors.safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        for key, tensor in tensors.items():
            assert torch.equal(f.get_tensor(key), tensor)
    for record in records.values():
        assert hash_bytes(data[record.offset : record.offset + record.nbytes]) == record.hash


def test_known_hashes_are_not_recomputed(tmp_path: Path) -> None:
    tensors = {"w": torch.ones(4)}
    records = write_tensor_file(
        LocalStorage(tmp_path), "t.safetensors", tensors, hashes={"w": "ab" * 16}
    )
    assert records["w"].hash == "ab" * 16


def test_memory_storage_gets_the_same_bytes() -> None:
    tensors = sample_tensors()
    storage = open_storage("memory://haltpoint-direct-io-test")
    write_tensor_file(storage, "t.safetensors", tensors)
    assert storage.read_bytes("t.safetensors") == safetensors.torch.save(tensors)


def test_a_write_error_is_raised_and_the_file_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_io.os, "pwrite", full)
    with pytest.raises(OSError, match="No space left"):
        write_tensor_file(LocalStorage(tmp_path), "t.safetensors", sample_tensors())
    assert not (tmp_path / "t.safetensors").exists()


def test_an_error_on_the_calling_side_removes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    with (
        pytest.raises(ValueError, match="flat, contiguous uint8"),
        AlignedFileWriter(str(path)) as w,
    ):
        w.write(torch.zeros(3))
    assert not path.exists()


def test_memory_aligned_like_the_file_is_written_without_a_copy(tmp_path: Path) -> None:
    region = torch.empty(3 * BOUNCE_BYTES + 2 * ALIGN, dtype=torch.uint8)
    start = -region.data_ptr() % ALIGN
    head = random_bytes(ALIGN + 100, seed=1)
    body = region[start + ALIGN + 100 : start + 2 * BOUNCE_BYTES + 333]  # same page offset
    body.copy_(random_bytes(body.numel(), seed=2))
    path = tmp_path / "f.bin"
    with AlignedFileWriter(str(path)) as w:
        w.write(head)
        w.write(body)
    if not w.direct:
        pytest.skip("this file system refuses O_DIRECT")
    assert w.zero_copy_bytes >= 2 * BOUNCE_BYTES - 2 * ALIGN
    assert path.read_bytes() == head.numpy().tobytes() + body.numpy().tobytes()


def test_memory_aligned_unlike_the_file_is_copied(tmp_path: Path) -> None:
    region = torch.empty(BOUNCE_BYTES + 2 * ALIGN, dtype=torch.uint8)
    start = -region.data_ptr() % ALIGN
    body = region[start + 8 : start + 8 + BOUNCE_BYTES]  # page offset 8, file offset 0
    body.copy_(random_bytes(body.numel(), seed=3))
    path = tmp_path / "f.bin"
    with AlignedFileWriter(str(path)) as w:
        w.write(body)
    assert w.zero_copy_bytes == 0
    assert path.read_bytes() == body.numpy().tobytes()


def test_staged_pool_is_written_straight_and_identical_to_safetensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from haltpoint.store.staging import StagingPool

    writers: list[AlignedFileWriter] = []
    real_init = AlignedFileWriter.__init__

    def spy(self: AlignedFileWriter, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]
        writers.append(self)

    monkeypatch.setattr(AlignedFileWriter, "__init__", spy)
    torch.manual_seed(0)
    tensors = {
        "a": torch.randn(BOUNCE_BYTES // 4 + 17),
        "b": torch.randn(3, 5).bfloat16(),
        "c": torch.randn(BOUNCE_BYTES // 8 + 1, dtype=torch.float64),
    }
    pool = StagingPool()
    staged = pool.stage(tensors)
    write_tensor_file(LocalStorage(tmp_path), "x.safetensors", staged)
    pool.release()
    if not writers[0].direct:
        pytest.skip("this file system refuses O_DIRECT")
    assert writers[0].zero_copy_bytes > BOUNCE_BYTES  # the big tensors went without a copy
    safetensors.torch.save_file(tensors, str(tmp_path / "ref.safetensors"))
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
