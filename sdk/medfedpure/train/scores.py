"""Gate statistics in numpy, from exactly the gate's inputs ``(x, recon, visible)`` (DESIGN.md §5).

``gate_scores(x, recon, visible, patch=…, stat=…)`` → ``(score [B], patch_values [B, Np])``:

- ``"mean"`` / ``"topk"`` — DESIGN.md §5's masked reconstruction error, computed by the gate's own
  oracle ``medfedpure.gate.patch_gate_reference`` (so calibration and deployment agree bit for bit);
- ``"hfratio"`` — the statistic this issue's research selected (benchmarks/RESULTS.md, "Classifier
  and detector"): the **spectral shape of the scan in its tissue patches**, referenced to itself.

Why ``hfratio``. MR images are reconstructed from truncated k-space, so a clean scan — anatomy and
scanner noise alike — holds little energy near the Nyquist corner of the spectrum, while
pixel-space perturbations (ℓ∞ PGD, FGSM) are broadband. The energy *level* cannot separate the
two (scans' noise floors differ by more than ε², which is why the mean masked MAE error scored
AUROC ≈ 0.5), but the *ratio* of corner-band to high-band energy within the same patch does not
depend on the noise level. Per patch p of side P (pixels of the patch only)::

    h[p] = mean over the (P−2)² valid positions of (L x)²,  L = [1,−2,1]ᵀ[1,−2,1] / 4   (corner band)
    d[p] = mean over the (P−1)² valid positions of (D x)²,  D = [[1,−1],[−1,1]] / 2     (high band)
    e[p] = h[p] / (d[p] + 1e-6)                  (white noise: 36/16 = 2.25; band-limited: ≪ 2.25)
    w[p] = mean over the sets k hiding p of the mean of recon[k] over the patch

and ``score`` = the median (numpy's: mean of the two middle values) of ``e`` over the
``m = round(Np · tissue_fraction)`` patches with the largest ``w`` (ties: lower patch index first).
Through ``gate_scores`` / the gate's signature, ``m`` travels as ``topk`` (0 → ``Np / 2``).
``w`` is the MAE's estimate of the tissue level of each patch from its neighbours — the score is
taken in tissue, where the magnitude image is near-Gaussian and band-limited; in the air around
the head the Rician magnitude is itself broadband. The median ignores the few patches whose
anatomy (sharp edges, the skull) has corner-band content of its own.

What the research found (RESULTS.md): computing ``h`` and ``d`` on the MAE *residual* x − recon
instead of on x lowers AUROC at ε = 2/255 from 0.999 to 0.67 (site 0), because the MAE's reconstructions
carry corner-band artefacts of their own (patch seams, decoder texture). So the MAE contributes the
tissue map, and the spectral test is on the scan.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["gate_scores", "hfratio_scores", "tissue_patches", "STATS", "WHITE_RATIO"]

STATS = ("mean", "topk", "hfratio")
_EPS = np.float32(1e-6)
# e for white noise: E[(L n)²] = σ²·(1+4+1)²/16 = 36σ²/16, E[(D n)²] = σ²·4/4 = σ²  → 2.25.
WHITE_RATIO = 2.25


def _patches(a: np.ndarray, patch: int) -> np.ndarray:
    """``[..., S, S] -> [..., Np, P, P]`` (row-major patches)."""
    *lead, s, _ = a.shape
    g = s // patch
    a = a.reshape(*lead, g, patch, g, patch)
    n = len(lead)
    return np.moveaxis(a, n + 2, n + 1).reshape(*lead, g * g, patch, patch)


def _hidden_mean(v: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Mean over the sets that hide each patch: ``v [B,K,Np]``, ``visible [K,Np]`` → ``[B,Np]``."""
    hidden = ~visible
    return (v * hidden[None]).sum(axis=1) / hidden.sum(axis=0)[None].astype(v.dtype)


