"""The numpy oracle of the gate: exactly the float32 operations of kernels/patch_gate.h, in the same
order (the exactness contract of :mod:`medfedpure.gate`), so the C++ and CUDA kernels must equal it
bit for bit.

Besides :func:`patch_gate_reference` it gives the two pieces that calibration and the evasion attack
need from the same code: :func:`gate_scores` (score and patch values of a statistic, without a
decision) and :func:`tissue_patches` (the patches that ``hfratio`` scores: one tissue selection).

Why ``hfratio``. MR images are reconstructed from truncated k-space, so a clean scan — anatomy and
scanner noise alike — holds little energy near the Nyquist corner of the spectrum, while
pixel-space perturbations (ℓ∞ PGD, FGSM) are broadband. The energy *level* cannot separate the two
(scans' noise floors differ by more than ε²), but the *ratio* of corner-band to high-band energy
within one patch does not depend on the noise level: for white noise it is
:data:`WHITE_RATIO` = 36/16 (the gain of L over the gain of D), for a band-limited scan far less.
The ratio is taken in tissue — the patches the MAE reconstructs brightest from their neighbours —
where the magnitude image is near-Gaussian and band-limited (in the air around the head the Rician
magnitude is itself broadband), and its median ignores the few patches whose anatomy (sharp edges,
the skull) has corner-band content of its own. It is computed on x, not on the MAE residual: the
MAE's reconstructions carry corner-band artefacts of their own (patch seams, decoder texture).

Why ``nyqratio``. The 3x3 filter L of ``hfratio`` is a poor band selector: its gain at 0.39 cycles
per pixel along both axes is still 0.78 of its peak, so on a scanner that keeps most of k-space the
band-limited noise just inside the cut-off fills h and the ratio hardly moves under attack.
``nyqratio`` replaces L by the 7th-order binomial difference along both axes (8 taps: the
binomially tapered Nyquist-corner coefficient of an 8x8 window), whose gain is sin¹⁴(πf) per axis:
0.42 of its peak at 0.39 cycles per pixel, 0.05 at 0.3. Same tissue selection and median; for white
noise its ratio is :data:`NYQ_WHITE_RATIO`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medfedpure.gate.decision import decide_numpy
from medfedpure.gate.validate import (
    NORM_EPS,
    SPECTRAL_STATS,
    GateResult,
    _check_every_patch_hidden,
    _Spec,
    _validate,
    hfratio_m,
    to_numpy,
    visible_numpy,
)

__all__ = ["patch_gate_reference", "gate_scores", "tissue_patches", "WHITE_RATIO", "NYQ_WHITE_RATIO", "NYQ_TAPS"]

# hfratio's e for white noise: E[(L n)²] = σ²·(1+4+1)²/16 = 36σ²/16, E[(D n)²] = σ²·4/4 = σ² → 2.25.
WHITE_RATIO = 2.25
# nyqratio's taps: the 7th-order difference (−1)^t·C(7, t), t = 0..7, then / 128 (per axis).
NYQ_TAPS = (1, -7, 21, -35, 35, -21, 7, -1)
# nyqratio's e for white noise: E[q²] = σ²·(ΣC(7,t)²/128²)² = σ²·(3432/16384)², E[(D n)²] = σ².
NYQ_WHITE_RATIO = (3432 / 16384) ** 2


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """Left-to-right float32 sum over the last axis (not numpy's pairwise sum)."""
    s = np.zeros(a.shape[:-1], np.float32)
    for i in range(a.shape[-1]):
        s = s + a[..., i]
    return s


def _patch_sum(a: np.ndarray) -> np.ndarray:
    """[..., P(rows), P(cols)] → [...]: row partials left to right, then rows top to bottom."""
    return _seq_sum(_seq_sum(a))


def _lane32_sum(v: np.ndarray) -> np.ndarray:
    """[B, n] → [B]: 32 strided sequential partial sums, then a halving tree (a warp reduction)."""
    b, n = v.shape
    pad = (-n) % 32
    lanes = np.concatenate([v, np.zeros((b, pad), np.float32)], axis=1).reshape(b, -1, 32)
    part = _seq_sum(lanes.transpose(0, 2, 1))  # [B, 32]
    w = 16
    while w >= 1:
        part = part[:, :w] + part[:, w : 2 * w]
        w //= 2
    return part[:, 0]


def _hidden_mean_seq(v: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """[B, K, Np] → [B, Np]: sum over the hiding sets in increasing k, / their count (float32)."""
    hidden = ~visible
    acc = np.zeros((v.shape[0], v.shape[2]), np.float32)
    for kk in range(v.shape[1]):
        acc = np.where(hidden[kk], acc + v[:, kk], acc)
    return acc / hidden.sum(axis=0).astype(np.float32)


def _patches(a: np.ndarray, patch: int) -> np.ndarray:
    """[..., S, S] float32 → [..., Np, P, P] (row-major patches)."""
    *lead, s, _ = a.shape
    side = s // patch
    n = len(lead)
    a = a.reshape(*lead, side, patch, side, patch)
    return np.moveaxis(a, n + 2, n + 1).reshape(*lead, side * side, patch, patch)


def _tissue_order(rp: np.ndarray, visible: np.ndarray, m: int) -> np.ndarray:
    """rp [B, K, Np, P, P] → indices [B, m] of the m patches with the largest tissue level w (the
    mean of recon over the patch, then over the sets hiding it, in the contract's order); ties to the
    lower patch index."""
    p = rp.shape[-1]
    w = _hidden_mean_seq(_patch_sum(rp) / np.float32(p * p), visible)  # [B, Np]
    return np.argsort(-w, axis=1, kind="stable")[:, :m]


def _diag_energy(xp: np.ndarray) -> np.ndarray:
    """d [B, Np]: patch mean of g², g = (((z(i,j) − z(i,j+1)) − z(i+1,j)) + z(i+1,j+1)) / 2."""
    p = xp.shape[-1]
    dia = (((xp[..., :-1, :-1] - xp[..., :-1, 1:]) - xp[..., 1:, :-1]) + xp[..., 1:, 1:]) / np.float32(2)
    return _patch_sum(dia * dia) / np.float32((p - 1) * (p - 1))


def _nyq_diff(a: np.ndarray, axis: int) -> np.ndarray:
    """The 7th-order difference along ``axis`` (-1 columns, -2 rows) in the contract's order:
    ((((((z0 − 7·z1) + 21·z2) − 35·z3) + 35·z4) − 21·z5) + 7·z6) − z7, then / 128 (float32)."""
    n = a.shape[axis] - 7
    tap = (lambda t: a[..., t:t + n]) if axis == -1 else (lambda t: a[..., t:t + n, :])
    acc = tap(0)
    for t in range(1, 8):
        c = NYQ_TAPS[t]
        acc = acc + np.float32(c) * tap(t) if c > 0 else acc - np.float32(-c) * tap(t)
    return acc / np.float32(128)


def _spectral_numpy(xp: np.ndarray, rp: np.ndarray, visible: np.ndarray, spec: _Spec) -> tuple[np.ndarray, np.ndarray]:
    """stats "hfratio" and "nyqratio" in the contract's float32 order: xp [B, Np, P, P], rp [B, K, Np, P, P] →
    (score [B], e [B, Np]). Mirrors patch_gate.h step for step."""
    p, m = spec.patch, spec.topk
    two, four = np.float32(2), np.float32(4)
    if spec.stat == "hfratio":
        a = (xp[..., :, :-2] - two * xp[..., :, 1:-1]) + xp[..., :, 2:]  # [B, Np, P, P-2]
        lap = ((a[..., :-2, :] - two * a[..., 1:-1, :]) + a[..., 2:, :]) / four  # [B, Np, P-2, P-2]
        h = _patch_sum(lap * lap) / np.float32((p - 2) * (p - 2))
    else:  # nyqratio: rows first (along j), then columns (along i)
        q = _nyq_diff(_nyq_diff(xp, -1), -2)  # [B, Np, P-7, P-7]
        h = _patch_sum(q * q) / np.float32((p - 7) * (p - 7))
    d = _diag_energy(xp)
    e = (h / (d + NORM_EPS)).astype(np.float32)
    order = _tissue_order(rp, visible, m)  # the m largest w, ties: lower index
    srt = np.sort(np.take_along_axis(e, order, axis=1), axis=1)
    lo, hi = srt[:, (m - 1) // 2], srt[:, m // 2]
    score = lo if m % 2 else (lo + hi) / two
    return score.astype(np.float32), e


def _score_numpy(x: np.ndarray, recon: np.ndarray, visible: np.ndarray, spec: _Spec,
                 norm_pix: bool) -> tuple[np.ndarray, np.ndarray]:
    """(score [B] float32, patch values [B, Np] float32) of a validated call."""
    p = spec.patch
    p2 = np.float32(p * p)
    xp = _patches(np.asarray(x, np.float32), p)  # [B, Np, P, P]
    rp = _patches(np.asarray(recon, np.float32), p)  # [B, K, Np, P, P]
    if spec.stat in SPECTRAL_STATS:
        return _spectral_numpy(xp, rp, visible, spec)
    if norm_pix:
        mean = (_patch_sum(xp) / p2)[..., None, None]
        dev = xp - mean
        sd = np.sqrt(_patch_sum(dev * dev) / p2 + NORM_EPS)[..., None, None]
        target = (xp - mean) / sd
    else:
        target = xp
    d = rp - target[:, None]
    err = _hidden_mean_seq(_patch_sum(d * d) / p2, visible)  # [B, Np]
    return _reduce_numpy(err, spec.stat, spec.topk), err.astype(np.float32)


def _reduce_numpy(err: np.ndarray, stat: str, topk: int) -> np.ndarray:
    """[B, Np] float32 → score [B] float32 of stat "mean" or "topk": the lane32 sum of the values (for topk
    the ``topk`` largest, ties to the lower patch index, the others 0) over Np or topk."""
    if stat == "topk":
        order = np.argsort(-err, axis=1, kind="stable")[:, :topk]
        keep = np.zeros_like(err, dtype=bool)
        np.put_along_axis(keep, order, True, axis=1)
        score = _lane32_sum(np.where(keep, err, np.float32(0))) / np.float32(topk)
    else:
        score = _lane32_sum(err) / np.float32(err.shape[1])
    return score.astype(np.float32)


def _reference_numpy(x: np.ndarray, recon: np.ndarray, visible: np.ndarray, spec: _Spec, norm_pix: bool,
                     floor: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(score, flag, t_star, patch values) of a validated call."""
    score, err = _score_numpy(x, recon, visible, spec, norm_pix)
    flag, t_star = decide_numpy(score, spec.tau, spec.tau_high, spec.t_min, spec.t_max, floor)
    return score, flag, t_star, err


def patch_gate_reference(
    x: Any,
    recon: Any,
    visible: Any,
    *,
    patch: int,
    stat: str = "mean",
    topk: int = 0,
    norm_pix: bool = False,
    tau: float,
    tau_high: float,
    t_min: int,
    t_max: int,
    floor: bool = False,
    return_patch_err: bool = False,
) -> GateResult:
    """The numpy oracle of :func:`medfedpure.gate.patch_gate` (same arguments; always numpy in and out).

    It performs exactly the float32 operations of the kernels in the same order (package
    docstring), so the C++ and CUDA results must equal it bit for bit.
    """
    vis = visible_numpy(visible)
    xa, ra = to_numpy(x), to_numpy(recon)
    spec = _validate(xa, ra, vis, patch=patch, stat=stat, topk=topk, tau=tau, tau_high=tau_high, t_min=t_min, t_max=t_max,
                     norm_pix=bool(norm_pix))
    score, flag, t_star, err = _reference_numpy(xa, ra, vis, spec, bool(norm_pix), bool(floor))
    return GateResult(score, flag, t_star, err if return_patch_err else None)


def _host_float32(a: Any) -> np.ndarray:
    return np.ascontiguousarray(to_numpy(a), dtype=np.float32)


def gate_scores(x: Any, recon: Any, visible: Any, *, patch: int, stat: str = "mean", topk: int = 0,
                norm_pix: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The gate's statistic without a decision, from the oracle: what calibration thresholds.

    x [B, S, S] or [B, 1, S, S], recon [B, K, S, S], visible [K, Np] bool (numpy or torch, any float
    dtype: computed in float32) → (score [B] float32, patch values [B, Np] float32: the patch errors
    e, or the hfratio ratios). ``stat`` / ``topk`` / ``norm_pix`` as in :func:`patch_gate_reference`.
    """
    xa = _host_float32(x)
    if xa.ndim == 4 and xa.shape[1] == 1:
        xa = xa[:, 0]
    r = patch_gate_reference(xa, _host_float32(recon), visible, patch=patch, stat=stat, topk=topk, norm_pix=norm_pix,
                             tau=0.0, tau_high=1.0, t_min=0, t_max=0, return_patch_err=True)
    return r.score, r.patch_err


def tissue_patches(recon: Any, visible: Any, *, patch: int, m: int = 0) -> np.ndarray:
    """Indices [B, m] (int64) of the patches stat ``hfratio`` scores: the m with the largest tissue level
    w — the mean of recon [B, K, S, S] over each patch and the sets hiding it, computed as the kernels
    do — ties to the lower patch index. ``m`` 0 means Np // 2, as for the gate's ``topk``."""
    ra = _host_float32(recon)
    vis = visible_numpy(visible)
    if ra.ndim != 4 or ra.shape[2] != ra.shape[3]:
        raise ValueError(f"recon has shape {ra.shape}: expected [B, K, S, S]")
    if isinstance(patch, bool) or not isinstance(patch, (int, np.integer)) or patch < 1 or ra.shape[-1] % patch:
        raise ValueError(f"patch {patch!r} must be a positive int dividing the scan size S = {ra.shape[-1]}")
    n = (ra.shape[-1] // patch) ** 2
    if vis.shape != (ra.shape[1], n):
        raise ValueError(f"visible has shape {vis.shape}: expected [K, Np] = [{ra.shape[1]}, {n}]")
    _check_every_patch_hidden(vis)
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 0 <= m <= n:
        raise ValueError(f"m = {m!r}: expected an int in [0, Np = {n}] (0 = Np // 2)")
    return _tissue_order(_patches(ra, patch), vis, hfratio_m(int(m), n))
