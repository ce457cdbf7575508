"""Write-side safety: every operation that deletes or rewrites files in a run directory
(clean-up at writer open, save + retention, `haltpoint gc`, `haltpoint import`,
`haltpoint demo --fresh`), on every kind of awkward directory, loses no committed intact
checkpoint and no byte that haltpoint did not write; it succeeds or fails with one clear line.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
import uuid
import warnings
from pathlib import Path

import pytest
import torch

from haltpoint import Checkpointer
from haltpoint.cli import main
from haltpoint.errors import (
    CheckpointError,
    CheckpointExistsError,
    LockedError,
    StepBehindError,
    UnreadableCheckpointError,
)
from haltpoint.store.run_dir import RunDirectory, checkpoint_dirname
from haltpoint.store.storage import LocalStorage, open_storage

OPS = ["open", "save", "gc", "import", "fresh"]
CONDITIONS = [
    "plain",
    "bit_flip_newest",
    "truncated_manifest",
    "foreign_in_step",
    "foreign_in_dead_step",
    "foreign_at_root",
    "foreign_tmp",
    "folders_at_own_names",
    "stray_own_tmp",
    "newer_format",
    "unreadable_tensors",
    "symlinked_step",
    "concurrent_reader",
]


def hashes(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if path.is_symlink():
                continue
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def intact_steps(run: Path) -> set[int]:
    """Steps whose every file verifies (read directly: no writer involved)."""
    with Checkpointer(run, read_only=True) as reader:
        found = set()
        for entry in RunDirectory(LocalStorage(run, create=False)).committed():
            try:
                if reader._reader.damage(entry) is None:
                    found.add(entry.step)
            except CheckpointError:
                pass
        return found


def make_run(run: Path) -> torch.nn.Module:
    model = torch.nn.Linear(3, 2)
    with Checkpointer(run, keep_last=3, async_save=False) as ckpt:
        for step in (1, 2, 3):
            with torch.no_grad():
                model.weight.add_(1.0)
            ckpt.save(step, {"model": model})
    return model


def damage(run: Path, condition: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    newest = run / checkpoint_dirname(3)
    if condition == "bit_flip_newest":
        data = bytearray((newest / "tensors.safetensors").read_bytes())
        data[-3] ^= 0x10
        (newest / "tensors.safetensors").write_bytes(bytes(data))
    elif condition == "truncated_manifest":
        raw = (newest / "manifest.json").read_bytes()
        (newest / "manifest.json").write_bytes(raw[: len(raw) // 2])
    elif condition == "foreign_in_step":
        (run / checkpoint_dirname(1) / "notes.txt").write_text("my notes")
    elif condition == "foreign_in_dead_step":
        dead = run / checkpoint_dirname(0)
        dead.mkdir()
        (dead / "tensors.safetensors").write_bytes(b"leftover")  # an interrupted save's
        (dead / "plot.png").write_bytes(b"\x89PNG precious")
    elif condition == "foreign_at_root":
        (run / "README.md").write_text("precious")
    elif condition == "foreign_tmp":
        (run / "draft.tmp").write_text("someone's temp file")
        (run / checkpoint_dirname(2) / "editor.tmp").write_text("precious")
    elif condition == "folders_at_own_names":  # folders named like haltpoint's files
        for rel in (
            f"{checkpoint_dirname(0)}/tensors.safetensors",  # in a leftover step folder
            f"{checkpoint_dirname(1)}/manifest.json.0a1b2c3d.tmp",  # in one retention removes
            "history.jsonl.0a1b2c3d.tmp",
        ):
            (run / rel).mkdir(parents=True)
            (run / rel / "keep.txt").write_text("precious")
    elif condition == "stray_own_tmp":
        (run / "history.jsonl.0a1b2c3d.tmp").write_text("half")
        (newest / "manifest.json.deadbeef.tmp").write_text("half")
    elif condition == "newer_format":
        manifest = json.loads((newest / "manifest.json").read_text())
        manifest["format_version"] = 99
        (newest / "manifest.json").write_text(json.dumps(manifest))
    elif condition == "unreadable_tensors":
        real_open = open

        def guarded(file, *args, **kwargs):
            if str(file).endswith(f"{checkpoint_dirname(3)}/tensors.safetensors"):
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        real_os_open = os.open

        def guarded_os(file, *args, **kwargs):
            if str(file).endswith(f"{checkpoint_dirname(3)}/tensors.safetensors"):
                raise PermissionError(13, "Permission denied", str(file))
            return real_os_open(file, *args, **kwargs)

        monkeypatch.setattr("builtins.open", guarded)
        monkeypatch.setattr(os, "open", guarded_os)
    elif condition == "symlinked_step":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "precious.bin").write_bytes(b"precious")
        os.symlink(elsewhere, run / checkpoint_dirname(7))


FOREIGN_NAMES = {
    "foreign_in_step": [f"{checkpoint_dirname(1)}/notes.txt"],
    "foreign_in_dead_step": [f"{checkpoint_dirname(0)}/plot.png"],
    "foreign_at_root": ["README.md"],
    "foreign_tmp": ["draft.tmp", f"{checkpoint_dirname(2)}/editor.tmp"],
    "folders_at_own_names": [
        f"{checkpoint_dirname(0)}/tensors.safetensors/keep.txt",
        f"{checkpoint_dirname(1)}/manifest.json.0a1b2c3d.tmp/keep.txt",
        "history.jsonl.0a1b2c3d.tmp/keep.txt",
    ],
}


def operate(op: str, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run `op`; return "ok", or the one line of the error (CheckpointError / CLI exit)."""
    if op in ("open", "save"):
        try:
            with Checkpointer(run, keep_last=2, async_save=False) as ckpt:
                if op == "save":
                    ckpt.save(10, {"model": torch.nn.Linear(3, 2)})
        except CheckpointError as exc:
            assert "\n" not in str(exc)
            return str(exc)
        return "ok"
    if op == "gc":
        argv = ["gc", str(run), "--keep-last", "1"]
    elif op == "import":
        torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "model.pt")
        argv = ["import", str(tmp_path / "model.pt"), "-o", str(run), "--step", "11"]
    else:
        argv = ["demo", "--run-dir", str(run), "--epochs", "1", "--fresh"]
    code = main(argv)
    err = capsys.readouterr().err
    if code == 0:
        return "ok"
    assert code in (1, 2)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("haltpoint: error: "), err
    return lines[0]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("condition", CONDITIONS)
