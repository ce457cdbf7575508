"""Distributed (DDP, replicated state): identical decisions on every rank, rank 0 writes once.

One `torchrun --nproc_per_node=2` launch (gloo on CPU) runs tests/workers/ddp_worker.py; the
tests below read the JSON each rank wrote. A hang fails the launch after its timeout.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from haltpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointExistsError,
    DistributedEarlyStopping,
    EarlyStopping,
    StateMismatchError,
    synced,
)
from haltpoint.distributed import Replicas, get_rank, get_world_size, is_distributed, strategy
from haltpoint.distributed.collectives import on_writer

sys.path.insert(0, str(Path(__file__).parent))
from torchrun import rank_results, torchrun

WORKER = Path(__file__).parent / "workers" / "ddp_worker.py"
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ddp")
    run_dir, fail_dir, out = root / "run", root / "fail", root / "out"
    out.mkdir()
    torchrun(
        WORKER, "--run-dir", str(run_dir), "--fail-dir", str(fail_dir), "--out", str(out),
        timeout=TIMEOUT_S,
    )  # fmt: skip
    return {"ranks": rank_results(out), "run_dir": run_dir, "fail_dir": fail_dir}


@pytest.mark.slow
@pytest.mark.parametrize("first", [0, 1])
def test_ranks_whose_plain_stoppers_disagree_raise_instead_of_hanging(
    tmp_path: Path, first: int
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    torchrun(
        WORKER.parent / "diverge_worker.py",
        "--run-dir", str(tmp_path / "run"), "--first", str(first), "--out", str(out),
        timeout=TIMEOUT_S,
    )  # fmt: skip
    other = 1 - first
    for rank in (0, 1):
        result = json.loads((out / f"rank{rank}.json").read_text())
        assert result["error"] is not None, f"rank {rank} raised nothing"
        assert f"rank {first} at close()" in result["error"]
        assert f"rank {other} at save(2)" in result["error"]
        assert "synced(EarlyStopping(...))" in result["error"]


@pytest.mark.slow
def test_ranks_take_the_same_decision_and_rank0_warns(ddp_run: dict[str, Any]) -> None:
    r0, r1 = ddp_run["ranks"]
    assert r0["stop"] == r1["stop"]
    assert r0["stop"]["evaluation"] == 4 and r0["stop"]["code"] == "patience"
    assert r0["stop"]["best_step"] == 2
    assert r0["stop"]["best"] == pytest.approx(0.705)  # the mean of 0.70 and 0.71
    assert r0["rank0_reduce"] == r1["rank0_reduce"]  # reduce="rank0": rank 0's value
    assert r0["rank0_reduce"]["stop"] and r0["rank0_reduce"]["best"] == pytest.approx(0.7)
    assert len(r0["warnings"]) == 10  # once per evaluation and stopper: 5 x 2, on rank 0 only
    assert "ranks disagree on val_loss" in r0["warnings"][0]
    assert r1["warnings"] == []


@pytest.mark.slow
def test_rank0_writes_each_checkpoint_once_and_all_restore_the_same(
    ddp_run: dict[str, Any],
) -> None:
    r0, r1 = ddp_run["ranks"]
    run_dir: Path = ddp_run["run_dir"]
    assert r0["saved"] == r1["saved"] == [0, 1, 2, 3, 4]
    assert r0["exists"] == r1["exists"] == "CheckpointExistsError"
    folders = sorted(p.name for p in run_dir.iterdir() if p.is_dir())
    assert len(folders) == 5
    history = (run_dir / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in history] == [0, 1, 2, 3, 4]  # written once
    assert r0["restored"] == r1["restored"] == 2
    assert r0["weights"] == r1["weights"]  # the saved weights, not the rank-spoilt ones
    with Checkpointer(run_dir, read_only=True, monitor="val_loss") as reader:
        saved = {"model": torch.nn.Linear(4, 1)}
        reader.restore(saved, "best", strict=False)
    weights = [p.detach().flatten().tolist() for p in saved["model"].parameters()]
    assert weights == r0["weights"]


@pytest.mark.slow
def test_every_rank_resumes_the_branch_saved_last_after_a_rewind(ddp_run: dict[str, Any]) -> None:
    r0, r1 = ddp_run["ranks"]
    assert r0["rewound"] == r1["rewound"] == 15  # not 30, the abandoned branch's


@pytest.mark.slow
def test_a_background_failure_on_rank0_raises_on_every_rank(ddp_run: dict[str, Any]) -> None:
    r0, r1 = ddp_run["ranks"]
    assert r0["finished"] and r1["finished"]  # nobody hung after the failure
    assert r0["failure"] == r1["failure"]
    assert r0["failure"]["type"] == "CheckpointError"
    assert "on rank 0" in r0["failure"]["message"]
    assert "simulated disk failure" in r0["failure"]["message"]
    assert not any((ddp_run["fail_dir"]).glob("*/manifest.json"))


@pytest.mark.slow
def test_a_rank_failing_to_read_the_chosen_step_raises_everywhere_before_any_load(
    ddp_run: dict[str, Any],
) -> None:
    r0, r1 = ddp_run["ranks"]
    for r in (r0, r1):
        assert "failed on rank 1" in r["read_failure"]
        assert "rank 1 cannot see the shared disk" in r["read_failure"]
        assert r["unchanged_after_read_failure"]  # rank 0 read fine but did not load


# -- single process: the no-op paths -------------------------------------------------------


def test_helpers_without_a_process_group() -> None:
    assert (get_rank(), get_world_size(), is_distributed()) == (0, 1, False)
    assert Replicas.current() is None
    assert on_writer(None, lambda: 42, "anything") == 42


def test_synced_is_the_plain_stopper_without_a_process_group() -> None:
    plain, wrapped = EarlyStopping(patience=1), synced(EarlyStopping(patience=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for value in (1.0, 0.5, 0.7):
            assert wrapped.step(value) == plain.step(value)
    assert wrapped.stopped and wrapped.reason == plain.reason
    assert wrapped.state_dict() == plain.state_dict()
    restored = synced(EarlyStopping(patience=1))
    restored.load_state_dict(wrapped.state_dict())
    assert restored.stopped and isinstance(restored, DistributedEarlyStopping)
    opposite = synced(EarlyStopping(mode="max", patience=1))
    with pytest.raises(StateMismatchError, match=r"in mode 'min', but this one .* mode 'max'"):
        opposite.load_state_dict(wrapped.state_dict())
    assert not opposite.stopped


def test_synced_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"step\(value\) method"):
        synced(object())
    with pytest.raises(ValueError, match="reduce must be 'mean' or 'rank0'"):
        synced(EarlyStopping(), reduce="max")
    with pytest.raises(ValueError, match="tolerance must be a finite float >= 0"):
        synced(EarlyStopping(), tolerance=-1.0)
    with pytest.raises(TypeError, match="tolerance must be a float"):
        synced(EarlyStopping(), tolerance="small")  # type: ignore[arg-type]


def test_checkpointer_is_unchanged_without_a_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One process: save goes straight to the store, never through the sharded modules."""

    def no_detour(*args: object) -> None:
        raise AssertionError("a one-process save looked for sharded state")

    monkeypatch.setattr(strategy, "split_agreed", no_detour)
    model = torch.nn.Linear(2, 1)
    with Checkpointer(tmp_path, monitor="loss") as ckpt:
        assert isinstance(ckpt._ranks, strategy.OneProcess)
        ckpt.save(0, {"model": model}, {"loss": 1.0})
        ckpt.wait()
        assert ckpt.restore({"model": model}, "best").step == 0  # type: ignore[union-attr]


