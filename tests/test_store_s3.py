"""Object storage: a run directory on S3 (moto's server on 127.0.0.1, reached through s3fs)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")
pytest.importorskip("boto3")

from haltpoint import Checkpointer
from haltpoint.errors import LockedError
from haltpoint.store.history import read_history
from haltpoint.store.storage import FsspecStorage
from haltpoint.store.tensor_reader import read_tensors
from haltpoint.store.tensor_writer import write_tensor_file

sys.path.insert(0, str(Path(__file__).parent))
from s3_server import S3Endpoint, moto_s3

MIB = 1 << 20


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def url(s3: S3Endpoint) -> str:
    return s3.url(f"run-{uuid.uuid4().hex[:8]}")


class Calls:
    """Counts the S3 requests an s3fs file system makes, and the most upload_part in flight."""

    def __init__(self, fs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.methods: Counter[str] = Counter()
        self.in_flight = self.max_in_flight = 0
        original = fs._call_s3

        async def counted(method: str, *args: Any, **kwargs: Any) -> Any:
            self.methods[method] += 1
            if method != "upload_part":
                return await original(method, *args, **kwargs)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await asyncio.sleep(0.05)  # let the writer submit the next parts meanwhile
                return await original(method, *args, **kwargs)
            finally:
                self.in_flight -= 1

        monkeypatch.setattr(fs, "_call_s3", counted)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return all(torch.equal(x, y) for x, y in pairs)


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_save_list_restore_retention_and_history(
    s3: S3Endpoint, url: str, async_save: bool
) -> None:
    losses = [0.9, 0.3, 0.5, 0.6, 0.7]
    models = [_model(i) for i in range(len(losses))]
    opts = s3.storage_options
    with Checkpointer(
        url, monitor="loss", keep_best=1, keep_last=2, async_save=async_save, storage_options=opts
    ) as ckpt:
        for step, (loss, model) in enumerate(zip(losses, models, strict=True)):
            ckpt.save(step, {"model": model}, {"loss": loss})
        assert [i.step for i in ckpt.list()] == [1, 3, 4]
    storage = FsspecStorage(url, opts)
    assert [n for n in storage.listdir() if n.startswith("step-")] == [
        "step-000000001",
        "step-000000003",
        "step-000000004",
    ]
    assert [r["step"] for r in read_history(storage)] == [0, 1, 2, 3, 4]
    reader = Checkpointer(url, monitor="loss", read_only=True, storage_options=opts)
    for which, step in [("latest", 4), ("best", 1), (3, 3)]:
        target = _model(99)
        info = reader.restore({"model": target}, which)
        assert info is not None and info.step == step
        assert _same(target, models[step])


def test_large_files_upload_in_parallel_parts_and_read_back_in_few_requests(
    url: str, s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = FsspecStorage(
        url, s3.storage_options, part_bytes=5 * MIB, max_concurrency=4, read_block_bytes=64 * MIB
    )
    calls = Calls(storage.fs, monkeypatch)
    tensors = {"a": torch.randn(3 * MIB), "b": torch.arange(MIB, dtype=torch.int64)}  # 20 MiB
    records = write_tensor_file(storage, "step-000000001/tensors.safetensors", tensors)
    assert calls.methods["upload_part"] == 5  # 20 MiB and a header, in 5 MiB parts
    assert calls.max_in_flight == 4  # the most allowed at once: parallel, not one by one
    assert calls.methods["complete_multipart_upload"] == 1
    calls.methods.clear()
    back = read_tensors(storage, records)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert calls.methods["get_object"] == 1  # the whole file in one ranged read


def test_a_small_file_is_one_put(url: str, s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FsspecStorage(url, s3.storage_options)
    calls = Calls(storage.fs, monkeypatch)
    with storage.open_write("small") as f:
        f.write(b"x" * 1000)
    assert dict(calls.methods) == {"put_object": 1}
    assert storage.read_bytes("small") == b"x" * 1000


def test_an_exception_mid_upload_leaves_no_object_and_no_upload(url: str, s3: S3Endpoint) -> None:
    storage = FsspecStorage(url, s3.storage_options, part_bytes=5 * MIB)
    with pytest.raises(RuntimeError, match="boom"), storage.open_write("big") as f:
        f.write(os.urandom(12 * MIB))  # two parts are uploaded by now
        raise RuntimeError("boom")
    assert not storage.exists("big") and storage.listdir() == []
    bucket, prefix = url[len("s3://") :].split("/", 1)
    uploads = storage.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
    assert uploads.get("Uploads", []) == []  # aborted, not left to linger


def test_retention_deletes_in_one_batched_request(
    url: str, s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Checkpointer(url, keep_last=3, async_save=False, storage_options=s3.storage_options) as c:
        for step in range(3):
            c.save(step, {"x": torch.zeros(4)})
        calls = Calls(c._storage.fs, monkeypatch)  # type: ignore[attr-defined]
        c._run.remove(c._run.committed()[:2], [c._run.committed()[2].manifest])  # type: ignore
        # manifests first (one request uncommits both), then their data files (one request)
        assert calls.methods["delete_objects"] == 2 and calls.methods["delete_object"] == 0
        assert [i.step for i in c.list()] == [2]
        assert [n for n in c._storage.listdir() if n.startswith("step-")] == ["step-000000002"]


def test_listing_and_checks_are_never_served_from_a_stale_cache(url: str, s3: S3Endpoint) -> None:
    storage = FsspecStorage(url, s3.storage_options)
    assert storage.listdir() == [] and not storage.exists("step-000000001/manifest.json")
    other = FsspecStorage(url, {**s3.storage_options, "skip_instance_cache": True})
    other.publish("step-000000001/manifest.json", b"{}")  # another writer, another cache
    assert storage.exists("step-000000001/manifest.json")
    assert storage.isdir("step-000000001")
    assert storage.size("step-000000001/manifest.json") == 2
    other.remove("step-000000001/manifest.json")
    assert not storage.exists("step-000000001/manifest.json")


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(
    url: str, s3: S3Endpoint
) -> None:
    with Checkpointer(url, storage_options=s3.storage_options):
        with pytest.raises(LockedError, match=f"process {os.getpid()}"):
            Checkpointer(url, storage_options=s3.storage_options)
        Checkpointer(url, read_only=True, storage_options=s3.storage_options).list()
    Checkpointer(url, storage_options=s3.storage_options).close()  # released on close


_KILLED_WRITER = """
import sys, time, torch
from haltpoint import Checkpointer
from haltpoint.store import object_store

