"""A site's calibrated gate as one typed value: :class:`GateSpec` (what the gate computes and how it
decides) and :class:`GateCalibration` (how τ was chosen, a record that travels beside it).

The bundle manifest's ``gate`` section is exactly :meth:`GateSpec.to_dict`::

    {"stat": "hfratio", "patch": 8, "topk": 128, "norm_pix": false,
     "tau": …, "tau_high": …, "t_min": 60, "t_max": 200, "policy": "adaptive",
     "calibration": {"target_false_flag_rate": …, "val_false_flag_rate": …, "num_val_scans": …,
                     "score_quantiles": {"0.05": …, …}, "tau_high_rule": "…", "source": "…"}}

``calibration`` and, inside it, ``score_quantiles``, ``tau_high_rule`` and ``source`` may be absent (a gate
set by hand). :meth:`GateSpec.from_dict` refuses unknown keys and wrong types, so a section asking
for something this runtime does not implement is refused rather than run wrongly;
:meth:`GateSpec.from_legacy_dict` reads the flat format-1 section (and old ``calibration.json``
files) once, for conversion.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from medfedpure.gate.decision import POLICIES, decide_numpy
from medfedpure.gate.validate import LEARNED_STATS, SPECTRAL_STATS, STATS

__all__ = ["GateSpec", "GateCalibration", "POLICIES"]

_GATE_KEYS = ("stat", "patch", "topk", "norm_pix", "tau", "tau_high", "t_min", "t_max", "policy")
_CALIBRATION_REQUIRED = ("target_false_flag_rate", "val_false_flag_rate", "num_val_scans")
_CALIBRATION_OPTIONAL = ("score_quantiles", "tau_high_rule", "source")
# Format-1 keys that hold nothing the gate needs: the calibration's options (``config``), the
# purifier's K (``steps``, which the manifest's purifier section holds) and where the schedule came from.
_LEGACY_IGNORED = ("config", "steps", "schedule_source")
_LEGACY_DEFAULTS = {"stat": "mean", "topk": 0, "norm_pix": False, "policy": "adaptive"}


def _int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{name} = {v!r}: expected an int")
    return int(v)


def _number(v: Any, name: str) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
        raise ValueError(f"{name} = {v!r}: expected a finite number")
    return float(v)


def _bool(v: Any, name: str) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{name} = {v!r}: expected true or false")
    return bool(v)


def _str(v: Any, name: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(v, str):
        raise ValueError(f"{name} = {v!r}: expected a string")
    if choices is not None and v not in choices:
        raise ValueError(f"{name} = {v!r} is not implemented: expected one of {list(choices)}")
    return v


def _check_keys(d: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...], hint: str) -> None:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
    extra = sorted(set(d) - set(required) - set(optional))
    if extra:
        raise ValueError(f"{where}: unknown keys {extra} (known: {[*required, *optional]}); this medfedpure does "
                         f"not implement them — {hint}")
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")


@dataclass(frozen=True)
class GateCalibration:
    """How a site's τ was chosen on its clean validation scans (recorded, never used to decide).

    Attributes:
        target_false_flag_rate: the false-flag rate τ was set for, in (0, 1).
        val_false_flag_rate: the rate τ gives on those scans, in [0, 1].
        num_val_scans: how many clean validation scans were scored (≥ 1).
        score_quantiles: quantile ("0.05", …, as strings) → clean score, as (quantile, score) pairs
            in the order given; None when not recorded.
        tau_high_rule: how τ_high was set, in words; None when not recorded.
        source: where the scores came from, in words (e.g. a recalibration on a site's own scans:
            how many, their pixel fingerprint, the source bundle); None when not recorded.
    """

    target_false_flag_rate: float
    val_false_flag_rate: float
    num_val_scans: int
    score_quantiles: tuple[tuple[str, float], ...] | None = None
    tau_high_rule: str | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        target = _number(self.target_false_flag_rate, "calibration.target_false_flag_rate")
        if not 0 < target < 1:
            raise ValueError(f"calibration.target_false_flag_rate = {target!r}: expected a rate in (0, 1)")
        achieved = _number(self.val_false_flag_rate, "calibration.val_false_flag_rate")
        if not 0 <= achieved <= 1:
            raise ValueError(f"calibration.val_false_flag_rate = {achieved!r}: expected a rate in [0, 1]")
        n = _int(self.num_val_scans, "calibration.num_val_scans")
        if n < 1:
            raise ValueError(f"calibration.num_val_scans = {n}: expected at least one scan")
        q = self.score_quantiles
        if q is not None:
            items = q.items() if isinstance(q, Mapping) else q
            try:
                pairs = tuple((k, v) for k, v in items)
            except (TypeError, ValueError):
                raise ValueError(f"calibration.score_quantiles = {q!r}: expected an object of quantile → score") from None
            out = []
            for k, v in pairs:
                try:
                    ok = isinstance(k, str) and 0 <= float(k) <= 1
                except ValueError:
                    ok = False
                if not ok:
                    raise ValueError(f"calibration.score_quantiles key {k!r}: expected a quantile in [0, 1] written "
                                     "as a string, e.g. '0.95'")
                out.append((k, _number(v, f"calibration.score_quantiles[{k!r}]")))
            q = tuple(out)
        if self.tau_high_rule is not None:
            _str(self.tau_high_rule, "calibration.tau_high_rule")
        if self.source is not None:
            _str(self.source, "calibration.source")
        object.__setattr__(self, "target_false_flag_rate", target)
        object.__setattr__(self, "val_false_flag_rate", achieved)
        object.__setattr__(self, "num_val_scans", n)
        object.__setattr__(self, "score_quantiles", q)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``gate.calibration`` object (absent optional fields are left out)."""
        d: dict[str, Any] = {"target_false_flag_rate": self.target_false_flag_rate,
                             "val_false_flag_rate": self.val_false_flag_rate, "num_val_scans": self.num_val_scans}
        if self.score_quantiles is not None:
            d["score_quantiles"] = dict(self.score_quantiles)
        if self.tau_high_rule is not None:
            d["tau_high_rule"] = self.tau_high_rule
        if self.source is not None:
            d["source"] = self.source
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GateCalibration:
        """Inverse of :meth:`to_dict`; unknown or missing keys and wrong types raise ValueError."""
        _check_keys(d, "gate.calibration", _CALIBRATION_REQUIRED, _CALIBRATION_OPTIONAL,
                    "re-export the bundle with `medfedpure export`")
        q = d.get("score_quantiles")
        if q is not None and not isinstance(q, Mapping):
            raise ValueError(f"calibration.score_quantiles = {q!r}: expected an object of quantile → score")
        return cls(**{k: d[k] for k in (*_CALIBRATION_REQUIRED, *_CALIBRATION_OPTIONAL) if k in d})


