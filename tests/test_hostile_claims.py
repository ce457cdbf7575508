"""Crafted run directories whose tensor files claim tensors far larger than the run: a sparse
`tensors.safetensors` whose safetensors header and sealed manifest agree on a tensor of
2 GiB, its hash wrong. `restore` read and hashed every tensor of a checkpoint into fresh
memory before it compared a shape with the live object: a 36 KiB run cost 2 GiB (and
claims of tens of GiB an OOM kill). What it claims is now checked against the live objects
first, and only the entries asked for are read."""

from __future__ import annotations

import copy
import json
import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from crafted import adam, hostile
from haltpoint import Checkpointer
from haltpoint.errors import CheckpointError, CorruptCheckpointError, StateMismatchError
from haltpoint.reader import RunReader
from haltpoint.store import tensor_reader
from haltpoint.store.run_dir import RunDirectory
from haltpoint.store.storage import LocalStorage

CLAIM = 2 << 30  # bytes the crafted tensor claims
_ITEMSIZE = {"F32": 4, "U8": 1, "U32": 4}


def claim(run: Path, key: str, shape: tuple[int, ...], step: int = 1) -> None:
    """Rewrite step `step` so that tensor `key` has `shape`: the file's header and the sealed
    manifest agree on it, its bytes are a hole in a sparse file (no disk used), and its
    hash is the old one (wrong)."""
    folder = run / f"step-{step:09d}"
    body = json.loads((folder / "manifest.json").read_bytes())
    path = folder / "tensors.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    layout, parts, position = {}, [], 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, end = info["data_offsets"]
        if name == key:
            size = _ITEMSIZE[info["dtype"]] * int(torch.Size(shape).numel())
            info = {**info, "shape": list(shape)}
            parts.append(size)  # a hole
        else:
            size = end - begin
            parts.append(data[8 + n + begin : 8 + n + end])
        layout[name] = {**info, "data_offsets": [position, position + size]}
        position += size
    blob = json.dumps(layout, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for part in parts:
            if isinstance(part, int):
                f.seek(part, os.SEEK_CUR)
            else:
                f.write(part)
        f.truncate(f.tell())
    for name, info in layout.items():
        begin, end = info["data_offsets"]
        offset = 8 + len(blob) + begin
        body["tensors"][name].update(offset=offset, nbytes=end - begin, shape=info["shape"])
    (folder / "manifest.json").write_bytes(hostile.seal(body))


def _peak_kib() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))  # type: ignore[union-attr]


@contextmanager
def peak_growth() -> Iterator[list[int]]:
    """The growth of this process's peak resident memory over the block, in bytes (Linux:
    the peak is reset through /proc/self/clear_refs first, which `getrusage` cannot)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _peak_kib()
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to measure peak memory")
    grown: list[int] = []
    yield grown
    grown.append((_peak_kib() - before) * 1024)


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """One checkpoint (step 1) of a model, its Adam state, a tensor and the random state."""
    model, optimizer = adam()
    with Checkpointer(tmp_path / "run", async_save=False) as ckpt:
        ckpt.save(1, {"model": model, "optimizer": optimizer, "ema": torch.zeros(4)})
    return tmp_path / "run"


def _state() -> dict[str, Any]:
    model, optimizer = adam()
    return {"model": model, "optimizer": optimizer, "ema": torch.zeros(4)}


_HUGE_F32 = (2, CLAIM // 8)

CLAIMED = [
    pytest.param(
        "model.weight",
        _HUGE_F32,
        StateMismatchError,
        r"cannot load model\.weight: the model has shape \(2, 3\), the checkpoint \(2, 268435456\)",
        id="a-module-parameter",
    ),
    pytest.param(
        "optimizer.state.0.exp_avg",
        _HUGE_F32,
        StateMismatchError,
        r"the state of parameter 0 holds exp_avg of shape \(2, 268435456\), the parameter has "
        r"shape \(2, 3\)",
        id="an-optimizer-state-of-parameter-shape",
    ),
    pytest.param(
        "ema",
        (CLAIM // 4,),
        StateMismatchError,
        r"cannot load into state\[\"ema\"\]: the state has shape \(4,\) .* the checkpoint shape "
        r"\(536870912,\)",
        id="a-top-level-tensor",
    ),
    pytest.param(
        "__rng__.torch",
        (CLAIM,),
        CorruptCheckpointError,
        r"the random state saved in step 1 \(__rng__\) is damaged: its tensors claim \d+ bytes",
        id="the-random-state",
    ),
]


@pytest.mark.parametrize(("key", "shape", "error", "message"), CLAIMED)
def test_a_claimed_tensor_that_cannot_fit_is_refused_before_it_is_read(
    run: Path, key: str, shape: tuple[int, ...], error: type[CheckpointError], message: str
) -> None:
    """The error a restore gave after reading the 2 GiB (the shape mismatch), or the random
    state's damage, now comes before any of it is read: one line, little memory."""
    claim(run, key, shape)
    assert os.path.getsize(run / "step-000000001" / "tensors.safetensors") > CLAIM
    state = _state()
    before = copy.deepcopy(state["model"].state_dict())
    with peak_growth() as grown, pytest.raises(error, match=message) as refused:
        Checkpointer(run, read_only=True).restore(state)
    assert grown[0] < 200 << 20, f"peak memory grew by {grown[0] >> 20} MiB"
    assert "\n" not in str(refused.value)
    assert str(state["model"].state_dict()) == str(before)  # nothing loaded


