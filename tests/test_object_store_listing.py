"""Object store listings and objects that change under a reader: S3 (moto's server on
127.0.0.1, through s3fs) and `memory://`.

A listing past 1,000 keys comes back in pages (ListObjectsV2 answers at most 1,000 a
request) and is deleted in batches (DeleteObjects takes at most 1,000 keys); an object may be
replaced by another tool between the manifest read and the tensor read; a listing may lag
(an eventually consistent store, a caching layer): it omits a step just committed, or still
shows one just deleted.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")
pytest.importorskip("boto3")

from haltpoint import Checkpointer
from haltpoint.store.storage import FsspecStorage

sys.path.insert(0, str(Path(__file__).parent))
from s3_server import S3Endpoint, moto_s3

MANIFEST = "manifest.json"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    with moto_s3() as endpoint:
        yield endpoint


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 2)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return all(torch.equal(x, y) for x, y in pairs)


def _reader(url: str, options: dict[str, Any] | None) -> Checkpointer:
    return Checkpointer(url, read_only=True, storage_options=options)


def _steps(url: str, options: dict[str, Any] | None) -> list[int]:
    return [i.step for i in _reader(url, options).list()]


def _writer(url: str, options: dict[str, Any] | None, **settings: Any) -> Checkpointer:
    settings = {"async_save": False, "capture_rng": False, **settings}
    return Checkpointer(url, storage_options=options, **settings)


def _cli(s3: S3Endpoint, *args: str) -> int:
    import fsspec.config

    from haltpoint.cli import main

    conf = {"endpoint_url": s3.endpoint_url, "key": "testing", "secret": "testing"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(fsspec.config.conf, "s3", conf)
        return main(list(args))


def _keys(s3: S3Endpoint, url: str) -> list[str]:
    """Every key under the run, as S3 lists them (paged by boto3, not by haltpoint)."""
    import boto3

    client = boto3.client("s3", **s3.storage_options["client_kwargs"])
    prefix = url.split("/", 3)[3] + "/"
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix):
        keys += [o["Key"][len(prefix) :] for o in page.get("Contents", [])]
    return keys


MANY = 1010  # two ListObjectsV2 pages, and two DeleteObjects requests of at most 1,000 keys


def test_more_than_1000_step_folders_are_listed_and_deleted_whole(
    s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,010 step folders: S3 lists their prefixes in two ListObjectsV2 pages, and deleting
    their 1,010 manifests takes two DeleteObjects requests of at most 1,000 keys. The run's
    listing (what `list()`, `restore`, `ls`, `gc` and retention read) sees every folder, the
    last page's included, and the batched delete removes exactly the keys it is given.
    (Built with one tiny object a folder: a run of real checkpoints that size costs about
    four requests a checkpoint to scan, minutes on moto.)"""
    from test_store_s3 import Calls

    url, options = s3.url(f"many-{uuid.uuid4().hex[:8]}"), s3.storage_options
    storage = FsspecStorage(url, options)
    names = [f"step-{step:09d}/{MANIFEST}" for step in range(MANY)]
    storage.fs.pipe({storage._path(name): b"{}" for name in names})  # concurrent uploads
    storage.publish("history.jsonl", b"")
    assert storage.listdir() == sorted(
        [f"step-{step:09d}" for step in range(MANY)] + ["history.jsonl"]
    )
    calls = Calls(storage.fs, monkeypatch)
    storage.remove_many(names[:-1])
    assert calls.methods["delete_objects"] == 2 and calls.methods["delete_object"] == 0
    assert sorted(_keys(s3, url)) == ["history.jsonl", names[-1]]


def _tensor_file(storage: FsspecStorage, step: int) -> str:
    folder = f"step-{step:09d}"
    names = [n for n in storage.listdir(folder) if n.startswith("tensors")]
    assert len(names) == 1
    return f"{folder}/{names[0]}"


