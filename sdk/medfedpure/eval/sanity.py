"""Sanity checks printed at the top of every ``medfedpure eval`` report (docs/evaluation.md, "Sanity checks").

An empirical robust accuracy is an upper bound that is only as good as the attack behind it. Each check
tests one way an evaluation fools itself; a report whose checks fail says so first, records
``sanity.passed: false``, and ``medfedpure eval`` exits with code 1 (the report is still written).

- ``unbounded``: full-pipeline PGD (rung 2, at least :data:`UNBOUNDED_MIN_STEPS` steps) at ℓ∞ ε = 1, where the attacker may draw any image, must
  drive defended accuracy to at most :data:`UNBOUNDED_MAX_ACC`: the gradients reach through the gate,
  purifier and classifier.
- ``more_steps``: the same attack with twice the steps must not leave the defence more accurate than
  with the budget's steps, within :data:`STEPS_TOL`.
- ``transfer_le_whitebox``: at every ε, the strongest white-box rung (2–4) is at least as strong as
  transfer (rung 6), within :data:`MASKING_TOL` — the symptom of gradient masking, by
  :func:`masking_suspected`.
- ``masking_detector``: the rule of :func:`masking_suspected` is itself tested on two toy defences with
  the same forward function, the bundle's classifier behind an input quantisation to
  :data:`TOY_LEVELS` levels: one rounds with ``torch.round`` (zero gradient almost everywhere: gradient
  masking), the other passes the gradient straight through (BPDA, Athalye et al. 2018: sound). The
  masked one must be caught and the sound one not. "Caught" means: accuracy under the white-box
  gradient attack (PGD through the defence itself, no random start) exceeds accuracy under the
  black-box attack (the same PGD computed on the bare classifier and transferred, i.e. BPDA with the
  identity) by more than :data:`MASKING_TOL` and by more than one scan.
- ``reference_agreement``: the torch reference the attacks differentiate (:func:`keyed_forward`) and the
  deployed Defender agree on clean and on adversarial scans with the same keys: identical t* and at
  least 99 % identical top-1 labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from medfedpure.eval.adaptive import pipeline_pgd
from medfedpure.eval.device import host
from medfedpure.eval.pipeline import keyed_forward
from medfedpure.train.attacks import pgd_linf

__all__ = ["UNBOUNDED_MAX_ACC", "STEPS_TOL", "MASKING_TOL", "TOY_LEVELS", "TOY_EPS", "masking_suspected",
           "QuantisedDefence", "masking_check", "run_sanity"]

UNBOUNDED_MAX_ACC = 0.1  # defended accuracy allowed under the unbounded attack
UNBOUNDED_MIN_STEPS = 20  # the unbounded attack's steps at least (its step is 2.5 / steps)
STEPS_TOL = 0.1  # accuracy at 2× steps may exceed that at 1× by at most this (run-to-run noise of R judged runs)
MASKING_TOL = 0.1  # white-box accuracy may exceed black-box accuracy by at most this
TOY_LEVELS = 32  # quantisation levels of the toy defences (a step of 8/255)
TOY_EPS = 32 / 255  # ℓ∞ radius of the masking check: several quantisation steps


def masking_suspected(white_box_acc: float, black_box_acc: float, tol: float = MASKING_TOL,
                      n: int | None = None) -> bool:
    """True when a defence looks more robust to its own gradients than to a gradient-free or transferred
    attack by more than ``tol``: the white-box attack is being fooled, not the defence being robust.

    With ``n`` (the scans both accuracies were measured on), a gap of one scan never counts: the margin is
    at least ``1 / n``, so on the few scans of a quick budget (8: one scan is 12.5 points) a single scan
    the two attacks happen to split differently is not called masking."""
    margin = max(tol, 1.0 / n) if n else tol
    return bool(white_box_acc - black_box_acc > margin + 1e-9)


class QuantisedDefence(torch.nn.Module):
    """Toy defence: ``classifier(round(x · L) / L)``. ``straight_through=False`` rounds with ``torch.round``,
    whose gradient is zero (gradient masking); ``True`` passes the gradient through the rounding (BPDA
    with the identity), so the same function becomes honestly attackable."""

    def __init__(self, classifier: torch.nn.Module, levels: int = TOY_LEVELS, straight_through: bool = False) -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"levels={levels}: need at least 2 quantisation levels")
        self.classifier, self.levels, self.straight_through = classifier, levels, straight_through

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.round(x * self.levels) / self.levels
        if self.straight_through:
            q = x + (q - x).detach()
        return self.classifier(q)


def masking_check(defence: torch.nn.Module, classifier: torch.nn.Module, x: torch.Tensor, *, eps: float = TOY_EPS,
                  steps: int = 10, tol: float = MASKING_TOL) -> dict[str, Any]:
    """Is ``defence`` gradient-masked? Labels are the defence's own clean answers (clean accuracy 1).

    White-box: PGD through ``defence`` (no random start, so a zero gradient leaves the scan where it is);
    black-box: PGD on the bare ``classifier``, transferred. → accuracies and ``caught``."""
    with torch.no_grad():
        y = defence(x).argmax(1)
    white = pgd_linf(defence, x, y, eps, steps=steps, random_start=False)
    black = pgd_linf(classifier, x, y, eps, steps=steps, random_start=False)
    with torch.no_grad():
        w = float((defence(white).argmax(1) == y).float().mean())
        b = float((defence(black).argmax(1) == y).float().mean())
    return {"white_box_acc": w, "black_box_acc": b, "caught": masking_suspected(w, b, tol, n=len(x))}


def _acc(d: Any, x: np.ndarray, y: np.ndarray, repeats: int, seed: int) -> float:
    from medfedpure.eval.runner import judge

    return float(judge(d, x, y, repeats, seed)["correct"].mean())


def _check(name: str, passed: bool | None, rule: str, **values: Any) -> dict[str, Any]:
    return {"name": name, "passed": passed, "rule": rule, **values}


def run_sanity(d: Any, ref: Any, cfg: Any, x: np.ndarray, y: np.ndarray, rows: list[Any]) -> dict[str, Any]:
    """Every check on the first ``cfg.budget.sanity_scans`` scans of the first site (``rows``: the pooled
    rows, for the transfer check) → ``{"passed": bool, "checks": [...]}``."""
    b = cfg.budget
    k = min(len(y), b.sanity_scans)
    xs, ys = x[:k], y[:k]
    dev = ref.torch_device  # the evaluation device (the reference engine's)
    xt, yt = torch.from_numpy(xs).to(dev), torch.from_numpy(ys).to(dev)
    checks = []
    # unbounded ----------------------------------------------------------------------------------
    steps = max(b.steps, UNBOUNDED_MIN_STEPS)
    xa_unb, _ = pipeline_pgd(d, ref, xt, yt, 1.0, steps=steps, eot=b.eot, seed=cfg.seed, progress=cfg.progress)
    acc_unb = _acc(d, host(xa_unb), ys, b.repeats, cfg.seed)
    checks.append(_check("unbounded", acc_unb <= UNBOUNDED_MAX_ACC,
                         f"defended accuracy under rung 2 at ℓ∞ ε = 1 ({steps} steps) ≤ {UNBOUNDED_MAX_ACC}",
                         defended_acc=acc_unb, n=k))
    # more steps ---------------------------------------------------------------------------------
    eps, norm = max(cfg.eps), cfg.norm
    xa1, _ = pipeline_pgd(d, ref, xt, yt, eps, steps=b.steps, eot=b.eot, seed=cfg.seed, norm=norm,
                          progress=cfg.progress)
    xa2, _ = pipeline_pgd(d, ref, xt, yt, eps, steps=2 * b.steps, eot=b.eot, seed=cfg.seed, norm=norm,
                          progress=cfg.progress)
    a1, a2 = _acc(d, host(xa1), ys, b.repeats, cfg.seed), _acc(d, host(xa2), ys, b.repeats, cfg.seed)
    checks.append(_check("more_steps", a2 <= a1 + STEPS_TOL,
                         f"rung 2 at the largest ε: accuracy at 2× steps ≤ at 1× + {STEPS_TOL}",
                         eps=eps, steps=b.steps, acc_1x=a1, acc_2x=a2, n=k))
    # transfer ≤ white-box ----------------------------------------------------------------------
    per_eps = {}
    for r in rows:
        if r.skipped is not None or r.correct is None or r.eps_label == "paper":
            continue
        key = "white" if r.rung in (2, 3, 4) else "transfer" if r.rung == 6 else None
        if key is not None:
            acc = float(r.correct.mean())
            slot = per_eps.setdefault(r.eps_label, {})
            slot[key] = min(slot.get(key, 1.0), acc)
            slot["n"] = len(r.correct)
    compared = {e: v for e, v in per_eps.items() if "white" in v and "transfer" in v}
    if compared:
        bad = [e for e, v in compared.items() if masking_suspected(v["white"], v["transfer"], n=v["n"])]
        checks.append(_check("transfer_le_whitebox", not bad,
                             f"per ε: best white-box (rungs 2–4) accuracy ≤ transfer (rung 6) accuracy + {MASKING_TOL}",
                             per_eps=compared, failing=bad))
    else:
        checks.append(_check("transfer_le_whitebox", None, "needs a white-box rung (2–4) and rung 6",
                             skipped="not run: ask for rungs 2 and 6 (--attacks ladder)"))
    # the masking detector on the toy defences ---------------------------------------------------
    clf = ref.models["classifier"]
    masked = masking_check(QuantisedDefence(clf, straight_through=False), clf, xt, steps=max(b.steps, 10))
    sound = masking_check(QuantisedDefence(clf, straight_through=True), clf, xt, steps=max(b.steps, 10))
    checks.append(_check("masking_detector", masked["caught"] and not sound["caught"],
                         "the gradient-masked toy (torch.round) is caught and the straight-through toy is not",
                         masked_toy=masked, sound_toy=sound, levels=TOY_LEVELS, eps=TOY_EPS, n=k))
    # reference vs deployed ---------------------------------------------------------------------
    agree, ts_equal, max_dp = [], True, 0.0
    for xa in (xs, host(xa1), host(xa_unb)):
        seeds = [cfg.seed + 77 + i for i in range(len(xa))]
        dep = d.run_array(np.ascontiguousarray(xa), seeds=seeds)
        refd = keyed_forward(d, ref, xa, seeds)
        p_dep = np.array([[r.probabilities.get(c, np.nan) for c in d.bundle.classes] for r in dep])
        ts_equal &= bool(np.array_equal(np.array([r.t_star for r in dep]), refd["t_star"]))
        agree.append(p_dep.argmax(1) == refd["probs"].argmax(1))
        max_dp = max(max_dp, float(np.nanmax(np.abs(p_dep - refd["probs"]))))
    top1 = float(np.concatenate(agree).mean())
    checks.append(_check("reference_agreement", ts_equal and top1 >= 0.99,
                         "torch reference vs deployed Defender, same keys, clean + adversarial: equal t*, "
                         "top-1 agreement ≥ 0.99", top1_agreement=top1, t_star_equal=ts_equal,
                         max_abs_prob_diff=max_dp, n=3 * k))
    return {"passed": all(c["passed"] is not False for c in checks), "checks": checks}
