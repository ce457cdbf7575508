"""Object stores at their edges: what S3 (moto's server on 127.0.0.1, through s3fs) and
`memory://` do that a local disk does not, and what a run directory there must survive.

No flock, no rename, keys that are only names (a `[` or `?` in them is no pattern), buckets
that may be missing or shared, requests refused (403), throttled (503) or failing half-way.
Where moto cannot produce the fault, `Faults` makes s3fs's client raise it, so that s3fs's own
retries and error translation still run.
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")
pytest.importorskip("boto3")

from botocore.exceptions import ClientError

from haltpoint import Checkpointer
from haltpoint.store.storage import FsspecStorage

sys.path.insert(0, str(Path(__file__).parent))
from s3_server import S3Endpoint, moto_s3


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    with moto_s3() as endpoint:
        yield endpoint


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 2)


def _steps(url: str, options: dict[str, Any] | None) -> list[int]:
    return [i.step for i in Checkpointer(url, read_only=True, storage_options=options).list()]


def _save(url: str, options: dict[str, Any] | None, steps: range, **settings: Any) -> None:
    settings = {"async_save": False, "capture_rng": False, **settings}
    with Checkpointer(url, storage_options=options, **settings) as ckpt:
        for step in steps:
            ckpt.save(step, {"model": _model(step)})


def _cli(s3: S3Endpoint, *args: str) -> int:
    """`haltpoint ARGS` in this process, reaching moto as the environment would point it
    (fsspec reads `FSSPEC_S3_*` once, at import: its configuration is set instead)."""
    import fsspec.config

    from haltpoint.cli import main

    conf = {"endpoint_url": s3.endpoint_url, "key": "testing", "secret": "testing"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(fsspec.config.conf, "s3", conf)
        return main(list(args))


class Faults:
    """Makes every s3fs client of this process raise S3 errors (a botocore `ClientError`, as
    the server's reply would be) for the requests a rule picks, or answer `DeleteObjects`
    with per-key errors; s3fs retries and translates them as it would a real reply."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import s3fs

        self.rules: list[
            tuple[Callable[[str, dict[str, Any]], bool], str | Callable[[], Exception]]
        ] = []
        self.undeletable: Callable[[str], bool] = lambda key: False
        original = s3fs.S3FileSystem.get_s3

        async def get_s3(fs: Any, bucket: str | None = None) -> Any:
            return _FaultyClient(await original(fs, bucket), self)

        monkeypatch.setattr(s3fs.S3FileSystem, "get_s3", get_s3)
        monkeypatch.setattr(s3fs.S3FileSystem, "retries", 2)  # s3fs's retries, kept short

    def fail(
        self,
        when: Callable[[str, dict[str, Any]], bool],
        code: str | Callable[[], Exception] = "AccessDenied",
    ) -> None:
        """Requests `when(method, kwargs)` picks get the error `code`, or raise what `code()`
        makes (a botocore exception that is no reply: `NoCredentialsError`, a timeout)."""
        self.rules.append((when, code))

    def deny_delete(self, key: Callable[[str], bool]) -> None:
        """`DeleteObjects` keeps the keys `key(k)` picks, each with an AccessDenied error in
        the reply (as S3 answers a bucket policy that denies s3:DeleteObject), and deletes
        the rest."""
        self.undeletable = key

    def clear(self) -> None:
        self.rules.clear()
        self.undeletable = lambda key: False


_STATUS = {"AccessDenied": 403, "SlowDown": 503, "NoSuchBucket": 404, "ExpiredToken": 400}


class _FaultyClient:
    def __init__(self, client: Any, faults: Faults) -> None:
        self._client, self._faults = client, faults

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if not callable(method):
            return method
        faults = self._faults

        async def call(**kwargs: Any) -> Any:
            for when, code in faults.rules:
                if when(name, kwargs):
                    if callable(code):
                        raise code()
                    error = {"Code": code, "Message": f"{code} (injected)"}
                    status = {"HTTPStatusCode": _STATUS.get(code, 500)}
                    raise ClientError({"Error": error, "ResponseMetadata": status}, name)  # type: ignore[arg-type]
            if name == "delete_objects":
                objects = kwargs["Delete"]["Objects"]
                kept = [o for o in objects if faults.undeletable(o["Key"])]
                rest = [o for o in objects if not faults.undeletable(o["Key"])]
                reply = {}
                if rest:
                    reply = await method(
                        **{**kwargs, "Delete": {**kwargs["Delete"], "Objects": rest}}
                    )
                errors = [
                    {"Key": o["Key"], "Code": "AccessDenied", "Message": "Access Denied"}
                    for o in kept
                ]
                return {**reply, "Errors": errors} if errors else reply
            return await method(**kwargs)

        call.__name__ = name
        return call


@contextlib.contextmanager
def _no_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.mark.parametrize("where", ["s3", "memory"])
@pytest.mark.parametrize(
    ("odd", "others"),
    [("exp[12]", ["exp1", "exp2"]), ("exp?", ["expA"]), ("exp*", ["exp-b"])],
    ids=["brackets", "question-mark", "star"],
)
def test_a_run_named_like_a_glob_pattern_never_deletes_another_runs_checkpoints(
    s3: S3Endpoint, where: str, odd: str, others: list[str]
) -> None:
    """A run whose name holds `[`, `?` or `*` (legal in any S3 key) beside runs its name
    matches as a pattern: its retention, its writer's clean-up and `haltpoint gc` delete its
    own dropped checkpoints and nothing of the others'. Before: every delete went through
    fsspec's `rm`, which expands such a path as a glob, so retention of `exp[12]` deleted the
    manifests of `exp1` and `exp2` (both runs lost every checkpoint) and kept its own."""
    base, options = s3.fresh(where, "edges")
    for name in others:
        _save(f"{base}/{name}", options, range(2), keep_last=2)
    odd_url = f"{base}/{odd}"
    _save(odd_url, options, range(3), keep_last=1)
    assert _steps(odd_url, options) == [2]
    storage = FsspecStorage(odd_url, options)
    assert [n for n in storage.listdir() if n.startswith("step-")] == ["step-000000002"]
    for name in others:
        assert _steps(f"{base}/{name}", options) == [0, 1]
    assert _cli(s3, "gc", "--keep-last", "1", f"{base}/{others[0]}") == 0
    assert _steps(f"{base}/{others[0]}", options) == [1]
    assert _steps(odd_url, options) == [2]
    for name in others[1:]:
        assert _steps(f"{base}/{name}", options) == [0, 1]


@pytest.mark.parametrize("where", ["gc", "retention"])
def test_a_delete_the_bucket_refuses_is_reported_not_taken_for_done(
    s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    """A bucket policy denies s3:DeleteObject: S3 answers `DeleteObjects` with 200 and an
    AccessDenied per key. `haltpoint gc` fails with one line naming a key, a writer's
    retention warns that it removed nothing, and every checkpoint stays intact. Before:
    s3fs drops the per-key errors, so gc said "removed 2 checkpoint(s)" of checkpoints all
    still there, and retention warned of nothing (its clean-up then found their manifests
    and said they "could not be read")."""
    url, options = s3.fresh("s3", "edges")
    _save(url, options, range(3), keep_last=3)
    faults = Faults(monkeypatch)
    faults.deny_delete(lambda key: True)
    if where == "gc":
        capsys.readouterr()
        assert _cli(s3, "gc", "--keep-last", "1", url) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and "AccessDenied" in errors[0] and "manifest.json" in errors[0]
    else:
        with pytest.warns(
            UserWarning, match=r"retention could not remove step 0, 1, 2 .*AccessDenied"
        ):
            _save(url, options, range(3, 4), keep_last=1)
    faults.clear()
    expected = [0, 1, 2] if where == "gc" else [0, 1, 2, 3]
    assert _steps(url, options) == expected
    assert _cli(s3, "verify", url) == 0


def test_no_reader_creates_a_bucket_and_no_writer_creates_one_either(s3: S3Endpoint) -> None:
    """A URL naming a bucket that does not exist (a typo): readers (`read_only`, `haltpoint
    ls`) find no checkpoint and create nothing; a writer is refused at open with one
    `UnwritableRunError` line saying the bucket does not exist. Before: every `FsspecStorage`
    began with s3fs's `makedirs`, which creates a missing bucket, so `haltpoint ls` of a
    mistyped bucket made it in the account (here in eu-west-1, where moto allows it; in
    us-east-1 the reader was refused 'cannot write ... location-constraint is not valid')."""
    import boto3

    from haltpoint import UnwritableRunError

    options = {**s3.storage_options, "client_kwargs": {"endpoint_url": s3.endpoint_url}}
    options["client_kwargs"]["region_name"] = "eu-west-1"
    client = boto3.client("s3", **options["client_kwargs"])  # credentials: the environment's
    buckets = sorted(b["Name"] for b in client.list_buckets()["Buckets"])
    url = f"s3://typo-{uuid.uuid4().hex[:8]}/run"
    reader = Checkpointer(url, read_only=True, storage_options=options)
    assert reader.list() == [] and reader.restore({"model": _model(0)}) is None
    assert _cli(s3, "ls", url) in (0, 1)
    with pytest.raises(UnwritableRunError, match=r"the bucket .* does not exist") as refused:
        Checkpointer(url, storage_options=options)
    assert "\n" not in str(refused.value)
    assert sorted(b["Name"] for b in client.list_buckets()["Buckets"]) == buckets


@pytest.mark.parametrize("where", ["s3", "memory"])
def test_two_writers_starting_at_once_never_both_hold_the_run(
    s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Writer B looks at the lock file in the same instant as writer A, before A's lock is
    written (simulated: B's first look finds none). The store refuses B's lock file, since
    A's is there: B gets one `LockedError` line naming A, and A saves on. Before: B wrote its
    lock file over A's and opened (its clean-up at open ran while A was saving), and A's next
    save was the one refused."""
    from haltpoint.errors import LockedError
    from haltpoint.store import lock

    url, options = s3.fresh(where, "edges")
    first = Checkpointer(
        url, keep_last=2, async_save=False, capture_rng=False, storage_options=options
    )
    first.save(0, {"model": _model(0)})
    real = FsspecStorage.read_bytes
    missed: list[str] = []

    def read_bytes(self: FsspecStorage, rel: str, limit: int | None = None) -> bytes:
        if rel == lock.LOCK_NAME and not missed:
            missed.append(rel)
            raise FileNotFoundError(rel)  # A's lock is not there yet when B looks
        return real(self, rel, limit)

    monkeypatch.setattr(FsspecStorage, "read_bytes", read_bytes)
    with pytest.raises(LockedError, match=r"is locked by process \d+ on host") as refused:
        Checkpointer(url, async_save=False, storage_options=options)
    assert missed and "\n" not in str(refused.value)
    monkeypatch.setattr(FsspecStorage, "read_bytes", real)
    first.save(1, {"model": _model(1)})
    first.close()
    assert _steps(url, options) == [0, 1]


@pytest.mark.parametrize("where", ["s3", "memory"])
def test_a_checkpoint_committed_meanwhile_by_another_writer_is_never_written_over(
    s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A save of step 1 looks for step 1's manifest, finds none, and writes its tensors;
    meanwhile another writer of the run (one the lock did not stop: see docs/format.md)
    commits step 1. The commit is refused with `CheckpointExistsError` and the other
    writer's manifest keeps its bytes. Before: the commit was a plain PUT over it, so the
    checkpoint the other writer had committed was replaced."""
    from haltpoint import CheckpointExistsError
    from haltpoint.store import run_dir

    url, options = s3.fresh(where, "edges")
    ckpt = Checkpointer(url, async_save=False, capture_rng=False, storage_options=options)
    ckpt.save(0, {"model": _model(0)})
    storage = FsspecStorage(url, options)
    theirs = storage.read_bytes("step-000000000/manifest.json").replace(
        b'"step":0', b'"step":1'
    )  # a stand-in: only its bytes are compared
    real = run_dir.RunDirectory.new_dirname

    def new_dirname(self: run_dir.RunDirectory, step: int) -> str:
        dirname = real(self, step)
        storage.publish(f"{dirname}/manifest.json", theirs)  # the other writer commits now
        return dirname

    monkeypatch.setattr(run_dir.RunDirectory, "new_dirname", new_dirname)
    with pytest.raises(CheckpointExistsError, match="by another writer"):
        ckpt.save(1, {"model": _model(1)})
    assert storage.read_bytes("step-000000001/manifest.json") == theirs
    ckpt.close()
