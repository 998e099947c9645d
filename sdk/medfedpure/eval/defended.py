"""Rung 1 of the attack ladder (docs/evaluation.md) on a bundle: FGSM and PGD against the classifier
alone, then the whole
Defender (gate, purifier, classifier) on the clean and the attacked scans.

Reports, for one site's split of a synthetic data set (labels are used only for accuracy):
- clean accuracy of the classifier alone and of the defended pipeline (clean scans go through the
  gate and, when flagged, the purifier too), and the clean flag rate;
- per attack: undefended accuracy, flag rate (TPR), gate-score AUROC against the clean scans, TPR
  at 1 % / 5 % clean false-flag rate (thresholds from these clean test scores, for the ROC only —
  the Defender itself uses the bundle's calibrated τ), and defended accuracy;
- defended accuracy of the attacked scans that were flagged (purified at the calibrated t*).

This is the non-adaptive baseline of the MedFedPure paper's setting (the attacker does not know
the gate or the purifier); the adaptive rungs (2–6) are not implemented here.

Usage:
    python benchmarks/defended_eval.py --data runs/bundle_v2/data --site 0 --split test \
        [--bundle BUNDLE] [--eps 2,4,8] [--steps 10] [--backend onnxruntime] --out DIR

Writes DIR/defended_eval.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from medfedpure import Defender
from medfedpure.data.loader import load_split
from medfedpure.eval.attacks.pgd import fgsm, pgd_linf
from medfedpure.runtime.engines.torch_engine import model_from_bytes


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann–Whitney U)."""
    neg, pos = np.asarray(neg, np.float64), np.asarray(pos, np.float64)
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def tpr_at_fpr(neg: np.ndarray, pos: np.ndarray, fpr: float) -> float:
    """Fraction of ``pos`` at or above the smallest threshold flagging at most ⌊fpr·n⌋ of ``neg``."""
    s = np.sort(np.asarray(neg, np.float64))[::-1]
    k = int(np.floor(fpr * len(s)))
    thr = np.nextafter(s[k], np.inf)
    return float((np.asarray(pos) >= thr).mean())


def defend(d: Defender, x: np.ndarray, seed: int, batch: int = 16) -> dict[str, np.ndarray]:
    """Run the Defender over ``x`` [N,1,S,S]; per-scan keyed seeds ``seed + i`` (reproducible)."""
    label, flag, score, t_star, ok = [], [], [], [], []
    classes = list(d.bundle.classes)
    for i in range(0, len(x), batch):
        rs = d.run_array(x[i:i + batch], seeds=[seed + j for j in range(i, min(i + batch, len(x)))])
        for r in rs:
            ok.append(r.status == "ok")
            label.append(classes.index(r.label) if r.label is not None else -1)
            flag.append(bool(r.flagged))
            score.append(np.nan if r.score is None else r.score)
            t_star.append(0 if r.t_star is None else r.t_star)
    return {"label": np.array(label), "flag": np.array(flag), "score": np.array(score, np.float64),
            "t_star": np.array(t_star), "ok": np.array(ok)}


