"""`haltpoint verify`: check every hash of every checkpoint and every manifest of a run."""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from haltpoint.cli.command import add_command
from haltpoint.cli.flags import user_path
from haltpoint.cli.output import Output, format_bytes
from haltpoint.cli.runinfo import folder_status, open_run, referenced_dirs
from haltpoint.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnreadableCheckpointError,
)
from haltpoint.reader import RunReader, check_payloads, payload_tensors
from haltpoint.store.run_dir import Entry, RunDirectory, checkpoint_nbytes, is_sharded
from haltpoint.store.tensor_file import TensorRecord
from haltpoint.store.tensor_reader import read_tensors, tensor_damage

__all__ = ["CheckpointCheck", "register", "run", "verify_run"]

_EPILOG = """\
  haltpoint verify runs/demo            exit status 0 when everything is intact, 1 if not
                                        (or if the folder holds no checkpoint)
  haltpoint verify runs/demo --json"""

_PROGRESS_BYTES = 64 << 20  # show a progress bar (on a terminal) from this much data
_PROGRESS_CHECKPOINTS = 20  # ... or this many checkpoints


@dataclass
class CheckpointCheck:
    """The outcome of checking one checkpoint folder.

    `status` is "intact", "damaged" (the manifest or some tensor bytes), "removed" (a writer's
    retention removed it while it was being checked: not damage, and not a failure), or for
    a folder without a manifest (not a checkpoint) "data-only" (its files are checked through
    the manifests that use them) or "uncommitted". `damaged` maps each damaged tensor file to
    the names of its tensors whose bytes are missing or do not match their hash; `causes`
    says, by tensor name, what is wrong (as `restore` would say it).

    >>> check = CheckpointCheck(3, "step-000000003", "damaged",
    ...                         damaged={"step-000000003/tensors.safetensors": ["model.bias"]},
    ...                         causes={"model.bias": "bytes 0-8 do not match the tensor's hash"})
    >>> print(check.problems()[0])
    step-000000003/tensors.safetensors: bytes 0-8 do not match the tensor's hash (model.bias)
    """

    step: int
    dirname: str
    status: str
    tensors: int = 0
    size: int = 0
    damaged: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None
    causes: dict[str, str] = field(default_factory=dict)

    def problems(self) -> list[str]:
        """One line per damaged thing, naming the file and what is wrong with it: each cause
        with the tensors it hit (the first five causes, the first five tensors of each)."""
        lines = [] if self.error is None else [self.error]
        for file, keys in sorted(self.damaged.items()):
            by_cause: dict[str, list[str]] = defaultdict(list)
            for key in keys:
                by_cause[self.causes.get(key, "missing or not matching its hash")].append(key)
            said = [f"{cause} ({_some(names)})" for cause, names in list(by_cause.items())[:5]]
            if len(by_cause) > 5:
                said.append(f"and {len(by_cause) - 5} more causes")
            lines.append(f"{file}: {'; '.join(said)}")
        return lines

    def to_json(self) -> dict[str, Any]:
        """The object `verify --json` prints for this checkpoint."""
        return {
            "step": self.step,
            "dirname": self.dirname,
            "status": self.status,
            "tensors": self.tensors,
            "size": self.size,
            "damaged": self.damaged,
            "causes": self.causes,
            "error": self.error,
        }


