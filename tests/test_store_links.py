"""No file haltpoint writes in a local run directory is written through a symbolic link: a
link at the name of the lock, the history, a manifest, its temporary file, a pin marker, a
tensor file or a checkpoint folder is refused with `LinkedFileError`, and its target keeps its
bytes."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from haltpoint import Checkpointer, CheckpointError, HistoryNotWrittenError, LinkedFileError
from haltpoint.cli import main
from haltpoint.store.direct_io import AlignedFileWriter
from haltpoint.store.manifest import Manifest
from haltpoint.store.quarantine import move_to_quarantine
from haltpoint.store.run_dir import RunDirectory
from haltpoint.store.storage import LocalStorage
from haltpoint.store.tensor_writer import write_tensor_file

MANIFEST = "step-000000001/manifest.json"
TENSORS = "step-000000001/tensors.safetensors"


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run with two committed checkpoints (steps 1 and 2) and no writer."""
    run = tmp_path / "run"
    with Checkpointer(run, keep_last=5, async_save=False, capture_rng=False) as ckpt:
        for step in (1, 2):
            ckpt.save(step, {"w": torch.full((1000,), float(step))}, {"loss": 1.0 / step})
    return run


def planted(run: Path, name: str, target: str) -> dict[Path, bytes]:
    """Make `name` a link to `target` in `run`; return the bytes of every checkpoint file (all
    but the lock, which every writer rewrites)."""
    (run / name).parent.mkdir(parents=True, exist_ok=True)
    (run / name).unlink(missing_ok=True)
    os.symlink(run / target, run / name)
    files = [p for p in run.rglob("*") if p.is_file() and not p.is_symlink()]
    return {p: p.read_bytes() for p in files if p.name != ".haltpoint.lock"}


def unchanged(before: dict[Path, bytes]) -> bool:
    return all(path.read_bytes() == data for path, data in before.items())


def writer(run: Path) -> Checkpointer:
    return Checkpointer(run, keep_last=5, async_save=False, capture_rng=False)


def test_a_linked_lock_file_is_refused_at_open(run: Path) -> None:
    before = planted(run, ".haltpoint.lock", MANIFEST)
    with pytest.raises(LinkedFileError, match=r"\.haltpoint\.lock is a symbolic link; haltpoint"):
        writer(run)
    assert unchanged(before)


@pytest.mark.parametrize("target", [MANIFEST, TENSORS])
def test_a_linked_history_is_refused_at_open_and_its_target_kept(run: Path, target: str) -> None:
    before = planted(run, "history.jsonl", target)
    with pytest.raises(LinkedFileError, match=r"history\.jsonl is a symbolic"):
        writer(run)
    assert unchanged(before)
    assert not (run / "step-000000003").exists()


def test_a_history_linked_while_the_writer_is_open_is_not_written_through(run: Path) -> None:
    with writer(run) as ckpt:
        before = planted(run, "history.jsonl", MANIFEST)
        with pytest.raises(HistoryNotWrittenError, match=r"step 3 is committed.*symbolic link"):
            ckpt.save(3, {"w": torch.zeros(1000)}, {"loss": 0.1})
    assert unchanged(before)


def test_a_linked_manifest_is_refused_at_commit(run: Path) -> None:
    before = planted(run, "step-000000003/manifest.json", MANIFEST)
    manifest = Manifest(step=3, time=0.0, metrics={}, tree={}, tensors={}, versions={})
    with pytest.raises(LinkedFileError, match=r"manifest\.json is a symbolic link"):
        RunDirectory(LocalStorage(run)).commit(manifest)
    assert unchanged(before)


@pytest.mark.parametrize("name", ["step-000000003", "step-000000003/manifest.json"])
def test_saving_into_a_linked_folder_or_manifest_is_refused(run: Path, name: str) -> None:
    target = "step-000000001" if "/" not in name else MANIFEST
    with writer(run) as ckpt:
        before = planted(run, name, target)  # planted while the writer is open
        with pytest.raises(LinkedFileError, match=r"step-000000003.* is a symbolic link"):
            ckpt.save(3, {"w": torch.zeros(1000)})
    assert unchanged(before)


def test_a_linked_pin_marker_is_refused(run: Path) -> None:
    before = planted(run, "step-000000002/pinned", MANIFEST)
    with writer(run) as ckpt, pytest.raises(LinkedFileError, match="pinned is a symbolic link"):
        ckpt.pin(2)
    assert unchanged(before)


