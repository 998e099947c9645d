"""The gate's decision rule: a float32 score → (flag, t*). Written once for numpy and once for torch,
both mirrors of ``gate_decide`` in kernels/patch_gate.h (which the C++ and CUDA kernels run):

    flag = score ≥ τ                                    (float32 comparison; τ rounded to float32)
    flagged:    frac = clip((score − τ) / (τ_high − τ), 0, 1)   in float64 from the float32 values
                v    = t_min + (t_max − t_min) · frac            in float64
                t*   = floor(v + 0.5)                            (round half up; v ≥ 0)
    unflagged:  t* = 0, or t_min under policy "floor"

Every backend therefore gives the same flag and t* for the same float32 score, ties at τ
included. :meth:`medfedpure.gate.GateSpec.decide` is the public entry point.
"""

from __future__ import annotations

from typing import Any

import numpy as np

POLICIES = ("adaptive", "floor")


def decide_numpy(score: np.ndarray, tau: float, tau_high: float, t_min: int, t_max: int,
                 floor: bool) -> tuple[np.ndarray, np.ndarray]:
    """score [B] float32 → (flag [B] bool, t_star [B] int32). ``tau`` / ``tau_high`` are rounded to
    float32 here (as the kernels do); ``floor``: unflagged scans get t_min instead of 0."""
    score = np.asarray(score, dtype=np.float32)
    tau32, tau_high32 = np.float32(tau), np.float32(tau_high)
    flag = score >= tau32
    frac = (score.astype(np.float64) - np.float64(tau32)) / (np.float64(tau_high32) - np.float64(tau32))
    frac = np.clip(frac, 0.0, 1.0)
    v = np.float64(t_min) + np.float64(t_max - t_min) * frac
    t = np.floor(v + 0.5).astype(np.int32)
    t_star = np.where(flag, t, np.int32(t_min if floor else 0)).astype(np.int32)
    return flag, t_star


def decide_torch(score: Any, tau: float, tau_high: float, t_min: int, t_max: int, floor: bool) -> tuple[Any, Any]:
    """The same rule on a torch score [B] (any device, no host sync) → (flag [B] bool, t_star [B] int32).
    The decision is discrete: no gradient flows through it."""
    import torch

    tau32, tau_high32 = float(np.float32(tau)), float(np.float32(tau_high))
    flag = score >= tau32
    frac = ((score.detach().double() - tau32) / (tau_high32 - tau32)).clamp(0.0, 1.0)
    t = torch.floor(t_min + (t_max - t_min) * frac + 0.5).to(torch.int32)
    t_star = torch.where(flag, t, torch.full_like(t, t_min if floor else 0))
    return flag, t_star
