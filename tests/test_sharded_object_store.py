"""Sharded state (FSDP2 / DTensor) on object storage: DCP's fsspec writer and reader under
haltpoint's manifest, against S3 (moto's server on loopback) and a local directory.

A gloo process group of one rank runs in this process, so FSDP2 makes real DTensors.
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

from haltpoint import Checkpointer, CorruptCheckpointError, ShardedState

sys.path.insert(0, str(Path(__file__).parent))
from s3_server import S3Endpoint, moto_s3

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def one_rank_fsdp(tmp_path: Path) -> Iterator[None]:
    """A gloo process group of one rank in this process, so FSDP2 makes DTensors."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _sharded_model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def _full(state: ShardedState) -> dict[str, torch.Tensor]:
    def flat(prefix: str, value: Any) -> dict[str, torch.Tensor]:
        if isinstance(value, dict):
            return {
                k: v for n, item in value.items() for k, v in flat(f"{prefix}.{n}", item).items()
            }
        if isinstance(value, torch.Tensor):
            local = value.full_tensor() if hasattr(value, "full_tensor") else value
            return {prefix: local.detach().clone()}
        return {prefix: torch.as_tensor(value)} if isinstance(value, (int, float)) else {}

    return flat("", state.state_dict())


@pytest.mark.parametrize("where", ["s3", "local"])
def test_sharded_state_saves_to_and_restores_from_object_storage(
    one_rank_fsdp: None, s3: S3Endpoint, tmp_path: Path, where: str
) -> None:
    """DCP's fsspec writer behind a URL: hashed under the manifest, restored exactly, and
    retention deletes the dropped checkpoint's shards on the object store too."""
    url = s3.url(f"sharded-{uuid.uuid4().hex[:8]}") if where == "s3" else str(tmp_path / "run")
    options = s3.storage_options if where == "s3" else None
    model, optimizer = _sharded_model(0)
    saved = {}
    with Checkpointer(url, storage_options=options, async_save=False, keep_last=1) as ckpt:
        for step in range(2):
            model(torch.randn(3, 4)).sum().backward()
            optimizer.step()
            ckpt.save(step, {"train": ShardedState(model, optimizer), "epoch": step})
            saved = _full(ShardedState(model, optimizer))
        storage = ckpt._run.storage
        assert not storage.exists("step-000000000")  # retention removed the old shards too
        files = storage.listdir("step-000000001/dcp")
        assert ".metadata" in files and "__0_0.distcp" in files
    other, other_optimizer = _sharded_model(1)
    state: dict[str, Any] = {"train": ShardedState(other, other_optimizer), "epoch": None}
    reader = Checkpointer(url, storage_options=options, read_only=True)
    assert reader.restore(state).step == 1  # type: ignore[union-attr]
    restored = _full(state["train"])
    assert state["epoch"] == 1 and restored.keys() == saved.keys()
    assert all(torch.equal(restored[k], saved[k]) for k in saved)


def test_a_damaged_shard_on_object_storage_is_found_before_loading(
    one_rank_fsdp: None, s3: S3Endpoint
) -> None:
    url = s3.url(f"sharded-{uuid.uuid4().hex[:8]}")
    model, optimizer = _sharded_model(0)
    with Checkpointer(url, storage_options=s3.storage_options, async_save=False) as ckpt:
        ckpt.save(0, {"train": ShardedState(model, optimizer)})
        storage = ckpt._run.storage
        rel = "step-000000000/dcp/__0_0.distcp"
        data = bytearray(storage.read_bytes(rel))
        data[len(data) // 2] ^= 0xFF
        with storage.open_write(rel) as f:
            f.write(bytes(data))
        with pytest.raises(CorruptCheckpointError, match=r"__0_0.distcp: xxh3-128 .* differs"):
            ckpt.restore({"train": ShardedState(*_sharded_model(1))}, 0)
