"""Training of the attack detector (``models.detector``): clean vs attacked scans, then against its own evasion.

1. Attacked set (:func:`attacked`): each training scan once more under PGD against the classifier it
   guards (the classifier alone), the attack cycling scan by scan through the ℓ∞ radii ``train_eps`` and
   then the ℓ2 radii ``train_eps_l2``.
2. :func:`fit_detector`: binary cross-entropy on the detector's score (clean 0, attacked 1), Adam, random
   left-right flips; from scratch with a one-cycle schedule (``torch.optim.lr_scheduler.OneCycleLR``),
   fine-tuning at a fixed learning rate.
3. Hardening (``harden_rounds``; the detector's own adversarial training): per round, τ = the detector's
   (1 − ``target_false_flag_rate``) quantile on clean calibration scans, then :func:`evade` — PGD that fools
   the classifier while keeping the score under τ, as an attacker who holds the detector would — on the
   training scans, and ``harden_epochs`` of fine-tuning on the original set plus every round's evasion scans.

Without hardening an attacker who has the detector's weights walks around it (benchmarks/RESULTS.md,
"Gate and detector": a 100-step evasion leaves +0–2 points over the classifier alone). Everything here
works on tensors of one or many sites; which scans go in is the caller's choice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medfedpure.progress import progress as progress_bar
from medfedpure.train.attacks import attack_loss, band_limited, evasion_step, pgd
from medfedpure.train.device import channels_last
from medfedpure.train.validate import freeze_tuples, require_at_least, require_non_negative, require_positive

__all__ = ["DetectorTrainConfig", "ClassifierLoadError", "load_classifier", "attacked", "fit_detector", "evade",
           "detector_scores", "train_detector", "evaluate_detector"]

Classifier = Callable[[Tensor], Tensor]


class ClassifierLoadError(ValueError):
    """The classifier source is not a bundle, a run folder with a classifier, or a classifier checkpoint."""


def load_classifier(path: str | Path) -> nn.Module:
    """The classifier a detector guards, from a bundle folder (verified; its ``classifier.torch``), a run
    folder (its ``classifier.safetensors``) or a ``.safetensors`` file of a ``moe`` model; in eval mode with
    gradients off."""
    from medfedpure.models.weights import WeightsError, load_model, model_from_bytes
    from medfedpure.runtime.bundle import BundleError, verify_bundle

    path = Path(path)
    try:
        if path.is_dir() and (path / "manifest.json").is_file():
            model, _ = model_from_bytes(verify_bundle(path, allow_unsigned=True).read_bytes("classifier.torch"))[:2]
            kind = "moe"
        else:
            model, _, meta = load_model(path / "classifier.safetensors" if path.is_dir() else path)
            kind = meta.get("kind")
    except (BundleError, WeightsError, OSError, KeyError, ValueError) as exc:
        raise ClassifierLoadError(f"classifier {path}: {exc} (give a bundle folder, a run folder holding "
                                  "classifier.safetensors, or a classifier .safetensors file)") from exc
    if kind != "moe":
        raise ClassifierLoadError(f"classifier {path}: a {kind!r} model, not a classifier ('moe')")
    return model.eval().requires_grad_(False)


@dataclass(frozen=True)
class DetectorTrainConfig:
    """Options of one detector training job.

    Attributes:
        epochs / batch_size / lr / seed: the from-scratch phase (``lr``: the one-cycle peak).
        train_eps: ℓ∞ radii (input units, e.g. 8/255) cycled over the training scans.
        train_eps_l2: ℓ2 radii (input units, e.g. 0.5) cycled with them (empty: ℓ∞ only).
        attack_steps: PGD steps of the attacked set.
        harden_rounds: rounds of training against the evasion (0: none).
        harden_scans: the evasion runs on this many training scans (a random subset drawn from ``seed``;
            0: all of them).
        harden_eps / harden_steps: the evasion's ℓ∞ radius and steps.
        harden_epochs / harden_lr: fine-tuning per round.
        target_false_flag_rate: τ during hardening is the (1 − this) quantile on the clean calibration scans.
    """

    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    train_eps: tuple[float, ...] = (2 / 255, 4 / 255, 8 / 255)
    train_eps_l2: tuple[float, ...] = ()
    attack_steps: int = 10
    harden_rounds: int = 0
    harden_scans: int = 400
    harden_eps: float = 8 / 255
    harden_steps: int = 20
    harden_epochs: int = 3
    harden_lr: float = 3e-4
    target_false_flag_rate: float = 0.05

    def __post_init__(self) -> None:
        freeze_tuples(self, ("train_eps", "train_eps_l2"))
        require_at_least(self, ("epochs", "batch_size", "attack_steps", "harden_steps", "harden_epochs"))
        require_non_negative(self, ("harden_rounds", "harden_scans", "seed"))
        require_positive(self, ("lr", "harden_lr", "harden_eps"))
        if not self.train_eps or any(not 0 < e <= 1 for e in self.train_eps):
            raise ValueError(f"train_eps={self.train_eps}: expected radii in (0, 1] (input units, e.g. 8/255)")
        if any(not e > 0 for e in self.train_eps_l2):
            raise ValueError(f"train_eps_l2={self.train_eps_l2}: expected positive ℓ2 radii (input units, e.g. 0.5)")
        if not 0 < self.target_false_flag_rate < 0.5:
            raise ValueError(f"target_false_flag_rate={self.target_false_flag_rate}: expected (0, 0.5)")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DetectorTrainConfig:
        """``tiny`` (tests: 2 epochs, 2-step attacks) or ``small`` (the defaults), with field overrides."""
        presets: dict[str, dict[str, Any]] = {
            "tiny": dict(epochs=2, batch_size=16, attack_steps=2, harden_steps=2, harden_epochs=1),
            "small": {},
        }
        if name not in presets:
            raise ValueError(f"unknown detector training preset {name!r}: expected one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def attacks(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Per training scan (``n``), its attack: the radius and the norm (``"linf"`` / ``"l2"``), cycling
        through ``train_eps`` then ``train_eps_l2``."""
        cycle = [("linf", e) for e in self.train_eps] + [("l2", e) for e in self.train_eps_l2]
        norms = np.array([cycle[i % len(cycle)][0] for i in range(n)])
        return np.array([cycle[i % len(cycle)][1] for i in range(n)], dtype=np.float64), norms