@pytest.mark.parametrize("op", OPS)
def test_write_side_operation_loses_no_intact_checkpoint_and_no_foreign_byte(
    op: str, condition: str, tmp_path: Path, capsys, monkeypatch
):
    run = tmp_path / "run"
    make_run(run)
    intact_clean = intact_steps(run)
    damage(run, condition, monkeypatch, tmp_path)
    before = hashes(run)
    outside = hashes(tmp_path / "elsewhere") if (tmp_path / "elsewhere").exists() else {}
    # an unreadable file is not damage: what was intact before still counts
    intact_before = intact_clean if condition == "unreadable_tensors" else intact_steps(run)
    stop = threading.Event()
    reader_errors: list[BaseException] = []

    def read_while() -> None:  # a read-only restore, looping, while the writer works
        try:
            while not stop.is_set():
                with Checkpointer(run, read_only=True) as reader:
                    reader.restore({"model": torch.nn.Linear(3, 2)})
        except CheckpointError:
            pass  # a reader may find the run changed under it: a clean error is fine
        except BaseException as exc:
            reader_errors.append(exc)

    thread = threading.Thread(target=read_while) if condition == "concurrent_reader" else None
    if thread is not None:
        thread.start()
    try:
        result = operate(op, run, tmp_path, capsys)
    finally:
        stop.set()
        if thread is not None:
            thread.join()
    monkeypatch.undo()
    assert not reader_errors
    after = hashes(run) if run.exists() else {}
    for name in FOREIGN_NAMES.get(condition, []):
        assert after.get(name) == before[name], f"{op} lost foreign {name}"
    if outside:
        assert hashes(tmp_path / "elsewhere") == outside
    if op == "fresh" and result == "ok":  # deleted a whole run, as asked: a pure one only
        assert condition not in (*FOREIGN_NAMES, "symlinked_step")
        return
    intact_after = intact_steps(run)
    newest_before = max(intact_before)
    # every intact checkpoint is still there, or a newer intact one that retention keeps is
    lost = intact_before - intact_after
    assert all(any(s > step for s in intact_after) for step in lost), (lost, intact_after)
    assert newest_before in intact_after or max(intact_after) > newest_before


def test_clean_up_keeps_a_step_folder_holding_foreign_files(tmp_path: Path):
    run = tmp_path / "run"
    make_run(run)
    dead = run / checkpoint_dirname(0)
    dead.mkdir()
    (dead / "tensors.safetensors").write_bytes(b"leftover")
    (dead / "notes.txt").write_text("precious")
    (run / "draft.tmp").write_text("theirs")
    (run / "history.jsonl.0a1b2c3d.tmp").write_text("ours")
    with Checkpointer(run, keep_last=3, async_save=False):
        pass
    assert (dead / "notes.txt").read_text() == "precious"
    assert not (dead / "tensors.safetensors").exists()  # haltpoint's own leftover goes
    assert (run / "draft.tmp").read_text() == "theirs"
    assert not (run / "history.jsonl.0a1b2c3d.tmp").exists()


def test_a_permission_error_reading_a_checkpoint_is_not_damage(tmp_path: Path, monkeypatch):
    run = tmp_path / "run"
    make_run(run)
    real_open = open
    target = f"{checkpoint_dirname(3)}/tensors.safetensors"

    def guarded(file, *args, **kwargs):
        if str(file).endswith(target):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    real_os_open = os.open

    def guarded_os(file, *args, **kwargs):
        if str(file).endswith(target):
            raise PermissionError(13, "Permission denied", str(file))
        return real_os_open(file, *args, **kwargs)

    before = hashes(run)
    with Checkpointer(run, keep_last=3, async_save=False) as ckpt:
        monkeypatch.setattr("builtins.open", guarded)
        monkeypatch.setattr(os, "open", guarded_os)
        with pytest.raises(UnreadableCheckpointError, match="permission denied"):
            ckpt.restore({"model": torch.nn.Linear(3, 2)})
        monkeypatch.undo()
    assert not (run / "quarantine").exists()  # not set aside as damaged
    assert hashes(run) == before


def _deny(monkeypatch, target: str) -> None:
    """Make every open of a path ending in `target` fail with EACCES (root ignores chmod)."""
    real_open, real_os_open = open, os.open

    def guarded(file, *args, **kwargs):
        if str(file).endswith(target):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    def guarded_os(file, *args, **kwargs):
        if str(file).endswith(target):
            raise PermissionError(13, "Permission denied", str(file))
        return real_os_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", guarded)
    monkeypatch.setattr(os, "open", guarded_os)


def test_verify_reports_a_permission_error_as_unreadable_not_damaged(
    tmp_path: Path, monkeypatch, capsys
):
    """verify reads each file's safetensors header first: EACCES there is not damage."""
    run = tmp_path / "run"
    make_run(run)
    before = hashes(run)
    _deny(monkeypatch, f"{checkpoint_dirname(3)}/tensors.safetensors")
    code = main(["verify", str(run)])
    monkeypatch.undo()
    out = capsys.readouterr().out
    assert code == 1
    assert "step 3 was not verified" in out and "permission denied" in out.lower()
    assert "damaged" not in out.lower()
    assert not (run / "quarantine").exists()
    assert hashes(run) == before


def test_saving_a_step_older_than_the_newest_on_disk_is_refused(tmp_path: Path):
    run = tmp_path / "run"
    make_run(run)
    before = hashes(run)
    with (
        Checkpointer(run, keep_last=1, async_save=False) as ckpt,
        pytest.raises(StepBehindError, match="cannot save step 0: it is older than step 3"),
    ):
        ckpt.save(0, {"model": torch.nn.Linear(3, 2)})
    assert hashes(run) == before


