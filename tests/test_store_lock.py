"""The writer lock: other processes, killed holders, this process twice, fork, fsspec."""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from haltpoint.errors import LockedError
from haltpoint.store.lock import LOCK_NAME, LockHolder, WriterLock, read_holder
from haltpoint.store.storage import FsspecStorage, LocalStorage

fcntl = pytest.importorskip("fcntl")

HOLDER_SCRIPT = textwrap.dedent(
    """
    import sys
    from haltpoint.store.lock import WriterLock
    from haltpoint.store.storage import FsspecStorage, LocalStorage

    url = sys.argv[1]
    lock = WriterLock(FsspecStorage(url) if url.startswith("file://") else LocalStorage(url))
    lock.acquire()
    print("ready", flush=True)
    sys.stdin.read()  # hold the lock until the parent closes stdin
    lock.release()
    """
)


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "run")


def start_holder(url: str) -> subprocess.Popen[str]:
    """Another process that holds the writer lock of `url` until its stdin is closed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER_SCRIPT, url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


@pytest.fixture
def child(storage: LocalStorage) -> Iterator[subprocess.Popen[str]]:
    proc = start_holder(storage.root)
    with proc:  # closes the pipes on the way out
        yield proc
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def lock_path(storage: LocalStorage) -> str:
    return os.path.join(storage.root, LOCK_NAME)


@pytest.fixture
def no_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --- local disk: flock --------------------------------------------------------------------


def test_other_process_holding_the_lock_is_named(
    storage: LocalStorage, child: subprocess.Popen[str]
) -> None:
    host = socket.gethostname()
    with pytest.raises(
        LockedError,
        match=rf"locked by process {child.pid} on host {host} since \d{{4}}-\d\d-\d\d "
        r"\d\d:\d\d:\d\d UTC; only one writer.*Stop that process, or open the run read-only: "
        r"readers are always allowed; if it is dead on another host, delete .*\.haltpoint\.lock",
    ) as caught:
        WriterLock(storage).acquire()
    assert caught.value.path == lock_path(storage)
    assert "this very process" not in str(caught.value)


def test_read_holder_names_the_child_without_disturbing_it(
    storage: LocalStorage, child: subprocess.Popen[str], no_warnings: None
) -> None:
    holder = read_holder(storage)
    assert holder is not None
    assert (holder.pid, holder.host) == (child.pid, socket.gethostname())
    assert abs(holder.since - time.time()) < 60
    assert not holder.is_this_process()
    with pytest.raises(LockedError, match=rf"process {child.pid}"):
        WriterLock(storage).acquire()  # still held after the probe
    assert child.stdin is not None
    child.stdin.close()  # the child releases cleanly: no take-over warning afterwards
    assert child.wait(timeout=10) == 0
    assert read_holder(storage) is None
    with WriterLock(storage):
        holder = read_holder(storage)
        assert holder is not None and holder.is_this_process()


def test_killed_holder_is_taken_over_with_a_warning(
    storage: LocalStorage, child: subprocess.Popen[str]
) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    assert read_holder(storage) is None  # the kernel dropped the flock: stale, so free
    lock = WriterLock(storage)
    with pytest.warns(
        UserWarning,
        match=rf"taking over the writer lock of .*: its previous holder, process {child.pid} on "
        rf"host .* UTC, is gone without releasing it \(it crashed or was killed\)",
    ):
        lock.acquire()
    holder = read_holder(storage)
    assert holder is not None and holder.is_this_process()
    lock.release()


def test_same_process_twice_is_refused(storage: LocalStorage, no_warnings: None) -> None:
    first = WriterLock(storage)
    first.acquire()
    second = WriterLock(storage)
    with pytest.raises(
        LockedError, match=rf"locked by process {os.getpid()} .*\(this very process: close the"
    ):
        second.acquire()
    assert not second.held and first.held
    first.release()
    second.acquire()
    second.release()


def test_acquire_twice_on_one_object_is_refused(storage: LocalStorage) -> None:
    with WriterLock(storage) as lock:
        with pytest.raises(RuntimeError, match=r"already holds .*\.haltpoint\.lock; release\(\)"):
            lock.acquire()
        assert lock.held


def test_release_is_idempotent_and_clears_the_record(
    storage: LocalStorage, no_warnings: None
) -> None:
    lock = WriterLock(storage)
    lock.release()  # never acquired: nothing happens
    lock.acquire()
    record = json.loads(Path(lock_path(storage)).read_bytes())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    lock.release()
    lock.release()
    assert not lock.held
    assert Path(lock_path(storage)).read_bytes() == b""  # file kept, holder record cleared
    assert read_holder(storage) is None
    lock.acquire()  # the same object can take it again
    lock.release()


def test_context_manager_releases_on_error(storage: LocalStorage, no_warnings: None) -> None:
    with pytest.raises(KeyError, match="boom"), WriterLock(storage) as lock:
        assert lock.held
        raise KeyError("boom")
    assert not lock.held
    assert read_holder(storage) is None
    with WriterLock(storage):
        pass


def test_garbage_collected_lock_is_released(storage: LocalStorage, no_warnings: None) -> None:
    lock = WriterLock(storage)
    lock.acquire()
    del lock
    gc.collect()
    with WriterLock(storage):
        pass


def test_holder_without_a_record_is_unidentified(storage: LocalStorage) -> None:
    fd = os.open(lock_path(storage), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a holder that never wrote its record
        with pytest.raises(LockedError, match=r"locked by an unidentified process"):
            WriterLock(storage).acquire()
        assert read_holder(storage) == LockHolder(0, "", 0.0)
    finally:
        os.close(fd)
    assert read_holder(storage) is None


HOSTILE_RECORDS = {
    "deep-nesting": b"[" * 100_000 + b"]" * 100_000,  # past the JSON parser's recursion limit
    "huge": b'{"pid": 1, "host": "' + b"x" * (8 << 20) + b'", "since": 0}',
    "binary": bytes(range(256)) * 64,
}


@pytest.mark.parametrize("record", HOSTILE_RECORDS.values(), ids=HOSTILE_RECORDS.keys())
def test_a_hostile_holder_record_is_no_holder(storage: LocalStorage, record: bytes) -> None:
    Path(lock_path(storage)).write_bytes(record)
    assert read_holder(storage) is None  # no lock held: the record says nothing
    fd = os.open(lock_path(storage), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a live holder with that record
        with pytest.raises(LockedError, match=r"locked by an unidentified process"):
            WriterLock(storage).acquire()
        assert read_holder(storage) == LockHolder(0, "", 0.0)
    finally:
        os.close(fd)
    with WriterLock(storage) as lock:  # taken over once free, the record rewritten
        assert lock.held and read_holder(storage) is not None


RACER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from haltpoint.errors import LockedError
    from haltpoint.store.lock import WriterLock, read_holder
    from haltpoint.store.storage import LocalStorage

    import os
    storage = LocalStorage(sys.argv[1])
    while time.time() < float(sys.argv[2]):
        pass
    read_holder(storage)  # probes racing with acquires must not make them fail wrongly
    lock = WriterLock(storage)  # keep a reference: a collected lock is released
    try:
        lock.acquire()
    except LockedError:
        print("refused")
    else:
        print("won", flush=True)
        while not os.path.exists(sys.argv[3]):  # hold it until every racer has answered
            time.sleep(0.01)
    """
)


