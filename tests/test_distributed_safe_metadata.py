"""A crafted sharded checkpoint runs no code: DCP's pickles are checked before DCP reads them.

Everything here runs in one process (DCP saves and loads without a process group).
"""

from __future__ import annotations

import io
import json
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

from haltpoint import Checkpointer, CorruptCheckpointError, ShardedState
from haltpoint.cli import main
from haltpoint.store.run_dir import SHARDED_KEY, ShardFile
from haltpoint.store.storage import open_storage

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


class Payload:
    """Unpickling it creates `marker`: the proof that a pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def _sharded_run(run_dir: Path, steps: tuple[int, ...]) -> ShardedState:
    """A run whose checkpoints hold `train` (a model and its AdamW) as DCP state, as
    `Checkpointer.save` writes it under a process group."""
    from haltpoint.distributed.sharded import write_shards

    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.25)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    train = ShardedState(model, optimizer)
    with Checkpointer(run_dir, keep_last=len(steps), async_save=False, capture_rng=False) as ckpt:
        for step in steps:
            folder = f"step-{step:09d}/dcp"
            storage = open_storage(run_dir)
            files = write_shards(storage, folder, {"train": train.state_dict()}, rank=0)
            record = {"world_size": 1, "entries": ["train"], "files": files}
            ckpt._save(step, {"epoch": step}, None, False, lambda r=record: {SHARDED_KEY: r})
    return train


def _replace(run_dir: Path, step: int, name: str, data: bytes) -> None:
    """Write `data` as DCP file `name` of `step`, with a manifest whose records match it
    (and whose own checksum is valid: xxh3 is no signature)."""
    from haltpoint.store.hashing import StreamHasher
    from haltpoint.store.run_dir import RunDirectory

    dirname = f"step-{step:09d}"
    (run_dir / dirname / "dcp" / name).write_bytes(data)
    run = RunDirectory(open_storage(run_dir))
    manifest = run.read_manifest(dirname)
    hasher = StreamHasher()
    hasher.update(data)
    record = {"size": len(data), "xxh3_128": hasher.hexdigest()}
    manifest.extra[SHARDED_KEY]["files"][name] = record
    run.storage.publish(f"{dirname}/manifest.json", manifest.encode())  # rewritten


def _records(files: dict[str, dict[str, Any]]) -> dict[str, ShardFile]:
    return {name: ShardFile(r["size"], r["xxh3_128"]) for name, r in files.items()}


def _fresh() -> dict[str, Any]:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    return {"train": ShardedState(model, torch.optim.AdamW(model.parameters()))}


def test_real_dcp_metadata_passes_and_restores_into_an_unsharded_model(tmp_path: Path) -> None:
    from haltpoint.distributed.safe_metadata import check_metadata

    saved = _sharded_run(tmp_path, (1,))
    with open(tmp_path / "step-000000001" / "dcp" / ".metadata", "rb") as f:
        metadata = check_metadata(f, "m")
    assert "train.model.0.weight" in metadata.state_dict_metadata
    state = _fresh()
    with Checkpointer(tmp_path, read_only=True) as reader:
        assert reader.restore(state) is not None
    restored = state["train"]
    for name, value in saved.model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[name], value), name
    assert restored.optimizers[0].param_groups[0]["lr"] == 0.25  # a non-tensor DCP value


def test_hostile_metadata_runs_nothing_and_restore_falls_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, marker = tmp_path / "run", tmp_path / "MARKER"
    _sharded_run(run_dir, (1, 2))
    _replace(run_dir, 2, ".metadata", pickle.dumps(Payload(marker)))
    with Checkpointer(run_dir, read_only=True) as reader:
        with pytest.raises(CorruptCheckpointError, match=r"\.metadata .*refused global io\.open"):
            reader.restore(_fresh(), 2)
        with pytest.warns(UserWarning, match="falling back to the checkpoint of step 1"):
            info = reader.restore(_fresh())
    assert info is not None and info.step == 1
    assert main(["verify", str(run_dir), "--json"]) == 1
    report = {c["step"]: c for c in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert report[1]["status"] == "intact" and report[2]["status"] == "damaged"
    assert "refused global io.open" in report[2]["error"]
    assert not marker.exists()


def test_metadata_that_is_no_dcp_metadata_is_refused(tmp_path: Path) -> None:
    from haltpoint.distributed.safe_metadata import check_metadata

    with pytest.raises(CorruptCheckpointError, match=r"^m holds a dict, not DCP metadata"):
        check_metadata(io.BytesIO(pickle.dumps({"a": 1})), "m")
    with pytest.raises(CorruptCheckpointError, match=r"^m is not DCP metadata .*: "):
        check_metadata(io.BytesIO(b"\x80\x05trunc"), "m")


def test_a_hostile_non_tensor_value_runs_nothing(tmp_path: Path) -> None:
    """DCP reads non-tensor values with `torch.load(weights_only=False)`; haltpoint first
    reads them with `weights_only=True`."""
    from haltpoint.distributed.sharded import plan_shards, write_shards

    marker = tmp_path / "MARKER"
    model = _model()
    train = ShardedState(model, torch.optim.AdamW(model.parameters()))
    state = train.state_dict()
    state["optim"]["param_groups"][0]["lr"] = Payload(marker)
    storage = open_storage(tmp_path)
    files = _records(write_shards(storage, "dcp", {"train": state}, rank=0))
    with pytest.raises(CorruptCheckpointError, match=r"'train\.optim\.param_groups\.0\.lr' is not"):
        plan_shards(storage, "dcp", _fresh(), files)()
    assert not marker.exists()


def _shared(depth: int) -> list[Any]:
    nested: list[Any] = []
    for _ in range(depth):
        nested = [nested, nested]
    return nested


def _cyclic() -> list[Any]:
    loop: list[Any] = [1.0]
    loop.append(loop)
    return loop


@pytest.mark.parametrize("value", [_shared(60), _cyclic()], ids=["2**60-values", "cycle"])
def test_a_non_tensor_value_that_expands_without_end_is_refused_at_once(value: Any) -> None:
    """`weights_only=True` builds shared references as the pickle says: 1.6 KB stood for 2**60
    values (or a list held itself), and the optimizer's load (a deep copy), or any walk, then
    never ended. (DCP's own save walks the value, so the bytes are handed to the planner.)"""
    from types import SimpleNamespace

    from haltpoint.distributed.safe_metadata import SafeLoadPlanner

    data = io.BytesIO()
    torch.save(value, data)
    item = SimpleNamespace(dest_index=SimpleNamespace(fqn="train.optim.param_groups.0.lr"))
    with pytest.raises(
        CorruptCheckpointError,
        match=r"'train\.optim\.param_groups\.0\.lr' "
        r"shares its containers so that it stands for more than 10,000,000",
    ):
        SafeLoadPlanner().load_bytes(item, io.BytesIO(data.getvalue()))  # type: ignore[arg-type]


def test_a_non_tensor_value_that_shares_a_small_part_loads() -> None:
    from haltpoint.distributed.safe_metadata import expanded_size

    betas = (0.9, 0.999)  # what optimizers share across their param groups
    assert expanded_size([{"betas": betas}, {"betas": betas}], 11) == 11


def test_dcp_failures_are_one_corrupt_checkpoint_error(tmp_path: Path) -> None:
    from haltpoint.distributed.sharded import plan_shards, write_shards

    storage = open_storage(tmp_path)
    files = _records(write_shards(storage, "dcp", {"x": torch.zeros(3)}, rank=0))
    for name in (tmp_path / "dcp").glob("__0_*"):
        name.write_bytes(b"short")
    with pytest.raises(CorruptCheckpointError, match="DCP failed to load on rank 0: ") as error:
        plan_shards(storage, "dcp", {"x": torch.zeros(3)}, files)()
    assert "\n" not in str(error.value)


# -- the unpickler sets only the fields of DCP's own objects ------------------------------------


# BUILD on the class itself: with slot state, the C unpickler setattr()s it
POISON_CLASS = b"ctorch.distributed.checkpoint.metadata\nMetadata\n(N}S'poisoned'\nI1\nstb."
POISON_FUNCTION = b"ctorch.serialization\n_get_layout\n(N}S'poisoned'\nI1\nstb."
# an instance, but a field Metadata does not have
UNKNOWN_FIELD = b"\x80\x02ctorch.distributed.checkpoint.metadata\nMetadata\n)\x81}S'evil'\nI1\nsb."
PROPERTIES = b"\x80\x02ctorch.distributed.checkpoint.metadata\nTensorProperties\n)\x81I1\nb."


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (POISON_CLASS, "refused to set attributes on a type"),
        (POISON_FUNCTION, "refused to set attributes on a function"),
        (UNKNOWN_FIELD, r"refused state \{'evil': 1\} for Metadata"),
        (PROPERTIES, "refused state 1 for TensorProperties"),
    ],
)
def test_build_sets_only_the_fields_of_dcp_objects(data: bytes, message: str) -> None:
    from torch.distributed.checkpoint.metadata import Metadata
    from torch.serialization import _get_layout

    from haltpoint.distributed.safe_metadata import check_metadata

    with pytest.raises(CorruptCheckpointError, match=message):
        check_metadata(io.BytesIO(data), "m")
    assert not hasattr(Metadata, "poisoned") and not hasattr(_get_layout, "poisoned")


