"""False flags of a (re)calibrated bundle on every clean scan of a site it was not calibrated on.

The unseen-scanner protocol asks for the false-flag rate "on the site's other clean scans" after
`medfedpure calibrate --bundle` on some of them: this runs the bundle through the Defender on every scan
of the site's folder (all splits; the synthetic scans are clean) except those in the calibration folder
(matched by file name) and reports the flagged share with its Clopper-Pearson interval, per split and in all.

    python benchmarks/site_false_flags.py --bundle B --trusted-key K.pub.pem --data runs/unseen7/data \
        --site 1 --exclude CAL_DIR --out benchmarks/results/ffr/site1.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from medfedpure.runtime.calibration import binomial_ci
from medfedpure.runtime.defender import Defender


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--trusted-key", type=Path, action="append", default=[])
    ap.add_argument("--data", type=Path, required=True, help="data root (site_K/… + splits.json)")
    ap.add_argument("--site", type=int, required=True)
    ap.add_argument("--exclude", type=Path, required=True, help="the calibration folder: its file names are skipped")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    excluded = {p.name for p in a.exclude.rglob("*") if p.is_file()}
    splits = json.loads((a.data / "splits.json").read_text())["sites"][f"site_{a.site}"]
    split_of = {Path(rel).name: name for name, rels in splits.items() for rel in rels}
    files = sorted(p for p in (a.data / f"site_{a.site}").rglob("*.png") if p.name not in excluded)
    if not files:
        raise SystemExit(f"no scans of site {a.site} left after excluding {len(excluded)} names")
    d = Defender.load(a.bundle, backend="onnxruntime", device="cpu", threads=a.threads,
                      trusted_keys=a.trusted_key or None, timeout_s=None)
    t0 = time.perf_counter()
    flagged: dict[str, list[int]] = {}
    for i in range(0, len(files), 32):
        chunk = files[i:i + 32]
        for p, r in zip(chunk, d.run_batch([str(p) for p in chunk], seeds=[0] * len(chunk)), strict=True):
            if r.status == "refused":
                raise SystemExit(f"{p}: refused ({r.error})")
            flagged.setdefault(split_of.get(p.name, "unsplit"), []).append(int(r.flagged))
    wall = time.perf_counter() - t0
    rows = {}
    for name, v in sorted(flagged.items()) + [("all", [x for fl in flagged.values() for x in fl])]:
        k, n = sum(v), len(v)
        lo, hi = binomial_ci(k, n)
        rows[name] = {"flagged": k, "n": n, "rate": k / n, "ci95": [lo, hi]}
        print(f"{name:>8}: {k:3d}/{n:3d} = {100 * k / n:5.1f} %  (95 % CI {100 * lo:.1f}–{100 * hi:.1f} %)")
    gate = d.engine.gate_spec
    out = {"bundle": str(a.bundle), "bundle_id": d.bundle.bundle_id, "site": a.site, "data": str(a.data),
           "excluded": len(excluded), "gate": {"stat": gate.stat, "tau": gate.tau, "t_min": gate.t_min,
                                               "t_max": gate.t_max},
           "recalibration": d.bundle.spec.provenance.get("recalibration"), "false_flags": rows, "wall_s": wall}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {a.out} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