@pytest.fixture
def one_rank_group(tmp_path: Path) -> Any:
    """A real (gloo) process group of one rank, so the broadcasts run in this process."""
    import torch.distributed as dist

    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        yield Replicas(rank=0, world_size=1)
    finally:
        dist.destroy_process_group()


def test_on_writer_shares_rank0s_result_or_error_class(one_rank_group: Replicas) -> None:
    assert on_writer(one_rank_group, lambda: 5, "x", share=str) == 5  # rank 0 keeps its own

    def taken() -> None:
        raise CheckpointExistsError("step 3 exists", path="/run/step-3")

    def broken() -> None:
        raise OSError("disk on fire")

    with pytest.raises(CheckpointExistsError, match=r"on rank 0, save\(3\) failed: Checkpoint"):
        on_writer(one_rank_group, taken, "save(3)")
    with pytest.raises(CheckpointError, match="the save in flight failed: OSError: disk on fire"):
        on_writer(one_rank_group, broken, "the save in flight")


def test_a_collective_that_loses_a_rank_is_one_checkpoint_error_naming_the_call(
    one_rank_group: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gloo's RuntimeError when a peer died (tests/test_multinode.py kills a real node)."""
    import haltpoint.distributed.collectives as collectives

    def peer_died(*args: object) -> None:
        raise RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:4242.\nGLHF")

    monkeypatch.setattr(collectives, "all_gather", peer_died)
    with pytest.raises(
        CheckpointError,
        match=r"^save\(7\) failed: the ranks lost contact \(RuntimeError: \[pair.cc:553\] "
        r"Connection closed by peer \[127.0.0.1\]:4242\.\); a rank or node died",
    ) as info:
        on_writer(one_rank_group, lambda: 5, "save(7)")
    assert "\n" not in str(info.value)


def test_the_rank_strategy_is_chosen_at_construction(
    tmp_path: Path, one_rank_group: Replicas
) -> None:
    """Under a process group the writer gets `Ranks` (a one-rank group: nothing to agree on),
    a read-only instance `OneProcess`."""
    model = torch.nn.Linear(2, 1)
    with Checkpointer(tmp_path / "run") as ckpt:
        assert isinstance(ckpt._ranks, strategy.Ranks) and ckpt._ranks.group is None
        ckpt.save(0, {"model": model})
    reader = Checkpointer(tmp_path / "run", read_only=True)
    assert isinstance(reader._ranks, strategy.OneProcess)
    assert reader.restore({"model": model}).step == 0  # type: ignore[union-attr]


# -- ranks that make haltpoint's collective calls differently --------------------------------

MISMATCH = WORKER.parent / "mismatch_worker.py"


@pytest.fixture(scope="module")
def mismatch(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every case of tests/workers/mismatch_worker.py (process-group timeout 20 s)."""
    root = tmp_path_factory.mktemp("mismatch")
    out = root / "out"
    out.mkdir()
    torchrun(MISMATCH, "--root", str(root / "runs"), "--out", str(out), timeout=TIMEOUT_S)
    return rank_results(out)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "rank1"),
    [
        ("restore_kinds", "rank 1 restores 'train' unsharded"),
        ("restore_entries", "rank 1 restores none of the sharded entries"),
    ],
)
def test_ranks_restoring_into_different_kinds_of_objects_fail_at_once(
    mismatch: list[dict[str, Any]], case: str, rank1: str
) -> None:
    """Rank 0 restored a sharded checkpoint into an FSDP2 model (DCP's load, a collective)
    while rank 1 restored it into a plain model (DCP alone) or not at all: rank 0 waited in
    DCP's load for the process group's timeout. Now every rank raises the same
    StateMismatchError at once, naming what each rank restores, and loads nothing; a restore
    the ranks then make alike works."""
    r0, r1 = (r[case] for r in mismatch)
    assert r0["error"] == r1["error"] and r0["error"] is not None
    assert r0["error"]["type"] == "StateMismatchError"
    message = r0["error"]["message"]
    assert "rank 0 restores 'train' sharded (DTensor)" in message and rank1 in message
    assert "\n" not in message
    assert r0["seconds"] < 10 and r1["seconds"] < 10  # not the 20 s timeout
    assert r0["unchanged"] and r0["epoch"] == r1["epoch"] == -1  # nothing loaded
    assert r0["then"] == r1["then"] == 0 and r0["same_weights"] and r1["same_weights"]


@pytest.mark.slow
def test_maybe_save_twice_at_a_step_skips_on_every_rank(mismatch: list[dict[str, Any]]) -> None:
    """The step a save was last made at was known to rank 0 only (set at its commit), so a
    second maybe_save at that step returned None on rank 0 alone while rank 1 went into the
    decisions' all-gather: the ranks parted ("rank 0 at maybe_save(1), rank 1 at
    maybe_save(0)"). Now every rank knows the step it saved: the second call skips
    everywhere."""
    r0, r1 = (r["maybe_save_twice"] for r in mismatch)
    assert r0["error"] is None and r1["error"] is None, (r0["error"], r1["error"])
    assert r0["saved"] == r1["saved"] == [0, None, 1, None]


@pytest.mark.slow
def test_clear_stop_on_one_rank_fails_every_rank_at_that_save(
    mismatch: list[dict[str, Any]],
) -> None:
    """After restoring a stopped run, whether a save trains past the stop (clear_stop) was
    each rank's own: with clear_stop() on rank 0 alone, rank 0 saved (a collective) while
    rank 1 skipped the save with no collective and went on, so the ranks parted at the next
    call, under an error that blamed the stoppers' sync. Now the ranks agree at the save:
    every rank raises the same one line naming clear_stop(), at once, nothing is saved, and
    the ranks' next call works."""
    r0, r1 = (r["clear_stop_one_rank"] for r in mismatch)
    assert r0["error"] == r1["error"] and r0["error"] is not None
    message = r0["error"]["message"]
    assert "rank 0 trains past it" in message and "rank 1" in message
    assert "clear_stop()" in message and "\n" not in message
    assert r0["seconds"] < 10 and r1["seconds"] < 10
    assert r0["then"] == r1["then"] == [1]  # keep_last=1; step 2 not saved


# -- ranks that do not share the run directory ------------------------------------------------

DISKS = WORKER.parent / "disks_worker.py"


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every case of tests/workers/disks_worker.py (process-group timeout 20 s)."""
    if not Path("/proc/self/cwd").exists():
        pytest.skip("simulates each node's own disk with /proc/self/cwd (Linux)")
    root = tmp_path_factory.mktemp("disks")
    out = root / "out"
    out.mkdir()
    torchrun(DISKS, "--root", str(root / "runs"), "--out", str(out), timeout=TIMEOUT_S)
    return rank_results(out)


@pytest.mark.slow
def test_ranks_reading_different_checkpoints_of_a_step_fail_and_load_nothing(
    disks: list[dict[str, Any]],
) -> None:
    """The same run-directory path on each node's own disk, each holding its own step 4:
    rank 0 chose step 4 and rank 1 read its own step 4, loading other weights than rank 0's
    with no error. Now the ranks compare the manifest each read (its checksum, carried by
    the collective that confirms the read): every rank raises the same one line, at once,
    naming the ranks and the step, and loads nothing."""
    r0, r1 = (r["own_disks"] for r in disks)
    assert r0["error"] == r1["error"] and r0["error"] is not None
    assert not r0["error"].get("foreign")
    message = r0["error"]["message"]
    assert "rank 1 reads a different checkpoint of step 4 than rank 0" in message
    assert "share one run directory" in message and "\n" not in message
    assert r0["seconds"] < 10 and r1["seconds"] < 10  # not the 20 s timeout
    assert r0["unchanged"] and r1["unchanged"]


@pytest.mark.slow
def test_a_rank_whose_disk_lacks_the_step_fails_every_rank_naming_the_shared_directory(
    disks: list[dict[str, Any]],
) -> None:
    """Rank 0's disk holds step 4, rank 1's nothing: every rank raises the same one line
    that says rank 1 does not see step 4 and that the ranks must share the run directory
    (not only "no checkpoint of step 4"), and loads nothing."""
    r0, r1 = (r["missing_step"] for r in disks)
    assert r0["error"] == r1["error"] and r0["error"] is not None
    assert not r0["error"].get("foreign")
    message = r0["error"]["message"]
    assert "rank 1" in message and "step 4" in message
    assert "share one run directory" in message and "\n" not in message
    assert r0["seconds"] < 10 and r1["seconds"] < 10
    assert r0["unchanged"] and r1["unchanged"]


@pytest.mark.slow
def test_ranks_opening_different_run_directories_are_told_to_share_one(
    disks: list[dict[str, Any]],
) -> None:
    """Each rank passes its own path: caught at construction, but the error blamed the
    stoppers ("wrap it as synced(EarlyStopping(...))"). Now it names every rank's directory
    and says they must be one shared directory."""
    r0, r1 = (r["different_paths"] for r in disks)
    assert r0["error"] == r1["error"] and r0["error"] is not None
    message = r0["error"]["message"]
    assert f"rank 0 opens {r0['directory']}" in message
    assert f"rank 1 opens {r1['directory']}" in message
    assert "one shared directory" in message and "synced" not in message
    assert "\n" not in message


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("closed_one_rank", "is closed; create a new one to save"),
        ("bad_argument_one_rank", "TypeError: pin must be True or False"),
    ],
)
def test_a_call_that_fails_its_checks_on_one_rank_fails_every_rank_at_once(
    mismatch: list[dict[str, Any]], case: str, says: str
) -> None:
    """A call refused by a check of its own rank (a Checkpointer closed on rank 1 only, an
    argument bad on rank 1 only) raised there before any collective, and rank 0 waited in
    the save's all-gather until the process group's timeout. Now the refused rank's error
    travels in the collective the others are in: every rank raises at once, naming rank 1
    and its error, nothing saved, and a call the ranks then make alike works."""
    r0, r1 = (r[case] for r in mismatch)
    assert r0["error"] is not None and r1["error"] is not None
    assert r0["error"]["type"] == "CheckpointError"
    message = r0["error"]["message"]
    assert "save(1) failed on rank 1" in message and says in message
    assert "\n" not in message and says in r1["error"]["message"]
    assert r0["seconds"] < 10  # not the 20 s timeout
    saved = [0] if case == "closed_one_rank" else []
    assert r0["then"] == r1["then"] == saved