COLLIDING = [k * (2**61 - 1) + 7 for k in range(1, 4001)]  # ints of one hash on every run


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (dict.fromkeys(COLLIDING), "more than 16 keys that share one hash"),
        (OrderedDict.fromkeys(COLLIDING), "more than 16 keys that share one hash"),
        ({1, 2}, "refused a set"),
        (frozenset({1}), "refused a set"),
    ],
    ids=["dict", "OrderedDict", "set", "frozenset"],
)
def test_a_metadata_pickle_crafted_to_take_quadratic_time_is_refused_at_once(
    value: Any, message: str
) -> None:
    """Keys that share a hash make building a dict quadratic: 8,000 took a third of a
    second, so the 100,000 of a 1.3 MB `.metadata` take about a minute and a 13 MB one most
    of a day, for every reader of the run."""
    from haltpoint.distributed.safe_metadata import check_metadata

    data = pickle.dumps(value, protocol=4)
    with pytest.raises(CorruptCheckpointError, match=message):
        check_metadata(io.BytesIO(data), "m")


def test_a_metadata_pickle_builds_an_ordered_dict_only_as_pickle_writes_one() -> None:
    """OrderedDict([...]) from a list of pairs would insert them in C, unchecked."""
    from haltpoint.distributed.safe_metadata import check_metadata

    from_pairs = b"\x80\x02ccollections\nOrderedDict\n](X\x01\x00\x00\x00aK\x01\x86e\x85R."
    assert pickle.loads(from_pairs) == OrderedDict(a=1)
    with pytest.raises(CorruptCheckpointError, match="refused OrderedDict built from arg"):
        check_metadata(io.BytesIO(from_pairs), "m")