def test_an_entry_not_asked_for_is_verified_but_not_read_into_memory(run: Path) -> None:
    """Only the entries of `state` are read into memory; the others' tensors are verified as
    they stream through one buffer (a checkpoint with a damaged tensor is passed over, as
    before): a 2 GiB claim in the optimizer costs a restore of the model alone no memory."""
    claim(run, "optimizer.state.0.exp_avg", _HUGE_F32)
    model = torch.nn.Linear(3, 2)
    with peak_growth() as grown, pytest.raises(CorruptCheckpointError) as refused:
        Checkpointer(run, read_only=True).restore({"model": model})
    assert grown[0] < 200 << 20, f"peak memory grew by {grown[0] >> 20} MiB"
    assert re.search(
        r"tensor 'optimizer\.state\.0\.exp_avg': bytes \d+-\d+ do not match", str(refused.value)
    )
    assert "\n" not in str(refused.value)
    with pytest.raises(StateMismatchError, match="holds exp_avg of shape"):
        Checkpointer(run, read_only=True).restore(_state())  # asked for: refused unread


def test_a_restore_of_some_entries_reads_only_theirs_and_the_random_state(run: Path) -> None:
    reader = RunReader(RunDirectory(LocalStorage(str(run), create=False)), None, "min")
    found = reader.read("latest", state={"model": torch.nn.Linear(3, 2)})
    assert found is not None
    assert sorted(found.tensors) == [
        "__rng__.numpy.state.key",
        "__rng__.torch",
        "model.bias",
        "model.weight",
    ]
    everything = reader.read("latest")
    assert everything is not None and len(everything.tensors) == 11  # all, without a state
    model = torch.nn.Linear(3, 2)
    info = reader.plan(found, {"model": model}, strict=True, device=None, rng=False).load()
    assert info.report is not None and info.report.unexpected == ["ema", "optimizer"]
    assert torch.equal(model.weight, adam()[0].weight)


def test_strict_false_still_refuses_a_claimed_shape_and_reports_missing_names(run: Path) -> None:
    """strict=False keeps its meaning: shapes must match either way; a name the checkpoint
    lacks goes to the report."""
    info = Checkpointer(run, read_only=True).restore(
        {"ema": torch.zeros(4), "scheduler": 1}, strict=False
    )
    assert info is not None and info.report is not None
    assert info.report.missing == ["scheduler"]
    with pytest.raises(StateMismatchError, match="missing from the checkpoint: 'scheduler'"):
        Checkpointer(run, read_only=True).restore({"ema": torch.zeros(4), "scheduler": 1})
    claim(run, "model.weight", _HUGE_F32)
    with pytest.raises(StateMismatchError, match=r"model\.weight"):
        Checkpointer(run, read_only=True).restore({"model": torch.nn.Linear(3, 2)}, strict=False)


@pytest.mark.parametrize("direct", [True, False], ids=["o-direct", "buffered"])
def test_the_entries_not_asked_for_are_hashed_in_chunks_and_their_damage_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """A tensor of several read chunks (16 MiB), at an offset no block boundary holds: intact,
    the model restores; one byte flipped in its second chunk, the checkpoint is passed over
    as damaged, as when every tensor was read into memory."""
    if not direct:
        monkeypatch.setattr(tensor_reader, "_O_DIRECT", 0)
    model = torch.nn.Linear(3, 2)
    big = torch.arange(9 << 20, dtype=torch.float32)  # 36 MiB
    with Checkpointer(tmp_path / "run", keep_last=2, async_save=False, capture_rng=False) as ckpt:
        ckpt.save(1, {"model": model, "big": big})
        ckpt.save(2, {"model": model, "big": big + 1})  # its own bytes, not step 1's
    live = torch.nn.Linear(3, 2)
    assert Checkpointer(tmp_path / "run", read_only=True).restore({"model": live}).step == 2
    assert torch.equal(live.weight, model.weight)
    folder = tmp_path / "run" / "step-000000002"
    record = json.loads((folder / "manifest.json").read_bytes())["tensors"]["big"]
    assert record["offset"] % 4096
    assert record["file"] == "step-000000002/tensors.safetensors"
    with open(folder / "tensors.safetensors", "r+b") as f:
        f.seek(record["offset"] + (20 << 20))
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.warns(UserWarning, match=r"tensor 'big': bytes \d+-\d+ do not match"):
        info = Checkpointer(tmp_path / "run", read_only=True).restore({"model": live})
    assert info is not None and info.step == 1
    with pytest.raises(CorruptCheckpointError, match=r"tensor 'big'"):
        Checkpointer(tmp_path / "run", read_only=True).restore({"model": live}, 2)