def hfratio_scores(x: np.ndarray, recon: np.ndarray, visible: np.ndarray, *, patch: int,
                   tissue_fraction: float = 0.5, aggregate: str = "median",
                   residual: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The ``hfratio`` statistic (module docstring). ``x [B,S,S]``, ``recon [B,K,S,S]`` (pixel space),
    ``visible [K,Np]`` bool → ``(score [B] float32, e [B,Np] float32)``.

    ``tissue_fraction``: share of patches (largest reconstructed level) that enter the score.
    ``aggregate``: ``"median"`` (the gate's) or ``"mean"`` over those patches.
    ``residual``: research variant — filter the MAE residual ``x − recon_k`` (mean over the hiding
    sets) instead of ``x``.
    """
    if patch < 3:
        raise ValueError(f"patch={patch}: hfratio needs patches of at least 3×3 pixels")
    if not 0 < tissue_fraction <= 1:
        raise ValueError(f"tissue_fraction={tissue_fraction}: must be in (0, 1]")
    if aggregate not in ("median", "mean"):
        raise ValueError(f"aggregate={aggregate!r}: use 'median' or 'mean'")
    xf = np.asarray(x, np.float32)
    rf = np.asarray(recon, np.float32)
    if xf.ndim != 3 or rf.ndim != 4 or rf.shape[0] != xf.shape[0] or rf.shape[2:] != xf.shape[1:]:
        raise ValueError(f"x {xf.shape} / recon {rf.shape}: expected [B,S,S] and [B,K,S,S]")
    xp = _patches(xf, patch)                       # [B, Np, P, P]
    rp = _patches(rf, patch)                       # [B, K, Np, P, P]
    z = xp[:, None] - rp if residual else xp[:, None]
    a = z[..., :, :-2] - 2 * z[..., :, 1:-1] + z[..., :, 2:]
    lap = (a[..., :-2, :] - 2 * a[..., 1:-1, :] + a[..., 2:, :]) / np.float32(4)
    dia = (z[..., :-1, :-1] - z[..., :-1, 1:] - z[..., 1:, :-1] + z[..., 1:, 1:]) / np.float32(2)
    h, d = (lap * lap).mean(axis=(-1, -2)), (dia * dia).mean(axis=(-1, -2))
    if residual:
        h, d = _hidden_mean(h, visible), _hidden_mean(d, visible)
    else:
        h, d = h[:, 0], d[:, 0]
    e = (h / (d + _EPS)).astype(np.float32)
    m = max(1, int(round(tissue_fraction * e.shape[1])))
    sel = np.take_along_axis(e, _tissue_order(rp, visible, m), axis=1)
    score = np.median(sel, axis=1) if aggregate == "median" else sel.mean(axis=1)
    return score.astype(np.float32), e


def tissue_patches(recon: np.ndarray, visible: np.ndarray, *, patch: int, m: int) -> np.ndarray:
    """Indices ``[B, m]`` of the patches ``hfratio`` scores: the m with the largest tissue level w (mean of
    ``recon [B,K,S,S]`` over each patch and the sets hiding it), ties to the lower patch index."""
    return _tissue_order(_patches(np.asarray(recon, np.float32), patch), np.asarray(visible, bool), m)


def _tissue_order(rp: np.ndarray, visible: np.ndarray, m: int) -> np.ndarray:
    """``tissue_patches`` from the reconstruction already cut into patches ``rp [B,K,Np,P,P]``."""
    w = _hidden_mean(rp.mean(axis=(-1, -2)), visible)
    return np.argsort(-w, axis=1, kind="stable")[:, :m]


def gate_scores(x: Any, recon: Any, visible: Any, *, patch: int, stat: str = "mean", topk: int = 0,
                norm_pix: bool = False, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    """Score ``[B]`` and per-patch values ``[B, Np]`` of ``stat`` for a batch (numpy or torch in)."""
    def np_(a: Any) -> np.ndarray:
        return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)

    x, recon, visible = np_(x), np_(recon), np_(visible).astype(bool)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    research_variant = stat == "hfratio" and (kw.get("aggregate", "median") != "median" or kw.get("residual", False)
                                              or "tissue_fraction" in kw)
    if stat in ("mean", "topk") or (stat == "hfratio" and not research_variant):
        # The gate's own oracle, so that calibration and deployment agree bit for bit.
        from medfedpure.gate import patch_gate_reference

        r = patch_gate_reference(x.astype(np.float32), recon.astype(np.float32), visible, patch=patch, stat=stat,
                                 topk=topk, norm_pix=norm_pix, tau=0.0, tau_high=1.0, t_min=0, t_max=0,
                                 return_patch_err=True)
        return np.asarray(r.score), np.asarray(r.patch_err)
    if stat == "hfratio":
        if norm_pix:
            raise ValueError("stat 'hfratio' needs a pixel-space MAE (norm_pix=False)")
        if topk:  # the gate's topk argument carries m, the number of tissue patches scored
            n = visible.shape[1]
            if not 1 <= topk <= n:
                raise ValueError(f"topk={topk} with stat 'hfratio': expected 1 <= topk <= Np = {n}")
            kw = {**kw, "tissue_fraction": topk / n}
        return hfratio_scores(x, recon, visible, patch=patch, **kw)
    raise ValueError(f"stat {stat!r} is unknown: expected one of {STATS}")
