"""What both trainer adapters share: argument checks, metric reading, restoring the best weights.

Nothing here imports a trainer; the adapters pass in what they read from theirs.
"""

from __future__ import annotations

import math
import random
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

from haltpoint import Checkpointer, EarlyStopping, StateMismatchError

__all__ = [
    "announce_resume",
    "check_arguments",
    "load_stopper_state",
    "missing_metric_error",
    "restore_best_weights",
    "scalar_metrics",
    "snapshot_rng",
]


def check_arguments(
    stopper: EarlyStopping | None,
    checkpointer: Checkpointer | None,
    restore_best: bool,
    resume: bool,
) -> None:
    """Refuse argument combinations that could only fail later, in the middle of a run."""
    if stopper is not None and not isinstance(stopper, EarlyStopping):
        raise TypeError(
            f"stopper must be a haltpoint.EarlyStopping or None, got {type(stopper).__name__}"
        )
    if checkpointer is not None and not isinstance(checkpointer, Checkpointer):
        raise TypeError(
            f"checkpointer must be a haltpoint.Checkpointer or None, got "
            f"{type(checkpointer).__name__}"
        )
    for name, value in (("restore_best", restore_best), ("resume", resume)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if stopper is not None and stopper.monitor is None:
        raise ValueError(
            "the stopper needs a monitor to read from the trainer's metrics, e.g. "
            "EarlyStopping('val_loss', patience=3)"
        )
    if checkpointer is None and (restore_best or resume):
        flag = "restore_best" if restore_best else "resume"
        raise ValueError(f"{flag}=True needs a checkpointer=Checkpointer(...) to read from")
    if restore_best and checkpointer is not None and checkpointer.monitor is None:
        raise ValueError(
            "restore_best=True needs Checkpointer(..., monitor=..., keep_best=1) so that the "
            "best checkpoint can be found"
        )
    if (
        stopper is not None
        and checkpointer is not None
        and checkpointer.monitor == stopper.monitor
        and checkpointer.mode != stopper.mode
    ):
        raise ValueError(
            f"the stopper and the checkpointer both watch {stopper.monitor!r} but disagree on "
            f"the direction (mode={stopper.mode!r} vs mode={checkpointer.mode!r})"
        )


def scalar_metrics(raw: Mapping[str, Any]) -> dict[str, float]:
    """The entries of `raw` that are numbers or one-element tensors, as floats."""
    result: dict[str, float] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or isinstance(value, bool):
            continue
        if hasattr(value, "numel") and hasattr(value, "item"):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            result[name] = float(value)
    return result


def announce_resume(
    where: str | None, stopper: EarlyStopping | None, finished: str | None = None
) -> None:
    """Print one line on stderr saying where the run resumed, as `haltpoint demo` does.

    A resume changes what training does, so it is said whether or not logging is set up.
    `where` names what was restored (`step 12 in runs/x`, a trainer's checkpoint file), None
    for a stopper that stopped in an earlier fit of this process; `finished` says why a run
    that did not stop early has nothing left to train, if so.

    >>> announce_resume("step 12 in runs/x", None)  # doctest: +SKIP
    haltpoint: resumed from step 12 in runs/x
    """
    parts = [] if where is None else [f"resumed from {where}"]
    if stopper is not None and stopper.stopped:
        parts.append(f"the run had already stopped: {stopper.reason}")
        if where is None:
            parts.append("nothing to train (stopper.clear_stop() trains on past the stop)")
    elif finished is not None:
        parts.append(f"the run had already finished: {finished}")
    print("haltpoint: " + "; ".join(parts), file=sys.stderr, flush=True)


def load_stopper_state(stopper: EarlyStopping, saved: Any, where: str) -> None:
    """Load `saved`, read from a trainer's own checkpoint (`where` names it), into `stopper`;
    a state the stopper refuses is one `StateMismatchError` line, never its TypeError or
    ValueError from inside a callback."""
    try:
        stopper.load_state_dict(saved)
    except (TypeError, ValueError) as exc:
        message = f"{where} holds a stopper state this stopper cannot load: {exc}"
        raise StateMismatchError(message) from None


def missing_metric_error(name: str, keys: Iterable[str], where: str, hint: str) -> ValueError:
    """The error for a monitored metric the trainer never reported."""
    return ValueError(
        f"haltpoint: the monitored metric {name!r} was not logged; {where} the metrics were "
        f"{sorted(keys)}. {hint}"
    )


def restore_best_weights(
    checkpointer: Checkpointer, model: Any, stopper: EarlyStopping | None, which: str = "best"
) -> int:
    """Load only the model weights of the `which` checkpoint into `model`; return its step.

    The optimizer, the stopper and the random state are left as they are: this is the end of
    training, not a resume.
    """
    capture = checkpointer.capture_rng
    checkpointer.capture_rng = False  # restore() reads this flag: keep the current RNG state
    try:
        info = checkpointer.restore({"model": model}, which, strict=False)
    finally:
        checkpointer.capture_rng = capture
    if info is None:
        raise ValueError(f"{checkpointer.directory} holds no checkpoint to restore")
    report = info.report
    bad = [] if report is None else [*report.missing, *report.unexpected]
    bad = [key for key in bad if key == "model" or key.startswith("model.")]
    if bad:
        raise StateMismatchError(
            f"the {which} checkpoint (step {info.step}) does not match the model: {bad[:10]}",
            path=info.path,
        )
    monitor = checkpointer.monitor
    if (
        which == "best"
        and stopper is not None
        and monitor == stopper.monitor
        and stopper.best is not None
        and monitor is not None
        and not math.isclose(info.metrics.get(monitor, math.nan), stopper.best, rel_tol=1e-12)
    ):
        warnings.warn(
            f"haltpoint: restored the best checkpoint kept (step {info.step}, {monitor}="
            f"{info.metrics.get(monitor)}), but the stopper's best was {stopper.best}: its "
            "checkpoint was not saved or was removed by retention; pass keep_best=1 or more to "
            "the Checkpointer",
            stacklevel=3,
        )
    return info.step


def snapshot_rng() -> Callable[[], None]:
    """Capture the Python, NumPy, torch and CUDA random states; the result puts them back.

    A trainer may draw random numbers between the point where a run is restored and the point
    that matches where it was saved (Lightning creates a data-loader iterator at the start of
    every fit); an adapter restores, snapshots, and puts the snapshot back at the right moment.
    """
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def put_back() -> None:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    return put_back
