"""`haltpoint ls`: the checkpoints of a run, read-only."""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from haltpoint.cli.command import add_command
from haltpoint.cli.flags import user_path
from haltpoint.cli.output import Output, format_bytes, format_metrics, format_time
from haltpoint.cli.runinfo import (
    Record,
    folder_status,
    history_of,
    open_run,
    referenced_dirs,
    resolve_monitor,
)
from haltpoint.errors import CheckpointNotFoundError
from haltpoint.policies.retention import best_record, commit_order
from haltpoint.store.run_dir import RunDirectory, checkpoint_nbytes

__all__ = ["CheckpointRow", "list_checkpoints", "register", "run"]

_EPILOG = """\
  haltpoint ls runs/demo
  haltpoint ls runs/demo --monitor val_acc --mode max     tag the best by another metric
  haltpoint ls runs/demo --json | jq '.[].step'"""


@dataclass
class CheckpointRow:
    """One checkpoint folder as `ls` shows it.

    `status` is "committed" (a valid manifest; its data is not read: `verify` checks it),
    "damaged" (a manifest that does not decode or whose checksum fails), "unreadable" (no
    permission to list its folder or read its manifest: not damage), "data-only" (no
    manifest, but its tensor files are used by later checkpoints: a removed checkpoint's data
    kept by dedup, or a quarantined one's), "uncommitted" (no manifest: a save in flight or an
    interrupted one) or "quarantined" (a damaged checkpoint's manifest that a writer set
    aside in `quarantine/`: no longer a checkpoint, its step free to be saved again) or
    "removed" (a checkpoint whose manifest a writer's retention removed while `ls` read it).
    Only "committed", "damaged" and "unreadable" rows may be checkpoints.
    """

    step: int
    path: str
    status: str
    time: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    size: int = 0
    shared: int = 0
    tags: list[str] = field(default_factory=list)
    error: str | None = None
    sequence: int | None = None
    """Its place in the run's commit order (None: a manifest of an older haltpoint)."""

    def to_json(self) -> dict[str, Any]:
        """The row as the object `ls --json` prints."""
        return {
            "step": self.step,
            "path": self.path,
            "status": self.status,
            "time": self.time,
            "metrics": self.metrics,
            "size": self.size,
            "shared": self.shared,
            "tags": self.tags,
            "error": self.error,
            "sequence": self.sequence,
        }


def list_checkpoints(
    run: RunDirectory, monitor: str | None = None, mode: str | None = None
) -> tuple[list[CheckpointRow], str | None]:
    """The rows of `ls`, oldest step first, and a note when no checkpoint could be tagged best.

    Shared bytes are the bytes of tensors in files that more than one manifest references.
    """
    entries = run.scan()
    manifests = [e.manifest for e in entries if e.manifest is not None]
    uses = Counter(file for m in manifests for file in m.files())
    best_step, note = None, None
    if manifests:
        try:
            name, direction = resolve_monitor(
                manifests, monitor, mode, history=lambda: history_of(run)
            )
            records = [Record(m.step, m.metrics) for m in manifests]
            best = best_record(records, name, direction)
            best_step = None if best is None else best.step
        except (ValueError, CheckpointNotFoundError) as exc:
            if monitor is not None or mode is not None:
                raise
            note = f"no checkpoint tagged best: {exc}"
    latest = max(manifests, key=commit_order).step if manifests else None  # newest committed
    held = run.quarantined()
    referenced = referenced_dirs([*manifests, *(q.manifest for q in held if q.manifest)])
    rows = []
    base = run.storage.url.rstrip("/")
    for entry in entries:
        status = folder_status(entry, referenced)
        row = CheckpointRow(entry.step, f"{base}/{entry.dirname}", status)
        if entry.error is not None:
            row.error = str(entry.error)
        manifest = entry.manifest
        if manifest is not None:
            row.time, row.sequence = manifest.time, manifest.sequence
            row.metrics = dict(manifest.metrics)
            row.size = checkpoint_nbytes(manifest)
            row.shared = sum(r.nbytes for r in manifest.tensors.values() if uses[r.file] > 1)
            row.tags = [
                tag
                for tag, on in (
                    ("best", entry.step == best_step),
                    ("latest", entry.step == latest),
                    ("pinned", entry.pinned),
                )
                if on
            ]
        elif entry.pinned:
            row.tags = ["pinned"]
        rows.append(row)
    for q in held:
        row = CheckpointRow(q.step, f"{base}/{q.path}", "quarantined")
        if q.manifest is not None:
            row.time, row.metrics = q.manifest.time, dict(q.manifest.metrics)
        rows.append(row)
    return sorted(rows, key=lambda r: r.step), note


def run(args: argparse.Namespace, out: Output) -> int:
    """List the checkpoints of `args.directory`."""
    rows, note = list_checkpoints(open_run(args.directory), args.monitor, args.mode)
    if args.json:
        out.json([row.to_json() for row in rows])
        return 0
    if not rows:
        out.note(f"no checkpoints in {args.directory}")
        return 0
    cells = [
        [
            str(r.step),
            format_time(r.time) if r.time is not None else "-",
            format_metrics(r.metrics) or "-",
            format_bytes(r.size) if r.status == "committed" else "-",
            format_bytes(r.shared) if r.status == "committed" else "-",
            ",".join(r.tags) or "-",
            r.status,
        ]
        for r in rows
    ]
    colours = {
        "damaged": "red",
        "unreadable": "yellow",
        "uncommitted": "yellow",
        "data-only": "dim",
        "quarantined": "red",
        "removed": "dim",
    }
    styles = [colours.get(r.status) for r in rows]
    out.table(
        ["step", "time", "metrics", "size", "shared", "tags", "status"],
        cells,
        title=f"checkpoints in {args.directory}",
        styles=styles,
        numeric=["step", "size", "shared"],
    )
    for r in rows:
        if r.error:
            out.note(f"step {r.step} is {r.status}: {r.error}", style="red")
    if note:
        out.note(note, style="dim")
    return 0


def register(commands: Any) -> None:
    """Add `ls` to the subcommands."""
    parser = add_command(
        commands, "ls", run, help="list the checkpoints of a run (read-only)", epilog=_EPILOG
    )
    parser.add_argument(
        "directory", type=user_path, metavar="DIR", help="the run directory (a path or URL)"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list of objects")
    parser.add_argument("--monitor", metavar="NAME", help="the metric that picks the best")
    parser.add_argument("--mode", choices=("min", "max"), help="whether lower or higher is better")