def test_saving_a_step_taken_is_checkpoint_exists_before_behind(tmp_path: Path):
    """Step 2 is both taken and behind step 3: the more precise error wins (every rank of a
    DDP job raises the same one)."""
    run = tmp_path / "run"
    make_run(run)
    with (
        Checkpointer(run, keep_last=3, async_save=False) as ckpt,
        pytest.raises(CheckpointExistsError, match="step 2 already exists"),
    ):
        ckpt.save(2, {"model": torch.nn.Linear(3, 2)})


def test_saving_a_step_older_than_the_last_save_is_refused(tmp_path: Path):
    run = tmp_path / "run"
    with Checkpointer(run, keep_last=1, async_save=False) as ckpt:
        ckpt.save(5, {"model": torch.nn.Linear(3, 2)})
        with pytest.raises(StepBehindError, match="last save or restore"):
            ckpt.save(4, {"model": torch.nn.Linear(3, 2)})
        assert [e.step for e in RunDirectory(LocalStorage(run)).committed()] == [5]


def test_after_a_rewind_saves_go_on_and_the_old_runs_newer_steps_are_no_dedup_source(
    tmp_path: Path,
):
    run2 = tmp_path / "run2"
    with Checkpointer(run2, keep_last=3, async_save=False) as ckpt:
        for step in (10, 20, 30):
            ckpt.save(step, {"model": torch.nn.Linear(3, 2)})
    old = hashes(run2)
    with Checkpointer(run2, keep_last=3, async_save=False) as ckpt:
        ckpt.restore({"model": torch.nn.Linear(3, 2)}, which=10)
        ckpt.save(15, {"model": torch.nn.Linear(3, 2)})
        ckpt.save(16, {"model": torch.nn.Linear(3, 2)})
    steps = [e.step for e in RunDirectory(LocalStorage(run2)).committed()]
    assert steps == [15, 16, 30]  # keep_last counts in commit order: 10, then 20, went first
    name = f"{checkpoint_dirname(30)}/tensors.safetensors"
    assert hashes(run2)[name] == old[name]
    manifest = json.loads((run2 / checkpoint_dirname(16) / "manifest.json").read_text())
    files = {rec["file"] for rec in manifest["tensors"].values()}
    assert all(not f.startswith((checkpoint_dirname(20), checkpoint_dirname(30))) for f in files)


@pytest.mark.parametrize("kind", ["foreign", "symlink", "symlink/", "symlink/."])
def test_demo_fresh_refuses_foreign_content_or_a_symlink(tmp_path: Path, capsys, kind: str):
    """A link given as `link/` or `link/.` leads through it as well: that once emptied the
    linked run, then failed with "Not a directory"."""
    run = tmp_path / "run"
    assert main(["demo", "--run-dir", str(run), "--epochs", "1"]) == 0
    capsys.readouterr()
    target = str(run)
    if kind == "foreign":
        (run / checkpoint_dirname(0) / "notes.txt").write_text("precious")
    else:
        os.symlink(run, tmp_path / "link")
        target = str(tmp_path / "link") + kind.removeprefix("symlink")
    before = hashes(run)
    assert main(["demo", "--run-dir", target, "--epochs", "1", "--fresh"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("haltpoint did not write" in err or "symbolic link" in err)
    assert hashes(run) == before


@pytest.mark.parametrize("async_save", [False, True])
def test_saves_after_a_rewind_warn_of_no_damage_and_collect_their_garbage(
    tmp_path: Path, async_save: bool
):
    """The old run's steps above the rewind are committed and intact: clean-up counts their
    manifests as kept (not as unreadable ones) while they are there, and keep_last, which
    counts in commit order, removes them, folders and files, before the steps saved since."""
    run = tmp_path / "run"
    model = torch.nn.Linear(3, 2)
    with Checkpointer(run, keep_last=3, async_save=False) as ckpt:
        for step in (10, 20, 30):
            ckpt.save(step, {"model": model})
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with Checkpointer(run, keep_last=2, async_save=async_save) as ckpt:
            ckpt.restore({"model": model}, which=10)
            for step, left in ((15, [15, 30]), (16, [15, 16]), (17, [16, 17])):
                with torch.no_grad():
                    model.weight.add_(1.0)
                ckpt.save(step, {"model": model})
                ckpt.wait()
                folders = sorted(p.name for p in run.iterdir() if p.name.startswith("step-"))
                assert folders == [checkpoint_dirname(s) for s in left]  # oldest committed first
            ckpt.list()
    assert [str(w.message) for w in said] == []


def test_saves_after_a_rewind_still_warn_of_a_damaged_manifest(tmp_path: Path):
    run = tmp_path / "run"
    model = torch.nn.Linear(3, 2)
    with Checkpointer(run, keep_last=3, async_save=False) as ckpt:
        for step in (10, 20, 30):
            ckpt.save(step, {"model": model})
    manifest = run / checkpoint_dirname(20) / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:-20])
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with Checkpointer(run, keep_last=1, async_save=False) as ckpt:
            ckpt.restore({"model": model}, which=10)
            ckpt.save(15, {"model": model})
            ckpt.save(16, {"model": model})
    assert any("deleted no leftover files" in str(w.message) for w in said)
    assert manifest.exists() and (run / checkpoint_dirname(20) / "tensors.safetensors").exists()


@pytest.mark.parametrize("async_save", [False, True])
@pytest.mark.parametrize(
    ("call", "nth"),
    [("remove_many", 1), ("remove_many", 2), ("rmdir", 1)],
    ids=["manifests", "files", "folders"],
)
def test_a_removal_failing_after_the_commit_warns_and_the_save_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, async_save: bool, call: str, nth: int
):
    """Retention removes the manifests, then the files, then the folders: an OSError at any
    of them (a permission denied, an I/O error) leaves the committed save alone and the step
    for a later pass, with one warning line naming it."""
    run = tmp_path / "run"
    model = torch.nn.Linear(3, 2)
    real = getattr(LocalStorage, call)
    calls = {"n": 0}

    def failing(self: LocalStorage, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == nth:
            raise PermissionError(13, "Permission denied", str(run / checkpoint_dirname(1)))
        return real(self, *args, **kwargs)

    with Checkpointer(run, keep_last=1, async_save=async_save) as ckpt:
        ckpt.save(1, {"model": model})
        ckpt.wait()
        monkeypatch.setattr(LocalStorage, call, failing)
        with pytest.warns(UserWarning, match="could not remove step 1") as said:
            ckpt.save(2, {"model": model})
            ckpt.wait()
        monkeypatch.undo()
        assert "Permission denied" in str(said[0].message)
        assert "\n" not in str(said[0].message)
        assert ckpt.restore({"model": model}).step == 2
        ckpt.save(3, {"model": model})  # the later pass removes what was left
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step-")) == [
        checkpoint_dirname(3)
    ]


