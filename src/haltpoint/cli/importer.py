"""`haltpoint import`: turn a torch.save file, a Lightning .ckpt, a Hugging Face
`pytorch_model.bin` or a safetensors file (what `export` writes) into a haltpoint checkpoint,
without ever running code from the file."""

from __future__ import annotations

import argparse
import os
import pickle
import re
import stat
import time
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any

import torch

from haltpoint.cli.command import add_command
from haltpoint.cli.flags import check_output_dir, count, user_path
from haltpoint.cli.output import Output, format_bytes
from haltpoint.errors import (
    CheckpointExistsError,
    HistoryNotWrittenError,
    LinkedFileError,
    NotRegularFileError,
    StepBehindError,
    first_line,
)
from haltpoint.state.tree import flatten_state
from haltpoint.stopping.inputs import shown
from haltpoint.store.history import (
    append_history,
    check_appendable,
    recover_history,
    save_record,
)
from haltpoint.store.lock import WriterLock
from haltpoint.store.manifest import check_save_time, next_sequence
from haltpoint.store.run_dir import RunDirectory
from haltpoint.store.space import full_disk_on_open, unwritable_on_open
from haltpoint.store.staging import staged_nbytes
from haltpoint.store.storage import open_storage
from haltpoint.store.writer import write_checkpoint

__all__ = ["UnsafeFileError", "convert", "load_safetensors", "load_weights_only", "register", "run"]

_EPILOG = """\
  haltpoint import pytorch_model.bin -o runs/hf                  a Hugging Face weights file
  haltpoint import last.ckpt -o runs/imported                    a Lightning checkpoint
  haltpoint import model.pt -o runs/imported --step 100
  haltpoint import model.safetensors -o runs/again             what `haltpoint export` wrote

Pickled files are loaded with torch.load(weights_only=True): tensors, containers and numbers
only. Safetensors files hold tensors alone and are read as such.
A file that needs arbitrary code to unpickle is refused, and nothing from it runs."""

_LIGHTNING_KEYS = ("pytorch-lightning_version", "global_step", "optimizer_states")
_STEP_KEYS = ("global_step", "step", "epoch")


class UnsafeFileError(ValueError):
    """The file needs arbitrary code to unpickle; it was refused and nothing in it ran."""


def load_weights_only(path: str) -> Any:
    """`torch.load(path, weights_only=True, map_location="cpu")`, with errors that say why.

    Raises:
        FileNotFoundError: `path` does not exist.
        UnsafeFileError: unpickling would need code that weights_only does not allow (the
            message names the global it asked for); nothing from the file was run.
        ValueError: the file is not something torch.load reads.
    """
    if not os.path.isfile(path):
        raise _not_a_file(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(path) and not head.startswith(b"\x80"):
        raise ValueError(
            f"cannot read {path} as a torch.save file (neither a zip archive nor a pickle); "
            "import takes torch.save files, Lightning .ckpt files, Hugging Face "
            "pytorch_model.bin files and safetensors files"
        )
    from safetensors import SafetensorError  # torch.load hands a *.safetensors name to it

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            f"refused {path}: {_unsafe_part(str(exc))}; torch.load(weights_only=True) accepts "
            "only tensors, containers and numbers, since unpickling anything else could run "
            "arbitrary code. Nothing from the file was run. If you trust it, re-save only its "
            "weights (torch.save(model.state_dict(), ...)) in a trusted environment and import "
            "that"
        ) from None
    except (RuntimeError, EOFError, OSError, SafetensorError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        first = first_line(exc) or type(exc).__name__
        raise ValueError(
            f"cannot read {path} as a torch.save file ({first}); import takes torch.save "
            "files, Lightning .ckpt files, Hugging Face pytorch_model.bin files and "
            "safetensors files"
        ) from None


def _not_a_file(path: str) -> FileNotFoundError:
    """The error of a FILE to import that is missing, or a folder, FIFO or device."""
    accepted = (
        "pass a torch.save file, a Lightning .ckpt, a Hugging Face pytorch_model.bin or a "
        "safetensors file"
    )
    if not os.path.exists(path):
        return FileNotFoundError(f"{path} does not exist or is not a file; {accepted}")
    mode = os.stat(path).st_mode
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))
    what = next((name for test, name in kinds if test(mode)), "a device")
    return FileNotFoundError(f"{path} is {what}, not a file; {accepted}")


