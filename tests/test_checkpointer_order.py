"""Commit order: after a rewind, "latest" is the branch saved last, not the highest step.

Every manifest records `extra["sequence"]`, one more than the highest sequence committed before
it; "latest" (restore, `ls`, `show`, `export`) and keep_last rank by (sequence, step), and a
manifest without a sequence (an older haltpoint's) sorts before any that has one.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from haltpoint import Checkpointer
from haltpoint.cli import main
from haltpoint.errors import CheckpointError, StepBehindError
from haltpoint.store.hashing import hash_bytes
from haltpoint.store.run_dir import RunDirectory, checkpoint_dirname
from haltpoint.store.storage import LocalStorage

OLD_BRANCH = (10, 20, 30)
NEW_BRANCH = (15, 16)


def train(ckpt: Checkpointer, model: torch.nn.Module, steps: tuple[int, ...]) -> None:
    """Save `steps`, the weight of each checkpoint filled with its step."""
    for step in steps:
        with torch.no_grad():
            model.weight.fill_(float(step))
        ckpt.save(step, {"model": model}, {"loss": 1.0 / (step + 1)})


def rewound_run(run: Path, *, async_save: bool, keep_last: int = 10) -> None:
    """Steps 10, 20, 30; then a job that rewinds to 10, saves 15 and 16, and ends (killed)."""
    model = torch.nn.Linear(3, 2)
    with Checkpointer(run, keep_last=keep_last, async_save=async_save) as ckpt:
        train(ckpt, model, OLD_BRANCH)
    with Checkpointer(run, keep_last=keep_last, async_save=async_save) as ckpt:
        ckpt.restore({"model": model}, which=10)
        train(ckpt, model, NEW_BRANCH)


def committed_steps(run: Path) -> list[int]:
    return [e.step for e in RunDirectory(LocalStorage(run)).committed()]


def seal(body: dict[str, Any]) -> bytes:
    """The manifest bytes for `body`, with a valid checksum (as a crafted one would have)."""

    def canonical(obj: object) -> bytes:
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("ascii")

    body = {k: v for k, v in body.items() if k != "checksum"}
    return canonical({**body, "checksum": hash_bytes(canonical(body))}) + b"\n"


def rewrite_extra(run: Path, step: int, **changes: Any) -> None:
    """Change the `extra` of a step's manifest (None removes the key) and seal it again."""
    path = run / checkpoint_dirname(step) / "manifest.json"
    body = json.loads(path.read_bytes())
    for key, value in changes.items():
        if value is None:
            body["extra"].pop(key, None)
        else:
            body["extra"][key] = value
    path.write_bytes(seal(body))


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- latest is the branch saved last ----------------------------------------------------------


@pytest.mark.parametrize("async_save", [False, True])
@pytest.mark.parametrize("read_only", [False, True])
def test_a_rerun_after_a_rewind_resumes_the_new_branch(
    tmp_path: Path, async_save: bool, read_only: bool
):
    run = tmp_path / "run"
    rewound_run(run, async_save=async_save)
    assert committed_steps(run) == [10, 15, 16, 20, 30]  # the old branch is still there
    model = torch.nn.Linear(3, 2)
    with Checkpointer(run, keep_last=10, async_save=async_save, read_only=read_only) as ckpt:
        info = ckpt.restore({"model": model})
        assert info is not None and info.step == 16
        assert torch.equal(model.weight, torch.full((2, 3), 16.0))
        order = sorted(ckpt.list(), key=lambda i: i.sequence if i.sequence is not None else -1)
        assert [i.step for i in order] == [10, 20, 30, 15, 16]
        assert [i.sequence for i in order] == [0, 1, 2, 3, 4]
        if not read_only:  # and saves go on from it
            train(ckpt, model, (17,))
    if not read_only:
        with Checkpointer(run, keep_last=10, read_only=True) as ckpt:
            assert (info := ckpt.restore({"model": model})) is not None and info.step == 17


def test_a_save_without_a_restore_goes_on_from_the_latest_not_the_highest_step(tmp_path: Path):
    """Steps only go forward from the latest checkpoint: after a rewind that is the new
    branch's, so the rerun of a loop that saves 17 without restoring first is not refused."""
    run = tmp_path / "run"
    rewound_run(run, async_save=False)
    with Checkpointer(run, keep_last=10, async_save=False) as ckpt:
        with pytest.raises(StepBehindError, match="older than step 16, the latest checkpoint"):
            train(ckpt, torch.nn.Linear(3, 2), (12,))
        train(ckpt, torch.nn.Linear(3, 2), (17,))
    assert committed_steps(run) == [10, 15, 16, 17, 20, 30]


