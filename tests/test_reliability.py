"""Reliability: kills, damage, fuzzed readers and concurrent readers lose nothing.

The long versions of the kill and damage trials are `benchmarks/reliability.py`; the figures
are in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from haltpoint import Checkpointer, CorruptCheckpointError
from haltpoint.store.manifest import Manifest
from haltpoint.store.storage import FsspecStorage
from haltpoint.store.tensor_file import TensorRecord, read_header
from haltpoint.store.tensor_reader import read_tensors

_spec = importlib.util.spec_from_file_location(
    "reliability", Path(__file__).parent.parent / "benchmarks" / "reliability.py"
)
assert _spec is not None and _spec.loader is not None
reliability = importlib.util.module_from_spec(_spec)
sys.modules["reliability"] = reliability  # dataclasses look their module up
_spec.loader.exec_module(reliability)


@pytest.mark.slow
def test_two_dozen_kills_lose_nothing_and_resume_bitwise(tmp_path: Path) -> None:
    report = reliability.kill_trials(24, seed=1, workdir=tmp_path)
    assert report.kills == 24 and report.restores_checked == 24
    assert report.committed_lost == []
    assert report.wrong_restores == []
    assert report.final_equal


def test_random_damage_is_always_detected_and_never_returned(tmp_path: Path) -> None:
    report = reliability.damage_trials(300, seed=2, workdir=tmp_path)
    assert report.trials == 300
    assert report.verify_missed == []
    assert report.wrong_data == []
    assert report.fell_back > 0 and report.restored_newest > 0


def test_single_bit_flips_in_the_history_never_cost_gc_the_true_best(tmp_path: Path) -> None:
    report = reliability.history_trials(30, seed=3, workdir=tmp_path)
    assert report.trials == 30
    assert report.best_lost == [] and report.gc_failed == []
    assert report.undetected == []  # every flip is skipped with a warning, or a torn tail
    assert report.seen.get("warned", 0) > 20


def test_a_writer_resuming_a_damaged_run_goes_on_and_loses_nothing_intact(tmp_path: Path) -> None:
    report = reliability.quarantine_trials(60, seed=3, workdir=tmp_path)
    assert report.trials == 60
    assert report.stuck == [] and report.wrong_restores == []
    assert report.intact_lost == [] and report.damaged_bytes_lost == []
    assert report.quarantined_by_restore > 0 and report.quarantined_by_retention > 0


def test_rot_in_a_deduplicated_file_never_reaches_a_later_checkpoint(tmp_path: Path) -> None:
    report = reliability.rot_trials(8, seed=3, workdir=tmp_path)
    assert report.trials == 8 and report.warned_once == 8
    assert report.referenced_rot == [] and report.evidence_changed == []


def test_planted_links_are_never_written_through(tmp_path: Path) -> None:
    report = reliability.link_trials(40, seed=4, workdir=tmp_path)
    assert report.trials == 40 and report.refused > 0
    assert report.changed == [] and report.damaged == []


_fuzz = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_fuzz
@given(data=st.binary(max_size=4096))
def test_manifest_reader_only_ever_raises_corrupt_checkpoint_error(data: bytes) -> None:
    with contextlib.suppress(CorruptCheckpointError):
        Manifest.decode(data, source="fuzz")


@_fuzz
@given(
    prefix=st.sampled_from([b"", b"\x10\x00\x00\x00\x00\x00\x00\x00", b"\xff" * 8]),
    data=st.binary(max_size=4096),
)
def test_tensor_file_reader_only_ever_raises_corrupt_checkpoint_error(
    prefix: bytes, data: bytes
) -> None:
    storage = FsspecStorage("memory://fuzz-tensor-file")
    storage.publish("f.safetensors", prefix + data)
    try:
        header = read_header(storage, "f.safetensors")
    except CorruptCheckpointError:
        return
    header.pop("__metadata__")
    records = {
        key: TensorRecord(
            "f.safetensors",
            info["dtype"],
            tuple(info["shape"]),
            info["offset"],
            info["nbytes"],
            "0" * 32,
        )
        for key, info in header.items()
    }
    with contextlib.suppress(CorruptCheckpointError):
        read_tensors(storage, records)


READER = textwrap.dedent(
    """
    import sys, time, warnings, torch
    from haltpoint import Checkpointer, CheckpointNotFoundError
    run, deadline = sys.argv[1], time.time() + float(sys.argv[2])
    seen = set()
    while time.time() < deadline:
        reader = Checkpointer(run, read_only=True, capture_rng=False)
        for info in reader.list():
            state = {"w": torch.zeros(4096), "step": -1}
            try:
                reader.restore(state, info.step)
            except CheckpointNotFoundError:  # retention removed it between list and restore
                continue
            assert state["step"] == info.step, (state["step"], info.step)
            assert torch.equal(state["w"], torch.full((4096,), float(info.step)))
            seen.add(info.step)
    print(len(seen))
    """
)


def test_a_full_disk_at_any_write_point_is_said_and_the_retry_completes_the_save(
    tmp_path: Path,
) -> None:
    report = reliability.full_disk_trials(14, seed=5, workdir=tmp_path)
    assert report.trials == 14 and report.not_hit == []
    assert sum(report.raised.values()) == 14  # each injection raised one haltpoint error
    assert report.bare_oserror == [] and report.retry_refused == [] and report.retry_failed == []
    assert report.history_wrong == [] and report.pins_lost == [] and report.kept_wrong == []
    assert report.wrong_restores == []


@pytest.mark.slow
def test_verify_ls_and_export_beside_a_writer_never_report_false_damage(tmp_path: Path) -> None:
    report = reliability.readers_trials(12, seed=6, workdir=tmp_path)
    assert report.rounds == 12
    assert report.false_damage == [] and report.export_failed == []


@pytest.mark.slow
def test_readers_during_writes_only_ever_see_committed_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with Checkpointer(run, keep_last=3, capture_rng=False) as ckpt:
        ckpt.save(0, {"w": torch.zeros(4096), "step": 0})
        ckpt.wait()
        reader = subprocess.Popen(
            [sys.executable, "-c", READER, str(run), "4"], stdout=subprocess.PIPE, text=True
        )
        step = 1
        deadline = time.time() + 5
        while reader.poll() is None and time.time() < deadline + 5:
            ckpt.save(step, {"w": torch.full((4096,), float(step)), "step": step})
            step += 1
        out, _ = reader.communicate(timeout=60)
    assert reader.returncode == 0
    assert int(out) > 1  # it saw several checkpoints come and go, each exact


def test_gc_from_the_command_line_refuses_while_a_run_writes(tmp_path: Path, capsys) -> None:
    from haltpoint.cli import main

    with Checkpointer(tmp_path, keep_last=5) as ckpt:
        for step in range(3):
            ckpt.save(step, {"x": step})
        ckpt.wait()
        code = main(["gc", str(tmp_path), "--keep-last", "1"])
        assert code == 1
        assert "locked by process" in capsys.readouterr().err
        assert [i.step for i in ckpt.list()] == [0, 1, 2]
