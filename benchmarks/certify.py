"""Thin driver: certified accuracy of the default bundle by denoised smoothing (``Defender.certify``).

``python benchmarks/certify.py --out benchmarks/results/certify/default_site1.json`` certifies
``--num-scans`` synthetic scans of the default bundle's own site (the scanner of its training set, at
unseen scan indices: :func:`medfedpure.demo.synthetic_scans`, as tests/golden/capture.py makes them)
at each σ, and writes the certificates, the certified accuracy at each radius and the time per scan
as JSON (rewritten after every σ, so a partial run keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from medfedpure import Defender
from medfedpure.demo import synthetic_scans
from medfedpure.runtime.certify import certified_accuracy, certified_accuracy_by_class


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sigmas", default="0.12,0.25,0.5")
    ap.add_argument("--radii", default="0,0.25,0.5,1.004")
    ap.add_argument("--num-scans", type=int, default=20)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--seed", type=int, default=0, help="certificate i of σ_j is keyed by seed + 1000·j + i")
    ap.add_argument("--scan-seed", type=int, default=3, help="synthetic scan seed (the golden record's is 3)")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--batch", type=int, default=None)
    a = ap.parse_args()
    sigmas = [float(s) for s in a.sigmas.split(",")]
    radii = [float(r) for r in a.radii.split(",")]
    t_start = time.perf_counter()
    with Defender.default(backend=a.backend, device=a.device, threads=a.threads) as d:
        prov = d.bundle.manifest["provenance"]
        dataset = {**prov["dataset"], "site": int(prov.get("site", 0))}
        imgs, labels = synthetic_scans(a.num_scans, d.image_size, seed=a.scan_seed, site=dataset["site"],
                                       dataset=dataset)
        truth = [d.classes[int(y)] for y in labels]
        record: dict = {"bundle_id": d.bundle.bundle_id, "engine": d.engine.describe(), "site": dataset["site"],
                        "num_scans": a.num_scans, "scan_seed": a.scan_seed, "n0": a.n0, "n": a.n, "alpha": a.alpha,
                        "radii": radii, "machine": {"node": platform.node(), "cpus": os.cpu_count(),
                                                    "processor": platform.processor(),
                                                    "load_avg_start": os.getloadavg()},
                        "sigmas": {}}
        for j, sigma in enumerate(sigmas):
            certs = []
            for i in range(a.num_scans):
                certs.append(d.certify(imgs[i], sigma=sigma, n0=a.n0, n=a.n, alpha=a.alpha,
                                       seed=a.seed + 1000 * j + i, batch=a.batch))
                print(f"σ={sigma} scan {i}: true {truth[i]} → {certs[-1].label} R={certs[-1].radius:.3f} "
                      f"p_lower={certs[-1].p_lower:.4f} {certs[-1].latency_ms['total'] / 1e3:.1f} s", flush=True)
            per_scan_s = [c.latency_ms["total"] / 1e3 for c in certs]
            record["sigmas"][str(sigma)] = {
                "t": certs[0].t,
                "certified_accuracy": {str(r): v for r, v in certified_accuracy(certs, truth, radii).items()},
                "certified_accuracy_by_class": {
                    c: {str(r): v for r, v in acc.items()}
                    for c, acc in certified_accuracy_by_class(certs, truth, radii).items()},
                "abstained": sum(c.label is None for c in certs),
                "seconds_per_scan": {"mean": float(np.mean(per_scan_s)), "median": float(np.median(per_scan_s))},
                "certificates": [{"truth": y, **c.to_dict()} for c, y in zip(certs, truth, strict=True)],
            }
            record["wall_s"] = time.perf_counter() - t_start
            record["machine"]["load_avg_end"] = os.getloadavg()
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(record, indent=1) + "\n")
            print(f"σ={sigma}: certified accuracy {record['sigmas'][str(sigma)]['certified_accuracy']}", flush=True)
            print(f"σ={sigma}: within each class {record['sigmas'][str(sigma)]['certified_accuracy_by_class']}",
                  flush=True)


if __name__ == "__main__":
    main()
