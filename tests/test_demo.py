"""`haltpoint demo`: the shipped data, the training loop, resume, Ctrl-C, the summary and plot."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from rich.text import Text

from haltpoint import Checkpointer
from haltpoint.cli import main
from haltpoint.cli.demo import _Display, _test_rows
from haltpoint.cli.output import Output
from haltpoint.demo import DigitsNet, load_digits, split_digits
from haltpoint.demo.scores import score
from haltpoint.demo.train import DemoConfig, EpochResult, train_demo
from haltpoint.errors import LockedError
from haltpoint.stopping import EarlyStopping
from haltpoint.store import history
from haltpoint.store.history import encode_record, read_history
from haltpoint.store.storage import LocalStorage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert "\x1b[" not in captured.out + captured.err
    return code, captured.out, captured.err


def metrics_by_step(run: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: r["metrics"] for r in read_history(LocalStorage(run))}


# -- data and model ---------------------------------------------------------------------------


def test_the_shipped_digits_load_and_split_deterministically():
    images, labels = load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() == 1.0
    assert torch.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    a, b, c = split_digits(seed=0), split_digits(seed=0), split_digits(seed=1)
    assert [len(p[1]) for p in (a.train, a.val, a.test)] == [1078, 359, 360]
    assert torch.equal(a.test[0], b.test[0]) and not torch.equal(a.test[0], c.test[0])
    assert all(len(set(part[1].tolist())) == 10 for part in (a.train, a.val, a.test))
    rows = {tuple(x.flatten().tolist()) for part in (a.train, a.val, a.test) for x in part[0]}
    assert len(rows) == len({tuple(x.flatten().tolist()) for x in images})  # a partition
    with pytest.raises(ValueError, match="fractions must be two positive shares"):
        split_digits(fractions=(0.8, 0.3))


def test_the_model_and_config():
    assert DigitsNet()(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="max_epochs must be an int >= 1, got 0"):
        DemoConfig(max_epochs=0)


# -- the command ------------------------------------------------------------------------------


def test_demo_trains_summarises_plots_and_resumes(tmp_path: Path, capsys):
    image = pytest.importorskip("matplotlib.image")
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "demo", "--run-dir", str(run), "--epochs", "2")
    assert code == 0
    assert "handwritten 8x8 digits" in err
    assert out.startswith(f"training from scratch into {run}\nstep   0  train_loss ")
    assert "step   1  train_loss" in out
    assert (
        "why it ended    reached the maximum of 2 epochs before early stopping triggered: "
        "val_loss improved to "
    ) in out  # the stopper's explain(): how far it was from stopping
    assert "it stops after 5 evaluations without improvement; pass --epochs N to train" in out
    assert "epochs trained  2 (steps 0-1), did not stop early" in out
    assert "test accuracy   " in out and "disk used       " in out and "wall time       " in out
    assert re.search(r"test macro avg  precision \d+\.\d\d%, recall \d+\.\d\d%, F1 \d+\.\d\d%", out)
    png = run / "curves.png"
    assert f"plot            {png} (best marked)" in out
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 20_000
    assert image.imread(str(png)).shape[1] > 800

    code, out, _ = run_cli(capsys, "demo", "--run-dir", str(run), "--epochs", "3")
    assert code == 0
    assert out.startswith("resumed from step 1\nstep   2  train_loss ")
    resumed = metrics_by_step(run)

    straight = tmp_path / "straight"  # the same three epochs in one go: identical numbers
    assert main(["demo", "--run-dir", str(straight), "--epochs", "3"]) == 0
    capsys.readouterr()
    assert metrics_by_step(straight) == resumed

    code, out, _ = run_cli(capsys, "ls", str(run), "--json")
    rows = json.loads(out)
    assert [r["step"] for r in rows][-1] == 2 and "latest" in rows[-1]["tags"]
    assert len(rows) <= 3  # keep_best=1, keep_last=2
    assert main(["verify", str(run)]) == 0
    target = tmp_path / "model.safetensors"
    assert main(["export", str(run), "-o", str(target)]) == 0  # best by val_loss, from history
    model = DigitsNet()
    import safetensors.torch

    model.load_state_dict(safetensors.torch.load_file(str(target)))


def test_demo_stops_early_and_a_stopped_run_stays_stopped(tmp_path: Path, capsys):
    run = tmp_path / "run"
    code, out, _ = run_cli(capsys, "demo", "--run-dir", str(run))  # the default settings
    assert code == 0
    last = max(metrics_by_step(run))
    assert last < 30  # early stopping ends it well before the 60 epochs
    assert "why it stopped  val_loss did not improve for 5 evaluations" in out
    assert f"epochs trained  {last + 1} (steps 0-{last}), stopped early" in out
    accuracy = float(out.split("test accuracy   ")[1].split("%")[0])
    assert accuracy > 95.0

    code, again, _ = run_cli(capsys, "demo", "--run-dir", str(run))
    assert code == 0
    assert again.startswith(
        f"resumed from step {last}\nthe run had already stopped: val_loss did not improve"
    )
    assert "; nothing to train (--fresh deletes it and starts over)\n" in again
    assert "train_loss" not in again  # nothing trained
    assert max(metrics_by_step(run)) == last
    assert (
        again.split("wall time")[0].split("\n\n")[1] == out.split("wall time")[0].split("\n\n")[1]
    )


@pytest.mark.parametrize("epochs", [1, 2, 3])
def test_a_finished_run_resumed_with_fewer_or_as_many_epochs_says_how_many_it_trained(
    tmp_path: Path, capsys, epochs: int
):
    run = tmp_path / "run"
    assert main(["demo", "--run-dir", str(run), "--epochs", "3"]) == 0  # steps 0-2
    capsys.readouterr()
    code, out, _ = run_cli(capsys, "demo", "--run-dir", str(run), "--epochs", str(epochs))
    assert code == 0 and "train_loss" not in out  # nothing trained
    assert out.startswith(
        f"resumed from step 2\nthe run had already trained 3 epochs (--epochs {epochs}); pass "
        "--epochs N with N > 3 to train longer\n"
    )
    assert "epochs trained  3 (steps 0-2), did not stop early" in out
    if epochs == 3:
        assert "why it ended    reached the maximum of 3 epochs before early stopping" in out
    else:
        assert (
            f"why it ended    had already trained 3 epochs, past the maximum of {epochs}, before "
            "early stopping (patience 5 on val_loss) triggered; pass --epochs N with N > 3 to "
            "train longer"
        ) in out


def test_ctrl_c_leaves_a_resumable_run(tmp_path: Path, capsys, monkeypatch):
    run = tmp_path / "run"
    shown = _Display.epoch

    def interrupt_after_step_1(self: _Display, result) -> None:  # type: ignore[no-untyped-def]
        shown(self, result)
        if result.epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(_Display, "epoch", interrupt_after_step_1)
    code, _, err = run_cli(capsys, "demo", "--run-dir", str(run), "--epochs", "4")
    assert code == 130
    assert err.endswith(
        "interrupted: the last committed checkpoint is step 1; resume with: haltpoint demo "
        f"--run-dir {run} --epochs 4\n"
    )
    monkeypatch.undo()
    code, out, _ = run_cli(capsys, "demo", "--run-dir", str(run), "--epochs", "3")
    assert code == 0 and out.startswith("resumed from step 1\nstep   2 ")


def test_the_resume_command_ctrl_c_prints_works_as_printed(tmp_path: Path, capsys, monkeypatch):
    # --seed 3: the printed command without it is refused ("trained with seed 3 (not 0)");
    # a path with a space is quoted for the shell
    run = tmp_path / "my runs" / "d"
    shown = _Display.epoch

    def interrupt_after_step_0(self: _Display, result) -> None:  # type: ignore[no-untyped-def]
        shown(self, result)
        raise KeyboardInterrupt

    monkeypatch.setattr(_Display, "epoch", interrupt_after_step_0)
    argv = ["demo", "--run-dir", str(run), "--epochs", "3", "--seed", "3"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 130
    printed = err.rstrip("\n").split("resume with: ")[1]
    assert printed == f"haltpoint demo --run-dir {shlex.quote(str(run))} --epochs 3 --seed 3"
    monkeypatch.undo()
    code, out, _ = run_cli(capsys, *shlex.split(printed)[1:])
    assert code == 0 and out.startswith("resumed from step 0\nstep   1 ")


def test_fresh_deletes_only_runs(tmp_path: Path, capsys):
    run = tmp_path / "run"
    assert main(["demo", "--run-dir", str(run), "--epochs", "1"]) == 0
    code, out, _ = run_cli(capsys, "demo", "--run-dir", str(run), "--epochs", "1", "--fresh")
    assert code == 0 and out.startswith("training from scratch")
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "chapter1.tex").write_text("precious")
    code, _, err = run_cli(capsys, "demo", "--run-dir", str(other), "--fresh")
    assert code == 1
    assert f"--fresh deletes {other}, but it does not look like a haltpoint run" in err
    assert (other / "chapter1.tex").read_text() == "precious"


def test_fresh_says_what_it_deleted(tmp_path: Path, capsys):
    # a finished run's best model goes with --fresh: the user is told which, before training
    run = tmp_path / "run"
    assert main(["demo", "--run-dir", str(run), "--epochs", "3"]) == 0
    capsys.readouterr()
    kept = sorted(int(p.name.split("-")[1]) for p in run.glob("step-*"))
    best = min(metrics_by_step(run).items(), key=lambda item: item[1]["val_loss"])
    code, out, err = run_cli(capsys, "demo", "--run-dir", str(run), "--epochs", "1", "--fresh")
    assert code == 0 and out.startswith("training from scratch")
    assert (
        f"--fresh deleted {run}: {len(kept)} checkpoints (steps {kept[0]}-{kept[-1]}; best "
        f"val_loss {best[1]['val_loss']:.4f} at step {best[0]}) and its history\n"
    ) in err
    code, _, err = run_cli(
        capsys, "demo", "--run-dir", str(tmp_path / "new"), "--epochs", "1", "--fresh"
    )
    assert code == 0 and "--fresh deleted" not in err  # nothing was there


def test_resuming_with_another_seed_is_refused(tmp_path: Path, capsys):
    run = tmp_path / "run"
    train_demo(str(run), DemoConfig(max_epochs=1))
    code, _, err = run_cli(capsys, "demo", "--run-dir", str(run), "--seed", "3")
    assert code == 1
    assert f"haltpoint: error: {run} was trained with seed 0 (not 3); resume it with" in err
    assert err.endswith("or start again with --fresh\n")


def test_resuming_another_run_is_one_line_naming_it_and_leaves_it_as_it_was(tmp_path: Path, capsys):
    """`--run-dir` of a user's own run: the restore failed with the library's advice
    (`missing from the checkpoint: 'settings'; ... pass strict=False`), which the command
    cannot follow; now one line says the folder holds another run, before it is opened."""
    run = tmp_path / "exp1"
    with Checkpointer(run, monitor="val_loss", async_save=False) as ckpt:
        ckpt.save(4, {"model": torch.nn.Linear(2, 2), "epoch": 4}, {"val_loss": 0.5})
    before = sorted(p.name for p in run.iterdir())
    code, out, err = run_cli(capsys, "demo", "--run-dir", str(run), "--epochs", "1")
    assert code == 1 and out == ""
    assert err == (
        f"haltpoint: error: --run-dir {run} holds another run: its checkpoint of step 4 is not "
        "the demo's (it holds __rng__, epoch, model); the demo resumes only its own runs: pick "
        "another --run-dir\n"
    )
    assert "strict=False" not in err
    assert sorted(p.name for p in run.iterdir()) == before
    assert main(["verify", str(run)]) == 0


def test_fresh_refuses_a_folder_whose_only_haltpoint_file_is_a_stray_lock(tmp_path: Path, capsys):
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "chapter1.tex").write_text("precious")
    assert main(["gc", str(other), "--keep-last", "1"]) == 1  # gc on a wrong folder
    assert not (other / ".haltpoint.lock").exists()
    (other / ".haltpoint.lock").write_text("")  # as an older gc, or a Checkpointer, left it
    code, _, err = run_cli(capsys, "demo", "--run-dir", str(other), "--fresh")
    assert code == 1 and "does not look like a haltpoint run" in err
    assert (other / "chapter1.tex").read_text() == "precious"


def test_fresh_refuses_a_folder_of_another_tool_with_its_own_history_jsonl(tmp_path: Path, capsys):
    other = tmp_path / "other-tool"
    other.mkdir()
    deep = "[" * 100_000 + "]" * 100_000  # deeper than json can parse: RecursionError
    (other / "history.jsonl").write_text(f'{{"epoch": 1, "loss": 0.5}}\n{deep}\n')  # no checksum
    (other / "model.pt").write_bytes(b"precious")
    code, _, err = run_cli(capsys, "demo", "--run-dir", str(other), "--fresh")
    assert code == 1 and "does not look like a haltpoint run" in err
    assert (other / "model.pt").read_bytes() == b"precious"


def test_fresh_deletes_nothing_when_the_history_is_too_large_to_read(
    tmp_path: Path, capsys, monkeypatch
):
    run = tmp_path / "run"
    run.mkdir()
    line = encode_record({"step": 0, "metrics": {"val_loss": 0.5}})
    (run / "history.jsonl").write_bytes(line * 4)  # a run by its history alone
    monkeypatch.setattr(history, "HISTORY_READ_LIMIT", len(line))
    code, _, err = run_cli(capsys, "demo", "--run-dir", str(run), "--epochs", "1", "--fresh")
    assert code == 1 and "history.jsonl is larger than" in err
    assert (run / "history.jsonl").read_bytes() == line * 4  # not deleted, no demo trained


@pytest.mark.parametrize("width", [60, 80, 120])
def test_the_progress_bar_fits_the_terminal_keeping_bar_epoch_and_time(width, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(width))
    out = Output(io.StringIO(), io.StringIO(), terminal=True)
    display = _Display(out, "runs/x", DemoConfig(max_epochs=60))
    stopper = EarlyStopping("val_loss", patience=5)
    for loss in (0.3, 0.2, 0.25):
        decision = stopper.step({"val_loss": loss})
    with display.live():
        display.epoch(EpochResult(11, 0.123456, 0.25, 0.9832, decision))
    assert display.progress is not None
    with out.console.capture() as captured:
        out.console.print(display.progress.make_tasks_table(display.progress.tasks))
    (line,) = Text.from_ansi(captured.get()).plain.splitlines()
    assert len(line) <= width
    assert line.startswith("epoch  12/60 ━") and re.search(r" \d:\d\d:\d\d$", line)
    assert "val_loss 0.2500" in line  # the monitor is dropped last
    assert ("best 0.2000@1" in line) == (width >= 80)
    assert ("train_loss 0.1235" in line) == (width >= 120)


def test_the_test_scores_are_scikit_learn_s_on_the_restored_best_model(tmp_path: Path, capsys):
    metrics = pytest.importorskip("sklearn.metrics")
    outcome = train_demo(str(tmp_path / "run"), DemoConfig(max_epochs=2))
    labels, predicted = outcome.test_labels.numpy(), outcome.test_predicted.numpy()
    assert len(labels) == 360
    assert metrics.accuracy_score(labels, predicted) == pytest.approx(outcome.test_acc)
    scores = score(outcome.test_labels, outcome.test_predicted)
    assert scores.f1 == pytest.approx(metrics.f1_score(labels, predicted, average="macro"))
    assert scores.recall == pytest.approx(metrics.recall_score(labels, predicted, average="macro"))


def test_without_scikit_learn_the_scores_row_says_what_to_install(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.metrics", None)  # import raises ImportError
    outcome = train_demo(str(tmp_path / "run"), DemoConfig(max_epochs=1))
    rows = dict(_test_rows(outcome))
    assert rows["test accuracy"].startswith(f"{100 * outcome.test_acc:.2f}% of 360 digits")
    assert rows["test macro avg"] == (
        "skipped: the test scores need scikit-learn, which is not installed; install it with: "
        "pip install 'haltpoint[demo]'"
    )


def test_the_summary_counts_committed_checkpoints_not_folders(tmp_path: Path) -> None:
    """A quarantined checkpoint's data folder or a leftover is no checkpoint kept."""
    from haltpoint import Checkpointer
    from haltpoint.cli.demo import _disk_usage

    with Checkpointer(tmp_path, keep_last=2, async_save=False) as ckpt:
        for step in range(3):
            ckpt.save(step, {"model": torch.nn.Linear(2, 1)})
    (tmp_path / "step-000000009").mkdir()  # a leftover: no manifest
    size, checkpoints = _disk_usage(str(tmp_path))
    assert checkpoints == 2 and size > 0


