"""Stopping figures per run-length band: how a rule does on short, medium and long runs.

The default rule is judged separately on runs of at most 30, 31 to 100 and over 100
evaluations (`BANDS`), because a wait that fits a long run can be most of a short one. The
benchmarks and `haltpoint replay` over several runs report the same figures per band: runs,
mean share of evaluations saved, that as a share of what the zero-regret oracle (stopping
right after each run's best) saves, mean relative regret, and the share of runs losing more
than 1%.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["BANDS", "HARMFUL", "BandSummary", "band_of", "summarize_bands"]

#: (name, fewest, most evaluations) of each band.
BANDS: tuple[tuple[str, int, int], ...] = (
    ("<= 30", 0, 30),
    ("31-100", 31, 100),
    ("> 100", 101, 2**62),
)
#: A stop is harmful when its regret exceeds this (1%).
HARMFUL = 0.01


def band_of(evaluations: int) -> str:
    """The name of the band a run of `evaluations` falls in.

    Example:
        >>> band_of(26), band_of(31), band_of(351)
        ('<= 30', '31-100', '> 100')
    """
    for name, low, high in BANDS:
        if low <= evaluations <= high:
            return name
    raise ValueError(f"evaluations must be an int >= 0; got {evaluations!r}")


@dataclass(frozen=True, slots=True)
class BandSummary:
    """Pooled figures of one band.

    Attributes:
        band: the band's name.
        runs: runs in it.
        saved: mean share of evaluations not run.
        share: `saved` over the oracle's mean saving (nan when the oracle saves nothing).
        regret: mean relative regret.
        harmful: share of runs whose regret exceeds `HARMFUL`.
    """

    band: str
    runs: int
    saved: float
    share: float
    regret: float
    harmful: float


def summarize_bands(runs: Iterable[tuple[int, float, float, float]]) -> list[BandSummary]:
    """Per band (those with runs, in `BANDS` order), from `(evaluations, saving, regret,
    oracle saving)` per run.

    Example:
        >>> [s.band for s in summarize_bands([(20, 0.5, 0.0, 0.5), (200, 0.1, 0.02, 0.2)])]
        ['<= 30', '> 100']
        >>> summarize_bands([(200, 0.1, 0.02, 0.2)])[0].share
        0.5
    """
    groups: dict[str, list[tuple[float, float, float]]] = {}
    for evaluations, saving, regret, oracle in runs:
        groups.setdefault(band_of(evaluations), []).append((saving, regret, oracle))
    out = []
    for name, _, _ in BANDS:
        members = groups.get(name)
        if not members:
            continue
        n = len(members)
        saved = sum(s for s, _, _ in members) / n
        oracle = sum(o for _, _, o in members) / n
        out.append(
            BandSummary(
                band=name,
                runs=n,
                saved=saved,
                share=saved / oracle if oracle > 0 else math.nan,
                regret=sum(r for _, r, _ in members) / n,
                harmful=sum(r > HARMFUL for _, r, _ in members) / n,
            )
        )
    return out
