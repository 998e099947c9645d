"""``benchmarks/draws_null.py``: the spread of calibration_draws.py's "share of draws above the target" for
exchangeable scores, checked where it is known exactly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("draws_null", Path(__file__).parents[1] / "benchmarks" / "draws_null.py")
draws_null = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(draws_null)


def test_share_is_exact_when_every_scan_can_calibrate() -> None:
    # 6 scans, 3 calibrate; the plain rule at 30 % flags ⌊0.9⌋ = 0 of them, so τ sits just above their maximum; the
    # other 3 exceed 30 % when any of them is above it: when the largest of the six is among them, probability 3/6,
    # whatever the scores (only ranks matter).
    s = draws_null.spread(population=6, pool=6, n_cal=3, target=0.3, confidence=None, populations=5, draws=4000)
    assert s.shape == (5,)
    assert np.all(np.abs(s - 0.5) < 0.03)


def test_a_fixed_set_varies_when_the_pool_is_part_of_it() -> None:
    # drawing from a part of the scans, the share depends on which scores that part holds: sets differ
    s = draws_null.spread(population=60, pool=30, n_cal=20, target=0.07, confidence=None, populations=40, draws=200)
    assert s.std() > 0.05 and 0.0 <= s.min() < s.max() <= 1.0
    with pytest.raises(ValueError, match="pool"):
        draws_null.spread(population=10, pool=12, n_cal=5, target=0.1, confidence=None, populations=1, draws=1)
    # the product's rule refuses a confidence that 20 scans cannot give
    with pytest.raises(ValueError, match="at least"):
        draws_null.spread(population=60, pool=30, n_cal=20, target=0.07, confidence=0.9, populations=1, draws=1)
