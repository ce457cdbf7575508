"""Quarantine: the manifests of damaged checkpoints, moved aside by the writer, never deleted.

    run/
      quarantine/
        step-000000015-1.json      the manifest of step 15, set aside the first time
        step-000000015-2.json      ... and the second time, if step 15 was damaged again

A quarantined manifest is no longer a checkpoint: listing, retention and restore skip it,
and its step can be saved again. Its data files stay where they are (the paths in it are
relative to the run), and the writer's clean-up keeps every file it references.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from haltpoint.errors import CorruptCheckpointError
from haltpoint.store.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest
from haltpoint.store.storage import Storage

__all__ = [
    "QUARANTINE_DIR",
    "Quarantined",
    "is_quarantined_name",
    "list_quarantined",
    "move_to_quarantine",
]

QUARANTINE_DIR = "quarantine"
# not \d: it takes any script's digits; at most 19 of them (a step is below 2**63, and a
# longer name, which an object store's key may be, would cost int() a ValueError)
_NAME = re.compile(r"step-([0-9]{9,19})-([0-9]{1,19})\.json")


@dataclass(frozen=True)
class Quarantined:
    """One quarantined manifest: `manifest` is None (and `error` says why) if it does not
    decode."""

    step: int
    path: str  # relative to the run: quarantine/step-000000015-1.json
    manifest: Manifest | None
    error: CorruptCheckpointError | None


def is_quarantined_name(name: str) -> bool:
    """Whether `name` is one a quarantined manifest gets in `quarantine/` (step, then the
    number of the move), exactly: nothing else there is haltpoint's.

    >>> name = "step-000000015-1.json"
    >>> is_quarantined_name(name), is_quarantined_name(name + "\\n")
    (True, False)
    """
    return _NAME.fullmatch(name) is not None


def list_quarantined(storage: Storage) -> list[Quarantined]:
    """The quarantined manifests of the run, by step, then in the order they were set aside."""
    found = []
    for name in storage.listdir(QUARANTINE_DIR):
        match = _NAME.fullmatch(name)
        if match is None:
            continue
        rel = f"{QUARANTINE_DIR}/{name}"
        manifest, error = None, None
        try:
            data = storage.read_bytes(rel, MAX_MANIFEST_BYTES + 1)
            manifest = Manifest.decode(data, source=f"{storage.url}/{rel}")
        except OSError as exc:
            error = CorruptCheckpointError(f"cannot read {storage.url}/{rel}: {exc}", path=rel)
        except CorruptCheckpointError as exc:
            error = exc
        found.append((int(match.group(1)), int(match.group(2)), rel, manifest, error))
    return [Quarantined(step, rel, m, e) for step, _, rel, m, e in sorted(found)]


def move_to_quarantine(storage: Storage, dirname: str) -> str:
    """Move `dirname/manifest.json` to the next free `quarantine/{dirname}-N.json`; return it.

    A rename, never a copy left behind or a delete (`Storage.rename`). Only the writer, which
    holds the lock, may call this.
    """
    storage.makedirs(QUARANTINE_DIR)
    taken = set(storage.listdir(QUARANTINE_DIR))
    n = 1
    while f"{dirname}-{n}.json" in taken:
        n += 1
    rel = f"{QUARANTINE_DIR}/{dirname}-{n}.json"
    storage.rename(f"{dirname}/{MANIFEST_NAME}", rel)
    return rel
