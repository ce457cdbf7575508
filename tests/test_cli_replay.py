"""`haltpoint replay` (what-if stopping) and `haltpoint plot` (curves) over a recorded run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from haltpoint import Checkpointer
from haltpoint.cli import main
from haltpoint.stopping import EarlyStopping

CURVE = (0.5, 0.3, 0.4, 0.35, 0.25, 0.3, 0.32, 0.33)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(path: Path, patience: int = 10, stopper: bool = True) -> None:
    """A run that records CURVE as val_loss (and 1 - it as val_acc), one save per value."""
    model = torch.nn.Linear(2, 1)
    early = EarlyStopping("val_loss", patience=patience)
    with Checkpointer(path, keep_last=1, async_save=False, capture_rng=False) as ckpt:
        for step, value in enumerate(CURVE):
            metrics = {"val_loss": value, "val_acc": 1 - value}
            state: dict = {"model": model}
            if stopper:
                state["stopper"] = early
                if early.step(metrics):
                    ckpt.save(step, state, metrics)
                    break
            ckpt.save(step, state, metrics)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    make_run(tmp_path / "run")
    return tmp_path / "run"


# -- replay -----------------------------------------------------------------------------------


def test_replay_table_says_where_each_patience_stops(run_dir: Path, capsys):
    code, out, err = run_cli(capsys, "replay", str(run_dir), "--patience", "1,2,3,5")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "val_loss (min) over 8 evaluations, steps 0-7; best 0.25 at step 4"
    header = "patience  stop step  best step  best val_loss  saved  regret"
    assert lines[1].split() == header.split()
    rows = [line.split() for line in lines[2:]]
    assert rows[0] == ["1", "2", "1", "0.3", "62.5%", "20.0%"]
    assert rows[1] == ["2", "3", "1", "0.3", "50.0%", "20.0%"]
    assert rows[2] == ["3", "7", "4", "0.25", "0.0%", "0.0%"]
    assert rows[3] == ["5", "end", "of", "record", "4", "0.25", "0.0%", "0.0%"]
    assert "regret: how much worse" in err


def test_replay_says_why_the_default_rule_ran_to_the_end_of_the_record(run_dir: Path, capsys):
    code, out, _ = run_cli(capsys, "replay", str(run_dir), "--patience", "default,1")
    assert code == 0
    assert out.splitlines()[-1] == (
        "default at the end of the record (evaluation 7, step 7): val_loss has had no new best "
        "for 3 evaluations; the default rule looks at the trend after 5 (half of the 8 "
        "evaluations so far, at least 5); best 0.2500 at evaluation 4"
    )
    code, out, _ = run_cli(capsys, "replay", str(run_dir), "--patience", "default,1", "--json")
    default, one = json.loads(out)["settings"]
    assert default["explain"].startswith("val_loss has had no new best for 3 evaluations")
    assert one["explain"].startswith("val_loss did not improve for 1 evaluation")  # its reason


def test_replay_json_and_history_file(run_dir: Path, capsys):
    argv = ["replay", str(run_dir / "history.jsonl"), "--patience", "1", "--json"]
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    result = json.loads(out)
    assert result["metric"] == "val_loss" and result["mode"] == "min"
    assert result["best_step"] == 4 and result["evaluations"] == 8
    (setting,) = result["settings"]
    assert setting["stop_step"] == 2 and setting["best_step"] == 1
    assert setting["saving"] == pytest.approx(0.625) and setting["regret"] == pytest.approx(0.2)


def test_replay_another_metric_and_min_delta(run_dir: Path, capsys):
    argv = ["replay", str(run_dir), "--metric", "val_acc", "--patience", "3", "--json"]
    code, out, _ = run_cli(capsys, *argv, "--min-delta", "0.06")
    assert code == 0
    result = json.loads(out)
    assert result["mode"] == "max"  # inferred from the name
    # 0.75 at step 4 beats 0.7 by only 0.05: no improvement, so it stops 3 after step 1
    assert result["settings"][0]["stop_step"] == 4
    assert result["settings"][0]["best_step"] == 4  # the best checkpoint up to the stop


def test_replay_errors(tmp_path: Path, run_dir: Path, capsys):
    code, _, err = run_cli(capsys, "replay", str(run_dir), "--patience", "1,x")
    assert code == 2
    assert "--patience: must be integers >= 0 or 'default' separated by commas" in err
    code, _, err = run_cli(capsys, "replay", str(run_dir), "--min-delta", "-1")
    assert code == 2 and "--min-delta: must be a finite number >= 0" in err
    code, _, err = run_cli(capsys, "replay", str(run_dir), "--metric", "f1x")
    assert code == 2 and "--metric 'f1x' is not in the history" in err
    make_run(tmp_path / "plain", stopper=False)
    code, _, err = run_cli(capsys, "replay", str(tmp_path / "plain"))
    assert code == 2
    assert "cannot tell which metric to replay: the history holds val_loss, val_acc" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "replay", str(tmp_path / "empty"))
    assert code == 1 and "has no history.jsonl" in err


def test_plot_and_replay_refuse_a_mode_alone_against_the_recorded_one(run_dir: Path, capsys):
    for command in ("plot", "replay"):
        code, _, err = run_cli(capsys, command, str(run_dir), "--mode", "max")
        assert code == 2, command
        assert "--mode max contradicts the run's recorded monitor, val_loss (min)" in err


def test_a_mode_alone_is_refused_naming_each_commands_own_metric_flag(run_dir: Path, capsys):
    # replay has --metric, not --monitor: its remedy must be a command line that works
    for command, flag in (("plot", "--monitor"), ("replay", "--metric")):
        code, _, err = run_cli(capsys, command, str(run_dir), "--mode", "max")
        assert code == 2, command
        assert err.rstrip("\n").endswith(
            f"name the metric it is meant for with {flag} NAME --mode max"
        ), (command, err)
    code, out, _ = run_cli(capsys, "replay", str(run_dir), "--metric", "val_acc", "--mode", "max")
    assert code == 0 and out.startswith("val_acc (max)")


def test_replay_horizon_without_the_default_row_is_refused(run_dir: Path, capsys):
    code, _, err = run_cli(capsys, "replay", str(run_dir), "--patience", "3", "--horizon", "10")
    assert code == 2
    assert "--horizon is told only to the default rule, and --patience has no 'default'" in err
    argv = ["replay", str(run_dir), "--patience", "default,3", "--horizon", "10"]
    assert run_cli(capsys, *argv)[0] == 0


def test_replay_of_a_history_without_metrics_says_so(tmp_path: Path, capsys):
    (tmp_path / "history.jsonl").write_text('{"epoch": 1}\n')  # a record, but no metrics
    code, _, err = run_cli(capsys, "replay", str(tmp_path))
    assert code == 1
    assert f"the history of {tmp_path} holds no metric values, so there is nothing" in err


def test_replay_of_a_run_that_stopped_early(tmp_path: Path, capsys):
    make_run(tmp_path / "stopped", patience=2)  # stops at step 3
    code, out, _ = run_cli(capsys, "replay", str(tmp_path / "stopped"), "--patience", "1,2,3")
    assert code == 0
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [r[1] for r in rows] == ["2", "3", "end"]


# -- plot -------------------------------------------------------------------------------------


def test_plot_writes_a_real_png_with_best_and_stop(tmp_path: Path, capsys):
    image = pytest.importorskip("matplotlib.image")
    make_run(tmp_path / "run", patience=3)  # stops at step 7
    code, out, _ = run_cli(capsys, "plot", str(tmp_path / "run"))
    png = tmp_path / "run" / "curves.png"
    assert code == 0
    assert out == (
        f"wrote {png}: val_loss, val_acc (best val_loss 0.25 at step 4; stopped at step 7)\n"
    )
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 20_000
    height, width = image.imread(str(png)).shape[:2]
    assert width > height > 300


def test_plot_draws_a_diverged_run_and_says_what_it_left_out(tmp_path: Path, capsys):
    pytest.importorskip("matplotlib")
    model = torch.nn.Linear(2, 1)
    with Checkpointer(tmp_path / "run", keep_last=1, async_save=False) as ckpt:
        for step, value in enumerate((0.5, 0.3, 1e305, 2e307)):
            ckpt.save(step, {"model": model}, {"val_loss": value})
    code, out, err = run_cli(capsys, "plot", str(tmp_path / "run"), "--monitor", "val_loss")
    png = tmp_path / "run" / "curves.png"
    assert (code, err) == (0, "")
    assert out == (
        f"wrote {png}: val_loss (best val_loss 0.3 at step 1; 2 values beyond +-1e300 left out)\n"
    )
    assert png.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_never_writes_through_a_linked_curves_png(tmp_path: Path, capsys):
    pytest.importorskip("matplotlib")
    make_run(tmp_path / "run")
    manifest = tmp_path / "run" / "step-000000007" / "manifest.json"
    before = manifest.read_bytes()
    (tmp_path / "run" / "curves.png").symlink_to(manifest)
    code, _, err = run_cli(capsys, "plot", str(tmp_path / "run"))
    assert code == 1 and "curves.png is a symbolic link; haltpoint does not write" in err
    assert manifest.read_bytes() == before


@pytest.mark.parametrize("where", ["curves.png", "elsewhere.png"])
def test_plot_replaces_a_hard_link_to_a_checkpoint_file_and_leaves_the_checkpoint_intact(
    tmp_path: Path, capsys, where: str
):
    pytest.importorskip("matplotlib")
    make_run(tmp_path / "run")
    tensors = tmp_path / "run" / "step-000000007" / "tensors.safetensors"
    before = tensors.read_bytes()
    target = (tmp_path / "run" if where == "curves.png" else tmp_path) / where
    target.hardlink_to(tensors)  # one file, two names: writing into it would tear step 7
    argv = [] if where == "curves.png" else ["-o", str(target)]
    code, _, err = run_cli(capsys, "plot", str(tmp_path / "run"), *argv)
    assert (code, err) == (0, "")
    assert target.read_bytes()[:8] == PNG_SIGNATURE
    assert tensors.read_bytes() == before and tensors.stat().st_nlink == 1
    assert run_cli(capsys, "verify", str(tmp_path / "run"))[0] == 0
    assert [p.name for p in target.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_plot_options_and_errors(run_dir: Path, tmp_path: Path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    target = tmp_path / "acc.png"
    argv = ["plot", str(run_dir), "-o", str(target), "--metric", "val_acc"]
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0 and out == f"wrote {target}: val_acc\n"  # val_loss not drawn: no best
    code, _, err = run_cli(capsys, "plot", str(run_dir), "--metric", "nope")
    assert code == 2 and "--metric 'nope' is not in the history; it holds 'val_loss'" in err
    code, _, err = run_cli(capsys, "plot", str(run_dir), "-o", str(tmp_path / "x.txt"))
    assert code == 2 and "-o must name a file ending with .avif" in err
    assert not (tmp_path / "x.txt").exists()
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "plot", str(tmp_path / "empty"))
    assert code == 1 and "has no history.jsonl (or it is empty): nothing to plot" in err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run_cli(capsys, "plot", str(run_dir))
    assert code == 1
    assert err == (
        "haltpoint: error: plotting needs matplotlib, which is not installed; "
        "install it with: pip install 'haltpoint[plot]'\n"
    )


def test_a_torn_history_line_is_a_one_line_warning(run_dir: Path, capsys):
    history = run_dir / "history.jsonl"
    lines = history.read_bytes().split(b"\n")
    lines[2] = lines[2][:20]  # damaged by hand, not the last line
    history.write_bytes(b"\n".join(lines))
    code, out, err = run_cli(capsys, "replay", str(run_dir), "--patience", "1")
    assert code == 0 and "over 7 evaluations" in out
    assert err.startswith("haltpoint: warning: ") and "line 3 is not a valid record" in err
    assert "UserWarning" not in err


def test_replay_shows_the_default_rule_beside_fixed_patiences(run_dir: Path, capsys):
    code, out, _ = run_cli(capsys, "replay", str(run_dir), "--json")
    assert code == 0
    settings = json.loads(out)["settings"]
    assert [s["patience"] for s in settings] == [None, 1, 3, 5, 10, 20]
    code, out, _ = run_cli(capsys, "replay", str(run_dir), "--patience", "default,2")
    assert code == 0 and out.splitlines()[2].lstrip().startswith("default")


def test_replay_refuses_a_bad_horizon(run_dir: Path, capsys):
    code, _, err = run_cli(capsys, "replay", str(run_dir), "--horizon", "0")
    assert code == 2 and "--horizon: must be an int >= 1" in err


def test_replay_of_several_runs_pools_the_figures_per_band(tmp_path: Path, capsys):
    make_run(tmp_path / "a")
    make_run(tmp_path / "b")
    argv = ["replay", str(tmp_path / "a"), str(tmp_path / "b"), "--patience", "1,3"]
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 0
    result = json.loads(out)
    assert [r["band"] for r in result["runs"]] == ["<= 30", "<= 30"]
    one, three = result["bands"]
    assert one["patience"] == 1 and one["band"] == "<= 30" and one["runs"] == 2
    # patience 1 stops at step 2 with the best at 1 (0.3 against 0.25): 20% regret, harmful
    assert one["saved"] == pytest.approx(0.625) and one["regret"] == pytest.approx(0.2)
    assert one["harmful"] == 1.0 and one["share"] == pytest.approx(0.625 / 0.375)
    assert three["saved"] == 0.0 and three["regret"] == 0.0 and three["harmful"] == 0.0
    code, out, err = run_cli(capsys, *argv)
    assert (
        code == 0 and out.splitlines()[0] == "2 runs replayed; figures pooled per run-length band"
    )
    assert out.splitlines()[2].split() == [
        "1",
        "<=",
        "30",
        "2",
        "62.5%",
        "166.7%",
        "20.0%",
        "100.0%",
    ]
    assert "of oracle: that over what stopping right after each run's best saves" in err


def test_replay_json_names_the_band_of_one_run(run_dir: Path, capsys):
    code, out, _ = run_cli(capsys, "replay", str(run_dir), "--patience", "1", "--json")
    assert code == 0 and json.loads(out)["band"] == "<= 30"


def test_plot_and_replay_default_to_the_metric_the_manifests_rank_by(tmp_path: Path, capsys):
    """The checksummed record in the manifests (the Checkpointer's monitor) wins over the
    metric the history's stopper watched; a bare history file has only the latter."""
    pytest.importorskip("matplotlib")
    model = torch.nn.Linear(2, 1)
    early = EarlyStopping("val_loss", patience=10)
    run = tmp_path / "run"
    with Checkpointer(run, monitor="val_acc", mode="max", async_save=False) as ckpt:
        for step, value in enumerate(CURVE):
            metrics = {"val_loss": value, "val_acc": 1 - value}
            early.step(metrics)
            ckpt.save(step, {"model": model, "stopper": early}, metrics)
    code, out, _ = run_cli(capsys, "plot", str(run))
    assert code == 0 and "(best val_acc 0.75 at step 4)" in out
    code, out, _ = run_cli(capsys, "replay", str(run), "--json")
    assert code == 0 and json.loads(out)["metric"] == "val_acc"
    code, out, _ = run_cli(capsys, "replay", str(run / "history.jsonl"), "--json")
    assert code == 0 and json.loads(out)["metric"] == "val_loss"  # no manifests to ask


def test_replay_and_plot_follow_the_branch_saved_last_after_a_rewind(tmp_path: Path, capsys):
    """Steps 0, 10, 20, 30, then restore(which=10) and saves of 15 and 16: the history ends
    with the abandoned steps 20 and 30 before 15 and 16. Replay and plot sorted the records by
    step and kept 20 and 30 after 16, a curve no run went through; they now read the branch
    saved last (what "latest" resumes)."""
    model = torch.nn.Linear(2, 1)
    with Checkpointer(tmp_path / "run", keep_last=9, async_save=False, capture_rng=False) as ckpt:
        for step, value in [(0, 0.5), (10, 0.4), (20, 0.05), (30, 0.9)]:
            ckpt.save(step, {"model": model}, {"val_loss": value})
        ckpt.restore({"model": model}, 10)
        for step, value in [(15, 0.2), (16, 0.3)]:
            ckpt.save(step, {"model": model}, {"val_loss": value})
    code, out, _ = run_cli(capsys, "replay", str(tmp_path / "run"), "--patience", "1", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["evaluations"] == 4 and result["best_step"] == 15
    assert result["settings"][0]["stop_step"] == 16
    code, out, _ = run_cli(capsys, "replay", str(tmp_path / "run"), "--patience", "1")
    assert (
        out.splitlines()[0] == "val_loss (min) over 4 evaluations, steps 0-16; best 0.2 at step 15"
    )
    pytest.importorskip("matplotlib")
    code, out, _ = run_cli(capsys, "plot", str(tmp_path / "run"), "--monitor", "val_loss")
    assert code == 0 and "(best val_loss 0.2 at step 15)" in out
