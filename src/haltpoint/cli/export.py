"""`haltpoint export`: the weights of one state entry as a plain safetensors file."""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from haltpoint.cli.command import add_command
from haltpoint.cli.flags import UsageError, check_output_file, count, user_path, write_failed
from haltpoint.cli.output import Output, format_bytes
from haltpoint.cli.runinfo import open_run, select_entry
from haltpoint.errors import CheckpointNotFoundError, CorruptCheckpointError
from haltpoint.state.codec import TENSOR_TAG
from haltpoint.state.tree import unflatten_state
from haltpoint.store.manifest import Manifest
from haltpoint.store.run_dir import RunDirectory, ShardedRecord, checkpoint_dirname
from haltpoint.store.storage import replace_file
from haltpoint.store.tensor_reader import read_tensors

__all__ = ["entry_weights", "register", "run"]

_ATTEMPTS = 10  # checkpoints removed under export, one after the other, before it gives up

_EPILOG = """\
  haltpoint export runs/demo -o model.safetensors                 best by the run's monitor
  haltpoint export runs/demo --which latest -o last.safetensors
  haltpoint export runs/demo --which 12 --key model -o step12.safetensors
  haltpoint export runs/demo --monitor val_acc --mode max -o acc.safetensors

  # then, in Python:
  model.load_state_dict(safetensors.torch.load_file("model.safetensors"))"""


def _refs(value: Any) -> Iterator[str]:
    if isinstance(value, Mapping):
        if TENSOR_TAG in value and isinstance(value[TENSOR_TAG], str):
            yield value[TENSOR_TAG]
            return
        for item in value.values():
            yield from _refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _refs(item)


_RESERVED_NAME = "__metadata__"  # the safetensors header's own field: no tensor's name


def _flat_tensors(value: Any, prefix: str, out: dict[str, torch.Tensor]) -> int:
    """Collect tensors under dotted names; return how many non-tensor leaves were skipped.

    Raises:
        ValueError: two tensors get the same dotted name (`{"a.b": x, "a": {"b": y}}`), or
            one is named `__metadata__`: no safetensors file can hold them as named.
    """
    if isinstance(value, np.ndarray):  # saved as the array it was: exported as a tensor
        value = torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, torch.Tensor):
        if prefix in out or prefix == _RESERVED_NAME:
            why = (
                "the safetensors header's own field"
                if prefix == _RESERVED_NAME
                else "the name of another of its tensors"
            )
            raise ValueError(
                f"cannot export a tensor named {prefix!r}: it is {why}, so a safetensors "
                "file cannot hold the entry as named; restore it with Checkpointer.restore "
                "and save it under names of your own"
            )
        out[prefix] = value
        return 0
    if isinstance(value, Mapping):
        return sum(
            _flat_tensors(item, f"{prefix}.{key}" if prefix else str(key), out)
            for key, item in value.items()
        )
    if isinstance(value, (list, tuple)):
        return sum(
            _flat_tensors(item, f"{prefix}.{i}" if prefix else str(i), out)
            for i, item in enumerate(value)
        )
    return 1


def entry_weights(
    run_storage: Any, manifest: Manifest, key: str
) -> tuple[dict[str, torch.Tensor], int]:
    """The tensors of top-level entry `key`, named as its `state_dict()` names them
    (`fc.weight`), verified against their hashes; and the count of non-tensor leaves left out.

    Only the entry's own tensors are read.

    Raises:
        UsageError: the checkpoint has no entry `key`, or it holds no tensors (each names
            --key).
        ValueError: entry `key` is sharded state.
        CorruptCheckpointError: a tensor's bytes do not match its hash, or `key` is not in
            the state tree and the manifest's sharded record is malformed.
    """
    if key not in manifest.tree:
        record = ShardedRecord.from_manifest(manifest, checkpoint_dirname(manifest.step))
        sharded = record.entries if record is not None else ()
        if key in sharded:  # the entry is there, but not in files export reads: exit status 1
            raise ValueError(
                f"--key {key!r} of step {manifest.step} is sharded state, written by "
                "torch.distributed.checkpoint; export reads haltpoint's own files only. Restore "
                "it with Checkpointer.restore into an unsharded model in one process, then save "
                "that model's state_dict() with safetensors"
            )
        raise UsageError(
            f"--key {key!r} is not an entry of the checkpoint of step {manifest.step}; "
            f"its entries are {', '.join(sorted([*manifest.tree, *sharded]))}"
        )
    subtree = {key: manifest.tree[key]}
    wanted = {ref: manifest.tensors[ref] for ref in _refs(subtree) if ref in manifest.tensors}
    tensors = read_tensors(run_storage, wanted, verify=True)
    value = unflatten_state(subtree, tensors)[key]
    weights: dict[str, torch.Tensor] = {}
    skipped = _flat_tensors(value, "", weights)
    if not weights:
        raise UsageError(
            f"entry {key!r} of step {manifest.step} holds no tensors; pick an entry with "
            f"weights with --key (entries: {', '.join(sorted(manifest.tree))})"
        )
    return weights, skipped


