"""`verify`, `ls` and `export` while a writer's retention removes a checkpoint under them.

The race is made deterministic: a read of the run is patched to remove the checkpoint (as
retention does: manifest first, then its files) just before it reads it. A checkpoint that
disappears while being read is "removed", never "damaged".
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from haltpoint import Checkpointer
from haltpoint.cli import export, main, verify
from haltpoint.cli.listing import list_checkpoints
from haltpoint.cli.verify import verify_run
from haltpoint.store.run_dir import RunDirectory, checkpoint_dirname
from haltpoint.store.storage import LocalStorage

LOSSES = (0.5, 0.2, 0.3, 0.4)  # step 1 is the best, step 3 the latest


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    model = torch.nn.Linear(3, 2)
    with Checkpointer(
        run, monitor="val_loss", keep_last=10, async_save=False, capture_rng=False
    ) as ckpt:
        for step, loss in enumerate(LOSSES):
            with torch.no_grad():
                model.weight.fill_(float(step))
            ckpt.save(step, {"model": model}, {"val_loss": loss})
    return run


def remove_checkpoint(run: Path, step: int) -> None:
    """What retention does: the manifest goes first, then the checkpoint's files."""
    folder = run / checkpoint_dirname(step)
    (folder / "manifest.json").unlink()
    shutil.rmtree(folder)


def removing_first(real: Callable[..., Any], run: Path, steps: list[int]) -> Callable[..., Any]:
    """`real`, except that the first call about a step in `steps` removes it first."""

    def patched(storage: Any, records: Any, *args: Any, **kwargs: Any) -> Any:
        files = {r.file for r in records.values()}
        for step in list(steps):
            if any(f.startswith(checkpoint_dirname(step)) for f in files):
                steps.remove(step)
                remove_checkpoint(run, step)
        return real(storage, records, *args, **kwargs)

    return patched


def test_verify_calls_a_checkpoint_removed_mid_check_removed(
    run_dir: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(verify, "tensor_damage", removing_first(verify.tensor_damage, run_dir, [1]))
    code = main(["verify", str(run_dir)])
    captured = capsys.readouterr()
    assert code == 0
    assert "damaged" not in captured.out + captured.err
    assert "step(s) 1 removed by the writer's retention while being verified" in " ".join(
        captured.err.split()
    )
    assert "all 3 checkpoints are intact" in captured.out


def test_verify_json_counts_a_removed_checkpoint_as_no_failure(
    run_dir: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(verify, "tensor_damage", removing_first(verify.tensor_damage, run_dir, [2]))
    assert main(["verify", str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is True
    assert [(c["step"], c["status"]) for c in result["checkpoints"]] == [
        (0, "intact"),
        (1, "intact"),
        (2, "removed"),
        (3, "intact"),
    ]


def test_verify_of_a_run_whose_every_checkpoint_was_removed_mid_check(
    run_dir: Path, monkeypatch, capsys
) -> None:
    steps = list(range(len(LOSSES)))
    monkeypatch.setattr(
        verify, "tensor_damage", removing_first(verify.tensor_damage, run_dir, steps)
    )
    assert main(["verify", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "every checkpoint was removed while being verified; run verify again" in out


def test_verify_still_reports_real_damage(run_dir: Path) -> None:
    (run_dir / checkpoint_dirname(2) / "tensors.safetensors").unlink()  # manifest still there
    checks = verify_run(RunDirectory(LocalStorage(run_dir)))
    assert [c.status for c in checks] == ["intact", "intact", "damaged", "intact"]


def test_a_manifest_removed_between_listing_and_reading_is_removed(
    run_dir: Path, monkeypatch
) -> None:
    real = LocalStorage.read_bytes
    victims = [f"{checkpoint_dirname(1)}/manifest.json"]

    def read_bytes(self: LocalStorage, rel: str, *args: Any) -> bytes:
        if rel in victims:
            victims.remove(rel)
            remove_checkpoint(run_dir, 1)
        return real(self, rel, *args)

    monkeypatch.setattr(LocalStorage, "read_bytes", read_bytes)
    rows, _ = list_checkpoints(RunDirectory(LocalStorage(run_dir)))
    assert [(r.step, r.status) for r in rows] == [
        (0, "committed"),
        (1, "removed"),
        (2, "committed"),
        (3, "committed"),
    ]
    assert all(r.error is None for r in rows)


def test_ls_and_verify_leave_out_a_folder_removed_while_listing(run_dir: Path, monkeypatch):
    real = LocalStorage.listdir

    def listdir(self: LocalStorage, rel: str = "") -> list[str]:
        if rel == checkpoint_dirname(2):
            remove_checkpoint(run_dir, 2)
        return real(self, rel)

    monkeypatch.setattr(LocalStorage, "listdir", listdir)
    run = RunDirectory(LocalStorage(run_dir))
    assert [r.step for r in list_checkpoints(run)[0]] == [0, 1, 3]


@pytest.mark.parametrize(("which", "exported"), [("best", 3), ("latest", 2)])
def test_export_chooses_again_when_its_choice_is_removed_mid_read(
    run_dir: Path, tmp_path: Path, monkeypatch, capsys, which: str, exported: int
) -> None:
    # best is step 1 (0.2), then step 2 (0.3); latest is step 3, then step 2
    victims = [1, 2] if which == "best" else [3]
    monkeypatch.setattr(
        export, "read_tensors", removing_first(export.read_tensors, run_dir, victims)
    )
    target = tmp_path / "model.safetensors"
    code = main(["export", str(run_dir), "--which", which, "-o", str(target)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"from step {exported}" in captured.out
    assert "removed by the writer's retention while it was being read" in " ".join(
        captured.err.split()
    )
    import safetensors.torch

    assert torch.equal(safetensors.torch.load_file(target)["weight"], torch.full((2, 3), exported))


def test_export_of_a_step_removed_mid_read_says_so(
    run_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(export, "read_tensors", removing_first(export.read_tensors, run_dir, [2]))
    code = main(["export", str(run_dir), "--which", "2", "-o", str(tmp_path / "m.safetensors")])
    err = " ".join(capsys.readouterr().err.split())
    assert code != 0
    assert (
        "the checkpoint of step 2 was removed by the writer's retention while it was being read"
        in err
    )
    assert "damaged" not in err
    assert not (tmp_path / "m.safetensors").exists()
