"""Undefended robustness of classifiers on one site's test split: the federated site classifier vs a
per-site (local) one trained with the same `small` preset (benchmarks/RESULTS.md, "Runtime").

Usage: fed_vs_local_robustness.py DATA SITE OUT.json NAME=CKPT [NAME=CKPT ...]
Prints and writes clean and PGD-10 ℓ∞ (2, 4, 8 /255; random start seed 0) accuracy per classifier.
"""

from __future__ import annotations

import json
import sys

import torch
from medfedpure.attacks.pgd import pgd_linf
from medfedpure.data.loader import load_split
from medfedpure.train.checkpoint import load_model

torch.set_num_threads(1)
data, site, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
x, y = load_split(data, site, "test", size=128)
xt, yt = torch.from_numpy(x), torch.from_numpy(y)
res = {"data": data, "site": site, "n": int(len(y)), "models": {}}
for spec in sys.argv[4:]:
    name, path = spec.split("=", 1)
    m = load_model(path)[0].eval()
    row = {}
    with torch.no_grad():
        row["clean"] = float((m(xt).argmax(1) == yt).float().mean())
    for e in (2, 4, 8):
        xa = pgd_linf(m, xt, yt, e / 255, steps=10, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            row[f"pgd{e}"] = float((m(xa).argmax(1) == yt).float().mean())
    res["models"][name] = row
    print(name, {k: round(v, 3) for k, v in row.items()}, flush=True)
with open(out, "w") as f:
    json.dump(res, f, indent=1)
