"""Errors of S3's client library, at every entry point: one `CheckpointError` line, and
nothing deleted or moved.

botocore raises its own exceptions for what is no reply of the store (no credentials, an
endpoint that cannot be reached, a timeout) and s3fs passes them on as they are;
`FsspecStorage` turns them into the OS errors that say nothing of the bytes (`not_damage`).
A real s3fs meets them here: a closed port on 127.0.0.1, credentials removed, credentials
moto's server refuses; `Faults` raises the rest (an expired token, a skewed clock, a read
timeout) for the requests it picks, behind s3fs's own retries and translation.
"""

from __future__ import annotations

import re
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

from botocore import exceptions as boto

from haltpoint import (
    Checkpointer,
    CheckpointError,
    UnreadableCheckpointError,
    UnwritableRunError,
    load_best,
)
from haltpoint.errors import not_damage
from haltpoint.store.storage import FsspecStorage

sys.path.insert(0, str(Path(__file__).parent))
from ports import free_port
from s3_server import S3Endpoint, moto_s3
from test_object_store_edges import Faults

FAST = {"connect_timeout": 0.2, "read_timeout": 0.5, "retries": {"max_attempts": 1}}
"""botocore's own retries and timeouts, kept short."""


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture(autouse=True)
def _few_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # s3fs's retries, kept short


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 2)


@pytest.fixture
def run(s3: S3Endpoint) -> str:
    """A run of three checkpoints (step 1 the best by loss), step 2 pinned."""
    url = s3.url(f"errors-{uuid.uuid4().hex[:8]}")
    with Checkpointer(
        url, storage_options=s3.storage_options, async_save=False, capture_rng=False, keep_last=9
    ) as ckpt:
        for step, loss in enumerate([3.0, 1.0, 2.0]):
            ckpt.save(step, {"model": _model(step)}, metrics={"loss": loss})
    return url


def _keys(s3: S3Endpoint, url: str) -> dict[str, str]:
    """Every object of the run and its ETag, as the store holds them."""
    storage = FsspecStorage(url, s3.storage_options, create=False)
    found = storage.fs.find(storage.root, detail=True, refresh=True)
    return {path: str(info.get("ETag")) for path, info in found.items()}


def _cli(conf: dict[str, Any], *args: str) -> int:
    import fsspec.config

    from haltpoint.cli import main

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(fsspec.config.conf, "s3", conf)
        return main(list(args))


ENTRY_POINTS: dict[str, Callable[[str, dict[str, Any]], object]] = {
    "restore-latest": lambda url, o: Checkpointer(url, read_only=True, storage_options=o).restore(
        {"model": _model(9)}
    ),
    "restore-best": lambda url, o: Checkpointer(
        url, read_only=True, storage_options=o, monitor="loss"
    ).restore({"model": _model(9)}, which="best"),
    "restore-step": lambda url, o: Checkpointer(url, read_only=True, storage_options=o).restore(
        {"model": _model(9)}, which=1
    ),
    "list": lambda url, o: Checkpointer(url, read_only=True, storage_options=o).list(),
    "load_best": lambda url, o: load_best(url, _model(9), monitor="loss", storage_options=o),
    "writer": lambda url, o: Checkpointer(url, storage_options=o, async_save=False),
}
COMMANDS = {
    "ls": ["ls"],
    "verify": ["verify"],
    "gc": ["gc", "--keep-last", "1"],
    "export": ["export", "-o", "OUT"],
}


def _check_every_entry_point(
    s3: S3Endpoint,
    url: str,
    options: dict[str, Any],
    conf: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    reason: str,
    snapshot: Callable[[], dict[str, str]] | None = None,
) -> None:
    """Each entry point raises one `CheckpointError` line matching `reason` (the command
    line exits 1 with one error line), and the run's objects are all there, unchanged."""
    snapshot = snapshot or (lambda: _keys(s3, url))
    before = snapshot()
    for name, call in ENTRY_POINTS.items():
        with pytest.raises(CheckpointError, match=reason) as failed:
            call(url, options)
        kind = UnwritableRunError if name == "writer" else UnreadableCheckpointError
        assert isinstance(failed.value, kind), (name, failed.value)
        assert "\n" not in str(failed.value), name
    for name, args in COMMANDS.items():
        capsys.readouterr()
        args = [str(tmp_path / "out.safetensors") if a == "OUT" else a for a in args]
        assert _cli(conf, *args[:1], url, *args[1:]) == 1, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("haltpoint: error:"), (name, err)
        assert re.search(reason, err[0]), err
    assert snapshot() == before


def test_a_store_that_cannot_be_reached_is_one_line_at_every_entry_point(
    s3: S3Endpoint, run: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The endpoint is a closed port: botocore's `EndpointConnectionError` at the first
    request. Every entry point says so in one `CheckpointError` line. Before: the writer,
    `list`, `restore` and `load_best` raised `botocore.exceptions.EndpointConnectionError`
    (`haltpoint ls` turned it into a line)."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    options = {
        **s3.storage_options,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "config_kwargs": FAST,
    }
    conf = {"endpoint_url": endpoint, "key": "testing", "secret": "testing", "config_kwargs": FAST}
    reason = "Could not connect to the endpoint URL"
    _check_every_entry_point(s3, run, options, conf, capsys, tmp_path, reason)