def attacked(classifier: Classifier, x: Tensor, y: Tensor, eps: float | np.ndarray, *, steps: int = 10,
             seed: int = 0, batch_size: int = 32, norm: str | np.ndarray = "linf") -> Tensor:
    """PGD (``steps``, random start from ``seed``) against the classifier alone; ``eps`` and ``norm``
    (``"linf"`` / ``"l2"``) one for all or one per scan. Returns the attacked scans (the caller's tensors
    are not modified)."""
    eps_arr = np.broadcast_to(np.asarray(eps, dtype=np.float64), (len(x),))
    norm_arr = np.broadcast_to(np.asarray(norm), (len(x),))
    g = torch.Generator().manual_seed(seed)
    out = []
    with channels_last(classifier):  # on the CPU: oneDNN's faster convolutions; the classifier leaves as it came
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            e, nb = eps_arr[i:i + batch_size], norm_arr[i:i + batch_size]
            groups = sorted(set(zip(nb.tolist(), e.tolist(), strict=True)))
            if len(groups) == 1:
                out.append(pgd(classifier, xb, yb, groups[0][1], norm=groups[0][0], steps=steps, generator=g))
                continue
            xa = xb.clone()
            for nv, v in groups:  # one attack per scan: attack each (norm, radius) group
                m = torch.from_numpy((nb == nv) & (e == v))
                xa[m] = pgd(classifier, xb[m], yb[m], v, norm=nv, steps=steps, generator=g)
            out.append(xa)
    return torch.cat(out)


