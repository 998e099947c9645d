"""``benchmarks/ffr_band_odds.py``: the odds that a calibrated gate's test false-flag rate lands within the band,
against a direct simulation of exchangeable clean scores."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("ffr_band_odds",
                                               Path(__file__).parents[1] / "benchmarks" / "ffr_band_odds.py")
odds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(odds)


@pytest.mark.parametrize("n_cal", [None, 100, 180])
def test_band_odds_match_a_simulation(n_cal: int | None) -> None:
    rng = np.random.default_rng(0)
    trials, n_test, target, band = 40_000, 180, 0.05, 0.02
    if n_cal is None:
        rate = np.full(trials, target)
    else:  # τ flags ⌊target · n_cal⌋ of n_cal uniform clean scores: above the k-th largest
        k = math.floor(target * n_cal)
        cal = np.sort(rng.random((trials, n_cal)), axis=1)
        rate = 1.0 - cal[:, n_cal - k - 1]
    flagged = rng.binomial(n_test, rate)
    simulated = float(np.mean(np.abs(flagged / n_test - target) <= band + 1e-9))
    assert odds.within_band(target, band, n_test, n_cal) == pytest.approx(simulated, abs=0.01)


def test_band_edges() -> None:
    assert odds.within_band(0.05, 0.5, 180, None) == pytest.approx(1.0)
    assert odds.within_band(0.05, 0.02, 180, 720) > odds.within_band(0.05, 0.02, 180, 100)
