"""`haltpoint show`: one checkpoint's state tree (names, shapes, dtypes, sizes) and metadata."""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from haltpoint.cli.command import add_command
from haltpoint.cli.flags import count, user_path
from haltpoint.cli.output import Output, format_bytes, format_metrics, format_time
from haltpoint.cli.runinfo import open_run, ranking_text, select_entry
from haltpoint.errors import CorruptCheckpointError
from haltpoint.state.codec import TENSOR_TAG, decode_value
from haltpoint.store.manifest import RANKING_KEY, SEQUENCE_KEY, Manifest
from haltpoint.store.run_dir import ShardedRecord, checkpoint_nbytes
from haltpoint.store.tensor_file import TensorRecord, torch_dtype

__all__ = ["TensorLeaf", "register", "run", "tree_lines"]

_EPILOG = """\
  haltpoint show runs/demo                   the latest checkpoint
  haltpoint show runs/demo --step 10
  haltpoint show runs/demo --json | jq .tensors"""

_MAX_VALUE = 70


@dataclass(frozen=True)
class TensorLeaf:
    """A tensor of the tree, as described by its manifest record (its bytes are not read).

    >>> record = TensorRecord("step-000000001/tensors.safetensors", "F32", (16, 3), 8, 192, "0")
    >>> TensorLeaf("model.weight", record).describe()
    'float32 [16, 3]  192 B'
    """

    key: str
    record: TensorRecord | None

    def describe(self) -> str:
        """`dtype [shape]  size`, e.g. `float32 [16, 1, 3, 3]  576 B`."""
        if self.record is None:
            return f"tensor {self.key!r} (missing from the manifest)"
        dtype = str(torch_dtype(self.record.dtype)).removeprefix("torch.")
        shape = ", ".join(map(str, self.record.shape))
        return f"{dtype} [{shape}]  {format_bytes(self.record.nbytes)}"


