"""The storage boundary: relative paths only, atomic publish, no way out through symlinks."""

from __future__ import annotations

import os
import uuid
import warnings
from pathlib import Path

import pytest
import torch

from haltpoint import (
    Checkpointer,
    CorruptCheckpointError,
    LinkedFileError,
    UnreadableCheckpointError,
    UnwritableRunError,
    load_best,
)
from haltpoint.store.storage import (
    FsspecStorage,
    LocalStorage,
    Storage,
    check_relpath,
    open_storage,
)


@pytest.fixture(params=["local", "memory"])
def storage(request, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "run")
    return FsspecStorage(f"memory://storage-test-{uuid.uuid4().hex}/run")


@pytest.mark.parametrize(
    "rel",
    ["/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/.", "C:/x", "a\\b", "a\x00b", ""],
)
def test_paths_that_leave_the_run_are_refused(rel: str) -> None:
    with pytest.raises(CorruptCheckpointError):
        check_relpath(rel)


def test_write_read_list_and_remove(storage: Storage) -> None:
    storage.makedirs("step-000000001")
    with storage.open_write("step-000000001/data") as f:
        f.write(b"abc")
    storage.publish("step-000000001/manifest.json", b"{}")
    assert storage.listdir() == ["step-000000001"]
    assert storage.listdir("step-000000001") == ["data", "manifest.json"]
    assert storage.read_bytes("step-000000001/data") == b"abc"
    assert storage.size("step-000000001/data") == 3
    with storage.open_read("step-000000001/data") as f:
        assert f.read() == b"abc"
    assert storage.isdir("step-000000001") and not storage.isdir("step-000000001/data")
    storage.remove("step-000000001/data")
    storage.remove("step-000000001/data")  # a missing file is not an error
    storage.rmtree("step-000000001")
    assert storage.listdir() == [] and storage.listdir("nothing-here") == []


def test_a_failed_write_leaves_no_file(storage: Storage) -> None:
    with pytest.raises(RuntimeError, match="boom"), storage.open_write("partial") as f:
        f.write(b"half")
        raise RuntimeError("boom")
    assert not storage.exists("partial")


