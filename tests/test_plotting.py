"""`haltpoint.plotting`: curves from history, a real PNG, a clear missing-dependency error."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from haltpoint.plotting import MissingDependencyError, curves, plot_history, require_matplotlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def history(values: list[float], stop_at: int | None = None) -> list[dict]:
    records = []
    for step, value in enumerate(values):
        record: dict = {"step": step, "metrics": {"loss": value + 0.1, "val_loss": value}}
        if stop_at is not None:
            record["stopper"] = {"stop": step == stop_at, "value": value}
        records.append(record)
    return records


def test_curves_orders_by_step_and_keeps_the_last_record_of_a_step():
    records = [
        {"step": 1, "metrics": {"a": 2.0}},
        {"step": 0, "metrics": {"a": 1.0, "b": 5.0}},
        {"step": 1, "metrics": {"a": 3.0}},  # logged again after a resume
        {"note": "not a record"},
    ]
    assert curves(records) == {"a": ([0, 1], [1.0, 3.0]), "b": ([0], [5.0])}
    assert curves(records, ["b"]) == {"b": ([0], [5.0])}
    with pytest.raises(ValueError, match=r"metric 'c' is not in the history; it holds 'a', 'b'"):
        curves(records, ["c"])


def test_curves_pass_over_an_int_too_large_for_a_float_like_any_non_number():
    records = [{"step": 0, "metrics": {"a": 10**400}}, {"step": 1, "metrics": {"a": 0.5}}]
    assert curves(records) == {"a": ([1], [0.5])}


def test_a_record_whose_step_no_manifest_could_hold_is_passed_over(tmp_path: Path):
    records = [
        {"step": 10**400, "metrics": {"a": 1.0}, "stopper": {"stop": True}},
        {"step": True, "metrics": {"a": 2.0}},
        {"step": 1, "metrics": {"a": 0.5}},
    ]
    assert curves(records) == {"a": ([1], [0.5])}
    plot_history(records, tmp_path / "c.png")  # the stop of step 10**400 is not marked
    assert (tmp_path / "c.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("values", [[9e307, -9e307], [1e307], [-1e308]])
def test_values_near_a_floats_limit_are_left_out_of_a_plot_that_still_draws(
    tmp_path: Path, values: list[float]
):
    records = [{"step": i, "metrics": {"loss": v}} for i, v in enumerate([0.5, *values, 0.4])]
    summary = plot_history(records, tmp_path / "c.png", monitor="loss")
    assert (tmp_path / "c.png").read_bytes().startswith(PNG_SIGNATURE)
    assert summary.left_out == len(values)
    assert summary.best_value == 0.4 and summary.best_step == len(values) + 1
    assert plot_history([{"step": 0, "metrics": {"loss": 1e300}}], tmp_path / "c.png").left_out == 0


def test_plot_history_marks_best_and_stop(tmp_path: Path):
    image = pytest.importorskip("matplotlib.image")
    path = tmp_path / "curves.png"
    summary = plot_history(
        history([0.9, 0.5, 0.4, 0.45, 0.5], stop_at=4), path, monitor="val_loss", title="t"
    )
    assert summary.best_step == 2 and summary.best_value == 0.4 and summary.stop_step == 4
    assert summary.metrics == ("loss", "val_loss") and summary.path == str(path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 10_000
    height, width = image.imread(str(path)).shape[:2]
    assert width > height  # one panel: only losses


def test_plot_history_two_panels_and_max_mode(tmp_path: Path):
    image = pytest.importorskip("matplotlib.image")
    records = [
        {"step": s, "metrics": {"loss": 1.0 / (s + 1), "acc": a}}
        for s, a in enumerate([0.5, 0.8, 0.7])
    ]
    summary = plot_history(records, tmp_path / "p.png", monitor="acc")
    assert summary.best_step == 1 and summary.stop_step is None
    height, width = image.imread(str(tmp_path / "p.png")).shape[:2]
    assert width > 2 * height


def test_plot_history_errors(tmp_path: Path):
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="the history holds no metric values to plot"):
        plot_history([{"step": 0, "metrics": {}}], tmp_path / "p.png")
    with pytest.raises(ValueError, match=r"monitor 'acc' is not among the plotted metrics"):
        plot_history(history([1.0]), tmp_path / "p.png", monitor="acc")
    assert not (tmp_path / "p.png").exists()
    with pytest.raises(ValueError, match=r"'.*x\.txt' from its suffix; .*\.pdf, .*\.png, .*\.svg"):
        plot_history(history([1.0]), tmp_path / "x.txt")
    assert not (tmp_path / "x.txt").exists()


def test_plot_history_writes_the_format_of_the_suffix(tmp_path: Path):
    pytest.importorskip("matplotlib")
    plot_history(history([1.0, 0.5]), tmp_path / "p.svg")
    assert b"<svg" in (tmp_path / "p.svg").read_bytes()[:500]


def test_missing_matplotlib_names_the_install_command(monkeypatch, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    message = (
        r"plotting needs matplotlib, which is not installed; "
        r"install it with: pip install 'haltpoint\[plot\]'"
    )
    with pytest.raises(MissingDependencyError, match=message):
        require_matplotlib()
    with pytest.raises(ImportError, match=message):
        plot_history(history([1.0]), tmp_path / "p.png")
