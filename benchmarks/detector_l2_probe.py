"""How an attack detector scores ℓ2 PGD, and how often that attack fools the classifier (research; results in
benchmarks/RESULTS.md, "Gate and detector").

For sites 1 and 2 of a synthetic data set: τ from the site's clean val scans, the detector's AUROC clean vs
PGD-10 ℓ2 at radii 0.5, 1 and 2 against the default bundle's classifier on the test scans
(``train.detector.evaluate_detector``), and the share of those attacked scans the classifier gets wrong.

    python benchmarks/detector_l2_probe.py runs/det/l2/detector.safetensors benchmarks/results/gate/detector_l2_probe.json
"""

from __future__ import annotations

import json
import sys

import torch
from medfedpure.data import load_split
from medfedpure.models.weights import load_model
from medfedpure.train.detector import attacked, evaluate_detector, load_classifier

DATA = "runs/d0"
RADII = (0.5, 1.0, 2.0)


def main() -> None:
    torch.set_num_threads(1)
    det = load_model(sys.argv[1])[0].eval()
    clf = load_classifier("sdk/medfedpure/bundles/default")
    out = {}
    for site in (1, 2):
        xv = torch.from_numpy(load_split(DATA, site, "val", 128)[0])
        xt, yt = (torch.from_numpy(a) for a in load_split(DATA, site, "test", 128))
        r = evaluate_detector(det, clf, xv, xt, yt, [], eps_l2=list(RADII), seed=3)
        fooled = {}
        for e in RADII:
            xa = attacked(clf, xt, yt, e, steps=10, seed=3, norm="l2")
            with torch.no_grad():
                fooled[str(e)] = float((clf(xa).argmax(1) != yt).float().mean())
        out[f"site_{site}"] = {**r, "classifier_fooled": fooled}
        print(site, {k: round(v, 3) for k, v in r["auroc"].items()}, fooled, flush=True)
    with open(sys.argv[2], "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