def _some(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def verify_run(
    run: RunDirectory, on_progress: Callable[[int], None] | None = None
) -> list[CheckpointCheck]:
    """Check every manifest and every tensor hash of the run, oldest step first, and the
    saved random and optimizer states as `restore` checks them (`check_payloads`).

    A tensor record shared by several manifests (under the same key) is read once.
    `on_progress` gets the bytes checked after each checkpoint. A checkpoint whose manifest
    is gone once a check of it failed was removed meanwhile by a writer: it is "removed", and
    its failed checks count for nothing. One whose files cannot be read (an I/O error, no
    permission: not damage) is "unreadable", and the others are still checked.
    """
    # by key and record (a record under another key must match that key's header entry):
    # what is wrong with it, or None when it is intact
    checked: dict[tuple[str, TensorRecord], str | None] = {}
    results = []
    entries = run.scan()
    referenced = referenced_dirs(e.manifest for e in entries if e.manifest is not None)
    for entry in entries:
        if entry.error is not None:  # "damaged", or "unreadable" (no permission)
            status = folder_status(entry, referenced)
            results.append(
                CheckpointCheck(entry.step, entry.dirname, status, error=str(entry.error))
            )
            continue
        if entry.removed:
            results.append(CheckpointCheck(entry.step, entry.dirname, "removed"))
            continue
        manifest = entry.manifest
        if manifest is None:  # its files, if used, are checked with the manifests using them
            status = folder_status(entry, referenced)
            results.append(CheckpointCheck(entry.step, entry.dirname, status))
            continue
        try:
            check, nbytes = _check_committed(run, entry, checked)
        except UnreadableCheckpointError as exc:  # not checked (an I/O error): check the rest
            results.append(CheckpointCheck(entry.step, entry.dirname, "unreadable", error=str(exc)))
            continue
        results.append(check)
        if on_progress is not None:
            on_progress(nbytes)
    return results


def _check_committed(
    run: RunDirectory, entry: Entry, checked: dict[tuple[str, TensorRecord], str | None]
) -> tuple[CheckpointCheck, int]:
    """Check the tensors (those not in `checked` yet, which it fills), DCP files and saved
    values of a committed checkpoint; return the outcome and the tensor bytes read.

    Raises:
        UnreadableCheckpointError: a file of it cannot be read now (an I/O error, no
            permission): it is not checked, and `checked` holds only what was read.
    """
    manifest = entry.manifest
    assert manifest is not None
    todo = {k: r for k, r in manifest.tensors.items() if (k, r) not in checked}
    bad = tensor_damage(run.storage, todo) if todo else {}
    error = _shard_error(run, entry) if is_sharded(manifest) else None
    for key, record in todo.items():
        checked[key, record] = bad.get(key)
    damaged: dict[str, list[str]] = defaultdict(list)
    causes: dict[str, str] = {}
    for key, record in sorted(manifest.tensors.items()):
        cause = checked[key, record]
        if cause is not None:
            damaged[record.file].append(key)
            causes[key] = cause
    if not damaged and error is None:
        error = _payload_error(run, entry)
    if (damaged or error) and run.removed(entry.dirname):  # retention raced this check
        for key in bad:
            checked.pop((key, todo[key]), None)
        return CheckpointCheck(entry.step, entry.dirname, "removed"), 0
    check = CheckpointCheck(
        entry.step,
        entry.dirname,
        "damaged" if damaged or error else "intact",
        error=error,
        tensors=len(manifest.tensors),
        size=checkpoint_nbytes(manifest),
        damaged=dict(damaged),
        causes=causes,
    )
    return check, sum(r.nbytes for r in todo.values())


def _shard_error(run: RunDirectory, entry: Entry) -> str | None:
    """What is wrong with a sharded checkpoint's DCP files (size and xxh3-128), or None."""
    try:
        RunReader(run, None, "min").check_shards(entry)
    except (CorruptCheckpointError, ValueError) as exc:
        return str(exc)
    return None


def _payload_error(run: RunDirectory, entry: Entry) -> str | None:
    """What restore's own check of the saved values (random state, optimizer structure)
    finds wrong with an undamaged checkpoint, or None: `check_payloads`, as restore runs it."""
    assert entry.manifest is not None
    records = entry.manifest.tensors
    try:
        keys = {k: records[k] for k in payload_tensors(entry) if k in records}
        check_payloads(entry, read_tensors(run.storage, keys, verify=True))
    except CorruptCheckpointError as exc:
        return str(exc)
    return None


def _total_bytes(run: RunDirectory) -> tuple[int, int]:
    entries = run.scan()
    return len(entries), sum(e.manifest.nbytes for e in entries if e.manifest is not None)


_STYLES = {"intact": "green", "damaged": "bold red", "unreadable": "yellow", "removed": "dim"}


def run(args: argparse.Namespace, out: Output) -> int:
    """Verify `args.directory`; exit status 1 when anything is damaged."""
    run_dir = open_run(args.directory)
    count, total = _total_bytes(run_dir)
    big = total >= _PROGRESS_BYTES or count >= _PROGRESS_CHECKPOINTS
    if big and out.err_console.is_terminal and not args.json:
        columns = (TextColumn("verifying"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
        with Progress(*columns, console=out.err_console, transient=True) as bar:
            task = bar.add_task("verify", total=total)
            results = verify_run(run_dir, lambda n: bar.advance(task, n))
    else:
        results = verify_run(run_dir)
    damaged = [r for r in results if r.status == "damaged"]
    unreadable = [r for r in results if r.status == "unreadable"]
    if not any(r.status in ("intact", "damaged", "removed", "unreadable") for r in results):
        raise CheckpointNotFoundError(
            f"no checkpoint in {args.directory}, so nothing was verified; pass the folder a "
            "Checkpointer wrote (it holds step-* folders with a manifest)",
            path=args.directory,
        )
    if args.json:
        ok = not damaged and not unreadable
        out.json({"ok": ok, "checkpoints": [r.to_json() for r in results]})
        return 0 if ok else 1
    out.table(
        ["step", "status", "tensors", "size"],
        [[str(r.step), r.status, str(r.tensors), format_bytes(r.size)] for r in results],
        title=f"verify {args.directory}",
        styles=[_STYLES.get(r.status) for r in results],
        numeric=["step", "tensors", "size"],
    )
    intact = [r for r in results if r.status == "intact"]
    removed = [r for r in results if r.status == "removed"]
    if removed:
        steps = ", ".join(str(r.step) for r in removed)
        out.note(
            f"step(s) {steps} removed by the writer's retention while being verified (not damage)"
        )
    for result in unreadable:  # not checked: not intact, not damaged either
        out.line(f"  step {result.step} was not verified: {result.error}", style="yellow")
    if not damaged and not intact and not unreadable:
        out.line("every checkpoint was removed while being verified; run verify again")
        return 0
    if not damaged and unreadable:
        return 1
    if not damaged:
        size = format_bytes(sum(r.size for r in intact))
        what = "the checkpoint is" if len(intact) == 1 else f"all {len(intact)} checkpoints are"
        out.line(f"{what} intact ({size} of tensor data checked)")
        return 0
    out.line(f"{len(damaged)} of {len(damaged) + len(intact)} checkpoints damaged:", style="red")
    for result in damaged:
        for problem in result.problems():
            out.line(f"  step {result.step}: {problem}", style="red")
    out.note(
        "restore() never loads a damaged checkpoint, nor `haltpoint export` a damaged tensor "
        "(it reads only the entry it exports); use an intact step "
        "(haltpoint ls), and copy the run again if it came from elsewhere"
    )
    return 1


def register(commands: Any) -> None:
    """Add `verify` to the subcommands."""
    parser = add_command(
        commands,
        "verify",
        run,
        help="check every hash of every checkpoint and every manifest of a run",
        epilog=_EPILOG,
    )
    parser.add_argument(
        "directory", type=user_path, metavar="DIR", help="the run directory (a path or URL)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
