"""Per-site calibration of the gate (docs/design.md: the gate; docs/evaluation.md: the threat model).

On the site's clean **validation** scans — no labels, no attacks — the MAE scorer's reconstructions
are scored with the chosen statistic, and:

The rule from scores to ``tau`` / ``tau_high`` / the record is :mod:`medfedpure.gate.calibration`'s
(shared with the runtime-side recalibration of a shipped bundle):

- ``tau``: the smallest threshold whose false-flag rate on those scans is at most the target
  (``flag = score ≥ tau``): with n scans and target f, the ``⌊f·n⌋`` highest scores are flagged,
  ``tau`` sits just above the next one (rounded to float32 as the gate compares in float32);
- ``tau_high = tau + tau_high_k · (tau − median)``: the score at which purification reaches
  ``t_max``. The spread ``tau − median`` is the clean scores' own upper half-width, so ``tau_high``
  is ``tau_high_k`` clean spreads beyond the threshold (default 2) — calibrated without attacks;
- ``t_min`` / ``t_max`` / ``steps``: from the distilled student's checkpoint metadata when
  ``RUN/student.safetensors`` exists and names them, else from the options (whose defaults are
  :data:`medfedpure.models.diffusion.PURIFY_DEFAULTS`).

The result is ``RUN/site_k/calibration.json`` with the fields listed in docs/interfaces.md, plus
the score quantiles and the provenance of each number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfedpure.gate import STATS, GateSpec, gate_scores
from medfedpure.gate.calibration import calibrate_scores, min_scans_for_confidence, threshold_at_ffr
from medfedpure.gate.validate import SPECTRAL_STATS
from medfedpure.models.diffusion import PURIFY_DEFAULTS, PurifySchedule
from medfedpure.models.mae import MAEScorer, MaskedAutoencoder

__all__ = ["CalibrationConfig", "score_scans", "threshold_at_ffr", "calibrate_gate", "student_schedule",
           "calibration_gate_spec"]

# Keys of calibration.json beside the gate section: the purifier's K and where the schedule came from.
PURIFIER_KEYS = ("steps", "schedule_source")


@dataclass(frozen=True)
class CalibrationConfig:
    """Options of a gate calibration.

    Attributes:
        target_ffr: target false-flag rate on clean validation scans (0 < f < 1).
        stat: gate statistic (``medfedpure.gate.STATS``). ``topk``: k for ``stat="topk"``; for
            ``"hfratio"`` / ``"nyqratio"`` the number m of tissue patches scored (0: half the patches).
        tau_high_k: ``tau_high = tau + k · (tau − median)`` (> 0).
        t_min / t_max / steps: purification range and student steps when the student's
            checkpoint does not give them (or always, with ``schedule_from="options"``); validated
            as a :class:`~medfedpure.models.diffusion.PurifySchedule`, defaults ``PURIFY_DEFAULTS``.
        schedule_from: ``"student"`` (the student checkpoint's schedule when it names one) or
            ``"options"`` (these options whatever the checkpoint says: e.g. a student distilled for
            t ∈ [10, 250] and K ∈ {1, 2, 4} run at K = 1 on [60, 200]).
        policy: ``"adaptive"`` (unflagged scans skip purification) or ``"floor"``.
        confidence: None flags ``⌊target_ffr · n⌋`` of the n scans; a level c in (0, 1) sets τ so that the rate on
            new clean scans like them is at most ``target_ffr`` with probability c
            (:mod:`medfedpure.gate.calibration`; ValueError at calibration when n is too small for it).
    """

    target_ffr: float = 0.05
    stat: str = "hfratio"
    topk: int = 0
    tau_high_k: float = 2.0
    t_min: int = PURIFY_DEFAULTS.t_min
    t_max: int = PURIFY_DEFAULTS.t_max
    steps: int = PURIFY_DEFAULTS.steps
    policy: str = "adaptive"
    schedule_from: str = "student"
    confidence: float | None = None

    def __post_init__(self) -> None:
        if self.schedule_from not in ("student", "options"):
            raise ValueError(f"schedule_from={self.schedule_from!r}: expected 'student' or 'options'")
        if not 0 < self.target_ffr < 1:
            raise ValueError(f"target_ffr={self.target_ffr}: must be in (0, 1), e.g. 0.05")
        if self.stat not in STATS:
            raise ValueError(f"stat={self.stat!r}: expected one of {sorted(STATS)}")
        if self.stat == "topk" and self.topk < 1:
            raise ValueError("stat='topk' needs topk >= 1")
        if self.topk < 0:
            raise ValueError(f"topk={self.topk}: must be >= 0")
        if not self.tau_high_k > 0:
            raise ValueError(f"tau_high_k={self.tau_high_k}: must be > 0")
        PurifySchedule(t_min=self.t_min, t_max=self.t_max, steps=self.steps)  # ValueError naming the bad one
        if self.policy not in ("adaptive", "floor"):
            raise ValueError(f"policy={self.policy!r}: use 'adaptive' or 'floor'")
        if self.confidence is not None:
            min_scans_for_confidence(self.target_ffr, self.confidence)  # ValueError naming a bad level

    @property
    def schedule(self) -> PurifySchedule:
        """The options' purification schedule (used when the student checkpoint names none)."""
        return PurifySchedule(t_min=self.t_min, t_max=self.t_max, steps=self.steps)


@torch.no_grad()
def score_scans(mae: MaskedAutoencoder, x: Any, *, stat: str, topk: int = 0, batch_size: int = 16) -> np.ndarray:
    """Gate scores ``[N]`` float32 of scans ``x`` ``[N,1,S,S]`` in [0,1] under the MAE's scoring masks."""
    scorer = MAEScorer(mae).eval()
    xt = torch.as_tensor(np.asarray(x, np.float32) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32)
    s = mae.cfg.image_size
    if xt.dim() != 4 or tuple(xt.shape[1:]) != (1, s, s):
        raise ValueError(f"x has shape {tuple(xt.shape)}: expected [N, 1, {s}, {s}]")
    out = []
    for i in range(0, len(xt), batch_size):
        xb = xt[i:i + batch_size]
        score, _ = gate_scores(xb, scorer(xb), scorer.visible, patch=mae.cfg.patch, stat=stat, topk=topk,
                               norm_pix=mae.cfg.norm_pix)
        out.append(np.asarray(score, np.float32))
    return np.concatenate(out)


def student_schedule(run: Path) -> dict[str, Any] | None:
    """``{"t_min", "t_max", "steps"}`` from ``RUN/student.safetensors`` metadata, if it names them.

    Looked up at the top level of the metadata, then in ``config``, then one level deeper (e.g. the
    distillation options the purifier stores under ``distill``); integral floats are accepted.
    """
    path = Path(run) / "student.safetensors"
    if not path.is_file():
        return None
    from medfedpure.models.weights import model_metadata as read_metadata

    meta = read_metadata(path)
    sources = [meta, meta.get("config", {})]
    sources += [v for src in list(sources) if isinstance(src, dict) for v in src.values() if isinstance(v, dict)]
    found: dict[str, int] = {}
    for src in sources:
        if not isinstance(src, dict):
            continue
        for key in ("t_min", "t_max", "steps"):
            v = src.get(key)
            if key not in found and isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer():
                found[key] = int(v)
    return found if {"t_min", "t_max", "steps"} <= set(found) else None


def calibrate_gate(mae: MaskedAutoencoder, x_val: Any, cfg: CalibrationConfig, *, run: Path | None = None,
                   batch_size: int = 16, source: str | None = None) -> dict[str, Any]:
    """Calibrate one site's gate on its clean validation scans ``x_val`` ``[N,1,S,S]`` (``source``: which scans,
    in words, for the calibration record).

    Returns the ``calibration.json`` content: the manifest's gate section
    (:meth:`medfedpure.gate.GateSpec.to_dict`, with the calibration record: target and achieved
    false-flag rate, number of scans, score quantiles, the τ_high rule) plus ``steps`` (the purifier's
    K) and ``schedule_source`` (``"student checkpoint"`` or ``"options"``).
    """
    topk = cfg.topk
    if cfg.stat in SPECTRAL_STATS and topk == 0:  # m, the tissue patches scored: half of them by default
        topk = mae.cfg.num_patches // 2
    scores = score_scans(mae, x_val, stat=cfg.stat, topk=topk, batch_size=batch_size)
    tau, tau_high, calibration = calibrate_scores(scores, cfg.target_ffr, tau_high_k=cfg.tau_high_k, source=source,
                                                  confidence=cfg.confidence)
    sched = student_schedule(run) if run is not None and cfg.schedule_from == "student" else None
    t_min, t_max, steps = (sched["t_min"], sched["t_max"], sched["steps"]) if sched else (cfg.t_min, cfg.t_max, cfg.steps)
    spec = GateSpec(stat=cfg.stat, patch=int(mae.cfg.patch), topk=int(topk), norm_pix=bool(mae.cfg.norm_pix), tau=tau,
                    tau_high=tau_high, t_min=int(t_min), t_max=int(t_max), policy=cfg.policy, calibration=calibration)
    return {**spec.to_dict(), "steps": int(steps), "schedule_source": "student checkpoint" if sched else "options"}


def calibration_gate_spec(calib: Any) -> GateSpec:
    """The :class:`~medfedpure.gate.GateSpec` of a ``calibration.json`` record: this module's layout
    (the gate section plus :data:`PURIFIER_KEYS`), or the flat layout of older runs."""
    if "calibration" in calib:
        return GateSpec.from_dict({k: v for k, v in calib.items() if k not in PURIFIER_KEYS})
    return GateSpec.from_legacy_dict(calib)


def write_calibration(path: Path, calib: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(calib, indent=2))
    return path
