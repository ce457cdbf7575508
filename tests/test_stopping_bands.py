"""haltpoint.stopping.bands: which band a run falls in, and the figures pooled per band."""

from __future__ import annotations

import math

import pytest

from haltpoint.stopping.bands import BANDS, band_of, summarize_bands


def test_bands_cover_every_length_once() -> None:
    assert [band_of(n) for n in (0, 30, 31, 100, 101, 10**6)] == [
        "<= 30",
        "<= 30",
        "31-100",
        "31-100",
        "> 100",
        "> 100",
    ]
    assert [name for name, _, _ in BANDS] == ["<= 30", "31-100", "> 100"]
    with pytest.raises(ValueError, match=r"evaluations must be an int >= 0; got -1"):
        band_of(-1)


def test_summaries_pool_each_band() -> None:
    runs = [(20, 0.5, 0.0, 0.5), (25, 0.3, 0.02, 0.5), (50, 0.0, 0.0, 0.0)]
    short, middle = summarize_bands(runs)
    assert (short.band, short.runs, short.saved, short.share) == ("<= 30", 2, 0.4, 0.8)
    assert short.regret == 0.01 and short.harmful == 0.5
    assert middle.band == "31-100" and math.isnan(middle.share)  # the oracle saves nothing
