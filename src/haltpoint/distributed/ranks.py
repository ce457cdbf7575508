"""The ranks of `torch.distributed`: which process this is, how many there are, who writes.

Everything here is a no-op without an initialized process group of two or more ranks, so
single-process code pays nothing and behaves exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "Replicas",
    "all_gather",
    "all_max",
    "get_rank",
    "get_world_size",
    "initialized",
    "is_distributed",
    "number_buffer",
]


def initialized() -> Any:
    """`torch.distributed` when it is available and initialized, else None."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch built without distributed support
        return None
    if not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def get_rank() -> int:
    """This process's rank, or 0 without an initialized process group."""
    dist = initialized()
    return 0 if dist is None else int(dist.get_rank())


def get_world_size() -> int:
    """The number of ranks, or 1 without an initialized process group."""
    dist = initialized()
    return 1 if dist is None else int(dist.get_world_size())


def is_distributed() -> bool:
    """Whether a process group of two or more ranks is initialized.

    >>> is_distributed()
    False
    """
    return get_world_size() > 1


@dataclass(frozen=True)
class Replicas:
    """The ranks that hold the same (replicated) state; rank 0 writes it.

    `process_group` is the torch process group their collectives use (None: the default
    one); `ShardWriter` gives its background writes a gloo group of their own.
    """

    rank: int
    world_size: int
    process_group: Any = None

    @staticmethod
    def current() -> Replicas | None:
        """The default process group's ranks, or None when there is nothing to coordinate."""
        if not is_distributed():
            return None
        return Replicas(get_rank(), get_world_size())

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


def all_gather(payload: Any, process_group: Any = None) -> list[Any]:
    """Every rank's picklable `payload`, by rank (on `process_group`, else the default one)."""
    dist = initialized()
    out: list[Any] = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(out, payload, group=process_group)
    return out


def all_max(value: int, process_group: Any = None, buffer: Any = None) -> int:
    """The largest of every rank's `value`: one all-reduce of one int64 in `buffer` (from
    `number_buffer`, reused from call to call; a new one when None)."""
    dist = initialized()
    tensor = number_buffer(process_group) if buffer is None else buffer
    tensor.fill_(value)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=process_group)
    return int(tensor.item())


def number_buffer(process_group: Any = None) -> Any:
    """A one-int64 tensor on the device torch's object collectives use with `process_group`
    (the CPU under gloo, this rank's GPU under NCCL)."""
    import torch

    dist = initialized()
    try:
        from torch.distributed.distributed_c10d import _get_object_coll_device

        device = _get_object_coll_device(process_group)
    except ImportError:  # pragma: no cover - a torch without the helper
        device = "cuda" if dist.get_backend(process_group) == "nccl" else "cpu"
    return torch.zeros(1, dtype=torch.int64, device=device)
