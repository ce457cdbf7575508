"""Sharded state (FSDP2 / DTensor) through torch.distributed.checkpoint, under haltpoint's commit.

tests/workers/fsdp_worker.py does the distributed work in other processes: one
`torchrun --nproc_per_node=2` launch (gloo on CPU) trains and saves an FSDP2 model with AdamW,
restores it on 2 ranks and makes ranks fail; a second launch restores on 4 ranks; a plain
process restores into an unsharded model. This process only reads what they wrote (it never
runs DCP itself), and a hang fails a launch after its timeout.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from haltpoint import Checkpointer, CorruptCheckpointError, ShardedState
from haltpoint.cli import main
from haltpoint.store.run_dir import SHARDED_KEY

sys.path.insert(0, str(Path(__file__).parent))
from ports import free_port
from torchrun import run_checked

WORKER = Path(__file__).parent / "workers" / "fsdp_worker.py"
TIMEOUT_S = 180
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


def _run(nproc: int, mode: str, run_dir: Path, out: Path) -> None:
    """Run the worker: under torchrun with `nproc` ranks, or as one plain process (0)."""
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
        launcher += [f"--master_port={free_port()}"]
    command = [*launcher, str(WORKER), "--mode", mode, "--run-dir", str(run_dir), "--out", str(out)]
    run_checked(command, what=mode, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fsdp")
    run_dir, out = root / "run", root / "out"
    out.mkdir()
    _run(2, "train", run_dir, out)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"ranks": ranks, "run_dir": run_dir, "out": out}


def _manifest(run_dir: Path, step: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((run_dir / f"step-{step:09d}" / "manifest.json").read_text())
    return data


@pytest.mark.slow
def test_the_shards_go_to_dcp_and_the_rest_into_the_manifest(fsdp_run: dict[str, Any]) -> None:
    r0, r1 = fsdp_run["ranks"]
    assert r0["state_types"] == ["DTensor"]  # really sharded
    run_dir: Path = fsdp_run["run_dir"]
    folder = run_dir / "step-000000003"
    assert sorted(os.listdir(folder / "dcp")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    manifest = _manifest(run_dir, 3)
    sharded = manifest["extra"][SHARDED_KEY]
    assert sharded["world_size"] == 2 and sharded["entries"] == ["train"]
    assert sharded["format"] == "torch.distributed.checkpoint"
    assert set(sharded["files"]) == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    for name, record in sharded["files"].items():
        assert record["size"] == os.path.getsize(folder / "dcp" / name)
        assert len(record["xxh3_128"]) == 32
    # the replicated rest is plain haltpoint state, pickle-free: the stopper, the epoch, RNG
    assert set(manifest["tree"]) == {"stopper", "epoch", "__rng__"}
    assert "train" not in manifest["tree"]
    with Checkpointer(run_dir, read_only=True) as reader:
        infos = reader.list()
    assert [i.step for i in infos] == [0, 2, 3] == r0["listed"] == r1["listed"]
    dcp_bytes = sum(r["size"] for r in sharded["files"].values())
    assert infos[-1].size > dcp_bytes  # DCP files and the checkpoint's own tensors
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 1, 2, 3]


@pytest.mark.slow
def test_closing_an_async_sharded_writer_destroys_its_process_group(
    fsdp_run: dict[str, Any],
) -> None:
    """Each writer makes a gloo group for its background writes; two writers were opened and
    closed, and neither left its group (threads, sockets) behind."""
    assert [rank["groups_left"] for rank in fsdp_run["ranks"]] == [0, 0]


@pytest.mark.slow
def test_retention_removes_old_sharded_checkpoints_entirely(fsdp_run: dict[str, Any]) -> None:
    run_dir: Path = fsdp_run["run_dir"]
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == [
        ".haltpoint.lock", "history.jsonl", "step-000000000", "step-000000002", "step-000000003"
    ]  # fmt: skip
    pinned = sorted(os.listdir(run_dir / "step-000000000"))
    assert pinned == ["dcp", "manifest.json", "pinned", "tensors.safetensors"]
    assert len(os.listdir(run_dir / "step-000000000" / "dcp")) == 3


@pytest.mark.slow
def test_restore_on_the_same_2_ranks_gives_model_optimizer_and_stopper(
    fsdp_run: dict[str, Any],
) -> None:
    for r in fsdp_run["ranks"]:
        assert r["restored_step"] == 3 and r["restored_epoch"] == 3
        assert r["restored_stopper_best"] == r["best"]
    assert fsdp_run["ranks"][0]["restored_equal"] is True  # full weights and AdamW state


@pytest.mark.slow
def test_restore_on_4_ranks_reshards(fsdp_run: dict[str, Any]) -> None:
    out: Path = fsdp_run["out"]
    _run(4, "restore", fsdp_run["run_dir"], out)
    results = [json.loads((out / f"restore4-rank{r}.json").read_text()) for r in range(4)]
    assert all(r["restored_step"] == 3 and r["epoch"] == 3 for r in results)
    assert results[0]["equal"] is True


@pytest.mark.slow
def test_restore_in_one_process_into_an_unsharded_model_gives_exact_full_state(
    fsdp_run: dict[str, Any],
) -> None:
    out: Path = fsdp_run["out"]
    _run(0, "unsharded", fsdp_run["run_dir"], out)
    result = json.loads((out / "unsharded.json").read_text())
    assert result["restored_step"] == 3 and result["epoch"] == 3
    assert result["stopper_best"] == fsdp_run["ranks"][0]["best"]
    assert result["equal"] is True  # every weight and AdamW value, bit for bit


@pytest.mark.slow
def test_a_rank_failing_raises_on_every_rank_and_commits_nothing(
    fsdp_run: dict[str, Any],
) -> None:
    for r in fsdp_run["ranks"]:
        assert r["split_error"] == (
            "save(10) failed on rank 1: RuntimeError: rank 1 broke while taking its state dict"
        )
        assert "writing shards failed on rank 1" in r["write_error"]
        assert "disk gone on rank 1" in r["write_error"]
        assert r["leftover"] == ["dcp"]  # written, never committed: no manifest
        assert r["listed_after_crash"] == [0, 2, 3] == r["listed_after_reopen"]
        assert r["committed_when_save_returned"] is False  # async: written in the background
        assert r["sync_listed"] == [20]  # async_save=False: written before save returns
        assert r["sync_files"] == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (fsdp_run["run_dir"] / "step-000000011").exists()  # removed at the reopen


@pytest.mark.slow
def test_the_ranks_check_the_dcp_files_together_and_fall_back_past_damage(
    fsdp_run: dict[str, Any],
) -> None:
    """The writer's restore on 2 ranks: rank 1 alone checks `__0_0.distcp` (flipped); both
    ranks fall back to step 2, rank 0 says so and quarantines step 3, and step 3 asked for by
    number (its manifest moved back) raises on both."""
    r0, r1 = fsdp_run["ranks"]
    for r in (r0, r1):
        assert r["fallback_step"] == 2 and r["fallback_epoch"] == 2
        assert r["quarantined"] == ["step-000000003-1.json"]
        assert "__0_0.distcp: xxh3-128" in r["step_error"]
        assert "the sharded checkpoint is damaged" in r["step_error"]
    assert any(
        "__0_0.distcp" in w and "falling back to the checkpoint of step 2" in w
        for w in r0["fallback_warnings"]
    )
    assert not any("falling back" in w for w in r1["fallback_warnings"])
    # each rank read only its share of each checkpoint's DCP files (step 3, then 2, then 3)
    assert r0["checked"] == [
        "step-000000003/.metadata", "step-000000003/__1_0.distcp",
        "step-000000002/.metadata", "step-000000002/__1_0.distcp",
        "step-000000003/.metadata", "step-000000003/__1_0.distcp",
    ]  # fmt: skip
    assert r1["checked"] == [
        "step-000000003/__0_0.distcp", "step-000000002/__0_0.distcp", "step-000000003/__0_0.distcp"
    ]  # fmt: skip


@pytest.mark.slow
def test_an_optimizer_with_dtensor_state_is_refused_on_every_rank(
    fsdp_run: dict[str, Any],
) -> None:
    for r in fsdp_run["ranks"]:
        assert "state['optim'] is an optimizer holding DTensor state" in r["optimizer_error"]
        assert "ShardedState(model, optimizer)" in r["optimizer_error"]


@pytest.fixture
def run_copy(fsdp_run: dict[str, Any], tmp_path: Path) -> Path:
    """A copy of the trained run directory, for tests that damage it."""
    copy = tmp_path / "run"
    shutil.copytree(fsdp_run["run_dir"], copy)
    return copy


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_damaged_dcp_files_are_found_before_anything_loads(run_copy: Path) -> None:
    copy = run_copy
    _flip_byte(copy / "step-000000003" / "dcp" / "__1_0.distcp")
    (copy / "step-000000002" / "dcp" / "__0_0.distcp").write_bytes(b"short")
    (copy / "step-000000000" / "dcp" / "__1_0.distcp").unlink()
    model = torch.nn.Linear(2, 2)  # never reached: the checks come first
    with Checkpointer(copy, read_only=True) as reader:
        with pytest.raises(CorruptCheckpointError, match=r"__1_0\.distcp: xxh3-128 \w+ differs"):
            reader.restore({"train": model}, 3)
        with pytest.warns(UserWarning) as caught, pytest.raises(CorruptCheckpointError) as error:
            reader.restore({"train": model})  # newest first: 3, then 2, then 0
    messages = [str(w.message) for w in caught if "falling back" in str(w.message)]
    assert "falling back to the checkpoint of step 2" in messages[0]
    assert "5 bytes, the manifest says" in messages[1]
    assert "falling back to the checkpoint of step 0" in messages[1]
    assert "__1_0.distcp" in str(error.value) and "No such file" in str(error.value)


@pytest.mark.slow
def test_a_sharded_record_naming_a_path_outside_its_folder_is_refused(run_copy: Path) -> None:
    copy = run_copy
    from haltpoint.store.run_dir import RunDirectory
    from haltpoint.store.storage import open_storage

    run = RunDirectory(open_storage(copy))
    manifest = run.read_manifest("step-000000003")
    files = manifest.extra[SHARDED_KEY]["files"]
    files["../../escape"] = files.pop("__1_0.distcp")
    run.storage.publish("step-000000003/manifest.json", manifest.encode())  # rewritten
    with (
        Checkpointer(copy, read_only=True) as reader,
        pytest.raises(CorruptCheckpointError, match="malformed sharded record"),
    ):
        reader.restore({"train": torch.nn.Linear(2, 2)}, 3)


def test_retention_keeps_the_dcp_folder_of_kept_checkpoints_only(tmp_path: Path) -> None:
    """A dropped checkpoint whose tensor file a kept one still references loses its DCP folder."""
    model = torch.nn.Linear(512, 512)  # 1 MiB: big enough to be deduplicated
    record = {"format": "torch.distributed.checkpoint", "world_size": 2, "entries": ["x"]}
    with Checkpointer(tmp_path, keep_last=1, async_save=False, capture_rng=False) as ckpt:
        for step in (1, 2):
            (tmp_path / f"step-{step:09d}" / "dcp").mkdir(parents=True)
            (tmp_path / f"step-{step:09d}" / "dcp" / "__0_0.distcp").write_bytes(b"shard")
            extra = {SHARDED_KEY: {**record, "files": {}}}
            # the same tensors each time: the second save references the first one's file
            ckpt._save(step, {"model": model}, None, False, lambda e=extra: e)
    assert (tmp_path / "step-000000001" / "tensors.safetensors").is_file()  # still referenced
    assert not (tmp_path / "step-000000001" / "dcp").exists()
    assert not (tmp_path / "step-000000001" / "manifest.json").exists()
    assert (tmp_path / "step-000000002" / "dcp" / "__0_0.distcp").is_file()


def test_without_a_process_group_state_is_never_inspected_for_shards(tmp_path: Path) -> None:
    class Unreadable:
        def state_dict(self) -> dict[str, Any]:
            raise AssertionError("inspected")

        def load_state_dict(self, state: dict[str, Any]) -> None:
            pass

    from haltpoint.distributed.sharded import split_sharded

    state = {"x": Unreadable()}
    assert split_sharded(state) == ({}, state)


def test_sharded_state_checks_its_arguments() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got int"):
        ShardedState(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"optimizers must be torch\.optim\.Optimizer, got Linear"):
        ShardedState(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1))  # type: ignore[arg-type]


@pytest.mark.slow
def test_the_cli_verifies_shows_and_refuses_to_export_sharded_state(
    fsdp_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "run"
    shutil.copytree(fsdp_run["run_dir"], copy)
    assert main(["verify", str(copy)]) == 0
    capsys.readouterr()
    assert main(["ls", str(copy), "--json"]) == 0
    manifest = _manifest(copy, 3)
    dcp_bytes = sum(r["size"] for r in manifest["extra"][SHARDED_KEY]["files"].values())
    own_bytes = sum(r["nbytes"] for r in manifest["tensors"].values())
    listed = json.loads(capsys.readouterr().out)
    assert listed[-1]["step"] == 3 and listed[-1]["size"] == dcp_bytes + own_bytes
    assert main(["show", str(copy), "--step", "3"]) == 0
    shown = capsys.readouterr().out
    assert "of sharded state (train) in 3 torch.distributed.checkpoint files" in shown
    assert "saved on 2 ranks" in shown
    target = str(tmp_path / "w.safetensors")
    assert main(["export", str(copy), "--which", "3", "--key", "train", "-o", target]) != 0
    assert "is sharded state, written by torch.distributed.checkpoint" in capsys.readouterr().err
    _flip_byte(copy / "step-000000003" / "dcp" / "__0_0.distcp")
    assert main(["verify", str(copy), "--json"]) == 1
    report = {c["step"]: c for c in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert report[2]["status"] == "intact" and report[3]["status"] == "damaged"
    assert "__0_0.distcp: xxh3-128" in report[3]["error"]


def test_save_sharded_in_one_process_prepares_writes_then_commits_the_record(
    tmp_path: Path,
) -> None:
    """The protocol without a process group: a fresh `dcp/`, rank 0's files, one commit."""
    from haltpoint.distributed.sharded_save import save_sharded
    from haltpoint.errors import CheckpointExistsError
    from haltpoint.reader import CheckpointInfo
    from haltpoint.store.run_dir import RunDirectory, ShardedRecord
    from haltpoint.store.storage import open_storage

    run = RunDirectory(open_storage(tmp_path))
    folder = tmp_path / "step-000000004" / "dcp"
    folder.mkdir(parents=True)
    (folder / "stale").write_bytes(b"an interrupted save")
    calls: list[str] = []

    def write(shards: dict[str, Any], rank: int, group: Any) -> dict[str, dict[str, Any]]:
        assert group is None  # the default process group: the write is synchronous
        calls.append(f"write {sorted(shards)} {rank}: {sorted(os.listdir(folder))}")
        return {".metadata": {"size": 7, "xxh3_128": "a" * 32}}

    def commit(extra: Callable[[], dict[str, Any]]) -> CheckpointInfo:
        calls.append("commit")
        record = ShardedRecord.parse(extra()[SHARDED_KEY], "step-000000004")
        assert record.entries == ("a", "b") and record.world_size == 1 and record.nbytes == 7
        return CheckpointInfo(step=4, time=0.0, metrics={}, size=100, path="p")

    info = save_sharded(run, 4, {"b": {}, "a": {}}, write, commit)
    assert calls == ["write ['a', 'b'] 0: []", "commit"]  # the stale file was removed first
    assert info.size == 107  # the checkpoint's own tensors and its DCP files
    (folder.parent / "manifest.json").write_text("{}")  # step 4 is taken now
    with pytest.raises(CheckpointExistsError, match="a checkpoint for step 4 already exists"):
        save_sharded(run, 4, {"a": {}}, write, commit)


