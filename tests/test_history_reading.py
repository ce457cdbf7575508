"""Reading a run's history.jsonl, whatever the file holds: records, or one `CheckpointError`
(`CorruptHistoryError`, `UnreadableCheckpointError`, `CheckpointNotFoundError`) of one line;
on the command line one `haltpoint: error:` line, never a traceback."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import haltpoint
from haltpoint import Checkpointer
from haltpoint.cli import main
from haltpoint.cli.app import build_parser
from haltpoint.cli.replay import load_records, replay_source
from haltpoint.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    CorruptHistoryError,
    UnreadableCheckpointError,
)
from haltpoint.plotting import curves
from haltpoint.store import history
from haltpoint.store.history import encode_record, parse_history, read_history
from haltpoint.store.manifest import RANKING_KEY, Manifest
from haltpoint.store.storage import LocalStorage


def cli(*argv: str) -> tuple[int, str, str]:
    """`haltpoint ARGV` through `main`, with its output captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def make_old_run(run: Path) -> None:
    """Two checkpoints whose manifests record no ranking (an older haltpoint's), so that `ls`
    and `export --which best` read the history to guess the monitor; the history removed."""
    model = torch.nn.Linear(2, 1)
    with Checkpointer(run, monitor="val_loss", async_save=False, capture_rng=False) as ckpt:
        for step, value in enumerate((0.5, 0.3)):
            ckpt.save(step, {"model": model}, {"val_loss": value, "val_acc": 1 - value})
    for path in run.glob("step-*/manifest.json"):
        manifest = Manifest.decode(path.read_bytes(), source=str(path))
        del manifest.extra[RANKING_KEY]
        path.write_bytes(manifest.encode())
    (run / "history.jsonl").unlink()


def one_error_line(err: str) -> str:
    """The only `haltpoint: error:` line of `err` (and no traceback)."""
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("haltpoint: error: ")]
    assert len(errors) == 1, err
    return errors[0]


# -- files that are no history file ----------------------------------------------------------


def test_a_folder_named_history_jsonl_is_a_corrupt_history(tmp_path: Path) -> None:
    (tmp_path / "history.jsonl").mkdir()
    with pytest.raises(CorruptHistoryError, match=r"history.jsonl is a folder, not a history"):
        read_history(LocalStorage(tmp_path, create=False))


def test_a_fifo_named_history_jsonl_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "history.jsonl"
    os.mkfifo(fifo)
    outcome: list[BaseException | object] = []

    def read() -> None:
        try:
            outcome.append(read_history(LocalStorage(tmp_path, create=False)))
        except BaseException as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # blocked in open(): let it go before failing
        os.close(os.open(fifo, os.O_WRONLY))
        reader.join(5)
        pytest.fail("reading a FIFO named history.jsonl hung")
    (result,) = outcome
    assert isinstance(result, CorruptHistoryError)
    assert "history.jsonl is not a regular file (a FIFO" in str(result)


def test_permission_denied_is_unreadable_not_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "history.jsonl").write_bytes(encode_record({"step": 0}))
    real_open = os.open

    def denied(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith("history.jsonl"):  # the tests run as root: chmod cannot deny
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(UnreadableCheckpointError, match=r"history.jsonl: Permission denied; "):
        read_history(LocalStorage(tmp_path, create=False))
    with pytest.raises(UnreadableCheckpointError):
        load_records(str(tmp_path / "history.jsonl"))


@pytest.mark.parametrize(
    "code", [errno.EIO, errno.ETIMEDOUT, errno.ESTALE], ids=errno.errorcode.get
)
def test_an_io_error_is_unreadable_not_a_corrupt_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """An error that may pass (a failing disk, NFS) said the history was corrupt."""
    (tmp_path / "history.jsonl").write_bytes(encode_record({"step": 0}))
    real_read = os.read

    def failing(fd: int, *args: Any) -> bytes:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("history.jsonl"):
            raise OSError(code, os.strerror(code))
        return real_read(fd, *args)

    monkeypatch.setattr(os, "read", failing)
    message = rf"history.jsonl: {os.strerror(code)}; this is not damage"
    with pytest.raises(UnreadableCheckpointError, match=message):
        read_history(LocalStorage(tmp_path, create=False))
    with pytest.raises(UnreadableCheckpointError, match=message):
        load_records(str(tmp_path / "history.jsonl"))


def test_a_history_larger_than_the_limit_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "history.jsonl").write_bytes(encode_record({"step": 0}) * 10)
    monkeypatch.setattr(history, "HISTORY_READ_LIMIT", 64)
    with pytest.raises(CorruptHistoryError, match="larger than 64 bytes, more than any history"):
        read_history(LocalStorage(tmp_path, create=False))