@torch.no_grad()
def detector_scores(det: nn.Module, x: Tensor, batch_size: int = 64) -> np.ndarray:
    """The detector's score (``det.score``) of every scan, in eval mode, as float64 numpy."""
    det.eval()
    return torch.cat([det.score(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).double().numpy()


def fit_detector(det: nn.Module, clean: Tensor, adv: Tensor, *, epochs: int, seed: int, batch_size: int = 64,
                 lr: float = 2e-3, one_cycle: bool = True, progress: bool = True, desc: str = "detector") -> list[float]:
    """BCE on ``det.score``: clean scans 0, attacked 1; Adam, a random left-right flip per batch. ``one_cycle``:
    the learning rate follows a one-cycle schedule peaking at ``lr`` (from scratch); else ``lr`` throughout
    (fine-tuning). Returns the mean loss per epoch; ``det`` is trained in place and left in eval mode."""
    if len(clean) == 0 or len(adv) == 0:
        raise ValueError(f"fit_detector: {len(clean)} clean and {len(adv)} attacked scans; need both")
    x = torch.cat([clean, adv])
    t = torch.cat([torch.zeros(len(clean)), torch.ones(len(adv))])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(det.parameters(), lr=lr / 2 if one_cycle else lr)
    steps = (len(x) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps) if one_cycle else None
    losses = []
    bar = progress_bar(range(epochs), desc=desc, unit="epoch", enabled=progress)
    with channels_last(det):  # on the CPU: oneDNN's faster convolutions; the detector leaves as it came
        for _ in bar:
            det.train()
            perm = torch.randperm(len(x), generator=g)
            tot = 0.0
            for i in range(0, len(x), batch_size):
                idx = perm[i:i + batch_size]
                xb = x[idx]
                if torch.rand((), generator=g) < 0.5:
                    xb = xb.flip(3)
                loss = F.binary_cross_entropy_with_logits(det.score(xb), t[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                tot += float(loss.detach()) * len(idx)
            losses.append(tot / len(x))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    det.eval()
    return losses


def evade(classifier: Classifier, det: nn.Module, x: Tensor, y: Tensor, eps: float, tau: float, *,
          steps: int = 20, seed: int = 2, factor: int = 1, batch_size: int = 32) -> Tensor:
    """PGD-ℓ∞ that fools the classifier and keeps the detector's score under τ: each step lowers the score
    where a scan is still at or above τ and raises the classifier's loss where it is under
    (``train.attacks.evasion_step``), step 2.5·ε/steps from a random start. ``factor`` > 1 band-limits the
    perturbation (bilinear upsampling from a grid ``factor`` times coarser). Returns, per scan, the first
    iterate that is both misclassified and under τ, else the last."""
    if x.shape[-1] % factor:
        raise ValueError(f"factor={factor} does not divide the scan side {x.shape[-1]}")
    g = torch.Generator().manual_seed(seed)
    det.eval()
    alpha = 2.5 * eps / steps
    out = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        coarse = (len(xb), xb.shape[1], xb.shape[2] // factor, xb.shape[3] // factor)
        eta = (torch.rand(coarse, generator=g) * 2 - 1) * eps
        found = torch.zeros(len(xb), dtype=torch.bool)
        best = xb.clone()
        for _ in range(steps + 1):
            if factor == 1:  # keep x + η in [0, 1], so that no pixel sits where the clamp has no gradient
                eta = (xb + eta).clamp(0, 1) - xb
            eta = eta.detach().requires_grad_(True)
            xa = (xb + band_limited(eta, factor)).clamp(0, 1)
            score = det.score(xa)
            (g_loss,) = torch.autograd.grad(attack_loss(classifier, xa, yb, "probs"), eta, retain_graph=True)
            (g_score,) = torch.autograd.grad(score.sum(), eta)
            with torch.no_grad():
                under = score < tau
                wrong = classifier(xa).argmax(1) != yb
                new = wrong & under & ~found
                best[new] = xa[new]
                found |= new
                best[~found] = xa[~found]
                eta = evasion_step(eta.detach(), under, g_loss, g_score, alpha, eps)
        out.append(best.detach())
    return torch.cat(out)


def _tau(det: nn.Module, x_cal: Tensor, rate: float) -> float:
    return float(np.quantile(detector_scores(det, x_cal), 1 - rate))


def train_detector(det: nn.Module, classifier: Classifier, x: Tensor, y: Tensor, x_cal: Tensor,
                   cfg: DetectorTrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train ``det`` in place to guard ``classifier``: the attacked set of (x, y), from-scratch training, then
    ``cfg.harden_rounds`` of hardening with τ from the clean ``x_cal``. Returns a report: losses, per-round
    share of the evasion still flagged before that round's training, wall times."""
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"train_detector: {len(x)} scans and {len(y)} labels; need the same non-zero count")
    if len(x_cal) < 20:
        raise ValueError(f"train_detector: {len(x_cal)} calibration scans; need at least 20 to set τ")
    t0 = time.perf_counter()
    eps, norms = cfg.attacks(len(x))
    adv = attacked(classifier, x, y, eps, steps=cfg.attack_steps, seed=cfg.seed, norm=norms)
    t_attack = time.perf_counter() - t0
    losses = fit_detector(det, x, adv, epochs=cfg.epochs, seed=cfg.seed, batch_size=cfg.batch_size, lr=cfg.lr,
                          progress=progress)
    report: dict[str, Any] = {"config": cfg.to_dict(), "n_train": len(x), "n_cal": len(x_cal), "losses": losses,
                              "attack_s": t_attack, "train_s": time.perf_counter() - t0 - t_attack, "rounds": []}
    if cfg.harden_rounds:
        pick = np.random.default_rng(cfg.seed).permutation(len(x))
        pick = torch.from_numpy(np.sort(pick[:cfg.harden_scans] if cfg.harden_scans else pick))
        xh, yh = x[pick], y[pick]
    evasions: list[Tensor] = []
    for r in range(cfg.harden_rounds):
        t1 = time.perf_counter()
        tau = _tau(det, x_cal, cfg.target_false_flag_rate)
        evasions.append(evade(classifier, det, xh, yh, cfg.harden_eps, tau, steps=cfg.harden_steps,
                              seed=cfg.seed + 10 + r))
        flagged = float((detector_scores(det, evasions[-1]) >= tau).mean())
        # the original set and every round's evasion scans, each against its clean scans
        ft = fit_detector(det, torch.cat([x] + [xh] * len(evasions)), torch.cat([adv, *evasions]),
                          epochs=cfg.harden_epochs, seed=cfg.seed + r, batch_size=cfg.batch_size, lr=cfg.harden_lr,
                          one_cycle=False, progress=progress, desc=f"hardening round {r + 1}/{cfg.harden_rounds}")
        report["rounds"].append({"tau": tau, "evasion_flagged_before": flagged, "losses": ft,
                                 "wall_s": time.perf_counter() - t1})
    report["wall_s"] = time.perf_counter() - t0
    return report


def evaluate_detector(det: nn.Module, classifier: Classifier, x_cal: Tensor, x: Tensor, y: Tensor,
                      eps: Sequence[float], *, target_false_flag_rate: float = 0.05, seed: int = 1,
                      steps: int = 10, eps_l2: Sequence[float] = (),
                      attack: Callable[[Tensor, Tensor, float, str], Tensor] | None = None) -> dict[str, Any]:
    """τ = the (1 − target) quantile of the score on the clean ``x_cal``; on the clean test scans (x, y) the
    false-flag rate at τ, and per radius (``eps`` ℓ∞, ``eps_l2`` ℓ2; input units) the AUROC clean vs PGD
    against the classifier alone (``steps``, generator ``seed``) and the share of attacked scans flagged
    at τ. Keys: ``"8/255"`` (ℓ∞), ``"l2 0.5"``. ``attack(x, y, radius, norm)`` gives the attacked scans
    instead of :func:`attacked` (a caller that keeps them across calls; it must return what :func:`attacked`
    would)."""
    if attack is None:
        def attack(xa: Tensor, ya: Tensor, e: float, norm: str) -> Tensor:
            return attacked(classifier, xa, ya, e, steps=steps, seed=seed, norm=norm)

    from medfedpure.gate.calibration import auroc

    tau = _tau(det, x_cal, target_false_flag_rate)
    s_clean = detector_scores(det, x)
    out: dict[str, Any] = {"tau": tau, "n_cal": len(x_cal), "n_test": len(x),
                           "false_flag_rate": float((s_clean >= tau).mean()), "auroc": {}, "flagged_attacked": {}}
    for norm, e in [("linf", e) for e in eps] + [("l2", e) for e in eps_l2]:
        s_adv = detector_scores(det, attack(x, y, e, norm))
        key = f"{e * 255:g}/255" if norm == "linf" else f"l2 {e:g}"
        out["auroc"][key] = auroc(s_clean, s_adv)
        out["flagged_attacked"][key] = float((s_adv >= tau).mean())
    return out
