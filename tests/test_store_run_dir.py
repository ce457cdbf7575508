"""Tests for haltpoint.store.run_dir's sharded record: one strict parser, and who reads it.

A sharded checkpoint's manifest records its DCP files under `extra["sharded"]`. These tests
write that record by hand into ordinary checkpoints (no process group, no DCP): the parser's
answers, sizes, and what `restore`, `show`, `export` and `verify` do with a malformed record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from haltpoint import Checkpointer, CorruptCheckpointError
from haltpoint.cli import main
from haltpoint.store.manifest import Manifest
from haltpoint.store.run_dir import (
    SHARDED_KEY,
    RunDirectory,
    ShardedRecord,
    ShardFile,
    checkpoint_nbytes,
)
from haltpoint.store.storage import LocalStorage, open_storage

HASH = "0123456789abcdef" * 2
GOOD: dict[str, Any] = {
    "format": "torch.distributed.checkpoint",
    "world_size": 2,
    "entries": ["train"],
    "files": {
        ".metadata": {"size": 100, "xxh3_128": HASH},
        "__0_0.distcp": {"size": 23, "xxh3_128": HASH},
    },
}


def with_files(**files: Any) -> dict[str, Any]:
    return {**GOOD, "files": files}


def named(name: str) -> dict[str, Any]:
    """GOOD with one file record under `name`."""
    return {**GOOD, "files": {name: {"size": 1, "xxh3_128": HASH}}}


def test_a_well_formed_record_is_parsed() -> None:
    record = ShardedRecord.parse(GOOD, "run/step-000000003")
    assert record.entries == ("train",)
    assert record.world_size == 2
    assert record.files == {
        ".metadata": ShardFile(100, HASH),
        "__0_0.distcp": ShardFile(23, HASH),
    }
    assert record.nbytes == 123


def test_world_size_is_optional() -> None:
    record = ShardedRecord.parse({"entries": [], "files": {}}, "w")
    assert record.world_size is None and record.nbytes == 0


MALFORMED = [
    ("not-an-object", ["train"], r"expected a JSON object, got list"),
    ("no-entries", {k: v for k, v in GOOD.items() if k != "entries"}, r"'entries' must be a list"),
    ("entries-not-names", {**GOOD, "entries": ["train", 3]}, r"'entries' must be a list of names"),
    ("no-files", {k: v for k, v in GOOD.items() if k != "files"}, r"'files' must be an object"),
    ("files-a-list", {**GOOD, "files": [".metadata"]}, r"'files' must be an object"),
    ("world-size-str", {**GOOD, "world_size": "2"}, r"'world_size' must be a .* got '2'"),
    ("world-size-zero", {**GOOD, "world_size": 0}, r"'world_size' must be a positive int, got 0"),
    ("path-outside", named("../escape"), r"file '\.\./escape' is not a plain"),
    ("nested-path", named("a/b"), r"file 'a/b' is not a plain"),
    ("backslash", named("a\\b"), r"is not a plain file name"),
    ("dot-dot", named(".."), r"file '\.\.' is not a plain"),
    ("empty-name", named(""), r"file '' is not a plain"),
    ("file-not-object", with_files(x=12), r"file 'x' needs a size .* got 12"),
    ("no-size", with_files(x={"xxh3_128": HASH}), r"file 'x' needs a size"),
    ("bool-size", with_files(x={"size": True, "xxh3_128": HASH}), r"file 'x' needs a size"),
    ("negative-size", with_files(x={"size": -1, "xxh3_128": HASH}), r"file 'x' needs a size"),
    ("no-hash", with_files(x={"size": 1}), r"file 'x' needs a size .* and an xxh3_128"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("record", "problem"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_a_malformed_record_is_a_corrupt_checkpoint_naming_the_problem(
    record: Any, problem: str
) -> None:
    with pytest.raises(CorruptCheckpointError, match=problem) as error:
        ShardedRecord.parse(record, "run/step-000000003")
    assert str(error.value).startswith("run/step-000000003: malformed sharded record")
    assert error.value.path == "run/step-000000003"


def _manifest(extra: dict[str, Any]) -> Manifest:
    return Manifest(step=3, time=0.0, metrics={}, tree={}, tensors={}, versions={}, extra=extra)


def test_from_manifest_is_none_without_sharded_state() -> None:
    assert ShardedRecord.from_manifest(_manifest({}), "w") is None
    assert ShardedRecord.from_manifest(_manifest({SHARDED_KEY: GOOD}), "w") is not None
    with pytest.raises(CorruptCheckpointError, match="w: malformed sharded record"):
        ShardedRecord.from_manifest(_manifest({SHARDED_KEY: None}), "w")


def test_checkpoint_nbytes_counts_dcp_files_and_no_bytes_of_a_malformed_record() -> None:
    assert checkpoint_nbytes(_manifest({})) == 0
    assert checkpoint_nbytes(_manifest({SHARDED_KEY: GOOD})) == 123
    broken = with_files(a={"size": 7, "xxh3_128": HASH}, **{"../b": {"size": 9}})
    assert checkpoint_nbytes(_manifest({SHARDED_KEY: broken})) == 0


# -- a hand-written record in a real run -----------------------------------------------------


def _run_with_record(path: Path, record: Any) -> None:
    """Checkpoints 0 and 1 of a Linear ("model"); step 1's manifest gets `record`."""
    with Checkpointer(path, keep_last=5, async_save=False, capture_rng=False) as ckpt:
        for step in (0, 1):
            ckpt.save(step, {"model": torch.nn.Linear(2, 2)})
    run = RunDirectory(open_storage(path))
    manifest = run.read_manifest("step-000000001")
    manifest.extra[SHARDED_KEY] = record
    run.storage.publish("step-000000001/manifest.json", manifest.encode())  # rewritten


