"""Quarantine: a writer moves a damaged checkpoint aside (a rename, never a delete), so the run
goes on and the step can be saved again; nothing else ever picks or deletes what it set aside."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch

from haltpoint import Checkpointer, load_best
from haltpoint.cli import main
from haltpoint.errors import UnreadableCheckpointError
from haltpoint.store.quarantine import list_quarantined
from haltpoint.store.run_dir import RunDirectory, checkpoint_dirname
from haltpoint.store.storage import FsspecStorage, LocalStorage, Storage, open_storage

TENSORS_15 = f"{checkpoint_dirname(15)}/tensors.safetensors"


@pytest.fixture(params=["local", "memory"])
def url(request, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    return f"memory://quarantine-{uuid.uuid4().hex}/run"


def weights(step: int) -> torch.Tensor:
    return torch.full((64,), float(step))


def save_10_14_15(url: str) -> None:
    """The README loop's run: step 15 is the best, then its data rots."""
    with writer(url) as ckpt:
        for step, loss in [(10, 0.3), (14, 0.5), (15, 0.1)]:
            ckpt.save(step, {"w": weights(step), "model": model(step)}, {"loss": loss})


def model(step: int) -> torch.nn.Linear:
    linear = torch.nn.Linear(2, 1)
    torch.nn.init.constant_(linear.weight, float(step))
    return linear


def flip_a_bit(storage: Storage, rel: str) -> bytes:
    data = bytearray(storage.read_bytes(rel))
    data[-3] ^= 0x10
    storage.publish(rel, bytes(data))
    return bytes(data)


def writer(url: str, **kwargs) -> Checkpointer:
    settings = {"monitor": "loss", "keep_best": 2, "keep_last": 2, "capture_rng": False}
    return Checkpointer(url, **{**settings, **kwargs})


def test_a_writer_quarantines_a_damaged_newest_checkpoint_and_saves_its_step_again(
    url: str,
) -> None:
    save_10_14_15(url)
    storage = open_storage(url)
    rotten = flip_a_bit(storage, TENSORS_15)
    state = {"w": torch.zeros(64)}
    with writer(url) as ckpt:
        with pytest.warns(UserWarning, match="set the damaged checkpoint of step 15 aside") as said:
            info = ckpt.restore(state)
        assert sum("do not match the tensor's hash" in str(w.message) for w in said) == 1
        assert info is not None and info.step == 14 and torch.equal(state["w"], weights(14))
        ckpt.save(15, {"w": weights(15) + 1}, {"loss": 0.45})  # before: CheckpointExistsError
        ckpt.wait()
        assert [i.step for i in ckpt.list()] == [10, 14, 15]
        assert ckpt.restore(state).step == 15 and torch.equal(state["w"], weights(15) + 1)
        assert ckpt.restore(state, "best").step == 10  # not the quarantined 0.1
    (held,) = RunDirectory(storage).quarantined()
    assert (held.step, held.path) == (15, "quarantine/step-000000015-1.json")
    assert held.manifest is not None and held.manifest.metrics == {"loss": 0.1}
    assert storage.read_bytes(TENSORS_15) == rotten  # its data stays, untouched
    assert held.manifest.files() == {TENSORS_15}
    new = RunDirectory(storage).read_manifest(checkpoint_dirname(15))
    assert new.files() == {f"{checkpoint_dirname(15)}/tensors-1.safetensors"}


def test_a_folder_at_a_damaged_checkpoints_pin_marker_is_refused_in_one_line_and_kept(
    tmp_path: Path,
) -> None:
    """Quarantine removes a damaged checkpoint's pin marker; a folder there (someone's files)
    is not the marker's to delete: a NotRegularFileError, never a bare IsADirectoryError."""
    from haltpoint.errors import NotRegularFileError

    url = str(tmp_path / "run")
    save_10_14_15(url)
    storage = open_storage(url)
    flip_a_bit(storage, TENSORS_15)
    theirs = tmp_path / "run" / checkpoint_dirname(15) / "pinned"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    state = {"w": torch.zeros(64)}
    refused = pytest.raises(NotRegularFileError, match="pinned is a folder, not a regular file")
    with writer(url) as ckpt, pytest.warns(UserWarning, match="damaged"), refused:
        ckpt.restore(state)
    assert (theirs / "notes.txt").read_text() == "mine"
    (theirs / "notes.txt").unlink()
    theirs.rmdir()
    with writer(url) as ckpt:
        info = ckpt.restore(state)
    assert info is not None and info.step == 14 and torch.equal(state["w"], weights(14))


