"""What ranks a run's checkpoints comes from their manifests, never from history.jsonl."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import pytest
import torch

from haltpoint import Checkpointer, EarlyStopping
from haltpoint.cli import main
from haltpoint.cli.flags import UsageError, ascii_int, count, finite_at_least, seed
from haltpoint.cli.runinfo import open_run, select_entry
from haltpoint.store.history import append_history
from haltpoint.store.manifest import RANKING_KEY, Manifest
from haltpoint.store.run_dir import RunDirectory
from haltpoint.store.storage import LocalStorage

VAL_LOSS = (0.9, 0.3, 0.5, 0.7, 0.8)  # the true best is step 1


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def make_run(
    run: Path, values=VAL_LOSS, *, monitor: str | None = "val_loss", first: int = 0
) -> None:
    """Steps first.. with val_loss from `values` and val_acc = 1 - val_loss; a stopper saved."""
    model = torch.nn.Linear(2, 1)
    stopper = EarlyStopping("val_loss", mode="min", patience=10)
    with Checkpointer(
        run, monitor=monitor, mode="min", keep_last=10, async_save=False, capture_rng=False
    ) as ckpt:
        for step, value in enumerate(values, first):
            metrics = {"val_loss": value, "val_acc": round(1 - value, 6)}
            stopper.step(metrics)
            ckpt.save(step, {"model": model, "stopper": stopper}, metrics)


def steps_on_disk(run: Path) -> list[int]:
    return [e.step for e in RunDirectory(LocalStorage(run)).committed()]


def flip_bit(path: Path, needle: bytes, line: int, bit: int, offset: int = 0) -> None:
    """Flip `bit` of byte `offset` of `needle`'s first place on line `line` (1-based)."""
    lines = path.read_bytes().split(b"\n")
    at = lines[line - 1].index(needle) + offset
    data = bytearray(lines[line - 1])
    data[at] ^= 1 << bit
    lines[line - 1] = bytes(data)
    path.write_bytes(b"\n".join(lines))


def make_old_format(run: Path) -> None:
    """What an older haltpoint wrote: manifests without the ranking, history without checksums."""
    for path in run.glob("step-*/manifest.json"):
        manifest = Manifest.decode(path.read_bytes(), source=str(path))
        del manifest.extra[RANKING_KEY]
        path.write_bytes(manifest.encode())
    history = run / "history.jsonl"
    lines = [json.loads(line) for line in history.read_text().splitlines()]
    for line in lines:
        del line["checksum"]
    history.write_text("".join(json.dumps(x, separators=(",", ":")) + "\n" for x in lines))


def gc_keeping_one_best(capsys, run: Path) -> tuple[int, str, str]:
    return run_cli(capsys, "gc", str(run), "--keep-last", "1", "--keep-best", "1")


# -- a damaged history never costs the true best -------------------------------------------


def test_a_flipped_bit_in_the_stoppers_best_does_not_make_gc_delete_the_best(
    tmp_path: Path, capsys
):
    run = tmp_path / "run"
    make_run(run)
    # line 1's best 0.9 -> 0.1: read back from the history, "best" rose, so "max" looked right
    flip_bit(run / "history.jsonl", b'"best":0.9', line=1, bit=3, offset=9)
    code, out, err = gc_keeping_one_best(capsys, run)
    assert code == 0, err
    assert "kept steps 1, 4" in out
    assert steps_on_disk(run) == [1, 4]


def test_a_flipped_bit_in_a_metric_name_does_not_stop_gc_or_change_the_best(tmp_path: Path, capsys):
    run = tmp_path / "run"
    make_run(run)
    flip_bit(run / "history.jsonl", b"val_loss", line=2, bit=1)  # val_loss -> tal_loss
    code, _out, err = gc_keeping_one_best(capsys, run)
    assert code == 0, err
    assert steps_on_disk(run) == [1, 4]


def test_a_history_that_lies_with_valid_checksums_is_not_read_to_rank(tmp_path: Path, capsys):
    run = tmp_path / "run"
    make_run(run)
    (run / "history.jsonl").unlink()
    storage = LocalStorage(run)
    for step, value in enumerate(VAL_LOSS):  # as if the stopper had minimised val_acc
        acc = round(1 - value, 6)
        stopper = {"value": acc, "best": 1.0 if step == 0 else 0.0}
        append_history(
            storage,
            {"step": step, "metrics": {"val_loss": value, "val_acc": acc}, "stopper": stopper},
        )
    code, out, err = run_cli(capsys, "export", str(run), "-o", str(tmp_path / "m.safetensors"))
    assert code == 0 and "from step 1" in out, err
    code, out, err = gc_keeping_one_best(capsys, run)
    assert code == 0, err
    assert steps_on_disk(run) == [1, 4]


def test_best_is_known_without_any_history(tmp_path: Path, capsys):
    run = tmp_path / "run"
    make_run(run)
    (run / "history.jsonl").unlink()
    code, out, err = run_cli(capsys, "ls", str(run), "--json")
    assert code == 0, err
    tags = {row["step"]: row["tags"] for row in json.loads(out)}
    assert tags[1] == ["best"] and tags[4] == ["latest"]
    code, out, err = gc_keeping_one_best(capsys, run)
    assert code == 0 and steps_on_disk(run) == [1, 4]


