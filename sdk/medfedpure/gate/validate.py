"""The gate's inputs and outputs, and the checks every backend shares.

:func:`_validate` turns the arguments of a gate call into a :class:`_Spec` (sizes, the statistic,
τ and τ_high rounded to float32, m for ``hfratio``) or raises a ValueError / TypeError that names
the bad argument and what is expected. The symbols are those of the package docstring
(:mod:`medfedpure.gate`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

STATS: dict[str, int] = {"mean": 0, "topk": 1, "hfratio": 2, "nyqratio": 3}  # codes of medfedpure::GateStat
# The statistics scored as the median of per-patch spectral ratios over the m tissue patches, and the
# smallest patch side each one's filter fits in (3x3 for hfratio's L, 8x8 for nyqratio's 8 taps).
SPECTRAL_STATS: dict[str, int] = {"hfratio": 3, "nyqratio": 8}
DTYPES: dict[str, int] = {"float32": 0, "float16": 1}  # codes of medfedpure::DType
# Statistics scored by a model of their own instead of the MAE's reconstruction: the per-patch logits of
# the attack detector (models.detector), reduced by gate_reduce (the mean of the topk largest).
LEARNED_STATS: tuple[str, ...] = ("learned",)
NORM_EPS = np.float32(1e-6)


class GateResult(NamedTuple):
    """Output of the gate. Arrays are numpy for numpy inputs, torch tensors (on the input's device)
    for torch inputs.

    score      [B] float32, ≥ 0
    flag       [B] bool
    t_star     [B] int32 in {0} ∪ [t_min, t_max]
    patch_err  [B, Np] float32, ≥ 0 — only with ``return_patch_err=True``, else None: the patch
               errors e, or for ``stat="hfratio"`` / ``"nyqratio"`` the spectral ratios e = h / (d + 1e-6)
    """

    score: Any
    flag: Any
    t_star: Any
    patch_err: Any


class _Spec(NamedTuple):
    """A validated gate call: sizes from the arrays, parameters as the kernels take them."""

    batch: int
    sets: int
    size: int
    patch: int
    side: int
    num_patches: int
    stat: str
    topk: int  # for hfratio / nyqratio: m, already resolved (0 → Np // 2)
    tau: np.float32
    tau_high: np.float32
    t_min: int
    t_max: int


def is_torch(a: Any) -> bool:
    return type(a).__module__.startswith("torch") and hasattr(a, "device")


_NP_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}


def dtype_name(a: Any) -> str:
    dt = a.dtype
    if isinstance(dt, np.dtype):
        return _NP_DTYPE_NAMES.get(dt) or dt.name
    return str(dt).removeprefix("torch.")


def to_numpy(a: Any) -> np.ndarray:
    if is_torch(a):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def visible_numpy(visible: Any) -> np.ndarray:
    """visible as a host bool array (a CUDA tensor is copied to the host: pass it from the host)."""
    if is_torch(visible):
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


def hfratio_m(topk: int, num_patches: int) -> int:
    """m of stats ``hfratio`` and ``nyqratio``, the tissue patches whose median is the score: ``topk``, or Np // 2
    (at least 1) when ``topk`` is 0 (kernels/patch_gate.h: ``hfratio_m``)."""
    return int(topk) if topk > 0 else max(1, num_patches // 2)


def check_decision(tau: float, tau_high: float, t_min: int, t_max: int) -> tuple[np.float32, np.float32]:
    """The decision's arguments (finite τ < τ_high after rounding to float32, 0 ≤ t_min ≤ t_max < 2³¹, ints);
    returns (τ, τ_high) as float32. Shared by ``patch_gate`` and ``gate_reduce``."""
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
    return tau32, tau_high32


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
        if dtype_name(a) not in DTYPES:
            raise TypeError(f"{name} has dtype {dtype_name(a)}: expected float32 or float16")
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
    if stat in SPECTRAL_STATS:
        if not 0 <= topk <= num_patches:
            raise ValueError(f"topk = {topk} with stat {stat!r} (m, the tissue patches scored): expected "
                             f"0 <= topk <= Np = {num_patches} (0 = Np // 2)")
        side_min = SPECTRAL_STATS[stat]
        if patch < side_min:
            raise ValueError(f"patch {patch} with stat {stat!r}: its {side_min}x{side_min} corner-band filter needs "
                             f"patches of at least {side_min}x{side_min} pixels (use hfratio for smaller patches)")
        if norm_pix:
            raise ValueError(f"stat {stat!r} needs a pixel-space MAE: norm_pix=True is not supported with it "
                             "(use norm_pix=False)")
    elif stat != "topk" and not 0 <= topk <= num_patches:
        raise ValueError(f"topk = {topk}: expected 0 <= topk <= Np = {num_patches} (it is ignored unless stat='topk')")
    tau32, tau_high32 = check_decision(tau, tau_high, t_min, t_max)
    topk = int(topk)
    if stat in SPECTRAL_STATS:
        topk = hfratio_m(topk, num_patches)
    return _Spec(b, k, s, patch, side, num_patches, stat, topk, tau32, tau_high32, int(t_min), int(t_max))


_SPECS: dict[tuple, _Spec] = {}


def _validate_cached(x: Any, recon: Any, visible: np.ndarray, **kw: Any) -> _Spec:
    """_validate, remembered per (shapes, dtypes, arguments, mask sets): a serving loop calls the
    gate with one configuration, and the checks would otherwise cost as much as the C++ kernel at
    batch 1."""
    key = (tuple(x.shape), tuple(recon.shape), x.dtype, recon.dtype, visible.shape, visible.tobytes(),
           *((type(v), v) for v in kw.values()))
    spec = _SPECS.get(key)
    if spec is None:
        spec = _validate(x, recon, visible, **kw)
        if len(_SPECS) >= 256:
            _SPECS.clear()
        _SPECS[key] = spec
    return spec
