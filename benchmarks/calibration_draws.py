"""How the false-flag rate on a site's new clean scans varies with which of its scans calibrated τ.

`medfedpure calibrate --bundle` sets τ on the n clean scans a site gives it; the rate the site then sees on its
other scans depends on that draw. This scores every scan of one site once through the Defender (the bundle's
gate statistic; τ plays no part in the score), then repeats the calibration rule of `gate.calibration` on many
random draws of n scans from the pool split and measures the flagged share of all the site's other scans, for
the plain rule (flag ⌊f·n⌋ of the n) and for each `--confidence` level. It also says whether the scores are
alike across the site's splits and classes (two-sample Kolmogorov-Smirnov), since the rule assumes the
calibration scans and the new ones come from one distribution.

    python benchmarks/calibration_draws.py --bundle B --trusted-key K.pub.pem --data runs/unseen7/data --site 1 \
        --n-cal 100 --draws 2000 --confidence 0.9,0.95 --out benchmarks/results/ffr/draws_site1.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from medfedpure.gate.calibration import expected_ffr, flagged_at_confidence, threshold_at_ffr
from medfedpure.runtime.calibration import binomial_ci
from medfedpure.runtime.defender import Defender
from scipy import stats


def site_scores(d: Defender, files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """The gate score of every file and whether the bundle's own τ flagged it (batches of 32; a refused scan
    stops the run)."""
    scores, flagged = [], []
    for i in range(0, len(files), 32):
        chunk = files[i:i + 32]
        for p, r in zip(chunk, d.run_batch([str(p) for p in chunk], seeds=[0] * len(chunk)), strict=True):
            if r.status == "refused":
                raise SystemExit(f"{p}: refused ({r.error})")
            scores.append(float(r.score))
            flagged.append(bool(r.flagged))
    return np.asarray(scores, np.float32), np.asarray(flagged)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--trusted-key", type=Path, action="append", default=[])
    ap.add_argument("--data", type=Path, required=True, help="data root (site_K/… + splits.json)")
    ap.add_argument("--site", type=int, required=True)
    ap.add_argument("--pool", default="train", help="split the calibration scans are drawn from ('all': any)")
    ap.add_argument("--n-cal", type=int, default=100)
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--target-ffr", type=float, default=0.05)
    ap.add_argument("--confidence", default="0.9", help="comma-separated levels, besides the plain rule")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cal-dir", type=Path, help="the set the bundle was calibrated on (file names of the site): "
                    "also the rule's rate for it and the bundle's own flags on the rest, per split")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    splits = json.loads((a.data / "splits.json").read_text())["sites"][f"site_{a.site}"]
    split_of = {Path(rel).name: name for name, rels in splits.items() for rel in rels}
    files = sorted((a.data / f"site_{a.site}").rglob("*.png"))
    if not files:
        raise SystemExit(f"no scans under {a.data / f'site_{a.site}'}")
    split = np.array([split_of.get(p.name, "unsplit") for p in files])
    label = np.array([p.parent.name for p in files])
    d = Defender.load(a.bundle, backend="onnxruntime", device="cpu", threads=a.threads,
                      trusted_keys=a.trusted_key or None, timeout_s=None)
    t0 = time.perf_counter()
    s, bundle_flags = site_scores(d, files)
    score_s = time.perf_counter() - t0

    pool = np.flatnonzero(split == a.pool) if a.pool != "all" else np.arange(len(files))
    if len(pool) < a.n_cal:
        raise SystemExit(f"the {a.pool!r} split of site {a.site} has {len(pool)} scans, fewer than --n-cal {a.n_cal}")
    rules: list[tuple[str, float | None]] = [("plain", None)]
    rules += [(f"confidence {c}", float(c)) for c in a.confidence.split(",") if c.strip()]
    rng = np.random.default_rng(a.seed)
    realised = {name: np.empty(a.draws) for name, _ in rules}
    for j in range(a.draws):
        cal = rng.choice(pool, a.n_cal, replace=False)
        rest = np.setdiff1d(np.arange(len(files)), cal)
        for name, c in rules:
            tau, _ = threshold_at_ffr(s[cal], a.target_ffr, confidence=c)
            realised[name][j] = float((s[rest] >= tau).mean())

    print(f"site {a.site}: {len(files)} scans scored in {score_s:.0f} s; {a.draws} draws of {a.n_cal} from "
          f"{a.pool!r} ({len(pool)}), false flags on the other {len(files) - a.n_cal}; target {a.target_ffr:.0%}")
    rows = {}
    for name, c in rules:
        r = realised[name]
        k = int(np.floor(a.target_ffr * a.n_cal)) if c is None else flagged_at_confidence(a.n_cal, a.target_ffr, c)
        rows[name] = {"flagged_on_calibration": k, "expected_ffr": expected_ffr(a.n_cal, k),
                      "mean": float(r.mean()), "median": float(np.median(r)),
                      "p05": float(np.quantile(r, 0.05)), "p95": float(np.quantile(r, 0.95)),
                      "share_above_target": float((r > a.target_ffr).mean()),
                      "share_above_7pct": float((r > 0.07).mean())}
        q = rows[name]
        print(f"  {name:>16} (k={k}, expected {q['expected_ffr']:.2%}): mean {q['mean']:.2%}  median "
              f"{q['median']:.2%}  5–95 % {q['p05']:.2%}–{q['p95']:.2%}  above target {q['share_above_target']:.1%}"
              f"  above 7 % {q['share_above_7pct']:.1%}")
    if a.cal_dir is not None:
        names = {p.name for p in a.cal_dir.rglob("*.png")}
        cal = np.flatnonzero([p.name in names for p in files])
        if len(cal) != len(names):
            raise SystemExit(f"{a.cal_dir}: {len(names) - len(cal)} of its files are not scans of site {a.site}")
        rest = np.setdiff1d(np.arange(len(files)), cal)
        given = {}
        for name, c in rules:
            tau, achieved = threshold_at_ffr(s[cal], a.target_ffr, confidence=c)
            given[name] = {"tau": tau, "on_calibration": achieved, "on_the_rest": float((s[rest] >= tau).mean()),
                           "rank_among_draws": float((realised[name] < (s[rest] >= tau).mean()).mean())}
            print(f"  {a.cal_dir} ({len(cal)} scans), {name}: τ {tau:.6g}, {achieved:.2%} of them, "
                  f"{given[name]['on_the_rest']:.2%} of the other {len(rest)} (above {given[name]['rank_among_draws']:.0%} of the draws)")
        # the bundle itself (calibrated on --cal-dir): its own flags, through the Defender, on the rest by split
        own = {}
        for g in [*sorted(set(split[rest])), "all"]:
            m = rest if g == "all" else rest[split[rest] == g]
            k, n = int(bundle_flags[m].sum()), len(m)
            lo, hi = binomial_ci(k, n)
            own[g] = {"flagged": k, "n": n, "rate": k / n, "ci95": [lo, hi]}
            print(f"  the bundle's own τ {d.engine.gate_spec.tau:.6g} on the rest, {g:>5}: {k:3d}/{n:3d} = "
                  f"{k / n:6.2%} (95 % CI {lo:.1%}–{hi:.1%})")
        rows["given_calibration_set"] = {"dir": str(a.cal_dir), "n": len(cal), **given, "bundle_flags": own}
    # Do the site's splits and classes score alike? (the rule's exchangeability assumption)
    masks = {f"split {g}": split == g for g in sorted(set(split))}
    masks |= {f"class {g}": label == g for g in sorted(set(label))}
    alike = {}
    for g, m in masks.items():
        v, ks = s[m], stats.ks_2samp(s[m], s[~m])
        alike[g] = {"n": int(m.sum()), "q50": float(np.quantile(v, .5)), "q90": float(np.quantile(v, .9)),
                    "q95": float(np.quantile(v, .95)), "ks_stat": float(ks.statistic), "ks_p": float(ks.pvalue)}
        print(f"  {g:>14} (n {len(v):3d}): q50 {alike[g]['q50']:.3f}  q90 {alike[g]['q90']:.3f}  q95 "
              f"{alike[g]['q95']:.3f}  KS vs the rest {ks.statistic:.3f} (p {ks.pvalue:.3f})")
    out = {"bundle": str(a.bundle), "bundle_id": d.bundle.bundle_id, "gate_stat": d.engine.gate_spec.stat,
           "site": a.site, "data": str(a.data), "pool": a.pool, "n_cal": a.n_cal, "draws": a.draws, "seed": a.seed,
           "target_ffr": a.target_ffr, "rules": rows, "groups": alike, "score_wall_s": score_s,
           "scores": [round(float(x), 6) for x in s], "files": [p.name for p in files]}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
