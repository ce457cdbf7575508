"""Which way is better: `"min"` or `"max"`, given explicitly or inferred from a metric's name."""

from __future__ import annotations

import re
from typing import Literal

__all__ = ["MAXIMIZED_NAMES", "MINIMIZED_NAMES", "Mode", "infer_mode", "resolve_mode"]

Mode = Literal["min", "max"]

#: Name tokens of metrics where lower is better.
MINIMIZED_NAMES: frozenset[str] = frozenset(
    {
        "loss", "losses", "error", "errors", "err", "perplexity", "ppl", "wer", "cer", "ter",
        "mse", "mae", "rmse", "msle", "rmsle", "mape", "smape", "nll", "bpc", "bpd", "fid",
        "kl", "kld", "brier", "logloss", "hinge", "huber", "eer", "regret", "cost",
    }
)  # fmt: skip

#: Name tokens of metrics where higher is better.
MAXIMIZED_NAMES: frozenset[str] = frozenset(
    {
        "acc", "accuracy", "f1", "fbeta", "auc", "auroc", "auprc", "precision", "recall",
        "iou", "miou", "bleu", "rouge", "rougel", "map", "ap", "dice", "r2", "mcc", "kappa",
        "ndcg", "mrr", "hits", "hitrate", "psnr", "ssim", "spearman", "pearson", "corr",
        "reward", "return", "em", "exact",
    }
)  # fmt: skip

# "neg_mse" (scikit-learn's convention) is a negated minimized metric, hence maximized.
_NEGATION = "neg"
_MODES = ("min", "max", "auto")
_SPLIT = re.compile(r"[^0-9A-Za-z]+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def _tokens(name: str) -> list[str]:
    tokens: list[str] = []
    for part in _SPLIT.split(name):
        for token in _CAMEL.split(part):
            if token:
                tokens.append(token.lower())
    return tokens


def _direction(token: str) -> Mode | None:
    for candidate in (token, token.rstrip("0123456789"), token.lstrip("0123456789")):
        if candidate in MINIMIZED_NAMES:
            return "min"
        if candidate in MAXIMIZED_NAMES:
            return "max"
    return None


def infer_mode(name: str) -> Mode:
    """Infer whether lower (`"min"`) or higher (`"max"`) is better from a metric's name.

    The name is split into tokens (`val_loss` -> `val`, `loss`; `eval/accuracy`; `top1_acc`;
    `valLoss`), trailing digits are ignored (`rouge2`, `map50`), and a `neg` token flips the
    direction (`neg_mse` is maximized).

    Args:
        name: the metric's name.

    Returns:
        `"min"` or `"max"`.

    Raises:
        ValueError: when no token is a known metric name, or tokens disagree (`acc_loss`).

    Example:
        >>> infer_mode("val_loss"), infer_mode("eval/accuracy"), infer_mode("top1_acc")
        ('min', 'max', 'max')
    """
    tokens = _tokens(name)
    found = {t: d for t in tokens if (d := _direction(t)) is not None}
    directions = set(found.values())
    if not directions:
        raise ValueError(
            f"mode='auto' cannot tell whether {name!r} should be minimized or maximized: none of "
            f"its tokens {tokens} is a known metric name. Pass mode='min' or mode='max'. Known "
            f"minimized names: {sorted(MINIMIZED_NAMES)}; maximized: {sorted(MAXIMIZED_NAMES)}"
        )
    if len(directions) > 1:
        raise ValueError(
            f"mode='auto' cannot tell whether {name!r} should be minimized or maximized: its "
            f"tokens disagree ({found}). Pass mode='min' or mode='max'"
        )
    mode = directions.pop()
    if _NEGATION in tokens:
        mode = "max" if mode == "min" else "min"
    return mode


def resolve_mode(mode: object, monitor: str | None) -> Mode:
    """Check `mode` and return `"min"` or `"max"`, inferring it from `monitor` for `"auto"`.

    A mode left unset (None) is `"min"`, Lightning's default, except for a monitor whose name
    reads as a metric where higher is better (`val_acc`, `eval/f1`): that is refused rather
    than ranked the wrong way up (a `keep_best` would keep the worst checkpoints).

    Raises:
        ValueError: for an unknown mode, `"auto"` with no monitor name or an unknown one, or
            no mode for a monitor named like a maximized metric.

    Example:
        >>> resolve_mode("auto", "val_acc"), resolve_mode(None, "val_loss")
        ('max', 'min')
    """
    if mode == "min" or mode == "max":
        return mode
    if mode is None:
        if monitor is not None and _reads_as_maximized(monitor):
            raise ValueError(
                f"mode is not given, and monitor={monitor!r} reads as a metric where higher is "
                "better; pass mode='max' (or mode='min' if lower is better there)"
            )
        return "min"
    if mode != "auto":
        raise ValueError(f"mode must be one of {list(_MODES)}; got mode={mode!r}")
    if monitor is None:
        raise ValueError(
            "mode='auto' infers the direction from the monitor's name, but monitor=None; "
            "pass a monitor name such as 'val_loss', or mode='min' or mode='max'"
        )
    return infer_mode(monitor)


def _reads_as_maximized(name: str) -> bool:
    try:
        return infer_mode(name) == "max"
    except ValueError:  # no known token, or tokens that disagree: not clearly maximized
        return False