@pytest.mark.parametrize("async_save", [False, True])
def test_save_returns_the_sequence_once_it_is_committed(tmp_path: Path, async_save: bool):
    """A sync save returns the sequence it committed; an async one returns before its commit
    (None, never a number that depends on the thread's timing), and `list()` has it."""
    with Checkpointer(tmp_path / "run", keep_last=5, async_save=async_save) as ckpt:
        infos = [ckpt.save(step, {"w": torch.ones(2)}) for step in (3, 7)]
        listed = ckpt.list()
    assert [i.sequence for i in infos] == ([None, None] if async_save else [0, 1])
    assert [(i.step, i.sequence) for i in listed] == [(3, 0), (7, 1)]


def test_the_command_line_tags_shows_and_exports_the_new_branch_as_latest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    run = tmp_path / "run"
    rewound_run(run, async_save=False)
    code, out, _ = run_cli(capsys, "ls", str(run), "--json")
    assert code == 0
    assert [r["step"] for r in json.loads(out) if "latest" in r["tags"]] == [16]
    code, out, _ = run_cli(capsys, "show", str(run))
    assert code == 0 and out.startswith("step:      16\n")
    sequence = max(i.sequence or 0 for i in Checkpointer(run, read_only=True).list())
    assert f"committed: #{sequence} in this run's commit order" in out and "extra:" not in out
    target = tmp_path / "latest.safetensors"
    code, out, _ = run_cli(capsys, "export", str(run), "--which", "latest", "-o", str(target))
    assert code == 0 and "from step 16" in out
    weight = safetensors.torch.load_file(str(target))["weight"]
    assert torch.equal(weight, torch.full((2, 3), 16.0))


@pytest.mark.parametrize("async_save", [False, True])
def test_restore_falls_back_in_commit_order_past_a_damaged_latest(tmp_path: Path, async_save: bool):
    """The new branch's newest is damaged: restore falls back to the one saved before it (15),
    not to the abandoned branch's highest step."""
    run = tmp_path / "run"
    rewound_run(run, async_save=async_save)
    tensors = run / checkpoint_dirname(16) / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    model = torch.nn.Linear(3, 2)
    with (
        pytest.warns(UserWarning, match="falling back to the checkpoint of step 15"),
        Checkpointer(run, read_only=True) as ckpt,
    ):
        info = ckpt.restore({"model": model})
    assert info is not None and info.step == 15
    assert torch.equal(model.weight, torch.full((2, 3), 15.0))


# -- keep_last ranks by commit order ----------------------------------------------------------


@pytest.mark.parametrize("async_save", [False, True])
def test_keep_last_after_a_rewind_evicts_the_abandoned_branch_first(
    tmp_path: Path, async_save: bool
):
    run = tmp_path / "run"
    model = torch.nn.Linear(3, 2)
    with Checkpointer(run, keep_last=3, async_save=async_save) as ckpt:
        train(ckpt, model, OLD_BRANCH)
    with Checkpointer(run, keep_last=2, async_save=async_save) as ckpt:
        ckpt.restore({"model": model}, which=10)
        train(ckpt, model, (15,))
        ckpt.wait()
        assert committed_steps(run) == [15, 30]  # 10 and 20 were committed before 30
        train(ckpt, model, (16,))
        ckpt.wait()
        assert committed_steps(run) == [15, 16]  # the abandoned 30 goes before 15
        train(ckpt, model, (17,))
    assert committed_steps(run) == [16, 17]
    assert not (run / checkpoint_dirname(30)).exists()  # its folder and files went too


def test_keep_last_after_a_rewind_verifies_what_it_keeps_before_it_removes(tmp_path: Path):
    """The abandoned branch's 30 is among the two newest committed, and damaged: retention
    finds that before it removes anything, sets it aside and keeps 20 in its place."""
    run = tmp_path / "run"
    model = torch.nn.Linear(3, 2)
    with Checkpointer(run, keep_last=3, async_save=False) as ckpt:
        train(ckpt, model, OLD_BRANCH)
    tensors = run / checkpoint_dirname(30) / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with (
        pytest.warns(UserWarning, match="set the damaged checkpoint of step 30 aside"),
        Checkpointer(run, keep_last=2, async_save=False) as ckpt,
    ):
        ckpt.restore({"model": model}, which=10)
        train(ckpt, model, (15,))
    assert committed_steps(run) == [15, 20]
    assert [p.name for p in (run / "quarantine").iterdir()] == ["step-000000030-1.json"]


# -- manifests without a sequence (older haltpoint) --------------------------------------------


def test_manifests_without_a_sequence_order_by_step(tmp_path: Path, capsys):
    run = tmp_path / "run"
    model = torch.nn.Linear(3, 2)
    with Checkpointer(run, keep_last=10, async_save=False) as ckpt:
        train(ckpt, model, OLD_BRANCH)
    for step in OLD_BRANCH:  # as an older haltpoint wrote them
        rewrite_extra(run, step, sequence=None)
    with Checkpointer(run, keep_last=10, read_only=True) as ckpt:
        assert [i.sequence for i in ckpt.list()] == [None, None, None]
        assert (info := ckpt.restore({"model": model})) is not None and info.step == 30
    code, out, _ = run_cli(capsys, "ls", str(run), "--json")
    assert code == 0 and [r["step"] for r in json.loads(out) if "latest" in r["tags"]] == [30]
    with Checkpointer(run, keep_last=10, async_save=False) as ckpt:  # a rewind, upgraded
        ckpt.restore({"model": model}, which=10)
        train(ckpt, model, (15,))
        assert [i.sequence for i in ckpt.list()] == [None, 0, None, None]
    with Checkpointer(run, read_only=True) as ckpt:
        assert (info := ckpt.restore({"model": model})) is not None and info.step == 15


