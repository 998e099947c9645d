"""The one small interface every inference backend implements, and the shared sampler maths.

An :class:`Engine` runs the three shipped networks and the gate on *native* arrays (numpy for
onnxruntime and TensorRT; torch tensors on the engine's device for torch), so that on a GPU the
intermediate tensors never leave the device: the Defender converts once at the start
(:meth:`Engine.to_native`) and reads back only what it must (flags, final probabilities).

Purification (:func:`purify_numpy`) is the same algorithm as
:func:`medfedpure.models.diffusion.purify` — DiffPure forward noising to t*, then K DDIM (η = 0)
steps on the uniform grid t_i = t*·(K − i)/K, in EDM's scaled variable — written on numpy so a
runtime without torch can run it. The schedule (ᾱ table), K and the grid rule come from the
bundle manifest's ``purifier`` section. The noise is an *input*: the Defender draws it from the
keyed RNG, so every backend purifies with bit-identical noise and a decision can be replayed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from medfedpure.gate import STATS as OPS_STATS
from medfedpure.gate import GateResult, patch_gate


class EngineError(RuntimeError):
    """A backend cannot be created or used as asked (missing runtime, provider or artefact)."""


SAMPLER = "ddim_eta0_uniform"  # the manifest's purifier["sampler"] this code implements


def interp_alpha_bar(table: np.ndarray, t: np.ndarray) -> np.ndarray:
    """ᾱ at fractional times ``t`` [B] by linear interpolation in ``table`` [T+1] (float64 maths).

    Mirrors :func:`medfedpure.models.diffusion.interp_alphas_cumprod` and returns float32 as
    ``DiffusionSchedule.alpha_bar`` does.
    """
    num_timesteps = table.shape[0] - 1
    t = np.clip(t.astype(np.float64), 0, num_timesteps)
    lo = np.minimum(np.floor(t), num_timesteps - 1)
    frac = t - lo
    lo_i = lo.astype(np.int64)
    return (table[lo_i] * (1 - frac) + table[lo_i + 1] * frac).astype(np.float32)


def purify_numpy(
    denoise: Callable[[np.ndarray, np.ndarray], np.ndarray],
    x: np.ndarray,
    t_star: np.ndarray,
    noise: np.ndarray,
    alphas_cumprod: np.ndarray,
    steps: int,
) -> np.ndarray:
    """DiffPure with a K-step DDIM reverse process (Nie et al. 2022 eq. 3–4; Song et al. 2021 eq. 12).

    Args:
        denoise: x0-predictor ``(x_t [B,1,S,S] float32, t [B] float32) -> x0_hat`` ([−1,1] space).
        x: [B, 1, S, S] float32 scans in [0, 1].
        t_star: [B] int start times in [0, T]; rows with 0 come back unchanged (bit-exact).
        noise: [B, 1, S, S] float32 standard normal noise (from the keyed RNG).
        alphas_cumprod: ᾱ_t, t = 0..T (float64 [T + 1], ᾱ_0 = 1).
        steps: K ≥ 1.

    Returns:
        [B, 1, S, S] float32 purified scans in [0, 1].
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: need at least one sampling step")
    if noise.shape != x.shape or t_star.shape != (x.shape[0],):
        raise ValueError(f"shapes: x {x.shape}, noise {noise.shape}, t_star {t_star.shape}")
    t = t_star.astype(np.float32)

    def col(v: np.ndarray) -> np.ndarray:
        return v.reshape(-1, 1, 1, 1)

    ab = col(interp_alpha_bar(alphas_cumprod, t))
    y = np.sqrt(ab) * (x * np.float32(2) - np.float32(1)) + np.sqrt(np.float32(1) - ab) * noise  # DDPM eq. 4
    for i in range(steps):
        t_cur = (t * np.float32(steps - i) / np.float32(steps)).astype(np.float32)
        t_next = (t * np.float32(steps - i - 1) / np.float32(steps)).astype(np.float32)
        ab_cur = col(interp_alpha_bar(alphas_cumprod, t_cur))
        ab_next = col(interp_alpha_bar(alphas_cumprod, t_next))
        x0_hat = denoise(np.ascontiguousarray(y, dtype=np.float32), t_cur)
        sig_cur = np.sqrt((1 - ab_cur) / ab_cur)
        sig_next = np.sqrt((1 - ab_next) / ab_next)
        ratio = sig_next / np.maximum(sig_cur, np.float32(1e-12))
        y_hat = y / np.sqrt(ab_cur)
        # Euler step of the probability-flow ODE in x̂ = x/√ᾱ (EDM §3) == DDIM η = 0.
        y = np.sqrt(ab_next) * (x0_hat + ratio * (y_hat - x0_hat))
    out = np.clip((y + 1) / 2, 0, 1).astype(np.float32)
    return np.where(col(t_star == 0), x, out).astype(np.float32)