def test_a_symlinked_history_is_refused_inside_the_run_and_out_of_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "kept.jsonl").write_bytes(encode_record({"step": 4}))
    (run / "history.jsonl").symlink_to(run / "kept.jsonl")
    with pytest.raises(CorruptCheckpointError, match="symbolic link inside the run directory"):
        read_history(LocalStorage(run, create=False))
    (run / "history.jsonl").unlink()
    (tmp_path / "outside.jsonl").write_bytes(encode_record({"step": 4}))
    (run / "history.jsonl").symlink_to(tmp_path / "outside.jsonl")
    with pytest.raises(CorruptCheckpointError, match="outside the run directory"):
        read_history(LocalStorage(run, create=False))


@pytest.mark.parametrize("command", ["replay", "plot", "ls", "export"])
def test_the_cli_says_a_folder_history_is_no_history_file_in_one_line(
    tmp_path: Path, command: str
) -> None:
    run = tmp_path / "run"
    make_old_run(run)  # ls and export --which best read its history to rank
    (run / "history.jsonl").mkdir()
    argv = {
        "replay": ["replay", str(run)],
        "plot": ["plot", str(run), "-o", str(tmp_path / "c.png")],
        "ls": ["ls", str(run)],
        "export": ["export", str(run), "-o", str(tmp_path / "m.safetensors")],
    }[command]
    code, _, err = cli(*argv)
    assert code == 1
    assert "history.jsonl is a folder, not a history file" in one_error_line(err)


# -- what replay and plot need, typed ---------------------------------------------------------


def test_no_history_is_checkpoint_not_found(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match=r"has no history\.jsonl \(or it is empty\)"):
        load_records(str(tmp_path))
    (tmp_path / "history.jsonl").write_bytes(b"\n \n")
    with pytest.raises(CheckpointNotFoundError, match="is empty: nothing to replay"):
        load_records(str(tmp_path / "history.jsonl"))


def test_a_history_of_junk_is_one_corrupt_history_error_not_a_warning_per_line(
    tmp_path: Path,
) -> None:
    (tmp_path / "history.jsonl").write_bytes(b"\x00\xff junk\n[1, 2]\n7\n")
    for source in (tmp_path, tmp_path / "history.jsonl"):
        with pytest.raises(CorruptHistoryError, match="no line of it is a history record"):
            load_records(str(source))
        code, _, err = cli("replay", str(source))
        assert code == 1 and "warning" not in err
        assert "is not a haltpoint history" in one_error_line(err)


def test_records_without_numbers_at_valid_steps_leave_nothing_to_replay_or_plot(
    tmp_path: Path,
) -> None:
    lines = [{"step": "3", "metrics": {"loss": 1.0}}, {"step": 1, "metrics": {"loss": "x"}}]
    (tmp_path / "history.jsonl").write_bytes(b"".join(encode_record(r) for r in lines))
    args = build_parser().parse_args(["replay", str(tmp_path), "--metric", "loss"])
    with pytest.raises(CheckpointNotFoundError, match="holds no number for 'loss'"):
        replay_source(str(tmp_path), args, [1])
    code, _, err = cli("plot", str(tmp_path), "-o", str(tmp_path / "c.png"))
    assert code == 1 and "holds no metric values (numbers at steps" in one_error_line(err)


@pytest.mark.parametrize("name", ["\ud800", "$\\frac{$"])
def test_metric_names_that_no_terminal_or_plot_takes_literally(tmp_path: Path, name: str) -> None:
    # a lone surrogate cannot be written to a UTF-8 stdout; "$...$" is matplotlib mathtext
    records = [{"step": s, "metrics": {name: 1.0 / (s + 1)}} for s in range(3)]
    (tmp_path / "history.jsonl").write_bytes(b"".join(encode_record(r) for r in records))
    env = {**os.environ, "NO_COLOR": "1", "PYTHONIOENCODING": "utf-8"}
    for argv in (
        ["replay", str(tmp_path), "--mode", "min", "--patience", "1"],
        ["plot", str(tmp_path)],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "haltpoint", *argv], capture_output=True, env=env, timeout=120
        )
        assert done.returncode == 0, done.stderr.decode("utf-8", "replace")
        assert b"Traceback" not in done.stderr
    assert (tmp_path / "curves.png").exists()


