"""Learning-curve plots of a run's `history.jsonl`, with the best and the stop marked.

matplotlib is optional (`pip install 'haltpoint[plot]'`) and imported only when a plot is
drawn; no pyplot global state is touched (an Agg canvas renders straight to the file).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from haltpoint.stopping.modes import infer_mode
from haltpoint.store.storage import replace_file

__all__ = [
    "LABEL_LIMIT",
    "MAX_CURVES",
    "MissingDependencyError",
    "PlotSummary",
    "curves",
    "image_formats",
    "last_branch",
    "plot_history",
    "require_matplotlib",
]

_INSTALL = "pip install 'haltpoint[plot]'"
_LARGEST = 1e300
"""The largest finite magnitude plotted: from about 1e307 on, matplotlib's ticks overflow."""
MAX_CURVES = 40
"""The most curves `plot_history` draws when not told which metrics: matplotlib took 40 s
for 5,000 curves and their legend, and a crafted history of a few MB names millions."""
LABEL_LIMIT = 80
"""The longest legend label drawn (longer metric names are cut): matplotlib took 11 s to lay
out one of 100,000 characters, and a history line may hold hundreds of millions."""


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message says what to install."""


def require_matplotlib() -> ModuleType:
    """Import matplotlib, or raise `MissingDependencyError` naming the install command."""
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingDependencyError(
            f"plotting needs matplotlib, which is not installed; install it with: {_INSTALL}"
        ) from exc
    return matplotlib


def image_formats() -> list[str]:
    """The file suffixes (without the dot) that `plot_history` can write: png, svg, pdf, ...

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return sorted(FigureCanvasAgg.get_supported_filetypes())


@dataclass(frozen=True)
class PlotSummary:
    """What a plot shows: its file, the metrics drawn, and the marked best and stop steps."""

    path: str
    metrics: tuple[str, ...]
    monitor: str | None
    best_step: int | None
    best_value: float | None
    stop_step: int | None
    left_out: int = 0
    """Finite values beyond +-1e300 (a diverged run), left out of the curves like NaN."""
    not_plotted: int = 0
    """Metrics with values that were not drawn: beyond `MAX_CURVES`, when not told which."""


def curves(
    records: Sequence[Mapping[str, Any]], metrics: Sequence[str] | None = None
) -> dict[str, tuple[list[int], list[float]]]:
    """`{metric: (steps, values)}` from history records, in step order.

    The records are the run's last branch (`last_branch`): a record of a step at or before
    an earlier one (saved after `restore(which=N)` rewound the run) drops the records of the
    abandoned steps from it on. `metrics` picks and orders the names; default: every name,
    first seen first. A value that is no number (or an int too large for a float), or a
    record whose step is no int in [0, 2**63) (what a manifest holds), is passed over.

    >>> curves([{"step": 0, "metrics": {"loss": 1.0}}, {"step": 1, "metrics": {"loss": 0.5}}])
    {'loss': ([0, 1], [1.0, 0.5])}

    Raises:
        ValueError: a requested metric is in no record (the message lists the names found).
    """
    by_step: dict[int, Mapping[str, Any]] = {}
    names: dict[str, None] = {}  # first seen first; a dict, so that millions of names are cheap
    for step, record in last_branch(records):
        values = record.get("metrics")
        if isinstance(values, Mapping):
            by_step[step] = values
            names.update(dict.fromkeys(values))
    wanted = list(metrics) if metrics else list(names)
    missing = [name for name in wanted if name not in names]
    if missing:
        raise ValueError(
            f"metric {', '.join(map(repr, missing))} is not in the history; "
            f"it holds {', '.join(map(repr, names)) or 'no metrics'}"
        )
    result: dict[str, tuple[list[int], list[float]]] = {name: ([], []) for name in wanted}
    for step in sorted(by_step):  # one pass over the values: names x steps can be vast
        for name, raw in by_step[step].items():
            curve = result.get(name)
            if curve is not None and (value := _number(raw)) is not None:
                curve[0].append(step)
                curve[1].append(value)
    return result


def _number(value: Any) -> float | None:
    """`value` as a float; None for anything else (an int beyond a float's range included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def _plottable(value: float) -> float:
    """``value``, or NaN beyond the magnitude a plot can show."""
    return value if abs(value) <= _LARGEST else math.nan


def last_branch(records: Sequence[Mapping[str, Any]]) -> list[tuple[int, Mapping[str, Any]]]:
    """The `(step, record)` pairs of the branch a run saved last, in step order.

    A history is in commit order. A step at or before an earlier one was saved after a
    rewind (`restore(which=N)`, or a step logged again): from it on, the earlier records
    belong to the abandoned branch and are dropped, as "latest" follows the branch saved
    last. A record whose step is no int in [0, 2**63) is passed over.

    >>> [s for s, _ in last_branch([{"step": s} for s in (0, 1, 2, 3, 1, 2)])]
    [0, 1, 2]
    """
    kept: list[tuple[int, Mapping[str, Any]]] = []
    for record in records:
        step = _step(record.get("step"))
        if step is None:
            continue
        while kept and kept[-1][0] >= step:
            kept.pop()
        kept.append((step, record))
    return kept


def _stop_step(records: Sequence[Mapping[str, Any]]) -> int | None:
    for step, record in last_branch(records):
        stopper = record.get("stopper")
        if isinstance(stopper, Mapping) and stopper.get("stop") is True:
            return step
    return None


def _step(value: Any) -> int | None:
    """`value` if it is a step a manifest can hold (an int in [0, 2**63)), else None."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        return None
    return value