def test_ls_shows_it_and_gc_keeps_the_newest_intact_checkpoint_and_the_quarantine(
    tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    save_10_14_15(str(run))
    flip_a_bit(LocalStorage(run), TENSORS_15)
    with pytest.warns(UserWarning, match="aside"), writer(str(run)) as ckpt:
        assert ckpt.restore({"w": torch.zeros(64)}).step == 14
    assert main(["ls", str(run), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    quarantined = [r for r in rows if r["status"] == "quarantined"]
    assert [(r["step"], r["metrics"]) for r in quarantined] == [(15, {"loss": 0.1})]
    assert quarantined[0]["path"].endswith("quarantine/step-000000015-1.json")
    assert main(["gc", str(run), "--keep-last", "1"]) == 0
    assert "kept steps 14" in capsys.readouterr().out
    assert [e.step for e in RunDirectory(LocalStorage(run)).committed()] == [14]
    assert (run / TENSORS_15).exists()
    assert (run / "quarantine" / "step-000000015-1.json").exists()
    assert main(["ls", str(run)]) == 0
    assert "quarantined" in capsys.readouterr().out


def test_a_step_quarantined_twice_keeps_both(url: str) -> None:
    save_10_14_15(url)
    storage = open_storage(url)
    flip_a_bit(storage, TENSORS_15)
    with pytest.warns(UserWarning, match="aside"), writer(url) as ckpt:
        ckpt.restore({"w": torch.zeros(64)})
        ckpt.save(15, {"w": weights(15)}, {"loss": 0.45})
    flip_a_bit(storage, f"{checkpoint_dirname(15)}/tensors-1.safetensors")
    with pytest.warns(UserWarning, match="aside"), writer(url) as ckpt:
        assert ckpt.restore({"w": torch.zeros(64)}).step == 14
    held = RunDirectory(storage).quarantined()
    assert [q.path for q in held] == [
        "quarantine/step-000000015-1.json",
        "quarantine/step-000000015-2.json",
    ]
    assert [q.manifest.metrics for q in held if q.manifest] == [{"loss": 0.1}, {"loss": 0.45}]
    assert set(storage.listdir(checkpoint_dirname(15))) == {
        "tensors.safetensors",
        "tensors-1.safetensors",
    }


def test_retention_verifies_what_it_keeps_in_place_of_an_intact_checkpoint(url: str) -> None:
    """No restore first: the save of 16 would keep the damaged 15 and drop the intact 14."""
    save_10_14_15(url)
    storage = open_storage(url)
    flip_a_bit(storage, TENSORS_15)
    with pytest.warns(UserWarning, match="step 15 aside"), writer(url, keep_best=0) as ckpt:
        ckpt.save(16, {"w": weights(16)}, {"loss": 0.3})
        ckpt.wait()
        assert [i.step for i in ckpt.list()] == [14, 16]
    assert [q.step for q in RunDirectory(storage).quarantined()] == [15]
    assert storage.exists(TENSORS_15)


def test_readers_never_move_anything(url: str) -> None:
    save_10_14_15(url)
    storage = open_storage(url)
    flip_a_bit(storage, TENSORS_15)
    with pytest.warns(UserWarning, match="falling back to the checkpoint of step 10"):
        info = load_best(url, into := torch.nn.Linear(2, 1), monitor="loss")
    assert info.step == 10 and torch.equal(into.weight, model(10).weight)
    reader = Checkpointer(url, read_only=True, capture_rng=False)
    with pytest.warns(UserWarning, match="falling back"):
        assert reader.restore({"w": torch.zeros(64)}).step == 14
    assert storage.exists(f"{checkpoint_dirname(15)}/manifest.json")
    assert storage.listdir("quarantine") == []


def test_clean_up_at_open_keeps_every_file_a_quarantined_manifest_references(url: str) -> None:
    save_10_14_15(url)
    storage = open_storage(url)
    flip_a_bit(storage, TENSORS_15)
    with pytest.warns(UserWarning, match="aside"), writer(url) as ckpt:
        ckpt.restore({"w": torch.zeros(64)})
    with writer(url):  # clean-up at open
        pass
    assert storage.exists(TENSORS_15)
    # a quarantined manifest that no longer decodes keeps its step's folder whole
    flip_a_bit(storage, "quarantine/step-000000015-1.json")
    storage.publish(f"{checkpoint_dirname(15)}/stray", b"x")
    with writer(url):
        pass
    assert storage.exists(TENSORS_15) and storage.exists(f"{checkpoint_dirname(15)}/stray")
    (held,) = list_quarantined(storage)
    assert held.manifest is None and "damaged" in str(held.error)


def test_rename_moves_and_never_overwrites(url: str) -> None:
    storage = open_storage(url)
    storage.makedirs("a")
    storage.makedirs("b")
    storage.publish("a/one", b"1")
    storage.publish("b/two", b"2")
    storage.rename("a/one", "b/one")
    assert storage.read_bytes("b/one") == b"1" and not storage.exists("a/one")
    with pytest.raises(FileExistsError):
        storage.rename("b/one", "b/two")
    assert storage.read_bytes("b/one") == b"1" and storage.read_bytes("b/two") == b"2"


def test_an_object_store_rename_deletes_nothing_before_the_copy_reads_back(monkeypatch) -> None:
    storage = FsspecStorage(f"memory://quarantine-{uuid.uuid4().hex}/run")
    storage.publish("a/one", b"manifest")
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda rel: b"torn" if rel == "b/one" else real(rel))
    storage.makedirs("b")
    with pytest.raises(OSError, match="did not read back equal"):
        storage.rename("a/one", "b/one")
    assert real("a/one") == b"manifest" and not storage.exists("b/one")


def test_a_sharded_save_never_clears_the_shards_of_a_quarantined_checkpoint(tmp_path: Path) -> None:
    from haltpoint import CheckpointExistsError

    run = RunDirectory(LocalStorage(tmp_path))
    run.storage.makedirs("step-000000015/dcp")
    run.storage.publish("step-000000015/dcp/__0_0.distcp", b"shards")
    run.clear_dcp_folder(15)  # an interrupted save's leftovers go
    assert not run.storage.exists("step-000000015/dcp")
    run.storage.makedirs("step-000000015/dcp")
    run.storage.publish("step-000000015/dcp/__0_0.distcp", b"shards")
    run.storage.makedirs("quarantine")
    run.storage.publish("quarantine/step-000000015-1.json", b"{}")
    with pytest.raises(CheckpointExistsError, match=r"quarantine/step-000000015-1\.json"):
        run.clear_dcp_folder(15)
    assert run.storage.read_bytes("step-000000015/dcp/__0_0.distcp") == b"shards"


def test_a_bit_rotten_newest_manifest_is_quarantined_and_its_folder_kept_whole(url: str) -> None:
    save_10_14_15(url)
    storage = open_storage(url)
    flip_a_bit(storage, f"{checkpoint_dirname(15)}/manifest.json")
    aside = pytest.warns(UserWarning, match="set the damaged checkpoint of step 15 aside")
    with aside, writer(url) as ckpt:
        assert ckpt.restore({"w": torch.zeros(64)}).step == 14
        ckpt.save(15, {"w": weights(15)}, {"loss": 0.45})
    (held,) = list_quarantined(storage)
    assert held.manifest is None and held.path == "quarantine/step-000000015-1.json"
    with writer(url):  # clean-up at open: the damaged manifest's references are unknown
        pass
    assert storage.exists(TENSORS_15)
    assert [e.step for e in RunDirectory(storage).committed()] == [10, 14, 15]


def test_a_manifest_of_a_newer_format_or_one_unreadable_now_is_never_moved(
    tmp_path: Path, monkeypatch
) -> None:
    import dataclasses

    run = tmp_path / "run"
    save_10_14_15(str(run))
    manifest = run / checkpoint_dirname(15) / "manifest.json"
    original = manifest.read_bytes()
    newer = RunDirectory(LocalStorage(run)).read_manifest(checkpoint_dirname(15))
    manifest.write_bytes(dataclasses.replace(newer, format_version=2).encode())
    with pytest.warns(UserWarning, match="newer haltpoint"), writer(str(run)) as ckpt:
        with pytest.raises(UnreadableCheckpointError, match=r"upgrade haltpoint .* which=14"):
            ckpt.restore({"w": torch.zeros(64)})  # a writer never resumes behind it
        assert ckpt.restore({"w": torch.zeros(64)}, 14).step == 14
    with pytest.warns(UserWarning, match="newer haltpoint"), Checkpointer(run, read_only=True) as r:
        assert r.restore({"w": torch.zeros(64)}).step == 14
    manifest.write_bytes(original)
    real = LocalStorage.read_bytes

    def denied(self: LocalStorage, rel: str, limit: int | None = None) -> bytes:
        if rel == f"{checkpoint_dirname(15)}/manifest.json":
            raise PermissionError(13, "Permission denied")
        return real(self, rel, limit)

    monkeypatch.setattr(LocalStorage, "read_bytes", denied)
    with pytest.warns(UserWarning, match="Permission denied"), writer(str(run)) as ckpt:
        with pytest.raises(UnreadableCheckpointError, match=r"fix its permissions .* which=14"):
            ckpt.restore({"w": torch.zeros(64)})
        assert ckpt.restore({"w": torch.zeros(64)}, 14).step == 14
    monkeypatch.undo()
    assert manifest.read_bytes() == original and not (run / "quarantine").exists()


def test_only_ascii_digits_name_a_quarantined_step(tmp_path: Path) -> None:
    # regex \d takes any script's digits: Arabic-Indic digits must not alias step 15
    held = tmp_path / "run" / "quarantine"
    held.mkdir(parents=True)
    (held / "step-\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0661\u0665-1.json").write_text("{}")
    (held / "step-000000015-\u0661.json").write_text("{}")
    assert list_quarantined(LocalStorage(tmp_path / "run", create=False)) == []
