"""Classifier-side detection statistics against the shipped spectral gate's blind spot (research;
summary in benchmarks/RESULTS.md, "Gate and detector"; full table in docs/history.md).

The spectral gate statistics see nothing on a scanner that keeps ~96 % of k-space when the classifier
is adversarially trained (its perturbations are smooth). This measures statistics that look at the
classifier instead of the spectrum, on each site's val (τ at the 95 % quantile) and test scans, clean
vs PGD-10 ℓ∞ against the bundle's torch classifier alone (the same attack as the per-statistic table):

- ``1-maxprob``: one minus the top class probability;
- ``grad L1``: ‖∇ₓ log p_top(x)‖₁;
- ``FGSM-2 drop``: the top probability's fall after one 2/255 signed step against it;
- ``TV purify tT``: total variation between p(x) and p(purify(x, t = T)) (the bundle's one-step
  student, fixed noise), i.e. how much the prediction moves when the scan is purified.

Every test scan of each site (both classes; the splits list one class after the other, so a prefix
would be one class). Attacks are the classifier-alone PGD-10 (an attacker who ignores the statistic):
an upper bound on what the statistic would catch from an adaptive one.

    python benchmarks/gate_classifier_stats.py --data runs/robust4/data --sites 0,1,2,3 \
        --out benchmarks/results/gate/classifier_stats.json
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import numpy as np
import torch
from medfedpure.data import load_split
from medfedpure.gate.calibration import auroc
from medfedpure.models.diffusion import purify
from medfedpure.models.weights import load_model
from medfedpure.runtime.bundle import default_bundle_path
from medfedpure.train.attacks import pgd_linf

PURIFY_T = (60, 120)


def statistics(clf: torch.nn.Module, den: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Each statistic [B] of scans ``x`` [B,1,S,S] (larger: more suspicious)."""
    x = x.clone().requires_grad_(True)
    p = clf(x)
    top_p, pred = p.max(1)
    (g,) = torch.autograd.grad(p.clamp_min(1e-8).log().gather(1, pred[:, None]).sum(), x)
    with torch.no_grad():
        out = {"1-maxprob": 1 - top_p, "grad L1": g.abs().flatten(1).sum(1)}
        stepped = (x - 2 / 255 * g.sign()).clamp(0, 1)
        out["FGSM-2 drop"] = top_p - clf(stepped).gather(1, pred[:, None])[:, 0]
        for t in PURIFY_T:
            xp = purify(den, x.detach(), torch.full((len(x),), float(t)), 1, generator=torch.Generator().manual_seed(1))
            out[f"TV purify t{t}"] = 0.5 * (p - clf(xp)).abs().sum(1)
    return {k: v.detach().numpy() for k, v in out.items()}


def batched(fn, x: torch.Tensor, bs: int = 30) -> dict[str, np.ndarray]:
    parts = [fn(x[i:i + bs]) for i in range(0, len(x), bs)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the embedded default)")
    ap.add_argument("--data", type=Path, required=True, help="synthetic data folder (medfedpure data synth)")
    ap.add_argument("--sites", default="0,1,2,3")
    ap.add_argument("--eps", default="4,8", help="PGD-10 radii in /255")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="JSON output")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = (args.bundle or default_bundle_path()) / "torch"
    clf, den = (load_model(root / f"{name}.safetensors")[0].eval() for name in ("classifier", "denoiser"))
    eps_list = [float(e) for e in args.eps.split(",")]
    fn = functools.partial(statistics, clf, den)
    results: dict[str, dict] = {}
    for site in (int(s) for s in args.sites.split(",")):
        t0 = time.perf_counter()
        xv, _ = load_split(args.data, site, "val", 128)
        xt, yt = load_split(args.data, site, "test", 128)
        xt_t, yt_t = torch.from_numpy(xt), torch.from_numpy(yt)
        val, clean = batched(fn, torch.from_numpy(xv)), batched(fn, xt_t)
        row: dict[str, dict] = {"n_test": len(xt), "n_val": len(xv), "robust_acc": {}, "stats": {}}
        for eps in eps_list:
            g = torch.Generator().manual_seed(0)
            xa = torch.cat([pgd_linf(clf, xt_t[i:i + 30], yt_t[i:i + 30], eps / 255, steps=10, generator=g)
                            for i in range(0, len(xt_t), 30)])
            with torch.no_grad():
                row["robust_acc"][f"{eps:g}"] = float((clf(xa).argmax(1) == yt_t).float().mean())
            adv = batched(fn, xa)
            for k in clean:
                tau = float(np.quantile(val[k], 0.95))
                row["stats"].setdefault(k, {"ffr_test": float((clean[k] >= tau).mean())})[f"{eps:g}"] = {
                    "auroc": auroc(clean[k], adv[k]), "tpr_at_tau": float((adv[k] >= tau).mean())}
        row["wall_s"] = time.perf_counter() - t0
        results[str(site)] = row
        accs = " / ".join(f"{row['robust_acc'][f'{e:g}']:.1%}" for e in eps_list)
        print(f"site {site}: {len(xt)} test scans, classifier under PGD-10 {args.eps}/255: {accs} ({row['wall_s']:.0f} s)")
        print(f"  {'statistic':16s} {'FFR test':>8s}  " + "  ".join(f"AUROC {e:g} (TPR@τ)" for e in eps_list))
        for k, s in row["stats"].items():
            cells = "  ".join(f"{s[f'{e:g}']['auroc']:.3f} ({s[f'{e:g}']['tpr_at_tau']:.2f})".rjust(len(f"AUROC {e:g} (TPR@τ)"))
                              for e in eps_list)
            print(f"  {k:16s} {s['ffr_test']:8.3f}  {cells}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"bundle": str(root.parent), "data": str(args.data), "eps": eps_list,
                                        "sites": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