_METADATA = {"format": "pt"}


def _save(weights: Mapping[str, torch.Tensor], path: str) -> None:
    import safetensors.torch

    # Tensors that share memory (tied weights) are one object each on disk: clone them apart.
    seen: set[tuple[int, int]] = set()
    plain = {}
    for name, tensor in weights.items():
        ident = (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()))
        plain[name] = tensor.contiguous().clone() if ident in seen else tensor.contiguous()
        seen.add(ident)
    try:
        replace_file(path, lambda tmp: safetensors.torch.save_file(plain, tmp, metadata=_METADATA))
    except Exception as exc:  # OSError, or safetensors' own error for one
        raise write_failed("-o", path, exc) from None


def _read_chosen(
    run_dir: RunDirectory, args: argparse.Namespace, out: Output
) -> tuple[Manifest, dict[str, torch.Tensor], int]:
    """The checkpoint `args.which` names and its entry's weights (`entry_weights`).

    A checkpoint that a writer's retention removed while it was being read is not damaged:
    for "best" and "latest" the choice is made again among those left (with a note).

    Raises:
        CheckpointNotFoundError: the step asked for was removed while being read, or the
            writer removed one choice after the other, `_ATTEMPTS` times.
    """
    for _ in range(_ATTEMPTS):
        entry = select_entry(run_dir, args.which, monitor=args.monitor, mode=args.mode)
        manifest = entry.manifest
        assert manifest is not None
        try:
            weights, skipped = entry_weights(run_dir.storage, manifest, args.key)
        except CorruptCheckpointError as exc:
            if not run_dir.removed(entry.dirname):
                raise
            gone = f"the checkpoint of step {manifest.step} was removed by the writer's retention"
            if args.which not in ("best", "latest"):
                raise CheckpointNotFoundError(
                    f"{gone} while it was being read; export another step (haltpoint ls)",
                    path=f"{run_dir.storage.url}/{entry.dirname}",
                ) from exc
            out.note(f"{gone} while it was being read; choosing the {args.which} again")
            continue
        return manifest, weights, skipped
    raise CheckpointNotFoundError(
        f"the writer of {run_dir.storage.url} removed {_ATTEMPTS} checkpoints in turn while "
        f"export read them; export when it saves less often, or a pinned step",
        path=run_dir.storage.url,
    )


def run(args: argparse.Namespace, out: Output) -> int:
    """Export one entry's weights of one checkpoint of `args.directory`."""
    check_output_file(args.output, "-o", (".safetensors",))
    manifest, weights, skipped = _read_chosen(open_run(args.directory), args, out)
    _save(weights, args.output)
    size = sum(t.numel() * t.element_size() for t in weights.values())
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in manifest.metrics.items())
    out.line(
        f"exported {len(weights)} tensors ({format_bytes(size)}) of {args.key!r} from step "
        f"{manifest.step}" + (f" ({metrics})" if metrics else "") + f" to {args.output}"
    )
    if skipped:
        out.note(f"left out {skipped} non-tensor value(s) of {args.key!r}: only weights export")
    return 0


def _which(text: str) -> str:
    """The argparse type of --which: best, latest or a step (an int >= 0)."""
    if text in ("best", "latest"):
        return text
    try:
        return str(count(0)(text))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be best, latest or a step (an int >= 0, digits 0-9 only), got {text!r}"
        ) from None


def register(commands: Any) -> None:
    """Add `export` to the subcommands."""
    parser = add_command(
        commands,
        "export",
        run,
        help="write the weights of one checkpoint's entry as one safetensors file",
        epilog=_EPILOG,
        interrupted=lambda args: (
            f"interrupted; {args.output} is the whole export or untouched, never half-written"
        ),
    )
    parser.add_argument(
        "directory", type=user_path, metavar="DIR", help="the run directory (a path or URL)"
    )
    parser.add_argument(
        "--which",
        type=_which,
        default="best",
        metavar="best|latest|STEP",
        help="the checkpoint (default: best)",
    )
    parser.add_argument("--key", default="model", help="the state entry to export (default: model)")
    parser.add_argument(
        "-o",
        "--output",
        type=user_path,
        required=True,
        metavar="FILE.safetensors",
        help="the file to write",
    )
    parser.add_argument(
        "--monitor",
        metavar="NAME",
        help="the metric that ranks checkpoints for best (default: the monitor the run "
        "recorded in its manifests, or the only metric)",
    )
    parser.add_argument("--mode", choices=("min", "max"), help="whether lower or higher is better")
