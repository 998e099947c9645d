"""Rungs 2–6 of the attack ladder (docs/evaluation.md): full-pipeline PGD with EOT, detector-aware evasion,
an independent APGD, repeated runs and transfer.

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

Rung 3 (a), detector-aware evasion (``--rungs`` includes 3): fool the classifier while staying under
the flag threshold, so that the scan skips the purifier. The gate's statistic is the gate's own torch
version (``medfedpure.gate.patch_gate_torch``: the deployed score as a function of x, with the deployed
MAE's reconstruction of the current iterate, recomputed every step); the perturbation is band-limited (bilinearly upsampled
from a grid ``--evasion-factor`` times coarser: sign steps on full-resolution pixels are broadband,
which is what the gate detects); each step follows the gradient that lowers the score for scans still
above 0.95 τ and the pipeline's loss otherwise (both normalised, sign step, no random start; the loss
goes through the purifier wherever the deployed gate's t* > 0, as under ``--policy floor``). A scan's final iterate is the
last one that was both under 0.95 τ and misclassified, else the last. Rung 3 (b), flagged and fooled
after purification, is rung 2's objective; the "rung 3 worst" row counts a scan correct in a run only
when the Defender is right on both its rung-2 and its rung-3a scan in that run.

Rung 4 (``--rungs`` includes 4): APGD-CE with EOT from ``torchattacks`` (an independent implementation)
on the whole pipeline, wrapped as one module (:class:`PipelineModule`). AutoAttack's randomized-defence
version would add APGD-DLR and APGD-T, whose DLR loss needs at least three classes; this classifier
has two, so APGD-CE with EOT is what it reduces to here.

Rung 6, transfer (``--surrogate W.safetensors``, a classifier trained independently, e.g. another seed
of the same recipe): (a) PGD on the surrogate alone, (b) the band-limited evasion with the surrogate's
gradients and the tissue patches taken from the image itself (no deployed weights at all). The
sanity check of docs/evaluation.md: the white-box rungs must be at least as strong as these.

Evaluation: the real Defender (``--backend``, onnxruntime by default) on the final adversarial scans,
``--repeats`` times with fresh purification keys: mean defended accuracy and the worst case per scan
over the repeats (rung 5). The same scans attacked with rung-1 PGD (classifier only) are reported beside
it. Sanity check of docs/evaluation.md: ``--eps 255`` (unbounded) must drive defended accuracy to ~0.

Usage:
    python benchmarks/adaptive_eval.py --data D --site K --bundle B [--eps 8] [--steps 100] [--eot 10]
        [--limit N] [--repeats 5] [--rungs 1,2,3,4,6 --surrogate W.safetensors] [--policy floor] --out DIR
Writes DIR/adaptive_eval.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from medfedpure import Defender
from medfedpure.eval.attacks.pgd import pgd_linf
from medfedpure.eval.defended import add_eval_args, defend, open_eval
from medfedpure.gate import GateSpec, run_gate
from medfedpure.models.diffusion import purify
from medfedpure.progress import progress as progress_bar
from medfedpure.runtime.engines.torch_engine import TorchEngine


def gate_t_star(d: Defender, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """t* [N] int64 of the deployed gate (the Defender's engine: MAE scorer + calibrated statistic)."""
    out = []
    for i in range(0, len(x), batch):
        xb = np.ascontiguousarray(x[i:i + batch], dtype=np.float32)
        g = d.engine.gate(d.engine.to_native(xb), d.engine.mae(d.engine.to_native(xb)), policy=d.policy)
        out.append(d.engine.to_numpy(g.t_star).astype(np.int64))
    return np.concatenate(out)


def pipeline_pgd(d: Defender, ref: TorchEngine, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int,
                 eot: int, seed: int, progress: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """ℓ∞ PGD with EOT on the whole pipeline; returns (x_adv, stats of the last step's gate)."""
    clf, den, sched, k = ref.models["classifier"], ref.models["denoiser"], ref.schedule, ref.steps
    g = torch.Generator().manual_seed(seed)
    alpha = 2.5 * eps / steps
    x_adv = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * eps).clamp(0, 1)
    bar = progress_bar(range(steps), desc=f"pipeline PGD ε={eps * 255:g}/255", unit="step", enabled=progress)
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


def mae_recon(d: Defender, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """recon [N, K, S, S] float32: the deployed MAE's reconstructions of x [N, 1, S, S] under its K scoring
    mask sets (what the deployed gate takes its tissue map from)."""
    out = []
    for i in range(0, len(x), batch):
        xb = np.ascontiguousarray(x[i:i + batch], dtype=np.float32)
        out.append(d.engine.to_numpy(d.engine.mae(d.engine.to_native(xb))).astype(np.float32))
    return np.concatenate(out)


def band_limited(eta: torch.Tensor, factor: int) -> torch.Tensor:
    """δ = bilinear upsampling (× ``factor``) of the coarse perturbation η; ‖δ‖∞ ≤ ‖η‖∞ (convex weights)."""
    if factor == 1:
        return eta
    return F.interpolate(eta, scale_factor=float(factor), mode="bilinear", align_corners=False)


def evasion_step(eta: torch.Tensor, under: torch.Tensor, g_loss: torch.Tensor, g_score: torch.Tensor,
                 alpha: float, eps: float) -> torch.Tensor:
    """One sign step on η: lower the gate's score where it is still too high (keeping half the loss
    direction), raise the loss where the scan is already under the threshold; gradients per-scan normalised."""
    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / v.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)

    direction = torch.where(under[:, None, None, None], unit(g_loss), -unit(g_score) + 0.5 * unit(g_loss))
    return (eta + alpha * direction.sign()).clamp(-eps, eps)


def evasion_pgd(d: Defender, ref: TorchEngine, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int,
                eot: int = 1, seed: int = 0, factor: int = 2, margin: float = 0.05,
                progress: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """Rung 3 (a): fool the pipeline while the gate's score stays under (1 − margin) τ (module docstring).

    The perturbation is band-limited by construction: δ = bilinear upsampling (× ``factor``) of a coarse
    η with ‖η‖∞ ≤ ε, so ‖δ‖∞ ≤ ε too (a convex combination). ℓ∞ PGD's sign steps on the full-resolution
    image are broadband whatever the gradient, which is exactly what the hfratio gate detects; an adaptive
    attacker against that gate perturbs only low frequencies. ``factor`` 1 gives plain pixel-space PGD.

    The loss is the pipeline's: the deployed gate's t*(x) each step (0 for unflagged scans under the
    ``adaptive`` policy, at least t_min under ``floor``), the purifier at t* with ``eot`` noise draws where
    t* > 0, then the classifier — so under ``floor`` the evading scan must also survive the weakest
    purification.
    """
    g = d.engine.gate_spec
    if g.stat != "hfratio":
        raise SystemExit(f"rung 3 models the gate's statistic in torch for 'hfratio' only, not {g.stat!r}")
    clf, den, sched, k = ref.models["classifier"], ref.models["denoiser"], ref.schedule, ref.steps
    limit = g.tau * (1 - margin)
    s = x.shape[-1]
    if s % factor:
        raise SystemExit(f"--evasion-factor {factor} must divide the image size {s}")

    def probs(xv: torch.Tensor, ts: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The classifier's probabilities, averaged over ``eot`` purifier draws for the rows with t* > 0."""
        rows = torch.nonzero(ts > 0).flatten()
        if len(rows) == 0:
            return clf(xv)
        xp = xv[rows]
        pur = sum(clf(purify(den, xp, ts[rows], k, generator=gen, schedule=sched)) for _ in range(eot)) / eot
        return clf(xv).index_put((rows,), pur)

    gen = torch.Generator().manual_seed(seed)
    alpha = 2.5 * eps / steps
    eta = torch.zeros(len(x), 1, s // factor, s // factor)
    best = x.clone()
    found = torch.zeros(len(x), dtype=torch.bool)
    bar = progress_bar(range(steps + 1), desc=f"evasion PGD ε={eps * 255:g}/255 ×{factor}", unit="step",
                       enabled=progress)
    for step in bar:
        with torch.no_grad():
            x_adv = (x + band_limited(eta, factor)).clamp(0, 1)
        xa_np = x_adv.numpy()
        recon = torch.from_numpy(mae_recon(d, xa_np))
        ts = torch.from_numpy(gate_t_star(d, xa_np))
        ev = eta.clone().requires_grad_(True)
        xv = (x + band_limited(ev, factor)).clamp(0, 1)
        p = probs(xv, ts, gen)
        ce = F.nll_loss(torch.log(p.clamp_min(1e-12)), y, reduction="none")
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
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ts = torch.from_numpy(gate_t_star(self.d, x.detach().numpy()))
        rows = torch.nonzero(ts > 0).flatten()
        p = self.clf(x)
        if len(rows):
            xp = purify(self.den, x[rows], ts[rows], self.k, generator=self.gen, schedule=self.sched)
            p = p.index_put((rows,), self.clf(xp))
        return torch.log(p.clamp_min(1e-12))


def apgd_pipeline(d: Defender, ref: TorchEngine, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int,
                  eot: int, seed: int) -> torch.Tensor:
    """Rung 4: torchattacks' APGD-CE with ``eot`` draws per step on :class:`PipelineModule`."""
    import torchattacks

    atk = torchattacks.APGD(PipelineModule(d, ref, seed).eval(), norm="Linf", eps=eps, steps=steps, n_restarts=1,
                            seed=seed, loss="ce", eot_iter=eot)
    return atk(x, y).detach()


def transfer_evasion(surrogate: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int,
                     gate: GateSpec, factor: int = 2, margin: float = 0.05) -> torch.Tensor:
    """Rung 6 (b): :func:`evasion_pgd` with no deployed weights — the surrogate's gradients, the gate's
    statistic (``gate``, as published in the bundle's manifest: patch, m = ``topk`` and τ) on the m
    patches of highest image intensity (the attacker's stand-in for the MAE's tissue map)."""
    if gate.stat != "hfratio":
        raise SystemExit(f"rung 6 (b) models the gate's statistic in torch for 'hfratio' only, not {gate.stat!r}")
    s = x.shape[-1]
    alpha = 2.5 * eps / steps
    eta = torch.zeros(len(x), 1, s // factor, s // factor)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_eval_args(ap, eps="8", steps=100)  # the full budget (docs/evaluation.md): ≥ 100 steps
    ap.add_argument("--eot", type=int, default=10, help="noise draws per step (full budget: ≥ 10)")
    ap.add_argument("--repeats", type=int, default=5, help="Defender runs per adversarial scan (fresh keys)")
    ap.add_argument("--rungs", default="1,2,3", help="which rungs to run (comma list of 1, 2, 3, 4, 6)")
    ap.add_argument("--surrogate", default=None,
                    help="rung 6: safetensors weights of an independently trained classifier (the transfer source)")
    ap.add_argument("--policy", choices=["bundle", "adaptive", "floor"], default="bundle",
                    help="gate policy of the evaluated Defender (bundle: the one it was calibrated with)")
    ap.add_argument("--evasion-factor", type=int, default=2,
                    help="rung 3a: the perturbation is bilinearly upsampled from a grid this many times coarser")
    a = ap.parse_args()
    rungs = {int(r) for r in a.rungs.split(",")}
    if not rungs or not rungs <= {1, 2, 3, 4, 6}:
        raise SystemExit(f"--rungs {a.rungs!r}: expected a comma list of 1, 2, 3, 4 and 6")
    if (6 in rungs) != (a.surrogate is not None):
        raise SystemExit("rung 6 (transfer) and --surrogate go together")
    d, x, y = open_eval(a)  # with --policy: the bundle under that gate policy (Defender(policy=…))
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
        if 1 in rungs:
            xa1 = pgd_linf(clf, xt, yt, eps, steps=10, generator=torch.Generator().manual_seed(a.seed))
            with torch.no_grad():
                und1 = float((clf(xa1).argmax(1) == yt).float().mean())
            rows[f"rung1 pgd-10 {eps_255:g}"] = {"undefended_acc": und1,
                                                 **defended(d, xa1.numpy(), y, a.repeats, a.seed)}
        if 2 in rungs:
            ts = time.perf_counter()
            xa2, st = pipeline_pgd(d, ref, xt, yt, eps, steps=a.steps, eot=a.eot, seed=a.seed)
            with torch.no_grad():
                und2 = float((clf(xa2).argmax(1) == yt).float().mean())
            r2 = rows[f"rung2 pipeline pgd-{a.steps} eot-{a.eot} {eps_255:g}"] = {
                "undefended_acc": und2, **defended(d, xa2.numpy(), y, a.repeats, a.seed), **st,
                "attack_s": time.perf_counter() - ts}
        if 3 in rungs:
            ts = time.perf_counter()
            xa3, st = evasion_pgd(d, ref, xt, yt, eps, steps=a.steps, eot=a.eot, seed=a.seed,
                                  factor=a.evasion_factor)
            with torch.no_grad():
                und3 = float((clf(xa3).argmax(1) == yt).float().mean())
            r3 = rows[f"rung3a evasion pgd-{a.steps} {eps_255:g}"] = {
                "undefended_acc": und3, **defended(d, xa3.numpy(), y, a.repeats, a.seed), **st,
                "attack_s": time.perf_counter() - ts}
            if 2 in rungs:  # per scan and run: correct only if right on both its rung-2 and rung-3a scans
                both = r2["_correct"] & r3["_correct"]
                rows[f"rung3 worst of (a) and (b) = rung 2, per scan {eps_255:g}"] = {
                    "undefended_acc": min(und2, und3), **summarise(both),
                    "flag_rate": None, "_correct": both}
        if 4 in rungs:
            ts = time.perf_counter()
            xa4 = apgd_pipeline(d, ref, xt, yt, eps, steps=a.steps, eot=a.eot, seed=a.seed)
            assert float((xa4 - xt).abs().max()) <= eps + 1e-6, "torchattacks left the ℓ∞ ball"
            with torch.no_grad():
                und4 = float((clf(xa4).argmax(1) == yt).float().mean())
            rows[f"rung4 apgd-ce-{a.steps} eot-{a.eot} (torchattacks) {eps_255:g}"] = {
                "undefended_acc": und4, **defended(d, xa4.numpy(), y, a.repeats, a.seed),
                "attack_s": time.perf_counter() - ts}
        if 6 in rungs:
            from medfedpure.runtime.engines.torch_engine import model_from_bytes

            sur = model_from_bytes(Path(a.surrogate).read_bytes())[0].eval().requires_grad_(False)
            with torch.no_grad():
                sur_clean = float((sur(xt).argmax(1) == yt).float().mean())
            xa6 = pgd_linf(sur, xt, yt, eps, steps=a.steps, generator=torch.Generator().manual_seed(a.seed))
            xb6 = transfer_evasion(sur, xt, yt, eps, steps=a.steps, gate=d.engine.gate_spec,
                                   factor=a.evasion_factor)
            for name, xa in ((f"rung6a transfer pgd-{a.steps} {eps_255:g}", xa6),
                             (f"rung6b transfer evasion pgd-{a.steps} {eps_255:g}", xb6)):
                with torch.no_grad():
                    und = float((clf(xa).argmax(1) == yt).float().mean())
                rows[name] = {"undefended_acc": und, **defended(d, xa.numpy(), y, a.repeats, a.seed),
                              "surrogate_clean_acc": sur_clean}
    for v in rows.values():
        v.pop("_correct", None)
    res = {"bundle_id": d.bundle.bundle_id, "backend": a.backend, "data": str(Path(a.data).resolve()), "site": a.site,
           "split": a.split, "n": int(len(y)), "steps": a.steps, "eot": a.eot, "repeats": a.repeats, "seed": a.seed,
           "surrogate": a.surrogate,
           "gate": d.bundle.spec.gate.to_dict(), "policy": d.policy,
           "purifier_steps": ref.steps, "rows": rows, "wall_s": time.perf_counter() - t0,
           "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": a.threads}}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adaptive_eval.json").write_text(json.dumps(res, indent=1))
    tab = Table(title=f"rungs {a.rungs} · site {a.site} {a.split} · n = {len(y)} · bundle {d.bundle.short_id} · "
                      f"policy {res['policy']} · "
                      f"{a.repeats} Defender runs per scan")
    for c in ("input", "undefended acc", "defended acc (mean ± std)", "worst of runs", "flagged"):
        tab.add_column(c, justify="right")
    for k, v in rows.items():
        tab.add_row(k, f"{100 * v['undefended_acc']:.1f} %",
                    f"{100 * v['defended_acc_mean']:.1f} ± {100 * v['defended_acc_std']:.1f} %",
                    f"{100 * v['defended_acc_worst_of_repeats']:.1f} %",
                    "–" if v["flag_rate"] is None else f"{100 * v['flag_rate']:.1f} %")
    Console(width=max(120, Console().width)).print(tab)
    print(f"wrote {out / 'adaptive_eval.json'} ({res['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
