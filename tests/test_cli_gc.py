"""gc counts only checkpoints it has verified: a damaged newest one never costs an intact one."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from haltpoint import Checkpointer
from haltpoint.cli import main
from haltpoint.errors import CheckpointNotFoundError
from haltpoint.store.run_dir import RunDirectory, checkpoint_dirname
from haltpoint.store.storage import LocalStorage


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def steps_on_disk(run: Path) -> list[int]:
    return [e.step for e in RunDirectory(LocalStorage(run)).committed()]


def three_step_run(run: Path) -> None:
    model = torch.nn.Linear(2, 1)
    with Checkpointer(run, monitor="loss", keep_last=3, keep_best=1, async_save=False) as ckpt:
        for step, loss in [(1, 0.1), (2, 0.5), (3, 0.9)]:
            ckpt.save(step, {"model": model}, {"loss": loss})


# -- gc counts only checkpoints it has verified -----------------------------------------------


def test_gc_mode_alone_against_the_recorded_monitor_is_refused(tmp_path: Path, capsys):
    run = tmp_path / "run"
    three_step_run(run)  # monitor loss, mode min: step 1 is best
    code, _, err = run_cli(capsys, "gc", str(run), "--keep-best", "1", "--mode", "max")
    assert code == 2
    assert "--mode max contradicts the run's recorded monitor, loss (min)" in err
    assert steps_on_disk(run) == [1, 2, 3]
    code, out, _ = run_cli(capsys, "gc", str(run), "--keep-best", "1", "--mode", "min")
    assert code == 0 and "kept steps 1" in out


def test_gc_never_removes_the_newest_intact_checkpoint_for_a_damaged_one(tmp_path: Path, capsys):
    run = tmp_path / "run"
    three_step_run(run)
    tensors = run / checkpoint_dirname(3) / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF  # bit rot in the newest checkpoint's data; its manifest is intact
    tensors.write_bytes(bytes(data))
    code, out, err = run_cli(capsys, "gc", str(run), "--keep-last", "1")
    assert code == 0, err
    assert "step 3 is damaged (1 tensor(s) missing or not matching their hash" in err
    assert "kept steps 2" in out
    assert steps_on_disk(run) == [2, 3]  # the newest intact one stays; the damaged is not gc's
    code, out, _ = run_cli(capsys, "ls", str(run))
    assert "committed" in out and "intact" not in out  # ls has not read the data


def test_gc_keep_best_after_a_monitor_change_keeps_the_best_the_writer_kept(tmp_path: Path, capsys):
    """The writer's retention keeps the best by every ranking its run records; gc without
    --monitor ranked by the newest alone and deleted the old monitor's best."""
    run = tmp_path / "run"
    model = torch.nn.Linear(2, 1)
    with Checkpointer(run, monitor="val_loss", keep_last=1, keep_best=1, async_save=False) as c:
        for step, loss in [(1, 0.5), (2, 0.1), (3, 0.4)]:
            c.save(step, {"model": model}, {"val_loss": loss})
    with (
        pytest.warns(UserWarning, match="retention keeps the best by both"),
        Checkpointer(
            run, monitor="val_acc", mode="max", keep_last=1, keep_best=1, async_save=False
        ) as c,
    ):
        for step, acc in [(4, 0.45), (5, 0.48), (6, 0.3)]:
            c.save(step, {"model": model}, {"val_acc": acc})
    assert steps_on_disk(run) == [2, 5, 6]  # the writer kept step 2, val_loss's best
    code, out, err = run_cli(capsys, "gc", str(run), "--keep-best", "1")
    assert code == 0, err
    assert "kept steps 2, 5, 6" in out and "also keeps the best by each older one" in err
    assert steps_on_disk(run) == [2, 5, 6]
    code, out, _ = run_cli(capsys, "gc", str(run), "--keep-best", "1", "--monitor", "val_acc")
    assert code == 0 and "kept steps 5, 6" in out  # asked for by name: the user's ranking
    assert steps_on_disk(run) == [5, 6]


def _raised(argv: list[str]) -> BaseException:
    """What the command raises, before the error boundary turns it into one line."""
    from haltpoint.cli.app import build_parser
    from haltpoint.cli.output import Output

    args = build_parser().parse_args(argv)
    with pytest.raises(Exception) as raised:
        args.handler(args, Output(io.StringIO(), io.StringIO(), terminal=False))
    return raised.value


def test_gc_keep_best_of_checkpoints_without_metrics_says_what_gc_can_keep(tmp_path: Path, capsys):
    """It said "choose latest or a step", which is export's --which: gc has none."""
    run = tmp_path / "run"
    with Checkpointer(run, keep_last=3, async_save=False, capture_rng=False) as ckpt:
        for step in (1, 2):
            ckpt.save(step, {"w": torch.ones(2)})
    assert main(["gc", str(run), "--keep-best", "1", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hold no metrics" in err and "--keep-last" in err, err
    assert "choose latest" not in err
    assert isinstance(_raised(["gc", str(run), "--keep-best", "1"]), CheckpointNotFoundError)
    assert main(["ls", str(run)]) == 0  # ls tags no best, and says why
    assert "no checkpoint tagged best: the checkpoints hold no metrics" in capsys.readouterr().err


def test_gc_of_a_folder_without_checkpoints_is_checkpoint_not_found(tmp_path: Path, capsys):
    (tmp_path / "history.jsonl").write_text("")
    error = _raised(["gc", str(tmp_path), "--keep-last", "1"])
    assert isinstance(error, CheckpointNotFoundError) and "holds no checkpoint" in str(error)
    assert not (tmp_path / ".haltpoint.lock").exists()
