"""Mode inference from metric names."""

from __future__ import annotations

from pathlib import Path

import pytest

from haltpoint import Checkpointer, EarlyStopping
from haltpoint.stopping.modes import infer_mode, resolve_mode

NAMES = [
    ("val_loss", "min"), ("loss", "min"), ("train/loss", "min"), ("eval_error", "min"),
    ("top5_err", "min"), ("val_perplexity", "min"), ("ppl", "min"), ("test_wer", "min"),
    ("cer", "min"), ("val_mse", "min"), ("mae", "min"), ("val_rmse", "min"), ("valLoss", "min"),
    ("nll", "min"), ("rec_loss", "min"), ("top5_error", "min"),
    ("val_acc", "max"), ("eval/accuracy", "max"), ("top1_acc", "max"), ("f1", "max"),
    ("macro_f1", "max"), ("val_auc", "max"), ("precision", "max"), ("recall", "max"),
    ("val_iou", "max"), ("bleu4", "max"), ("rouge2", "max"), ("rougeL", "max"), ("mAP", "max"),
    ("map@0.5", "max"), ("val_mAP50", "max"), ("dice", "max"), ("F1Score", "max"),
    ("neg_mse", "max"), ("neg_accuracy", "min"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "mode"), NAMES)
def test_infer_mode(name: str, mode: str) -> None:
    assert infer_mode(name) == mode


@pytest.mark.parametrize("name", ["throughput", "val", "lr", "epoch_time", "accumulate"])
def test_unknown_names_are_refused_with_the_list(name: str) -> None:
    with pytest.raises(
        ValueError,
        match=rf"mode='auto' cannot tell whether '{name}' .* Pass mode='min' or mode='max'\. "
        r"Known minimized names: \[.*'loss'.*\]; maximized: \[.*'accuracy'.*\]",
    ):
        infer_mode(name)


def test_disagreeing_tokens_are_refused() -> None:
    with pytest.raises(
        ValueError, match=r"its tokens disagree \(\{'acc': 'max', 'loss': 'min'\}\)"
    ):
        infer_mode("acc_loss")


def test_resolve_mode() -> None:
    assert resolve_mode("min", None) == "min"
    assert resolve_mode("max", "val_loss") == "max"  # an explicit mode always wins
    assert resolve_mode("auto", "val_f1") == "max"
    with pytest.raises(
        ValueError, match=r"mode must be one of \['min', 'max', 'auto'\]; got mode=1"
    ):
        resolve_mode(1, "val_loss")
    with pytest.raises(ValueError, match=r"but monitor=None"):
        resolve_mode("auto", None)


@pytest.mark.parametrize("monitor", [None, "val_loss", "score", "acc_loss", "my_metric"])
def test_a_mode_left_out_is_min(monitor: str | None) -> None:
    assert resolve_mode(None, monitor) == "min"


@pytest.mark.parametrize("monitor", ["val_acc", "eval/f1", "val_auroc"])
def test_a_mode_left_out_is_refused_for_a_maximized_name(monitor: str) -> None:
    with pytest.raises(ValueError, match=rf"monitor={monitor!r} reads as .* pass mode='max'"):
        resolve_mode(None, monitor)
    assert resolve_mode("min", monitor) == "min"  # said explicitly, it is the user's call


def test_a_checkpointer_told_no_mode_keeps_no_worst_checkpoint_for_accuracy(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"monitor='val_acc' reads as .* mode='max'"):
        Checkpointer(tmp_path / "run", monitor="val_acc", keep_best=1)
    assert not (tmp_path / "run").exists()  # refused before anything was created
    with pytest.raises(ValueError, match=r"mode='max'"):
        EarlyStopping("val_acc", patience=3)
    with Checkpointer(tmp_path / "ok", monitor="val_acc", mode="auto", keep_best=1) as ckpt:
        assert ckpt.mode == "max"
