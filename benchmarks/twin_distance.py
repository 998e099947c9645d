"""How far is each synthetic tumour scan from the same scan without its tumour? (research; results in
benchmarks/RESULTS.md, "Robustness").

The generator draws a scan's geometry and acquisition from generators that do not depend on its label,
so ``render_scan(..., label=0)`` of a tumour scan's index is its *twin*: the same head, slice, scanner
noise and window, without the lesion (and without its mass effect). The twin is a valid no-tumour scan
of the same site. Its distance to the tumour scan bounds what any classifier can be robust to:

- ``‖x − twin‖∞ ≤ ε`` (ℓ∞, in 1/255 of the [0, 1] input): the tumour scan's ε-ball holds a genuine
  no-tumour scan, so a classifier that is right on the twin is wrong somewhere in that ball; the
  tumour cannot be robustly detected at ε by any classifier that is right on scans without tumours.
- ``‖x − twin‖∞ ≤ 2ε``: the balls of the two scans meet (at their midpoint); no classifier is robust
  at ε on both.
- The same with the ℓ2 distance against the certified radius r (``≤ 2r``: no certificate at r can hold
  for both the scan and its twin).

Every tumour scan of the chosen split(s), by lesion kind (conspicuous / small / faint). The stored PNG
is re-rendered first and must match bit for bit (otherwise the data was not made by this generator
version and the script refuses).

    python benchmarks/twin_distance.py --data runs/rc520/work/data --sites 0,1,2,3 --split test \
        --out benchmarks/results/twin_distance.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from medfedpure.data.anatomy import load_anatomy
from medfedpure.data.splits import read_splits
from medfedpure.data.synth import SiteProfile, SynthConfig, render_scan
from PIL import Image

LINF_EPS = (1, 2, 4, 8)  # /255
L2_RADII = (0.25, 0.5, 1.0039)
KINDS = ("conspicuous", "small", "faint")


def _config(data: Path) -> tuple[SynthConfig, list[SiteProfile]]:
    meta = json.loads((data / "dataset.json").read_text())
    if meta.get("kind") != "synthetic":
        raise SystemExit(f"{data}: not a synthetic data set (dataset.json kind {meta.get('kind')!r})")
    c = dict(meta["config"])
    c["z_range_mm"] = tuple(c["z_range_mm"])
    cfg = SynthConfig(**c)
    profiles = [SiteProfile(**p) for p in meta["site_profiles"]]
    return cfg, profiles


def twin_distances(data: Path, site: int, split: str) -> list[dict]:
    """One row per tumour scan of ``site``'s ``split``: file, kind, ℓ∞ (/255) and ℓ2 (scan units) to its twin."""
    cfg, profiles = _config(data)
    anat = load_anatomy()
    params = {}
    for line in (data / "scan_params.jsonl").read_text().splitlines():
        p = json.loads(line)
        params[p["file"]] = p
    rows = []
    for rel in read_splits(data)["sites"][f"site_{site}"][split]:
        p = params[rel]
        if int(p["label"]) != 1:
            continue
        scan = render_scan(anat, profiles[site], cfg, site, p["index"], 1)
        stored = np.asarray(Image.open(data / rel))
        if not np.array_equal(scan.png, stored):
            raise SystemExit(f"{rel}: re-rendering does not reproduce the stored scan (another generator version?)")
        twin = render_scan(anat, profiles[site], cfg, site, p["index"], 0)
        d = scan.png.astype(np.float64) - twin.png.astype(np.float64)
        rows.append({"file": rel, "kind": p["tumour"]["kind"], "linf_255": float(np.abs(d).max()),
                     "l2": float(np.linalg.norm(d / 255.0)),
                     "radius_mm": p["tumour"]["radius_mm"], "conspicuity": p["tumour"]["conspicuity"]})
    return rows


def summarise(rows: list[dict]) -> dict:
    """Per kind and overall: count, median distances, and the share of scans whose twin is within
    ε / 2ε (ℓ∞) and 2r (ℓ2)."""
    out = {}
    for kind in (*KINDS, "all"):
        sel = [r for r in rows if kind == "all" or r["kind"] == kind]
        if not sel:
            continue
        li = np.array([r["linf_255"] for r in sel])
        l2 = np.array([r["l2"] for r in sel])
        out[kind] = {
            "n": len(sel), "linf_255_median": float(np.median(li)), "linf_255_min": float(li.min()),
            "l2_median": float(np.median(l2)), "l2_min": float(l2.min()),
            "twin_within_eps": {str(e): float((li <= e).mean()) for e in LINF_EPS},
            "twin_within_2eps": {str(e): float((li <= 2 * e).mean()) for e in LINF_EPS},
            "twin_within_2r_l2": {str(r): float((l2 <= 2 * r).mean()) for r in L2_RADII},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--sites", default="0,1,2,3")
    ap.add_argument("--split", default="test", help="test, val, train or a comma list")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    t0 = time.perf_counter()
    report: dict = {"data": str(a.data), "split": a.split, "linf_eps_255": LINF_EPS, "l2_radii": L2_RADII,
                    "sites": {}}
    all_rows = []
    for site in (int(s) for s in a.sites.split(",")):
        rows = [r for split in a.split.split(",") for r in twin_distances(a.data, site, split)]
        all_rows += rows
        report["sites"][str(site)] = {"summary": summarise(rows), "scans": rows}
    report["pooled"] = summarise(all_rows)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1))
    head = (f"{'site':>5} {'kind':>12} {'n':>4} {'ℓ∞ med':>7} {'ℓ∞ min':>7} "
            + " ".join(f"≤{e}/255" for e in LINF_EPS) + " " + " ".join(f"≤2·{e}" for e in LINF_EPS)
            + f" {'ℓ2 med':>7} " + " ".join(f"ℓ2≤2·{r}" for r in L2_RADII))
    print(head)
    for site, block in [*report["sites"].items(), ("all", {"summary": report["pooled"]})]:
        for kind, s in block["summary"].items():
            print(f"{site:>5} {kind:>12} {s['n']:>4} {s['linf_255_median']:>7.0f} {s['linf_255_min']:>7.0f} "
                  + " ".join(f"{100 * v:>6.0f}%" for v in s["twin_within_eps"].values()) + " "
                  + " ".join(f"{100 * v:>4.0f}%" for v in s["twin_within_2eps"].values())
                  + f" {s['l2_median']:>7.2f} " + " ".join(f"{100 * v:>8.0f}%" for v in s["twin_within_2r_l2"].values()))
    print(f"wrote {a.out} ({report['wall_s']} s)")


if __name__ == "__main__":
    main()
