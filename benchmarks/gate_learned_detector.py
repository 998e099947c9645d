"""A detector trained on attacked scans, against the spectral gate's blind spot (research; results in
benchmarks/RESULTS.md, "Gate and detector").

Every fixed statistic measured so far (spectral, MAE error, classifier confidence) is blind on a scanner
that keeps ~96 % of k-space once the classifier is adversarially trained. This measures the remaining
lever: a small CNN trained to tell clean scans from PGD scans, and then what it is worth against an
attacker who knows it.

1. Training set: the train split of each ``--train-sites`` site (``--per-site`` scans, both classes),
   each scan once clean and once under PGD-10 ℓ∞ against the bundle's torch classifier alone, ε cycling
   through ``--train-eps`` (generator seed 0).
2. Detector: 4 conv layers (16-32-64-64, stride 1-2-2-2, BatchNorm, ReLU), global average and max
   pooling, one logit (~60 k parameters); BCE, Adam, random flips. Input: the scan (``image``) or the
   scan minus its 3×3 median (``residual``, the fine-scale content where scanner noise and the attack
   meet).
3. Per site (training sites and, with ``--unseen``, profiles no model saw): τ = the 95 % quantile of the
   detector's logit on clean scans of the site (its val split; for unseen profiles 100 random
   train scans of both classes, the calibration protocol of the unseen-scanner target); false flags on the clean test
   scans; AUROC clean vs PGD-10 (seed 1) at each ``--eps``.
4. Evasion (``--evade``): PGD-20 that raises the classifier's loss where the scan is under τ and lowers
   the detector's logit where it is not (``eval.adaptive.evasion_step``). Reported: the share of test scans
   where the classifier is right or the detector flags, under the plain attack and under evasion, and the
   classifier alone.
5. Hardening (``--harden R``): R rounds of a 20-step evasion at 8/255 against the current detector on
   ``--harden-per-site`` train scans per site, then ``--harden-epochs`` of fine-tuning on clean vs evasion
   scans (the detector's own adversarial training). ``--save`` / ``--load`` keep the detectors between runs.

    python benchmarks/gate_learned_detector.py --data runs/rc520/work/data --unseen runs/unseen7/data \
        --out benchmarks/results/gate/learned_detector.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from medfedpure.data import load_split
from medfedpure.eval.adaptive import evasion_step
from medfedpure.eval.defended import auroc
from medfedpure.models.weights import load_model
from medfedpure.runtime.bundle import default_bundle_path
from medfedpure.train.attacks import pgd_linf
from safetensors.torch import load_file, save_file
from torch import nn


def median3(x: torch.Tensor) -> torch.Tensor:
    """3×3 median of x [B,1,S,S] (replicate padding)."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return p.unfold(2, 3, 1).unfold(3, 3, 1).reshape(*x.shape, 9).median(-1).values


class Detector(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        layers: list[nn.Module] = []
        cin = 1
        for cout, stride in ((16, 1), (32, 2), (64, 2), (64, 2)):
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * cin, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "residual":
            x = (x - median3(x)) * 10.0
        h = self.features(x)
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))[:, 0]


def attack(clf: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: np.ndarray | float, seed: int,
           bs: int = 32) -> torch.Tensor:
    """PGD-10 ℓ∞ against the classifier alone; ``eps`` one radius or one per scan (in [0, 1] units)."""
    g = torch.Generator().manual_seed(seed)
    eps_arr = np.broadcast_to(np.asarray(eps, dtype=np.float64), (len(x),))
    out = []
    for i in range(0, len(x), bs):
        e = eps_arr[i:i + bs]
        if np.all(e == e[0]):
            out.append(pgd_linf(clf, x[i:i + bs], y[i:i + bs], float(e[0]), steps=10, generator=g))
        else:  # one radius per scan: attack each radius group
            xb = x[i:i + bs].clone()
            for v in np.unique(e):
                m = torch.from_numpy(e == v)
                xb[m] = pgd_linf(clf, x[i:i + bs][m], y[i:i + bs][m], float(v), steps=10, generator=g)
            out.append(xb)
    return torch.cat(out)


@torch.no_grad()
def logits(det: Detector, x: torch.Tensor, bs: int = 64) -> np.ndarray:
    det.eval()
    return torch.cat([det(x[i:i + bs]) for i in range(0, len(x), bs)]).numpy()