@pytest.mark.parametrize("async_save", [False, True])
@pytest.mark.parametrize("listing", ["run directory", "quarantine"])
def test_a_listing_failing_in_retention_after_the_commit_warns_and_the_save_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, async_save: bool, listing: str
):
    """Retention lists the quarantine and the run directory before it removes files: an OS
    error there (an I/O error) is one warning line; the committed save returns."""
    run = tmp_path / "run"
    model = torch.nn.Linear(3, 2)
    real_remove, real_listdir = RunDirectory.remove, LocalStorage.listdir
    failing = {"on": False}

    def remove(self: RunDirectory, *args, **kwargs):  # type: ignore[no-untyped-def]
        failing["on"] = True
        try:
            return real_remove(self, *args, **kwargs)
        finally:
            failing["on"] = False

    def listdir(self: LocalStorage, rel: str = "") -> list[str]:
        wanted = "" if listing == "run directory" else "quarantine"
        if failing["on"] and rel == wanted:
            raise OSError(5, "Input/output error", str(run / rel))
        return real_listdir(self, rel)

    with Checkpointer(run, keep_last=1, async_save=async_save) as ckpt:
        ckpt.save(1, {"model": model})
        ckpt.wait()
        (run / "quarantine").mkdir(exist_ok=True)
        monkeypatch.setattr(RunDirectory, "remove", remove)
        monkeypatch.setattr(LocalStorage, "listdir", listdir)
        with pytest.warns(UserWarning, match="could not remove step 1") as said:
            ckpt.save(2, {"model": model})
            ckpt.wait()
        monkeypatch.undo()
        assert "Input/output error" in str(said[0].message) and "\n" not in str(said[0].message)
        assert ckpt.restore({"model": model}).step == 2


