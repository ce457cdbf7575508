"""Writing one checkpoint: hash, write only what changed, fsync, then commit the manifest."""

from __future__ import annotations

import platform
from collections.abc import Callable, Mapping
from typing import Any

import torch

from haltpoint.store.dedup import ReferenceCheck, plan_dedup
from haltpoint.store.manifest import SEQUENCE_KEY, Manifest
from haltpoint.store.run_dir import RunDirectory, checkpoint_dirname, tensors_name
from haltpoint.store.space import check_free_space, translate_full_disk
from haltpoint.store.staging import staged_nbytes
from haltpoint.store.tensor_writer import write_tensor_file

__all__ = ["library_versions", "write_checkpoint"]


def library_versions() -> dict[str, str]:
    """The versions recorded in every manifest."""
    from haltpoint import __version__

    return {
        "haltpoint": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _tensor_file_name(run: RunDirectory, dirname: str) -> str:
    """`dirname/tensors.safetensors`, or the first `tensors_name` not taken.

    The file of a dropped checkpoint stays while newer manifests reference it; saving its
    step again must not overwrite it.
    """
    n = 0
    while run.holds(f"{dirname}/{tensors_name(n)}"):  # cannot tell: refused
        n += 1
    return f"{dirname}/{tensors_name(n)}"


def write_checkpoint(
    run: RunDirectory,
    *,
    step: int,
    time: float,
    metrics: Mapping[str, float],
    tree: dict[str, Any],
    tensors: Mapping[str, torch.Tensor],
    sequence: int,
    extra: Mapping[str, Any] | None = None,
    previous: Manifest | None = None,
    check: ReferenceCheck | None = None,
    pinned: bool = False,
    held: Callable[[], None] | None = None,
) -> Manifest:
    """Write `tensors` (CPU tensors nobody changes meanwhile) durably, then commit the manifest.

    `sequence` is the checkpoint's place in commit order, recorded as `extra["sequence"]`:
    `next_sequence` of the manifests committed in the run (the writer holds the lock, so
    nothing commits in between).

    With `previous` (the newest kept manifest), tensors whose bytes, dtype and shape equal its
    records are not written again: the new manifest references the same bytes, provided
    `check` (the writer session's; a new one when None) finds them intact on disk. With
    `pinned`, the pin marker is written before the manifest, so a committed checkpoint is
    never left unpinned. `held()`, when given, runs just before the pin and the commit: it
    raises (`WriterLock.check`) when the writer lock is no longer this writer's, so a second
    writer's checkpoint is never committed over. The checkpoint exists from the moment
    `RunDirectory.commit` publishes its manifest; a crash before that leaves only files that
    the next writer to open the run removes.

    Raises:
        InsufficientSpaceError: the storage reports less free space than the new data needs
            (checked before writing), or it filled up while writing; nothing is committed and
            the partial file is removed.
    """
    dirname = checkpoint_dirname(step)
    plan = plan_dedup(tensors, previous, check or ReferenceCheck(run.storage))
    changed = {key: tensors[key] for key in plan.changed}
    needed = staged_nbytes(changed)
    check_free_space(run.storage, step, needed)
    records = dict(plan.reused)
    with translate_full_disk(run.storage, step, needed):
        run.storage.makedirs(dirname)
        if changed:
            rel = _tensor_file_name(run, dirname)
            records.update(write_tensor_file(run.storage, rel, changed, hashes=plan.hashes))
        manifest = Manifest(
            step=step,
            time=time,
            metrics=dict(metrics),
            tree=tree,
            tensors={key: records[key] for key in tensors},
            versions=library_versions(),
            extra={**(extra or {}), SEQUENCE_KEY: sequence},
        )
        if held is not None:
            held()
        if pinned:
            run.set_pinned(step, True)
        run.commit(manifest)
    return manifest
