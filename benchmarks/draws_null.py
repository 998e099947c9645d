"""What `calibration_draws.py`'s "share of draws above the target" reads when the clean scores are exchangeable, for
one profile's fixed set of scans: its spread across such sets, so that a measured share can be read against it.

`calibration_draws.py` draws the n calibration scans from the POOL scans of one profile's POPULATION (e.g. 100 of
the 212 train scans of 300) and measures the flagged share of the other POPULATION − n. That share has two sources
of spread that the calibration rule's promise (the true rate above the target with probability ≤ 1 − confidence)
does not speak of: the other scans' own binomial spread, and which set of POPULATION scans the profile happens to
be. This simulates both with exchangeable continuous scores (any distribution gives the same ranks):

    python benchmarks/draws_null.py --population 300 --pool 212 --n-cal 100 --target 0.07 --confidence 0.9 \
        --observed 0.049,0.102,0.158,0.056 --out benchmarks/results/ffr/draws_null.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from medfedpure.gate.calibration import threshold_at_ffr


def share_above(scores: np.ndarray, pool: int, n_cal: int, target: float, confidence: float | None, draws: int,
                rng: np.random.Generator) -> float:
    """For one set of scores: the share of random calibration draws (n_cal of the first ``pool``, τ by the product's
    rule, ``gate.calibration.threshold_at_ffr``) whose flagged share of the other scans exceeds ``target``."""
    n = len(scores)
    above = 0
    for _ in range(draws):
        idx = rng.permutation(pool)[:n_cal]
        rest = np.ones(n, bool)
        rest[idx] = False
        tau, _ = threshold_at_ffr(scores[idx], target, confidence=confidence)
        above += int((scores[rest] >= tau).mean() > target)
    return above / draws


def spread(population: int, pool: int, n_cal: int, target: float, confidence: float | None, populations: int,
           draws: int, seed: int = 0) -> np.ndarray:
    """The share above the target for each of ``populations`` independent sets of exchangeable scores."""
    if not 0 < n_cal <= pool <= population:
        raise ValueError(f"need 0 < n_cal ({n_cal}) <= pool ({pool}) <= population ({population})")
    rng = np.random.default_rng(seed)
    return np.array([share_above(rng.standard_normal(population).astype(np.float32), pool, n_cal, target, confidence,
                                 draws, rng) for _ in range(populations)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--population", type=int, default=300)
    ap.add_argument("--pool", type=int, default=212)
    ap.add_argument("--n-cal", type=int, default=100)
    ap.add_argument("--target", type=float, default=0.07)
    ap.add_argument("--confidence", type=float, default=0.9, help="the calibration rule's confidence (0: the plain rule)")
    ap.add_argument("--populations", type=int, default=300)
    ap.add_argument("--draws", type=int, default=400)
    ap.add_argument("--observed", default="", help="measured shares to place in the spread, comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    a = ap.parse_args()
    s = spread(a.population, a.pool, a.n_cal, a.target, a.confidence or None, a.populations, a.draws, a.seed)
    q = {f"p{int(100 * p)}": float(np.quantile(s, p)) for p in (0.05, 0.5, 0.9, 0.95)}
    print(f"share of draws above {a.target:.0%} on the other {a.population - a.n_cal} scans, {a.populations} sets of "
          f"{a.population} exchangeable scores × {a.draws} draws: mean {s.mean():.3f}, "
          + ", ".join(f"{k} {v:.3f}" for k, v in q.items()))
    observed = [float(v) for v in a.observed.split(",") if v]
    at_or_above = {str(v): float((s >= v).mean()) for v in observed}
    for v, p in at_or_above.items():
        print(f"  a share of {float(v):.3f} or more: {p:.1%} of the sets")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({**vars(a), "mean": float(s.mean()), **q, "at_or_above": at_or_above, "shares": s.tolist()}, f,
                      indent=1)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
