"""The fused patch gate: per-patch reconstruction error → score → flag → purification strength.

One operation (docs/design.md, "Gate semantics"), three implementations with bit-identical results:

- :func:`patch_gate_reference` — plain numpy, the oracle (``reference``);
- the C++ kernel ``medfedpure._C`` (numpy arrays and torch CPU tensors);
- the CUDA kernel ``medfedpure._C_cuda`` (torch CUDA tensors; one launch per batch, no device sync);

all behind :func:`patch_gate` (``dispatch``). :func:`patch_gate_torch` (``torch_chain``) is the same
computation as a chain of torch ops — the benchmark baseline and what the adaptive attacks
differentiate; it agrees to float rounding, not bit for bit. A site's calibrated parameters are
one :class:`GateSpec` (``spec``); :func:`run_gate` calls the gate with one. The decision rule is
written once per array library in ``decision`` and checked by ``validate`` like every argument.

Symbols:

======================  =====================================================================
``x``                   [B, S, S] preprocessed scans, float32 or float16
``recon``               [B, K, S, S] the MAE's reconstruction under mask set k (float32/16)
``visible``             [K, Np] bool, True where set k showed patch p to the encoder;
                        Np = (S/patch)², patches in row-major order; every patch must be
                        hidden (False) in at least one set
``e[b, p]``             mean over the sets hiding p of the mean squared error over the patch
                        pixels against the target (x, or with ``norm_pix`` the patch minus its
                        mean over sqrt(population variance + 1e-6))
``score[b]``            mean of e over p (``stat="mean"``) or of the ``topk`` largest e
                        (``stat="topk"``; ties broken by the lower patch index), or for
                        ``stat="hfratio"`` / ``"nyqratio"`` the median spectral ratio below
``flag[b]``             score ≥ τ
``t_star[b]``           0 (or t_min under policy "floor") when not flagged, else
                        round(t_min + (t_max − t_min)·clip((score − τ)/(τ_high − τ), 0, 1))
======================  =====================================================================

``stat="hfratio"`` (the detector statistic; why it works: :mod:`medfedpure.gate.reference`).
Pixel-space MAE only (``norm_pix`` is refused), patch ≥ 3. Per patch p, on the pixels of x alone:

    h[p] = mean over the (P−2)² valid positions of (L x)²,  L = [1,−2,1]ᵀ[1,−2,1] / 4
    d[p] = mean over the (P−1)² valid positions of (D x)²,  D = [[1,−1],[−1,1]] / 2
    e[p] = h[p] / (d[p] + 1e-6)                      (returned as ``patch_err``)
    w[p] = mean over the sets hiding p of the mean of recon[b, k] over the patch (tissue level)

score = median of e over the m patches with the largest w (:func:`tissue_patches`; ties: lower
patch index first; the mean of the two middle values when m is even), m = ``topk``, or Np // 2
(at least 1) when ``topk`` is 0.

``stat="nyqratio"``: the same with h[p] replaced by the mean over the (P−7)² valid positions of
(N x)², N = nᵀn with n = [1,−7,21,−35,35,−21,7,−1] / 128 (the 7th-order difference: a sharper
corner-band filter than L, for scanners that keep most of k-space); patch ≥ 8.

Exactness contract (kernels/patch_gate.h): every step is one float32 IEEE operation in a fixed
order (row partials left to right, rows top to bottom, sets in increasing k, scores through the
``lane32`` sum), so all three implementations return identical patch errors and scores. τ and
τ_high are rounded to float32 first; ``flag`` is a float32 comparison; ``t_star`` is computed in
float64 and rounded half up (``floor(v + 0.5)``; v ≥ 0, so half away from zero). Ties at τ
therefore give the same flag everywhere. The hfratio steps are spelled out in patch_gate.h too;
its selection and median are exact for finite inputs (a NaN or inf in x or recon voids the
contract for that scan's hfratio score).

:func:`gate_reduce` (``reduce``) is the second half alone — the same score and decision on per-patch
values a model computed elsewhere (the attack detector's patch logits), in the same three
implementations.
"""

from __future__ import annotations

from medfedpure.gate.decision import POLICIES, decide_numpy, decide_torch
from medfedpure.gate.dispatch import BACKENDS, cuda_kernel_limits_ok, patch_gate, run_gate, run_gate_scores
from medfedpure.gate.reduce import REDUCE_STATS, gate_reduce, gate_reduce_reference, gate_reduce_torch
from medfedpure.gate.reference import WHITE_RATIO, gate_scores, patch_gate_reference, tissue_patches
from medfedpure.gate.spec import GateCalibration, GateSpec
from medfedpure.gate.torch_chain import patch_gate_torch
from medfedpure.gate.validate import LEARNED_STATS, STATS, GateResult

__all__ = [
    "GateResult",
    "GateSpec",
    "GateCalibration",
    "STATS",
    "LEARNED_STATS",
    "POLICIES",
    "BACKENDS",
    "WHITE_RATIO",
    "patch_gate",
    "gate_reduce",
    "gate_reduce_reference",
    "gate_reduce_torch",
    "REDUCE_STATS",
    "patch_gate_reference",
    "patch_gate_torch",
    "run_gate",
    "run_gate_scores",
    "gate_scores",
    "tissue_patches",
    "decide_numpy",
    "decide_torch",
    "cuda_kernel_limits_ok",
]