def test_a_checkpointer_without_monitor_records_its_stoppers(tmp_path: Path, capsys):
    run = tmp_path / "run"
    make_run(run, monitor=None)
    (run / "history.jsonl").unlink()
    assert select_entry(open_run(str(run)), "best").step == 1


def test_show_says_what_ranks_the_checkpoint(tmp_path: Path, capsys):
    run = tmp_path / "run"
    make_run(run)
    code, out, _ = run_cli(capsys, "show", str(run))
    assert code == 0
    assert "\nranked by: val_loss (min)\n" in out
    assert out.startswith("step:      ")  # every value in the column after the longest label
    assert "ranking" not in out  # not repeated under extra


# -- a monitor changed during the run -----------------------------------------------------


def test_a_changed_monitor_ranks_by_the_newest_and_says_so(tmp_path: Path, capsys):
    run = tmp_path / "run"
    make_run(run, values=(0.9, 0.3))  # by val_loss: step 1
    model = torch.nn.Linear(2, 1)
    with Checkpointer(run, monitor="val_acc", mode="max", keep_last=10, async_save=False) as ckpt:
        ckpt.save(2, {"model": model}, {"val_loss": 0.8, "val_acc": 0.95})
        ckpt.save(3, {"model": model}, {"val_loss": 0.2, "val_acc": 0.5})
    code, out, err = run_cli(capsys, "ls", str(run), "--json")
    assert code == 0, err
    tags = {row["step"]: row["tags"] for row in json.loads(out)}
    assert tags[2] == ["best"]  # by val_acc, maximised
    assert (
        "the run's monitor changed: step(s) 0, 1 by val_loss (min), the newer ones by "
        "val_acc (max); ranking by the newest" in " ".join(err.split())
    )
    code, out, err = run_cli(capsys, "ls", str(run), "--monitor", "val_loss")
    assert code == 0 and "monitor changed" not in err  # chosen by the user: nothing to say


# -- old run directories ------------------------------------------------------------------


def test_old_run_directories_still_rank_from_the_history_and_say_so(tmp_path: Path, capsys):
    run = tmp_path / "run"
    make_run(run)
    make_old_format(run)
    code, _out, err = gc_keeping_one_best(capsys, run)
    assert code == 0, err
    assert steps_on_disk(run) == [1, 4]
    message = " ".join(err.split())
    assert "these checkpoints do not record what ranks them (written by an older haltpoint)" in (
        message
    )
    assert "ranking by val_loss (min), read back from the history" in message


def test_old_history_lines_still_read_and_new_ones_are_checked(tmp_path: Path, capsys):
    run = tmp_path / "run"
    make_run(run, values=VAL_LOSS[:3])
    make_old_format(run)
    make_run(run, values=VAL_LOSS[3:], first=3)  # an old run resumed by this haltpoint
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_entry(open_run(str(run)), "best").step == 1
    code, out, err = run_cli(capsys, "replay", str(run), "--patience", "2")
    assert code == 0 and "over 5 evaluations" in out, err


def test_a_later_writer_without_monitor_does_not_hide_the_runs_monitor(tmp_path: Path, capsys):
    run = tmp_path / "run"
    make_run(run, values=(0.9, 0.3, 0.5))
    with Checkpointer(run, keep_last=10, async_save=False) as ckpt:  # no monitor, no stopper
        ckpt.save(3, {"x": 1}, {"val_loss": 0.1, "val_acc": 0.2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing changed: "no monitor" is no ranking
        assert select_entry(open_run(str(run)), "best").step == 3  # val_loss, min


@pytest.mark.parametrize("which", ["\u0661", "+1", " 1 ", "1_0", "-0", "1.0", ""])
def test_a_step_selector_is_the_ascii_digits_0_to_9_only(tmp_path: Path, which: str) -> None:
    run = tmp_path / "run"
    make_run(run, values=VAL_LOSS[:2])  # steps 0 and 1: int() would read each as 1 (or 10)
    with pytest.raises(UsageError, match=r"--which must be .* \(digits 0-9 only\), got"):
        select_entry(open_run(str(run)), which)
    assert select_entry(open_run(str(run)), "01").step == 1


def test_numeric_flags_take_the_ascii_digits_only() -> None:
    for text in ("\u0663", "+3", " 3", "3 ", "3_0", "\uff13"):  # \uff13: fullwidth 3
        assert ascii_int(text) is None, text
        with pytest.raises(argparse.ArgumentTypeError, match="digits 0-9 only"):
            count(0)(text)
        with pytest.raises(argparse.ArgumentTypeError, match="digits 0-9 only"):
            seed(text)
        if text != "+3":  # a float may have a sign
            with pytest.raises(argparse.ArgumentTypeError, match="ASCII"):
                finite_at_least(0.0)(text)
    assert ascii_int("0042") == 42 and count(0)("7") == 7 and seed("4294967295") == 2**32 - 1
    assert ascii_int("9" * 5000) is None  # beyond what int() converts: refused, not a crash
    assert finite_at_least(0.0)("1e-3") == 0.001 and finite_at_least(0.0)("+.5") == 0.5
