"""Dispatch of :func:`patch_gate` to the numpy oracle, the C++ kernel ``medfedpure._C`` or the CUDA
kernel ``medfedpure._C_cuda`` (or the torch-op chain), and :func:`run_gate`, the call with a
:class:`~medfedpure.gate.spec.GateSpec`.

Repeated host calls with numpy arrays go straight to a prepared C++ call (``_C.Prepared``) cached per
shape, dtype, mask sets and arguments, so that validation runs once per configuration. The CUDA path
keeps per-device caches (the mask sets uploaded once per content, the ticket counters
per stream) so that a call enqueues one kernel and never synchronises.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from medfedpure.gate.reference import _reference_numpy
from medfedpure.gate.spec import GateSpec
from medfedpure.gate.torch_chain import patch_gate_torch
from medfedpure.gate.validate import (
    DTYPES,
    LEARNED_STATS,
    SPECTRAL_STATS,
    STATS,
    GateResult,
    _Spec,
    _validate_cached,
    dtype_name,
    is_torch,
    to_numpy,
    visible_numpy,
)

try:  # the compiled CPU kernel; missing only in a source checkout that was never built
    from medfedpure import _C  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - exercised only without a build
    _C = None

try:  # built only where nvcc was found; imports without a GPU or driver (static cudart)
    from medfedpure import _C_cuda  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    _C_cuda = None

__all__ = ["BACKENDS", "patch_gate", "run_gate", "run_gate_scores", "cuda_kernel_limits_ok"]

BACKENDS = ("auto", "reference", "cpp", "cuda", "torch")
_CUDA_MAX_SHARED_FLOATS = 12 * 1024  # patch_gate_cuda.cu: kMaxSharedFloats

_VISIBLE_CACHE: dict[tuple, Any] = {}
_COUNTERS: dict[tuple[int, int], Any] = {}
_HOST_CALLS: dict[tuple, Any] = {}  # validated numpy calls -> their _C.Prepared kernel call


def cuda_kernel_limits_ok(size: int, patch: int, stat: str, sets: int) -> bool:
    """Whether the CUDA kernel holds this problem (patch_gate_cuda.cu): its shared memory (48 KiB),
    max(K·S + 2·S/P, Np) floats for mean/topk, max(K·S + (2P−3)·S/P, 3·Np) for hfratio (2P−8 for
    nyqratio), and for topk at most 32 patches per thread (threads = K·S rounded up to 32, within [256, 1024]) —
    e.g. S = 224 with P ≥ 4, or S = 512 with P ≥ 8 and K ≤ 8."""
    side = size // patch
    np_ = side * side
    if stat in SPECTRAL_STATS:
        need = max(sets * size + (2 * patch - (3 if stat == "hfratio" else 8)) * side, 3 * np_)
    else:
        need = max(sets * size + 2 * side, np_)
    threads = min(max(-(-sets * size // 32) * 32, 256), 1024)
    return need <= _CUDA_MAX_SHARED_FLOATS and not (stat == "topk" and np_ > 32 * threads)


def auto_backend(on_cuda: bool) -> str:
    """Backend "auto": the CUDA kernel for CUDA data, else the C++ kernel, else (unbuilt) the numpy oracle with a
    warning."""
    if on_cuda:
        return "cuda"
    if _C is not None:
        return "cpp"
    warnings.warn("medfedpure._C is not built: using the slow numpy reference gate (pip install -e . builds it)",
                  RuntimeWarning, stacklevel=3)
    return "reference"


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
    # hfratio / nyqratio: the blocks of a scan leave the tissue levels w [B, Np] here for its last block
    work = torch.empty_like(err) if spec.stat in SPECTRAL_STATS else None
    counters = _counters_for(dev, stream, spec.batch)
    with torch.cuda.device(dev):
        code = _C_cuda.patch_gate(
            xc.data_ptr(), DTYPES[dtype_name(xc)], rc.data_ptr(), DTYPES[dtype_name(rc)], vis_d.data_ptr(),
            batch=spec.batch, sets=spec.sets, size=spec.size, patch=spec.patch, stat=STATS[spec.stat],
            topk=spec.topk, norm_pix=norm_pix, tau=float(spec.tau), tau_high=float(spec.tau_high),
            t_min=spec.t_min, t_max=spec.t_max, floor=floor, score=score.data_ptr(), flag=flag.data_ptr(),
            t_star=t_star.data_ptr(), patch_err=err.data_ptr(), counters=counters.data_ptr(), stream=stream,
            work=0 if work is None else work.data_ptr(),
        )
    if code != 0:
        raise RuntimeError(f"patch_gate CUDA launch failed with error {code}: {_C_cuda.error_string(code)}")
    return GateResult(score, flag, t_star, err if want_err else None)


def _host_fast(x: np.ndarray, recon: Any, visible: Any, num_threads: int, args: tuple) -> tuple | None:
    """The C++ call for C-contiguous numpy x [B, S, S] and recon [B, K, S, S] and a numpy bool visible
    [K, Np] whose shapes, dtypes, mask sets and arguments (``args``: values with their types) were
    validated before: (score, flag, t_star, patch_err) numpy arrays. None when this call is not such a
    repeat (first call, other array kinds, non-contiguous data): :func:`patch_gate` then takes its
    full path. A serving loop repeats one configuration, and the full checks cost as much as the
    kernel itself at batch 1."""
    if (type(recon) is not np.ndarray or type(visible) is not np.ndarray or not x.flags.c_contiguous
            or not recon.flags.c_contiguous or not visible.flags.c_contiguous):
        return None
    key = (x.shape, recon.shape, x.dtype.num, recon.dtype.num, visible.shape, visible.dtype.num,
           visible.tobytes(), args)
    prepared = _HOST_CALLS.get(key)
    if prepared is None:
        patch, _, stat, topk, _, norm_pix, _, tau, _, tau_high, _, t_min, _, t_max, _, floor = args
        vis = visible_numpy(visible)
        spec = _validate_cached(x, recon, vis, patch=patch, stat=stat, topk=topk, tau=tau, tau_high=tau_high,
                                t_min=t_min, t_max=t_max, norm_pix=bool(norm_pix))
        prepared = _C.Prepared(np.ascontiguousarray(vis), patch=spec.patch, stat=STATS[spec.stat], topk=spec.topk,
                               norm_pix=bool(norm_pix), tau=float(spec.tau), tau_high=float(spec.tau_high),
                               t_min=spec.t_min, t_max=spec.t_max, floor=bool(floor))
        if len(_HOST_CALLS) >= 64:
            _HOST_CALLS.clear()
        _HOST_CALLS[key] = prepared
    return prepared(x, recon, num_threads)


def _run_cpp(x: Any, recon: Any, vis: np.ndarray, spec: _Spec, norm_pix: bool, floor: bool, want_err: bool,
             num_threads: int) -> GateResult:
    torch_in = is_torch(x)
    xa = np.ascontiguousarray(to_numpy(x))
    ra = np.ascontiguousarray(to_numpy(recon))
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
        stat: "mean", "topk", "hfratio" or "nyqratio" (module docstring). topk: for "topk" the
            number of largest patch errors averaged (1..Np); for "hfratio" / "nyqratio" m, the
            number of tissue patches whose median ratio is the score (0..Np, 0 = Np // 2); ignored
            for "mean".
        norm_pix: compare with per-patch normalised targets (MAE normalised-pixel loss); not
            with "hfratio" / "nyqratio".
        tau, tau_high: flag threshold and the score at which t* reaches t_max (float32, τ_high > τ).
        t_min, t_max: purification timesteps (0 ≤ t_min ≤ t_max); floor: unflagged scans get t_min.
        return_patch_err: also return e [B, Np] (the spectral ratios for "hfratio" / "nyqratio").
        backend: "auto" (CUDA tensors → CUDA kernel, else C++), "cpp", "cuda", "reference" (numpy
            oracle) or "torch" (torch-op chain).
        num_threads: C++ threads sharing the strips (rows of patches) of all scans, so a small batch
            is split within scans too (0: chosen from the work size).

    Returns:
        :class:`GateResult` — numpy arrays for numpy input, torch tensors on x's device for torch
        input. The CUDA path enqueues one kernel on the current stream and never synchronises.
    """
    if (backend == "auto" or backend == "cpp") and _C is not None and type(x) is np.ndarray:
        fast = _host_fast(x, recon, visible, num_threads,
                          (patch, type(patch), stat, topk, type(topk), norm_pix, type(norm_pix), tau, type(tau),
                           tau_high, type(tau_high), t_min, type(t_min), t_max, type(t_max), floor))
        if fast is not None:
            return GateResult(fast[0], fast[1], fast[2], fast[3] if return_patch_err else None)
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is unknown: expected one of {BACKENDS}")
    if is_torch(x) != is_torch(recon):
        raise TypeError("x and recon must both be numpy arrays or both torch tensors")
    if not is_torch(x):
        x, recon = np.asarray(x), np.asarray(recon)
    on_cuda = is_torch(x) and x.device.type == "cuda"
    vis = visible_numpy(visible)
    spec = _validate_cached(x, recon, vis, patch=patch, stat=stat, topk=topk, tau=tau, tau_high=tau_high,
                            t_min=t_min, t_max=t_max, norm_pix=bool(norm_pix))
    norm_pix, floor = bool(norm_pix), bool(floor)
    if backend == "auto":
        backend = auto_backend(on_cuda)
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
    score, flag, t_star, err = _reference_numpy(to_numpy(x), to_numpy(recon), vis, spec, norm_pix, floor)
    if is_torch(x):
        import torch

        score, flag, t_star, err = (torch.from_numpy(np.ascontiguousarray(a)) for a in (score, flag, t_star, err))
    return GateResult(score, flag, t_star, err if return_patch_err else None)


