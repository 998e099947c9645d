"""Is a classifier's robustness real? A stronger attack than the training-time PGD-20 on one site's classifier alone
(research; results in benchmarks/RESULTS.md, "Robustness").

Single-step adversarial training (N-FGSM, FGSM-RS) can look robust against a weak attack and not be: catastrophic
overfitting and gradient masking both show as a large gap between PGD-20 and a stronger, differently built attack.
This script attacks a saved classifier (the ``.safetensors`` of ``adv_lesion_study.py`` or a run's
``classifier.safetensors``) on every scan of a split with

- PGD-20 (ℓ∞, step 2.5·ε/20, one random start): the study's own evaluation, for the gap;
- PGD-``steps`` with ``restarts`` random starts (step 2.5·ε/steps), this project's implementation;
- APGD-CE (``apgd_steps`` steps, torchattacks: an independent implementation with its own step-size rule;
  APGD-DLR needs three classes and the task has two);

and counts a scan right only if it is right under every attack (the per-scan worst case). Where the gap
between PGD-20 and the worst case is a few scans, the model's robustness does not rest on a weak attack.

    python benchmarks/strong_attack.py --model runs/nf/s1_n840_nfgsm_e80.safetensors --data runs/d4800 \\
        --site 1 --eps 8 --out benchmarks/results/lesion_study/nfgsm/strong_e80.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from medfedpure.data import load_split
from medfedpure.models.weights import load_model
from medfedpure.train.attacks import pgd


class _Logits(torch.nn.Module):
    """The classifier's log-probabilities as logits (what torchattacks differentiates)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.log_probs(x)


def _right(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return (model(x).argmax(1) == y).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="a saved MoE classifier (.safetensors)")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--site", type=int, required=True)
    ap.add_argument("--split", default="test", choices=("val", "test"))
    ap.add_argument("--eps", type=float, default=8.0, help="ℓ∞ radius, /255")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--apgd-steps", type=int, default=100)
    ap.add_argument("--pgd20-only", action="store_true", help="only the PGD-20 attack (the study's own)")
    ap.add_argument("--robust-val-subset", type=int, default=0, metavar="N",
                    help="with --split val: only the N scans training's robust validation attacks each epoch "
                         "(ClassifierTrainConfig.robust_val = N, seed 0) — how far that estimate is from the split's")
    ap.add_argument("--batch", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if a.steps < 1 or a.restarts < 1 or a.apgd_steps < 1:
        raise SystemExit("--steps, --restarts and --apgd-steps must be >= 1")
    import torchattacks

    torch.set_num_threads(a.threads)
    model, _, _ = load_model(a.model)
    model.eval().requires_grad_(False)
    x_np, y_np = load_split(a.data, a.site, a.split, 128)
    if a.robust_val_subset:
        if a.split != "val":
            raise SystemExit("--robust-val-subset is a subset of the val split: add --split val")
        from medfedpure.train.classifier import robust_val_subset

        sub = robust_val_subset(len(y_np), a.robust_val_subset, seed=0).numpy()  # train_classifier's, seed 0
        x_np, y_np = x_np[sub], y_np[sub]
    x, y = torch.as_tensor(x_np), torch.as_tensor(y_np)
    eps = a.eps / 255
    g = torch.Generator().manual_seed(0)
    apgd = torchattacks.APGD(_Logits(model).eval(), norm="Linf", eps=eps, steps=a.apgd_steps, n_restarts=1,
                             loss="ce", seed=0)
    attacks = {"pgd20": lambda xb, yb: pgd(model, xb, yb, eps, steps=20, generator=g)}
    for r in range(0 if a.pgd20_only else a.restarts):
        attacks[f"pgd{a.steps}_r{r}"] = lambda xb, yb: pgd(model, xb, yb, eps, steps=a.steps, generator=g)
    if not a.pgd20_only:
        attacks[f"apgd_ce{a.apgd_steps}"] = lambda xb, yb: apgd(xb, yb)
    right: dict[str, np.ndarray] = {"clean": _right(model, x, y)}
    seconds: dict[str, float] = {}
    for name, attack in attacks.items():
        t0 = time.perf_counter()
        ok = []
        for i in range(0, len(x), a.batch):
            xa = attack(x[i:i + a.batch], y[i:i + a.batch]).detach()
            if float((xa - x[i:i + a.batch]).abs().max()) > eps + 1e-6 or xa.min() < 0 or xa.max() > 1:
                raise SystemExit(f"{name} left the ε-ball or [0, 1]: the attack is broken")
            ok.append(_right(model, xa, y[i:i + a.batch]))
        right[name] = np.concatenate(ok)
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"{name:>14}: {100 * right[name].mean():5.1f} %  ({seconds[name]} s)", flush=True)
    worst = np.logical_and.reduce([right[k] for k in attacks])
    res = {"model": str(a.model), "data": str(a.data), "site": a.site, "split": a.split, "scans": len(y),
           "robust_val_subset": a.robust_val_subset or None,
           "eps_255": a.eps, "accuracy": {k: round(100 * float(v.mean()), 2) for k, v in right.items()},
           "worst_case": round(100 * float(worst.mean()), 2),
           "pgd20_minus_worst_scans": int(right["pgd20"].sum() - worst.sum()),
           "by_class_worst": {str(c): f"{int(worst[y_np == c].sum())}/{int((y_np == c).sum())}" for c in (0, 1)},
           "seconds": seconds}
    print(f"{'worst case':>14}: {res['worst_case']:5.1f} %  (PGD-20 − worst: {res['pgd20_minus_worst_scans']} scans)")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
