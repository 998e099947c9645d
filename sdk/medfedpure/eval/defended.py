"""Judging scans through the real Defender, and the detector metrics of rung 1 (docs/evaluation.md).

- :func:`defend` runs the whole Defender (gate, purifier, classifier) over preprocessed scans with
  reproducible per-scan keys;
- :func:`medfedpure.gate.calibration.auroc` and
  :func:`tpr_at_fpr` score the gate's separation of attacked from clean scans (the
  thresholds for the ROC come from the clean scores; the Defender itself uses the bundle's calibrated τ).

The rung-1 attack itself (PGD against the classifier alone, at the MedFedPure paper's settings) and its
report are in :mod:`medfedpure.eval.runner` (``medfedpure eval --attacks paper``).
"""

from __future__ import annotations

import numpy as np

from medfedpure import Defender


def tpr_at_fpr(neg: np.ndarray, pos: np.ndarray, fpr: float) -> float:
    """Fraction of ``pos`` at or above the smallest threshold flagging at most ⌊fpr·n⌋ of ``neg``."""
    s = np.sort(np.asarray(neg, np.float64))[::-1]
    k = min(int(np.floor(fpr * len(s))), len(s) - 1)
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