def _is_safetensors(path: str) -> bool:
    """Whether `path` starts as a safetensors file does: a length, then a JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file `path` (tensors only: nothing in it can run).

    Raises:
        ValueError: the file is not a valid safetensors file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        first = first_line(exc) or type(exc).__name__
        raise ValueError(f"cannot read {path} as a safetensors file ({first})") from None


def _unsafe_part(message: str) -> str:
    """What a weights_only refusal asked for, from torch's message.

    >>> _unsafe_part("... Unsupported global: GLOBAL io.open was not an allowed global ...")
    'it asks for the Python object io.open'
    """
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return f"it asks for the Python object {found.group(1)}"
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", message)
    what = detail.group(1).strip().rstrip(".") if detail else "an unsupported pickle instruction"
    return f"its pickle holds what weights_only does not accept ({what})"


def _is_tensor_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(k, str) for k in value)
        and all(isinstance(v, torch.Tensor) for v in value.values())
    )


def _int_step(obj: Mapping[str, Any]) -> int | None:
    """The file's step: its first of `global_step`, `step`, `epoch` (None when it has none).

    Raises:
        ValueError: that value is not a step a checkpoint holds (an int in [0, 2**63)).
    """
    for key in _STEP_KEYS:
        if key in obj:
            value = obj[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
                raise ValueError(
                    f"the file's {key} is {shown(value)}, not a step a checkpoint holds (an "
                    "int from 0 to 2**63 - 1); pass the step to import it as with --step S"
                )
            return value
    return None


def convert(
    obj: Any, *, read_step: bool = True
) -> tuple[dict[str, Any], int | None, list[str], str]:
    """Map a loaded file to haltpoint state entries.

    Returns `(state, step, skipped_keys, kind)`: a Lightning checkpoint's `state_dict` becomes
    `model`, its `optimizer_states` and `lr_schedulers` keep their names, `epoch` and
    `global_step` go to `trainer` and the step is `global_step`; a flat mapping of tensors
    (a state dict, a Hugging Face weights file) becomes `model`; any other mapping keeps its
    top-level names, and its step is its `global_step`, `step` or `epoch` (None with
    `read_step=False`, or when it has none).

    >>> state, step, skipped, kind = convert({"fc.weight": torch.zeros(2, 2)})
    >>> list(state), step, kind
    (['model'], None, 'state dict')

    Raises:
        ValueError: the object is not a mapping (or a tensor) that can become a state, or
            its step is not one a checkpoint holds.
    """
    if isinstance(obj, torch.Tensor):
        return {"tensor": obj}, None, [], "tensor"
    if isinstance(obj, Mapping) and not obj:
        raise ValueError(f"the file holds an empty {type(obj).__name__}; nothing to import")
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"the file holds a {type(obj).__name__}, not a mapping of names to tensors or "
            "state dicts; nothing to import"
        )
    if "state_dict" in obj and any(k in obj for k in _LIGHTNING_KEYS):
        state: dict[str, Any] = {"model": obj["state_dict"]}
        for key in ("optimizer_states", "lr_schedulers"):
            if obj.get(key):
                state[key] = obj[key]
        trainer = {k: obj[k] for k in ("epoch", "global_step") if k in obj}
        if trainer:
            state["trainer"] = trainer
        used = {"state_dict", "optimizer_states", "lr_schedulers", "epoch", "global_step"}
        skipped = sorted(str(k) for k in obj if k not in used)
        return state, _int_step(obj) if read_step else None, skipped, "Lightning checkpoint"
    if _is_tensor_dict(obj):
        return {"model": dict(obj)}, None, [], "state dict"
    state = {}
    skipped = []
    for key, value in obj.items():
        if isinstance(key, str) and key and not key.startswith("__"):
            state[key] = value
        else:
            skipped.append(repr(key))
    if not state:
        raise ValueError(
            f"none of the file's top-level keys names an entry ({', '.join(skipped)}): entries "
            "are non-empty strings not starting with '__'; nothing to import"
        )
    return state, _int_step(obj) if read_step else None, skipped, "mapping"


def run(args: argparse.Namespace, out: Output) -> int:
    """Import `args.file` into the run directory `args.output`."""
    check_output_dir(args.output, "-o")
    read_step = args.step is None
    if os.path.isfile(args.file) and _is_safetensors(args.file):
        state, step, skipped, kind = convert(load_safetensors(args.file), read_step=read_step)
        kind = "safetensors file"
    else:
        state, step, skipped, kind = convert(load_weights_only(args.file), read_step=read_step)
    step = args.step if args.step is not None else (step if step is not None else 0)
    size, kept = _write_import(args.output, step, state)
    out.line(
        f"imported {args.file} ({kind}) as step {step} of {args.output}: entries "
        f"{', '.join(state)}; {format_bytes(size)} of tensors"
        + (f"; the run's {kept} earlier checkpoint folder(s) are untouched" if kept else "")
    )
    if skipped:
        out.note(f"not imported: {', '.join(skipped)}")
    return 0


def _write_import(directory: str, step: int, state: dict[str, Any]) -> tuple[int, int]:
    """Commit `state` as the checkpoint of `step` under the writer lock; return its tensor
    bytes and how many checkpoint folders the run already held.

    Import writes its own checkpoint and nothing else: no retention, no clean-up of other
    folders, so it never deletes anything it did not write. In the folder of `step` it
    removes only what an import (or save) of that step killed before its commit left there.

    Raises:
        CheckpointExistsError: the run's newest checkpoint (intact, damaged or unreadable) is
            at `step`; import never replaces one.
        StepBehindError: it is later than `step`; import never adds one behind the newest.
        HistoryNotWrittenError: the checkpoint is committed, its history line is not.
        InsufficientSpaceError: the disk is full; nothing was committed.
    """
    # a read-only run or a full disk: said as a writer says it
    with full_disk_on_open(directory), unwritable_on_open(directory):
        run_dir = RunDirectory(open_storage(directory))
        lock = WriterLock(run_dir.storage)
        lock.acquire()
    try:
        check_appendable(run_dir.storage)
        existing = [e for e in run_dir.scan() if e.manifest is not None or e.error is not None]
        recover_history(run_dir.storage, [e.manifest for e in existing if e.manifest is not None])
        newest = max((e.step for e in existing), default=None)
        if newest is not None and step <= newest:
            error = CheckpointExistsError if step == newest else StepBehindError
            raise error(
                f"--step {step} is not newer than the newest checkpoint of {directory} "
                f"(step {newest}); import never replaces or prunes checkpoints: pass "
                f"--step {newest + 1} or more, or import into a new run directory",
                path=directory,
            )
        flat = flatten_state(state)
        now = check_save_time(time.time(), step, directory)  # before anything is removed
        run_dir.remove_uncommitted(run_dir.new_dirname(step))
        write_checkpoint(
            run_dir,
            step=step,
            time=now,
            metrics={},
            tree=flat.tree,
            tensors=flat.tensors,
            sequence=next_sequence(e.manifest for e in existing if e.manifest is not None),
            held=lock.check,
        )
        try:  # committed: an error from here on must say so
            append_history(run_dir.storage, save_record(step, now, {}, state))
        except (OSError, LinkedFileError, NotRegularFileError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
            raise HistoryNotWrittenError(
                f"the import is committed as step {step} of {directory}, but its "
                f"history.jsonl line was not written ({why}); do not import "
                "it again: free some space (or fix that), and the next writer or import that "
                "opens the run writes the line back from the checkpoint",
                path=directory,
            ) from exc
    finally:
        lock.release()
    return staged_nbytes(flat.tensors), len(existing)


def register(commands: Any) -> None:
    """Add `import` to the subcommands."""
    parser = add_command(
        commands,
        "import",
        run,
        help=(
            "convert a torch.save, Lightning .ckpt, pytorch_model.bin or safetensors file into "
            "a checkpoint"
        ),
        epilog=_EPILOG,
        interrupted=lambda args: (
            f"interrupted; the import is committed whole or not at all: `haltpoint ls "
            f"{args.output}` shows whether it was"
        ),
    )
    parser.add_argument("file", type=user_path, metavar="FILE", help="the file to convert")
    parser.add_argument(
        "-o",
        "--output",
        type=user_path,
        required=True,
        metavar="DIR",
        help="the run directory to write",
    )
    parser.add_argument(
        "--step",
        type=count(0, below=2**63),
        metavar="S",
        help="the step (default: from the file, else 0)",
    )
