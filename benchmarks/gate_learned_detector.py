"""A detector trained on attacked scans, against the spectral gate's blind spot (research; summary in
benchmarks/RESULTS.md, "Gate and detector"; full tables in docs/history.md).

Every fixed statistic measured so far (spectral, MAE error, classifier confidence) is blind on a scanner
that keeps ~96 % of k-space once the classifier is adversarially trained. This measures the remaining
lever: a small CNN trained to tell clean scans from PGD scans, and then what it is worth against an
attacker who knows it.

1. Training set: the train split of each ``--train-sites`` site (``--per-site`` scans, both classes),
   each scan once clean and once under PGD-10 ℓ∞ against the bundle's torch classifier alone, ε cycling
   through ``--train-eps`` (generator seed 0).
2. Detector: 4 conv layers (16-32-64-64, stride 1-2-2-2, BatchNorm, ReLU), then (``--head pool``) global
   average and max pooling and one logit (~60 k parameters), or (``--head patch``, the product's
   ``models.detector.AttackDetector``) one logit per 8-px patch and the mean of the 16 largest; trained with
   ``train.detector.fit_detector`` (BCE, Adam, one-cycle, random flips). Input: the scan (``image``) or the
   scan minus its 3×3 median (``residual``, pool head only).
3. Per site (training sites and, with ``--unseen``, profiles no model saw): τ = the 95 % quantile of the
   detector's logit on clean scans of the site (its val split; for unseen profiles 100 random
   train scans of both classes, the calibration protocol of the unseen-scanner target); false flags on the clean test
   scans; AUROC clean vs PGD-10 (seed 1) at each ``--eps``.
4. Evasion (``--evade``): PGD-20 that raises the classifier's loss where the scan is under τ and lowers
   the detector's logit where it is not (``train.detector.evade``; ``--evade-factors`` adds band-limited
   perturbations, ``--eps-l2`` an ℓ2 PGD AUROC check). Reported: the share of test scans
   where the classifier is right or the detector flags, under the plain attack and under evasion, and the
   classifier alone.
5. Hardening (``--harden R``): R rounds of a 20-step (``--harden-steps``) evasion at 8/255 against the current detector on
   ``--harden-per-site`` train scans per site, then ``--harden-epochs`` of fine-tuning on clean vs evasion
   scans, with the original training set when this run trained it (the detector's own adversarial
   training). ``--save`` / ``--load`` keep the detectors between runs (the patch head as a ``detector``
   checkpoint that ``models.weights.load_model`` rebuilds).

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
from medfedpure.gate.calibration import auroc
from medfedpure.models.detector import AttackDetector, DetectorConfig
from medfedpure.models.weights import load_model, save_model
from medfedpure.runtime.bundle import default_bundle_path
from medfedpure.train.attacks import pgd_l2
from medfedpure.train.detector import attacked, detector_scores, evade, fit_detector
from safetensors.torch import load_file, save_file
from torch import nn


def median3(x: torch.Tensor) -> torch.Tensor:
    """3×3 median of x [B,1,S,S] (replicate padding)."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return p.unfold(2, 3, 1).unfold(3, 3, 1).reshape(*x.shape, 9).median(-1).values


class Detector(nn.Module):
    """The research variant with global pooling: 4 conv layers (16-32-64-64, stride 1-2-2-2, BatchNorm,
    ReLU), global average and max pooling, one linear logit. ``mode`` "residual" reads the scan minus its
    3×3 median. (``--head patch`` uses the product's ``models.detector.AttackDetector`` instead.)"""

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

    def score(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "residual":
            x = (x - median3(x)) * 10.0
        h = self.features(x)
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))[:, 0]


def save_detector(det: nn.Module, path: Path) -> None:
    if isinstance(det, AttackDetector):
        save_model(path, det, det.cfg, "detector")
    else:
        save_file(det.state_dict(), path)


def make_detector(mode: str, head: str) -> nn.Module:
    if head == "pool":
        return Detector(mode)
    if mode != "image":
        raise SystemExit(f"--head patch reads the image only (got mode {mode!r})")
    return AttackDetector(DetectorConfig.preset("small"))


