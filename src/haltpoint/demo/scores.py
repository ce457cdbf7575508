"""The demo's test scores of the restored best model, computed by scikit-learn."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from haltpoint.plotting import MissingDependencyError

__all__ = ["INSTALL", "Scores", "score"]

INSTALL = "pip install 'haltpoint[demo]'"


@dataclass(frozen=True)
class Scores:
    """Accuracy and the macro averages (the mean over the classes) of precision, recall, F1."""

    accuracy: float
    precision: float
    recall: float
    f1: float


def score(labels: torch.Tensor, predicted: torch.Tensor) -> Scores:
    """The scores of `predicted` against `labels`, by `sklearn.metrics`.

    >>> s = score(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1]))
    >>> round(s.accuracy, 4), round(s.precision, 4), round(s.recall, 4), round(s.f1, 4)
    (0.75, 0.8333, 0.75, 0.7333)

    Raises:
        MissingDependencyError: scikit-learn is not installed.
    """
    try:
        from sklearn.metrics import accuracy_score, precision_recall_fscore_support
    except ImportError as exc:
        raise MissingDependencyError(
            f"the test scores need scikit-learn, which is not installed; install it with: {INSTALL}"
        ) from exc
    y_true, y_pred = labels.numpy(), predicted.numpy()
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, average="macro", zero_division=0
    )
    return Scores(float(accuracy_score(y_true, y_pred)), float(precision), float(recall), float(f1))