def add_eval_args(ap: argparse.ArgumentParser, *, eps: str, steps: int) -> None:
    """The options every evaluation script shares: data split, bundle, backend, radii, budget, output."""
    ap.add_argument("--data", required=True)
    ap.add_argument("--site", type=int, default=0)
    ap.add_argument("--split", default="test")
    ap.add_argument("--bundle", default=None, help="bundle folder (default: the embedded one)")
    ap.add_argument("--backend", default="onnxruntime", help="engine of the evaluated Defender")
    ap.add_argument("--eps", default=eps, help="ℓ∞ radii in /255 of the [0,1] model input (255: unbounded)")
    ap.add_argument("--steps", type=int, default=steps, help="PGD steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="first N scans only (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)


def open_eval(a: argparse.Namespace) -> tuple[Defender, np.ndarray, np.ndarray]:
    """(Defender, x [N,1,S,S], y [N]) for parsed :func:`add_eval_args` options."""
    torch.set_num_threads(a.threads)
    policy = None if getattr(a, "policy", "bundle") == "bundle" else a.policy
    d = Defender.load(a.bundle, backend=a.backend, threads=a.threads, policy=policy) if a.bundle else \
        Defender.default(backend=a.backend, threads=a.threads, policy=policy)
    x, y = load_split(a.data, a.site, a.split, size=d.image_size)
    return (d, x[:a.limit], y[:a.limit]) if a.limit else (d, x, y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_eval_args(ap, eps="2,4,8", steps=10)
    a = ap.parse_args()
    d, x, y = open_eval(a)
    art = d.bundle.find("classifier", "safetensors", "fp32")
    if art is None:
        sys.exit("the bundle has no torch classifier weights to attack")
    clf = model_from_bytes(d.bundle.read_bytes(art.name))[0].eval()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    t0 = time.perf_counter()
    with torch.no_grad():
        undefended_clean = float((clf(xt).argmax(1) == yt).float().mean())
    clean = defend(d, x, a.seed)
    rows = {"clean": {"undefended_acc": undefended_clean, "defended_acc": float((clean["label"] == y).mean()),
                      "flag_rate": float(clean["flag"].mean()), "unverified": int((~clean["ok"]).sum())}}
    for eps_255 in [float(e) for e in a.eps.split(",")]:
        eps = eps_255 / 255
        for kind in ("fgsm", "pgd"):
            g = torch.Generator().manual_seed(a.seed)
            xa = (fgsm(clf, xt, yt, eps) if kind == "fgsm"
                  else pgd_linf(clf, xt, yt, eps, steps=a.steps, generator=g)).numpy()
            with torch.no_grad():
                und = float((clf(torch.from_numpy(xa)).argmax(1) == yt).float().mean())
            r = defend(d, xa, a.seed + 10_000)
            fl = r["flag"]
            rows[f"{kind}-{eps_255:g}"] = {
                "undefended_acc": und, "defended_acc": float((r["label"] == y).mean()),
                "flag_rate": float(fl.mean()), "auroc": auroc(clean["score"], r["score"]),
                "tpr@1%": tpr_at_fpr(clean["score"], r["score"], 0.01),
                "tpr@5%": tpr_at_fpr(clean["score"], r["score"], 0.05),
                "flagged_defended_acc": float((r["label"][fl] == y[fl]).mean()) if fl.any() else None,
                "t_star_median_flagged": float(np.median(r["t_star"][fl])) if fl.any() else None,
                "unverified": int((~r["ok"]).sum()),
            }
    wall = time.perf_counter() - t0
    res = {"bundle_id": d.bundle.bundle_id, "backend": a.backend, "data": str(Path(a.data).resolve()), "site": a.site,
           "split": a.split, "n": int(len(y)), "steps": a.steps, "seed": a.seed, "gate": d.bundle.spec.gate.to_dict(),
           "attack": "against the classifier alone (rung 1, not adaptive)", "rows": rows, "wall_s": wall,
           "machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "torch": torch.__version__}}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "defended_eval.json").write_text(json.dumps(res, indent=1))
    tab = Table(title=f"rung 1 · site {a.site} {a.split} · n = {len(y)} · bundle {d.bundle.short_id} · {a.backend}")
    for c in ("input", "undefended acc", "defended acc", "flagged", "AUROC", "TPR@1%", "TPR@5%", "acc | flagged"):
        tab.add_column(c, justify="right")

    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.1f} %"

    for k, v in rows.items():
        tab.add_row(k, pct(v["undefended_acc"]), pct(v["defended_acc"]), pct(v["flag_rate"]),
                    "–" if "auroc" not in v else f"{v['auroc']:.3f}", pct(v.get("tpr@1%")), pct(v.get("tpr@5%")),
                    pct(v.get("flagged_defended_acc")))
    Console(width=140).print(tab)
    print(f"wrote {out / 'defended_eval.json'} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
