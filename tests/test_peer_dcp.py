"""torch.distributed.checkpoint's own tests (pytorch/pytorch test/distributed/checkpoint/),
ported to haltpoint's sharded save and restore, and a fault campaign on 2 gloo ranks.

One `torchrun --nproc_per_node=2` launch of tests/workers/dcp_port_worker.py runs every
2-rank case (each in its own run directory) and writes what each rank saw; a second launch
kills rank 1 in the middle of a save; a third restores onto 2 ranks what one rank saved in
this process. Each test's docstring names the DCP test it ports. DCP saves a state dict into
a folder and loads it back in place; haltpoint wraps the same files in a checkpoint (a step,
a manifest that hashes them, a commit) and restores `Checkpointer` state. Where haltpoint
differs by design, the test asserts haltpoint's behaviour and says why.

The fault cases end, on every rank, with the same one-line `CheckpointError` (or a clean
result) within seconds, and nothing committed is lost: the previous step still restores.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from haltpoint import Checkpointer, ShardedState

sys.path.insert(0, str(Path(__file__).parent))
from ports import free_port
from torchrun import run_checked

WORKER = Path(__file__).parent / "workers" / "dcp_port_worker.py"
TIMEOUT_S = 120
pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="torch.distributed with gloo is not available",
    ),
]


def _launch(mode: str, root: Path, out: Path) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={free_port()}", str(WORKER), "--mode", mode,
        "--root", str(root), "--out", str(out),
    ]  # fmt: skip
    run_checked(command, what=f"dcp_port_worker {mode}", timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every 2-rank case of the worker: what rank 0 and rank 1 saw, and where."""
    root = tmp_path_factory.mktemp("dcp-port")
    out = root / "out"
    out.mkdir()
    _launch("port", root / "runs", out)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    crashed = {k: v for k, v in {**r0, **r1}.items() if k.endswith("_crashed")}
    assert not crashed, crashed  # a case that broke would read as missing keys below
    return {"r": (r0, r1), "root": root / "runs", "out": out}


def both(ranks: dict[str, Any], key: str) -> Any:
    """`key`'s value, the same on both ranks."""
    r0, r1 = ranks["r"]
    assert r0[key] == r1[key], (key, r0[key], r1[key])
    return r0[key]