def _leaf_text(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int of more than 4,300 digits, inside `value`
        text = f"<a {type(value).__name__} holding an int too long to print>"
    return text if len(text) <= _MAX_VALUE else text[: _MAX_VALUE - 3] + "..."


def _children(value: Any) -> list[tuple[str, Any]] | None:
    """The (name, item) pairs under a container worth unfolding, else None (a leaf)."""
    if isinstance(value, Mapping) and value:
        return [(str(k), v) for k, v in value.items()]
    if isinstance(value, (list, tuple)) and any(
        isinstance(v, (Mapping, list, tuple, TensorLeaf)) for v in value
    ):
        return [(str(i), v) for i, v in enumerate(value)]
    return None


def _describe(value: Any) -> str:
    return value.describe() if isinstance(value, TensorLeaf) else _leaf_text(value)


def _walk(value: Any, name: str, depth: int) -> Iterator[tuple[int, str, str]]:
    children = _children(value)
    if children is None:
        yield depth, name, _describe(value)
        return
    yield (
        depth,
        name,
        f"{type(value).__name__}, {len(children)} item{'' if len(children) == 1 else 's'}",
    )
    for key, item in children:
        yield from _walk(item, key, depth + 1)


def tree_lines(manifest: Manifest) -> list[tuple[int, str, str]]:
    """`(depth, name, description)` for every node of the manifest's state tree.

    Tensors are described from their records (dtype, shape, size; their bytes are not read),
    other leaves by value.
    """

    def leaf(ref: Mapping[str, Any], where: str) -> TensorLeaf:
        key = str(ref.get(TENSOR_TAG))
        return TensorLeaf(key, manifest.tensors.get(key))

    lines: list[tuple[int, str, str]] = []
    for name, entry in manifest.tree.items():
        content = decode_value(entry.get("content"), where=f"tree[{name!r}]", on_tensor=leaf)
        summary = f"{entry.get('kind', '?')} {entry.get('type', '?')}"
        records = [t.record for t in _tensor_leaves(content) if t.record is not None]
        if records:
            size = format_bytes(sum(r.nbytes for r in records))
            summary += f", {len(records)} tensors, {size}"
        children = _children(content)
        if children is None:
            lines.append((0, name, f"{summary}: {_describe(content)}"))
            continue
        lines.append((0, name, summary))
        for key, item in children:
            lines.extend(_walk(item, key, 1))
    return lines


def _tensor_leaves(value: Any) -> Iterator[TensorLeaf]:
    if isinstance(value, TensorLeaf):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensor_leaves(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensor_leaves(item)


def _size_text(manifest: Manifest, where: str) -> str:
    text = f"{format_bytes(manifest.nbytes)} in {len(manifest.tensors)} tensors"
    try:
        record = ShardedRecord.from_manifest(manifest, where)
    except CorruptCheckpointError as exc:  # shown, not fatal: the rest can still be inspected
        return f"{text} + sharded state of unknown size ({exc})"
    if record is not None:
        ranks = "an unknown number of" if record.world_size is None else record.world_size
        text += (
            f" + {format_bytes(record.nbytes)} of sharded state ({', '.join(record.entries)}) "
            f"in {len(record.files)} torch.distributed.checkpoint files, saved on {ranks} ranks"
        )
    return text


def _as_json(manifest: Manifest, path: str, pinned: bool) -> dict[str, Any]:
    return {
        "step": manifest.step,
        "path": path,
        "time": manifest.time,
        "metrics": manifest.metrics,
        "versions": manifest.versions,
        "format_version": manifest.format_version,
        "pinned": pinned,
        "size": checkpoint_nbytes(manifest),
        "extra": manifest.extra,
        "tensors": {
            key: {"dtype": r.dtype, "shape": list(r.shape), "nbytes": r.nbytes, "file": r.file}
            for key, r in manifest.tensors.items()
        },
        "tree": manifest.tree,
    }


def _saved_by_text(saved_by: Any) -> str:
    """`policy: reason` from the manifest's `extra["saved_by"]`.

    >>> _saved_by_text({"policy": "every 100 steps", "reason": "100 steps since the last save"})
    'every 100 steps: 100 steps since the last save'
    """
    if not isinstance(saved_by, Mapping):
        return _leaf_text(saved_by)
    return f"{saved_by.get('policy', '?')}: {saved_by.get('reason', '?')}"


def run(args: argparse.Namespace, out: Output) -> int:
    """Show one checkpoint of `args.directory`."""
    run_dir = open_run(args.directory)
    which = "latest" if args.step is None else str(args.step)
    entry = select_entry(run_dir, which)
    manifest = entry.manifest
    assert manifest is not None
    path = f"{run_dir.storage.url.rstrip('/')}/{entry.dirname}"
    if args.json:
        out.json(_as_json(manifest, path, entry.pinned))
        return 0
    versions = " ".join(f"{k} {v}" for k, v in manifest.versions.items())
    header = [
        ("step", str(manifest.step) + ("  (pinned)" if entry.pinned else "")),
        ("path", path),
        ("time", format_time(manifest.time)),
        ("metrics", format_metrics(manifest.metrics) or "-"),
        ("size", _size_text(manifest, path)),
        ("versions", f"{versions}; format {manifest.format_version}"),
    ]
    extra = dict(manifest.extra)
    extra.pop(RANKING_KEY, None)
    sequence = extra.pop(SEQUENCE_KEY, None)
    if sequence is not None:  # recorded at commit; older manifests lack it
        header.append(("committed", f"#{sequence} in this run's commit order"))
    if manifest.ranking is not None:  # recorded by the writer; older manifests lack it
        header.append(("ranked by", ranking_text(manifest.ranking)))
    saved_by = extra.pop("saved_by", None)
    if saved_by is not None:  # written by Checkpointer.maybe_save; older manifests lack it
        header.append(("saved by", _saved_by_text(saved_by)))
    if extra:
        header.append(("extra", _leaf_text(extra)))
    width = max(len(key) for key, _ in header) + 2  # "ranked by: " is the longest
    for key, value in header:
        out.line(f"{key + ':':<{width}}{value}", style="bold" if key == "step" else None)
    out.line()
    out.line("state:", style="bold")
    for depth, name, text in tree_lines(manifest):
        out.line(f"{'  ' * (depth + 1)}{name}: {text}", style="cyan" if depth == 0 else None)
    return 0


def register(commands: Any) -> None:
    """Add `show` to the subcommands."""
    parser = add_command(
        commands,
        "show",
        run,
        help="show a checkpoint's state tree and metadata (default: the latest)",
        epilog=_EPILOG,
    )
    parser.add_argument(
        "directory", type=user_path, metavar="DIR", help="the run directory (a path or URL)"
    )
    parser.add_argument("--step", type=count(0), metavar="S", help="the checkpoint's step")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
