"""Special files where a run directory should hold regular ones: a FIFO, a folder, a socket, or a
link to a device, at a manifest, a tensor file, `history.jsonl` or the lock. Every command and
every writer open ends at once (a FIFO opened for reading would wait forever) with at most one
error line naming the path, and no intact checkpoint or byte outside the run changes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from haltpoint import Checkpointer
from haltpoint.cli import main
from haltpoint.errors import CheckpointError, NotRegularFileError
from haltpoint.store.run_dir import checkpoint_dirname
from haltpoint.store.storage import open_regular

NEWEST = checkpoint_dirname(3)
TARGETS = {
    "manifest": f"{NEWEST}/manifest.json",
    "tensors": f"{NEWEST}/tensors.safetensors",
    "history": "history.jsonl",
    "lock": ".haltpoint.lock",
}
KINDS = ["fifo", "folder", "socket", "device_link"]
COMMANDS = {
    "ls": ["ls", "{run}"],
    "show": ["show", "{run}"],
    "verify": ["verify", "{run}"],
    "export": ["export", "{run}", "-o", "{out}/weights.safetensors"],
    "gc": ["gc", "{run}", "--keep-last", "1"],
    "plot": ["plot", "{run}", "-o", "{out}/curves.png"],
    "replay": ["replay", "{run}"],
    "import": ["import", "{out}/model.pt", "-o", "{run}", "--step", "11"],
}
WAIT_S = 20.0
T = TypeVar("T")


def make_run(run: Path) -> None:
    model = torch.nn.Linear(3, 2)
    with Checkpointer(run, keep_last=3, async_save=False, capture_rng=False) as ckpt:
        for step in (1, 2, 3):
            with torch.no_grad():
                model.weight.fill_(float(step))
            ckpt.save(step, {"model": model}, {"val_loss": 1.0 / step})


def step_hashes(run: Path) -> dict[int, str]:
    """A hash of every regular file of each step folder, by step, for the steps that still
    have a manifest (gc removes a checkpoint's manifest, and may keep its tensor files while
    an unreadable manifest might refer to them)."""
    out = {}
    for step in (1, 2, 3):
        folder = run / checkpoint_dirname(step)
        if not os.path.lexists(folder / "manifest.json"):
            continue
        digest = hashlib.sha256()
        for path in sorted(folder.rglob("*")):
            if stat.S_ISREG(path.lstat().st_mode):
                digest.update(path.name.encode() + path.read_bytes())
        out[step] = digest.hexdigest()
    return out


@contextlib.contextmanager
def special_file(path: Path, kind: str) -> Iterator[None]:
    """Replace the file at `path` with a special one of `kind` for the block."""
    if path.exists():
        path.unlink()
    server = None
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
        (path / "keep.txt").write_text("someone's")
    elif kind == "socket":
        if len(str(path).encode()) > 100:
            pytest.skip("the path is too long for a unix socket")
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
    else:
        os.symlink("/dev/zero", path)
    try:
        yield
    finally:
        if server is not None:
            server.close()


def is_kind(path: Path, kind: str) -> bool:
    """Whether the special file of `kind` is still at `path`."""
    mode = path.lstat().st_mode
    if kind == "device_link":
        return stat.S_ISLNK(mode) and os.readlink(path) == "/dev/zero"
    test = {"fifo": stat.S_ISFIFO, "folder": stat.S_ISDIR, "socket": stat.S_ISSOCK}[kind]
    return test(mode)


def unblock(path: Path) -> None:
    """Let a reader waiting on the FIFO at `path` go: open its other end and close it."""
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def run_bounded(path: Path, call: Callable[[], T]) -> T:
    """`call()` in a thread; fail if it is still running after `WAIT_S` (it waits on a FIFO)."""
    results: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            results.append(call())
        except BaseException as exc:  # handed back to the test
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(WAIT_S)
    if thread.is_alive():
        unblock(path)
        thread.join(5)
        pytest.fail(f"still waiting after {WAIT_S:g} s on the special file {path}")
    if errors:
        raise errors[0]
    return results[0]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("base") / "run"
    make_run(run)
    return run


@pytest.fixture
def run(base_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "r"  # short: a unix socket path has a length limit
    shutil.copytree(base_run, copy)
    return copy


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", list(TARGETS))
def test_a_special_file_ends_every_command_at_once_and_loses_nothing(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str, kind: str,
    command: str,
) -> None:  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    torch.save(torch.nn.Linear(3, 2).state_dict(), out / "model.pt")
    path = run / TARGETS[target]
    damaged = target in ("manifest", "tensors")
    with special_file(path, kind):
        before = step_hashes(run)
        argv = [a.format(run=run, out=out) for a in COMMANDS[command]]
        code = run_bounded(path, lambda: main(argv))
        err = capsys.readouterr().err
        after = step_hashes(run)
        kept_kind = is_kind(path, kind)

    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("haltpoint: error: ")]
    assert code in (0, 1) and len(errors) <= 1 and (code == 1 or not errors), err
    assert kept_kind, "the special file was replaced"
    if kind == "folder":
        assert (path / "keep.txt").read_text() == "someone's"
    intact = [s for s in (1, 2, 3) if not (damaged and s == 3)]
    for step in intact:
        if step in after:
            assert after[step] == before[step], f"intact step {step} changed"
        else:  # only gc removes, and only below a newer intact step it keeps
            assert command == "gc" and any(s > step and s in after for s in intact), step
    assert max(intact) in after, "the newest intact checkpoint is gone"
    if damaged:
        assert after.get(3) == before[3], "the damaged step was changed, not set aside"
    writes = {"gc": ("lock",), "import": ("history", "lock")}.get(command, ())
    if target in writes:
        assert code == 1 and TARGETS[target] in errors[0], err  # a writer refuses at once
        assert not (run / checkpoint_dirname(11)).exists(), "import committed, then failed"
    if command == "import" and damaged:
        assert code == 0 and (run / checkpoint_dirname(11)).is_dir()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", list(TARGETS))
def test_restore_passes_over_a_special_file_and_a_writer_refuses_it(
    run: Path, target: str, kind: str
) -> None:
    path = run / TARGETS[target]
    model = torch.nn.Linear(3, 2)
    with special_file(path, kind):

        def restore() -> int | None:
            with Checkpointer(run, read_only=True) as reader:
                info = reader.restore({"model": model})
                return None if info is None else info.step

        step = run_bounded(path, restore)
        assert step == (2 if target in ("manifest", "tensors") else 3)
        assert float(model.weight[0, 0]) == float(step or 0)

        def open_writer() -> str:
            try:
                with Checkpointer(run, keep_last=3, async_save=False) as ckpt:
                    ckpt.save(12, {"model": model})
            except CheckpointError as exc:
                assert "\n" not in str(exc)
                return str(exc)
            return "ok"

        outcome = run_bounded(path, open_writer)
    if target in ("history", "lock"):
        assert TARGETS[target] in outcome and not (run / checkpoint_dirname(12)).exists()
    else:
        assert outcome == "ok" and (run / checkpoint_dirname(12)).is_dir()
        assert (run / checkpoint_dirname(2)).is_dir()


def test_open_regular_names_what_it_found_and_never_waits(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR | os.O_APPEND):
        with pytest.raises(NotRegularFileError, match="is a FIFO, not a regular file"):
            run_bounded(fifo, functools.partial(open_regular, str(fifo), flags))
    with pytest.raises(NotRegularFileError, match="is a folder"):
        open_regular(str(tmp_path), os.O_WRONLY)
    with pytest.raises(NotRegularFileError, match="is a device"):
        open_regular("/dev/null")
    plain = tmp_path / "plain"
    plain.write_bytes(b"abc")
    fd = open_regular(str(plain))
    try:
        assert os.get_blocking(fd) and os.read(fd, 3) == b"abc"
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["fifo", "folder", "socket"])
@pytest.mark.parametrize("target", list(TARGETS))
def test_demo_fresh_deletes_nothing_holding_a_special_file(
    run: Path, capsys: pytest.CaptureFixture[str], target: str, kind: str
) -> None:
    """--fresh deletes only what haltpoint wrote: a folder named like one of its files may
    hold anything (here a file of someone's), and a FIFO or socket is nobody's checkpoint."""
    path = run / TARGETS[target]
    with special_file(path, kind):
        before = step_hashes(run)
        argv = ["demo", "--run-dir", str(run), "--epochs", "1", "--fresh"]
        code = run_bounded(path, lambda: main(argv))
        err = capsys.readouterr().err
        assert code == 1 and f"holds {path}, which haltpoint did not write" in err, err
        assert is_kind(path, kind) and step_hashes(run) == before
        if kind == "folder":
            assert (path / "keep.txt").read_text() == "someone's"