def test_publish_replaces_atomically_and_leaves_no_temporary(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.publish("m.json", b"one")
    storage.publish("m.json", b"two")
    assert (tmp_path / "m.json").read_bytes() == b"two"
    assert sorted(os.listdir(tmp_path)) == ["m.json"]


def test_symlinks_out_of_the_run_are_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    storage = LocalStorage(tmp_path / "run")
    os.symlink(outside, tmp_path / "run" / "step-000000001")
    os.symlink(outside / "secret", tmp_path / "run" / "leak")
    for call in (
        lambda: storage.read_bytes("leak"),
        lambda: storage.open_read("step-000000001/secret"),
        lambda: storage.size("leak"),
        lambda: storage.listdir("step-000000001"),
    ):
        with pytest.raises(CorruptCheckpointError, match="outside the run directory"):
            call()
    for call in (
        lambda: storage.publish("step-000000001/manifest.json", b"{}"),
        lambda: storage.makedirs("step-000000001/x"),
    ):
        with pytest.raises(LinkedFileError, match="step-000000001 is a symbolic link"):
            call()
    storage.rmtree("step-000000001")  # removes the link, not what it points to
    assert (outside / "secret").read_bytes() == b"secret"
    assert not (outside / "manifest.json").exists()


def test_a_checkpointer_never_writes_through_a_planted_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(outside, run / "step-000000003")
    with pytest.warns(UserWarning, match="outside the run directory"):
        ckpt = Checkpointer(run, async_save=False, keep_last=2)  # reported, and the link removed
    with ckpt:
        assert not (run / "step-000000003").exists()
        ckpt.save(3, {"w": torch.zeros(2)})
        os.symlink(outside, run / "step-000000004")  # planted while the run is open
        with (
            pytest.raises(LinkedFileError, match="step-000000004 is a symbolic link"),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")  # the scan for unchanged tensors reports it too
            ckpt.save(4, {"w": torch.zeros(2)})
        with pytest.warns(UserWarning, match="outside the run directory"):
            assert [i.step for i in ckpt.list()] == [3]
    assert list(outside.iterdir()) == []
    with pytest.warns(UserWarning, match="outside the run directory"):
        assert [i.step for i in Checkpointer(run, read_only=True).list()] == [3]


def test_a_symlinked_run_directory_itself_is_fine(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    storage = LocalStorage(tmp_path / "link")
    storage.publish("a", b"1")
    assert storage.read_bytes("a") == b"1"
    with Checkpointer(tmp_path / "link", async_save=False) as ckpt:  # lock, history, tensors
        ckpt.save(1, {"w": torch.ones(2)}, {"loss": 1.0}, pin=True)
    assert (tmp_path / "real" / "step-000000001" / "pinned").exists()
    assert (tmp_path / "real" / "history.jsonl").read_bytes().count(b"\n") == 1


def test_open_storage_chooses_by_url(tmp_path: Path) -> None:
    assert isinstance(open_storage(tmp_path), LocalStorage)
    assert isinstance(open_storage(f"file://{tmp_path}/x"), LocalStorage)
    assert isinstance(open_storage("memory://open-storage-test"), FsspecStorage)


@pytest.mark.parametrize(
    ("directory", "options", "exc", "pattern"),
    [
        ("", None, ValueError, "directory must be a local path or an fsspec URL"),
        (3, None, TypeError, "directory must be a local path or an fsspec URL"),
        ("runs/x", {"anon": True}, ValueError, "storage_options only apply to fsspec URLs"),
    ],
)
def test_open_storage_errors(directory, options, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        open_storage(directory, options)


def test_a_writer_on_a_file_names_it_and_leaves_it_alone(tmp_path: Path) -> None:
    afile = tmp_path / "notes.txt"
    afile.write_text("precious")
    with pytest.raises(UnwritableRunError, match=r"notes.txt is a file, not a folder; pass"):
        Checkpointer(afile)
    assert afile.read_text() == "precious"


def test_a_reader_on_a_file_says_it_is_a_file_not_a_permission_problem(tmp_path: Path) -> None:
    # load_best("train.py", ...) said "cannot list .../train.py: Not a directory; ... fix its
    # permissions": the fix is another path, not permissions
    afile = tmp_path / "train.py"
    afile.write_text("precious")
    model = torch.nn.Linear(2, 1)
    expected = rf"cannot list {afile}: it is a file, not a folder, so it holds no checkpoint; pass"
    with pytest.raises(UnreadableCheckpointError, match=expected) as caught:
        load_best(afile, model, monitor="val_loss")
    assert "permissions" not in str(caught.value)
    with pytest.raises(UnreadableCheckpointError, match=expected):
        Checkpointer(afile, read_only=True).list()
    assert afile.read_text() == "precious"


def test_a_writer_on_a_fifo_is_refused_as_an_unwritable_run(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UnwritableRunError, match=r"pipe is not a folder; pass a folder"):
        Checkpointer(fifo)


def test_a_leading_tilde_is_the_home_folder_not_a_folder_named_tilde(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    model = torch.nn.Linear(2, 2)
    with Checkpointer("~/runs/exp1", monitor="val_loss") as ckpt:
        assert ckpt.directory == str(home / "runs" / "exp1")
        ckpt.save(0, {"model": model}, {"val_loss": 1.0})
    assert (home / "runs" / "exp1" / "step-000000000" / "manifest.json").is_file()
    assert not (cwd / "~").exists()
    assert [i.step for i in Checkpointer("~/runs/exp1", read_only=True).list()] == [0]
    assert load_best("~/runs/exp1", model, monitor="val_loss").step == 0


@pytest.mark.parametrize("directory", [None, 3])
def test_a_checkpointer_directory_of_a_wrong_type_is_named(directory) -> None:
    with pytest.raises(TypeError, match="directory must be a local path or an fsspec URL"):
        Checkpointer(directory)


def test_free_space_is_reported_locally(tmp_path: Path) -> None:
    assert LocalStorage(tmp_path).free_space() > 0
    assert FsspecStorage("memory://free-space-test").free_space() is None
