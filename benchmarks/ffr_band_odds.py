"""How often a site's measured clean false-flag rate lands within ±BAND of the target on N_TEST test scans, for a
gate calibrated on N_CAL clean scans (τ flags ⌊target · N_CAL⌋ of them) — and for a perfect τ — with exchangeable
clean scores: the odds of the "within 2 points on each site's test split" target, before any model enters.

    python benchmarks/ffr_band_odds.py --target 0.05 --band 0.02 --n-test 180 --n-cal 100,180,720 --sites 4

With τ above the k-th largest of n calibration scores, the chance that a new clean score exceeds τ is
Beta(k + 1, n − k) distributed; the test count is binomial given it.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
from scipy import stats


def within_band(target: float, band: float, n_test: int, n_cal: int | None) -> float:
    """P(|flagged / n_test − target| ≤ band) for τ set on n_cal scans (None: a τ whose true rate is the target)."""
    lo, hi = math.ceil((target - band) * n_test - 1e-9), math.floor((target + band) * n_test + 1e-9)
    if n_cal is None:
        return float(stats.binom.cdf(hi, n_test, target) - stats.binom.cdf(lo - 1, n_test, target))
    k = math.floor(target * n_cal)
    rate = stats.beta(k + 1, n_cal - k)
    edges = np.linspace(0.0, 1.0, 20001)
    mass = np.diff(rate.cdf(edges))
    mid = 0.5 * (edges[1:] + edges[:-1])
    p = stats.binom.cdf(hi, n_test, mid) - stats.binom.cdf(lo - 1, n_test, mid)
    return float((mass * p).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.05)
    ap.add_argument("--band", type=float, default=0.02)
    ap.add_argument("--n-test", type=int, default=180)
    ap.add_argument("--n-cal", default="100,180,720", help="Calibration set sizes, comma-separated.")
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--out", help="Write the table as JSON here.")
    a = ap.parse_args()
    rows = []
    for n_cal in [None, *(int(v) for v in a.n_cal.split(","))]:
        one = within_band(a.target, a.band, a.n_test, n_cal)
        rows.append({"n_cal": n_cal, "one_site": one, "every_site": one ** a.sites})
    print(f"target {a.target:.0%} ± {a.band * 100:g} points on {a.n_test} test scans per site, {a.sites} sites")
    print(f"{'calibration scans':>18} | {'one site':>8} | {'every site':>10}")
    for r in rows:
        name = "perfect τ" if r["n_cal"] is None else str(r["n_cal"])
        print(f"{name:>18} | {r['one_site']:8.3f} | {r['every_site']:10.3f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
