"""The Checkpointer end to end: save, retention, restore, verification, errors."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch

from haltpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    LockedError,
    StateMismatchError,
    load_best,
)
from haltpoint.store.manifest import Manifest


def make_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "epoch": 0}


def train_step(state: dict) -> None:
    x = torch.randn(16, 4)
    loss = state["model"](x).pow(2).mean()
    state["optimizer"].zero_grad()
    loss.backward()
    state["optimizer"].step()
    state["scheduler"].step()


def steps_on_disk(run: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in run.glob("step-*"))


def test_save_then_restore_into_fresh_objects_is_exact(tmp_path: Path) -> None:
    state = make_state()
    for _ in range(3):
        train_step(state)
    state["epoch"] = 3
    with Checkpointer(tmp_path / "run") as ckpt:
        ckpt.save(3, state, {"val_loss": 0.5})
    fresh = make_state(seed=1)
    with Checkpointer(tmp_path / "run") as ckpt:
        info = ckpt.restore(fresh)
    assert info is not None and info.step == 3 and info.metrics == {"val_loss": 0.5}
    assert fresh["epoch"] == 3
    for a, b in zip(state["model"].parameters(), fresh["model"].parameters(), strict=True):
        assert torch.equal(a, b)
    assert fresh["scheduler"].state_dict() == state["scheduler"].state_dict()
    saved_opt, new_opt = state["optimizer"].state_dict(), fresh["optimizer"].state_dict()
    assert saved_opt["param_groups"] == new_opt["param_groups"]
    # the order too: code that zips state_dict().values() depends on it, as torch.save keeps it
    assert list(new_opt["param_groups"][0]) == list(saved_opt["param_groups"][0])
    assert list(new_opt["state"][0]) == ["step", "exp_avg", "exp_avg_sq"]
    for key, value in saved_opt["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, new_opt["state"][key][name])


def test_restore_on_a_fresh_run_returns_none(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore(make_state()) is None
        assert ckpt.list() == []


def test_random_state_is_captured_and_restored(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, {"x": 1})
        expected = (random.random(), np.random.rand(), torch.rand(3))
        random.random(), np.random.rand(), torch.rand(3)
        ckpt.restore({"x": 0})
        got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_capture_rng_false_leaves_random_state_alone(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, capture_rng=False) as ckpt:
        ckpt.save(0, {"x": 1})
        before = torch.random.get_rng_state()
        ckpt.restore({"x": 0})
        assert torch.equal(before, torch.random.get_rng_state())


def test_tensor_file_is_plain_safetensors(tmp_path: Path) -> None:
    state = make_state()
    with Checkpointer(tmp_path, capture_rng=False) as ckpt:
        ckpt.save(0, {"model": state["model"]})
    loaded = safetensors.torch.load_file(tmp_path / "step-000000000" / "tensors.safetensors")
    expected = state["model"].state_dict()
    assert sorted(loaded) == sorted(f"model.{k}" for k in expected)
    for key, tensor in expected.items():
        assert torch.equal(loaded[f"model.{key}"], tensor)


def test_manifest_records_steps_metrics_and_versions(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(7, make_state(), {"val_loss": 0.25, "val_acc": 0.9})
    manifest = Manifest.decode(
        (tmp_path / "step-000000007" / "manifest.json").read_bytes(), source="t"
    )
    assert manifest.step == 7
    assert manifest.metrics == {"val_loss": 0.25, "val_acc": 0.9}
    assert manifest.versions["torch"] == torch.__version__
    assert all(record.hash for record in manifest.tensors.values())


@pytest.mark.parametrize(
    ("keep_last", "keep_best", "keep_every", "losses", "expected"),
    [
        (1, 0, None, [5, 4, 3, 2], [3]),
        (2, 0, None, [5, 4, 3, 2], [2, 3]),
        (1, 1, None, [1, 4, 3, 2], [0, 3]),
        (2, 2, None, [1, 4, 0.5, 2, 3], [0, 2, 3, 4]),
        (1, 0, 2, [5, 4, 3, 2, 1], [0, 2, 4]),
        (1, 1, None, [3, 2, 1], [2]),
    ],
)
def test_retention_keeps_the_union_of_rules(
    tmp_path: Path, keep_last, keep_best, keep_every, losses, expected
) -> None:
    with Checkpointer(
        tmp_path,
        monitor="loss",
        keep_last=keep_last,
        keep_best=keep_best,
        keep_every=keep_every,
        async_save=False,
    ) as ckpt:
        for step, loss in enumerate(losses):
            ckpt.save(step, {"w": torch.full((2,), float(step))}, {"loss": loss})
        assert [i.step for i in ckpt.list()] == expected
    assert steps_on_disk(tmp_path) == expected


def test_retention_is_derived_from_disk_after_a_resume(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, monitor="loss", keep_best=1, keep_last=1) as ckpt:
        ckpt.save(0, {"w": torch.zeros(1)}, {"loss": 0.1})
        ckpt.save(1, {"w": torch.zeros(1)}, {"loss": 0.9})
    with Checkpointer(tmp_path, monitor="loss", keep_best=1, keep_last=1) as ckpt:
        ckpt.save(2, {"w": torch.zeros(1)}, {"loss": 0.5})
        assert [i.step for i in ckpt.list()] == [0, 2]


def test_pinned_checkpoints_survive_retention(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, {"w": torch.zeros(1)}, pin=True)
        ckpt.save(1, {"w": torch.zeros(1)})
        ckpt.save(2, {"w": torch.zeros(1)})
        assert [(i.step, i.pinned) for i in ckpt.list()] == [(0, True), (2, False)]
        ckpt.pin(2)
        ckpt.unpin(0)
        ckpt.save(3, {"w": torch.zeros(1)})
        assert [i.step for i in ckpt.list()] == [2, 3]


def test_restore_best_and_by_step(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, monitor="acc", mode="max", keep_best=2, keep_last=1) as ckpt:
        for step, acc in enumerate([0.5, 0.9, 0.7, 0.6]):
            ckpt.save(step, {"w": torch.full((1,), float(step))}, {"acc": acc})
        state = {"w": torch.zeros(1)}
        assert ckpt.restore(state, "best").step == 1
        assert state["w"].item() == 1.0
        assert ckpt.restore(state, 2).step == 2
        assert state["w"].item() == 2.0
        with pytest.raises(
            CheckpointNotFoundError, match=r"no intact checkpoint for step 0 .*available: 1, 2, 3"
        ):
            ckpt.restore(state, 0)


def test_save_refuses_an_existing_step(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"x": 1})
        ckpt.wait()
        with pytest.raises(CheckpointExistsError, match="step 1 already exists"):
            ckpt.save(1, {"x": 2})


def test_second_writer_is_refused_and_readers_are_allowed(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, {"x": 1})
        ckpt.wait()
        with pytest.raises(LockedError, match=str(os.getpid())):
            Checkpointer(tmp_path)
        reader = Checkpointer(tmp_path, read_only=True)
        assert [i.step for i in reader.list()] == [0]
        with pytest.raises(CheckpointError, match="read_only=True"):
            reader.save(1, {"x": 1})
        reader.close()


def test_closed_checkpointer_refuses_to_save(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    ckpt.close()
    ckpt.close()
    with pytest.raises(CheckpointError, match="is closed"):
        ckpt.save(0, {"x": 1})


def test_a_closed_writer_refuses_to_restore_and_leaves_the_new_writers_run_alone(
    tmp_path: Path,
) -> None:
    """Its lock is released: a restore could otherwise quarantine under another writer."""
    old = Checkpointer(tmp_path, keep_last=3, async_save=False)
    old.save(0, {"x": 1})
    old.close()
    with Checkpointer(tmp_path, keep_last=3, async_save=False) as new:
        new.save(1, {"w": torch.ones(4)})
        tensors = tmp_path / "step-000000001" / "tensors.safetensors"
        tensors.write_bytes(tensors.read_bytes()[:-1] + b"\x00")  # damaged under the new writer
        with pytest.raises(CheckpointError, match="is closed; create a new one to restore"):
            old.restore({"w": torch.zeros(4)})
        assert not (tmp_path / "quarantine").exists()


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"step": -1}, ValueError, r"step must be a non-negative int below 2\*\*63, got -1"),
        ({"step": True}, ValueError, r"step must be a non-negative int below 2\*\*63, got True"),
        ({"step": 2**63}, ValueError, r"below 2\*\*63, got 9223372036854775808"),  # unreadable
        ({"metrics": {"acc": 0.5}}, ValueError, r"no 'loss' \(the monitor\); it holds \['acc'\]"),
        (
            {"metrics": {"loss": "x"}},
            TypeError,
            r"metrics\['loss'\] must be a number \(.*\); got str 'x'",
        ),
        (
            {"metrics": {"loss": True}},
            TypeError,
            r"metrics\['loss'\] must be a number \(.*\); got the boolean True",
        ),
        ({"metrics": [1.0]}, TypeError, "metrics must be a mapping"),
        ({"state": [1]}, TypeError, "state must be a mapping of names to objects, got list"),
        ({"state": {"__rng__": 1}}, ValueError, "reserved name '__rng__'"),
    ],
)
def test_save_argument_errors(tmp_path: Path, kwargs, exc, pattern) -> None:
    args = {"step": 0, "state": {"x": 1}, "metrics": None} | kwargs
    with Checkpointer(tmp_path, monitor="loss") as ckpt, pytest.raises(exc, match=pattern):
        ckpt.save(args["step"], args["state"], args["metrics"])


def test_metrics_accept_tensors_and_numpy_scalars(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, monitor="loss") as ckpt:
        info = ckpt.save(0, {"x": 1}, {"loss": torch.tensor(0.5), "acc": np.float32(0.25)})
    assert info.metrics == {"loss": 0.5, "acc": 0.25}


@pytest.mark.parametrize(
    ("which", "exc", "pattern"),
    [
        ("first", ValueError, "which must be 'latest', 'best' or a step"),
        ("best", ValueError, "which='best' needs the Checkpointer's monitor"),
    ],
)
def test_restore_argument_errors(tmp_path: Path, which, exc, pattern) -> None:
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, {"x": 1})
        with pytest.raises(exc, match=pattern):
            ckpt.restore({"x": 0}, which)


def test_restore_refuses_a_bad_map_location(tmp_path: Path) -> None:
    with (
        Checkpointer(tmp_path) as ckpt,
        pytest.raises(ValueError, match="map_location must be a device"),
    ):
        ckpt.restore({"x": 0}, map_location="gpu-please")


@pytest.mark.parametrize(
    ("device", "said"),
    [
        ("meta", "map_location='meta' holds no data"),
        pytest.param(
            "cuda:0",
            "map_location='cuda:0' is not a device this torch can use here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there"),
        ),
        ("xla", "map_location='xla' is not a device this torch can use here"),
    ],
)
def test_restore_refuses_a_device_this_torch_cannot_use_before_loading(
    tmp_path: Path, device: str, said: str
) -> None:
    model = torch.nn.Linear(3, 2)
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, {"model": model})
        with pytest.raises(ValueError, match=re.escape(said)) as info:
            ckpt.restore({"model": torch.nn.Linear(3, 2)}, map_location=device)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_load_best_needs_a_module(tmp_path: Path) -> None:
    from haltpoint import load_best

    with Checkpointer(tmp_path, monitor="loss", async_save=False) as ckpt:
        ckpt.save(0, {"model": torch.nn.Linear(3, 2)}, {"loss": 0.5})
    with pytest.raises(
        TypeError, match=r"model must be a torch\.nn\.Module to load into, got dict"
    ):
        load_best(tmp_path, {}, monitor="loss")  # type: ignore[arg-type]


@pytest.mark.parametrize("where", ["metric", "baseline", "min_delta", "relative"])
def test_an_int_too_large_for_a_float_is_one_clear_error(tmp_path: Path, where: str) -> None:
    from haltpoint import EarlyStopping, RelativeDelta

    huge = 10**5000  # past Python's limit on int-to-str conversion too
    make = {
        "metric": lambda: EarlyStopping("loss", mode="min", patience=2).step(huge),
        "baseline": lambda: EarlyStopping("loss", mode="min", patience=2, baseline=huge),
        "min_delta": lambda: EarlyStopping("loss", mode="min", patience=2, min_delta=huge),
        "relative": lambda: RelativeDelta(huge),
    }[where]
    with pytest.raises(ValueError, match="an int of 16610 bits"):
        make()


def test_restore_best_without_metrics_says_what_to_do(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, monitor="loss") as ckpt:
        ckpt.save(0, {"x": 1})
        with pytest.raises(CheckpointNotFoundError, match="finite 'loss' metric") as raised:
            ckpt.restore({"x": 0}, "best")
        assert "(they record no metrics)" in str(raised.value)


def test_load_best_with_a_monitor_no_checkpoint_has_names_those_they_have(
    tmp_path: Path,
) -> None:
    """A typo in the monitor (`val-loss`) said only that no checkpoint had it."""
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, {"model": torch.nn.Linear(2, 1)}, {"val_loss": 0.5, "val_acc": 0.9})
    with pytest.raises(CheckpointNotFoundError) as raised:
        load_best(tmp_path, torch.nn.Linear(2, 1), monitor="val-loss")
    assert "no checkpoint in" in str(raised.value)
    assert "finite 'val-loss' metric to rank by (their metrics: 'val_acc', 'val_loss')" in str(
        raised.value
    )
    # a step or 'latest' would not help a typo (load_best takes neither): name the fix
    assert "pass monitor= one of those" in str(raised.value)
    assert "'latest'" not in str(raised.value)


def test_restore_best_when_every_value_of_the_monitor_is_nan_offers_latest(
    tmp_path: Path,
) -> None:
    """The monitor is there but never finite: no best exists, 'latest' or a step does."""
    with Checkpointer(tmp_path) as ckpt:
        for step in (0, 1):
            ckpt.save(step, {"model": torch.nn.Linear(2, 1)}, {"val_loss": float("nan")})
    with pytest.raises(CheckpointNotFoundError) as raised:
        load_best(tmp_path, torch.nn.Linear(2, 1), monitor="val_loss")
    assert "every 'val_loss' recorded is NaN or infinite" in str(raised.value)
    assert "restore(state, 'latest') or a step (1)" in str(raised.value)


def test_strict_restore_names_the_mismatch_and_non_strict_reports_it(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, {"model": torch.nn.Linear(2, 2), "extra": 1})
        with pytest.raises(StateMismatchError, match="strict=False"):
            ckpt.restore({"model": torch.nn.Linear(2, 2), "other": 1})
        info = ckpt.restore({"model": torch.nn.Linear(2, 2), "other": 1}, strict=False)
    assert info is not None and info.report is not None
    assert "other" in info.report.missing and "extra" in info.report.unexpected


def test_restore_into_a_compiled_model(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 3)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, {"model": model})
        target = torch.nn.Linear(3, 3)
        ckpt.restore({"model": torch.compile(target)})
    assert torch.equal(target.weight, model.weight)


def test_history_has_one_line_per_save(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, monitor="loss") as ckpt:
        for step in range(3):
            ckpt.save(step, {"x": step}, {"loss": 1.0 / (step + 1)})
    lines = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [(r["step"], r["metrics"]["loss"]) for r in lines] == [(0, 1.0), (1, 0.5), (2, 1 / 3)]


def test_memory_url_keeps_best_weights_without_a_disk() -> None:
    model = torch.nn.Linear(2, 1)
    with Checkpointer("memory://haltpoint-test/best", monitor="loss", keep_best=1) as ckpt:
        ckpt.save(0, {"model": model}, {"loss": 0.2})
        best = model.weight.detach().clone()
        with torch.no_grad():
            model.weight.add_(1)
        ckpt.save(1, {"model": model}, {"loss": 0.9})
        ckpt.restore({"model": model}, "best")
    assert torch.equal(model.weight, best)


def test_background_errors_are_raised_at_the_next_call(tmp_path: Path, monkeypatch) -> None:
    import haltpoint.checkpointer as module

    def broken(*args, **kwargs):
        raise OSError("disk on fire")

    with Checkpointer(tmp_path) as ckpt:
        monkeypatch.setattr(module, "write_checkpoint", broken)
        ckpt.save(0, {"x": 1})
        with pytest.raises(OSError, match="disk on fire"):
            ckpt.save(1, {"x": 1})
        monkeypatch.undo()
        ckpt.save(2, {"x": 1})
        ckpt.wait()
        assert [i.step for i in ckpt.list()] == [2]


def test_crash_before_commit_leaves_no_checkpoint_and_is_cleaned(
    tmp_path: Path, monkeypatch
) -> None:
    from haltpoint.store.run_dir import RunDirectory

    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, {"w": torch.ones(4)})

        def crash(self, manifest):
            raise KeyboardInterrupt("killed before commit")

        monkeypatch.setattr(RunDirectory, "commit", crash)
        with pytest.raises(KeyboardInterrupt):
            ckpt.save(1, {"w": torch.ones(4)})
        monkeypatch.undo()
        assert [i.step for i in ckpt.list()] == [0]
    assert (tmp_path / "step-000000001").exists()  # the leftover is still there ...
    with Checkpointer(tmp_path) as ckpt:  # ... until the next writer opens the run
        assert not (tmp_path / "step-000000001").exists()
        state = {"w": torch.zeros(4)}
        assert ckpt.restore(state).step == 0
        assert torch.equal(state["w"], torch.ones(4))


def test_leftover_temporaries_are_removed_on_open(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, {"x": 1})
    (tmp_path / "step-000000000" / "manifest.json.1234abcd.tmp").write_bytes(b"{")
    (tmp_path / "step-000000005").mkdir()
    (tmp_path / "step-000000005" / "tensors.safetensors").write_bytes(b"partial")
    with Checkpointer(tmp_path) as ckpt:
        assert [i.step for i in ckpt.list()] == [0]
    assert sorted(p.name for p in (tmp_path / "step-000000000").iterdir()) == [
        "manifest.json",
        "tensors.safetensors",
    ]
    assert not (tmp_path / "step-000000005").exists()


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[-3] ^= 0x10
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path: Path, how: str) -> None:
    with Checkpointer(tmp_path, keep_last=2) as ckpt:
        ckpt.save(0, {"w": torch.zeros(64)})
        ckpt.save(1, {"w": torch.ones(64)})
    _damage(tmp_path / "step-000000001" / "tensors.safetensors", how)
    state = {"w": torch.full((64,), 7.0)}
    ckpt = Checkpointer(tmp_path, keep_last=2, read_only=True)  # a writer would quarantine it
    with pytest.warns(UserWarning, match="falling back to the checkpoint of step 0"):
        info = ckpt.restore(state)
    assert info is not None and info.step == 0
    assert torch.equal(state["w"], torch.zeros(64))
    with pytest.raises(CorruptCheckpointError, match="step-000000001"):
        ckpt.restore(state, 1)
    assert torch.equal(state["w"], torch.zeros(64))  # nothing half-loaded


def test_restores_warnings_point_at_the_users_line(tmp_path: Path) -> None:
    # the fall-back warning pointed at haltpoint/checkpointer.py ("return
    # self._ranks.restore(which, read, load)"), and the mode warning at another line of
    # haltpoint's, depending on the way in: each names the line of the user's code
    with Checkpointer(tmp_path, monitor="loss", mode="min", keep_last=2) as ckpt:
        ckpt.save(0, {"w": torch.zeros(64)}, {"loss": 0.5})
        ckpt.save(1, {"w": torch.ones(64)}, {"loss": 0.4})
    _damage(tmp_path / "step-000000001" / "tensors.safetensors", "flip")
    reader = Checkpointer(tmp_path, read_only=True)
    opened = Checkpointer(tmp_path, monitor="loss", mode="max", read_only=True)
    calls = [
        ("falling back", lambda: reader.restore({"w": torch.zeros(64)})),
        ("choosing the best by mode='max'", lambda: opened.restore({"w": torch.zeros(64)}, "best")),
    ]
    for match, call in calls:
        with pytest.warns(UserWarning, match=match) as caught:
            call()
        sites = {Path(w.filename).name for w in caught if re.search(match, str(w.message))}
        assert sites == {Path(__file__).name}, (match, [w.filename for w in caught])


def test_damaged_manifest_is_reported_and_skipped(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, keep_last=2) as ckpt:
        ckpt.save(0, {"w": torch.zeros(2)})
        ckpt.save(1, {"w": torch.ones(2)})
    _damage(tmp_path / "step-000000001" / "manifest.json", "flip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Checkpointer(tmp_path, keep_last=2) as ckpt:
            assert ckpt.restore({"w": torch.zeros(2)}).step == 0
    assert any("step-000000001" in str(w.message) for w in caught)
    assert (tmp_path / "quarantine" / "step-000000001-1.json").exists()  # evidence is kept


def test_manifest_pointing_outside_the_run_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret.safetensors").write_bytes(b"x" * 64)
    run = tmp_path / "run"
    with Checkpointer(run) as ckpt:
        ckpt.save(0, {"w": torch.zeros(2)})
    manifest_path = run / "step-000000000" / "manifest.json"
    manifest = Manifest.decode(manifest_path.read_bytes(), source="t")
    key = next(iter(manifest.tensors))
    from dataclasses import replace

    manifest.tensors[key] = replace(manifest.tensors[key], file="../secret.safetensors")
    with pytest.raises(CorruptCheckpointError, match="outside the run directory"):
        Manifest.decode(manifest.encode(), source="t")
    manifest_path.write_bytes(manifest.encode())
    with pytest.warns(UserWarning, match="outside the run directory"), Checkpointer(run) as ckpt:
        assert ckpt.list() == []


@pytest.mark.parametrize(("monitor", "mode"), [("val_acc", "max"), ("val_loss", "max")])
def test_restoring_a_stopper_of_another_monitor_or_mode_is_refused(
    tmp_path: Path, monitor: str, mode: str
) -> None:
    from haltpoint import EarlyStopping

    stopper = EarlyStopping("val_loss", patience=2)
    stopper.step({"val_loss": 1.0})
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, {"stopper": stopper})
    other = EarlyStopping(monitor, mode=mode, patience=2)
    with (
        Checkpointer(tmp_path, read_only=True) as reader,
        pytest.raises(StateMismatchError, match="saved by a stopper of monitor 'val_loss' in mode"),
    ):
        reader.restore({"stopper": other})
    assert other.evaluations == 0


def test_a_stopped_run_stays_stopped_after_restore(tmp_path: Path) -> None:
    from haltpoint import EarlyStopping, StopReason

    stopper = EarlyStopping("val_loss", patience=2)
    with Checkpointer(tmp_path, monitor="val_loss", keep_best=1) as ckpt:
        for step, loss in enumerate([1.0, 0.5, 0.6, 0.7]):
            decision = stopper.step({"val_loss": loss})
            ckpt.save(step, {"stopper": stopper}, {"val_loss": loss})
    assert decision.stop
    fresh = EarlyStopping("val_loss", patience=2)
    with Checkpointer(tmp_path, monitor="val_loss", keep_best=1) as ckpt:
        ckpt.restore({"stopper": fresh})
    assert fresh.stopped and fresh.best == 0.5 and fresh.best_step == 1
    again = fresh.step({"val_loss": 0.1})
    assert again.stop and again.code is StopReason.PATIENCE
    lines = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [line["stopper"]["stop"] for line in lines] == [False, False, False, True]
    assert lines[-1]["stopper"]["name"] == "stopper"


def test_complete_training_state_round_trips(tmp_path: Path) -> None:
    from haltpoint import EarlyStopping

    state = make_state()
    state["scaler"] = torch.amp.GradScaler("cpu", init_scale=1024.0)
    state["stopper"] = EarlyStopping("val_loss", patience=3)
    state["stopper"].step({"val_loss": 0.3})
    loader = torch.utils.data.DataLoader(list(range(10)), batch_size=2, shuffle=True)
    state["sampler_seed"] = torch.tensor(1234)
    state["meta"] = {"run": "exp1", "sizes": (1, 2), "none": None, "raw": b"\x00\x01"}
    train_step(state)
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, state)
    fresh = make_state(seed=5)
    fresh["scaler"] = torch.amp.GradScaler("cpu")
    fresh["stopper"] = EarlyStopping("val_loss", patience=3)
    fresh["sampler_seed"] = torch.tensor(0)
    fresh["meta"] = None
    with Checkpointer(tmp_path) as ckpt:
        ckpt.restore(fresh)
    assert fresh["scaler"].state_dict() == state["scaler"].state_dict()
    assert fresh["stopper"].state_dict() == state["stopper"].state_dict()
    assert fresh["sampler_seed"].item() == 1234
    assert fresh["meta"] == state["meta"] and isinstance(fresh["meta"]["sizes"], tuple)
    assert len(list(loader)) == 5


def test_unsupported_values_are_refused_at_save_time_with_their_path(tmp_path: Path) -> None:
    from haltpoint import UnsupportedStateError

    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(UnsupportedStateError, match=r'state\["cfg"\]\["fn"\]'):
            ckpt.save(0, {"cfg": {"fn": lambda x: x}})
        ckpt.save(1, {"ok": 1})
        assert [i.step for i in ckpt.list()] == [1]
    assert not (tmp_path / "step-000000000").exists()


def test_a_checkpoint_removed_while_being_read_is_not_called_damaged(
    tmp_path: Path, monkeypatch
) -> None:
    import haltpoint.reader as module

    with Checkpointer(tmp_path, keep_last=2, capture_rng=False) as ckpt:
        ckpt.save(0, {"w": torch.zeros(2)})
        ckpt.save(1, {"w": torch.ones(2)})
        ckpt.wait()
    original = module.read_tensors

    def removed_by_retention_first(storage, records, **kwargs):
        files = {record.file for record in records.values()}
        if "step-000000001/tensors.safetensors" in files:
            (tmp_path / "step-000000001" / "manifest.json").unlink()
            (tmp_path / "step-000000001" / "tensors.safetensors").unlink()
        return original(storage, records, **kwargs)

    monkeypatch.setattr(module, "read_tensors", removed_by_retention_first)
    reader = Checkpointer(tmp_path, read_only=True)
    state = {"w": torch.full((2,), 7.0)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reader.restore(state).step == 0
    assert torch.equal(state["w"], torch.zeros(2))
    (tmp_path / "step-000000001").rmdir()
    with Checkpointer(tmp_path, keep_last=2, capture_rng=False) as ckpt:
        ckpt.save(1, {"w": torch.ones(2)})
    with pytest.raises(CheckpointNotFoundError, match="removed by the writer's retention"):
        reader.restore(state, 1)


def test_a_save_reads_the_run_directory_once(tmp_path: Path, monkeypatch) -> None:
    """Dedup and retention share one scan: on an object store every scan costs requests."""
    from haltpoint.store.run_dir import RunDirectory

    scans = []
    real_scan = RunDirectory.scan

    def counted(self: RunDirectory) -> list:
        scans.append(1)
        return real_scan(self)

    with Checkpointer(tmp_path, keep_last=2, async_save=False, capture_rng=False) as ckpt:
        ckpt.save(0, {"w": torch.zeros(2)})
        monkeypatch.setattr(RunDirectory, "scan", counted)
        for step in (1, 2, 3):
            ckpt.save(step, {"w": torch.full((2,), float(step))})
        monkeypatch.undo()
        assert len(scans) == 3
        assert [info.step for info in ckpt.list()] == [2, 3]


def test_restoring_some_entries_is_strict_inside_them_and_reports_the_rest(
    tmp_path: Path,
) -> None:
    state = make_state()
    train_step(state)
    with Checkpointer(tmp_path, monitor="loss", keep_best=1) as ckpt:
        ckpt.save(0, state, {"loss": 0.5})
        model = make_state(seed=3)["model"]
        info = ckpt.restore({"model": model}, "best")
        assert info is not None and info.report is not None
        assert info.report.unexpected == ["epoch", "optimizer", "scheduler"]
        assert info.report.missing == []
        with pytest.raises(StateMismatchError, match="missing from the checkpoint: 'ema'"):
            ckpt.restore({"model": model, "ema": torch.zeros(1)})
    for a, b in zip(model.parameters(), state["model"].parameters(), strict=True):
        assert torch.equal(a, b)


def test_load_best_needs_no_lock_and_loads_only_the_model(tmp_path: Path) -> None:
    from haltpoint import load_best

    state = make_state()
    with Checkpointer(tmp_path, monitor="loss", keep_best=1, keep_last=1) as ckpt:
        ckpt.save(0, state, {"loss": 0.2})
        best = [p.detach().clone() for p in state["model"].parameters()]
        train_step(state)
        ckpt.save(1, state, {"loss": 0.9})
        ckpt.wait()
        model = make_state(seed=4)["model"]
        before = torch.get_rng_state()
        info = load_best(tmp_path, model, monitor="loss")  # the writer still holds its lock
    assert info.step == 0 and info.report is not None and "optimizer" in info.report.unexpected
    assert torch.equal(torch.get_rng_state(), before)
    for a, b in zip(model.parameters(), best, strict=True):
        assert torch.equal(a, b)


def test_load_best_of_a_missing_folder_says_it_may_not_exist(tmp_path: Path) -> None:
    from haltpoint import CheckpointNotFoundError, load_best

    with pytest.raises(CheckpointNotFoundError, match="it holds none, or does not exist"):
        load_best(tmp_path / "typo", torch.nn.Linear(2, 1), monitor="loss")


def test_restore_of_a_negative_step_is_a_value_error(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, {"model": torch.nn.Linear(2, 1)})
        with pytest.raises(ValueError, match=r"a step \(an int >= 0\), got -1"):
            ckpt.restore({"model": torch.nn.Linear(2, 1)}, -1)


def test_a_damaged_random_state_is_found_before_anything_is_loaded(tmp_path: Path) -> None:
    from haltpoint.state.tree import flatten_state

    model = torch.nn.Linear(3, 2)
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, {"model": model})
    path = next(tmp_path.glob("step-*")) / "manifest.json"
    manifest = Manifest.decode(path.read_bytes(), source=str(path))
    rng = flatten_state({"__rng__": {"python": (3, (1, 2), None)}}).tree["__rng__"]
    tree = {**manifest.tree, "__rng__": rng}
    path.write_bytes(dataclasses.replace(manifest, tree=tree).encode())
    target = torch.nn.Linear(3, 2)
    before = target.weight.detach().clone()
    ckpt = Checkpointer(tmp_path, read_only=True)
    with pytest.raises(CorruptCheckpointError, match=r"random state saved in step 0"):
        ckpt.restore({"model": target}, 0)
    assert torch.equal(target.weight, before)  # the model was not touched


@pytest.mark.parametrize(
    ("monitor", "mode", "stopper", "recorded"),
    [
        ("val_loss", "min", None, ("val_loss", "min")),
        ("val_acc", "max", ("val_loss", "min"), ("val_acc", "max")),  # the Checkpointer's
        (None, "min", ("val_acc", "max"), ("val_acc", "max")),  # else the saved stopper's
        (None, "min", None, (None, "min")),
    ],
)
def test_every_manifest_records_what_ranks_it(
    tmp_path: Path, monitor, mode, stopper, recorded
) -> None:
    from haltpoint import EarlyStopping
    from haltpoint.store.manifest import Ranking

    state: dict = {"x": 1}
    if stopper is not None:
        state["stopper"] = EarlyStopping(stopper[0], mode=stopper[1])
    with Checkpointer(tmp_path, monitor=monitor, mode=mode, keep_last=9, every=1) as ckpt:
        ckpt.save(0, state, {"val_loss": 0.5, "val_acc": 0.5})
        for step in (1, 2, 3):
            ckpt.maybe_save(step, state, {"val_loss": 0.4, "val_acc": 0.6})
    manifests = [Manifest.decode(p.read_bytes(), source=str(p)) for p in tmp_path.glob("*/m*")]
    assert len(manifests) > 1
    assert all(m.ranking == Ranking(*recorded) for m in manifests)
    assert any("saved_by" in m.extra for m in manifests)  # maybe_save's record stays beside it


def test_a_damaged_history_never_reaches_the_restored_stopper(tmp_path: Path) -> None:
    from haltpoint import EarlyStopping

    stopper = EarlyStopping("val_loss", patience=3)
    with Checkpointer(tmp_path, monitor="val_loss") as ckpt:
        for step, loss in enumerate([1.0, 0.5, 0.6]):
            stopper.step({"val_loss": loss})
            ckpt.save(step, {"stopper": stopper}, {"val_loss": loss})
    (tmp_path / "history.jsonl").write_bytes(os.urandom(4096))
    fresh = EarlyStopping("val_loss", patience=3)
    with Checkpointer(tmp_path, monitor="val_loss") as ckpt:
        ckpt.restore({"stopper": fresh})  # its state is in the checksummed manifest
    assert (fresh.best, fresh.best_step, fresh.wait) == (0.5, 1, 1)


def test_a_reader_of_a_missing_folder_creates_nothing(tmp_path: Path) -> None:
    """Readers never create anything: not even the run folder (issue 15.3)."""
    missing = tmp_path / "typo"
    reader = Checkpointer(missing, read_only=True)
    assert reader.list() == [] and reader.restore({"model": torch.nn.Linear(2, 1)}) is None
    reader.close()
    assert not missing.exists()
    with Checkpointer(missing):  # a writer creates it
        assert missing.is_dir()


@pytest.mark.parametrize(
    ("second", "kept_by_second"),
    [
        ({"monitor": "score"}, "score (min)"),  # the resumed job forgot mode="max"
        ({"monitor": "val_score", "mode": "max"}, "val_score (max)"),  # the monitor renamed
    ],
    ids=["mode-forgotten", "monitor-renamed"],
)
@pytest.mark.parametrize("async_save", [False, True])
def test_a_writer_ranking_otherwise_keeps_the_best_the_run_recorded(
    tmp_path: Path, second: dict, kept_by_second: str, async_save: bool
) -> None:
    run, model = tmp_path / "run", torch.nn.Linear(3, 2)
    with Checkpointer(run, monitor="score", mode="max", keep_best=1, async_save=False) as ckpt:
        for step, score in enumerate([0.5, 0.9, 0.7]):
            ckpt.save(step, {"model": model}, {"score": score})
    metric = second["monitor"]
    said = rf"ranked by score \(max\), this Checkpointer ranks by {re.escape(kept_by_second)}"
    writer = Checkpointer(run, keep_best=1, async_save=async_save, **second)
    with pytest.warns(UserWarning, match=said), writer as ckpt:
        for step, value in [(3, 0.6), (4, 0.65), (5, 0.1)]:
            ckpt.save(step, {"model": model}, {metric: value})
        steps = [info.step for info in ckpt.list()]
    assert 1 in steps  # the run's best score, 0.9, kept by the ranking it was kept under
    assert steps[-1] == 5
    with Checkpointer(run, read_only=True) as reader:
        assert reader.restore({"model": torch.nn.Linear(3, 2)}, 1).step == 1


def test_best_is_chosen_by_the_recorded_mode_unless_one_is_given(tmp_path: Path) -> None:
    from haltpoint import load_best

    run, model = tmp_path / "run", torch.nn.Linear(3, 2)
    with Checkpointer(run, monitor="score", mode="max", keep_last=3, async_save=False) as ckpt:
        for step, score in enumerate([0.5, 0.9, 0.7]):
            ckpt.save(step, {"model": model}, {"score": score})
    assert load_best(run, torch.nn.Linear(3, 2), monitor="score").step == 1  # not the worst
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Checkpointer(run, monitor="score", read_only=True) as reader:
            assert reader.restore({"model": model}, "best").step == 1
    with pytest.warns(
        UserWarning, match=r"rank score by mode='max'; choosing the best by mode='min', as given"
    ):
        info = load_best(run, torch.nn.Linear(3, 2), monitor="score", mode="min")
    assert info.step == 0


def test_a_stopper_that_does_not_fit_is_refused_before_anything_loads(tmp_path: Path) -> None:
    from haltpoint import EarlyStopping, Target

    model, stopper = torch.nn.Linear(3, 2), EarlyStopping("val_loss", mode="min", patience=3)
    stopper.step(0.5)
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, {"model": model, "stopper": stopper}, {"val_loss": 0.5})
    fresh = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    other = EarlyStopping("val_loss", mode="min", patience=3, rules=[Target(0.1)])
    with Checkpointer(tmp_path) as ckpt, pytest.raises(StateMismatchError) as info:
        ckpt.restore({"model": fresh, "stopper": other})
    assert "does not match this stopper's 1 rules" in str(info.value)
    assert "already hold" not in str(info.value)  # nothing was loaded, so nothing to say
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert other.evaluations == 0


def test_another_kind_of_optimizer_is_refused_before_anything_loads(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    adam = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    adam.step()
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, {"model": model, "optimizer": adam})
    fresh = torch.nn.Linear(3, 2)
    sgd = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with Checkpointer(tmp_path) as ckpt, pytest.raises(StateMismatchError) as info:
        ckpt.restore({"model": fresh, "optimizer": sgd})  # SGD.step() would fail on it later
    assert "param group 0 has no 'dampening', 'momentum', which it needs" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    scheduled = torch.optim.Adam(fresh.parameters())
    torch.optim.lr_scheduler.StepLR(scheduled, 1)  # adds initial_lr, which the file lacks
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore({"model": fresh, "optimizer": scheduled}).step == 0


@pytest.mark.parametrize("flag", ["async_save", "overlap", "capture_rng", "read_only"])
@pytest.mark.parametrize("value", [None, 1, "yes"])
def test_a_flag_that_is_not_a_bool_is_refused_before_the_run_is_touched(
    tmp_path: Path, flag: str, value: object
) -> None:
    with pytest.raises(TypeError, match=f"{flag} must be True or False, got {value!r}"):
        Checkpointer(tmp_path / "run", **{flag: value})
    assert not (tmp_path / "run").exists()  # read_only=None opened a writer before


def test_pin_must_be_a_bool(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        with pytest.raises(TypeError, match="pin must be True or False, got 'no'"):
            ckpt.save(0, {"x": 1}, pin="no")  # type: ignore[arg-type]
        assert ckpt.list() == []


def _ranked_by_val_acc(run: Path) -> None:
    """A run whose checkpoints rank by val_acc: a writer ranking by val_loss is warned."""
    with Checkpointer(run, monitor="val_acc", mode="max", keep_best=1, async_save=False) as ckpt:
        for step in range(2):
            ckpt.save(step, {"w": torch.zeros(3)}, {"val_acc": step, "val_loss": 1.0})


def _damaged_step_0(run: Path) -> None:
    """A run with a damaged manifest: every scan of a save warns about it."""
    with Checkpointer(run, keep_last=5, async_save=False) as ckpt:
        for step in range(2):
            ckpt.save(step, {"w": torch.zeros(3)}, {"val_loss": 1.0})
    (run / "step-000000000" / "manifest.json").write_text("{")


@pytest.mark.parametrize("make_run", [_ranked_by_val_acc, _damaged_step_0])
def test_warnings_of_a_background_save_point_at_the_line_that_called_save(
    tmp_path: Path, make_run
) -> None:
    make_run(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = Checkpointer(tmp_path, monitor="val_loss", keep_best=1, keep_last=1)
        opened = len(caught)
        ckpt.save(2, {"w": torch.ones(3)}, {"val_acc": 0, "val_loss": 0.5})
        line = sys._getframe().f_lineno - 1
        ckpt.close()
    from_save = caught[opened:]
    assert from_save  # the save warned, from the writer thread
    assert all((w.filename, w.lineno) == (__file__, line) for w in from_save), [
        (w.filename, w.lineno) for w in from_save
    ]


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("wait", -3, "'wait'"),
        ("best_step", "1", "'best_step'"),
        ("best", float("nan"), "'best'"),
        ("evaluations", 2**70, "'evaluations'"),
        ("last_decision", {"stop": True}, "'last_decision'"),
        ("last_decision.reason", None, "'last_decision'['reason']"),
        ("last_decision.code", "bored", "'last_decision'['code']"),
        ("last_decision.step", {"nested": [1]}, "'last_decision'['step']"),
    ],
)
def test_a_crafted_stopper_state_in_a_checkpoint_is_one_state_mismatch_line(
    tmp_path: Path, field: str, value: object, named: str
) -> None:
    """A run directory whose checkpoint holds a stopper state no stopper could have saved:
    restore says which field, in one line, and loads nothing."""
    from haltpoint import EarlyStopping

    stopper = EarlyStopping("val_loss", patience=1)
    for loss in (1.0, 2.0):
        stopper.step({"val_loss": loss})
    assert stopper.stopped
    crafted = json.loads(json.dumps(stopper.state_dict()))
    holder, key = crafted, field
    if "." in field:
        parent, key = field.split(".")
        holder = crafted[parent]
    holder[key] = value
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, {"stopper": crafted})
    fresh = EarlyStopping("val_loss", patience=1)
    with (
        Checkpointer(tmp_path, read_only=True) as reader,
        pytest.raises(StateMismatchError) as raised,
    ):
        reader.restore({"stopper": fresh})
    assert named in str(raised.value) and "\n" not in str(raised.value)
    assert fresh.evaluations == 0


def test_steps_may_be_numpy_integers(tmp_path: Path) -> None:
    # `for epoch in np.arange(n)` gives np.int64 steps: saved, scheduled and restored as ints
    with Checkpointer(tmp_path, monitor="loss", every=1, keep_last=4, async_save=False) as ckpt:
        for epoch in np.arange(3):
            ckpt.maybe_save(epoch, {"x": torch.ones(1) * epoch}, {"loss": 1.0 / (epoch + 1)})
        ckpt.save(np.int64(3), {"x": torch.ones(1) * 3}, {"loss": 0.1})
        target = {"x": torch.zeros(1)}
        info = ckpt.restore(target, np.int64(1))
    assert info is not None and info.step == 1 and type(info.step) is int
    assert target["x"].item() == 1.0
    assert [r["step"] for r in map(json.loads, (tmp_path / "history.jsonl").open())] == [0, 1, 2, 3]
    with Checkpointer(tmp_path) as ckpt, pytest.raises(ValueError, match="step must be"):
        ckpt.save(np.float64(4), {"x": torch.ones(1)})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep_last": 0},
        {"keep_best": 2},
        {"monitor": "val_loss", "mode": "maximize"},
        {"every": -3},
        {"every": "sometimes"},
        {"every": "auto", "mtbf": "bad"},
        {"overhead": 0.1},
        {"overlap": True, "async_save": False},
        {"max_staging_bytes": -5},
        {"save_on_signal": "SIGTERM"},
        {"save_on_signal": []},
        {"save_on_signal": [signal.SIGTERM, signal.SIGKILL]},
        {"read_only": True, "save_on_signal": signal.SIGTERM},
    ],
    ids=repr,
)
def test_a_bad_argument_creates_no_run_directory(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    # a typo in an argument must not leave an empty folder (or one holding a stray writer
    # lock) at the run's path: the arguments are checked before anything is created
    run = tmp_path / "exp1"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ValueError):
        Checkpointer(run, **kwargs)
    assert not run.exists(), sorted(p.name for p in run.iterdir())
    assert signal.getsignal(signal.SIGTERM) is before