def attack_l2(clf: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int, bs: int = 32) -> torch.Tensor:
    """PGD-10 ℓ2 against the classifier alone (an attack family the detector never trained on)."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([pgd_l2(clf, x[i:i + bs], y[i:i + bs], eps, steps=10, generator=g) for i in range(0, len(x), bs)])


def evasion_key(eps: float, factor: int) -> str:
    return f"{eps:g}" if factor == 1 else f"{eps:g} band-limited x{factor}"


def site_eval(clf: nn.Module, dets: dict[str, Detector], x_cal: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor,
              eps_list: list[float], evade_eps: list[float], evade_steps: int = 20, evade_factors: tuple[int, ...] = (1,),
              l2_eps: tuple[float, ...] = ()) -> dict:
    """τ on x_cal, false flags on clean xt, AUROC vs PGD-10 (seed 1) per ε (ℓ∞ /255, and ℓ2 per ``l2_eps``),
    evasion per ``evade_eps`` and band-limiting factor."""
    with torch.no_grad():
        clean_ok = (clf(xt).argmax(1) == yt).numpy()
    row: dict = {"n_cal": len(x_cal), "n_test": len(xt), "clean_acc": float(clean_ok.mean()), "pgd": {}, "det": {}}
    adv = {}
    for e in eps_list:
        adv[f"{e:g}"] = attacked(clf, xt, yt, e / 255, seed=1)
    for e in l2_eps:
        adv[f"l2 {e:g}"] = attack_l2(clf, xt, yt, e, seed=1)
    with torch.no_grad():
        for k, xa in adv.items():
            row["pgd"][k] = float((clf(xa).argmax(1) == yt).float().mean())
    for mode, det in dets.items():
        tau = float(np.quantile(detector_scores(det, x_cal), 0.95))
        s_clean = detector_scores(det, xt)
        r: dict = {"tau": tau, "ffr_test": float((s_clean >= tau).mean()), "auroc": {}, "tpr": {}, "evasion": {}}
        for k, xa in adv.items():
            s_adv = detector_scores(det, xa)
            r["auroc"][k] = auroc(s_clean, s_adv)
            r["tpr"][k] = float((s_adv >= tau).mean())
        for e in evade_eps:
            xa = adv[f"{e:g}"] if f"{e:g}" in adv else attacked(clf, xt, yt, e / 255, seed=1)
            with torch.no_grad():
                ok_plain = (clf(xa).argmax(1) == yt).numpy() | (detector_scores(det, xa) >= tau)
            for f in evade_factors:
                xe = evade(clf, det, xt, yt, e / 255, tau, steps=evade_steps, factor=f)
                with torch.no_grad():
                    ok_clf = (clf(xe).argmax(1) == yt).numpy()
                flagged = detector_scores(det, xe) >= tau
                r["evasion"][evasion_key(e, f)] = {"right_or_flagged_plain_pgd": float(ok_plain.mean()),
                                                   "right_or_flagged_evasion": float((ok_clf | flagged).mean()),
                                                   "right_evasion": float(ok_clf.mean()),
                                                   "flagged_evasion": float(flagged.mean())}
        row["det"][mode] = r
    return row


def print_row(name: str, row: dict) -> None:
    pgd = " / ".join(f"{k}: {v:.1%}" for k, v in row["pgd"].items())
    print(f"{name}: {row['n_test']} test scans, classifier clean {row['clean_acc']:.1%}, under PGD-10 {pgd} "
          f"({row['wall_s']:.0f} s)")
    for mode, r in row["det"].items():
        au = " / ".join(f"{k} {v:.3f}" for k, v in r["auroc"].items())
        tp = " / ".join(f"{v:.2f}" for v in r["tpr"].values())
        ev = "; ".join(f"{k.replace(' ', '/255 ', 1) if ' ' in k else k + '/255'} right-or-flagged PGD {v['right_or_flagged_plain_pgd']:.1%} -> evasion "
                       f"{v['right_or_flagged_evasion']:.1%} (flagged {v['flagged_evasion']:.1%})"
                       for k, v in r["evasion"].items())
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
    ap.add_argument("--evade-factors", default="1", help="band-limiting factors of the evasion (1: pixel space; "
                    "e.g. '1,4': also a perturbation upsampled from a 4× coarser grid, one the hardening never saw)")
    ap.add_argument("--eps-l2", default="", help="ℓ2 radii of a PGD-10 ℓ2 AUROC check, e.g. '0.5,1' ('' for none)")
    ap.add_argument("--modes", default="image,residual")
    ap.add_argument("--head", choices=("pool", "patch"), default="pool",
                    help="pool: global pooling and one logit; patch: one logit per 8-px patch, top-16 mean")
    ap.add_argument("--save", type=Path, default=None, help="write each trained detector's state_dict (safetensors)")
    ap.add_argument("--load", type=Path, default=None, help="evaluate detectors saved with --save (no training)")
    ap.add_argument("--harden", type=int, default=0, help="rounds of training against the evasion (each: 20-step "
                    "evasion at 8/255 on --harden-per-site train scans of each training site, then --harden-epochs)")
    ap.add_argument("--harden-per-site", type=int, default=100)
    ap.add_argument("--harden-steps", type=int, default=20, help="steps of each hardening round's evasion")
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
    evade_factors = tuple(int(f) for f in args.evade_factors.split(","))
    l2_eps = tuple(float(e) for e in args.eps_l2.split(",") if e)
    tag_head = "" if args.head == "pool" else f"_{args.head}"
    t0 = time.perf_counter()
    t_attack, t_train, dets = 0.0, {}, {}
    if args.load:
        for mode in modes:
            path = args.load / f"detector_{mode}{tag_head}.safetensors"
            if args.head == "patch":
                dets[mode] = load_model(path)[0]
            else:
                dets[mode] = make_detector(mode, args.head)
                dets[mode].load_state_dict(load_file(path))
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
            advs.append(attacked(clf, xt_, yt_, e, seed=site))
            print(f"training set: site {site}, {len(x)} scans attacked ({time.perf_counter() - t0:.0f} s)", flush=True)
        clean_t, adv_t = torch.cat(clean), torch.cat(advs)
        t_attack = time.perf_counter() - t0
        for mode in modes:
            t1 = time.perf_counter()
            torch.manual_seed(0)
            dets[mode] = make_detector(mode, args.head)
            fit_detector(dets[mode], clean_t, adv_t, epochs=args.epochs, seed=0, desc=f"detector [{mode}]")
            t_train[mode] = time.perf_counter() - t1
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            for mode, det in dets.items():
                save_detector(det, args.save / f"detector_{mode}{tag_head}.safetensors")
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
                tau = float(np.quantile(detector_scores(det, xval), 0.95))
                pos.append(evade(clf, det, xh, yh, 8 / 255, tau, steps=args.harden_steps, seed=10 + r))
                flagged = float((detector_scores(det, pos[-1]) >= tau).mean())
                print(f"  [{mode}] harden round {r + 1}: {flagged:.1%} of the evasion flagged before training", flush=True)
                # the evasion scans of every round so far, and the original training set when this run has it
                neg, adv_h = [xh] * len(pos), list(pos)
                if not args.load:
                    neg, adv_h = [clean_t, *neg], [adv_t, *adv_h]
                fit_detector(det, torch.cat(neg), torch.cat(adv_h), epochs=args.harden_epochs, seed=r, lr=3e-4,
                             one_cycle=False, desc=f"hardening round {r + 1}")
        t_harden = time.perf_counter() - t1
        if args.save:
            for mode, det in dets.items():
                save_detector(det, args.save / f"detector_{mode}{tag_head}_hardened.safetensors")
    results: dict = {"bundle": str(root.parent), "data": str(args.data), "unseen": str(args.unseen),
                     "train_sites": args.train_sites, "per_site": args.per_site, "train_eps": train_eps,
                     "epochs": args.epochs, "head": args.head, "eps": eps_list, "evade": evade_eps, "evade_steps": args.evade_steps,
                     "evade_factors": list(evade_factors), "eps_l2": list(l2_eps),
                     "loaded": str(args.load), "harden": args.harden, "harden_steps": args.harden_steps,
                     "t_harden_s": t_harden, "t_attack_s": t_attack,
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
        row = site_eval(clf, dets, x_cal, xt, yt, eps_list, evade_eps, args.evade_steps, evade_factors, l2_eps)
        row["wall_s"] = time.perf_counter() - t1
        results["sites"][f"{tag} site {site}"] = row
        print_row(f"{tag} site {site}", row)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