@pytest.mark.parametrize("where", ["s3", "memory"])
@pytest.mark.parametrize("swap", ["same-size", "other-size", "deleted"])
@pytest.mark.parametrize("who", ["reader", "writer"])
def test_a_tensor_object_replaced_after_the_manifest_was_read_is_never_loaded(
    s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch, where: str, swap: str, who: str
) -> None:
    """Another tool overwrites (a new ETag: the same size or another) or deletes step 1's
    tensor object after restore read step 1's manifest and before it reads the tensors
    (injected at the storage's first open of that object). Restore loads none of it: it
    falls back to step 0, with one warning naming the damage; a writer sets step 1 aside
    (quarantine); `haltpoint verify` then reports step 1 damaged (a reader) or the run
    intact (the writer set it aside)."""
    url, options = s3.fresh(where, "listing")
    with _writer(url, options, keep_last=2) as ckpt:
        ckpt.save(0, {"model": _model(0)})
        ckpt.save(1, {"model": _model(1)})
    storage = FsspecStorage(url, options)
    target = _tensor_file(storage, 1)
    real = FsspecStorage.open_read
    swapped: list[str] = []

    def open_read(self: FsspecStorage, rel: str) -> Any:
        if rel == target and not swapped:
            swapped.append(rel)
            data = bytearray(self.read_bytes(rel))
            if swap == "deleted":
                self.remove(rel)
            else:
                data[-4:] = bytes(b ^ 0xFF for b in data[-4:])  # the last tensor's bytes
                self.publish(rel, bytes(data) + (b"\0" * 8 if swap == "other-size" else b""))
        return real(self, rel)

    monkeypatch.setattr(FsspecStorage, "open_read", open_read)
    restored = _model(99)
    ckpt = _reader(url, options) if who == "reader" else _writer(url, options, keep_last=2)
    with pytest.warns(UserWarning) as said:
        info = ckpt.restore({"model": restored})
    ckpt.close()
    assert swapped == [target]
    assert info is not None and info.step == 0 and _same(restored, _model(0))
    lines = [str(w.message) for w in said]
    why = {
        "deleted": "the file is missing",
        "same-size": "do not match the tensor's hash",
        "other-size": "the tensors end at byte",
    }[swap]
    assert any(f"step-000000001/{target.split('/')[1]}" in x and why in x for x in lines), lines
    quarantined = [n for n in storage.listdir() if n == "quarantine"]
    assert bool(quarantined) == (who == "writer")
    monkeypatch.setattr(FsspecStorage, "open_read", real)
    assert _steps(url, options) == ([0, 1] if who == "reader" else [0])
    if where == "s3":
        assert _cli(s3, "verify", url) == (1 if who == "reader" else 0)