def one_line_error(ranks: dict[str, Any], key: str, kind: str) -> str:
    """The error both ranks got at `key` (or at its "outcome"): the same class `kind`, the
    same single line, and raised by haltpoint (no raw torch or gloo error)."""
    got = both(ranks, key)
    got = got.get("outcome", got) if isinstance(got, dict) else got
    assert isinstance(got, dict) and not got.get("raw"), got
    assert got["error"] == kind, got
    assert "\n" not in got["message"]
    message: str = got["message"]
    return message


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.slow
def test_e2e_fsdp_round_trip_with_replicated_state(ranks: dict[str, Any]) -> None:
    """Ports e2e/test_e2e_save_and_load.py::test_e2e (FSDP) and
    test_fsdp_optim_state.py: a trained FSDP2 model and Adam(W), saved with other state beside
    it, load back exactly; one more training step on the original and on the restored model
    gives the same loss. The non-sharded entries (an int, a mapping of str, tuple, None, float,
    a large int; a plain tensor) go into haltpoint's own pickle-free files, not DCP's, and
    keep their types; the optimizer's lr (a DCP non-tensor value) overrides the fresh one."""
    got = both(ranks, "round_trip")
    assert got["step"] == 0 and got["equal"] is True
    assert got["lr"] == 0.01  # the fresh optimizer was made with lr=0.5
    assert got["epoch"] == 2 and got["extras"] is True
    assert got["replicated"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    original, restored = got["losses"]
    assert original == restored


@pytest.mark.slow
def test_e2e_async_save_round_trip(ranks: dict[str, Any]) -> None:
    """Ports e2e/test_e2e_save_and_load.py::test_e2e_async_cached (thread, not cached):
    `save` returns before the write (haltpoint's own background thread and gloo group, not
    DCP's `async_save`); an optimizer step taken before `wait()` does not reach the
    checkpoint, which holds the state as it was at `save`."""
    assert both(ranks, "round_trip_async") is True


@pytest.mark.slow
def test_dtensor_dtypes_uneven_and_empty_shards(ranks: dict[str, Any]) -> None:
    """Ports test_dtensor_checkpoint.py (DTensors of several placements round trip) and the
    empty and uneven shards of test_dtensor_resharding.py: float16, bfloat16, float64, int64,
    int8, bool and complex64 DTensors, a (1, 3) one whose shard on rank 1 is empty and a (0, 4)
    one empty everywhere, with non-tensor values in the same sharded entry, restore exactly."""
    r0, r1 = ranks["r"]
    assert r0["dtypes"]["local_shapes"]["f16"] == [3, 3] and r1["dtypes"]["local_shapes"][
        "f16"
    ] == [2, 3]
    assert r1["dtypes"]["local_shapes"]["one"] == [0, 3]
    assert r0["dtypes"]["local_shapes"]["empty"] == [0, 4]
    for r in (r0, r1):
        assert all(r["dtypes"]["equal"].values()), r["dtypes"]["equal"]


@pytest.mark.slow
@pytest.mark.parametrize("into", ["colwise", "replicate", "rowwise"])
def test_load_rowwise_to_colwise_and_replicated(ranks: dict[str, Any], into: str) -> None:
    """Ports test_file_system_checkpoint_cpu.py::TestDistributedReshardOnLoad::
    test_load_rowwise_to_colwise and test_dedup_tensors.py: a DTensor saved row-wise
    (Shard(0)) and one replicated, loaded column-wise (Shard(1)), replicated and row-wise on
    the same 2 ranks, exactly; DCP recorded the replicated one as one chunk (written once)."""
    got = both(ranks, "placements")[into]
    assert got == {"outcome": 0, "rows": True, "replicated": True}
    assert both(ranks, "placements_chunks") == {"tensors.rows": 2, "tensors.replicated": 1}


@pytest.mark.slow
def test_reshard_saved_on_2_ranks_loaded_in_one_process(
    ranks: dict[str, Any], tmp_path: Path
) -> None:
    """Ports test_file_system_checkpoint_cpu.py::TestDistributedReshardOnLoad and
    test_fsdp_tp_checkpoint_conversion.py's direction to one rank: saved by 2 FSDP2 ranks,
    restored by a plain process (no process group, DCP's no_dist) into an unsharded model and
    optimizer, every weight and AdamW value equal."""
    run = tmp_path / "run"
    shutil.copytree(ranks["root"] / "round-trip", run)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters())
    state = {"train": ShardedState(model, optimizer), "epoch": None}
    with Checkpointer(run, read_only=True) as reader:
        info = reader.restore(state)
    assert info is not None and info.step == 0 and state["epoch"] == 2
    saved = torch.load(ranks["out"] / "round-trip-full.pt", weights_only=True)
    got = state["train"].state_dict()
    for name, value in saved["model"].items():
        assert torch.equal(got["model"][name], value), name
    for name, values in saved["optim"]["state"].items():
        for key, value in values.items():
            assert torch.equal(torch.as_tensor(got["optim"]["state"][name][key]), value), name


