"""Detection research (issue 3): which gate statistic separates clean scans from PGD scans?

For one site: clean val scans (calibration only), clean test scans, and PGD-10 ℓ∞ test scans at
ε ∈ {2, 4, 8}/255 crafted against the site's classifier alone (rung 1 of EVALUATION.md; random
start from a seeded generator). Every variant scores the scans from the gate's inputs
(x, MAE recon, visible); τ is the 95 % quantile of the clean *val* scores (no labels, no attacks),
and we report AUROC per ε, the false-flag rate on clean test scans at τ, and the TPR at τ.

Usage: detect.py SITE CLASSIFIER MAE OUT.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import CACHE, auroc, load, machine
from medfedpure.attacks import pgd_linf
from medfedpure.models.mae import MAEScorer
from medfedpure.train.checkpoint import load_model
from medfedpure.train.classifier import evaluate_classifier
from medfedpure.train.scores import _patches, gate_scores, hfratio_scores

torch.set_num_threads(1)
site, clf_path, mae_path, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
EPS = (2, 4, 8)
clf = load_model(clf_path)[0].eval()
mae, mcfg, _ = load_model(mae_path)
scorer = MAEScorer(mae).eval()
vis = scorer.visible.numpy()
P = mcfg.patch
xv, _ = load(site, "val")
xt, yt = load(site, "test")

t0 = time.perf_counter()
adv = {}
acc = {"clean": evaluate_classifier(clf, xt, yt)["accuracy"]}
cache = CACHE / (Path(out_path).stem + ".adv.npz")  # git-ignored run folder
if cache.is_file():  # same classifier file and seeds: reuse the attacked scans
    z = np.load(cache)
    adv = {e: z[f"pgd{e}"] for e in EPS}
else:
    for e in EPS:
        g = torch.Generator().manual_seed(1000 + e)
        xa = torch.cat([pgd_linf(clf, torch.from_numpy(xt[i:i + 30]), torch.from_numpy(yt[i:i + 30]), e / 255,
                                 steps=10, generator=g) for i in range(0, len(xt), 30)])
        adv[e] = xa.numpy()
    np.savez_compressed(cache, **{f"pgd{e}": adv[e] for e in EPS})
for e in EPS:
    acc[f"pgd{e}"] = evaluate_classifier(clf, adv[e], yt)["accuracy"]
t_attack = time.perf_counter() - t0
print("accuracy", acc, f"attack {t_attack:.0f}s", flush=True)


@torch.no_grad()
def recon(x: np.ndarray) -> np.ndarray:
    return torch.cat([scorer(torch.from_numpy(x[i:i + 16])) for i in range(0, len(x), 16)]).numpy()


sets = {"val": xv, "clean": xt, **{f"pgd{e}": adv[e] for e in EPS}}
t0 = time.perf_counter()
recs = {k: recon(v) for k, v in sets.items()}
t_recon = time.perf_counter() - t0


def lap_dia(z: np.ndarray):
    a = z[..., :, :-2] - 2 * z[..., :, 1:-1] + z[..., :, 2:]
    lap = (a[..., :-2, :] - 2 * a[..., 1:-1, :] + a[..., 2:, :]) / 4
    dia = (z[..., :-1, :-1] - z[..., :-1, 1:] - z[..., 1:, :-1] + z[..., 1:, 1:]) / 2
    return (lap ** 2).mean(axis=(-1, -2)), (dia ** 2).mean(axis=(-1, -2))


def x_only(x: np.ndarray, frac: float = 0.5, agg: str = "mean") -> np.ndarray:
    """The same spectral ratio on x itself (no MAE): tissue chosen by x's patch mean."""
    xp = _patches(x[:, 0].astype(np.float32), P)
    h, d = lap_dia(xp)
    e = h / (d + 1e-6)
    w = xp.mean(axis=(-1, -2))
    m = int(round(frac * e.shape[1]))
    sel = np.take_along_axis(e, np.argsort(-w, axis=1, kind="stable")[:, :m], axis=1)
    return sel.mean(1) if agg == "mean" else np.median(sel, 1)


