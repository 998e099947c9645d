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

With a ``confidence`` c, τ instead carries a guarantee about the site's *future* clean scans: with
probability at least c over the draw of the n calibration scans, the false-flag rate on new clean scans
like them is at most f. If τ sits just above the (k+1)-th highest of n exchangeable scores, the share of
new scores above it is Beta(k+1, n−k) distributed, so P(rate > f) = P(Binomial(n, f) ≤ k); the rule
flags the largest k with that probability at most 1 − c (:func:`flagged_at_confidence`). It flags fewer
calibration scans than ``⌊f·n⌋`` and needs n ≥ ln(1 − c) / ln(1 − f) scans (59 at f = 0.05, c = 0.95).
Without it, the expected rate on new scans is (k+1)/(n+1) with k = ``⌊f·n⌋`` (:func:`expected_ffr`).

:func:`auroc` measures how well a statistic separates attacked from clean scans (the evaluation's rung 1,
the detector's training report).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from medfedpure.gate.spec import GateCalibration

__all__ = ["DEFAULT_QUANTILES", "DEFAULT_TAU_HIGH_K", "binomial_cdf", "flagged_at_confidence", "expected_ffr",
           "min_scans_for_confidence", "threshold_at_ffr", "tau_high_from", "tau_high_rule_text",
           "parse_tau_high_k", "score_quantiles", "calibrate_scores", "auroc"]

#: quantile levels recorded with every calibration (as strings: the manifest's keys)
DEFAULT_QUANTILES: tuple[str, ...] = ("0.05", "0.25", "0.5", "0.75", "0.95")
DEFAULT_TAU_HIGH_K = 2.0
_RULE = "tau + {k} * (tau - median of clean val scores)"
_RULE_RE = re.compile(r"^tau \+ ([0-9.eE+-]+) \* \(tau - median of clean val scores\)$")


def _check_confidence(confidence: float) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r}: must be a probability in (0, 1), e.g. 0.95")
    return float(confidence)


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) ≤ k), summed exactly in log space (n up to millions)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
             for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def min_scans_for_confidence(target_ffr: float, confidence: float) -> int:
    """The fewest calibration scans for which :func:`flagged_at_confidence` exists (it then flags none):
    the smallest n with (1 − f)^n ≤ 1 − c."""
    if not 0 < target_ffr < 1:
        raise ValueError(f"target_ffr={target_ffr}: must be in (0, 1), e.g. 0.05")
    c = _check_confidence(confidence)
    n = max(1, math.ceil(math.log1p(-c) / math.log1p(-target_ffr)))
    while binomial_cdf(0, n, target_ffr) > 1 - c:  # guard the float rounding of the closed form
        n += 1
    return n


def flagged_at_confidence(n: int, target_ffr: float, confidence: float) -> int:
    """How many of n calibration scans the guaranteed rule flags: the largest k with
    P(Binomial(n, f) ≤ k) ≤ 1 − c, i.e. P(false-flag rate on new scans > f) ≤ 1 − c.

    Raises:
        ValueError: n < :func:`min_scans_for_confidence` (no k gives the guarantee; the message says how
            many scans would).
    """
    need = min_scans_for_confidence(target_ffr, confidence)
    if n < need:
        raise ValueError(f"{n} calibration scans cannot bound the false-flag rate by {target_ffr:g} with confidence "
                         f"{confidence:g}: at least {need} are needed")
    k = 0
    while k + 1 < n and binomial_cdf(k + 1, n, target_ffr) <= 1 - confidence:
        k += 1
    return k


def expected_ffr(n: int, flagged: int) -> float:
    """The expected false-flag rate on new clean scans exchangeable with the n calibration scans when τ
    flags ``flagged`` of them and sits just above the next: (flagged + 1) / (n + 1)."""
    return (flagged + 1) / (n + 1)


def threshold_at_ffr(scores: np.ndarray, target_ffr: float, *,
                     confidence: float | None = None) -> tuple[float, float]:
    """``(tau, achieved_ffr)`` of clean ``scores`` [N]: the smallest float32 ``tau`` flagging at most
    ``⌊f·n⌋`` of them (ties at the boundary are left unflagged rather than all flagged); with
    ``confidence``, at most :func:`flagged_at_confidence` of them (the rate on new scans is ≤ f with that
    probability)."""
    s = np.sort(np.asarray(scores, np.float32).ravel())[::-1]
    n = len(s)
    if n == 0:
        raise ValueError("no calibration scores: the site's validation split is empty")
    if not np.isfinite(s).all():
        raise ValueError("calibration scores contain NaN/inf: check the MAE checkpoint and the scans")
    if not 0 < target_ffr < 1:
        raise ValueError(f"target_ffr={target_ffr}: must be in (0, 1), e.g. 0.05")
    k = int(np.floor(target_ffr * n)) if confidence is None else flagged_at_confidence(n, target_ffr, confidence)
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
                     source: str | None = None, confidence: float | None = None) -> tuple[float, float, GateCalibration]:
    """``(tau, tau_high, record)`` from clean scores [N] at target false-flag rate ``target_ffr`` (with
    ``confidence``: the rate on new scans is at most the target with that probability).

    ``source`` (e.g. which scans and bundle) goes into the record; with ``confidence`` the guarantee is added
    to it in words.
    """
    scores = np.asarray(scores, np.float32).ravel()
    tau, achieved = threshold_at_ffr(scores, target_ffr, confidence=confidence)
    tau_high = tau_high_from(tau, float(np.median(scores)), tau_high_k)
    if confidence is not None:
        guarantee = (f"τ bounds the false-flag rate on new clean scans by {target_ffr:g} with probability "
                     f"{confidence:g}")
        source = guarantee if source is None else f"{source}; {guarantee}"
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