def _best(series: tuple[list[int], list[float]], mode: str) -> tuple[int | None, float | None]:
    best_step, best_value = None, None
    for step, value in zip(*series, strict=True):
        if math.isfinite(value) and (
            best_value is None or (value < best_value if mode == "min" else value > best_value)
        ):
            best_step, best_value = step, value
    return best_step, best_value


def _label(text: str) -> str:
    r"""`text` as matplotlib draws it literally: `$` escaped (no mathtext parse, which a
    metric name like `$\frac{$` would fail), lone surrogates written as escapes.

    >>> _label("$\\frac{$ \ud800")
    '\\$\\frac{\\$ \\ud800'
    """
    if len(text) > LABEL_LIMIT:
        text = text[: LABEL_LIMIT - 3] + "..."
    plain = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return plain.replace("$", r"\$")


def _direction(name: str) -> str | None:
    try:
        return infer_mode(name)
    except ValueError:
        return None


def plot_history(
    records: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    metrics: Sequence[str] | None = None,
    monitor: str | None = None,
    mode: str | None = None,
    title: str | None = None,
) -> PlotSummary:
    """Draw the metric curves of `records` into an image at `path` (its suffix picks the format).

    Metrics where lower is better (losses) and the others (accuracies) go in two panels side
    by side. The best value of `monitor` (by `mode`, inferred from its name when None) and the
    step where the stopper stopped (from the records' `stopper` decisions) are marked.

    Raises:
        MissingDependencyError: matplotlib is not installed.
        ValueError: no record holds a metric, a requested one is missing, or the suffix of
            `path` is not an image format matplotlib writes (`.png`, `.svg`, `.pdf`, ...).

    Finite values beyond +-1e300 (matplotlib's ticks overflow near a float's limit) are left
    out like NaN, as gaps in their curve, and counted in `PlotSummary.left_out`.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = os.fspath(path)
    suffix = os.path.splitext(out)[1].lstrip(".").lower()
    formats = image_formats()
    if suffix not in formats:
        raise ValueError(
            f"cannot tell the image format of {out!r} from its suffix; end the file name with "
            f"one of {', '.join('.' + f for f in formats)} (e.g. curves.png)"
        )
    series = curves(records, metrics)
    series = {name: s for name, s in series.items() if s[0]}
    if not series:
        raise ValueError("the history holds no metric values to plot; save with metrics=...")
    if monitor is not None and monitor not in series:
        raise ValueError(
            f"monitor {monitor!r} is not among the plotted metrics {sorted(series)}; "
            "pass one of them"
        )
    not_plotted = 0
    if metrics is None and len(series) > MAX_CURVES:  # the first seen, and the monitor
        first = [name for name in series if name != monitor][: MAX_CURVES - (monitor is not None)]
        kept = set(first) | ({monitor} if monitor is not None else set())
        not_plotted = len(series) - len(kept)
        series = {name: s for name, s in series.items() if name in kept}
    left_out = sum(abs(v) > _LARGEST for _, values in series.values() for v in values)
    series = {
        name: (steps, [_plottable(v) for v in values]) for name, (steps, values) in series.items()
    }
    best_step, best_value = None, None
    if monitor is not None:
        mode = mode or infer_mode(monitor)
        best_step, best_value = _best(series[monitor], mode)
    stop_step = _stop_step(records)

    lower = [n for n in series if _direction(n) == "min"]
    other = [n for n in series if n not in lower]
    groups = [(g, label) for g, label in ((lower, "loss"), (other, "score")) if g]
    fig = Figure(figsize=(5.2 * len(groups), 4.0), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    for index, (names, ylabel) in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), index + 1)
        for name in names:
            steps, values = series[name]
            style = "-" if name == monitor else "--"
            ax.plot(steps, values, style, marker="o", markersize=3, label=_label(name))
        if best_step is not None:
            ax.axvline(best_step, color="tab:green", linestyle=":", linewidth=1.5)
            if monitor in names and best_value is not None:
                ax.plot(
                    [best_step],
                    [best_value],
                    marker="*",
                    markersize=14,
                    color="tab:green",
                    linestyle="none",
                    label=_label(f"best {monitor} {best_value:.4g} (step {best_step})"),
                )
        if stop_step is not None:
            ax.axvline(
                stop_step,
                color="tab:red",
                linestyle="--",
                linewidth=1.5,
                label=f"stopped (step {stop_step})" if index == 0 else None,
            )
        values = [v for name in names for v in series[name][1] if math.isfinite(v)]
        if ylabel == "loss" and values and min(values) > 0:
            ax.set_yscale("log")  # over-fitting shows as a rising val_loss, clearer in log
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel + (" (log scale)" if ax.get_yscale() == "log" else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(_label(title))
    replace_file(out, lambda tmp: fig.savefig(tmp, format=suffix))  # never through a link
    return PlotSummary(
        out, tuple(series), monitor, best_step, best_value, stop_step, left_out, not_plotted
    )