def test_restore_reports_a_malformed_record_and_falls_back(tmp_path: Path) -> None:
    _run_with_record(tmp_path, named("../escape"))
    with Checkpointer(tmp_path, read_only=True) as reader:
        with pytest.raises(
            CorruptCheckpointError, match=r"malformed sharded record .*'\.\./escape'"
        ):
            reader.restore({"model": torch.nn.Linear(2, 2)}, 1)
        with pytest.warns(UserWarning, match="falling back to the checkpoint of step 0"):
            assert reader.restore({"model": torch.nn.Linear(2, 2)}).step == 0  # type: ignore[union-attr]


def test_the_cli_shows_and_verifies_a_malformed_record_and_exports_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run_with_record(tmp_path / "run", {**GOOD, "entries": "train"})
    run = str(tmp_path / "run")
    assert main(["show", run, "--step", "1"]) == 0
    assert "sharded state of unknown size" in capsys.readouterr().out
    assert main(["verify", run, "--json"]) == 1
    report = {c["step"]: c for c in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert report[0]["status"] == "intact" and report[1]["status"] == "damaged"
    assert "'entries' must be a list of names" in report[1]["error"]
    target = str(tmp_path / "w.safetensors")
    assert main(["export", run, "--which", "1", "--key", "model", "-o", target]) == 0
    capsys.readouterr()
    assert main(["export", run, "--which", "1", "--key", "train", "-o", target]) == 1
    assert "step-000000001: malformed sharded record" in capsys.readouterr().err


def test_the_cli_shows_a_well_formed_record_and_refuses_to_export_its_entries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run_with_record(tmp_path / "run", GOOD)
    run = str(tmp_path / "run")
    assert main(["show", run, "--step", "1"]) == 0
    shown = capsys.readouterr().out
    assert "+ 123 B of sharded state (train) in 2 torch.distributed.checkpoint files" in shown
    assert "saved on 2 ranks" in shown
    target = str(tmp_path / "w.safetensors")
    assert main(["export", run, "--which", "1", "--key", "train", "-o", target]) == 1
    assert "is sharded state, written by torch.distributed.checkpoint" in capsys.readouterr().err
    assert main(["export", run, "--which", "1", "--key", "nope", "-o", target]) == 2
    assert "its entries are model, train" in capsys.readouterr().err


def _deduplicated_run(tmp_path: Path) -> tuple[Path, Path]:
    """Steps 0 and 1, where step 1 references step 0's 1 MiB tensor file; step 0 is gone."""
    run = tmp_path / "run"
    big = {"w": torch.ones(1 << 18)}
    with Checkpointer(run, keep_last=1, async_save=False, capture_rng=False) as ckpt:
        ckpt.save(0, big)
        ckpt.save(1, big)
    shared = run / "step-000000000" / "tensors.safetensors"
    assert shared.exists() and not (run / "step-000000000" / "manifest.json").exists()
    return run, shared


def test_clean_up_at_open_keeps_files_a_newer_format_manifest_may_reference(tmp_path: Path):
    run, shared = _deduplicated_run(tmp_path)
    path = run / "step-000000001" / "manifest.json"
    path.write_bytes(path.read_bytes().replace(b'"format_version":1', b'"format_version":9'))
    with pytest.warns(UserWarning, match="deleted no leftover files"):
        Checkpointer(run, async_save=False).close()
    assert shared.exists()


def test_clean_up_at_open_keeps_files_an_unreadable_manifest_may_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    run, shared = _deduplicated_run(tmp_path)
    real = LocalStorage.read_bytes

    def denied(self: LocalStorage, rel: str, limit: int | None = None) -> bytes:
        if rel == "step-000000001/manifest.json":  # as chmod 000 does for a non-root user
            raise PermissionError(13, "Permission denied", rel)
        return real(self, rel, limit)

    monkeypatch.setattr(LocalStorage, "read_bytes", denied)
    with pytest.warns(UserWarning, match="deleted no leftover files"):
        Checkpointer(run, async_save=False).close()
    assert shared.exists()


@pytest.mark.parametrize("where", ["local", "memory"])
def test_clean_up_keeps_a_folder_named_like_a_haltpoint_file(tmp_path: Path, where: str) -> None:
    """A folder at `tensors.safetensors` in a leftover step folder (or at a temporary name) is
    not haltpoint's: clean-up at open keeps it, its contents and its step folder, and still
    removes the leftover files that are haltpoint's own."""
    import fsspec

    url = str(tmp_path / "run") if where == "local" else f"memory://{tmp_path.name}-run"
    fs, root = fsspec.core.url_to_fs(url)
    model = torch.nn.Linear(2, 2)
    with Checkpointer(url, keep_last=1, async_save=False, capture_rng=False) as ckpt:
        ckpt.save(1, {"m": model})
    for rel, data in [
        ("step-000000000/tensors.safetensors/keep.txt", b"precious"),
        ("step-000000000/manifest.json.0a1b2c3d.tmp", b"leftover"),
        ("history.jsonl.0a1b2c3d.tmp/keep.txt", b"precious"),
    ]:
        fs.makedirs(f"{root}/{rel}".rsplit("/", 1)[0], exist_ok=True)
        fs.pipe(f"{root}/{rel}", data)
    with Checkpointer(url, keep_last=1, async_save=False, capture_rng=False) as ckpt:
        ckpt.save(2, {"m": model})
    assert fs.cat(f"{root}/step-000000000/tensors.safetensors/keep.txt") == b"precious"
    assert fs.cat(f"{root}/history.jsonl.0a1b2c3d.tmp/keep.txt") == b"precious"
    assert not fs.exists(f"{root}/step-000000000/manifest.json.0a1b2c3d.tmp")
    assert not fs.exists(f"{root}/step-000000001")  # retention still removes step 1


def test_gc_reads_the_quarantine_before_it_removes_anything(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    with Checkpointer(run, keep_last=5, async_save=False) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, {"w": torch.full((10,), float(step))})
    (tmp_path / "elsewhere").mkdir()
    (run / "quarantine").symlink_to(tmp_path / "elsewhere")  # cannot be read: out of the run
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert main(["gc", str(run), "--keep-last", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "quarantine is a symlink to" in err
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before  # not one removed