def test_exactly_one_of_many_racing_processes_wins(storage: LocalStorage, tmp_path: Path) -> None:
    start = time.time() + 1.0
    done = tmp_path / "all-answered"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER_SCRIPT, storage.root, str(start), str(done)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    try:
        outcomes = sorted(proc.stdout.readline().strip() for proc in procs if proc.stdout)
    finally:
        done.touch()
        for proc in procs:
            proc.communicate(timeout=60)
    assert outcomes == ["refused"] * 5 + ["won"]


def test_read_holder_of_a_fresh_directory(storage: LocalStorage) -> None:
    assert read_holder(storage) is None
    assert not os.path.exists(lock_path(storage))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_neither_keeps_nor_releases_the_lock(storage: LocalStorage) -> None:
    lock = WriterLock(storage)
    lock.acquire()
    # A child that calls release() must not release the parent's lock.
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        lock.release()
        os._exit(0 if not lock.held else 1)
    assert os.waitpid(pid, 0)[1] == 0
    with pytest.raises(LockedError, match=rf"process {os.getpid()}"):
        WriterLock(storage).acquire()
    # A child still alive when the parent releases must not keep the lock held.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(write_end)
        os.read(read_end, 1)
        os._exit(0)
    os.close(read_end)
    try:
        lock.release()
        with WriterLock(storage):
            pass
    finally:
        os.close(write_end)
        os.waitpid(pid, 0)


# --- fsspec: best effort ------------------------------------------------------------------


@pytest.fixture
def memory() -> Iterator[FsspecStorage]:
    storage = FsspecStorage(f"memory://lock-{uuid.uuid4().hex}")
    yield storage
    storage.rmtree("")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


def plant(storage: FsspecStorage, pid: int, host: str) -> None:
    storage.publish(LOCK_NAME, LockHolder(pid, host, 1795559465.0).to_json())


