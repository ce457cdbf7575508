"""The ranks under `torch.distributed`: who writes, how ranks agree, sharded state, stopping sync.

- `ranks`: which rank this is, the world size, the replicas whose rank 0 writes.
- `collectives`: how the ranks agree on each checkpoint call, so an error on one is raised on all.
- `sharded`: FSDP2 / DTensor state through `torch.distributed.checkpoint` (`ShardedState`).
- `sharded_save`: the protocol of a sharded save: every rank writes its shards, rank 0 commits.
- `stopping_sync`: identical stopping decisions on every rank (`synced`).

Everything is a no-op without an initialized process group of two or more ranks.
"""

from haltpoint.distributed.ranks import (
    Replicas,
    all_gather,
    get_rank,
    get_world_size,
    initialized,
    is_distributed,
)
from haltpoint.distributed.stopping_sync import DistributedEarlyStopping, synced

__all__ = [
    "DistributedEarlyStopping",
    "Replicas",
    "all_gather",
    "get_rank",
    "get_world_size",
    "initialized",
    "is_distributed",
    "synced",
]