def test_a_linked_temporary_file_is_refused(run: Path, monkeypatch) -> None:
    fixed = uuid.UUID(int=0xABCDEF12 << 96)
    monkeypatch.setattr(uuid, "uuid4", lambda: fixed)
    before = planted(run, f"step-000000001/pinned.{fixed.hex[:8]}.tmp", MANIFEST)
    with pytest.raises(LinkedFileError, match=r"pinned\.abcdef12\.tmp is a symbolic link"):
        LocalStorage(run).publish("step-000000001/pinned", b"")
    assert unchanged(before)


@pytest.mark.parametrize(
    "write",
    [
        lambda s, rel: write_tensor_file(s, rel, {"w": torch.zeros(10)}),
        lambda s, rel: write_tensor_file(s, rel, {"w": torch.zeros(10)}, direct=False),
        lambda s, rel: AlignedFileWriter(s.write_path(rel) or "").close(),
        lambda s, rel: s.open_write(rel).__enter__(),
    ],
    ids=["direct", "buffered", "aligned-writer", "open_write"],
)
def test_a_linked_tensor_file_is_refused(
    run: Path, write: Callable[[LocalStorage, str], object]
) -> None:
    before = planted(run, "step-000000003/tensors.safetensors", TENSORS)
    with pytest.raises(LinkedFileError, match=r"tensors\.safetensors is a symbolic link"):
        write(LocalStorage(run), "step-000000003/tensors.safetensors")
    assert unchanged(before)


def test_a_linked_checkpoint_folder_is_refused_and_only_the_link_removed(run: Path) -> None:
    (run / "spare").mkdir()
    (run / "spare" / "tensors.safetensors").write_bytes(b"not ours to touch")
    with writer(run) as ckpt:
        before = planted(run, "step-000000003", "spare")  # planted while the writer is open
        with pytest.raises(LinkedFileError, match="step-000000003 is a symbolic link"):
            ckpt.save(3, {"w": torch.zeros(1000)})
    assert unchanged(before)
    writer(run).close()  # clean-up at open removes the link, not the files it leads to
    assert not (run / "step-000000003").exists() and unchanged(before)


@pytest.mark.parametrize("link", ["quarantine", "step-000000002"])
def test_quarantine_never_moves_through_a_linked_folder(run: Path, link: str) -> None:
    (run / "spare").mkdir()
    (run / "spare" / "manifest.json").write_bytes(b"not ours to move")
    if link == "step-000000002":
        shutil.rmtree(run / link)
    before = planted(run, link, "spare")
    with pytest.raises(LinkedFileError, match=f"{link} is a symbolic link"):
        move_to_quarantine(LocalStorage(run), "step-000000002")
    assert unchanged(before) and (run / "spare" / "manifest.json").exists()


def test_the_error_is_one_line_and_a_checkpoint_error(run: Path) -> None:
    planted(run, ".haltpoint.lock", TENSORS)
    with pytest.raises(CheckpointError) as info:
        writer(run)
    assert "\n" not in str(info.value) and info.value.path == str(run / ".haltpoint.lock")


@pytest.mark.parametrize("clean", ["gc", "writer"])
def test_a_step_whose_tensors_link_to_another_steps_is_not_intact_and_keeps_the_other(
    tmp_path: Path, capsys, clean: str
) -> None:
    """Read through, the link would verify step 3 and retention would remove step 2's file,
    the only copy of its bytes."""
    run = tmp_path / "run"
    with writer(run) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, {"w": torch.ones(1000)}, {"loss": 1.0})  # identical tensor files
    before = planted(
        run, "step-000000003/tensors.safetensors", "step-000000002/tensors.safetensors"
    )
    assert main(["verify", str(run)]) == 1
    assert "step 3: step-000000003/tensors.safetensors: " in (out := capsys.readouterr().out)
    assert "is a symbolic link inside the run directory" in out  # the cause, named
    if clean == "gc":
        assert main(["gc", str(run), "--keep-last", "1"]) == 0
    else:
        Checkpointer(run, keep_last=1, async_save=False, capture_rng=False).close()
    assert unchanged({p: b for p, b in before.items() if "step-000000002" in str(p)})
    with Checkpointer(run, read_only=True) as reader:
        assert reader.restore({"w": torch.zeros(1000)}, 2).step == 2  # read and verified


