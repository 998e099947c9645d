"""Runtime-side gate calibration and drift: what a site can do with a shipped bundle and no torch.

- :func:`score_scans`: the bundle's gate scores of preprocessed scans ``x`` [N,1,S,S], through the
  bundle's own :class:`~medfedpure.runtime.engines.Engine` (MAE under its K scoring mask sets, then
  the fused gate) — the same scores :meth:`Defender.run` computes;
- :func:`load_scan_folder`: a folder of scans (anything :func:`medfedpure.load_scan` reads) →
  preprocessed ``x`` and a fingerprint of the decoded pixels;
- :func:`recalibrate`: a new :class:`~medfedpure.gate.GateSpec` set on a site's clean, unlabelled
  scans by the shared rule (:mod:`medfedpure.gate.calibration`), with the achieved false-flag rate
  and its exact (Clopper–Pearson) interval; writing the new bundle is the exporter's
  (``medfedpure.export.bundle_writer.write_recalibrated_bundle``);
- :func:`score_quantile` and :class:`DriftMonitor`: where a score sits among the calibration's
  recorded quantiles, and running counts of live scores in the bins between them (what
  :meth:`Defender.drift` reports).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfedpure.gate import LEARNED_STATS, GateCalibration, GateSpec, run_gate, run_gate_scores
from medfedpure.gate.calibration import (
    DEFAULT_TAU_HIGH_K,
    binomial_cdf,
    calibrate_scores,
    expected_ffr,
    min_scans_for_confidence,
    parse_tau_high_k,
)
from medfedpure.runtime.certify import clopper_pearson_lower

__all__ = ["TooFewScansError", "binomial_ci", "score_scans", "ScanFolder", "load_scan_folder", "Recalibration",
           "recalibrate", "score_scans_with", "score_quantile", "chi2_sf", "DriftReport", "DriftMonitor"]


class TooFewScansError(ValueError):
    """Fewer clean scans than the minimum a recalibration needs: τ at a low false-flag rate is set
    by the few highest scores, so a small set gives a τ that does not hold on the next scans."""


# ----------------------------------------------------------------------------------------------
# statistics (no scipy)
def binomial_ci(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper–Pearson) two-sided interval for a binomial proportion k / n.

    ``(beta.ppf(a/2, k, n−k+1), beta.ppf(1−a/2, k+1, n−k))`` with a = 1 − confidence (0 when
    k = 0, 1 when k = n), from the runtime's exact binomial tails (no scipy).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: expected a level in (0, 1), e.g. 0.95")
    half = (1 - confidence) / 2
    lo = clopper_pearson_lower(int(k), int(n), half)
    hi = 1.0 - clopper_pearson_lower(int(n) - int(k), int(n), half)
    return lo, hi


def chi2_sf(x: float, dof: int) -> float:
    """P(χ²_dof ≥ x), the chi-square survival function, in closed form for integer dof ≥ 1.

    Even dof 2m: e^{−x/2} Σ_{j<m} (x/2)^j / j!. Odd dof 2m+1: erfc(√(x/2)) + √(2x/π) e^{−x/2}
    Σ_{j=1..m} x^{j−1} / (1·3···(2j−1)). What ``scipy.stats.chi2.sf`` returns.
    """
    if isinstance(dof, bool) or not isinstance(dof, (int, np.integer)) or dof < 1:
        raise ValueError(f"dof={dof!r}: expected an int >= 1")
    if not x > 0:
        return 1.0
    if dof % 2 == 0:
        term, total = 1.0, 1.0
        for j in range(1, dof // 2):
            term *= (x / 2) / j
            total += term
        return min(1.0, math.exp(-x / 2) * total)
    total, term = 0.0, 1.0
    for j in range(1, (dof - 1) // 2 + 1):
        term = term * (x if j > 1 else 1.0) / (2 * j - 1)
        total += term
    return min(1.0, math.erfc(math.sqrt(x / 2)) + math.sqrt(2 * x / math.pi) * math.exp(-x / 2) * total)


# ----------------------------------------------------------------------------------------------
# scoring
def score_scans(engine: Any, x: np.ndarray, *, batch_size: int = 16, spec: GateSpec | None = None) -> np.ndarray:
    """Gate scores [N] float32 of preprocessed scans ``x`` [N,1,S,S] float32 in [0,1], through
    ``engine`` (its MAE, then its gate; the score does not depend on τ). ``spec``: score with this gate's
    statistic instead of the engine's (same MAE and scoring masks), e.g. to recalibrate with another one.

    Raises:
        ValueError: ``x`` is not [N,1,S,S], or a score is not finite (the bundle cannot score these scans).
    """
    return score_scans_with(engine, x, (spec,), batch_size=batch_size)[0]


def _reads_mae(engine: Any, spec: GateSpec | None) -> bool:
    return engine.gate_model == "mae" if spec is None else spec.stat not in LEARNED_STATS


def score_scans_with(engine: Any, x: np.ndarray, specs: Sequence[GateSpec | None], *,
                     batch_size: int = 16) -> list[np.ndarray]:
    """Scores [N] float32 of ``x`` under each gate of ``specs`` (None: the engine's own), from one MAE
    pass per batch: statistics that share the MAE's reconstruction cost one MAE run, not one each (a
    ``learned`` gate reads the engine's attack detector instead, once per batch too).

    Raises:
        ValueError: ``x`` is not [N,1,S,S], no specs, or a score is not finite.
    """
    x = np.asarray(x, np.float32)
    if x.ndim != 4 or x.shape[1] != 1 or x.shape[0] < 1:
        raise ValueError(f"x has shape {x.shape}: expected [N, 1, S, S] (medfedpure.preprocess output)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    if len(specs) < 1:
        raise ValueError("specs is empty: give at least one gate (None for the engine's own)")
    out: list[list[np.ndarray]] = [[] for _ in specs]
    for i in range(0, len(x), batch_size):
        xn = engine.to_native(np.ascontiguousarray(x[i:i + batch_size]))
        rec = engine.mae(xn) if any(_reads_mae(engine, s) for s in specs) else None
        logits = engine.detect(xn) if any(not _reads_mae(engine, s) for s in specs) else None
        for j, spec in enumerate(specs):
            if spec is None:
                g = engine.gate(xn, rec if engine.gate_model == "mae" else logits)
            elif spec.stat in LEARNED_STATS:
                g = run_gate_scores(spec, logits)
            else:
                g = run_gate(spec, xn[:, 0], rec, engine.visible)
            out[j].append(np.asarray(engine.to_numpy(g.score), np.float32).reshape(-1))
    result = [np.concatenate(o) for o in out]
    for scores in result:
        if not np.isfinite(scores).all():
            raise ValueError(f"{int((~np.isfinite(scores)).sum())} of {len(scores)} gate scores are not finite: "
                             "the bundle cannot score these scans")
    return result


@dataclass(frozen=True)
class ScanFolder:
    """Preprocessed scans of a folder.

    Attributes:
        x: float32 [N, 1, S, S] in [0, 1], in ``files`` order.
        files: the scans read (sorted relative POSIX paths).
        skipped: ``"<path>: <ScanError type>: <message>"`` for files that are not usable scans.
        pixels_sha256: sha256 of the sorted per-scan sha256 digests of the decoded pixels (dtype,
            shape and bytes of :attr:`medfedpure.Scan.pixels`): the set's fingerprint, whatever
            the file names, order or container format.
    """

    x: np.ndarray
    files: tuple[str, ...]
    skipped: tuple[str, ...]
    pixels_sha256: str


def pixels_digest(pixels: np.ndarray) -> str:
    """sha256 of one scan's decoded pixels: dtype, shape, then the C-order bytes."""
    a = np.ascontiguousarray(pixels)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def set_fingerprint(digests: Sequence[str]) -> str:
    """sha256 of the sorted per-scan digests, one per line."""
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


def load_scan_folder(folder: str | os.PathLike[str], size: int, *, limits: Any = None) -> ScanFolder:
    """Every regular file under ``folder`` (recursively, hidden files skipped) that
    :func:`medfedpure.load_scan` reads, preprocessed to ``size``; unreadable files are listed in
    ``skipped`` (a calibration set counts usable scans only).

    Raises:
        NotADirectoryError: ``folder`` is not a directory.
    """
    from medfedpure.scan import ScanError, load_scan, preprocess

    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder: give a folder of clean scans (--scans DIR)")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    xs, files, skipped, digests = [], [], [], []
    for p in paths:
        rel = p.relative_to(root).as_posix()
        try:
            scan = load_scan(p, limits=limits)
            xs.append(preprocess(scan, size))
        except ScanError as e:
            skipped.append(f"{rel}: {type(e).__name__}: {e}")
            continue
        files.append(rel)
        digests.append(pixels_digest(scan.pixels))
    x = np.stack(xs).astype(np.float32) if xs else np.zeros((0, 1, size, size), np.float32)
    return ScanFolder(x=x, files=tuple(files), skipped=tuple(skipped), pixels_sha256=set_fingerprint(digests))


# ----------------------------------------------------------------------------------------------
# recalibration
@dataclass(frozen=True)
class Recalibration:
    """A gate recalibrated on a site's clean scans.

    Attributes:
        gate: the new gate (the bundle's patch and t range; its statistic, m and policy unless the
            call changed them; new τ, τ_high and calibration record).
        previous: the bundle's gate before.
        scores: float32 [N] the calibration scans' scores.
        flagged: how many calibration scans the new gate flags; ``flagged_before``: the old gate.
        ffr_ci: the exact 95 % interval of the achieved false-flag rate ``flagged / n``.
        provenance: what the new bundle records (``provenance.recalibration``).
    """

    gate: GateSpec
    previous: GateSpec
    scores: np.ndarray
    flagged: int
    flagged_before: int
    ffr_ci: tuple[float, float]
    provenance: dict[str, Any]

    @property
    def n(self) -> int:
        return int(len(self.scores))

    @property
    def achieved_ffr(self) -> float:
        return self.flagged / self.n


def recalibrate(bundle: Any, engine: Any, x: np.ndarray, *, target_ffr: float = 0.05, min_scans: int = 100,
                pixels_sha256: str | None = None, tau_high_k: float | None = None,
                today: datetime.date | None = None, description: str | None = None, stat: str | None = None,
                topk: int | None = None, policy: str | None = None, t_max: int | None = None,
                confidence: float | None = None) -> Recalibration:
    """Recalibrate ``bundle``'s gate (a :class:`~medfedpure.runtime.bundle.VerifiedBundle`) on clean,
    unlabelled preprocessed scans ``x`` [N,1,S,S] scored by ``engine`` (built for that bundle).

    τ is set at ``target_ffr`` and τ_high by the shared rule (:mod:`medfedpure.gate.calibration`), with
    k read from the bundle's recorded ``tau_high_rule`` unless ``tau_high_k`` is given (else 2).
    ``description``: what the scans are, in the caller's words (no patient data), recorded in the
    provenance (and so in the model card). ``stat`` / ``topk`` / ``policy``: change the gate's statistic
    (e.g. ``"nyqratio"`` on a scanner that keeps most of k-space), its m (or k) and its policy; None keeps
    the bundle's. The scores are then those of the new statistic, and ``flagged_before`` counts the old
    gate on its own statistic's scores of the same scans. ``t_max``: narrow the purification range to
    [t_min, t_max] (t_min ≤ t_max ≤ the bundle's t_max, the range its denoiser was distilled for; equal to
    t_min, every flagged scan is purified at t_min); None keeps the bundle's. ``confidence``: set τ so that the
    false-flag rate on the site's new clean scans is at most ``target_ffr`` with this probability over the
    draw of the calibration scans (:mod:`medfedpure.gate.calibration`; it flags fewer calibration scans);
    None flags ``⌊target_ffr · n⌋`` of them.

    Raises:
        TooFewScansError: fewer than ``min_scans`` scans, or too few for ``confidence``.
        ValueError: a bad target rate or minimum, a statistic, m or policy the bundle's gate cannot take
            (the message names it), or a score that is not finite.
    """
    if not 0 < target_ffr < 1:
        raise ValueError(f"target_ffr={target_ffr}: must be in (0, 1), e.g. 0.05")
    if isinstance(min_scans, bool) or not isinstance(min_scans, int) or min_scans < 1:
        raise ValueError(f"min_scans={min_scans!r}: expected an int >= 1")
    if description is not None and (not isinstance(description, str) or not description.strip()
                                    or len(description) > 500):
        raise ValueError(f"description={description!r}: expected a non-empty string of at most 500 characters")
    n = int(len(x))
    if n < min_scans:
        raise TooFewScansError(f"{n} usable clean scans, fewer than the minimum of {min_scans}: add scans to the "
                               "folder (at a target rate f, about 20/f scans give a stable τ), or lower "
                               "--min-scans knowingly")
    if confidence is not None:
        need = min_scans_for_confidence(target_ffr, confidence)  # also checks the confidence itself
        if n < need:
            raise TooFewScansError(f"{n} usable clean scans cannot bound the false-flag rate by {target_ffr:g} with "
                                   f"confidence {confidence:g}: at least {need} are needed (more give a τ that "
                                   "flags fewer of the site's scans); add scans or lower --confidence")
    old: GateSpec = bundle.spec.gate
    if t_max is not None and (isinstance(t_max, bool) or not isinstance(t_max, int)
                              or not old.t_min <= t_max <= old.t_max):
        raise ValueError(f"t_max={t_max!r}: the purification range can only narrow within the bundle's [{old.t_min}, "
                         f"{old.t_max}] (its denoiser's range): give an int from {old.t_min} to {old.t_max}")
    changes = {k: v for k, v in (("stat", stat), ("topk", topk), ("policy", policy), ("t_max", t_max))
               if v is not None}
    try:
        base = dataclasses.replace(old, **changes)
    except ValueError as exc:
        raise ValueError(f"the bundle's gate (stat {old.stat!r}, patch {old.patch}, topk {old.topk}, norm_pix "
                         f"{old.norm_pix}) cannot take {changes}: {exc}") from exc
    if tau_high_k is None:
        tau_high_k = parse_tau_high_k(old.calibration.tau_high_rule if old.calibration else None)
    k = DEFAULT_TAU_HIGH_K if tau_high_k is None else tau_high_k
    same_scores = (base.stat, base.topk) == (old.stat, old.topk)
    if same_scores:
        scores = old_scores = score_scans(engine, x)
    else:  # one MAE pass scores both the new statistic and the old gate's
        scores, old_scores = score_scans_with(engine, x, (base, None))
    date = (today or datetime.datetime.now(datetime.timezone.utc).date()).isoformat()
    fingerprint = pixels_sha256 or set_fingerprint([pixels_digest(a) for a in np.asarray(x, np.float32)])
    source = (f"recalibrated on {n} clean site scans (pixels sha256 {fingerprint}) on {date}, "
              f"from bundle {bundle.bundle_id}")
    tau, tau_high, record = calibrate_scores(scores, target_ffr, tau_high_k=k, source=source, confidence=confidence)
    gate = dataclasses.replace(base, tau=tau, tau_high=tau_high, calibration=record)
    flagged = int(gate.decide(scores)[0].sum())
    flagged_before = int(old.decide(old_scores)[0].sum())
    ci = binomial_ci(flagged, n)
    provenance = {"num_scans": n, "pixels_sha256": fingerprint, "date": date, "source_bundle_id": bundle.bundle_id,
                  "target_false_flag_rate": target_ffr, "achieved_false_flag_rate": flagged / n,
                  "false_flag_rate_ci95": [ci[0], ci[1]], "ci_method": "Clopper-Pearson (exact)",
                  "expected_false_flag_rate": expected_ffr(n, flagged),
                  # τ sits just above the (flagged+1)-th highest of n exchangeable scores: its rate on new scans
                  # is Beta(flagged+1, n−flagged), above the target with P(Bin(n, target) ≤ flagged)
                  "probability_rate_above_target": binomial_cdf(flagged, n, target_ffr),
                  "flagged_by_source_gate": flagged_before, "tau_high_k": k,
                  "previous_gate": {"tau": old.tau, "tau_high": old.tau_high}}
    if changes:
        provenance["previous_gate"].update(stat=old.stat, topk=old.topk, policy=old.policy, t_max=old.t_max)
        provenance["changed"] = {k: getattr(gate, k) for k in changes}
    if confidence is not None:
        provenance["false_flag_guarantee"] = {"rate": target_ffr, "confidence": confidence,
                                              "rule": "P(Binomial(n, rate) <= flagged) <= 1 - confidence"}
    if description is not None:
        provenance["description"] = description.strip()
    return Recalibration(gate=gate, previous=old, scores=scores, flagged=flagged, flagged_before=flagged_before,
                         ffr_ci=ci, provenance=provenance)


# ----------------------------------------------------------------------------------------------
# quantile position and drift
def _levels(calibration: GateCalibration | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(levels [Q], scores [Q]) of the recorded quantiles sorted by level, or None when not recorded."""
    if calibration is None or not calibration.score_quantiles:
        return None
    pairs = sorted((float(q), float(v)) for q, v in calibration.score_quantiles)
    lv = np.array([p[0] for p in pairs])
    sc = np.maximum.accumulate(np.array([p[1] for p in pairs]))  # quantiles never decrease
    return lv, sc


def score_quantile(score: float | None, calibration: GateCalibration | None) -> float | None:
    """The fraction of calibration scores below ``score``, interpolated linearly between the recorded
    quantiles (level q at score s_q); outside them it is the outermost level (a record with "0" and
    "1" covers [0, 1]). None when ``score`` or the record's quantiles are missing. Non-decreasing
    in ``score``."""
    lv = _levels(calibration)
    if score is None or lv is None or not math.isfinite(score):
        return None
    levels, scores = lv
    # np.interp needs increasing x: equal quantile scores (a plateau) take the highest level reached.
    xs, idx = np.unique(scores, return_inverse=True)
    top = np.zeros(len(xs))
    np.maximum.at(top, idx, levels)
    low = np.full(len(xs), np.inf)
    np.minimum.at(low, idx, levels)
    if score < xs[0]:
        return float(low[0])
    return float(np.interp(score, xs, top))


@dataclass(frozen=True)
class DriftReport:
    """Live gate scores against the calibration's recorded quantiles.

    Attributes:
        edges: the recorded quantile scores [Q] (bin i is edges[i−1] ≤ score < edges[i]; the first
            bin is below edges[0], the last at or above edges[−1]).
        levels: their quantile levels [Q].
        counts: live scores per bin [Q + 1].
        expected: the fraction of calibration scores per bin [Q + 1] (differences of the levels).
        n: live scores counted.
        chi2, dof, p_value: Pearson's chi-square of counts against n·expected, Q degrees of freedom
            (bins of zero expected mass merged into their neighbour),
            and its p-value (small: the live scores are not distributed like the calibration's).
            None while n = 0.
        flagged, flag_rate_ci95: live scores at or above τ and the exact 95 % interval of their rate
            (compare with ``target_false_flag_rate`` on clean traffic; attacks raise it too).
        target_false_flag_rate: the calibration's target.
    """

    edges: tuple[float, ...]
    levels: tuple[float, ...]
    counts: tuple[int, ...]
    expected: tuple[float, ...]
    n: int
    chi2: float | None
    dof: int
    p_value: float | None
    flagged: int
    flag_rate_ci95: tuple[float, float] | None
    target_false_flag_rate: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class DriftMonitor:
    """Thread-safe running counts of gate scores in the bins between a calibration's quantiles.

    Args:
        calibration: the gate's record (its ``score_quantiles`` set the bins; None or no quantiles:
            every score falls in one bin and no test is computed).
        tau: the gate's threshold (scores ≥ τ count as flagged).
    """

    def __init__(self, calibration: GateCalibration | None, tau: float) -> None:
        lv = _levels(calibration)
        self._levels = lv[0] if lv is not None else np.zeros(0)
        self._edges = lv[1] if lv is not None else np.zeros(0)
        self._tau = np.float32(tau)
        self._target = None if calibration is None else calibration.target_false_flag_rate
        self._lock = threading.Lock()
        self._counts = np.zeros(len(self._edges) + 1, np.int64)
        self._flagged = 0

    def update(self, scores: np.ndarray | Sequence[float]) -> None:
        """Count finite ``scores`` [B] (non-finite ones are ignored)."""
        s = np.asarray(scores, np.float64).reshape(-1)
        s = s[np.isfinite(s)]
        if s.size == 0:
            return
        bins = np.searchsorted(self._edges, s, side="right")
        add = np.bincount(bins, minlength=len(self._counts))
        flagged = int((s.astype(np.float32) >= self._tau).sum())
        with self._lock:
            self._counts += add
            self._flagged += flagged

    def reset(self) -> None:
        with self._lock:
            self._counts[:] = 0
            self._flagged = 0

    def report(self) -> DriftReport:
        with self._lock:
            counts = self._counts.copy()
            flagged = self._flagged
        n = int(counts.sum())
        expected = np.diff(np.concatenate([[0.0], self._levels, [1.0]]))
        # a bin of zero expected mass (a record with levels "0" or "1") is merged into its neighbour
        keep = np.flatnonzero(expected > 0)
        merged = np.zeros(len(keep), np.int64)
        for i, c in enumerate(counts):
            merged[int(np.argmin(np.abs(keep - i)))] += c
        dof = len(keep) - 1
        chi2 = p = None
        if n > 0 and dof >= 1:
            e = n * expected[keep]
            chi2 = float(((merged - e) ** 2 / e).sum())
            p = chi2_sf(chi2, dof)
        return DriftReport(edges=tuple(float(v) for v in self._edges), levels=tuple(float(v) for v in self._levels),
                           counts=tuple(int(c) for c in counts), expected=tuple(float(v) for v in expected), n=n,
                           chi2=chi2, dof=dof, p_value=p, flagged=flagged,
                           flag_rate_ci95=binomial_ci(flagged, n) if n else None,
                           target_false_flag_rate=self._target)