def test_no_credentials_is_one_line_at_every_entry_point(
    s3: S3Endpoint,
    run: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """No credentials anywhere (no key, no environment, no profile, no instance metadata):
    botocore's `NoCredentialsError` at the first request is one line at every entry point.
    Before: it escaped the library as `botocore.exceptions.NoCredentialsError`."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    client = {"endpoint_url": s3.endpoint_url, "region_name": "us-east-1"}
    options = {"client_kwargs": client, "config_kwargs": FAST, "skip_instance_cache": True}
    conf = {"endpoint_url": s3.endpoint_url, "config_kwargs": FAST, "skip_instance_cache": True}
    _check_every_entry_point(
        s3, run, options, conf, capsys, tmp_path, "no usable credentials for the store"
    )


def test_credentials_the_store_refuses_are_one_line_at_every_entry_point(
    s3: S3Endpoint,
    run: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """moto's server checks credentials (as S3 does): a key it does not know is refused
    (`InvalidAccessKeyId`, 403) at every entry point with one line, nothing removed."""
    from moto import settings

    def snapshot() -> dict[str, str]:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))
            return _keys(s3, run)

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    client = {"endpoint_url": s3.endpoint_url, "region_name": "us-east-1"}
    options = {"key": "nobody", "secret": "wrong", "client_kwargs": client, "config_kwargs": FAST}
    conf = {**options, "endpoint_url": s3.endpoint_url}
    reason = "Access Key Id you provided does not exist"
    _check_every_entry_point(s3, run, options, conf, capsys, tmp_path, reason, snapshot)


RAISED: dict[str, str | Callable[[], Exception]] = {
    "ExpiredToken": "ExpiredToken",
    "RequestTimeTooSkewed": "RequestTimeTooSkewed",
    "unknown-code": "TokenRefreshRequired",
    "NoCredentialsError": boto.NoCredentialsError,
    "CredentialRetrievalError": lambda: boto.CredentialRetrievalError(
        provider="sso", error_msg="x"
    ),
    "EndpointConnectionError": lambda: boto.EndpointConnectionError(endpoint_url="http://s3"),
    "ConnectTimeoutError": lambda: boto.ConnectTimeoutError(endpoint_url="http://s3"),
    "ReadTimeoutError": lambda: boto.ReadTimeoutError(endpoint_url="http://s3"),
}


@pytest.mark.parametrize("raised", RAISED.values(), ids=RAISED.keys())
def test_an_error_of_the_client_mid_way_is_one_line_and_moves_nothing(
    s3: S3Endpoint, run: str, monkeypatch: pytest.MonkeyPatch, raised: Any
) -> None:
    """The listing works; then reading a checkpoint's objects, uploading a save's and
    deleting retention's dropped ones fails with an error of the client (a reply s3fs
    translates, or a botocore exception it passes on). A writer's `restore` says the
    checkpoint cannot be read (one line) and quarantines nothing; a `save` fails with that
    OS error (as on a local disk) and commits nothing; retention removes nothing. Before:
    the botocore exceptions escaped as they were, `ConnectTimeoutError` (an `OSError`
    without errno) was taken for damage, and a code s3fs maps to EINVAL (an unknown one)
    made every manifest "unreadable" and `restore` found no checkpoint."""
    options = s3.storage_options
    before = _keys(s3, run)
    ckpt = Checkpointer(run, storage_options=options, async_save=False, keep_last=1)
    faults = Faults(monkeypatch)
    monkeypatch.setattr(__import__("s3fs").S3FileSystem, "retries", 1)
    faults.fail(lambda method, kw: method == "get_object", raised)
    with pytest.raises(UnreadableCheckpointError) as failed:
        ckpt.restore({"model": _model(9)})
    assert "\n" not in str(failed.value)
    faults.clear()
    faults.fail(lambda method, kw: method in ("put_object", "upload_part"), raised)
    with pytest.raises(OSError) as raised_by_save:  # as a local disk's (docs/format.md)
        ckpt.save(3, {"model": _model(3)})
    assert not_damage(raised_by_save.value) and "\n" not in str(raised_by_save.value)
    faults.clear()
    faults.fail(lambda method, kw: method == "delete_objects", raised)
    with pytest.warns(UserWarning, match="retention could not remove"):
        ckpt.save(3, {"model": _model(3)})
    faults.clear()
    ckpt.close()
    after = _keys(s3, run)
    kept = {k: v for k, v in after.items() if k in before and not k.endswith("history.jsonl")}
    assert kept == {k: v for k, v in before.items() if not k.endswith("history.jsonl")}
    assert (
        Checkpointer(run, read_only=True, storage_options=options)
        .restore({"model": _model(9)})
        .step
        == 3
    )