# -- --fresh and the writer lock ----------------------------------------------------------------

HOLDER = """
import sys
from haltpoint import Checkpointer
with Checkpointer(sys.argv[1], async_save=False):
    print("ready", flush=True)
    sys.stdin.read()  # hold the writer lock until the parent closes stdin
"""


@contextlib.contextmanager
def writer_elsewhere(run: Path, where: str) -> Iterator[None]:
    """A second writer open on `run`: a Checkpointer in this process or in another one."""
    if where == "this process":
        with Checkpointer(run, async_save=False):
            yield
        return
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            yield
        finally:
            proc.communicate(timeout=60)


@pytest.mark.parametrize("where", ["this process", "another process"])
def test_fresh_refuses_while_a_writer_holds_the_run_and_deletes_nothing(
    tmp_path: Path, capsys, where: str
):
    run = tmp_path / "run"
    assert main(["demo", "--run-dir", str(run), "--epochs", "1"]) == 0
    capsys.readouterr()
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with writer_elsewhere(run, where):
        code, out, err = run_cli(capsys, "demo", "--run-dir", str(run), "--fresh")
    assert code == 1 and out == ""
    assert err.count("\n") == 1
    assert f"--fresh cannot delete {run}: process " in err and "stop that process first" in err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_fresh_holds_the_writer_lock_while_it_deletes(tmp_path: Path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["demo", "--run-dir", str(run), "--epochs", "1"]) == 0
    capsys.readouterr()
    real_rmtree, refused = shutil.rmtree, []

    def rmtree_racing_a_writer(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        with pytest.raises(LockedError, match="is locked by process"):
            Checkpointer(run, async_save=False)  # a trainer starting meanwhile
        refused.append(path)
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree_racing_a_writer)
    code, out, _ = run_cli(capsys, "demo", "--run-dir", str(run), "--epochs", "1", "--fresh")
    assert code == 0 and out.startswith("training from scratch")
    assert refused  # the deletion ran, and every writer that tried meanwhile was refused
