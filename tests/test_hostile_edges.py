"""Crafted run directories at the edges the earlier campaigns left: names an object store
allows and a local disk does not, lock records, temporary-file names, and the files the
adapters read beside a run. Every read gives a `CheckpointError` (or skips what is not
haltpoint's), never another exception, and no writer deletes what is not its own."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fsspec
import pytest
import torch

from haltpoint import Checkpointer
from haltpoint.cli import demo, main
from haltpoint.errors import LockedError


@pytest.fixture
def memory_run() -> Iterator[str]:
    """A `memory://` run of two checkpoints (steps 1 and 2, loss 1.0 and 0.5)."""
    url = f"memory://hostile-{uuid.uuid4().hex}/run"
    with Checkpointer(url, monitor="loss", keep_last=3) as ckpt:
        ckpt.save(1, {"w": torch.ones(3)}, {"loss": 1.0})
        ckpt.save(2, {"w": torch.full((3,), 2.0)}, {"loss": 0.5})
    yield url
    fsspec.filesystem("memory").rm(url[len("memory://") :].split("/")[0], recursive=True)


def _put(url: str, rel: str, data: bytes) -> None:
    fsspec.filesystem("memory").pipe(f"{url[len('memory://') :]}/{rel}", data)


LONG = "9" * 5000  # an object store's key has no length limit; int() refuses 4,301 digits


@pytest.mark.parametrize(
    "rel",
    [
        f"step-{LONG}/manifest.json",
        f"quarantine/step-{LONG}-1.json",
        f"quarantine/step-000000001-{LONG}.json",
    ],
    ids=["step-folder", "quarantined-step", "quarantined-count"],
)
def test_a_name_of_thousands_of_digits_is_no_checkpoint_to_any_reader_or_writer(
    memory_run: str, rel: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # was: ValueError ('Exceeds the limit (4300 digits) for integer string conversion') from
    # list, restore, a writer's open, and every command: one crafted name denied the run
    _put(memory_run, rel, b"{}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader = Checkpointer(memory_run, read_only=True)
        assert [info.step for info in reader.list()] == [1, 2]
        info = reader.restore({"w": torch.zeros(3)})
        assert info is not None and info.step == 2
        Checkpointer(memory_run, monitor="loss", keep_last=3).close()
    for command in (["ls"], ["verify"], ["show"], ["gc", "--keep-last", "2"]):
        assert main([command[0], memory_run, *command[1:]]) == 0, capsys.readouterr()
    assert "4300" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "record",
    [
        {"pid": 10**30, "host": socket.gethostname(), "since": 0},
        {"pid": 2**63, "host": socket.gethostname(), "since": 0},
        {"pid": 7, "host": "gpu-3\nhaltpoint: all clear", "since": 0},
        {"pid": 7, "host": "\ud800", "since": 0},
    ],
    ids=["pid-10**30", "pid-2**63", "host-with-newline", "host-lone-surrogate"],
)
def test_a_crafted_lock_record_on_an_object_store_is_one_locked_error_line(
    memory_run: str, record: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    # was: OverflowError from os.kill for a pid beyond a C int (a writer's open, gc, import);
    # a host name with a newline or a lone surrogate made the LockedError two lines, or one
    # that print() cannot write
    _put(memory_run, ".haltpoint.lock", json.dumps(record).encode())
    with pytest.raises(LockedError, match="unidentified process") as caught:
        Checkpointer(memory_run)
    message = str(caught.value)
    assert "\n" not in message and message.encode("utf-8")
    assert main(["gc", memory_run, "--keep-last", "1"]) == 1
    err = capsys.readouterr().err
    assert "unidentified process" in err and len(err.strip().splitlines()) == 1
    assert [info.step for info in Checkpointer(memory_run, read_only=True).list()] == [1, 2]


def test_names_that_end_in_a_newline_are_not_haltpoints_to_clean_up(tmp_path: Path) -> None:
    # `$` matches before a trailing "\n": a writer's clean-up at open took another tool's
    # "history.jsonl.0a1b2c3d.tmp\n" (and a step folder's "manifest.json.0a1b2c3d.tmp\n")
    # for its own temporary file and deleted it; --fresh took "step-...-1.json\n" in
    # quarantine/ for a quarantined manifest of its own
    run = tmp_path / "run"
    with Checkpointer(run) as ckpt:
        ckpt.save(1, {"w": torch.ones(3)})
    foreign = [
        run / "history.jsonl.0a1b2c3d.tmp\n",
        run / ".haltpoint.lock.0a1b2c3d.tmp\n",
        run / "step-000000001" / "manifest.json.0a1b2c3d.tmp\n",
        run / "step-000000001" / "pinned.0a1b2c3d.tmp\n",
    ]
    for path in foreign:
        path.write_bytes(b"someone else's")
    Checkpointer(run).close()  # clean-up at open
    assert all(path.read_bytes() == b"someone else's" for path in foreign)
    assert main(["gc", str(run), "--keep-last", "1"]) == 0
    assert all(path.read_bytes() == b"someone else's" for path in foreign)
    assert demo._foreign_entry(str(run)) == str(foreign[1])
    for path in foreign:
        path.unlink()
    (run / "quarantine").mkdir()
    (run / "quarantine" / "step-000000001-1.json\n").write_bytes(b"someone else's")
    assert demo._foreign_entry(str(run)) == str(run / "quarantine" / "step-000000001-1.json\n")


def _trainer_output(tmp_path: Path, content: Callable[[Path], None]) -> tuple[Any, Any]:
    pytest.importorskip("transformers")
    from transformers.trainer_callback import TrainerState

    (tmp_path / "out" / "checkpoint-3").mkdir(parents=True)
    (tmp_path / "out" / "checkpoint-1").mkdir()
    content(tmp_path / "out" / "checkpoint-3" / "trainer_state.json")
    state = TrainerState()
    state.global_step = 5
    return SimpleNamespace(output_dir=str(tmp_path / "out")), state


def _fifo(path: Path) -> None:
    os.mkfifo(path)


@pytest.mark.parametrize(
    ("content", "best"),
    [
        (_fifo, None),
        (lambda path: path.write_text("[" * 100_000 + "]" * 100_000), None),
        (lambda path: path.write_bytes(b"\xff\xfe{}"), None),
        (lambda path: path.write_text('{"best_model_checkpoint": "/etc"}'), None),
        (lambda path: path.write_text('{"best_model_checkpoint": 7}'), None),
        (lambda path: path.write_text('{"best_model_checkpoint": "OUT/../.."}'), None),
        (
            lambda path: path.write_text(
                '{"best_model_checkpoint": "OUT/checkpoint-1", "best_metric": "low"}'
            ),
            None,
        ),
        (lambda path: path.write_text('{"best_model_checkpoint": "OUT/checkpoint-1"}'), "1"),
    ],
    ids=[
        "fifo",
        "deep",
        "not-utf8",
        "best-outside",
        "best-a-number",
        "best-dotdot",
        "metric-a-string",
        "intact",
    ],
)
def test_the_trainer_state_a_resumed_hf_run_reads_is_read_safely(
    tmp_path: Path, content: Callable[[Path], None], best: str | None
) -> None:
    # the HF adapter reads the newest checkpoint-N/trainer_state.json of output_dir for the
    # Trainer's best checkpoint. Was: a FIFO there hung train() forever, nesting raised
    # RecursionError out of on_train_begin, and a best_model_checkpoint anywhere on the disk
    # ("/etc") was handed to the Trainer, which loads the best model from it at the end
    from haltpoint.integrations import transformers as adapter

    def write(path: Path) -> None:
        content(path)
        if path.is_file() and not path.is_symlink():
            path.write_text(path.read_text(errors="replace").replace("OUT", str(path.parents[1])))

    args, state = _trainer_output(tmp_path, write)
    done = threading.Event()
    errors: list[BaseException] = []

    def restore() -> None:
        try:
            adapter._restore_trainer_best(args, state)
        except BaseException as exc:
            errors.append(exc)
        done.set()

    threading.Thread(target=restore, daemon=True).start()
    assert done.wait(20), "reading trainer_state.json hung"
    assert errors == []
    expected = None if best is None else str(tmp_path / "out" / f"checkpoint-{best}")
    assert state.best_model_checkpoint == expected


def _laughs(depth: int, build: bytes) -> bytes:
    """A DCP `.metadata` pickle of about 20 bytes a level: L0 = [], L{i} = [L{i-1}, L{i-1}]
    (by memo references), then `build` (which may fetch L{depth} from memo `depth`)."""
    out = bytearray(b"\x80\x02]r\x00\x00\x00\x00")  # PROTO 2, EMPTY_LIST, LONG_BINPUT 0
    for i in range(1, depth + 1):
        get = b"j" + (i - 1).to_bytes(4, "little")  # LONG_BINGET
        out += b"(" + get + get + b"l" + b"r" + i.to_bytes(4, "little")  # MARK .. LIST, PUT
    return bytes(out) + b"0" + build  # POP: the last list stays in the memo only


_META = b"ctorch.distributed.checkpoint.metadata\nMetadata\n)\x81"  # GLOBAL, (), NEWOBJ


@pytest.mark.parametrize(
    "build",
    [
        _META + b"}X\x03\x00\x00\x00zzzj\x3c\x00\x00\x00sb.",  # a refused state, repr'd
        _META + b"}X\x0c\x00\x00\x00storage_dataj\x3c\x00\x00\x00sb.",  # walked after load
        b"}j\x3c\x00\x00\x00\x85K\x01s.",  # a key: a tuple of it, hashed
        b"]2.",  # DUP
    ],
    ids=["refused-state", "storage-data", "dict-key", "dup"],
)
def test_dcp_metadata_that_shares_containers_is_refused_at_once(
    build: bytes, tmp_path: Path
) -> None:
    # was: 2**60 elements to repr (a refused BUILD state), hash (a dict key) or walk: a
    # 1 KB `.metadata` hung restore and verify of a sharded checkpoint, eating memory (in C,
    # holding the GIL: so it is read in a child process, killed if it hangs)
    path = tmp_path / ".metadata"
    path.write_bytes(_laughs(60, build))
    script = (
        "import sys\n"
        "from haltpoint.distributed.safe_metadata import check_metadata\n"
        "from haltpoint.errors import CorruptCheckpointError\n"
        "try:\n"
        "    check_metadata(open(sys.argv[1], 'rb'), 'run/dcp/.metadata', {})\n"
        "except CorruptCheckpointError as exc:\n"
        "    print('refused' in str(exc) and '\\n' not in str(exc))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    try:
        done = subprocess.run(
            [sys.executable, "-c", script, str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("reading the metadata hung")
    assert done.stdout.strip() == "True", done.stderr[-2000:]


@pytest.mark.parametrize("name", ["a\nb", "a\rb", "a\u2028b", "a\x85b", "a\ud800b", "a\x00b"])
def test_a_checkpoint_error_quoting_a_crafted_name_is_one_printable_line(name: str) -> None:
    """A file name read from a run directory ends up in messages: a line break split a library
    error in two, and a lone surrogate made one that print() cannot write."""
    from haltpoint.errors import CorruptCheckpointError

    message = str(CorruptCheckpointError(f"cannot read {name}: damaged", path=name))
    assert len(message.splitlines()) == 1 and message.isprintable()
    assert message.startswith("cannot read a\\") and message.endswith("b: damaged")
    print(message)  # writable