def test_a_manifest_without_a_sequence_sorts_before_every_one_with_one(tmp_path: Path):
    run = tmp_path / "run"
    model = torch.nn.Linear(3, 2)
    with Checkpointer(run, keep_last=10, async_save=False) as ckpt:
        train(ckpt, model, OLD_BRANCH)
    rewrite_extra(run, 30, sequence=None)
    with Checkpointer(run, read_only=True) as ckpt:
        assert (info := ckpt.restore({"model": model})) is not None and info.step == 20


# -- a crafted sequence is damage -------------------------------------------------------------


@pytest.mark.parametrize("value", [-1, True, 2.0, "3", [3], {"n": 3}, 2**63], ids=repr)
def test_a_crafted_sequence_is_a_damaged_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: Any
):
    run = tmp_path / "run"
    model = torch.nn.Linear(3, 2)
    with Checkpointer(run, keep_last=10, async_save=False) as ckpt:
        train(ckpt, model, OLD_BRANCH)
    rewrite_extra(run, 30, sequence=value)
    message = r"extra\['sequence'\] must be an int in \[0, 2\*\*63\)"
    with pytest.warns(UserWarning, match=message), Checkpointer(run, read_only=True) as ckpt:
        assert (info := ckpt.restore({"model": model})) is not None and info.step == 20
    with (
        Checkpointer(run, read_only=True) as ckpt,
        pytest.warns(UserWarning, match=message),  # listed as damaged
        pytest.raises(CheckpointError, match=message),
    ):
        ckpt.restore({"model": model}, which=30)
    code, _, err = run_cli(capsys, "show", str(run), "--step", "30")
    assert code == 1 and err.count("\n") == 1 and "extra['sequence']" in err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, out, _ = run_cli(capsys, "ls", str(run), "--json")
    rows = {r["step"]: r for r in json.loads(out)}
    assert rows[30]["status"] == "damaged" and "latest" in rows[20]["tags"]


# -- the other writers: gc and import ---------------------------------------------------------


def test_gc_keep_last_counts_in_commit_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    run = tmp_path / "run"
    rewound_run(run, async_save=False)
    code, out, err = run_cli(capsys, "gc", str(run), "--keep-last", "2")
    assert code == 0, err
    assert "kept steps 15, 16" in out
    assert committed_steps(run) == [15, 16]


def test_an_import_after_a_rewind_is_the_latest(tmp_path: Path, capsys):
    """Import commits the next sequence too: were it left out, its checkpoint would sort
    before every recorded one, and "latest" would stay the rewound branch's."""
    run = tmp_path / "run"
    rewound_run(run, async_save=False)
    weights = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({"weight": torch.full((2, 3), 31.0)}, str(weights))
    code, _, err = run_cli(capsys, "import", str(weights), "-o", str(run), "--step", "31")
    assert code == 0, err
    with Checkpointer(run, read_only=True) as ckpt:
        assert [i.sequence for i in ckpt.list()][-1] == 5
        model = {"model": {"weight": torch.zeros(2, 3)}}
        info = ckpt.restore(model, strict=False)
    assert info is not None and info.step == 31


def _reranked_rewind(run: Path) -> None:
    """Steps 10, 20, 30 ranked by score, higher better; a rewind to 10 whose writer ranks
    15 and 16 by score, lower better (the new branch is the newer, at lower steps)."""
    model = torch.nn.Linear(3, 2)
    with Checkpointer(run, monitor="score", mode="max", keep_last=10) as ckpt:
        for step in OLD_BRANCH:
            ckpt.save(step, {"model": model}, {"score": float(step), "acc": 0.5})
    with Checkpointer(run, monitor="score", mode="min", keep_last=10) as ckpt:
        ckpt.restore({"model": model}, which=10)
        for step in NEW_BRANCH:
            ckpt.save(step, {"model": model}, {"score": float(step), "acc": 0.5})


def test_the_ranking_recorded_last_in_commit_order_ranks_best(tmp_path: Path, capsys):
    run = tmp_path / "run"
    _reranked_rewind(run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the change of mode is warned about
        best = Checkpointer(run, monitor="score", read_only=True).restore(
            {"model": torch.nn.Linear(3, 2)}, "best"
        )
        assert main(["ls", str(run), "--json"]) == 0
    assert best is not None and best.step == 10  # by "min", the new branch's ranking
    rows = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in rows if "best" in r["tags"]] == [10]
