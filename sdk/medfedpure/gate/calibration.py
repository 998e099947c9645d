"""The one rule that turns a site's clean gate scores into τ, τ_high and the calibration record.

Both calibrations call it: the training-side one (:mod:`medfedpure.train.calibrate`, scores from the
torch MAE) and the runtime-side recalibration of a shipped bundle
(:mod:`medfedpure.runtime.calibration`, scores from the bundle's engine). numpy only, so the runtime
can use it without torch.

- ``tau``: the smallest float32 threshold whose false-flag rate on the n clean scores is at most
  the target f (``flag = score ≥ tau``): the ``⌊f·n⌋`` highest scores are flagged (fewer when the
  next score ties with them), ``tau`` sits just above the next one;
- ``tau_high = tau + k · (tau − median)``, rounded to float32: the score at which purification
  reaches ``t_max``, k clean spreads beyond the threshold (the spread is floored at
  ``1e-6 · max(|tau|, 1)`` so that ``tau_high > tau`` always);
- the record: target and achieved rate, n, the clean scores' quantiles and the τ_high rule in words.

:func:`auroc` measures how well a statistic separates attacked from clean scans (the evaluation's rung 1,
the detector's training report).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from medfedpure.gate.spec import GateCalibration

__all__ = ["DEFAULT_QUANTILES", "DEFAULT_TAU_HIGH_K", "threshold_at_ffr", "tau_high_from", "tau_high_rule_text",
           "parse_tau_high_k", "score_quantiles", "calibrate_scores", "auroc"]

#: quantile levels recorded with every calibration (as strings: the manifest's keys)
DEFAULT_QUANTILES: tuple[str, ...] = ("0.05", "0.25", "0.5", "0.75", "0.95")
DEFAULT_TAU_HIGH_K = 2.0
_RULE = "tau + {k} * (tau - median of clean val scores)"
_RULE_RE = re.compile(r"^tau \+ ([0-9.eE+-]+) \* \(tau - median of clean val scores\)$")


def threshold_at_ffr(scores: np.ndarray, target_ffr: float) -> tuple[float, float]:
    """``(tau, achieved_ffr)`` of clean ``scores`` [N]: the smallest float32 ``tau`` flagging at most
    ``⌊f·n⌋`` of them (ties at the boundary are left unflagged rather than all flagged)."""
    s = np.sort(np.asarray(scores, np.float32).ravel())[::-1]
    n = len(s)
    if n == 0:
        raise ValueError("no calibration scores: the site's validation split is empty")
    if not np.isfinite(s).all():
        raise ValueError("calibration scores contain NaN/inf: check the MAE checkpoint and the scans")
    if not 0 < target_ffr < 1:
        raise ValueError(f"target_ffr={target_ffr}: must be in (0, 1), e.g. 0.05")
    k = int(np.floor(target_ffr * n))
    tau = np.nextafter(s[k], np.float32(np.inf), dtype=np.float32)
    return float(tau), float((s >= tau).mean())


def tau_high_from(tau: float, median: float, k: float = DEFAULT_TAU_HIGH_K) -> float:
    """``float32(tau + k · max(tau − median, 1e-6 · max(|tau|, 1)))``: where t* reaches t_max."""
    if not k > 0:
        raise ValueError(f"tau_high_k={k}: must be > 0")
    spread = max(tau - median, 1e-6 * max(abs(tau), 1.0))
    return float(np.float32(tau + k * spread))


def tau_high_rule_text(k: float = DEFAULT_TAU_HIGH_K) -> str:
    """The rule in words, as recorded in ``gate.calibration.tau_high_rule``."""
    return _RULE.format(k=k)


def parse_tau_high_k(rule: str | None) -> float | None:
    """k of a recorded :func:`tau_high_rule_text`, or None when ``rule`` is absent or another rule."""
    m = _RULE_RE.match(rule or "")
    if m is None:
        return None
    try:
        k = float(m.group(1))
    except ValueError:
        return None
    return k if k > 0 else None


def score_quantiles(scores: np.ndarray, levels: Sequence[str] = DEFAULT_QUANTILES) -> dict[str, float]:
    """Level (string) → ``numpy.quantile`` of ``scores`` (linear interpolation)."""
    s = np.asarray(scores, np.float32).ravel()
    return {q: float(np.quantile(s, float(q))) for q in levels}


def calibrate_scores(scores: np.ndarray, target_ffr: float, *, tau_high_k: float = DEFAULT_TAU_HIGH_K,
                     source: str | None = None) -> tuple[float, float, GateCalibration]:
    """``(tau, tau_high, record)`` from clean scores [N] at target false-flag rate ``target_ffr``.

    ``source`` (e.g. which scans and bundle) goes into the record as is.
    """
    scores = np.asarray(scores, np.float32).ravel()
    tau, achieved = threshold_at_ffr(scores, target_ffr)
    tau_high = tau_high_from(tau, float(np.median(scores)), tau_high_k)
    record = GateCalibration(target_false_flag_rate=target_ffr, val_false_flag_rate=achieved,
                             num_val_scans=int(len(scores)), score_quantiles=score_quantiles(scores),
                             tau_high_rule=tau_high_rule_text(tau_high_k), source=source)
    return tau, tau_high, record


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann–Whitney U)."""
    neg, pos = np.asarray(neg, np.float64), np.asarray(pos, np.float64)
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))
