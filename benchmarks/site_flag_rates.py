"""The clean false-flag rate of one or more bundles on every site of one or more data sets, as shipped (no
recalibration): what a bundle calibrated on some sites' scans does on each site, seen or not.

    python benchmarks/site_flag_rates.py --bundle B1 --bundle B2 --trusted-key K.pub.pem \
        --data runs/d0:test --data runs/unseen7/data:all --out benchmarks/results/ffr/site_flag_rates.json

`--data ROOT:SPLIT` (SPLIT one of train, val, test, all); every site of the data set is run (clean synthetic scans).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from calibration_draws import site_scores
from medfedpure.runtime.calibration import binomial_ci
from medfedpure.runtime.defender import Defender


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, action="append", required=True)
    ap.add_argument("--trusted-key", type=Path, action="append", default=[])
    ap.add_argument("--data", action="append", required=True, help="ROOT:SPLIT, e.g. runs/d0:test")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    sets = []
    for spec in a.data:
        root, _, split = spec.rpartition(":")
        if split not in ("train", "val", "test", "all") or not root:
            raise SystemExit(f"--data {spec!r}: expected ROOT:SPLIT with SPLIT one of train, val, test, all")
        sites = json.loads((Path(root) / "splits.json").read_text())["sites"]
        for name, splits in sorted(sites.items()):
            rels = [r for s, rs in splits.items() for r in rs] if split == "all" else splits[split]
            files = [Path(root) / r if (Path(root) / r).exists() else Path(root) / name / r for r in rels]
            sets.append((f"{root} {name} {split}", files))
    rows = []
    for b in a.bundle:
        d = Defender.load(b, backend="onnxruntime", device="cpu", threads=a.threads,
                          trusted_keys=a.trusted_key or None, timeout_s=None)
        cal = d.calibration
        print(f"{b} ({d.bundle.short_id}): gate {d.engine.gate_spec.stat}, τ {d.engine.gate_spec.tau:.6g}, "
              f"calibrated on {cal.num_val_scans if cal else '?'} scans")
        for name, files in sets:
            _, flagged = site_scores(d, files)
            k, n = int(flagged.sum()), len(files)
            lo, hi = binomial_ci(k, n)
            rows.append({"bundle": str(b), "bundle_id": d.bundle.bundle_id, "gate": d.engine.gate_spec.stat,
                         "set": name, "flagged": k, "n": n, "rate": k / n, "ci95": [lo, hi]})
            print(f"  {name:>40}: {k:4d}/{n:4d} = {k / n:6.1%}  (95 % CI {lo:.1%}–{hi:.1%})")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