class Lag:
    """A lagging listing (an eventually consistent store, a cache in front of it) over
    `FsspecStorage.listdir`: the root listing leaves out the step folders in `hidden`, and
    still shows the folders in `ghosts` (just deleted) with what they held, and `isdir`
    (a listing of the prefix on s3fs) still says they are folders."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.hidden: set[str] = set()
        self.ghosts: dict[str, list[str]] = {}
        real = FsspecStorage.listdir

        def listdir(storage: FsspecStorage, rel: str = "") -> list[str]:
            names = real(storage, rel)
            if rel == "":
                return sorted((set(names) - self.hidden) | set(self.ghosts))
            if rel in self.ghosts:
                return sorted(set(names) | set(self.ghosts[rel]))
            return names

        real_isdir = FsspecStorage.isdir

        def isdir(storage: FsspecStorage, rel: str) -> bool:
            return rel in self.ghosts or real_isdir(storage, rel)  # s3fs lists to tell

        monkeypatch.setattr(FsspecStorage, "listdir", listdir)
        monkeypatch.setattr(FsspecStorage, "isdir", isdir)


def _loss(step: int) -> dict[str, float]:
    return {"loss": {0: 0.5, 1: 0.1, 2: 0.9, 3: 0.8, 4: 0.7, 5: 0.6}[step]}


@pytest.mark.parametrize("where", ["s3", "memory"])
@pytest.mark.parametrize("hide", ["just-committed", "best"])
def test_retention_given_a_listing_that_omits_a_checkpoint_deletes_nothing_a_full_one_keeps(
    s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch, where: str, hide: str
) -> None:
    """keep_last=1 and keep_best=1 (loss, min); step 2 holds step 1's weights (its tensor
    file is step 1's, by dedup). Saving step 3, the listing leaves out step 2 (the one just
    committed) or step 1 (the best). Retention removes nothing a full listing keeps: the
    best (step 1), the newest (step 3), and every file they reference stay, and verify;
    once the listing is whole again the next save removes what the rules drop."""
    url, options = s3.fresh(where, "listing")
    ckpt = _writer(url, options, keep_last=1, keep_best=1, monitor="loss", mode="min")
    ckpt.save(0, {"model": _model(0)}, metrics=_loss(0))
    ckpt.save(1, {"model": _model(1)}, metrics=_loss(1))
    ckpt.save(2, {"model": _model(1)}, metrics=_loss(2))
    assert _steps(url, options) == [1, 2]
    lag = Lag(monkeypatch)
    lag.hidden = {"step-000000002" if hide == "just-committed" else "step-000000001"}
    ckpt.save(3, {"model": _model(3)}, metrics=_loss(3))
    lag.hidden = set()
    full = _steps(url, options)
    assert {1, 3} <= set(full), full  # what a full listing keeps is there
    restored = _model(99)
    best = Checkpointer(url, read_only=True, storage_options=options, monitor="loss", mode="min")
    assert best.restore({"model": restored}, "best").step == 1
    assert _same(restored, _model(1))
    assert _reader(url, options).restore({"model": restored}).step == 3
    ckpt.save(4, {"model": _model(4)}, metrics=_loss(4))
    ckpt.close()
    assert _steps(url, options) == [1, 4]
    if where == "s3":
        assert _cli(s3, "verify", url) == 0


@pytest.mark.parametrize("where", ["s3", "memory"])
@pytest.mark.parametrize("who", ["reader", "writer"])
def test_a_listing_that_still_shows_a_deleted_checkpoint_falls_back_to_the_next(
    s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch, where: str, who: str
) -> None:
    """Step 2 was just removed (by another writer's `gc`), but the listing still shows its
    folder and manifest (`isdir`, a listing on s3fs, too). `restore("latest")` restores
    step 1 and says nothing of step 2; a writer opening the run sets nothing aside because
    of it, and saves on. Before: the manifest's lookup failing while the listing showed it
    was taken for damage: "cannot read .../step-000000002/manifest.json: [Errno 2] The
    specified key does not exist." warned at every scan (3 times for the writer)."""
    url, options = s3.fresh(where, "listing")
    with _writer(url, options, keep_last=3) as ckpt:
        for step in range(3):
            ckpt.save(step, {"model": _model(step)})
    storage = FsspecStorage(url, options)
    held = storage.listdir("step-000000002")
    storage.rmtree("step-000000002")
    lag = Lag(monkeypatch)
    lag.ghosts = {"step-000000002": held}
    restored = _model(99)
    import warnings

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        if who == "reader":
            info = _reader(url, options).restore({"model": restored})
        else:
            ckpt = _writer(url, options, keep_last=3)
            info = ckpt.restore({"model": restored})
            ckpt.save(3, {"model": _model(3)})
            ckpt.close()
    lines = [str(w.message) for w in said]
    assert info is not None and info.step == 1 and _same(restored, _model(1))
    assert not [line for line in lines if "step-000000002" in line], lines
    assert "quarantine" not in storage.listdir()
    lag.ghosts = {}
    assert _steps(url, options) == ([0, 1] if who == "reader" else [0, 1, 3])
