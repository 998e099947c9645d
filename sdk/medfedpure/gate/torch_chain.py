"""The gate as a chain of ordinary torch ops: any device, differentiable w.r.t. x and recon.

It is the CPU/GPU benchmark baseline and what the adaptive attacks differentiate (the score is a
smooth function of x and recon except at the order statistics; the decision is discrete and passes
no gradient). It agrees with the oracle to float rounding, not bit for bit: torch reduces in its
own order, so flags can differ only for scores within a few ulps of τ.
"""

from __future__ import annotations

from typing import Any

from medfedpure.gate.decision import decide_torch
from medfedpure.gate.reference import NYQ_TAPS
from medfedpure.gate.validate import SPECTRAL_STATS, GateResult, _validate, hfratio_m, is_torch, visible_numpy

__all__ = ["patch_gate_torch"]


def _diff8(z: Any, taps: Any, axis: int) -> Any:
    """Σ_t taps[t]·z[..., t + j] along ``axis`` (-1 or -2): [..., P, P] → that axis P − 7 long."""
    n = z.shape[axis] - 7
    out = 0
    for t in range(8):
        out = out + taps[t] * (z[..., t:t + n] if axis == -1 else z[..., t:t + n, :])
    return out


def patch_gate_torch(
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
    validate: bool = True,
) -> GateResult:
    """The gate as a chain of torch ops: x [B, S, S], recon [B, K, S, S] torch tensors → :class:`GateResult`
    of torch tensors on x's device (score [B] float32 with autograd history, flag [B] bool, t_star [B]
    int32, patch_err [B, Np] float32 or None).

    Same arguments as :func:`medfedpure.gate.patch_gate`; ``visible`` should already be a bool tensor
    on x's device (else it is copied there). ``validate=False`` skips the host-side checks (the
    benchmark times the bare op chain).
    """
    import torch

    if validate:
        spec = _validate(x, recon, visible_numpy(visible), patch=patch, stat=stat, topk=topk, tau=tau,
                         tau_high=tau_high, t_min=t_min, t_max=t_max, norm_pix=bool(norm_pix))
        b, k, p, side, n = spec.batch, spec.sets, spec.patch, spec.side, spec.num_patches
    else:
        b, k = recon.shape[0], recon.shape[1]
        p, side = patch, recon.shape[2] // patch
        n = side * side
    if stat in SPECTRAL_STATS:
        topk = hfratio_m(topk, n)
    if not (is_torch(visible) and visible.device == x.device and visible.dtype == torch.bool):
        # a copy: the bundle's mask sets are read-only arrays, which torch will not wrap
        visible = torch.tensor(visible_numpy(visible), device=x.device)
    xp = x.float().reshape(b, side, p, side, p).permute(0, 1, 3, 2, 4).reshape(b, n, p * p)
    rp = recon.float().reshape(b, k, side, p, side, p).permute(0, 1, 2, 4, 3, 5).reshape(b, k, n, p * p)
    hidden = (~visible).float()
    if stat in SPECTRAL_STATS:
        z = xp.reshape(b, n, p, p)
        if stat == "hfratio":
            a = z[..., :, :-2] - 2 * z[..., :, 1:-1] + z[..., :, 2:]
            hp = (a[..., :-2, :] - 2 * a[..., 1:-1, :] + a[..., 2:, :]) / 4  # L z [B, Np, P-2, P-2]
        else:  # nyqratio: the 8-tap 7th-order difference along rows, then columns
            taps = torch.tensor(NYQ_TAPS, dtype=z.dtype, device=z.device) / 128
            hp = _diff8(_diff8(z, taps, -1), taps, -2)  # [B, Np, P-7, P-7]
        dia = (z[..., :-1, :-1] - z[..., :-1, 1:] - z[..., 1:, :-1] + z[..., 1:, 1:]) / 2
        err = hp.square().mean(dim=(-1, -2)) / (dia.square().mean(dim=(-1, -2)) + 1e-6)  # e [B, Np]
        w = (rp.mean(dim=-1) * hidden).sum(dim=1) / hidden.sum(dim=0)  # tissue level [B, Np]
        idx = torch.sort(w, dim=1, descending=True, stable=True).indices[:, :topk]
        srt = err.gather(1, idx).sort(dim=1).values
        score = (srt[:, (topk - 1) // 2] + srt[:, topk // 2]) / 2
    else:
        if norm_pix:
            mean = xp.mean(dim=-1, keepdim=True)
            var = xp.var(dim=-1, unbiased=False, keepdim=True)
            xp = (xp - mean) / torch.sqrt(var + 1e-6)
        m = (rp - xp.unsqueeze(1)).square().mean(dim=-1)  # [B, K, Np]
        err = (m * hidden).sum(dim=1) / hidden.sum(dim=0)
        score = err.topk(topk, dim=1).values.mean(dim=1) if stat == "topk" else err.mean(dim=1)
    flag, t_star = decide_torch(score, tau, tau_high, t_min, t_max, floor)
    return GateResult(score, flag, t_star, err if return_patch_err else None)