def decide(score: np.ndarray, gate: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """score [B] float32 → (flag [B] bool, t_star [B] int32): DESIGN.md §5's rule, as in ops/patch_gate.h.

    flag = score ≥ τ (float32 compare); t* = round-half-up(t_min + (t_max − t_min)·clip((score − τ)/(τ_high − τ),
    0, 1)) in float64 when flagged, else 0 (t_min under policy ``floor``).
    """
    tau, tau_high = np.float32(gate["tau"]), np.float32(gate["tau_high"])
    t_min, t_max = int(gate["t_min"]), int(gate["t_max"])
    flag = score >= tau
    frac = np.clip((score.astype(np.float64) - np.float64(tau)) / (np.float64(tau_high) - np.float64(tau)), 0.0, 1.0)
    t = np.floor(np.float64(t_min) + np.float64(t_max - t_min) * frac + 0.5).astype(np.int32)
    rest = np.int32(t_min if gate.get("policy", "adaptive") == "floor" else 0)
    return flag, np.where(flag, t, rest).astype(np.int32)


def host_gate(x: np.ndarray, recon: np.ndarray, visible: np.ndarray, gate: Mapping[str, Any], *,
              return_patch_err: bool = False) -> GateResult:
    """The gate on the host (numpy) for any calibrated statistic.

    ``mean`` / ``topk`` go through :func:`medfedpure.gate.patch_gate` (the C++ kernel); other
    statistics (e.g. ``hfratio``) through :func:`medfedpure.train.scores.gate_scores` — the
    function the calibration used — followed by :func:`decide`. ``x``: [B,1,S,S] or [B,S,S].
    """
    x2 = x[:, 0] if x.ndim == 4 else x
    stat = gate.get("stat", "mean")
    if stat in OPS_STATS:
        return patch_gate(
            np.ascontiguousarray(x2), recon, visible, patch=int(gate["patch"]), stat=stat,
            topk=int(gate.get("topk", 0)), norm_pix=bool(gate.get("norm_pix", False)), tau=float(gate["tau"]),
            tau_high=float(gate["tau_high"]), t_min=int(gate["t_min"]), t_max=int(gate["t_max"]),
            floor=gate.get("policy", "adaptive") == "floor", return_patch_err=return_patch_err)
    from medfedpure.train.scores import gate_scores

    score, err = gate_scores(x2, recon, visible, patch=int(gate["patch"]), stat=stat, topk=int(gate.get("topk", 0)),
                             norm_pix=bool(gate.get("norm_pix", False)))
    score = np.asarray(score, dtype=np.float32)
    flag, t_star = decide(score, gate)
    return GateResult(score, flag, t_star, np.asarray(err, np.float32) if return_patch_err else None)


class Engine(ABC):
    """A backend: the three networks + the gate, on native arrays.

    Attributes:
        name: ``"onnxruntime"``, ``"torch"`` or ``"tensorrt"``.
        device: ``"cpu"`` or ``"cuda"`` — the device really in use.
        precision: ``"fp32"`` or ``"fp16"`` — of the purifier/MAE/classifier graphs in use.
    """

    name: str = "engine"
    device: str = "cpu"
    precision: str = "fp32"
    #: ``classify`` may run in a second thread while ``mae`` runs (the runtime releases the GIL and
    #: its sessions are safe to call from two threads); the Defender then classifies every scan
    #: speculatively alongside the detector and keeps that answer when nothing is purified.
    overlap_classify: bool = False

    def __init__(self, gate: Mapping[str, Any], visible: np.ndarray, alphas_cumprod: np.ndarray, steps: int) -> None:
        self.gate_cfg = dict(gate)
        self.visible = np.asarray(visible, dtype=bool)
        self.alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        self.steps = int(steps)

    # array plumbing ------------------------------------------------------------------------
    def to_native(self, a: np.ndarray) -> Any:
        return a

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.asarray(a)

    def take(self, a: Any, idx: np.ndarray) -> Any:
        """Rows ``idx`` (int array) of a native batch."""
        return a[idx]

    def put(self, a: Any, idx: np.ndarray, rows: Any) -> Any:
        """A copy of ``a`` with rows ``idx`` replaced by ``rows``."""
        out = a.copy()
        out[idx] = rows
        return out

    def finite_rows(self, a: Any) -> np.ndarray:
        """bool [B]: rows of a native batch with only finite values."""
        arr = self.to_numpy(a)
        return np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)

    # stages --------------------------------------------------------------------------------
    @abstractmethod
    def mae(self, x: Any) -> Any:
        """x [B,1,S,S] in [0,1] → recon [B,K,S,S] (MAE under its K scoring mask sets)."""

    @abstractmethod
    def denoise(self, x_t: Any, t: Any) -> Any:
        """(x_t [B,1,S,S], t [B] float32) → x0_hat [B,1,S,S] ([−1,1] space)."""

    @abstractmethod
    def classify(self, x: Any) -> Any:
        """x [B,1,S,S] in [0,1] → probs [B,C]."""

    def gate(self, x: Any, recon: Any, *, return_patch_err: bool = False, policy: str | None = None) -> GateResult:
        """The fused gate (medfedpure.gate.patch_gate) with the bundle's calibration.

        Statistics that ``medfedpure.gate`` does not (yet) implement as a kernel (e.g. ``hfratio``)
        run on the host through ``medfedpure.train.scores.gate_scores`` — the function the
        calibration used — with the gate's decision rule (:func:`decide`). ``policy`` overrides the
        calibrated policy for this call (``"adaptive"`` / ``"floor"``; None: the bundle's).
        """
        g = self.gate_cfg if policy is None else {**self.gate_cfg, "policy": policy}
        if g.get("stat", "mean") not in OPS_STATS:
            r = host_gate(self.to_numpy(x), self.to_numpy(recon), self.visible, g, return_patch_err=return_patch_err)
            return GateResult(*(None if a is None else self.to_native(a) for a in r))
        return patch_gate(
            x[:, 0], recon, self.visible, patch=int(g["patch"]), stat=g.get("stat", "mean"),
            topk=int(g.get("topk", 0)), norm_pix=bool(g.get("norm_pix", False)), tau=float(g["tau"]),
            tau_high=float(g["tau_high"]), t_min=int(g["t_min"]), t_max=int(g["t_max"]),
            floor=g.get("policy", "adaptive") == "floor", return_patch_err=return_patch_err,
        )

    def purify(self, x: Any, t_star: Any, noise: np.ndarray) -> Any:
        """Purify rows of x at their t* with the given noise (see :func:`purify_numpy`)."""
        return purify_numpy(lambda y, t: self.to_numpy(self.denoise(y, t)), self.to_numpy(x),
                            self.to_numpy(t_star).astype(np.int64), noise, self.alphas_cumprod, self.steps)

    def describe(self) -> dict[str, Any]:
        """What is really running (for Results, logs and benchmarks)."""
        return {"backend": self.name, "device": self.device, "precision": self.precision}
