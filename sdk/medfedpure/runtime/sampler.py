"""The purifier's sampler on numpy: the torch-free mirror of ``models.diffusion.purify``.

:func:`purify_numpy` is :func:`medfedpure.models.diffusion.purify` written on numpy, so a
runtime without torch (onnxruntime, TensorRT) can run it around its denoiser graph: DiffPure
forward noising to t* (``models.diffusion.forward_noise``), then K DDIM (η = 0) steps on the
uniform grid t_i = t*·(K − i)/K in EDM's scaled variable (``models.diffusion.ddim_sample``).
:func:`interp_alpha_bar` mirrors ``models.diffusion.interp_alphas_cumprod``. The two pairs are
kept in step by tests (tests/test_engines.py) that run both on the same network and noise.

The manifest's ``purifier.sampler`` names this algorithm (:data:`SAMPLER`); a bundle naming
another sampler is refused when its manifest is read (:mod:`medfedpure.runtime.manifest`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["SAMPLER", "SAMPLERS", "interp_alpha_bar", "purify_numpy"]

SAMPLER = "ddim_eta0_uniform"  # the manifest's purifier.sampler this code implements
SAMPLERS = (SAMPLER,)  # every sampler the runtime implements


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
