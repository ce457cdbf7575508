"""A crafted sharded checkpoint runs no code: DCP's pickles are checked before DCP reads them.

Everything here runs in one process (DCP saves and loads without a process group).
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from haltpoint import Checkpointer, CorruptCheckpointError, ShardedState
from haltpoint.cli import main
from haltpoint.store.run_dir import SHARDED_KEY
from haltpoint.store.storage import open_storage

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


class Payload:
    """Unpickling it creates `marker`: the proof that a pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def _sharded_run(run_dir: Path, steps: tuple[int, ...]) -> ShardedState:
    """A run whose checkpoints hold `train` (a model and its AdamW) as DCP state, as
    `Checkpointer.save` writes it under a process group."""
    from haltpoint.distributed.sharded import write_shards

    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.25)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    train = ShardedState(model, optimizer)
    with Checkpointer(run_dir, keep_last=len(steps), async_save=False, capture_rng=False) as ckpt:
        for step in steps:
            folder = f"step-{step:09d}/dcp"
            storage = open_storage(run_dir)
            files = write_shards(storage, folder, {"train": train.state_dict()}, rank=0)
            record = {"world_size": 1, "entries": ["train"], "files": files}
            ckpt._save(step, {"epoch": step}, None, False, lambda r=record: {SHARDED_KEY: r})
    return train


def _replace(run_dir: Path, step: int, name: str, data: bytes) -> None:
    """Write `data` as DCP file `name` of `step`, with a manifest whose records match it
    (and whose own checksum is valid: xxh3 is no signature)."""
    from haltpoint.store.hashing import StreamHasher
    from haltpoint.store.run_dir import RunDirectory

    dirname = f"step-{step:09d}"
    (run_dir / dirname / "dcp" / name).write_bytes(data)
    run = RunDirectory(open_storage(run_dir))
    manifest = run.read_manifest(dirname)
    hasher = StreamHasher()
    hasher.update(data)
    record = {"size": len(data), "xxh3_128": hasher.hexdigest()}
    manifest.extra[SHARDED_KEY]["files"][name] = record
    run.commit(manifest)


def _fresh() -> dict[str, Any]:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    return {"train": ShardedState(model, torch.optim.AdamW(model.parameters()))}


def test_real_dcp_metadata_passes_and_restores_into_an_unsharded_model(tmp_path: Path) -> None:
    from haltpoint.distributed.safe_metadata import check_metadata

    saved = _sharded_run(tmp_path, (1,))
    with open(tmp_path / "step-000000001" / "dcp" / ".metadata", "rb") as f:
        metadata = check_metadata(f, "m")
    assert "train.model.0.weight" in metadata.state_dict_metadata
    state = _fresh()
    with Checkpointer(tmp_path, read_only=True) as reader:
        assert reader.restore(state) is not None
    restored = state["train"]
    for name, value in saved.model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[name], value), name
    assert restored.optimizers[0].param_groups[0]["lr"] == 0.25  # a non-tensor DCP value


def test_hostile_metadata_runs_nothing_and_restore_falls_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, marker = tmp_path / "run", tmp_path / "MARKER"
    _sharded_run(run_dir, (1, 2))
    _replace(run_dir, 2, ".metadata", pickle.dumps(Payload(marker)))
    with Checkpointer(run_dir, read_only=True) as reader:
        with pytest.raises(CorruptCheckpointError, match=r"\.metadata .*refused global io\.open"):
            reader.restore(_fresh(), 2)
        with pytest.warns(UserWarning, match="falling back to the checkpoint of step 1"):
            info = reader.restore(_fresh())
    assert info is not None and info.step == 1
    assert main(["verify", str(run_dir), "--json"]) == 1
    report = {c["step"]: c for c in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert report[1]["status"] == "intact" and report[2]["status"] == "damaged"
    assert "refused global io.open" in report[2]["error"]
    assert not marker.exists()


def test_metadata_that_is_no_dcp_metadata_is_refused(tmp_path: Path) -> None:
    from haltpoint.distributed.safe_metadata import check_metadata

    with pytest.raises(CorruptCheckpointError, match=r"^m holds a dict, not DCP metadata"):
        check_metadata(io.BytesIO(pickle.dumps({"a": 1})), "m")
    with pytest.raises(CorruptCheckpointError, match=r"^m is not DCP metadata .*: "):
        check_metadata(io.BytesIO(b"\x80\x05trunc"), "m")


def test_a_hostile_non_tensor_value_runs_nothing(tmp_path: Path) -> None:
    """DCP reads non-tensor values with `torch.load(weights_only=False)`; haltpoint first
    reads them with `weights_only=True`."""
    from haltpoint.distributed.sharded import load_shards, write_shards

    marker = tmp_path / "MARKER"
    model = _model()
    train = ShardedState(model, torch.optim.AdamW(model.parameters()))
    state = train.state_dict()
    state["optim"]["param_groups"][0]["lr"] = Payload(marker)
    storage = open_storage(tmp_path)
    write_shards(storage, "dcp", {"train": state}, rank=0)
    with pytest.raises(CorruptCheckpointError, match=r"'train\.optim\.param_groups\.0\.lr' is not"):
        load_shards(storage, "dcp", _fresh())
    assert not marker.exists()


def test_dcp_failures_are_one_corrupt_checkpoint_error(tmp_path: Path) -> None:
    from haltpoint.distributed.sharded import load_shards, write_shards

    storage = open_storage(tmp_path)
    write_shards(storage, "dcp", {"x": torch.zeros(3)}, rank=0)
    for name in (tmp_path / "dcp").glob("__0_*"):
        name.write_bytes(b"short")
    with pytest.raises(CorruptCheckpointError, match="DCP failed to load on rank 0: ") as error:
        load_shards(storage, "dcp", {"x": torch.zeros(3)})
    assert "\n" not in str(error.value)
