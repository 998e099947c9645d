"""The fused patch gate: per-patch reconstruction error → score → flag → purification strength.

One operation (DESIGN.md §5), three implementations with bit-identical results:

- :func:`patch_gate_reference` — plain numpy, the oracle;
- the C++ kernel ``medfedpure._C`` (numpy arrays and torch CPU tensors);
- the CUDA kernel ``medfedpure._C_cuda`` (torch CUDA tensors; one launch per batch, no device sync);

all behind :func:`patch_gate`. :func:`patch_gate_torch` is the same computation as a chain of
torch ops (the benchmark baseline; it agrees to float rounding, not bit for bit).

Symbols (DESIGN.md §5):

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
                        ``stat="hfratio"`` the median spectral ratio below
``flag[b]``             score ≥ τ
``t_star[b]``           0 (or t_min with ``floor=True``) when not flagged, else
                        round(t_min + (t_max − t_min)·clip((score − τ)/(τ_high − τ), 0, 1))
======================  =====================================================================

``stat="hfratio"`` (the detector statistic of benchmarks/RESULTS.md, "Classifier and detector";
research code: ``medfedpure.train.scores.hfratio_scores``, which this agrees with to float rounding).
Pixel-space MAE only (``norm_pix`` is refused), patch ≥ 3. Per patch p, on the pixels of x alone:

    h[p] = mean over the (P−2)² valid positions of (L x)²,  L = [1,−2,1]ᵀ[1,−2,1] / 4
    d[p] = mean over the (P−1)² valid positions of (D x)²,  D = [[1,−1],[−1,1]] / 2
    e[p] = h[p] / (d[p] + 1e-6)                      (returned as ``patch_err``)
    w[p] = mean over the sets hiding p of the mean of recon[b, k] over the patch (tissue level)

score = median of e over the m patches with the largest w (ties: lower patch index first; the
mean of the two middle values when m is even), m = ``topk``, or Np // 2 (at least 1) when
``topk`` is 0 — equal to the research code's round(Np / 2), since Np is a perfect square.

Exactness contract (kernels/patch_gate.h): every step is one float32 IEEE operation in a fixed
order (row partials left to right, rows top to bottom, sets in increasing k, scores through the
``lane32`` sum), so all three implementations return identical patch errors and scores. τ and
τ_high are rounded to float32 first; ``flag`` is a float32 comparison; ``t_star`` is computed in
float64 and rounded half up (``floor(v + 0.5)``; v ≥ 0, so half away from zero). Ties at τ
therefore give the same flag everywhere. The hfratio steps are spelled out in patch_gate.h too;
its selection and median are exact for finite inputs (a NaN or inf in x or recon voids the
contract for that scan's hfratio score).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import numpy as np

try:  # the compiled CPU kernel; missing only in a source checkout that was never built
    from medfedpure import _C  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - exercised only without a build
    _C = None

try:  # built only where nvcc was found; imports without a GPU or driver (static cudart)
    from medfedpure import _C_cuda  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    _C_cuda = None

__all__ = [
    "GateResult",
    "STATS",
    "BACKENDS",
    "patch_gate",
    "patch_gate_reference",
    "patch_gate_torch",
    "cuda_kernel_limits_ok",
]

STATS: dict[str, int] = {"mean": 0, "topk": 1, "hfratio": 2}  # codes of medfedpure::GateStat
_DTYPES: dict[str, int] = {"float32": 0, "float16": 1}  # codes of medfedpure::DType
BACKENDS = ("auto", "reference", "cpp", "cuda", "torch")
_NORM_EPS = np.float32(1e-6)
_CUDA_MAX_SHARED_FLOATS = 12 * 1024  # patch_gate_cuda.cu: kMaxSharedFloats


class GateResult(NamedTuple):
    """Output of the gate. Arrays are numpy for numpy inputs, torch tensors (on the input's device)
    for torch inputs.

    score      [B] float32, ≥ 0
    flag       [B] bool
    t_star     [B] int32 in {0} ∪ [t_min, t_max]
    patch_err  [B, Np] float32, ≥ 0 — only with ``return_patch_err=True``, else None: the patch
               errors e, or for ``stat="hfratio"`` the spectral ratios e = h / (d + 1e-6)
    """

    score: Any
    flag: Any
    t_star: Any
    patch_err: Any


# --------------------------------------------------------------------------------------------
# validation (shared by every backend)
# --------------------------------------------------------------------------------------------


class _Spec(NamedTuple):
    batch: int
    sets: int
    size: int
    patch: int
    side: int
    num_patches: int
    stat: str
    topk: int
    tau: np.float32
    tau_high: np.float32
    t_min: int
    t_max: int


def _is_torch(a: Any) -> bool:
    return type(a).__module__.startswith("torch") and hasattr(a, "device")


_NP_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}


def _dtype_name(a: Any) -> str:
    dt = a.dtype
    if isinstance(dt, np.dtype):
        return _NP_DTYPE_NAMES.get(dt) or dt.name
    return str(dt).removeprefix("torch.")


def _visible_numpy(visible: Any) -> np.ndarray:
    """visible as a host bool array (a CUDA tensor is copied to the host: pass it from the host)."""
    if _is_torch(visible):
        visible = visible.detach().cpu().numpy()
    v = np.asarray(visible)
    if v.dtype != np.bool_:
        if v.dtype.kind not in "iu" or not np.isin(v, (0, 1)).all():
            raise TypeError(f"visible must be a bool array [K, Np] (True = shown to the encoder), got dtype {v.dtype}")
        v = v.astype(np.bool_)
    return v


_VISIBLE_OK: set[bytes] = set()  # mask sets already checked (they are fixed per model: one check each)


def _check_every_patch_hidden(visible: np.ndarray) -> None:
    key = visible.tobytes() + repr(visible.shape).encode()
    if key in _VISIBLE_OK:
        return
    never_hidden = np.flatnonzero(visible.all(axis=0))
    if never_hidden.size:
        raise ValueError(
            f"patches {never_hidden[:8].tolist()}{'...' if never_hidden.size > 8 else ''} are visible in every "
            "mask set, so they have no reconstruction error: every patch must be hidden (visible False) by at least one set"
        )
    if len(_VISIBLE_OK) >= 64:
        _VISIBLE_OK.clear()
    _VISIBLE_OK.add(key)


def _validate(
    x: Any,
    recon: Any,
    visible: np.ndarray,
    *,
    patch: int,
    stat: str,
    topk: int,
    tau: float,
    tau_high: float,
    t_min: int,
    t_max: int,
    norm_pix: bool = False,
) -> _Spec:
    xs, rs = tuple(x.shape), tuple(recon.shape)
    if len(xs) != 3 or xs[1] != xs[2]:
        raise ValueError(f"x has shape {xs}: expected [B, S, S] (a batch of square preprocessed scans)")
    b, s = xs[0], xs[1]
    if b < 1 or s < 1:
        raise ValueError(f"x has shape {xs}: the batch and the scans must not be empty")
    if len(rs) != 4 or rs[0] != b or rs[2:] != (s, s):
        raise ValueError(f"recon has shape {rs}: expected [B, K, S, S] = [{b}, K, {s}, {s}] to match x {xs}")
    k = rs[1]
    if k < 1:
        raise ValueError("recon has K = 0 mask sets: expected at least one")
    for name, a in (("x", x), ("recon", recon)):
        if _dtype_name(a) not in _DTYPES:
            raise TypeError(f"{name} has dtype {_dtype_name(a)}: expected float32 or float16")
    if isinstance(patch, bool) or not isinstance(patch, (int, np.integer)) or patch < 1:
        raise ValueError(f"patch must be a positive int, got {patch!r}")
    patch = int(patch)
    if s % patch:
        divisors = [d for d in (4, 8, 14, 16, 32) if s % d == 0]
        raise ValueError(f"patch {patch} does not divide the scan size S = {s}: use a divisor of S (e.g. {divisors or [1]})")
    side = s // patch
    num_patches = side * side
    if visible.ndim != 2 or visible.shape != (k, num_patches):
        raise ValueError(
            f"visible has shape {visible.shape}: expected [K, Np] = [{k}, {num_patches}] "
            f"(K from recon, Np = (S/patch)^2 = ({s}/{patch})^2)"
        )
    _check_every_patch_hidden(visible)
    if stat not in STATS:
        raise ValueError(f"stat {stat!r} is unknown: expected one of {sorted(STATS)}")
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)):
        raise ValueError(f"topk must be an int, got {topk!r}")
    if stat == "topk" and not 1 <= topk <= num_patches:
        raise ValueError(f"topk = {topk} with stat 'topk': expected 1 <= topk <= Np = {num_patches}")
    if stat == "hfratio":
        if not 0 <= topk <= num_patches:
            raise ValueError(f"topk = {topk} with stat 'hfratio' (m, the tissue patches scored): expected "
                             f"0 <= topk <= Np = {num_patches} (0 = Np // 2)")
        if patch < 3:
            raise ValueError(f"patch {patch} with stat 'hfratio': the 3x3 corner-band filter needs patches of at least 3x3 pixels")
        if norm_pix:
            raise ValueError("stat 'hfratio' needs a pixel-space MAE: norm_pix=True is not supported with it (use norm_pix=False)")
    elif stat != "topk" and not 0 <= topk <= num_patches:
        raise ValueError(f"topk = {topk}: expected 0 <= topk <= Np = {num_patches} (it is ignored unless stat='topk')")
    if not (math.isfinite(tau) and math.isfinite(tau_high)):
        raise ValueError(f"tau = {tau!r} and tau_high = {tau_high!r} must be finite numbers")
    tau32, tau_high32 = np.float32(tau), np.float32(tau_high)
    if not tau_high32 > tau32:
        raise ValueError(f"tau_high = {tau_high!r} must be > tau = {tau!r} (compared after rounding both to float32)")
    for name, t in (("t_min", t_min), ("t_max", t_max)):
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise ValueError(f"{name} must be an int (a diffusion timestep), got {t!r}")
    if not 0 <= t_min <= t_max <= 2**31 - 1:
        raise ValueError(f"t_min = {t_min}, t_max = {t_max}: expected 0 <= t_min <= t_max < 2^31")
    topk = int(topk)
    if stat == "hfratio" and topk == 0:
        topk = max(1, num_patches // 2)  # = the research code's round(Np/2): Np is a perfect square
    return _Spec(b, k, s, patch, side, num_patches, stat, topk, tau32, tau_high32, int(t_min), int(t_max))


_SPECS: dict[tuple, _Spec] = {}


def _validate_cached(x: Any, recon: Any, visible: np.ndarray, **kw: Any) -> _Spec:
    """_validate, remembered per (shapes, dtypes, arguments, mask sets): a serving loop calls the
    gate with one configuration, and the checks would otherwise cost as much as the C++ kernel at
    batch 1 (~15 µs)."""
    key = (tuple(x.shape), tuple(recon.shape), x.dtype, recon.dtype, visible.shape, visible.tobytes(),
           *((type(v), v) for v in kw.values()))
    spec = _SPECS.get(key)
    if spec is None:
        spec = _validate(x, recon, visible, **kw)
        if len(_SPECS) >= 256:
            _SPECS.clear()
        _SPECS[key] = spec
    return spec


# --------------------------------------------------------------------------------------------
# numpy oracle
# --------------------------------------------------------------------------------------------


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


def _decide(score: np.ndarray, spec: _Spec, floor: bool) -> tuple[np.ndarray, np.ndarray]:
    """float32 score [B] → (flag [B] bool, t_star [B] int32); mirrors gate_decide in patch_gate.h."""
    flag = score >= spec.tau
    frac = (score.astype(np.float64) - np.float64(spec.tau)) / (np.float64(spec.tau_high) - np.float64(spec.tau))
    frac = np.clip(frac, 0.0, 1.0)
    v = np.float64(spec.t_min) + np.float64(spec.t_max - spec.t_min) * frac
    t = np.floor(v + 0.5).astype(np.int32)
    t_star = np.where(flag, t, np.int32(spec.t_min if floor else 0)).astype(np.int32)
    return flag, t_star


def _hidden_mean_seq(v: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """[B, K, Np] → [B, Np]: sum over the hiding sets in increasing k, / their count (float32)."""
    hidden = ~visible
    acc = np.zeros((v.shape[0], v.shape[2]), np.float32)
    for kk in range(v.shape[1]):
        acc = np.where(hidden[kk], acc + v[:, kk], acc)
    return acc / hidden.sum(axis=0).astype(np.float32)


def _hfratio_numpy(xp: np.ndarray, rp: np.ndarray, visible: np.ndarray, spec: _Spec) -> tuple[np.ndarray, np.ndarray]:
    """stat "hfratio" in the contract's float32 order: xp [B, Np, P, P], rp [B, K, Np, P, P] →
    (score [B], e [B, Np]). Mirrors patch_gate.h step for step."""
    p, m = spec.patch, spec.topk
    two, four = np.float32(2), np.float32(4)
    a = (xp[..., :, :-2] - two * xp[..., :, 1:-1]) + xp[..., :, 2:]  # [B, Np, P, P-2]
    lap = ((a[..., :-2, :] - two * a[..., 1:-1, :]) + a[..., 2:, :]) / four  # [B, Np, P-2, P-2]
    h = _patch_sum(lap * lap) / np.float32((p - 2) * (p - 2))
    dia = (((xp[..., :-1, :-1] - xp[..., :-1, 1:]) - xp[..., 1:, :-1]) + xp[..., 1:, 1:]) / two
    d = _patch_sum(dia * dia) / np.float32((p - 1) * (p - 1))
    e = (h / (d + _NORM_EPS)).astype(np.float32)
    w = _hidden_mean_seq(_patch_sum(rp) / np.float32(p * p), visible)  # [B, Np] tissue level
    order = np.argsort(-w, axis=1, kind="stable")[:, :m]  # the m largest w, ties: lower index
    srt = np.sort(np.take_along_axis(e, order, axis=1), axis=1)
    lo, hi = srt[:, (m - 1) // 2], srt[:, m // 2]
    score = lo if m % 2 else (lo + hi) / two
    return score.astype(np.float32), e


def _reference_numpy(x: np.ndarray, recon: np.ndarray, visible: np.ndarray, spec: _Spec, norm_pix: bool, floor: bool):
    b, k, p, side, n = spec.batch, spec.sets, spec.patch, spec.side, spec.num_patches
    p2 = np.float32(p * p)
    xf = np.asarray(x, np.float32)
    rf = np.asarray(recon, np.float32)
    xp = xf.reshape(b, side, p, side, p).transpose(0, 1, 3, 2, 4).reshape(b, n, p, p)
    rp = rf.reshape(b, k, side, p, side, p).transpose(0, 1, 2, 4, 3, 5).reshape(b, k, n, p, p)
    if spec.stat == "hfratio":
        score, err = _hfratio_numpy(xp, rp, visible, spec)
        flag, t_star = _decide(score, spec, floor)
        return score, flag, t_star, err
    if norm_pix:
        mean = (_patch_sum(xp) / p2)[..., None, None]
        dev = xp - mean
        sd = np.sqrt(_patch_sum(dev * dev) / p2 + _NORM_EPS)[..., None, None]
        target = (xp - mean) / sd
    else:
        target = xp
    d = rp - target[:, None]
    err = _hidden_mean_seq(_patch_sum(d * d) / p2, visible)  # [B, Np]
    if spec.stat == "topk":
        order = np.argsort(-err, axis=1, kind="stable")[:, : spec.topk]
        keep = np.zeros_like(err, dtype=bool)
        np.put_along_axis(keep, order, True, axis=1)
        score = _lane32_sum(np.where(keep, err, np.float32(0))) / np.float32(spec.topk)
    else:
        score = _lane32_sum(err) / np.float32(n)
    flag, t_star = _decide(score.astype(np.float32), spec, floor)
    return score.astype(np.float32), flag, t_star, err.astype(np.float32)


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
    """The numpy oracle of :func:`patch_gate` (same arguments; always numpy in and out).

    It performs exactly the float32 operations of the kernels in the same order (module
    docstring), so the C++ and CUDA results must equal it bit for bit.
    """
    vis = _visible_numpy(visible)
    xa, ra = (_to_numpy(a) for a in (x, recon))
    spec = _validate(xa, ra, vis, patch=patch, stat=stat, topk=topk, tau=tau, tau_high=tau_high, t_min=t_min, t_max=t_max,
                     norm_pix=bool(norm_pix))
    score, flag, t_star, err = _reference_numpy(xa, ra, vis, spec, bool(norm_pix), bool(floor))
    return GateResult(score, flag, t_star, err if return_patch_err else None)


def _to_numpy(a: Any) -> np.ndarray:
    if _is_torch(a):
        return a.detach().cpu().numpy()
    return np.asarray(a)


# --------------------------------------------------------------------------------------------
# torch-op chain (baseline)
# --------------------------------------------------------------------------------------------


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
    """The gate as a chain of ordinary torch ops (any device; the CPU/GPU benchmark baseline).

    Same arguments as :func:`patch_gate`; ``visible`` should already be a bool tensor on x's
    device (else it is copied there). Agrees with the oracle to float rounding (torch reduces in
    its own order), so flags can differ only for scores within a few ulps of τ. ``validate=False``
    skips the host-side checks (the benchmark times the bare op chain).
    """
    import torch

    if validate:
        spec = _validate(x, recon, _visible_numpy(visible), patch=patch, stat=stat, topk=topk, tau=tau,
                         tau_high=tau_high, t_min=t_min, t_max=t_max, norm_pix=bool(norm_pix))
        b, k, p, side, n = spec.batch, spec.sets, spec.patch, spec.side, spec.num_patches
    else:
        b, k = recon.shape[0], recon.shape[1]
        p, side = patch, recon.shape[2] // patch
        n = side * side
    if stat == "hfratio" and topk == 0:
        topk = max(1, n // 2)
    if not (_is_torch(visible) and visible.device == x.device and visible.dtype == torch.bool):
        visible = torch.as_tensor(_visible_numpy(visible), device=x.device)
    xp = x.float().reshape(b, side, p, side, p).permute(0, 1, 3, 2, 4).reshape(b, n, p * p)
    rp = recon.float().reshape(b, k, side, p, side, p).permute(0, 1, 2, 4, 3, 5).reshape(b, k, n, p * p)
    hidden = (~visible).float()
    if stat == "hfratio":
        z = xp.reshape(b, n, p, p)
        a = z[..., :, :-2] - 2 * z[..., :, 1:-1] + z[..., :, 2:]
        lap = (a[..., :-2, :] - 2 * a[..., 1:-1, :] + a[..., 2:, :]) / 4
        dia = (z[..., :-1, :-1] - z[..., :-1, 1:] - z[..., 1:, :-1] + z[..., 1:, 1:]) / 2
        err = lap.square().mean(dim=(-1, -2)) / (dia.square().mean(dim=(-1, -2)) + 1e-6)  # e [B, Np]
        w = (rp.mean(dim=-1) * hidden).sum(dim=1) / hidden.sum(dim=0)
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
    tau32, tau_high32 = float(np.float32(tau)), float(np.float32(tau_high))
    flag = score >= tau32
    frac = ((score.double() - tau32) / (tau_high32 - tau32)).clamp(0.0, 1.0)
    t = torch.floor(t_min + (t_max - t_min) * frac + 0.5).to(torch.int32)
    t_star = torch.where(flag, t, torch.full_like(t, t_min if floor else 0))
    return GateResult(score, flag, t_star, err if return_patch_err else None)


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------

_VISIBLE_CACHE: dict[tuple, Any] = {}
_COUNTERS: dict[tuple[int, int], Any] = {}


def cuda_kernel_limits_ok(size: int, patch: int, stat: str, sets: int) -> bool:
    """Whether the CUDA kernel holds this problem (patch_gate_cuda.cu): its shared memory (48 KiB),
    max(K·S + 2·S/P, Np) floats for mean/topk, max(K·S + (2P−3)·S/P, 3·Np) for hfratio, and for
    topk at most 32 patches per thread (threads = K·S rounded up to 32, within [256, 1024]) —
    e.g. S = 224 with P ≥ 4, or S = 512 with P ≥ 8 and K ≤ 8."""
    side = size // patch
    np_ = side * side
    if stat == "hfratio":
        need = max(sets * size + (2 * patch - 3) * side, 3 * np_)
    else:
        need = max(sets * size + 2 * side, np_)
    threads = min(max(-(-sets * size // 32) * 32, 256), 1024)
    return need <= _CUDA_MAX_SHARED_FLOATS and not (stat == "topk" and np_ > 32 * threads)


def _visible_on(device: Any, vis: np.ndarray) -> Any:
    """The uint8 mask sets on `device`, uploaded once per (device, content)."""
    import torch

    key = (str(device), vis.shape, vis.tobytes())
    t = _VISIBLE_CACHE.get(key)
    if t is None:
        if len(_VISIBLE_CACHE) >= 32:
            _VISIBLE_CACHE.clear()
        t = torch.from_numpy(vis.astype(np.uint8)).to(device)
        _VISIBLE_CACHE[key] = t
    return t


def _counters_for(device: Any, stream: int, batch: int) -> Any:
    """Per-(device, stream) ticket counters; zero between launches (the kernel resets them)."""
    import torch

    key = (device.index, stream)
    t = _COUNTERS.get(key)
    if t is None or t.numel() < batch:
        t = torch.zeros(max(batch, 64), dtype=torch.int32, device=device)
        _COUNTERS[key] = t
    return t


def _run_cuda(x: Any, recon: Any, vis: np.ndarray, spec: _Spec, norm_pix: bool, floor: bool, want_err: bool) -> GateResult:
    import torch

    if _C_cuda is None:
        raise RuntimeError("backend 'cuda' needs medfedpure._C_cuda: rebuild with nvcc on PATH (pip install -e .)")
    if recon.device != x.device:
        raise ValueError(f"x is on {x.device} but recon on {recon.device}: put both on the same CUDA device")
    if not cuda_kernel_limits_ok(spec.size, spec.patch, spec.stat, spec.sets):
        raise ValueError(
            f"S = {spec.size}, patch = {spec.patch}, K = {spec.sets}, stat = {spec.stat!r} exceeds the CUDA kernel's shared memory "
            f"({_CUDA_MAX_SHARED_FLOATS} floats): use a larger patch or backend='torch'"
        )
    dev = x.device
    xc, rc = x.detach().contiguous(), recon.detach().contiguous()
    vis_d = _visible_on(dev, vis)
    stream = torch.cuda.current_stream(dev).cuda_stream
    score = torch.empty(spec.batch, dtype=torch.float32, device=dev)
    flag = torch.empty(spec.batch, dtype=torch.bool, device=dev)
    t_star = torch.empty(spec.batch, dtype=torch.int32, device=dev)
    err = torch.empty(spec.batch, spec.num_patches, dtype=torch.float32, device=dev)
    # hfratio: the blocks of a scan leave the tissue levels w [B, Np] here for the scan's last block
    work = torch.empty_like(err) if spec.stat == "hfratio" else None
    counters = _counters_for(dev, stream, spec.batch)
    with torch.cuda.device(dev):
        code = _C_cuda.patch_gate(
            xc.data_ptr(), _DTYPES[_dtype_name(xc)], rc.data_ptr(), _DTYPES[_dtype_name(rc)], vis_d.data_ptr(),
            batch=spec.batch, sets=spec.sets, size=spec.size, patch=spec.patch, stat=STATS[spec.stat],
            topk=spec.topk, norm_pix=norm_pix, tau=float(spec.tau), tau_high=float(spec.tau_high),
            t_min=spec.t_min, t_max=spec.t_max, floor=floor, score=score.data_ptr(), flag=flag.data_ptr(),
            t_star=t_star.data_ptr(), patch_err=err.data_ptr(), counters=counters.data_ptr(), stream=stream,
            work=0 if work is None else work.data_ptr(),
        )
    if code != 0:
        raise RuntimeError(f"patch_gate CUDA launch failed with error {code}: {_C_cuda.error_string(code)}")
    return GateResult(score, flag, t_star, err if want_err else None)


def _run_cpp(x: Any, recon: Any, vis: np.ndarray, spec: _Spec, norm_pix: bool, floor: bool, want_err: bool,
             num_threads: int) -> GateResult:
    torch_in = _is_torch(x)
    xa = np.ascontiguousarray(_to_numpy(x))
    ra = np.ascontiguousarray(_to_numpy(recon))
    score, flag, t_star, err = _C.patch_gate(
        xa, ra, np.ascontiguousarray(vis), patch=spec.patch, stat=STATS[spec.stat], topk=spec.topk,
        norm_pix=norm_pix, tau=float(spec.tau), tau_high=float(spec.tau_high), t_min=spec.t_min,
        t_max=spec.t_max, floor=floor, num_threads=num_threads,
    )
    if torch_in:
        import torch

        score, flag, t_star, err = (torch.from_numpy(a) for a in (score, flag, t_star, err))
    return GateResult(score, flag, t_star, err if want_err else None)


def patch_gate(
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
    backend: str = "auto",
    num_threads: int = 0,
) -> GateResult:
    """Score a batch of scans by MAE reconstruction error and turn it into a purification strength.

    Args:
        x: [B, S, S] preprocessed scans, float32 or float16 (numpy, torch CPU or torch CUDA).
        recon: [B, K, S, S] the MAE's reconstruction under each of the K mask sets (same kind and
            device as x; float32 or float16, independently of x).
        visible: [K, Np] bool, True where set k showed patch p to the encoder; every patch must be
            hidden by at least one set. Best passed from the host (numpy): it is validated there and
            uploaded once per device and content.
        patch: patch side P (divides S; Np = (S/P)², row-major).
        stat: "mean", "topk" or "hfratio" (module docstring). topk: for "topk" the number of
            largest patch errors averaged (1..Np); for "hfratio" m, the number of tissue patches
            whose median ratio is the score (0..Np, 0 = Np // 2); ignored for "mean".
        norm_pix: compare with per-patch normalised targets (MAE normalised-pixel loss); not
            with "hfratio".
        tau, tau_high: flag threshold and the score at which t* reaches t_max (float32, τ_high > τ).
        t_min, t_max: purification timesteps (0 ≤ t_min ≤ t_max); floor: unflagged scans get t_min.
        return_patch_err: also return e [B, Np] (the hfratio ratios for stat "hfratio").
        backend: "auto" (CUDA tensors → CUDA kernel, else C++), "cpp", "cuda", "reference" (numpy
            oracle) or "torch" (torch-op chain).
        num_threads: C++ worker threads over the batch (0: chosen from the work size).

    Returns:
        :class:`GateResult` — numpy arrays for numpy input, torch tensors on x's device for torch
        input. The CUDA path enqueues one kernel on the current stream and never synchronises.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is unknown: expected one of {BACKENDS}")
    if _is_torch(x) != _is_torch(recon):
        raise TypeError("x and recon must both be numpy arrays or both torch tensors")
    if not _is_torch(x):
        x, recon = np.asarray(x), np.asarray(recon)
    on_cuda = _is_torch(x) and x.device.type == "cuda"
    vis = _visible_numpy(visible)
    spec = _validate_cached(x, recon, vis, patch=patch, stat=stat, topk=topk, tau=tau, tau_high=tau_high,
                            t_min=t_min, t_max=t_max, norm_pix=bool(norm_pix))
    norm_pix, floor = bool(norm_pix), bool(floor)
    if backend == "auto":
        if on_cuda:
            backend = "cuda"
        elif _C is not None:
            backend = "cpp"
        else:
            warnings.warn("medfedpure._C is not built: using the slow numpy reference gate (pip install -e . builds it)",
                          RuntimeWarning, stacklevel=2)
            backend = "reference"
    if backend == "cuda":
        if not on_cuda:
            raise ValueError("backend 'cuda' needs torch CUDA tensors for x and recon")
        return _run_cuda(x, recon, vis, spec, norm_pix, floor, return_patch_err)
    if backend == "torch":
        return patch_gate_torch(x, recon, visible, patch=patch, stat=stat, topk=topk, norm_pix=norm_pix, tau=tau,
                                tau_high=tau_high, t_min=t_min, t_max=t_max, floor=floor,
                                return_patch_err=return_patch_err, validate=False)
    if on_cuda:
        raise ValueError(f"backend {backend!r} runs on the host: pass CPU data, or use backend 'cuda'")
    if backend == "cpp":
        if _C is None:
            raise RuntimeError("backend 'cpp' needs medfedpure._C: build it with pip install -e .")
        return _run_cpp(x, recon, vis, spec, norm_pix, floor, return_patch_err, num_threads)
    score, flag, t_star, err = _reference_numpy(_to_numpy(x), _to_numpy(recon), vis, spec, norm_pix, floor)
    if _is_torch(x):
        import torch

        score, flag, t_star, err = (torch.from_numpy(np.ascontiguousarray(a)) for a in (score, flag, t_star, err))
    return GateResult(score, flag, t_star, err if return_patch_err else None)