def bg_energy(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Mean masked error in the darkest quarter of patches (air: near 0 + Rician noise)."""
    _, e = gate_scores(x, r, vis, patch=P, stat="mean")
    w = (r * (~vis[None, :, :, None, None]).any(1, keepdims=True)).mean(1) if False else r.mean(1)
    wp = _patches(w, P).mean(axis=(-1, -2))
    m = e.shape[1] // 4
    return np.take_along_axis(e, np.argsort(wp, axis=1, kind="stable")[:, :m], axis=1).mean(1)


def rel_median(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    _, e = gate_scores(x, r, vis, patch=P, stat="mean")
    return e.mean(1) / np.median(e, 1)


def hf(x, r, **kw):
    return hfratio_scores(x[:, 0], r, vis, patch=P, **kw)[0]


VARIANTS = {
    "mean masked error (DESIGN §5 baseline)": lambda x, r: gate_scores(x, r, vis, patch=P, stat="mean")[0],
    "topk masked error, k=16": lambda x, r: gate_scores(x, r, vis, patch=P, stat="topk", topk=16)[0],
    "masked error in the darkest 25% patches (air)": bg_energy,
    "mean / median patch error (self-referenced)": rel_median,
    "hfratio on MAE residual, tissue half, median": lambda x, r: hf(x, r, residual=True),
    "hfratio on MAE residual, tissue half, mean": lambda x, r: hf(x, r, residual=True, aggregate="mean"),
    "hfratio on x, all patches, median": lambda x, r: hf(x, r, tissue_fraction=1.0),
    "hfratio on x, tissue quarter, median": lambda x, r: hf(x, r, tissue_fraction=0.25),
    "hfratio on x, tissue half, mean": lambda x, r: hf(x, r, aggregate="mean"),
    "hfratio on x, tissue 3/4, median": lambda x, r: hf(x, r, tissue_fraction=0.75),
    "**hfratio on x, tissue half (MAE), median — gate stat**": lambda x, r: hf(x, r),
    "hfratio on x, tissue half by x itself, median": lambda x, r: x_only(x, agg="median"),
}
rows = []
for name, f in VARIANTS.items():
    t0 = time.perf_counter()
    s = {k: np.asarray(f(sets[k], recs[k]), np.float64) for k in sets}
    dt = time.perf_counter() - t0
    tau = float(np.quantile(s["val"], 0.95))
    row = {"variant": name, "tau": tau, "ffr_test": float((s["clean"] >= tau).mean()),
           "score_s_per_scan": dt / sum(len(v) for v in sets.values())}
    for e in EPS:
        row[f"auroc_{e}"] = auroc(s["clean"], s[f"pgd{e}"])
        row[f"tpr_{e}"] = float((s[f"pgd{e}"] >= tau).mean())
        row[f"rose_{e}"] = float((s[f"pgd{e}"] > s["clean"]).mean())
    rows.append(row)
    print(f"{name:48s} " + " ".join(f"{row[f'auroc_{e}']:.3f}" for e in EPS)
          + f" ffr {row['ffr_test']:.3f} tpr8 {row['tpr_8']:.2f}", flush=True)
res = {"site": site, "classifier": clf_path, "mae": mae_path, "accuracy": acc, "n_val": len(xv), "n_test": len(xt),
       "attack": "PGD-10 linf, alpha=2.5*eps/10, random start, against the classifier alone",
       "attack_s": t_attack, "recon_s": t_recon, "machine": machine(), "rows": rows}
open(out_path, "w").write(json.dumps(res, indent=1))

# Score distributions of the baseline and of the gate statistic (what a reviewer looks at first).
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

pick = ["mean masked error (DESIGN §5 baseline)", "**hfratio on x, tissue half (MAE), median — gate stat**"]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for ax, name in zip(axes, pick, strict=True):
    f = VARIANTS[name]
    vals = {k: np.asarray(f(sets[k], recs[k])) for k in ("clean", *[f"pgd{e}" for e in EPS])}
    lo, hi = min(v.min() for v in vals.values()), max(v.max() for v in vals.values())
    bins = np.linspace(lo, hi, 40)
    for k, v in vals.items():
        ax.hist(v, bins=bins, histtype="step", lw=1.5, label=k.replace("pgd", "PGD ε=") + ("/255" if "pgd" in k else ""))
    tau = next(r["tau"] for r in rows if r["variant"] == name)
    ax.axvline(tau, color="k", ls="--", lw=1, label="τ (5 % FFR on val)")
    ax.set_title(name.strip("*").replace(" — gate stat", " (gate)"), fontsize=9)
    ax.set_xlabel("score")
axes[0].set_ylabel(f"test scans, site {site}")
axes[1].legend(fontsize=7)
fig.tight_layout()
fig.savefig(Path(out_path).with_suffix(".png"), dpi=110)
