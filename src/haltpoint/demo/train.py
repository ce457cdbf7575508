"""The demo's training loop: early stopping on val_loss, checkpoints, resume, best restored.

The loop is the four-line adoption from the README around a plain PyTorch epoch loop. It
knows nothing of the terminal: the command line passes callbacks to show progress.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from haltpoint.checkpointer import RNG_ENTRY, Checkpointer, CheckpointInfo
from haltpoint.demo.data import split_digits
from haltpoint.demo.model import DigitsNet
from haltpoint.stopping import Decision, EarlyStopping
from haltpoint.store.manifest import Manifest

__all__ = [
    "ENTRIES",
    "MONITOR",
    "DemoConfig",
    "DemoOutcome",
    "EpochResult",
    "evaluate",
    "is_demo_checkpoint",
    "train_demo",
]

MONITOR = "val_loss"
"""The metric the demo's stopper and checkpointer watch (lower is better)."""
ENTRIES = frozenset({"model", "optimizer", "stopper", "settings"})
"""The entries of the state the demo saves."""


def is_demo_checkpoint(manifest: Manifest) -> bool:
    """Whether `manifest` is one the demo saves: its entries, and its model's tensors by name
    and shape (a run of anybody else's is not the demo's to delete)."""
    if set(manifest.tree) - {RNG_ENTRY} != ENTRIES:
        return False
    saved = {k: r.shape for k, r in manifest.tensors.items() if k.startswith("model.")}
    return saved == _model_shapes()


@functools.cache
def _model_shapes() -> dict[str, tuple[int, ...]]:
    """The demo model's tensors by checkpoint name, with their shapes (built once, on the meta
    device: no memory, no draw from the random state)."""
    with torch.device("meta"):
        model = DigitsNet()
    return {f"model.{k}": tuple(t.shape) for k, t in model.state_dict().items()}


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo run (the seed fixes the data split, the init and the shuffles).

    >>> DemoConfig(max_epochs=3).patience
    5
    """

    max_epochs: int = 60
    patience: int = 5
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    threads: int = 1  # the net is tiny: one thread is fastest, and the same on every machine

    def __post_init__(self) -> None:
        for name in ("max_epochs", "patience", "batch_size", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class EpochResult:
    """One finished epoch: its metrics and the stopper's decision."""

    epoch: int
    train_loss: float
    val_loss: float
    val_acc: float
    decision: Decision

    @property
    def metrics(self) -> dict[str, float]:
        """The metrics saved with the checkpoint of this epoch."""
        return {"train_loss": self.train_loss, "val_loss": self.val_loss, "val_acc": self.val_acc}


@dataclass(frozen=True)
class DemoOutcome:
    """How a call of `train_demo` ended.

    Attributes:
        resumed_from: the step restored at the start, or None for a fresh run.
        already_done: the run had stopped (or used all its epochs) before this call.
        stopped_early: the stopper ended the run (now or in an earlier call).
        reason: why training ended, as a sentence.
        last_epoch: the last epoch trained (-1 when none).
        best_epoch, best_val_loss: the best checkpoint by val_loss, restored at the end.
        test_loss, test_acc: of the restored best model on the held-out test set.
        test_labels, test_predicted: the test set's labels and that model's predictions.
    """

    resumed_from: int | None
    already_done: bool
    stopped_early: bool
    reason: str
    last_epoch: int
    best_epoch: int
    best_val_loss: float
    test_loss: float
    test_acc: float
    test_labels: torch.Tensor
    test_predicted: torch.Tensor