close = object_store.MultipartWriter.close

def hang(self):  # every part is uploaded; the kill comes before the upload completes
    if self._upload_id is None:  # a small file: one PutObject
        return close(self)
    print("uploading", flush=True)
    time.sleep(600)

object_store.MultipartWriter.close = hang
url, opts = sys.argv[1], __import__("json").loads(sys.argv[2])
ckpt = Checkpointer(url, async_save=False, storage_options=opts)
torch.manual_seed(0)
ckpt.save(0, {"w": torch.randn(1000)})
print("saved", flush=True)
ckpt.save(1, {"w": torch.randn(10 * 2**20)})  # 40 MiB: two 32 MiB parts
"""


def test_a_writer_killed_mid_upload_leaves_nothing_committed(url: str, s3: S3Endpoint) -> None:
    opts = s3.storage_options
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_KILLED_WRITER), url, json.dumps(opts)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "saved\n"
        assert child.stdout.readline() == "uploading\n"
        with pytest.raises(LockedError, match=f"process {child.pid}"):  # alive: refused
            Checkpointer(url, storage_options=opts)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    reader = Checkpointer(url, read_only=True, storage_options=opts)
    assert [i.step for i in reader.list()] == [0]
    storage = FsspecStorage(url, opts)
    assert [n for n in storage.listdir() if n.startswith("step-")] == ["step-000000000"]
    bucket, prefix = url[len("s3://") :].split("/", 1)
    uploads = storage.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
    assert len(uploads["Uploads"]) == 1  # invisible; a lifecycle rule reclaims its parts
    state = {"w": torch.zeros(1000)}
    reader.restore(state)
    torch.manual_seed(0)
    assert torch.equal(state["w"], torch.randn(1000))
    with pytest.warns(UserWarning, match="taking over the writer lock"):
        ckpt = Checkpointer(url, keep_last=2, async_save=False, storage_options=opts)
    with ckpt:
        ckpt.save(1, {"w": torch.ones(3)})
        assert [i.step for i in ckpt.list()] == [0, 1]


def test_the_command_line_reads_a_run_on_s3_with_endpoint_from_the_environment(
    url: str, s3: S3Endpoint
) -> None:
    with Checkpointer(url, monitor="loss", storage_options=s3.storage_options) as ckpt:
        ckpt.save(7, {"model": _model(0)}, {"loss": 0.25})
    env = {**os.environ, **s3.env}
    for command, status in ((["ls", url], "committed"), (["verify", url], "intact")):
        done = subprocess.run(
            [sys.executable, "-m", "haltpoint", *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[1].split()[:1] == ["7"]
        assert status in done.stdout  # ls reads manifests only; verify reads the data


def test_a_writer_quarantines_a_damaged_newest_checkpoint_on_s3(s3: S3Endpoint, url: str) -> None:
    """The manifest is copied, read back, then deleted: the step is saved again, the data stays."""
    opts = s3.storage_options
    settings: dict[str, Any] = {"keep_last": 2, "capture_rng": False, "storage_options": opts}
    with Checkpointer(url, **settings) as ckpt:
        for step in (14, 15):
            ckpt.save(step, {"model": _model(step)})
    storage = FsspecStorage(url, opts)
    tensors = "step-000000015/tensors.safetensors"
    data = bytearray(storage.read_bytes(tensors))
    data[-3] ^= 0x10
    storage.publish(tensors, bytes(data))
    with pytest.warns(UserWarning, match="step 15 aside"), Checkpointer(url, **settings) as ckpt:
        target = _model(99)
        assert ckpt.restore({"model": target}).step == 14 and _same(target, _model(14))
        ckpt.save(15, {"model": _model(15)})
    assert storage.listdir("quarantine") == ["step-000000015-1.json"]
    assert storage.read_bytes(tensors) == bytes(data)
    assert "tensors-1.safetensors" in storage.listdir("step-000000015")