def test_a_run_directory_at_the_file_system_root_is_read_not_called_a_link_out_of_itself(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`haltpoint ls /` said "/quarantine is a symlink to /quarantine, outside the run
    directory": below "/", every path was taken for one leading out of it."""
    assert not any(p.name.startswith("step-") for p in Path("/").iterdir())
    assert LocalStorage("/", create=False).local_path("quarantine") == "/quarantine"
    assert main(["ls", "/"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "no checkpoints in /\n" and captured.out == ""
    os.symlink(tmp_path, tmp_path / "link")  # a run reached through a link to it reads too
    assert LocalStorage(tmp_path / "link", create=False).local_path("x") == str(
        tmp_path / "link" / "x"
    )


def hard_linked(run: Path, name: str, target: str) -> dict[Path, bytes]:
    """Make `name` in `run` another name (a hard link) of the file `target`; return the bytes
    of every checkpoint file."""
    (run / name).unlink(missing_ok=True)
    os.link(run / target, run / name)
    files = [p for p in run.rglob("*") if p.is_file() and p.name not in (".haltpoint.lock",)]
    return {p: p.read_bytes() for p in files if p.name != "history.jsonl"}


@pytest.mark.parametrize(
    ("name", "op"),
    [
        (".haltpoint.lock", "writer"),
        (".haltpoint.lock", "gc"),
        (".haltpoint.lock", "import"),
        ("history.jsonl", "writer"),
        ("history.jsonl", "import"),  # gc writes no history
    ],
)
def test_a_hard_linked_lock_or_history_is_refused_and_its_other_name_kept(
    run: Path, tmp_path: Path, capsys, name: str, op: str
) -> None:
    """The lock and the history are changed in place (the lock truncated and rewritten, the
    history appended to): at the name of one, a hard link to a checkpoint's tensor file (the
    same file under two names, which no symbolic-link check sees) was truncated to 0 bytes by
    every writer's open, `gc` and `import`, or had a history line appended; the writer's
    retention then set the destroyed newest checkpoint aside."""
    before = hard_linked(run, name, "step-000000002/tensors.safetensors")
    if op == "writer":
        refused = pytest.raises(LinkedFileError, match=rf"{name} has 2 names \(hard links\)")
        with refused as info, writer(run) as ckpt:
            ckpt.save(3, {"w": torch.zeros(1000)}, {"loss": 0.1})
        assert "\n" not in str(info.value) and info.value.path == str(run / name)
    else:
        torch.save({"w": torch.zeros(3)}, tmp_path / "model.pt")
        argv = (
            ["gc", str(run), "--keep-last", "5"]
            if op == "gc"
            else ["import", str(tmp_path / "model.pt"), "-o", str(run), "--step", "3"]
        )
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{name} has 2 names (hard links)" in err, err
    assert unchanged(before)
    assert not (run / "step-000000003").exists()
    with Checkpointer(run, read_only=True) as reader:
        assert reader.restore({"w": torch.zeros(1000)}).step == 2  # read and verified


def test_a_history_hard_linked_while_the_writer_is_open_is_not_written_through(
    run: Path,
) -> None:
    with writer(run) as ckpt:
        before = hard_linked(run, "history.jsonl", TENSORS)
        with pytest.raises(HistoryNotWrittenError, match=r"step 3 is committed.*hard links"):
            ckpt.save(3, {"w": torch.zeros(1000)}, {"loss": 0.1})
    assert unchanged(before)


@pytest.mark.parametrize("kind", ["loop", "missing target"])
def test_a_run_directory_that_is_a_dangling_link_is_named_so(tmp_path: Path, capsys, kind) -> None:
    """A run directory given as a symbolic link that resolves to nothing (a loop, or a target
    not made yet) was "does not exist" to the commands and "File exists" to a writer; both
    now say it is a link that does not resolve, naming where it points, and create nothing."""
    link = tmp_path / "run"
    if kind == "loop":
        os.symlink(tmp_path / "other", link)
        os.symlink(link, tmp_path / "other")
    else:
        os.symlink(tmp_path / "scratch" / "run", link)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CheckpointError, match="symbolic link that does not resolve") as info:
        Checkpointer(link)
    assert "\n" not in str(info.value)
    assert main(["ls", str(link)]) != 0
    assert "symbolic link that does not resolve" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
