"""The DeepOBS curves as the stopping benchmarks use them: short and long variants, in NumPy.

`load(path)` reads `deepobs_baselines_v1.1_epoch_curves.json.gz` (see ../shared/data/README.md)
and builds, from every run, honest variants of other lengths: the curve subsampled to every
k-th epoch (k in `STRIDES`) and cut to its first share (`CUTS`) of epochs. A cut run is judged
as if it had been planned that long: its reference is the best among the values it has. Only
variants of `MIN_LENGTH` to `MAX_LENGTH` evaluations are kept, so the benchmarks see runs of
20 to 351 evaluations. The parsed arrays are cached under /tmp (never in the repository),
keyed by the data file's size and mtime.

Every series is laid end to end in one array (`Curves.x`, curve c at
`x[start[c]:start[c] + length[c]]`), so a rule can be replayed over all curves with a few
vectorised NumPy operations.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from haltpoint.stopping.bands import BANDS

DATA = (
    Path(__file__).resolve().parent.parent.parent
    / "shared"
    / "data"
    / "deepobs_baselines_v1.1_epoch_curves.json.gz"
)
CACHE = Path("/tmp/haltpoint-stopping-curves-v2")
STRIDES = (1, 2, 4)  # keep every k-th epoch
CUTS = (1.0, 0.5, 0.25)  # keep the first share of the (subsampled) run
MIN_LENGTH, MAX_LENGTH = 20, 351


@dataclass(frozen=True)
class Curves:
    """Every variant of every run, end to end.

    Attributes:
        x: the watched series (test loss), all curves concatenated.
        acc: test accuracy at the same places (nan for problems without one).
        train: the training loss at the same places.
        start, length: where each curve lies in `x`.
        problem, optimizer, run: indices into `problems`, `optimizers` and the source runs.
        stride, cut: how the variant was made from its run (1, 1.0 for the run as recorded).
        problems, optimizers: the names.
    """

    x: np.ndarray
    acc: np.ndarray
    train: np.ndarray
    start: np.ndarray
    length: np.ndarray
    problem: np.ndarray
    optimizer: np.ndarray
    run: np.ndarray
    stride: np.ndarray
    cut: np.ndarray
    problems: tuple[str, ...]
    optimizers: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.start)

    def series(self, c: int, values: np.ndarray | None = None) -> list[float]:
        """Curve `c`'s watched values (or those of `values`, e.g. `train`) as a list."""
        s = int(self.start[c])
        source = self.x if values is None else values
        return [float(v) for v in source[s : s + int(self.length[c])]]

    def band(self) -> np.ndarray:
        """Each curve's band index (into `BANDS`)."""
        out = np.zeros(len(self), dtype=np.int64)
        for k, (_, low, high) in enumerate(BANDS):
            out[(self.length >= low) & (self.length <= high)] = k
        return out

    def has_acc(self) -> np.ndarray:
        """Whether each curve has a test accuracy series."""
        return np.isfinite(self.acc[self.start])

    def originals(self) -> np.ndarray:
        """Indices of the curves as recorded (stride 1, no cut)."""
        return np.flatnonzero((self.stride == 1) & (self.cut == 1.0))


def variants(length: int) -> list[tuple[int, float, int]]:
    """(stride, cut, variant length) for a run of `length` evaluations (epoch 0 included).

    Example:
        >>> variants(51)
        [(1, 1.0, 51), (1, 0.5, 26), (2, 1.0, 26)]
    """
    out = []
    for stride in STRIDES:
        sub = len(range(0, length, stride))
        for cut in CUTS:
            n = 1 + math.ceil((sub - 1) * cut)
            if MIN_LENGTH <= n <= MAX_LENGTH:
                out.append((stride, cut, n))
    return out


def build(runs: list[dict[str, Any]]) -> Curves:
    """The variants of `runs` (the parsed JSON)."""
    problems = tuple(sorted({r["testproblem"] for r in runs}))
    optimizers = tuple(sorted({r["optimizer"] for r in runs}))
    xs, accs, trains, meta = [], [], [], []
    for k, r in enumerate(runs):
        loss = np.asarray(r["test_losses"], dtype=np.float64)
        acc = np.asarray(r.get("test_accuracies") or [math.nan] * len(loss), dtype=np.float64)
        train = np.asarray(r.get("train_losses") or [math.nan] * len(loss), dtype=np.float64)
        for stride, cut, n in variants(len(loss)):
            xs.append(loss[::stride][:n])
            accs.append(acc[::stride][:n])
            trains.append(train[::stride][:n])
            meta.append(
                (problems.index(r["testproblem"]), optimizers.index(r["optimizer"]), k, stride, cut)
            )
    length = np.array([len(v) for v in xs], dtype=np.int64)
    start = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64)
    m = np.array(meta, dtype=np.float64)
    return Curves(
        x=np.concatenate(xs),
        acc=np.concatenate(accs),
        train=np.concatenate(trains),
        start=start,
        length=length,
        problem=m[:, 0].astype(np.int64),
        optimizer=m[:, 1].astype(np.int64),
        run=m[:, 2].astype(np.int64),
        stride=m[:, 3].astype(np.int64),
        cut=m[:, 4],
        problems=problems,
        optimizers=optimizers,
    )


def data_argument(description: str, argv: list[str]) -> Path:
    """The curves' path from the command line (`argv` without the program name): the one
    given, which must exist, else `DATA`. `--help` says so; a missing file is a one-line error
    (exit 2)."""
    path: Path = parse_with_data(argparse.ArgumentParser(description=description), argv).data
    return path


def parse_with_data(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`parser`'s arguments plus the curves' optional path (`data`), as `data_argument`."""
    parser.add_argument(
        "data",
        nargs="?",
        type=Path,
        help=f"the DeepOBS curves (.json.gz); default {DATA}, skipped when absent",
    )
    args = parser.parse_args(argv)
    if args.data is None:
        args.data = DATA
    elif not args.data.is_file():
        print(f"{parser.prog}: error: data file not found: {args.data}", file=sys.stderr)
        raise SystemExit(2)
    return args


def load(path: Path = DATA) -> Curves | None:
    """The curves of `path`, from the /tmp cache when it is current; None when absent."""
    if not path.exists():
        print(f"skipped: DeepOBS curves not found at {path} (see shared/data/README.md)")
        return None
    st = os.stat(path)
    key = CACHE / f"{st.st_size}-{int(st.st_mtime)}-{STRIDES}-{CUTS}.npz".replace(" ", "")
    if key.exists():
        with np.load(key, allow_pickle=False) as f:
            fields = {name: f[name] for name in f.files}
        fields["problems"] = tuple(str(p) for p in fields["problems"])
        fields["optimizers"] = tuple(str(p) for p in fields["optimizers"])
        return Curves(**fields)
    with gzip.open(path, "rt") as f:
        curves = build(json.load(f))
    CACHE.mkdir(parents=True, exist_ok=True)
    arrays = {k: getattr(curves, k) for k in Curves.__dataclass_fields__}
    arrays["problems"] = np.array(curves.problems)
    arrays["optimizers"] = np.array(curves.optimizers)
    tmp = key.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, key)
    return curves
