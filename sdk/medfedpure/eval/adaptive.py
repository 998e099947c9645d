"""Rungs 2–6 of the attack ladder (docs/evaluation.md) as library functions; :mod:`medfedpure.eval.runner`
(``medfedpure eval``) calls them, rung by rung and ε by ε.

The attacked function is the shipped one, computed on the torch reference path from the bundle's own
weights and calibration (:mod:`medfedpure.eval.pipeline`):

    x ─► gate (MAE scorer + calibrated statistic, the deployed engine) ─► t*(x)
      ─► K-step purifier at t*(x) with fresh noise (rows with t* = 0 pass unchanged) ─► classifier

Rung 2, :func:`pipeline_pgd`: exact gradients through the purifier (noising + K student steps,
``models.diffusion.purify``) and the classifier; the expectation over the purifier's noise by EOT; the
gate's decision t*(x) is discrete, so it is recomputed from the current x at every step and held
constant within the step (no gradient through the threshold — the attacker still profits from leaving
the flagged region, since unflagged rows go to the classifier unpurified). Cross-entropy or margin
loss, ℓ∞ or ℓ2.

Rung 3 (a), :func:`evasion_pgd`: fool the classifier while staying under the flag threshold, so that the
scan skips the purifier. The gate's statistic is its torch version (``run_gate(..., backend="torch")``:
the deployed score as a function of x; for ``hfratio`` with the deployed MAE's tissue map of the
current iterate, for the error statistics with the torch MAE's reconstruction, differentiated; for a
``learned`` gate the torch attack detector's patch logits through ``gate_reduce_torch``). The
perturbation may be band-limited (bilinearly upsampled from a grid ``factor`` times coarser: sign
steps on full-resolution pixels are broadband, which is what an hfratio gate detects); each step
follows the gradient that lowers the score for scans still above τ − 0.05·|τ| (0.95 τ for a positive statistic) and the pipeline's loss
otherwise (both normalised, sign step, no random start; the loss goes through the purifier wherever
the deployed gate's t* > 0, as under policy ``floor``). A scan's final iterate is the last one that was
both under that limit and misclassified, else the last. Rung 3 (b), flagged and fooled after purification,
is rung 2's objective.

Rung 4, :func:`apgd_pipeline`: APGD with EOT from ``torchattacks`` (an independent implementation) on
the whole pipeline, wrapped as one module (:class:`PipelineModule`). APGD-DLR needs at least three
classes; :func:`apgd_dlr_unsupported` probes torchattacks for it.

Rung 5 is the worst case over repeated Defender runs (:func:`defended`, ``repeats``).

Every attack runs on the device of its tensors (``medfedpure eval --device``); on CUDA the EOT draws of
rungs 2 and 3 go through the purifier as one batch (same noise, :func:`~medfedpure.eval.pipeline.eot_noise`).

Rung 6, transfer: PGD on an independently trained surrogate, and :func:`transfer_evasion` (the
band-limited evasion with the surrogate's gradients and the tissue patches taken from the image itself:
no deployed weights at all). The sanity check of docs/evaluation.md: the white-box rungs must be at
least as strong as these.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medfedpure import Defender
from medfedpure.eval.defended import defend
from medfedpure.eval.device import attack_generator, host
from medfedpure.eval.pipeline import (
    ascent_step,
    attack_objective,
    eot_gradient,
    eot_noise,
    gate_t_star,
    pipeline_probs,
    project,
    random_start,
)
from medfedpure.gate import LEARNED_STATS, GateSpec, gate_reduce_torch, run_gate
from medfedpure.gate.validate import SPECTRAL_STATS
from medfedpure.models.diffusion import purify
from medfedpure.progress import progress as progress_bar
from medfedpure.runtime.engines.torch_engine import TorchEngine
from medfedpure.train.attacks import band_limited, evasion_step


def pipeline_pgd(d: Defender, ref: TorchEngine, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int,
                 eot: int, seed: int, loss: str = "ce", norm: str = "linf", progress: bool = True,
                 batched_eot: bool | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Rung 2: PGD with EOT on the whole pipeline (:mod:`medfedpure.eval.pipeline`); returns (x_adv, stats).

    ``loss``: ``ce`` or ``margin`` (:func:`~medfedpure.eval.pipeline.attack_objective`); ``norm``: ``linf``
    (sign steps) or ``l2`` (normalised-gradient steps), ε in that norm; random start in the ball, step
    2.5·ε/steps, t*(x) from the deployed gate at every step, the EOT gradient over ``eot`` draws.
    Per scan, the iterate with the highest EOT loss seen is kept (the final one need not be the best).
    ``batched_eot``: the EOT draws as one batch (None: on CUDA; :func:`~medfedpure.eval.pipeline.eot_gradient`).
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: expected >= 1")
    g = attack_generator(seed, x.device)
    alpha = 2.5 * eps / steps
    x_adv = random_start(x, eps, norm, g)
    best, best_loss = x_adv.clone(), torch.full((len(x),), -float("inf"), device=x.device)
    bar = progress_bar(range(steps), desc=f"rung 2 pipeline PGD-{loss} {norm} ε={eps:.4g}", unit="step",
                       enabled=progress)
    t_star = np.zeros(len(x), np.int64)
    for _ in bar:
        t_star = gate_t_star(d, host(x_adv))
        grad, per = eot_gradient(ref, x_adv, y, torch.from_numpy(t_star).to(x.device), eot=eot, generator=g,
                                 loss=loss, batched=batched_eot)
        better = per > best_loss
        best[better], best_loss = x_adv[better], torch.where(better, per, best_loss)
        x_adv = project(ascent_step(x_adv, grad, alpha, norm), x, eps, norm).detach()
        bar.set_postfix(loss=f"{float(per.mean()):.3f}", flagged=f"{(t_star > 0).mean():.2f}")
    # the last iterate is judged once more, so that a final improvement is kept too
    t_star = gate_t_star(d, host(x_adv))
    ts = torch.from_numpy(t_star).to(x.device)
    with torch.no_grad():
        per = sum(attack_objective(pipeline_probs(ref, x_adv, ts, generator=g), y, loss)
                  for _ in range(eot)) / eot
    better = per > best_loss
    best[better] = x_adv[better]
    return best, {"flagged_at_last_step": float((t_star > 0).mean())}


def mae_recon(d: Defender, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """recon [N, K, S, S] float32: the deployed MAE's reconstructions of x [N, 1, S, S] under its K scoring
    mask sets (what the deployed gate takes its tissue map from)."""
    out = []
    for i in range(0, len(x), batch):
        xb = np.ascontiguousarray(x[i:i + batch], dtype=np.float32)
        out.append(d.engine.to_numpy(d.engine.mae(d.engine.to_native(xb))).astype(np.float32))
    return np.concatenate(out)


def evasion_pgd(d: Defender, ref: TorchEngine, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int,
                eot: int = 1, seed: int = 0, factor: int = 2, margin: float = 0.05,
                progress: bool = True, batched_eot: bool | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Rung 3 (a): fool the pipeline while the gate's score stays under (1 − margin) τ (module docstring).

    The perturbation is band-limited by construction: δ = bilinear upsampling (× ``factor``) of a coarse
    η with ‖η‖∞ ≤ ε, so ‖δ‖∞ ≤ ε too (a convex combination). ℓ∞ PGD's sign steps on the full-resolution
    image are broadband whatever the gradient, which is exactly what the hfratio gate detects; an adaptive
    attacker against that gate perturbs only low frequencies. ``factor`` 1 gives plain pixel-space PGD.

    The loss is the pipeline's: the deployed gate's t*(x) each step (0 for unflagged scans under the
    ``adaptive`` policy, at least t_min under ``floor``), the purifier at t* with ``eot`` noise draws where
    t* > 0, then the classifier — so under ``floor`` the evading scan must also survive the weakest
    purification. ``batched_eot``: the ``eot`` draws as one batch (None: on CUDA), with the same noise.
    """
    g = d.engine.gate_spec
    clf, den, sched, k = ref.models["classifier"], ref.models["denoiser"], ref.schedule, ref.steps
    limit = g.tau - margin * abs(g.tau)  # (1 − margin)·τ for the positive statistics; below τ for logits too
    s = x.shape[-1]
    if s % factor:
        raise ValueError(f"evasion factor {factor} must divide the image size {s}: pick a divisor of {s}")
    # hfratio reads only its tissue map from the reconstruction: the deployed MAE's, held constant. The
    # error statistics (mean, topk) compare x with its reconstruction: the torch MAE, differentiated.
    mae_torch = None if g.stat in SPECTRAL_STATS or g.stat in LEARNED_STATS else ref.models["mae"]

    def probs(xv: torch.Tensor, ts: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The classifier's probabilities, averaged over ``eot`` purifier draws for the rows with t* > 0."""
        rows = torch.nonzero(ts > 0).flatten()
        if len(rows) == 0:
            return clf(xv)
        xp = xv[rows]
        if batched_eot or (batched_eot is None and xv.device.type == "cuda"):  # one batch of eot draws
            pur = clf(purify(den, xp.repeat(eot, 1, 1, 1), ts[rows].repeat(eot), k, noise=eot_noise(xp, eot, gen),
                             schedule=sched)).view(eot, len(rows), -1).sum(0) / eot
        else:
            pur = sum(clf(purify(den, xp, ts[rows], k, generator=gen, schedule=sched)) for _ in range(eot)) / eot
        return clf(xv).index_put((rows,), pur)

    gen = attack_generator(seed, x.device)
    alpha = 2.5 * eps / steps
    eta = torch.zeros(len(x), 1, s // factor, s // factor, device=x.device)
    best = x.clone()
    found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    bar = progress_bar(range(steps + 1), desc=f"evasion PGD ε={eps * 255:g}/255 ×{factor}", unit="step",
                       enabled=progress)
    for step in bar:
        with torch.no_grad():
            x_adv = (x + band_limited(eta, factor)).clamp(0, 1)
        xa_np = host(x_adv)
        ts = torch.from_numpy(gate_t_star(d, xa_np)).to(x.device)
        ev = eta.clone().requires_grad_(True)
        xv = (x + band_limited(ev, factor)).clamp(0, 1)
        p = probs(xv, ts, gen)
        ce = F.nll_loss(torch.log(p.clamp_min(1e-12)), y, reduction="none")
        if g.stat in LEARNED_STATS:  # the torch attack detector's patch logits, reduced as the gate does
            score = gate_reduce_torch(ref.models["detector"](xv), stat="topk", topk=g.topk, tau=g.tau,
                                      tau_high=g.tau_high, t_min=g.t_min, t_max=g.t_max).score
        else:
            recon = torch.from_numpy(mae_recon(d, xa_np)).to(x.device) if mae_torch is None else mae_torch(xv)
            score = run_gate(g, xv[:, 0], recon, d.engine.visible, backend="torch").score
        g_ce, = torch.autograd.grad(ce.sum(), ev, retain_graph=True)
        g_sc, = torch.autograd.grad(score.sum(), ev)
        with torch.no_grad():
            under = score < limit
            hit = under & (p.argmax(1) != y)
            best[hit], found = x_adv[hit], found | hit
            bar.set_postfix(under=f"{under.float().mean():.2f}", evading_and_wrong=f"{found.float().mean():.2f}")
            if step == steps:
                break
            eta = evasion_step(eta, under, g_ce, g_sc, alpha, eps)
            if factor == 1:  # keep x + η in [0, 1]: a pixel clamped at 0 or 1 would get no gradient back
                eta = (x + eta).clamp(0, 1) - x
    final = torch.where(found[:, None, None, None], best, x_adv)
    return final, {"evading_and_wrong_during_attack": float(found.float().mean()), "evasion_factor": factor}


class PipelineModule(torch.nn.Module):
    """The defended pipeline as one torch module for attack libraries: log-probabilities of
    classifier(purify(x, t*(x))), t* from the deployed gate (held constant, no gradient through it),
    fresh purifier noise on every call (so a library's EOT averages over it)."""

    def __init__(self, d: Defender, ref: TorchEngine, seed: int) -> None:
        super().__init__()
        self.d = d
        self.clf, self.den = ref.models["classifier"], ref.models["denoiser"]
        self.sched, self.k = ref.schedule, ref.steps
        self.gen = attack_generator(seed, ref.torch_device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ts = torch.from_numpy(gate_t_star(self.d, host(x))).to(x.device)
        rows = torch.nonzero(ts > 0).flatten()
        p = self.clf(x)
        if len(rows):
            xp = purify(self.den, x[rows], ts[rows], self.k, generator=self.gen, schedule=self.sched)
            p = p.index_put((rows,), self.clf(xp))
        return torch.log(p.clamp_min(1e-12))


def apgd_pipeline(d: Defender, ref: TorchEngine, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int,
                  eot: int, seed: int, loss: str = "ce", norm: str = "linf") -> torch.Tensor:
    """Rung 4: torchattacks' APGD (``loss`` ``ce`` or ``dlr``) with ``eot`` draws per step on
    :class:`PipelineModule`, in the ℓ∞ or ℓ2 ball (``norm``)."""
    import torchattacks

    atk = torchattacks.APGD(PipelineModule(d, ref, seed).eval(), norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps,
                            steps=steps, n_restarts=1, seed=seed, loss=loss, eot_iter=eot)
    return atk(x, y).detach()


def apgd_dlr_unsupported(num_classes: int) -> str | None:
    """Why torchattacks' APGD with ``loss='dlr'`` cannot run on a ``num_classes``-class model (None: it can).

    Probed, not assumed: the attack is run on a fixed linear model with that many classes, on inputs it
    classifies correctly (APGD attacks only those). Its DLR loss
    divides by the gap between the largest and the third-largest logit, which two classes do not have.
    """
    import torchattacks

    class _Const(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # a parameter, so torchattacks finds the model's device (it prints a warning otherwise)
            self.w = torch.nn.Parameter(torch.arange(1.0, num_classes + 1), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :1] * self.w

    try:
        torchattacks.APGD(_Const().eval(), eps=0.1, steps=1, loss="dlr")(torch.full((2, 1, 4, 4), 0.5),
                                                                          torch.full((2,), num_classes - 1))
    except (IndexError, RuntimeError) as e:
        return (f"torchattacks APGD loss='dlr' fails with {num_classes} classes ({type(e).__name__}: {e}): "
                "the DLR loss needs the third-largest logit")
    return None


def transfer_evasion(surrogate: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int,
                     gate: GateSpec, factor: int = 2, margin: float = 0.05) -> torch.Tensor:
    """Rung 6 (b): :func:`evasion_pgd` with no deployed weights — the surrogate's gradients, the gate's
    statistic (``gate``, as published in the bundle's manifest: patch, m = ``topk`` and τ) on the m
    patches of highest image intensity (the attacker's stand-in for the MAE's tissue map)."""
    if gate.stat not in SPECTRAL_STATS:
        raise ValueError(f"rung 6 (b) needs an 'hfratio' or 'nyqratio' gate (its tissue map is read from the "
                         f"image), not {gate.stat!r}: skip rung 6 (b) for this bundle")
    s = x.shape[-1]
    alpha = 2.5 * eps / steps
    eta = torch.zeros(len(x), 1, s // factor, s // factor, device=x.device)
    # the image itself as the "reconstruction" of one set hiding every patch
    recon, vis = x.detach().clone(), np.zeros((1, (s // gate.patch) ** 2), bool)
    for _ in range(steps):
        ev = eta.clone().requires_grad_(True)
        xv = (x + band_limited(ev, factor)).clamp(0, 1)
        ce = F.nll_loss(torch.log(surrogate(xv).clamp_min(1e-12)), y, reduction="none")
        score = run_gate(gate, xv[:, 0], recon, vis, backend="torch").score
        g_ce, = torch.autograd.grad(ce.sum(), ev, retain_graph=True)
        g_sc, = torch.autograd.grad(score.sum(), ev)
        with torch.no_grad():
            eta = evasion_step(eta, score < gate.tau * (1 - margin), g_ce, g_sc, alpha, eps)
    with torch.no_grad():
        return (x + band_limited(eta, factor)).clamp(0, 1)


def defended(d: Defender, x: np.ndarray, y: np.ndarray, repeats: int, seed: int) -> dict[str, float]:
    """Accuracy of the real Defender over ``repeats`` runs with fresh keys: mean, worst case per scan.
    ``_correct`` ([repeats, N] bool, not serialised) lets rows be combined per scan and run."""
    runs = [defend(d, x, seed + 1_000_003 * r) for r in range(repeats)]
    correct = np.stack([r["ok"] & (r["label"] == y) for r in runs])
    return {**summarise(correct), "flag_rate": float(np.mean([r["flag"] for r in runs])), "_correct": correct}


def summarise(correct: np.ndarray) -> dict[str, float]:
    """[repeats, N] correctness → mean ± std over runs, and the worst case over runs per scan."""
    acc = correct.mean(axis=1)
    return {"defended_acc_mean": float(acc.mean()),
            "defended_acc_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "defended_acc_worst_of_repeats": float(correct.all(axis=0).mean())}