def test_a_quarantine_move_failing_in_retention_warns_and_removes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Retention verifies what it keeps and sets a damaged one aside: when that move fails
    (an OSError after the commit), the save returns, with a warning, and nothing goes."""
    run = tmp_path / "run"
    model = torch.nn.Linear(3, 2)
    with Checkpointer(run, keep_last=3, async_save=False) as ckpt:
        for step in (1, 2):
            ckpt.save(step, {"model": model})
    tensors = run / checkpoint_dirname(2) / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0x10
    tensors.write_bytes(bytes(data))
    before = hashes(run)

    def denied(self: LocalStorage, rel: str, new: str) -> None:
        raise PermissionError(13, "Permission denied", rel)

    with Checkpointer(run, keep_last=2, async_save=False) as ckpt:
        monkeypatch.setattr(LocalStorage, "rename", denied)
        with pytest.warns(UserWarning, match="could not set the damaged checkpoint of step 2"):
            ckpt.save(3, {"model": model})
        monkeypatch.undo()
    after = hashes(run)
    assert {k: after.get(k) for k in before if k.startswith("step-")} == {
        k: v for k, v in before.items() if k.startswith("step-")
    }  # history.jsonl gained step 3's line
    assert (run / checkpoint_dirname(3) / "manifest.json").exists()


# -- re-saved steps: numbered tensor files -------------------------------------------------------

OWN_TENSOR_NAMES = ["tensors-1.safetensors", "tensors-2.safetensors", "tensors-12.safetensors"]
LOOK_ALIKES = [
    "tensors-0.safetensors",
    "tensors-01.safetensors",
    "tensors-1.safetensors.bak",
    "tensors-a.safetensors",
    "tensors--1.safetensors",
    "tensors-1.SAFETENSORS",
    "tensors-\u0661.safetensors",  # an Arabic-Indic one
    "my-tensors-1.safetensors",
]


def _planted_in_a_dead_folder(tmp_path: Path, name: str, data: bytes) -> Path:
    """Plant `name` in the folder of a step with no manifest, then open a writer (clean-up)."""
    run = tmp_path / "run"
    make_run(run)
    dead = run / checkpoint_dirname(0)
    dead.mkdir()
    (dead / name).write_bytes(data)
    with Checkpointer(run, keep_last=3, async_save=False):
        pass
    return dead / name


@pytest.mark.parametrize("name", OWN_TENSOR_NAMES)
def test_clean_up_removes_an_unreferenced_numbered_tensor_file_and_its_folder(
    tmp_path: Path, name: str
):
    planted = _planted_in_a_dead_folder(tmp_path, name, b"left by a re-save of step 0")
    assert not planted.parent.exists()


@pytest.mark.parametrize("name", LOOK_ALIKES)
def test_clean_up_keeps_a_file_that_only_looks_like_a_numbered_tensor_file(
    tmp_path: Path, name: str
):
    planted = _planted_in_a_dead_folder(tmp_path, name, b"someone's")
    assert planted.read_bytes() == b"someone's"


def _a_failed_then_repeated_save(run: Path, monkeypatch, async_save: bool) -> Checkpointer:
    """Save step 1 once with the commit failing (its tensor file is written), then again."""
    ckpt = Checkpointer(run, keep_last=3, async_save=async_save, capture_rng=False)
    ckpt.save(0, {"w": torch.zeros(4)})
    ckpt.wait()
    real_commit = RunDirectory.commit

    def failing_commit(self, manifest):  # type: ignore[no-untyped-def]
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(RunDirectory, "commit", failing_commit)
    with pytest.raises(OSError, match="Input/output error"):
        ckpt.save(1, {"w": torch.ones(4)})
        ckpt.wait()
    monkeypatch.setattr(RunDirectory, "commit", real_commit)
    assert (run / checkpoint_dirname(1) / "tensors.safetensors").exists()
    ckpt.save(1, {"w": torch.full((4,), 2.0)})
    ckpt.wait()
    return ckpt


@pytest.mark.parametrize("async_save", [False, True])
def test_a_re_saved_step_s_superseded_tensor_file_goes_once_the_new_one_is_committed(
    tmp_path: Path, monkeypatch, async_save: bool
):
    run = tmp_path / "run"
    ckpt = _a_failed_then_repeated_save(run, monkeypatch, async_save)
    try:
        folder = run / checkpoint_dirname(1)
        assert sorted(p.name for p in folder.iterdir()) == [
            "manifest.json",
            "tensors-1.safetensors",
        ]
        state = {"w": torch.zeros(4)}
        assert ckpt.restore(state).step == 1 and torch.equal(state["w"], torch.full((4,), 2.0))
    finally:
        ckpt.close()


def test_a_superseded_tensor_file_stays_while_the_new_checkpoint_does_not_verify(
    tmp_path: Path, monkeypatch
):
    from haltpoint.reader import RunReader

    monkeypatch.setattr(RunReader, "damage", lambda self, entry: "1 tensor(s) rotten")
    run = tmp_path / "run"
    ckpt = _a_failed_then_repeated_save(run, monkeypatch, async_save=False)
    ckpt.close()
    names = sorted(p.name for p in (run / checkpoint_dirname(1)).iterdir())
    assert names == ["manifest.json", "tensors-1.safetensors", "tensors.safetensors"]


def test_demo_fresh_deletes_a_run_with_a_re_saved_step(tmp_path: Path, capsys):
    """A demo step saved again leaves numbered tensor files: --fresh knows them for its own."""
    run = tmp_path / "run"
    assert main(["demo", "--run-dir", str(run), "--epochs", "1"]) == 0
    (run / checkpoint_dirname(0) / "tensors-1.safetensors").write_bytes(b"a re-save's")
    (run / checkpoint_dirname(0) / "tensors-2.safetensors").write_bytes(b"a later one's")
    capsys.readouterr()
    assert main(["demo", "--run-dir", str(run), "--epochs", "1", "--fresh"]) == 0
    assert capsys.readouterr().out.startswith("training from scratch")
    assert sorted(p.name for p in (run / checkpoint_dirname(0)).iterdir()) == [
        "manifest.json",
        "tensors.safetensors",
    ]


@pytest.mark.parametrize("kind", ["another run", "a damaged manifest"])
def test_demo_fresh_refuses_a_run_the_demo_did_not_save(tmp_path: Path, capsys, kind: str):
    """--fresh deletes the demo's own run: a training run of the user's (nothing but
    haltpoint's files) was deleted whole, and so was a run whose manifest cannot be read."""
    run = tmp_path / "run"
    if kind == "another run":
        make_run(run)
    else:
        assert main(["demo", "--run-dir", str(run), "--epochs", "2"]) == 0
        manifest = run / checkpoint_dirname(0) / "manifest.json"
        manifest.write_bytes(manifest.read_bytes()[:40])
    capsys.readouterr()
    before = hashes(run)
    assert main(["demo", "--run-dir", str(run), "--epochs", "1", "--fresh"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing was deleted" in err, err
    assert ("is not the demo's" if kind == "another run" else "cannot be read") in err
    assert hashes(run) == before


def test_demo_fresh_refuses_a_folder_at_a_quarantined_manifest_s_name(tmp_path: Path, capsys):
    run = tmp_path / "run"
    assert main(["demo", "--run-dir", str(run), "--epochs", "1"]) == 0
    folder = run / "quarantine" / "step-000000000-1.json"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("precious")
    capsys.readouterr()
    assert main(["demo", "--run-dir", str(run), "--epochs", "1", "--fresh"]) == 1
    assert f"holds {folder}, which haltpoint did not write" in capsys.readouterr().err
    assert (folder / "notes.txt").read_text() == "precious"


def test_demo_fresh_on_the_current_folder_empties_it_and_trains(
    tmp_path: Path, capsys, monkeypatch
):
    """`--run-dir .`: the folder cannot be removed (EINVAL); it was emptied, then the demo
    failed with "Invalid argument" and trained nothing."""
    run = tmp_path / "run"
    assert main(["demo", "--run-dir", str(run), "--epochs", "1"]) == 0
    capsys.readouterr()
    monkeypatch.chdir(run)
    assert main(["demo", "--run-dir", ".", "--epochs", "1", "--fresh"]) == 0
    assert capsys.readouterr().out.startswith("training from scratch")
    assert (run / checkpoint_dirname(0) / "manifest.json").exists()


@pytest.mark.parametrize("async_save", [False, True])
@pytest.mark.parametrize(
    "error",
    [
        OSError(5, "Input/output error"),
        PermissionError(13, "Permission denied"),
        OSError(16, "Device or resource busy"),
    ],
    ids=["EIO", "EACCES", "EBUSY"],
)
def test_a_superseded_tensor_file_that_cannot_be_removed_is_one_warning_not_an_error(
    tmp_path: Path, monkeypatch, async_save: bool, error: OSError
):
    """The save is committed before the clean-up: an OS error there costs a warning."""

    def failing_remove_many(self, rels):  # type: ignore[no-untyped-def]
        if any("tensors.safetensors" in rel for rel in rels):
            raise error
        return real_remove_many(self, rels)

    real_remove_many = LocalStorage.remove_many
    monkeypatch.setattr(LocalStorage, "remove_many", failing_remove_many)
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = _a_failed_then_repeated_save(run, monkeypatch, async_save)
        ckpt.close()
    said = [str(w.message) for w in caught if "superseded" in str(w.message)]
    assert len(said) == 1 and "\n" not in said[0], [str(w.message) for w in caught]
    assert error.strerror in said[0] and "step 1" in said[0] and "committed" in said[0]
    state = {"w": torch.zeros(4)}
    with Checkpointer(run, read_only=True) as reader:
        assert reader.restore(state).step == 1
    assert torch.equal(state["w"], torch.full((4,), 2.0))
    monkeypatch.setattr(LocalStorage, "remove_many", real_remove_many)
    with Checkpointer(run, keep_last=3, async_save=False):  # the next writer's clean-up
        pass
    names = sorted(p.name for p in (run / checkpoint_dirname(1)).iterdir())
    assert names == ["manifest.json", "tensors-1.safetensors"]


@pytest.mark.parametrize("inside", ["empty", "file", "nested"])
def test_demo_fresh_refuses_a_dcp_folder_the_demo_never_writes(tmp_path: Path, capsys, inside: str):
    """The demo saves no sharded state: a `dcp/` folder in one of its step folders is not its
    own, whatever it holds (it was skipped unread and deleted with the run)."""
    run = tmp_path / "run"
    assert main(["demo", "--run-dir", str(run), "--epochs", "1"]) == 0
    dcp = run / checkpoint_dirname(0) / "dcp"
    dcp.mkdir()
    if inside == "file":
        (dcp / "notes.txt").write_text("precious")
    elif inside == "nested":
        (dcp / "a" / "b").mkdir(parents=True)
        (dcp / "a" / "b" / "__0_0.distcp").write_bytes(b"precious shards")
    capsys.readouterr()
    before = hashes(run)
    assert main(["demo", "--run-dir", str(run), "--epochs", "1", "--fresh"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"holds {dcp}, which haltpoint did not write" in err, err
    assert hashes(run) == before and dcp.is_dir()


@pytest.mark.parametrize("kind", ["another run's", "undecodable"])
def test_demo_fresh_refuses_a_quarantined_manifest_it_cannot_prove_the_demo_s(
    tmp_path: Path, capsys, kind: str
):
    """A quarantined manifest of another run (its data is in the run's step folders), or one
    that does not decode, was deleted with the run: only the committed ones were checked.
    (One of the demo's own is deleted: `test_demo_fresh_deletes_a_quarantined_demo_checkpoint`.)"""
    run = tmp_path / "run"
    assert main(["demo", "--run-dir", str(run), "--epochs", "1"]) == 0
    quarantined = run / "quarantine" / "step-000000000-1.json"
    quarantined.parent.mkdir()
    if kind == "another run's":
        other = tmp_path / "other"
        make_run(other)
        quarantined.write_bytes((other / checkpoint_dirname(3) / "manifest.json").read_bytes())
    else:
        quarantined.write_bytes(b'{"format_version": 1, "step": 0, "tensors": {')
    capsys.readouterr()
    before = hashes(run)
    assert main(["demo", "--run-dir", str(run), "--epochs", "1", "--fresh"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing was deleted" in err, err
    assert str(quarantined) in err
    assert hashes(run) == before


def test_demo_fresh_deletes_a_quarantined_demo_checkpoint(tmp_path: Path, capsys):
    run = tmp_path / "run"
    assert main(["demo", "--run-dir", str(run), "--epochs", "2"]) == 0
    (run / "quarantine").mkdir()
    (run / checkpoint_dirname(0) / "manifest.json").rename(
        run / "quarantine" / "step-000000000-1.json"
    )
    capsys.readouterr()
    assert main(["demo", "--run-dir", str(run), "--epochs", "1", "--fresh"]) == 0
    assert capsys.readouterr().out.startswith("training from scratch")
    assert not (run / "quarantine").exists()


def test_demo_fresh_refuses_a_quarantine_name_the_quarantine_never_reads(tmp_path: Path, capsys):
    """A name of 20 digits looks like a quarantined manifest but is none haltpoint wrote (a
    step is below 2**63): it is another tool's file, so --fresh deletes nothing."""
    run = tmp_path / "run"
    assert main(["demo", "--run-dir", str(run), "--epochs", "2"]) == 0
    (run / "quarantine").mkdir()
    foreign = run / "quarantine" / ("step-" + "9" * 20 + "-1.json")
    foreign.write_text("{}")
    capsys.readouterr()
    assert main(["demo", "--run-dir", str(run), "--epochs", "1", "--fresh"]) == 1
    assert f"it holds {foreign}, which haltpoint did not write" in capsys.readouterr().err
    assert foreign.exists() and (run / checkpoint_dirname(1) / "manifest.json").exists()


# -- an I/O error is not proof of damage: EIO, a timeout, a stale NFS handle, ... -------------

IO_ERRORS = [errno.EIO, errno.ETIMEDOUT, errno.ESTALE, errno.ENXIO, errno.ECONNRESET]


def _fail_open(monkeypatch, target: str, code: int) -> None:
    """Every open of a path ending in `target` fails with the OS error `code`."""
    real_open, real_os_open = open, os.open

    def failing(real):  # type: ignore[no-untyped-def]
        def opened(file, *args, **kwargs):  # type: ignore[no-untyped-def]
            if str(file).endswith(target):
                raise OSError(code, os.strerror(code), str(file))
            return real(file, *args, **kwargs)

        return opened

    monkeypatch.setattr("builtins.open", failing(real_open))
    monkeypatch.setattr(os, "open", failing(real_os_open))


def _fail_reads(monkeypatch, code: int) -> None:
    """Every positional read of a tensor file fails with `code`, after it opened fine (a disk
    that fails while the data is read, not at the header)."""

    def preadv(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "preadv", preadv)


@pytest.mark.parametrize("where", ["open", "read"])
@pytest.mark.parametrize("code", IO_ERRORS, ids=errno.errorcode.get)
def test_an_io_error_reading_a_checkpoint_is_not_damage(
    tmp_path: Path, monkeypatch, code: int, where: str
):
    """A writer's restore passed over the newest step as damaged and quarantined it (its
    manifest moved aside, the step free to be overwritten) on an error that may pass."""
    run = tmp_path / "run"
    make_run(run)
    before = hashes(run)
    with Checkpointer(run, keep_last=3, async_save=False) as ckpt:
        if where == "open":
            _fail_open(monkeypatch, f"{checkpoint_dirname(3)}/tensors.safetensors", code)
        else:
            _fail_reads(monkeypatch, code)
        with pytest.raises(UnreadableCheckpointError, match=os.strerror(code)) as raised:
            ckpt.restore({"model": torch.nn.Linear(3, 2)})
        monkeypatch.undo()
        assert "\n" not in str(raised.value) and "not damage" in str(raised.value)
    assert not (run / "quarantine").exists()
    assert hashes(run) == before


@pytest.mark.parametrize("code", IO_ERRORS, ids=errno.errorcode.get)
def test_retention_never_sets_a_checkpoint_aside_on_an_io_error(
    tmp_path: Path, monkeypatch, code: int
):
    """Retention verifies the checkpoint it keeps in place of one it removes: an I/O error
    there counted as damage, so step 3 was quarantined and step 1 removed."""
    run = tmp_path / "run"
    make_run(run)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Checkpointer(run, keep_last=2, async_save=False) as ckpt:
            _fail_open(monkeypatch, f"{checkpoint_dirname(3)}/tensors.safetensors", code)
            ckpt.save(4, {"model": torch.nn.Linear(3, 2)})
            monkeypatch.undo()
    said = " ".join(str(w.message) for w in caught)
    assert os.strerror(code) in said and "removed no checkpoint" in said, said
    assert not (run / "quarantine").exists()
    assert [e.step for e in RunDirectory(LocalStorage(run)).committed()] == [1, 2, 3, 4]


@pytest.mark.parametrize("code", IO_ERRORS, ids=errno.errorcode.get)
def test_verify_and_ls_report_an_io_error_as_unreadable_not_damaged(
    tmp_path: Path, monkeypatch, capsys, code: int
):
    """verify says which step it could not read, and still checks the others."""
    run = tmp_path / "run"
    make_run(run)
    _fail_open(monkeypatch, f"{checkpoint_dirname(2)}/tensors.safetensors", code)
    status = main(["verify", str(run), "--json"])
    monkeypatch.undo()
    checks = json.loads(capsys.readouterr().out)["checkpoints"]
    assert status == 1
    assert [(c["step"], c["status"]) for c in checks] == [
        (1, "intact"),
        (2, "unreadable"),
        (3, "intact"),
    ]
    assert os.strerror(code) in checks[1]["error"] and "not damage" in checks[1]["error"]
    _fail_open(monkeypatch, f"{checkpoint_dirname(2)}/tensors.safetensors", code)
    status = main(["verify", str(run)])
    monkeypatch.undo()
    out = capsys.readouterr().out
    assert status == 1 and "step 2 was not verified" in out and "damaged" not in out, out
    _fail_open(monkeypatch, f"{checkpoint_dirname(3)}/manifest.json", code)
    assert main(["ls", str(run), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    monkeypatch.undo()
    assert [e["status"] for e in listed if e["step"] == 3] == ["unreadable"]
    assert not (run / "quarantine").exists()


@pytest.mark.parametrize("kind", ["no run", "foreign", "another run", "link"])
def test_demo_fresh_refusals_are_checkpoint_errors(tmp_path: Path, kind: str):
    """What the run directory holds makes --fresh refuse: a `CheckpointError`, like every
    other failure a run directory causes (they were bare `ValueError`s)."""
    from haltpoint.cli.demo import _delete_run

    run = tmp_path / "run"
    if kind == "no run":
        run.mkdir()
        (run / "notes.txt").write_text("precious")
    elif kind == "another run":
        make_run(run)
    else:
        assert main(["demo", "--run-dir", str(run), "--epochs", "1"]) == 0
        if kind == "foreign":
            (run / "notes.txt").write_text("precious")
        else:
            os.symlink(run, tmp_path / "link")
            run = tmp_path / "link"
    before = hashes(tmp_path)
    with pytest.raises(CheckpointError, match="--fresh deletes") as refused:
        _delete_run(str(run))
    assert refused.value.path == str(run) and "\n" not in str(refused.value)
    assert hashes(tmp_path) == before


@pytest.mark.parametrize("whose", ["another run's", "the demo's"])
def test_demo_fresh_deletes_a_history_alone_only_when_it_is_the_demo_s(
    tmp_path: Path, capsys, whose: str
):
    """A folder holding nothing but another run's history.jsonl (its checkpoints gone) looks
    like a run, and --fresh deleted it: nothing in it was the demo's."""
    run = tmp_path / "run"
    if whose == "another run's":
        with Checkpointer(run, keep_last=2, async_save=False, capture_rng=False) as ckpt:
            for step in (1, 2):
                ckpt.save(step, {"w": torch.ones(2)}, {"loss": 1.0 / step})
    else:
        assert main(["demo", "--run-dir", str(run), "--epochs", "2"]) == 0
    for folder in run.glob("step-*"):
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
    capsys.readouterr()
    before = hashes(run)
    code = main(["demo", "--run-dir", str(run), "--epochs", "1", "--fresh"])
    err = capsys.readouterr().err
    if whose == "the demo's":
        assert code == 0, err
        return
    assert code == 1 and err.count("\n") == 1, err
    assert "line 1 of its history.jsonl" in err and "nothing was deleted" in err
    assert hashes(run) == before


@pytest.mark.parametrize("code", [errno.EACCES, errno.EIO], ids=errno.errorcode.get)
@pytest.mark.parametrize("where", ["run", "step"])
def test_demo_fresh_on_a_run_it_cannot_read_says_nothing_was_deleted(
    tmp_path: Path, monkeypatch, capsys, code: int, where: str
):
    """A folder that cannot be listed (chmod 000, a failing disk) cannot be checked: the bare
    OSError came out as `haltpoint: error: RUN: Permission denied`."""
    run = tmp_path / "run"
    assert main(["demo", "--run-dir", str(run), "--epochs", "1"]) == 0
    capsys.readouterr()
    folder = run if where == "run" else run / checkpoint_dirname(0)
    real = os.listdir

    def listdir(path=".", *args, **kwargs):  # type: ignore[no-untyped-def]
        if os.path.abspath(path) == str(folder):
            raise OSError(code, os.strerror(code), str(folder))
        return real(path, *args, **kwargs)

    before = hashes(run)
    monkeypatch.setattr(os, "listdir", listdir)
    status = main(["demo", "--run-dir", str(run), "--epochs", "1", "--fresh"])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1, err
    assert f"--fresh deletes {run}, but cannot read {folder}" in err and os.strerror(code) in err
    assert "nothing was deleted" in err
    assert hashes(run) == before


def _fail_folder(monkeypatch, url: str, dirname: str, code: int) -> None:
    """Listing the folder `dirname` of the run at `url`, and looking up any name in it, fail
    with the OS error `code`; its files still open (a disk, an NFS server or an object store
    that fails some requests, not all)."""
    if url.startswith("memory://"):
        from fsspec.implementations.memory import MemoryFileSystem

        real_ls, real_info = MemoryFileSystem.ls, MemoryFileSystem.info

        def ls(self, path, *args, **kwargs):  # type: ignore[no-untyped-def]
            if path.rstrip("/").endswith(dirname):
                raise OSError(code, os.strerror(code), path)
            return real_ls(self, path, *args, **kwargs)

        def info(self, path, *args, **kwargs):  # type: ignore[no-untyped-def]
            if f"{dirname}/" in path:
                raise OSError(code, os.strerror(code), path)
            return real_info(self, path, *args, **kwargs)

        monkeypatch.setattr(MemoryFileSystem, "ls", ls)
        monkeypatch.setattr(MemoryFileSystem, "info", info)
        return
    folder = os.path.join(url, dirname)
    real_listdir, real_lstat = os.listdir, os.lstat

    def listdir(path=".", *args, **kwargs):  # type: ignore[no-untyped-def]
        if os.path.abspath(path) == folder:
            raise OSError(code, os.strerror(code), folder)
        return real_listdir(path, *args, **kwargs)

    def lstat(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if os.path.abspath(path).startswith(f"{folder}{os.sep}"):
            raise OSError(code, os.strerror(code), str(path))
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "listdir", listdir)
    monkeypatch.setattr(os, "lstat", lstat)


@pytest.mark.parametrize("where", ["local", "memory"])
@pytest.mark.parametrize("restored", [True, False])
@pytest.mark.parametrize("code", [errno.EACCES, *IO_ERRORS], ids=errno.errorcode.get)
def test_a_save_never_overwrites_a_checkpoint_it_cannot_see(
    tmp_path: Path, monkeypatch, code: int, restored: bool, where: str
):
    """The newest step's folder could not be read for a moment: a restore of step 2 passed
    over it (before, "latest" did too: not damage), and saving that step again took "cannot
    tell" for "no checkpoint there" (the existence check, `os.path.lexists` or fsspec's
    `exists`, swallowed the error): it
    truncated the step's tensor file and replaced its manifest, an intact checkpoint
    overwritten by a different one."""
    url = str(tmp_path / "run") if where == "local" else f"memory://w-{uuid.uuid4().hex}/run"
    with Checkpointer(url, keep_last=3, async_save=False) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, {"model": torch.nn.Linear(3, 2)})
    storage = open_storage(url)
    files = [
        f"{d}/{n}" for d in storage.listdir() if d.startswith("step-") for n in storage.listdir(d)
    ]
    before = {rel: storage.read_bytes(rel) for rel in files}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unreadable folder is warned about at open
        with Checkpointer(url, keep_last=3, async_save=False) as ckpt:
            _fail_folder(monkeypatch, url, checkpoint_dirname(3), code)
            if restored:  # "latest" refuses to resume behind it; step 2 asked for by number
                with pytest.raises(UnreadableCheckpointError, match="newer than step 2"):
                    ckpt.restore({"model": torch.nn.Linear(3, 2)})
                assert ckpt.restore({"model": torch.nn.Linear(3, 2)}, which=2).step == 2
            with pytest.raises(UnreadableCheckpointError, match=os.strerror(code)) as refused:
                ckpt.save(3, {"model": torch.nn.Linear(3, 2)})
            monkeypatch.undo()
    message = str(refused.value)
    assert "\n" not in message and checkpoint_dirname(3) in message, message
    assert "nothing was written" in message, message
    assert {rel: storage.read_bytes(rel) for rel in files} == before
    assert [e.step for e in RunDirectory(storage).committed()] == [1, 2, 3]


def test_a_writer_whose_lock_file_was_deleted_commits_nothing(tmp_path: Path, monkeypatch):
    """The lock file was deleted while the writer held it (by hand, as LockedError's advice
    for a holder on another host says; a clean-up script): a second writer then took a lock
    of its own and committed step 4 while the first was writing its own step 4, whose commit
    (an atomic rename) replaced the second's manifest: a checkpoint that `save` had reported
    committed was gone."""
    import haltpoint.store.writer

    run = tmp_path / "run"
    make_run(run)
    real_write = haltpoint.store.writer.write_tensor_file
    theirs = torch.nn.Linear(3, 2)

    def write(*args, **kwargs):  # type: ignore[no-untyped-def]
        records = real_write(*args, **kwargs)  # this writer's data is written: then the other
        monkeypatch.setattr(haltpoint.store.writer, "write_tensor_file", real_write)
        with Checkpointer(run, keep_last=5, async_save=False) as other:
            other.save(4, {"model": theirs})
        return records

    with Checkpointer(run, keep_last=5, async_save=False) as ckpt:
        (run / ".haltpoint.lock").unlink()
        monkeypatch.setattr(haltpoint.store.writer, "write_tensor_file", write)
        with pytest.raises(LockedError, match=r"lock file .* was deleted or replaced") as lost:
            ckpt.save(4, {"model": torch.nn.Linear(3, 2)})
        monkeypatch.undo()
    assert "\n" not in str(lost.value) and "nothing was committed" in str(lost.value)
    assert intact_steps(run) == {1, 2, 3, 4}
    with Checkpointer(run, read_only=True) as reader:
        restored = torch.nn.Linear(3, 2)
        assert reader.restore({"model": restored}, 4).step == 4
    assert torch.equal(restored.weight, theirs.weight)  # the second writer's, as committed