@pytest.fixture
def one_rank_group(tmp_path: Path) -> Iterator[None]:
    """A gloo process group of one rank in this process, so FSDP2 makes DTensors."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_reshard_saved_on_1_rank_loaded_on_2(one_rank_group: None, tmp_path: Path) -> None:
    """Ports test_dtensor_resharding.py (1-D mesh to a larger one) and
    test_fsdp_tp_checkpoint_conversion.py's other direction: saved by FSDP2 on one rank (a
    gloo group of one in this process), restored by 2 FSDP2 ranks, exactly."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    for layer in (model[0], model[2], model):
        fully_shard(layer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    with Checkpointer(run, async_save=False) as ckpt:
        ckpt.save(3, {"train": ShardedState(model, optimizer), "epoch": 3})
    weights = {k: v.full_tensor() for k, v in model.state_dict().items()}
    _launch("restore1", run, out)
    for rank in (0, 1):
        got = json.loads((out / f"restore1-rank{rank}.json").read_text())
        assert got["outcome"] == 3 and got["epoch"] == 3
    restored = torch.load(out / "restore1-full.pt", weights_only=True)
    for name, value in weights.items():
        assert torch.equal(restored["model"][name], value), name
    saved_optim = ShardedState(model, optimizer).state_dict()["optim"]["state"]
    for name, values in saved_optim.items():
        for key, value in values.items():
            full = value.full_tensor() if hasattr(value, "full_tensor") else value
            assert torch.equal(restored["optim"]["state"][name][key], full), (name, key)


@pytest.mark.slow
def test_switch_from_sharded_to_plain_tensors_on_2_ranks(ranks: dict[str, Any]) -> None:
    """Ports test_file_system_checkpoint.py::test_switch_between_sharded_tensor_to_tensor
    (sharded to tensor): saved by FSDP2, loaded on the same 2 ranks into plain models (each
    rank gets the full tensors); and e2e's test_partial_load: a checkpoint of model and
    optimizer restored into the model alone, without the replicated `epoch` either."""
    assert both(ranks, "sharded_into_plain") == {"outcome": "loaded", "equal": True}
    assert both(ranks, "partial_model_only") == {"outcome": "loaded", "equal": True}


@pytest.mark.slow
def test_switch_from_plain_tensors_to_sharded_is_refused_in_one_line(
    ranks: dict[str, Any],
) -> None:
    """Ports the other direction of test_switch_between_sharded_tensor_to_tensor. haltpoint
    differs: a model saved unsharded (replicated, written by rank 0 into its own files) loads
    through the model's own `load_state_dict`, which FSDP2's DTensor parameters refuse. That
    is one StateMismatchError line on both ranks, nothing loaded; restore into the plain model
    and `fully_shard` it after."""
    got = both(ranks, "plain_into_sharded")
    assert got["equal"] is False
    assert got["outcome"]["error"] == "StateMismatchError"
    assert got["outcome"]["message"].startswith('cannot load state["model"]')


# -- overwrite, mismatch ----------------------------------------------------------------------


@pytest.mark.slow
def test_overwrite_of_a_committed_step_is_refused(ranks: dict[str, Any]) -> None:
    """Ports test_fsspec.py::test_overwrite and e2e's TestCheckpointOrderingAndOverwrite::
    test_overwrite. haltpoint differs: DCP's `overwrite=True` (its default) replaces the
    files; haltpoint never overwrites a committed step, whatever the writer. The second save
    of step 0 raises CheckpointExistsError on both ranks before any rank writes a shard, and
    step 0 still restores the first save's values, its DCP files untouched."""
    message = one_line_error(ranks, "overwrite_error", "CheckpointExistsError")
    assert "a checkpoint for step 0 already exists" in message
    assert both(ranks, "overwrite_kept") is True
    assert both(ranks, "overwrite_files") == [".metadata", "__0_0.distcp", "__1_0.distcp"]


@pytest.mark.slow
def test_fsspec_memory_url_saves_and_restores(one_rank_group: None) -> None:
    """Ports test_fsspec.py::test_fsspec: DCP's fsspec writer and reader, here behind a
    memory:// run directory (one rank: memory:// is one process's own)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    url = "memory://haltpoint-test-peer-dcp/run"
    with Checkpointer(url, async_save=False) as ckpt:
        ckpt.save(0, {"train": ShardedState(model, optimizer)})
    torch.manual_seed(1)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    fully_shard(fresh)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters())
    with Checkpointer(url, read_only=True) as reader:
        assert reader.restore({"train": ShardedState(fresh, fresh_optimizer)}).step == 0  # type: ignore[union-attr]
    for (name, value), (_, back) in zip(
        model.state_dict().items(), fresh.state_dict().items(), strict=True
    ):
        assert torch.equal(value.full_tensor(), back.full_tensor()), name
    exp_avg = [s["exp_avg"].full_tensor() for s in optimizer.state.values()]
    assert all(
        torch.equal(a, s["exp_avg"].full_tensor())
        for a, s in zip(exp_avg, fresh_optimizer.state.values(), strict=True)
    )
    import fsspec

    fsspec.filesystem("memory").rm("/haltpoint-test-peer-dcp", recursive=True)


# -- the fault campaign (2 gloo ranks) --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_rank_raising_inside_dcps_write_fails_the_save_on_every_rank(
    ranks: dict[str, Any], mode: str
) -> None:
    """Ports test_checkpoint.py::test_save_error_handling (fail_write_data on one rank):
    DCP's `write_data` raises on rank 1 only. Both ranks raise the same line naming rank 1 and
    its error (synchronous: at `save`; async: at `wait`), within a second; nothing is
    committed; step 0 restores; and step 1 can be saved again (the leftover is replaced)."""
    key = f"save_raise_{mode}"
    message = one_line_error(ranks, key, "CheckpointError")
    assert "DCP failed to save on rank 1: OSError: rank 1's write broke" in message
    assert "step-000000001/dcp" in message
    r0, r1 = ranks["r"]
    assert r0[f"{key}_seconds"] < 10 and r1[f"{key}_seconds"] < 10
    assert both(ranks, f"{key}_listed") == [0]
    assert both(ranks, f"{key}_previous") is True
    assert both(ranks, f"{key}_again") == 1
    assert both(ranks, f"{key}_listed_after") == [1]  # keep_last=1: step 0 went after


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "call"),
    [
        ("save", "save(1)"),
        ("async", ("save(1)", "wait()")),  # as rank 1's thread dies, before or after save
        ("restore", "restore('latest')"),
        ("hang", "save(1)"),
        ("hang-async", ("save(1)", "wait()")),
        ("writer", "save(1)"),
    ],
)
def test_a_rank_dying_inside_dcp_fails_the_survivor_at_once(
    tmp_path: Path, case: str, call: str | tuple[str, ...]
) -> None:
    """Rank 1 exits (os._exit) in the middle of DCP's write of step 1 (`save`: synchronous;
    `async`: in the background, so rank 0's `save` returned and `wait()` raises), or of its
    read in `restore`; or (`hang`) it stops answering, past the process group's timeout (3 s
    here), before it exits, also in the background write (`hang-async`: the background
    writer's gloo group had torch's default timeout, 30 minutes, not the job's; now the
    job's); or (`writer`) rank 0, the writer, exits in its write and rank 1
    survives. The survivor raises one line, 'the ranks lost contact', at once (gloo
    sees the closed socket) or at the timeout, and so does its `close()` (no hang). Step 1 is
    not committed and step 0 restores in a later process, which also removes the dead save's
    leftover folder when it opens a writer. (tests/test_multinode.py kills a whole node of 2
    ranks with SIGKILL.)"""
    root, out = tmp_path / "runs", tmp_path / "out"
    out.mkdir()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={free_port()}", str(WORKER), "--mode", "kill", "--case", case,
        "--root", str(root), "--out", str(out),
    ]  # fmt: skip
    run_checked(command, what=f"dcp_port_worker kill {case}", timeout=TIMEOUT_S)
    survivor = 1 if case == "writer" else 0
    got = json.loads((out / f"kill-rank{survivor}.json").read_text())
    assert not (out / f"kill-rank{1 - survivor}.json").exists()
    for key, at in (("kill", call), ("kill_close", "close()")):
        assert got[key]["error"] == "CheckpointError" and not got[key].get("raw"), got[key]
        assert got[key]["message"].startswith(at), got[key]  # a str, or a tuple of them
        assert "the ranks lost contact" in got[key]["message"]
        assert "\n" not in got[key]["message"]
    assert got["kill_seconds"] < (10 if case.startswith("hang") else 5)
    run = root / f"kill-{case}"
    assert not (run / "step-000000001" / "manifest.json").exists()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    with Checkpointer(run, read_only=True) as reader:
        info = reader.restore({"train": ShardedState(model, torch.optim.AdamW(model.parameters()))})
    assert info is not None and info.step == 0
    with Checkpointer(run) as writer:  # the dead writer's lock went with its process
        assert [i.step for i in writer.list()] == [0]
    assert not (run / "step-000000001").exists()


@pytest.mark.slow
@pytest.mark.parametrize("first", [0, 1])
def test_ranks_whose_stoppers_disagree_around_a_sharded_save(
    ranks: dict[str, Any], first: int
) -> None:
    """Plain (unsynced) stoppers fed each rank's own metric: rank `first` stops after two
    evaluations and closes while the other saves its shards again. Both ranks raise the same
    line at once, naming each rank's call and the remedy; the saves before stay committed.
    (tests/test_distributed.py has the replicated case.)"""
    message = one_line_error(ranks, f"diverge_{first}", "CheckpointError")
    assert f"rank {first} at close()" in message and f"rank {1 - first} at save(2)" in message
    assert "synced(EarlyStopping(...))" in message
    r0, r1 = ranks["r"]
    assert r0[f"diverge_{first}_seconds"] < 10 and r1[f"diverge_{first}_seconds"] < 10
    assert both(ranks, f"diverge_{first}_listed") == [1]  # keep_last=1 of steps 0 and 1


@pytest.mark.slow
def test_rank0s_full_disk_during_a_sharded_save(ranks: dict[str, Any]) -> None:
    """Ports test_save_error_handling's fail_write_data on the coordinator: rank 0's DCP write
    hits ENOSPC. Both ranks raise the same line naming rank 0 and the full disk, as the
    InsufficientSpaceError a full disk is in every other save (it was the bare
    CheckpointError); nothing is committed and step 0 restores."""
    message = one_line_error(ranks, "disk_full", "InsufficientSpaceError")
    assert "nothing was committed" in message
    assert "DCP failed to save on rank 0: OSError: [Errno 28] No space left on device" in message
    assert both(ranks, "disk_full_listed") == [0]
    assert both(ranks, "disk_full_previous") is True


@pytest.mark.slow
def test_a_rank_raising_inside_dcps_read_fails_the_restore_on_every_rank(
    ranks: dict[str, Any],
) -> None:
    """Ports test_checkpoint.py::test_load_error_handling (fail_read_data on one rank): DCP's
    `read_data` raises EIO on rank 1 only. Both ranks raise the same line naming rank 1: an
    UnreadableCheckpointError, as for any file that cannot be read now (it said
    CorruptCheckpointError, 'damaged', of an intact checkpoint); the checkpoint is not set
    aside and the next restore loads it."""
    message = one_line_error(ranks, "restore_raise", "UnreadableCheckpointError")
    assert "not damage" in message
    # DCP loads in place: rank 0 read its shards before rank 1 failed, so the ranks now
    # hold different weights; the line says so (it did not) and what to do
    r0, r1 = ranks["r"]
    assert r0["restore_raise_unchanged"] is False and r1["restore_raise_unchanged"] is True
    assert "may already hold part of the checkpoint" in message
    assert "build them afresh before restoring again" in message
    assert "DCP failed to load on rank 1: OSError: [Errno 5] Input/output error" in message
    assert both(ranks, "restore_raise_listed") == [0]
    assert both(ranks, "restore_raise_quarantine") is False
    assert both(ranks, "restore_raise_again") == 0


@pytest.mark.slow
@pytest.mark.parametrize("how", ["removed", "file", "swapped"])
def test_a_tampered_dcp_folder_falls_back_on_every_rank(ranks: dict[str, Any], how: str) -> None:
    """The `dcp/` folder of the latest step (2) removed, replaced by a file, or replaced by a
    copy of step 0's (valid DCP files, not the ones the manifest hashed), and step 1's removed:
    the writer's restore on 2 ranks falls back to step 0 on both, rank 0 warning once per
    checkpoint passed over (rank 1 says nothing), and step 0 loads exactly."""
    r0, r1 = ranks["r"]
    for r in (r0, r1):
        assert r[f"tamper_{how}"]["outcome"] == 0 and r[f"tamper_{how}"]["equal"] is True
    warned = r0[f"tamper_{how}"]["warnings"]
    assert len(warned) == 2 and r1[f"tamper_{how}"]["warnings"] == []
    assert "step-000000002/dcp/.metadata" in warned[0]
    assert "falling back to the checkpoint of step 1" in warned[0]
    assert "falling back to the checkpoint of step 0" in warned[1]
    if how == "swapped":
        assert "differs from the manifest's" in warned[0]


@pytest.mark.slow
def test_maybe_save_takes_the_same_decision_on_every_rank(ranks: dict[str, Any]) -> None:
    """`maybe_save(every=100)` with its improvement trigger, each rank's own metric: rank 1's
    improves at step 2, rank 0's does not. Each rank decided alone: rank 1 saved step 2 while
    rank 0 went on (in a DDP loop, into the next gradient all-reduce: a hang). Every rank's
    decision is gathered and a save due on any rank is made by all (rank 0's reason first):
    steps 1 and 2 on both."""
    assert both(ranks, "maybe_save") is None
    assert both(ranks, "maybe_save_saved") == [1, 2]
    assert both(ranks, "maybe_save_listed") == [2]  # keep_last=1


@pytest.mark.slow
def test_a_run_directory_the_ranks_do_not_share_commits_nothing(ranks: dict[str, Any]) -> None:
    """Ports test_fsspec.py::test_fsspec onto 2 ranks, where haltpoint must differ: memory://
    is each process's own, as a node-local disk is each node's, so rank 1's shards land where
    rank 0 cannot see them. Rank 0 committed a manifest naming rank 1's file anyway: the save
    went well on both ranks and only the restore said that step 0 cannot be read (and
    retention would have dropped the older, readable steps for it). Rank 0 now checks that it
    sees every rank's files before it commits: one line on both ranks, naming rank 1's file
    and the remedy, and nothing committed."""
    message = one_line_error(ranks, "memory_save", "CheckpointError")
    assert "__1_0.distcp" in message and "written by rank 1" in message
    assert "every rank must see the run directory" in message
    assert both(ranks, "memory_listed") == []
    assert both(ranks, "memory_restore") is None  # nothing to restore, on either rank


@pytest.mark.slow
def test_a_failed_sharded_save_on_memory_url_does_not_lock_the_run_out(
    one_rank_group: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ports test_fsspec.py::TestFileSystem::test_remove_on_fail to haltpoint's side: a
    sharded save that fails after DCP wrote its files leaves `dcp/` (a real folder on fsspec's
    memory file system, as on SFTP or HDFS) in an uncommitted step. The next writer removes
    it; before, its cleanup deleted the folder without `recursive` and every later writer's
    open raised UnwritableRunError 'Directory not empty'."""
    import fsspec
    from torch.distributed.fsdp import fully_shard

    from haltpoint import CheckpointError
    from haltpoint.distributed import strategy

    url, fs = "memory://haltpoint-test-peer-dcp/leftover", fsspec.filesystem("memory")
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    fully_shard(model)
    state = {"train": ShardedState(model)}
    real = strategy.write_shards

    def fails_after_writing(*args: Any) -> Any:
        real(*args)
        raise CheckpointError("the connection dropped after the write")

    try:
        with Checkpointer(url, async_save=False) as ckpt:
            ckpt.save(0, state)
            monkeypatch.setattr(strategy, "write_shards", fails_after_writing)
            with pytest.raises(CheckpointError, match="the connection dropped"):
                ckpt.save(1, state)
        monkeypatch.undo()
        assert fs.isdir("/haltpoint-test-peer-dcp/leftover/step-000000001/dcp")
        with Checkpointer(url, async_save=False) as ckpt:  # removes the leftover
            assert [i.step for i in ckpt.list()] == [0]
            ckpt.save(1, state)
        assert not fs.exists("/haltpoint-test-peer-dcp/leftover/step-000000001/dcp/x")
        with Checkpointer(url, read_only=True) as reader:
            assert [i.step for i in reader.list()] == [1]  # keep_last=1
    finally:
        fs.rm("/haltpoint-test-peer-dcp", recursive=True)


@pytest.mark.slow
def test_a_load_into_a_model_that_does_not_fit_is_a_state_mismatch(ranks: dict[str, Any]) -> None:
    """Ports test_state_dict.py's strict loads and test_file_system_checkpoint_cpu.py::
    test_dtype_mismatch_casting. haltpoint differs from DCP on purpose, as for its own
    entries: it never converts dtypes (DCP silently cast a float16 checkpoint into a float32
    template), and a model that does not fit is StateMismatchError, checked on every rank
    before DCP reads a byte (DCP's 'Size mismatch' and 'Missing key' came out as
    CorruptCheckpointError, 'the checkpoint is damaged', and strict=False did not skip the
    missing layer). Nothing is loaded; strict=False loads what the checkpoint holds and
    reports the rest as missing."""
    shape = one_line_error(ranks, "mismatch_shape", "StateMismatchError")
    assert "train.model.0.weight" in shape and "(32, 8)" in shape and "(16, 8)" in shape
    extra = one_line_error(ranks, "mismatch_extra_layer", "StateMismatchError")
    assert "train.model.3.weight" in extra and "strict=False" in extra
    for key in ("mismatch_shape", "mismatch_extra_layer"):
        assert both(ranks, key)["unchanged"] is True
    lax = both(ranks, "mismatch_extra_layer_lax")
    assert lax["outcome"] == "loaded" and lax["loaded_saved"] is True
    assert "train.model.3.weight" in lax["missing"] and "train.model.3.bias" in lax["missing"]
    dtype = both(ranks, "dtype_mismatch")
    assert dtype["outcome"]["error"] == "StateMismatchError", dtype
    assert "tensors.f16" in dtype["outcome"]["message"]
    assert "torch.float32" in dtype["outcome"]["message"]
    assert "torch.float16" in dtype["outcome"]["message"]
    assert dtype["changed"] is False


@pytest.mark.slow
def test_ranks_passing_different_sharded_entries_commit_nothing(ranks: dict[str, Any]) -> None:
    """Ports e2e's test_different_ordered_state_dict_keys to keys that differ, not only their
    order: rank 1 passes one more sharded entry (an EMA copy) than rank 0. DCP's global plan
    sees that entry's shards cover half of it and refuses; both ranks raise the same line and
    nothing is committed."""
    message = one_line_error(ranks, "different_entries", "CheckpointError")
    assert "DCP failed to save on rank 0" in message and "ema.0.weight" in message
    assert both(ranks, "different_entries_listed") == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("key", "failed"),
    [
        ("plan", "DCP failed to save on rank 1: OSError: injected"),
        ("finish", "DCP failed to save on rank 0: OSError: injected"),
        ("stage", "save(1): copying shards failed on rank 1: OSError: injected"),
    ],
)
def test_dcps_other_save_steps_failing_on_one_rank(
    ranks: dict[str, Any], key: str, failed: str
) -> None:
    """Ports test_checkpoint.py::test_save_error_handling's other failure points: the local
    plan (`prepare_local_plan`) on rank 1, the coordinator's `finish` (DCP's `.metadata`) on
    rank 0, and (async) the copy of rank 1's shards. Both ranks raise the same line; nothing
    is committed; saving step 1 again works."""
    message = one_line_error(ranks, f"dcp_step_{key}", "CheckpointError")
    assert failed in message
    assert both(ranks, f"dcp_step_{key}_listed") == [0]
    assert both(ranks, f"dcp_step_{key}_again") is None
    assert both(ranks, f"dcp_step_{key}_listed_after") == [1]


@pytest.mark.slow
def test_a_model_that_does_not_fit_on_one_rank_only_fails_the_restore_at_once(
    ranks: dict[str, Any],
) -> None:
    """Ports test_checkpoint.py::test_load_error_handling's fail_prepare_local_plan on rank
    1, as haltpoint meets it: only rank 1's model does not fit the checkpoint. Every rank's
    checks are agreed on before any rank enters DCP's collective load, so both ranks raise the
    same StateMismatchError line at once, nothing is loaded and the process group still
    works. Before, rank 1 failed its check and went on to the outcome all-gather while rank 0
    sat in DCP's load: both waited out the process group's timeout (30 s here, 30 minutes by
    default), then said 'the ranks lost contact ... a rank or node died', and every later
    call failed the same way."""
    message = one_line_error(ranks, "local_mismatch", "StateMismatchError")
    assert "train.model.0.weight" in message and "(32, 8)" in message
    r0, r1 = ranks["r"]
    assert r0["local_mismatch_seconds"] < 10 and r1["local_mismatch_seconds"] < 10
    assert both(ranks, "local_mismatch_unchanged") is True
    assert both(ranks, "local_mismatch_then") == [0]


@pytest.mark.slow
def test_rank0_alone_restores_sharded_state_into_a_plain_model(ranks: dict[str, Any]) -> None:
    """Ports test_fsdp_tp_checkpoint_conversion.py's load into a plain model, from one rank
    of a job: rank 0 alone opens a reader and restores the sharded checkpoint into an
    unsharded model (to evaluate or export the best weights) while rank 1 waits at a
    barrier. A load into objects holding no DTensor needs no other rank: DCP reads it in this
    process (no_dist). Before, it ran DCP's collectives, which met rank 1's barrier: both
    waited out the timeout and rank 0 got a raw gloo RuntimeError."""
    r0, r1 = ranks["r"]
    assert r0["alone"] == 0 and r0["alone_equal"] is True
    assert r0["alone_barrier"] is None and r1["alone_barrier"] is None
    assert r0["alone_seconds"] < 10 and r1["alone_seconds"] < 10


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_rank_that_cannot_make_dcps_writer_fails_the_save_at_once(
    ranks: dict[str, Any], mode: str
) -> None:
    """Ports test_checkpoint.py::test_save_error_handling's fail_set_up_storage_writer, as
    haltpoint meets it: rank 1 cannot make DCP's writer (PermissionError: its mount is not
    writable), before DCP starts. The ranks agree on the writers first, so both raise the
    same line at once, naming rank 1, and the process group still works. Before, rank 1 went
    to the outcome all-gather while rank 0 sat in DCP's collective save: synchronous, both
    waited out the process group's timeout, said 'the ranks lost contact' and every later
    call failed; async, on the background writer's own group (its timeout 30 minutes), a
    hang."""
    message = one_line_error(ranks, f"no_writer_{mode}", "CheckpointError")
    assert "failed on rank 1: PermissionError" in message and "making DCP's writer" in message
    r0, r1 = ranks["r"]
    assert r0[f"no_writer_{mode}_seconds"] < 10 and r1[f"no_writer_{mode}_seconds"] < 10
    assert both(ranks, f"no_writer_{mode}_listed") == [0]