def test_fsspec_lock_file_and_release(memory: FsspecStorage, no_warnings: None) -> None:
    with WriterLock(memory) as lock:
        holder = LockHolder.from_json(memory.read_bytes(LOCK_NAME))
        assert holder is not None and holder.is_this_process()
        assert read_holder(memory) == holder
        with pytest.raises(
            LockedError, match=rf"process {os.getpid()} .*this very process.*delete memory://"
        ):
            WriterLock(memory).acquire()
    assert not lock.held
    assert not memory.exists(LOCK_NAME)
    lock.release()
    assert read_holder(memory) is None


def test_fsspec_live_holder_on_this_host_is_refused(memory: FsspecStorage) -> None:
    plant(memory, os.getppid(), socket.gethostname())
    with pytest.raises(
        LockedError,
        match=rf"locked by process {os.getppid()} on host .* since 2026-11-24 22:31:05 UTC",
    ) as caught:
        WriterLock(memory).acquire()
    assert caught.value.path is not None and caught.value.path.endswith("/.haltpoint.lock")
    assert read_holder(memory) == LockHolder(os.getppid(), socket.gethostname(), 1795559465.0)


def test_fsspec_other_host_is_refused_even_if_pid_is_dead(memory: FsspecStorage) -> None:
    pid = dead_pid()
    plant(memory, pid, "some-other-host")
    with pytest.raises(
        LockedError, match=rf"process {pid} on host some-other-host .*if it is dead on another"
    ):
        WriterLock(memory).acquire()
    holder = read_holder(memory)
    assert holder is not None and holder.host == "some-other-host"


def test_fsspec_dead_holder_on_this_host_is_taken_over(memory: FsspecStorage) -> None:
    pid = dead_pid()
    plant(memory, pid, socket.gethostname())
    assert read_holder(memory) is None
    lock = WriterLock(memory)
    with pytest.warns(UserWarning, match=rf"previous holder, process {pid} on host .* is gone"):
        lock.acquire()
    holder = read_holder(memory)
    assert holder is not None and holder.is_this_process()
    lock.release()
    assert not memory.exists(LOCK_NAME)


def test_fsspec_release_leaves_a_lock_taken_by_someone_else(memory: FsspecStorage) -> None:
    lock = WriterLock(memory)
    lock.acquire()
    plant(memory, os.getppid(), socket.gethostname())  # e.g. deleted by hand and re-taken
    lock.release()
    assert memory.exists(LOCK_NAME)


class RacingStorage(FsspecStorage):
    """Storage where another writer publishes its lock file just after ours."""

    def publish_new(self, rel: str, data: bytes) -> None:
        super().publish_new(rel, data)
        if rel == LOCK_NAME:
            super().publish(rel, LockHolder(4242, "other-host", 1795559465.0).to_json())


def test_fsspec_writer_that_loses_a_race_is_refused() -> None:
    storage = RacingStorage(f"memory://lock-{uuid.uuid4().hex}")
    lock = WriterLock(storage)
    with pytest.raises(LockedError, match=r"locked by process 4242 on host other-host"):
        lock.acquire()
    assert not lock.held
    storage.rmtree("")


def test_fsspec_unreadable_lock_file_is_refused(memory: FsspecStorage) -> None:
    memory.publish(LOCK_NAME, b"\x00garbage")
    with pytest.raises(LockedError, match=r"locked by an unidentified process.*delete memory://"):
        WriterLock(memory).acquire()
    assert read_holder(memory) == LockHolder(0, "", 0.0)


def test_fsspec_protocol_across_processes(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/remote-run"
    storage = FsspecStorage(url)
    with start_holder(url) as proc:
        with pytest.raises(LockedError, match=rf"locked by process {proc.pid} on host"):
            WriterLock(storage).acquire()
        holder = read_holder(storage)
        assert holder is not None and holder.pid == proc.pid
        proc.kill()  # dies without removing its lock file
        proc.wait(timeout=10)
    assert storage.exists(LOCK_NAME)
    assert read_holder(storage) is None
    lock = WriterLock(storage)
    with pytest.warns(UserWarning, match=rf"previous holder, process {proc.pid} .* is gone"):
        lock.acquire()
    lock.release()
    assert not storage.exists(LOCK_NAME)


# --- the holder record --------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'{"pid": "1", "host": "h", "since": 1.0}',
        b'{"pid": true, "host": "h", "since": 1.0}',
        b'{"pid": 0, "host": "h", "since": 1.0}',
        b'{"pid": 5, "host": 3, "since": 1.0}',
        b'{"pid": 5, "host": "h", "since": NaN}',
        b'{"pid": 5, "host": "h"}',
    ],
)
def test_invalid_holder_records(data: bytes) -> None:
    assert LockHolder.from_json(data) is None


def test_holder_record_round_trip() -> None:
    holder = LockHolder(42, "gpu-3", 1795559465.25)
    assert LockHolder.from_json(holder.to_json()) == holder
    assert holder.describe() == "process 42 on host gpu-3 since 2026-11-24 22:31:05 UTC"
