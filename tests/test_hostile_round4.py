"""Crafted run directories, round 4: what earlier campaigns left. An optimizer state that
restores and then fails the next `step()` in the training loop, and a history that makes
`haltpoint plot` draw for hours. Each is refused (or bounded) with one line."""

from __future__ import annotations

import copy
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from crafted import adam, hostile
from haltpoint import Checkpointer
from haltpoint.cli import main
from haltpoint.errors import CorruptCheckpointError, StateMismatchError
from haltpoint.plotting import MAX_CURVES, plot_history
from haltpoint.store.history import encode_record

# benchmarks/hostile.py seals a crafted manifest with a valid checksum
seal = hostile.seal


class _Saved:
    """A stateful object whose `state_dict()` is whatever a crafted checkpoint holds."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


def _per_param(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(state: dict[str, Any]) -> None:
        for per_param in state["state"].values():
            per_param[key] = value

    return change


def _group(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(state: dict[str, Any]) -> None:
        state["param_groups"][0][key] = value

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_per_param("step", torch.tensor(1 + 1j)), r"holds step as a 0-d tensor of torch.complex"),
        (_per_param("step", torch.tensor(True)), r"holds step as a 0-d tensor of torch.bool"),
        (
            _per_param("step", torch.tensor(1.0).to(torch.float8_e4m3fn)),
            r"holds step as a 0-d tensor of torch.float8_e4m3fn",
        ),
        (
            _per_param("step", torch.tensor(1, dtype=torch.uint64)),
            r"holds step as a 0-d tensor of torch.uint64",
        ),
        (_per_param("step", torch.tensor(-1.0)), r"holds step -1.0, not a count of steps >= 0"),
        (_per_param("step", torch.tensor(float("nan"))), r"holds step nan, not a count"),
        (_per_param("step", -3), r"holds step -3, not a count of steps >= 0"),
        (_group("lr", torch.tensor(1 + 1j)), r"has lr=0.001, the checkpoint lr=tensor\(1.\+1.j\)"),
        (_group("lr", torch.tensor(True)), r"has lr=0.001, the checkpoint lr=tensor\(True\)"),
        (_group("betas", ("a", "b")), r"betas=\(0.9, 0.999\), the checkpoint betas=\('a', 'b'\)"),
        (
            _group("betas", (torch.tensor(0.9), torch.tensor([0.9, 0.1]))),
            r"the checkpoint betas=\(tensor\(0.9000\), tensor\(\[0.9000, 0.1000\]\)\)",
        ),
    ],
    ids=[
        "step-complex", "step-bool", "step-float8", "step-uint64", "step-minus-1", "step-nan",
        "step-int-minus-3", "lr-complex-tensor", "lr-bool-tensor", "betas-strings",
        "betas-a-vector",
    ],
)  # fmt: skip
def test_an_optimizer_state_whose_next_step_would_raise_is_refused_at_restore(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    """torch loads these and says nothing; the next `optimizer.step()` raised in the
    training loop (`RuntimeError: result type ComplexFloat can't be cast ...`,
    `NotImplementedError: "add_stub" not implemented for 'Float8_e4m3fn'`, `TypeError:
    unsupported operand type(s) for -: 'int' and 'str'`, `ZeroDivisionError` for a step of
    -1), or made every parameter NaN (a step of NaN). Refused before anything loads."""
    model, optimizer = adam()
    crafted = copy.deepcopy(optimizer.state_dict())
    change(crafted)
    with Checkpointer(tmp_path / "run", async_save=False) as ckpt:
        ckpt.save(1, {"model": model, "optimizer": _Saved(crafted)})
    live_model, live_optimizer = adam()
    live_model.weight.data.fill_(7.0)
    before = copy.deepcopy(live_optimizer.state_dict())
    with pytest.raises(StateMismatchError, match=message) as refused:
        Checkpointer(tmp_path / "run", read_only=True).restore(
            {"model": live_model, "optimizer": live_optimizer}, 1
        )
    assert "\n" not in str(refused.value)
    assert bool((live_model.weight == 7.0).all())  # nothing loaded
    assert str(live_optimizer.state_dict()) == str(before)


@pytest.mark.parametrize(
    "value",
    [torch.tensor(3.0), torch.tensor(3, dtype=torch.int64), torch.tensor(3, dtype=torch.uint8), 3],
    ids=["float32", "int64", "uint8", "a-python-int"],
)
def test_a_step_torch_can_count_from_still_restores(tmp_path: Path, value: Any) -> None:
    model, optimizer = adam()
    crafted = copy.deepcopy(optimizer.state_dict())
    _per_param("step", value)(crafted)
    with Checkpointer(tmp_path / "run", async_save=False) as ckpt:
        ckpt.save(1, {"model": model, "optimizer": _Saved(crafted)})
    live_model, live_optimizer = adam()
    Checkpointer(tmp_path / "run", read_only=True).restore(
        {"model": live_model, "optimizer": live_optimizer}, 1
    )
    live_model(torch.ones(1, 3)).sum().backward()
    live_optimizer.step()
    assert all(bool(torch.isfinite(p).all()) for p in live_model.parameters())


# -- a history that makes `plot` draw for hours -----------------------------------------------


def _history(run: Path, records: list[dict[str, Any]]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "history.jsonl", "wb") as f:
        for record in records:
            f.write(encode_record(record))


@pytest.mark.parametrize(
    "records",
    [
        [{"step": s, "metrics": {"x" * 2_000_000: 1.0 / (s + 1)}} for s in range(2)],
        [{"step": s, "metrics": {f"m{i}": i + s for i in range(20_000)}} for s in range(2)],
    ],
    ids=["a-name-of-2-million-characters", "20000-metrics"],
)
def test_plot_of_a_crafted_history_ends_in_seconds(
    tmp_path: Path, records: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    """matplotlib laid out a legend label of 2 million characters for minutes (100,000 took
    11 s), and drew 20,000 curves and their legend for longer (5,000 took 40 s): a history of
    a few MB held `plot` for hours. Labels are cut, and by default at most
    `MAX_CURVES` curves are drawn, the rest named in the line `plot` prints."""
    run = tmp_path / "run"
    _history(run, records)
    started = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # matplotlib's layout of a crowded legend
        code = main(["plot", str(run), "-o", str(tmp_path / "c.png")])
    assert time.monotonic() - started < 30
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")
    names = len(records[0]["metrics"])
    if names > MAX_CURVES:
        assert f"{names - MAX_CURVES} more metrics not plotted" in captured.out


def test_plot_draws_the_monitor_among_the_curves_it_keeps(tmp_path: Path) -> None:
    records = [
        {"step": s, "metrics": {**{f"m{i}": i + s for i in range(100)}, "val_loss": 1 / (s + 1)}}
        for s in range(3)
    ]
    summary = plot_history(records, tmp_path / "c.png", monitor="val_loss")
    assert len(summary.metrics) == MAX_CURVES and "val_loss" in summary.metrics
    assert summary.best_step == 2 and summary.not_plotted == 101 - MAX_CURVES
    chosen = plot_history(records, tmp_path / "c.png", metrics=[f"m{i}" for i in range(60)])
    assert len(chosen.metrics) == 60 and chosen.not_plotted == 0  # asked for: all drawn


# -- a commit sequence that leaves no room for the next one -----------------------------------


def test_a_sequence_at_the_end_of_commit_order_is_one_checkpoint_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest may record a sequence up to 2**63 - 1; the next save computed 2**63 and
    every save after it raised a bare `ValueError` from the manifest's own check ("must be an
    int in [0, 2**63)"), naming nothing to remove. Now one `CorruptCheckpointError` line
    naming the step, from a save and from `import`; nothing is committed."""
    run = tmp_path / "run"
    with Checkpointer(run, async_save=False) as ckpt:
        ckpt.save(1, {"w": torch.ones(2)})
    path = run / "step-000000001" / "manifest.json"
    body = json.loads(path.read_bytes())
    body["extra"]["sequence"] = 2**63 - 1
    path.write_bytes(seal(body))
    with Checkpointer(run, async_save=False) as ckpt:
        with pytest.raises(CorruptCheckpointError, match="step 1 records commit sequence") as e:
            ckpt.save(2, {"w": torch.ones(2)})
        assert "\n" not in str(e.value)
        assert [info.step for info in ckpt.list()] == [1]
    torch.save({"w": torch.ones(2)}, tmp_path / "w.pt")
    assert main(["import", str(tmp_path / "w.pt"), "-o", str(run), "--step", "5"]) == 1
    err = capsys.readouterr().err
    assert err.count("haltpoint: error: ") == 1 and "step 1 records commit sequence" in err
