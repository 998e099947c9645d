"""Rung 2 of EVALUATION.md: full-pipeline PGD with EOT against a bundle's whole defended pipeline.

The attacked function is the shipped one, computed on the torch reference path from the bundle's own
weights and calibration:

    x ─► gate (MAE scorer + calibrated statistic, the deployed onnxruntime engine) ─► t*(x)
      ─► K-step purifier at t*(x) with fresh noise (rows with t* = 0 pass unchanged) ─► classifier

Gradients: exact through the purifier (noising + K student steps, ``models.diffusion.purify``) and
the classifier; expectation over the purifier's noise (EOT, ``--eot`` draws per step); the gate's
decision t*(x) is discrete, so it is recomputed from the current x at every step and held constant
within the step (no gradient through the threshold — the attacker still profits from leaving the
flagged region, since unflagged rows go to the classifier unpurified). Loss: cross-entropy of the
mixture's probabilities, maximised; ℓ∞ PGD with random start, step 2.5·ε/steps.

Evaluation: the real Defender (``--backend``, onnxruntime by default) on the final adversarial scans,
``--repeats`` times with fresh purification keys: mean defended accuracy and the worst case per scan
over the repeats (rung 5). The same scans attacked with rung-1 PGD (classifier only) are reported beside
it. Sanity check of EVALUATION.md: ``--eps 255`` (unbounded) must drive defended accuracy to ~0.

Usage:
    python benchmarks/adaptive_eval.py --data D --site K --bundle B [--eps 8] [--steps 100] [--eot 10]
        [--limit N] [--repeats 5] --out DIR
Writes DIR/adaptive_eval.json and prints a table.
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
import torch.nn.functional as F
from medfedpure import Defender
from medfedpure.attacks.pgd import pgd_linf
from medfedpure.engines.torch_engine import TorchEngine
from medfedpure.models.diffusion import purify
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from defended_eval import add_eval_args, defend, open_eval  # noqa: E402 - the sibling script's helpers


def gate_t_star(d: Defender, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """t* [N] int64 of the deployed gate (the Defender's engine: MAE scorer + calibrated statistic)."""
    out = []
    for i in range(0, len(x), batch):
        xb = np.ascontiguousarray(x[i:i + batch], dtype=np.float32)
        g = d.engine.gate(d.engine.to_native(xb), d.engine.mae(d.engine.to_native(xb)))
        out.append(d.engine.to_numpy(g.t_star).astype(np.int64))
    return np.concatenate(out)


def pipeline_pgd(d: Defender, ref: TorchEngine, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int,
                 eot: int, seed: int, progress: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """ℓ∞ PGD with EOT on the whole pipeline; returns (x_adv, stats of the last step's gate)."""
    clf, den, sched, k = ref.models["classifier"], ref.models["denoiser"], ref.schedule, ref.steps
    g = torch.Generator().manual_seed(seed)
    alpha = 2.5 * eps / steps
    x_adv = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * eps).clamp(0, 1)
    bar = tqdm(range(steps), desc=f"pipeline PGD ε={eps * 255:g}/255", disable=not progress)
    t_star = np.zeros(len(x), np.int64)
    for _ in bar:
        t_star = gate_t_star(d, x_adv.numpy())
        ts = torch.from_numpy(t_star)
        xv = x_adv.clone().requires_grad_(True)
        loss = torch.zeros(())
        for _ in range(eot):
            xp = purify(den, xv, ts, k, generator=g, schedule=sched)
            p = clf(xp)
            loss = loss + F.nll_loss(torch.log(p.clamp_min(1e-12)), y) / eot
        (grad,) = torch.autograd.grad(loss, xv)
        x_adv = torch.min(torch.max(x_adv + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1).detach()
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", flagged=f"{(t_star > 0).mean():.2f}")
    return x_adv, {"flagged_at_last_step": float((t_star > 0).mean())}


def defended(d: Defender, x: np.ndarray, y: np.ndarray, repeats: int, seed: int) -> dict[str, float]:
    """Accuracy of the real Defender over ``repeats`` runs with fresh keys: mean, worst case per scan."""
    runs = [defend(d, x, seed + 1_000_003 * r) for r in range(repeats)]
    correct = np.stack([r["ok"] & (r["label"] == y) for r in runs])
    acc = correct.mean(axis=1)
    return {"defended_acc_mean": float(acc.mean()), "defended_acc_std": float(acc.std(ddof=1)) if repeats > 1 else 0.0,
            "defended_acc_worst_of_repeats": float(correct.all(axis=0).mean()),
            "flag_rate": float(np.mean([r["flag"] for r in runs]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_eval_args(ap, eps="8", steps=100)  # EVALUATION.md: ≥ 100 steps
    ap.add_argument("--eot", type=int, default=10, help="noise draws per step (EVALUATION.md: ≥ 10)")
    ap.add_argument("--repeats", type=int, default=5, help="Defender runs per adversarial scan (fresh keys)")
    a = ap.parse_args()
    d, x, y = open_eval(a)
    ref = TorchEngine(d.bundle, device="cpu", threads=a.threads)
    for m in ref.models.values():
        m.eval().requires_grad_(False)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    clf = ref.models["classifier"]
    t0 = time.perf_counter()
    rows: dict[str, dict] = {"clean": defended(d, x, y, a.repeats, a.seed)}
    with torch.no_grad():
        rows["clean"]["undefended_acc"] = float((clf(xt).argmax(1) == yt).float().mean())
    for eps_255 in [float(e) for e in a.eps.split(",")]:
        eps = eps_255 / 255
        xa1 = pgd_linf(clf, xt, yt, eps, steps=10, generator=torch.Generator().manual_seed(a.seed))
        with torch.no_grad():
            und1 = float((clf(xa1).argmax(1) == yt).float().mean())
        rows[f"rung1 pgd-10 {eps_255:g}"] = {"undefended_acc": und1, **defended(d, xa1.numpy(), y, a.repeats, a.seed)}
        ts = time.perf_counter()
        xa2, st = pipeline_pgd(d, ref, xt, yt, eps, steps=a.steps, eot=a.eot, seed=a.seed)
        with torch.no_grad():
            und2 = float((clf(xa2).argmax(1) == yt).float().mean())
        rows[f"rung2 pipeline pgd-{a.steps} eot-{a.eot} {eps_255:g}"] = {
            "undefended_acc": und2, **defended(d, xa2.numpy(), y, a.repeats, a.seed), **st,
            "attack_s": time.perf_counter() - ts}
    res = {"bundle_id": d.bundle.bundle_id, "backend": a.backend, "data": str(Path(a.data).resolve()), "site": a.site,
           "split": a.split, "n": int(len(y)), "steps": a.steps, "eot": a.eot, "repeats": a.repeats, "seed": a.seed,
           "gate": d.bundle.gate, "purifier_steps": ref.steps, "rows": rows, "wall_s": time.perf_counter() - t0,
           "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": a.threads}}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adaptive_eval.json").write_text(json.dumps(res, indent=1))
    tab = Table(title=f"rungs 1–2 · site {a.site} {a.split} · n = {len(y)} · bundle {d.bundle.short_id} · "
                      f"{a.repeats} Defender runs per scan")
    for c in ("input", "undefended acc", "defended acc (mean ± std)", "worst of runs", "flagged"):
        tab.add_column(c, justify="right")
    for k, v in rows.items():
        tab.add_row(k, f"{100 * v['undefended_acc']:.1f} %",
                    f"{100 * v['defended_acc_mean']:.1f} ± {100 * v['defended_acc_std']:.1f} %",
                    f"{100 * v['defended_acc_worst_of_repeats']:.1f} %", f"{100 * v['flag_rate']:.1f} %")
    Console(width=max(120, Console().width)).print(tab)
    print(f"wrote {out / 'adaptive_eval.json'} ({res['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