def train_detector(mode: str, clean: torch.Tensor, adv: torch.Tensor, epochs: int, seed: int) -> Detector:
    torch.manual_seed(seed)
    det = Detector(mode)
    opt = torch.optim.Adam(det.parameters(), lr=1e-3)
    x = torch.cat([clean, adv])
    t = torch.cat([torch.zeros(len(clean)), torch.ones(len(adv))])
    g = torch.Generator().manual_seed(seed)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * ((len(x) + 63) // 64))
    for ep in range(epochs):
        det.train()
        perm = torch.randperm(len(x), generator=g)
        tot = 0.0
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            xb = x[idx]
            if torch.rand((), generator=g) < 0.5:
                xb = xb.flip(3)
            loss = F.binary_cross_entropy_with_logits(det(xb), t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
        print(f"  [{mode}] epoch {ep + 1}/{epochs}: loss {tot / len(x):.4f}", flush=True)
    return det.eval()


def finetune(det: Detector, clean: torch.Tensor, adv: torch.Tensor, epochs: int, seed: int) -> Detector:
    """A few epochs on clean vs evasion scans at a fixed small learning rate."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(det.parameters(), lr=3e-4)
    x = torch.cat([clean, adv])
    t = torch.cat([torch.zeros(len(clean)), torch.ones(len(adv))])
    for _ in range(epochs):
        det.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = F.binary_cross_entropy_with_logits(det(x[idx]), t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return det.eval()


def evade(clf: nn.Module, det: Detector, x: torch.Tensor, y: torch.Tensor, eps: float, tau: float,
          steps: int = 20, seed: int = 2, bs: int = 32) -> torch.Tensor:
    """PGD-20 that stays under τ: the classifier's loss up where the scan is under τ, the detector's logit
    down where it is not. Returns, per scan, the first iterate that is both misclassified and under τ, else
    the last iterate."""
    g = torch.Generator().manual_seed(seed)
    det.eval()
    alpha = 2.5 * eps / steps
    out = []
    for i in range(0, len(x), bs):
        xb, yb = x[i:i + bs], y[i:i + bs]
        eta = (torch.rand(xb.shape, generator=g) * 2 - 1) * eps
        found = torch.zeros(len(xb), dtype=torch.bool)
        best = xb.clone()
        for _ in range(steps + 1):
            eta = ((xb + eta).clamp(0, 1) - xb).detach().requires_grad_(True)
            xa = xb + eta
            p, score = clf(xa), det(xa)
            loss = F.nll_loss(p.clamp_min(1e-12).log(), yb, reduction="sum")
            (g_loss,) = torch.autograd.grad(loss, eta, retain_graph=True)
            (g_score,) = torch.autograd.grad(score.sum(), eta)
            with torch.no_grad():
                under = score < tau
                new = (p.argmax(1) != yb) & under & ~found
                best[new] = xa[new]
                found |= new
                best[~found] = xa[~found]
                eta = evasion_step(eta.detach(), under, g_loss, g_score, alpha, eps)
        out.append(best.detach())
    return torch.cat(out)


def site_eval(clf: nn.Module, dets: dict[str, Detector], x_cal: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor,
              eps_list: list[float], evade_eps: list[float], evade_steps: int = 20) -> dict:
    """τ on x_cal, false flags on clean xt, AUROC vs PGD-10 (seed 1) per ε, evasion per ``evade_eps``."""
    with torch.no_grad():
        clean_ok = (clf(xt).argmax(1) == yt).numpy()
    row: dict = {"n_cal": len(x_cal), "n_test": len(xt), "clean_acc": float(clean_ok.mean()), "pgd": {}, "det": {}}
    adv = {}
    for e in eps_list:
        adv[e] = attack(clf, xt, yt, e / 255, seed=1)
        with torch.no_grad():
            row["pgd"][f"{e:g}"] = float((clf(adv[e]).argmax(1) == yt).float().mean())
    for mode, det in dets.items():
        tau = float(np.quantile(logits(det, x_cal), 0.95))
        s_clean = logits(det, xt)
        r: dict = {"tau": tau, "ffr_test": float((s_clean >= tau).mean()), "auroc": {}, "tpr": {}, "evasion": {}}
        for e in eps_list:
            s_adv = logits(det, adv[e])
            r["auroc"][f"{e:g}"] = auroc(s_clean, s_adv)
            r["tpr"][f"{e:g}"] = float((s_adv >= tau).mean())
        for e in evade_eps:
            with torch.no_grad():
                ok_plain = (clf(adv[e]).argmax(1) == yt).numpy() | (logits(det, adv[e]) >= tau)
            xe = evade(clf, det, xt, yt, e / 255, tau, steps=evade_steps)
            with torch.no_grad():
                ok_clf = (clf(xe).argmax(1) == yt).numpy()
            flagged = logits(det, xe) >= tau
            r["evasion"][f"{e:g}"] = {"right_or_flagged_plain_pgd": float(ok_plain.mean()),
                                      "right_or_flagged_evasion": float((ok_clf | flagged).mean()),
                                      "flagged_evasion": float(flagged.mean())}
        row["det"][mode] = r
    return row


def print_row(name: str, row: dict, eps_list: list[float], evade_eps: list[float]) -> None:
    pgd = " / ".join(f"{row['pgd'][f'{e:g}']:.1%}" for e in eps_list)
    print(f"{name}: {row['n_test']} test scans, classifier clean {row['clean_acc']:.1%}, under PGD-10 "
          f"{'/'.join(f'{e:g}' for e in eps_list)}: {pgd} ({row['wall_s']:.0f} s)")
    for mode, r in row["det"].items():
        au = " / ".join(f"{r['auroc'][f'{e:g}']:.3f}" for e in eps_list)
        tp = " / ".join(f"{r['tpr'][f'{e:g}']:.2f}" for e in eps_list)
        ev = "; ".join(f"{e:g}/255 right-or-flagged PGD {v['right_or_flagged_plain_pgd']:.1%} -> evasion "
                       f"{v['right_or_flagged_evasion']:.1%} (flagged {v['flagged_evasion']:.1%})"
                       for e, v in ((e, r["evasion"][f"{e:g}"]) for e in evade_eps))
        print(f"  {mode:9s} false flags {r['ffr_test']:.1%}  AUROC {au}  TPR@τ {tp}  {ev}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the embedded default)")
    ap.add_argument("--data", type=Path, required=True, help="synthetic data folder of the training profiles")
    ap.add_argument("--unseen", type=Path, default=None, help="synthetic data folder of profiles no model saw")
    ap.add_argument("--train-sites", default="0,1,2,3")
    ap.add_argument("--per-site", type=int, default=400, help="train scans per site (0: all)")
    ap.add_argument("--train-eps", default="2,4,8", help="PGD radii (/255) cycled over the training scans")
    ap.add_argument("--eps", default="2,4,8", help="test PGD radii (/255)")
    ap.add_argument("--evade", default="8", help="radii (/255) of the evasion attack ('' for none)")
    ap.add_argument("--evade-steps", type=int, default=20)
    ap.add_argument("--modes", default="image,residual")
    ap.add_argument("--save", type=Path, default=None, help="write each trained detector's state_dict (safetensors)")
    ap.add_argument("--load", type=Path, default=None, help="evaluate detectors saved with --save (no training)")
    ap.add_argument("--harden", type=int, default=0, help="rounds of training against the evasion (each: 20-step "
                    "evasion at 8/255 on --harden-per-site train scans of each training site, then --harden-epochs)")
    ap.add_argument("--harden-per-site", type=int, default=100)
    ap.add_argument("--harden-epochs", type=int, default=3)
    ap.add_argument("--eval-sets", default="", help="only these, e.g. 'seed-0 site 2,unseen site 0' ('' = all)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--limit", type=int, default=0, help="test scans per site (0: all; both classes kept)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="JSON output")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = (args.bundle or default_bundle_path()) / "torch"
    clf = load_model(root / "classifier.safetensors")[0].eval()
    for p in clf.parameters():
        p.requires_grad_(False)
    train_eps = [float(e) for e in args.train_eps.split(",")]
    modes = args.modes.split(",")
    eps_list = [float(e) for e in args.eps.split(",")]
    evade_eps = [float(e) for e in args.evade.split(",") if e]
    t0 = time.perf_counter()
    t_attack, t_train, dets = 0.0, {}, {}
    if args.load:
        for mode in modes:
            dets[mode] = Detector(mode)
            dets[mode].load_state_dict(load_file(args.load / f"detector_{mode}.safetensors"))
            dets[mode].eval()
    else:
        clean, advs = [], []
        for k, site in enumerate(int(s) for s in args.train_sites.split(",")):
            x, y = load_split(args.data, site, "train", 128)
            if args.per_site:
                idx = np.random.default_rng(site).permutation(len(x))[:args.per_site]
                x, y = x[idx], y[idx]
            xt_, yt_ = torch.from_numpy(x), torch.from_numpy(y)
            e = np.array([train_eps[(i + k) % len(train_eps)] for i in range(len(x))]) / 255
            clean.append(xt_)
            advs.append(attack(clf, xt_, yt_, e, seed=site))
            print(f"training set: site {site}, {len(x)} scans attacked ({time.perf_counter() - t0:.0f} s)", flush=True)
        clean_t, adv_t = torch.cat(clean), torch.cat(advs)
        t_attack = time.perf_counter() - t0
        for mode in modes:
            t1 = time.perf_counter()
            dets[mode] = train_detector(mode, clean_t, adv_t, args.epochs, seed=0)
            t_train[mode] = time.perf_counter() - t1
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            for mode, det in dets.items():
                save_file(det.state_dict(), args.save / f"detector_{mode}.safetensors")
    t_harden = 0.0
    if args.harden:
        t1 = time.perf_counter()
        for mode, det in dets.items():
            xs, ys, xv = [], [], []
            for site in (int(s) for s in args.train_sites.split(",")):
                x, y = load_split(args.data, site, "train", 128)
                idx = np.random.default_rng(100 + site).permutation(len(x))[:args.harden_per_site]
                xs.append(torch.from_numpy(x[idx]))
                ys.append(torch.from_numpy(y[idx]))
                xv.append(torch.from_numpy(load_split(args.data, site, "val", 128)[0]))
            xh, yh, xval = torch.cat(xs), torch.cat(ys), torch.cat(xv)
            pos: list[torch.Tensor] = []
            for r in range(args.harden):
                tau = float(np.quantile(logits(det, xval), 0.95))
                pos.append(evade(clf, det, xh, yh, 8 / 255, tau, seed=10 + r))
                flagged = float((logits(det, pos[-1]) >= tau).mean())
                print(f"  [{mode}] harden round {r + 1}: {flagged:.1%} of the evasion flagged before training", flush=True)
                dets[mode] = det = finetune(det, torch.cat([xh] * len(pos)), torch.cat(pos), args.harden_epochs, seed=r)
        t_harden = time.perf_counter() - t1
        if args.save:
            for mode, det in dets.items():
                save_file(det.state_dict(), args.save / f"detector_{mode}_hardened.safetensors")
    results: dict = {"bundle": str(root.parent), "data": str(args.data), "unseen": str(args.unseen),
                     "train_sites": args.train_sites, "per_site": args.per_site, "train_eps": train_eps,
                     "epochs": args.epochs, "eps": eps_list, "evade": evade_eps, "evade_steps": args.evade_steps,
                     "loaded": str(args.load), "harden": args.harden, "t_harden_s": t_harden, "t_attack_s": t_attack,
                     "t_train_s": t_train, "sites": {}}

    def subset(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if args.limit and args.limit < len(x):
            idx = np.random.default_rng(0).permutation(len(x))[:args.limit]
            x, y = x[idx], y[idx]
        return torch.from_numpy(x), torch.from_numpy(y)

    sets = [("seed-0", args.data, s, "val") for s in range(4)]
    if args.unseen:
        sets += [("unseen", args.unseen, s, "train100") for s in range(4)]
    wanted = {w.strip() for w in args.eval_sets.split(",") if w.strip()}
    for tag, data, site, cal in sets:
        if wanted and f"{tag} site {site}" not in wanted:
            continue
        t1 = time.perf_counter()
        if cal == "val":
            x_cal = torch.from_numpy(load_split(data, site, "val", 128)[0])
        else:
            xtr = load_split(data, site, "train", 128)[0]  # the split lists one class after the other
            x_cal = torch.from_numpy(xtr[np.random.default_rng(site).permutation(len(xtr))[:100]])
        xt, yt = subset(*load_split(data, site, "test", 128))
        row = site_eval(clf, dets, x_cal, xt, yt, eps_list, evade_eps, args.evade_steps)
        row["wall_s"] = time.perf_counter() - t1
        results["sites"][f"{tag} site {site}"] = row
        print_row(f"{tag} site {site}", row, eps_list, evade_eps)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