@dataclass(frozen=True)
class GateSpec:
    """A calibrated gate: the statistic it scores and the rule that turns a score into (flag, t*).

    Attributes:
        stat: ``"mean"``, ``"topk"``, ``"hfratio"`` or ``"nyqratio"`` (:mod:`medfedpure.gate`), or ``"learned"``:
            the mean of the ``topk`` largest per-patch logits of the bundle's attack detector
            (:func:`medfedpure.gate.gate_reduce`; the bundle must carry a ``detector`` model).
        patch: the MAE's patch side P (≥ 1; ≥ 3 for ``hfratio``, ≥ 8 for ``nyqratio``).
        topk: for ``"topk"`` the number of largest patch errors averaged (≥ 1), for ``"learned"`` of patch
            logits (≥ 1); for ``"hfratio"`` and
            ``"nyqratio"`` m, the tissue patches whose median ratio is the score (0: Np // 2); ignored
            for ``"mean"``. Checked against Np = (S / P)² when the gate runs.
        norm_pix: the MAE's targets are per-patch normalised (not with ``"hfratio"`` / ``"nyqratio"``).
        tau: the flag threshold; tau_high: the score at which t* reaches t_max. Finite; the gate
            compares in float32, so float32(tau_high) > float32(tau) is required.
        t_min, t_max: purification timesteps, 0 ≤ t_min ≤ t_max < 2³¹.
        policy: ``"adaptive"`` (unflagged scans get t* = 0, no purification) or ``"floor"``
            (unflagged scans get t_min).
        calibration: how τ was chosen (:class:`GateCalibration`), or None.

    Raises:
        ValueError: a field of the wrong type or out of range (the message names it).
    """

    stat: str
    patch: int
    topk: int
    norm_pix: bool
    tau: float
    tau_high: float
    t_min: int
    t_max: int
    policy: str = "adaptive"
    calibration: GateCalibration | None = None

    def __post_init__(self) -> None:
        stat = _str(self.stat, "stat", (*STATS, *LEARNED_STATS))
        patch = _int(self.patch, "patch")
        topk = _int(self.topk, "topk")
        norm_pix = _bool(self.norm_pix, "norm_pix")
        tau, tau_high = _number(self.tau, "tau"), _number(self.tau_high, "tau_high")
        t_min, t_max = _int(self.t_min, "t_min"), _int(self.t_max, "t_max")
        policy = _str(self.policy, "policy", POLICIES)
        if patch < 1:
            raise ValueError(f"patch = {patch}: expected a positive patch side")
        if topk < 0:
            raise ValueError(f"topk = {topk}: expected >= 0")
        if stat in ("topk", *LEARNED_STATS) and topk < 1:
            raise ValueError(f"topk = 0 with stat {stat!r}: expected the number of largest patch values averaged (>= 1)")
        if stat in SPECTRAL_STATS:
            side_min = SPECTRAL_STATS[stat]
            if patch < side_min:
                raise ValueError(f"patch = {patch} with stat {stat!r}: its corner-band filter needs patches of at "
                                 f"least {side_min}x{side_min} pixels")
            if norm_pix:
                raise ValueError(f"norm_pix = True with stat {stat!r}: {stat} needs a pixel-space MAE")
        if not np.float32(tau_high) > np.float32(tau):
            raise ValueError(f"tau_high = {tau_high!r} must be > tau = {tau!r} (compared after rounding both to "
                             "float32, as the gate does)")
        if not 0 <= t_min <= t_max <= 2**31 - 1:
            raise ValueError(f"t_min = {t_min}, t_max = {t_max}: expected 0 <= t_min <= t_max < 2^31")
        if self.calibration is not None and not isinstance(self.calibration, GateCalibration):
            raise ValueError(f"calibration = {self.calibration!r}: expected a GateCalibration or None")
        for name, v in (("stat", stat), ("patch", patch), ("topk", topk), ("norm_pix", norm_pix), ("tau", tau),
                        ("tau_high", tau_high), ("t_min", t_min), ("t_max", t_max), ("policy", policy)):
            object.__setattr__(self, name, v)

    # decision -------------------------------------------------------------------------------
    def decide(self, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """score [B] float32 → (flag [B] bool, t_star [B] int32): the gate's decision rule
        (:mod:`medfedpure.gate.decision`, a mirror of ``gate_decide`` in kernels/patch_gate.h)."""
        return decide_numpy(np.asarray(score, dtype=np.float32), self.tau, self.tau_high, self.t_min, self.t_max,
                            self.policy == "floor")

    def with_policy(self, policy: str) -> GateSpec:
        """The same gate under another policy (``"adaptive"`` or ``"floor"``)."""
        return dataclasses.replace(self, policy=policy)

    # manifest --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``gate`` section (JSON types; ``calibration`` left out when None)."""
        d: dict[str, Any] = {k: getattr(self, k) for k in _GATE_KEYS}
        if self.calibration is not None:
            d["calibration"] = self.calibration.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GateSpec:
        """Inverse of :meth:`to_dict`. Unknown keys (a section this runtime does not implement),
        missing keys and wrong types raise ValueError naming the key."""
        _check_keys(d, "gate", _GATE_KEYS, ("calibration",),
                    "re-export the bundle, or convert a format-1 section with GateSpec.from_legacy_dict")
        cal = GateCalibration.from_dict(d["calibration"]) if "calibration" in d else None
        return cls(**{k: d[k] for k in _GATE_KEYS}, calibration=cal)

    @classmethod
    def from_legacy_dict(cls, d: Mapping[str, Any]) -> GateSpec:
        """The flat format-1 section (also the layout of old ``calibration.json`` files).

        Same meaning, field by field: ``stat`` / ``topk`` / ``norm_pix`` / ``policy`` default to
        "mean" / 0 / false / "adaptive" as the format-1 runtime read them; ``topk`` is kept as
        stored (for ``hfratio``, m = Np // 2 written out gives the same scores as 0); the
        calibration record is read from ``target_false_flag_rate``, ``val_false_flag_rate``,
        ``num_val_scans`` (all three, or none), ``score_quantiles`` and ``tau_high_rule``; ``config``,
        ``steps`` and ``schedule_source`` hold nothing the gate needs and are dropped. Other keys
        are refused.
        """
        _check_keys(d, "legacy gate section", ("patch", "tau", "tau_high", "t_min", "t_max"),
                    (*_LEGACY_DEFAULTS, *_CALIBRATION_REQUIRED, *_CALIBRATION_OPTIONAL, *_LEGACY_IGNORED),
                    "it is not a format-1 gate section")
        core = {k: d.get(k, _LEGACY_DEFAULTS.get(k)) for k in _GATE_KEYS}
        present = [k for k in _CALIBRATION_REQUIRED if k in d]
        if present and len(present) < len(_CALIBRATION_REQUIRED):
            raise ValueError(f"legacy gate section: calibration record incomplete: has {present}, missing "
                             f"{[k for k in _CALIBRATION_REQUIRED if k not in d]}")
        cal = None
        if present or any(k in d for k in _CALIBRATION_OPTIONAL):
            if not present:
                raise ValueError(f"legacy gate section: {[k for k in _CALIBRATION_OPTIONAL if k in d]} without the "
                                 f"calibration record {list(_CALIBRATION_REQUIRED)}")
            cal = GateCalibration.from_dict({k: d[k] for k in (*_CALIBRATION_REQUIRED, *_CALIBRATION_OPTIONAL) if k in d})
        return cls(**core, calibration=cal)

    def to_legacy_dict(self) -> dict[str, Any]:
        """The flat format-1 layout of this gate (for format-1 fixtures and comparisons with old
        bundles): ``from_legacy_dict(spec.to_legacy_dict()) == spec``."""
        d: dict[str, Any] = {k: getattr(self, k) for k in _GATE_KEYS}
        if self.calibration is not None:
            d.update(self.calibration.to_dict())
        return d