def run_gate(spec: GateSpec, x: Any, recon: Any, visible: Any, *, backend: str = "auto",
             return_patch_err: bool = False, num_threads: int = 0) -> GateResult:
    """:func:`patch_gate` with the parameters of ``spec`` (statistic, patch, τ, τ_high, t_min, t_max,
    policy): x [B, S, S], recon [B, K, S, S], visible [K, Np] as there → :class:`GateResult`."""
    if not isinstance(spec, GateSpec):
        raise TypeError(f"spec must be a GateSpec, got {type(spec).__name__}: build one with GateSpec(...) or "
                        "GateSpec.from_dict(manifest['gate'])")
    if spec.stat in LEARNED_STATS:
        raise ValueError(f"stat {spec.stat!r} scores the attack detector's patch logits, not the MAE's "
                         "reconstruction: use run_gate_scores(spec, patch_logits)")
    return patch_gate(x, recon, visible, patch=spec.patch, stat=spec.stat, topk=spec.topk, norm_pix=spec.norm_pix,
                      tau=spec.tau, tau_high=spec.tau_high, t_min=spec.t_min, t_max=spec.t_max,
                      floor=spec.policy == "floor", return_patch_err=return_patch_err, backend=backend,
                      num_threads=num_threads)


def run_gate_scores(spec: GateSpec, patch_scores: Any, *, backend: str = "auto") -> GateResult:
    """A ``"learned"`` gate on per-patch values computed by its model (the attack detector's logits
    [B, Np]): :func:`~medfedpure.gate.gate_reduce` with the top-k reduction and the decision of ``spec``."""
    from medfedpure.gate.reduce import gate_reduce

    if not isinstance(spec, GateSpec):
        raise TypeError(f"spec must be a GateSpec, got {type(spec).__name__}")
    if spec.stat not in LEARNED_STATS:
        raise ValueError(f"stat {spec.stat!r} scores the MAE's reconstruction: use run_gate(spec, x, recon, visible)")
    return gate_reduce(patch_scores, stat="topk", topk=spec.topk, tau=spec.tau, tau_high=spec.tau_high,
                       t_min=spec.t_min, t_max=spec.t_max, floor=spec.policy == "floor", backend=backend)