@pytest.mark.parametrize("at", ["size", "read"])
@pytest.mark.parametrize(
    "code", [errno.EIO, errno.ETIMEDOUT, errno.ESTALE], ids=errno.errorcode.get
)
def test_an_io_error_reading_a_dcp_file_is_unreadable_not_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: str, code: int
) -> None:
    """A DCP file that cannot be read now is no proof of damage (retention quarantined the
    checkpoint); while it was hashed, the bare OSError came out of the check."""
    from haltpoint.distributed.sharded import verify_shards
    from haltpoint.errors import UnreadableCheckpointError
    from haltpoint.store.hashing import StreamHasher
    from haltpoint.store.run_dir import ShardFile
    from haltpoint.store.storage import LocalStorage

    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / "__0_0.distcp").write_bytes(b"shard bytes")
    hasher = StreamHasher()
    hasher.update(b"shard bytes")
    files = {"__0_0.distcp": ShardFile(11, hasher.hexdigest())}
    storage = LocalStorage(tmp_path)
    verify_shards(storage, "dcp", files)  # intact

    def failing(self: Any, rel: str, *args: Any) -> Any:
        raise OSError(code, os.strerror(code), rel)

    monkeypatch.setattr(LocalStorage, at if at == "size" else "open_read", failing)
    with pytest.raises(UnreadableCheckpointError, match=os.strerror(code)) as raised:
        verify_shards(storage, "dcp", files)
    assert "\n" not in str(raised.value) and "not damage" in str(raised.value)