def test_the_error_is_exported_beside_the_others() -> None:
    assert haltpoint.CorruptHistoryError is CorruptHistoryError
    assert "CorruptHistoryError" in haltpoint.__all__
    assert issubclass(CorruptHistoryError, CheckpointError)
    assert not issubclass(CorruptHistoryError, CorruptCheckpointError)  # no checkpoint damaged


# -- fuzzed histories ---------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
_step = st.one_of(
    st.integers(0, 20),
    st.integers(),
    st.just(2**70),
    st.text(max_size=3),
    st.booleans(),
    st.floats(allow_nan=True),
    st.none(),
)
_value = st.one_of(st.floats(), st.integers(), st.text(max_size=4), _json)
_record = st.fixed_dictionaries(
    {"step": _step, "metrics": st.dictionaries(st.sampled_from(["loss", "acc", "x"]), _value)},
    optional={"stopper": _json, "time": st.floats()},
)


@st.composite
def _lines(draw: st.DrawFn) -> bytes:
    """One piece of a history file: a record (checksummed or not), torn, junk, other JSON."""
    kind = draw(st.sampled_from(["checked", "plain", "torn", "bytes", "json"]))
    if kind in ("checked", "plain", "torn"):
        record = draw(_record)
        try:
            line = encode_record(record)
        except (TypeError, ValueError):
            line = b"{}\n"
        if kind == "plain":
            body = json.loads(line)
            del body["checksum"]
            line = json.dumps(body).encode() + b"\n"
        if kind == "torn":
            line = line[: draw(st.integers(0, max(0, len(line) - 2)))]
        return line
    if kind == "bytes":
        return draw(st.binary(max_size=24))
    return json.dumps(draw(_json)).encode() + draw(st.sampled_from([b"\n", b""]))


histories = st.lists(_lines(), max_size=8).map(b"".join)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=histories)
def test_fuzzed_histories_read_as_json_objects_or_a_history_error(
    data: bytes, tmp_path: Path
) -> None:
    (tmp_path / "history.jsonl").write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            records = read_history(LocalStorage(tmp_path, create=False))
        except CorruptHistoryError as exc:  # the one error allowed, in one line
            assert "\n" not in str(exc)
            return
        assert records == parse_history(data, "fuzzed")
    assert all(isinstance(r, dict) and "checksum" not in r for r in records)
    assert all(isinstance(key, str) for r in records for key in r)
    assert len(records) <= sum(1 for line in data.split(b"\n") if line.strip())
    for steps, values in curves(records).values():  # what plot and replay draw from them
        assert all(type(step) is int and 0 <= step < 2**63 for step in steps)
        assert steps == sorted(set(steps)) and all(type(v) is float for v in values)


@settings(max_examples=40, deadline=None)
@given(steps=st.lists(st.integers(0, 2**63 - 1), max_size=6))
def test_a_history_haltpoint_wrote_reads_back_whole_in_order(steps: list[int]) -> None:
    data = b"".join(encode_record({"step": s, "metrics": {"loss": 0.5}}) for s in steps)
    assert [r["step"] for r in parse_history(data, "written")] == steps


@pytest.fixture(scope="module")
def old_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("old") / "run"
    make_old_run(run)
    return run


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=histories)
def test_the_cli_on_fuzzed_histories_prints_no_traceback(
    data: bytes, old_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "fuzz"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(old_run, run)
    (run / "history.jsonl").write_bytes(data)
    for argv in (
        ["replay", str(run), "--patience", "1"],
        ["replay", str(run / "history.jsonl"), "--json"],
        ["plot", str(run), "-o", str(tmp_path / "c.svg")],
        ["ls", str(run)],
        ["export", str(run), "-o", str(tmp_path / "m.safetensors")],
    ):
        (tmp_path / "m.safetensors").unlink(missing_ok=True)
        try:
            code, _, err = cli(*argv)
        except BaseException as exc:  # main() must turn every failure into a line
            pytest.fail(f"haltpoint {argv[0]} raised {type(exc).__name__}: {exc}")
        assert code in (0, 1, 2), (argv, err)
        assert "Traceback" not in err
        if code != 0:
            one_error_line(err)