StartHook = Callable[[CheckpointInfo | None, EarlyStopping], None]
EpochHook = Callable[[EpochResult], None]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: tuple[torch.Tensor, torch.Tensor],
    batch_size: int,
) -> float:
    images, labels = data
    model.train()
    order = torch.randperm(len(labels))  # the global generator: its state is checkpointed
    total = 0.0
    for start in range(0, len(labels), batch_size):
        idx = order[start : start + batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
    return total / len(labels)


@torch.no_grad()
def evaluate(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` on `(images, labels)`.

    >>> from haltpoint.demo.data import split_digits
    >>> loss, acc = evaluate(DigitsNet(), split_digits().val)
    >>> 0.0 <= acc <= 1.0 and loss > 0
    True
    """
    images, labels = data
    model.eval()
    logits = model(images)
    loss = nn.functional.cross_entropy(logits, labels)
    acc = (logits.argmax(dim=1) == labels).float().mean()
    return float(loss), float(acc)


def train_demo(
    run_dir: str,
    config: DemoConfig | None = None,
    *,
    on_start: StartHook | None = None,
    on_epoch: EpochHook | None = None,
) -> DemoOutcome:
    """Train (or resume, or just summarise) the demo run in `run_dir`.

    A run that the stopper ended stays ended: the stopper's state is in the checkpoint, so a
    second call restores it, trains nothing and reports the same reason. A KeyboardInterrupt
    propagates after the save in flight is committed, leaving a resumable run.
    """
    config = config or DemoConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train(run_dir, config, on_start, on_epoch)
    finally:
        torch.set_num_threads(threads)


def _train(
    run_dir: str, config: DemoConfig, on_start: StartHook | None, on_epoch: EpochHook | None
) -> DemoOutcome:
    _seed_everything(config.seed)
    split = split_digits(seed=config.seed)
    model = DigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    stopper = EarlyStopping(MONITOR, mode="min", patience=config.patience)
    settings = {"seed": config.seed, "batch_size": config.batch_size, "lr": config.lr}
    state: dict[str, Any] = {
        "model": model,
        "optimizer": optimizer,
        "stopper": stopper,
        "settings": settings,
    }

    with Checkpointer(
        run_dir, monitor=MONITOR, mode="min", keep_best=1, keep_last=2, async_save=True
    ) as ckpt:
        info = ckpt.restore(state)
        saved = state["settings"]
        if saved != settings:
            differ = ", ".join(
                f"{k} {saved.get(k)!r} (not {v!r})"
                for k, v in settings.items()
                if saved.get(k) != v
            )
            raise ValueError(
                f"{run_dir} was trained with {differ}; resume it with the same settings, or "
                "start again with --fresh"
            )
        if on_start is not None:
            on_start(info, stopper)
        start = info.step + 1 if info is not None else 0
        already_done = stopper.stopped or start >= config.max_epochs
        last_epoch = start - 1
        for epoch in range(start, config.max_epochs):
            if stopper.stopped:
                break
            train_loss = _train_epoch(model, optimizer, split.train, config.batch_size)
            val_loss, val_acc = evaluate(model, split.val)
            metrics = {"train_loss": train_loss, MONITOR: val_loss, "val_acc": val_acc}
            decision = stopper.step(metrics)
            ckpt.save(epoch, state, metrics)
            last_epoch = epoch
            if on_epoch is not None:
                on_epoch(EpochResult(epoch, train_loss, val_loss, val_acc, decision))
        best = ckpt.restore({"model": model}, "best", strict=False)

    if best is None:  # pragma: no cover - "best" raises rather than returning None
        raise RuntimeError("no best checkpoint after training")
    test_loss, test_acc = evaluate(model, split.test)
    with torch.no_grad():
        predicted = model(split.test[0]).argmax(dim=1)
    trained = last_epoch + 1
    if stopper.stopped:
        reason = str(stopper.reason)
    elif trained > config.max_epochs:  # an earlier call trained it with a larger --epochs
        reason = (
            f"had already trained {trained} epochs, past the maximum of {config.max_epochs}, "
            f"before early stopping (patience {config.patience} on {MONITOR}) triggered; pass "
            f"--epochs N with N > {trained} to train longer"
        )
    else:
        reason = (  # where the stopper stood says how far it was from stopping
            f"reached the maximum of {config.max_epochs} epochs before early stopping "
            f"triggered: {stopper.explain()}; pass --epochs N to train longer"
        )
    return DemoOutcome(
        resumed_from=None if info is None else info.step,
        already_done=already_done,
        stopped_early=stopper.stopped,
        reason=reason,
        last_epoch=last_epoch,
        best_epoch=best.step,
        best_val_loss=float(best.metrics[MONITOR]),
        test_loss=test_loss,
        test_acc=test_acc,
        test_labels=split.test[1],
        test_predicted=predicted,
    )