def test_a_global_of_torch_that_is_no_dtype_is_refused_without_importing_it() -> None:
    """`getattr(torch, name)` imports torch's lazy submodules (`torch._dynamo`, `torch.onnx`)
    by name: a crafted `.metadata` would make every reader import them. In a fresh process,
    where nothing imported them before."""
    import subprocess
    import sys

    script = (
        "import io, sys\n"
        "from haltpoint.distributed.safe_metadata import check_metadata\n"
        "for name in ('_dynamo', 'onnx', '_inductor'):\n"
        "    try:\n"
        "        check_metadata(io.BytesIO(b'ctorch\\n' + name.encode() + b'\\n.'), 'm')\n"
        "    except Exception as e:\n"
        "        print(type(e).__name__, 'refused global torch.' + name in str(e))\n"
        "print(sorted(m for m in ('torch._dynamo', 'torch.onnx', 'torch._inductor')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert out.splitlines() == ["CorruptCheckpointError True"] * 3 + ["[]"], out


def test_the_c_unpickler_would_have_poisoned_the_class() -> None:
    """Why the unpickler is pure Python: the C one lets a pickle setattr on a class."""
    from torch.distributed.checkpoint.metadata import Metadata

    class Allowing(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            assert (module, name) == ("torch.distributed.checkpoint.metadata", "Metadata")
            return super().find_class(module, name)

    try:
        assert Allowing(io.BytesIO(POISON_CLASS)).load() is Metadata
        assert Metadata.poisoned == 1  # type: ignore[attr-defined]
    finally:
        if hasattr(Metadata, "poisoned"):
            delattr(Metadata, "poisoned")


# -- storage records point only into files the manifest hashed ---------------------------------


def _redirect(run_dir: Path, step: int, change: Any) -> None:
    """Rewrite `step`'s `.metadata` with `change` applied to its storage records, with a
    manifest whose records match the new file."""
    from haltpoint.distributed.safe_metadata import check_metadata

    path = run_dir / f"step-{step:09d}" / "dcp" / ".metadata"
    with open(path, "rb") as f:
        metadata = check_metadata(f, "m")
    for info in metadata.storage_data.values():
        change(info)
    _replace(run_dir, step, ".metadata", pickle.dumps(metadata))


@pytest.mark.parametrize(
    ("change", "target"),
    [
        (lambda info: setattr(info, "relative_path", "../manifest.json"), "'../manifest.json'"),
        (lambda info: setattr(info, "relative_path", ".metadata"), "'.metadata'"),
        (lambda info: setattr(info, "relative_path", "__7_0.distcp"), "'__7_0.distcp'"),
        (lambda info: setattr(info, "offset", info.offset + 10**9), r".* bytes \d+\+\d+"),
        (lambda info: setattr(info, "length", -5), r".* bytes \d+\+-5"),
    ],
    ids=["outside-dcp", "the-metadata", "unhashed-file", "past-the-end", "negative-length"],
)
def test_storage_records_outside_the_hashed_files_are_refused(
    tmp_path: Path, change: Any, target: str
) -> None:
    run_dir = tmp_path / "run"
    _sharded_run(run_dir, (1, 2))
    _redirect(run_dir, 2, change)
    with Checkpointer(run_dir, read_only=True) as reader:
        with pytest.raises(CorruptCheckpointError, match=f"points at {target}.*manifest hashed"):
            reader.restore(_fresh(), 2)
        with pytest.warns(UserWarning, match="falling back to the checkpoint of step 1"):
            info = reader.restore(_fresh())
    assert info is not None and info.step == 1


# -- DCP reads only the metadata haltpoint checked ----------------------------------------------


def test_dcp_never_unpickles_the_metadata_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DCP's reader gets the metadata `check_metadata` read: a file swapped after the check
    is never unpickled by DCP's `pickle.load`."""
    import torch.distributed.checkpoint.filesystem as dcp_filesystem

    saved = _sharded_run(tmp_path, (1,))

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("DCP unpickled .metadata itself")

    monkeypatch.setattr(dcp_filesystem.pickle, "load", refuse)
    state = _fresh()
    with Checkpointer(tmp_path, read_only=True) as reader:
        assert reader.restore(state) is not None
    weight = saved.model.state_dict()["0.weight"]
    assert torch.equal(state["train"].model.state_dict()["0.weight"], weight)


def test_rank_local_metadata_is_refused(tmp_path: Path) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    from haltpoint.distributed.safe_metadata import safe_reader

    def never() -> Any:
        raise AssertionError("read")

    reader = safe_reader(FileSystemReader(str(tmp_path)), never)
    (tmp_path / "__0.metadata").write_bytes(pickle.dumps(Payload(tmp_path / "MARKER")))
    with pytest.raises(CorruptCheckpointError, match=r"refused to read rank-local .*__0\.metadata"):
        reader.read_metadata(rank=0)
    assert not (tmp_path / "MARKER").exists()
