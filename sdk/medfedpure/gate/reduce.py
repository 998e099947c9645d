"""The gate's score and decision on per-patch values a model computed elsewhere: :func:`gate_reduce`.

:func:`~medfedpure.gate.patch_gate` computes the per-patch values e from the scan and the MAE's
reconstructions and then reduces them; a learned detector (``models.detector.AttackDetector``) emits its
per-patch logits directly. ``gate_reduce`` is the second half alone, with the same semantics and the same
three implementations (kernels/patch_gate.h, "gate_reduce"):

    e[b, p]   = scores[b, p] as float32 (float16 converted exactly; any sign)
    score[b]  = lane32 sum of e over p / Np                                        (stat "mean")
              = lane32 sum of e with all but the topk largest set to 0 / topk       (stat "topk"; ties:
                                                                                    lower patch index)
    flag, t*  = the decision rule of :mod:`medfedpure.gate.decision`

- :func:`gate_reduce_reference` — numpy, the oracle;
- ``medfedpure._C.gate_reduce`` — C++;
- ``medfedpure._C_cuda.gate_reduce`` — CUDA, one launch of B blocks, no device synchronisation;
- :func:`gate_reduce_torch` — torch ops, differentiable (what an adaptive attack follows), equal to float
  rounding.

C++ and CUDA equal the oracle bit for bit, so flag and t* agree exactly. A NaN among a scan's values voids
the contract for that scan: a caller that must fail closed checks ``isfinite`` first.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from medfedpure.gate.decision import decide_numpy, decide_torch
from medfedpure.gate.reference import _reduce_numpy
from medfedpure.gate.validate import DTYPES, STATS, GateResult, check_decision, dtype_name, is_torch, to_numpy

__all__ = ["REDUCE_STATS", "gate_reduce", "gate_reduce_reference", "gate_reduce_torch"]

REDUCE_STATS = ("mean", "topk")


class _ReduceSpec(NamedTuple):
    batch: int
    num_patches: int
    stat: str
    topk: int
    tau: np.float32
    tau_high: np.float32
    t_min: int
    t_max: int


def _validate_reduce(scores: Any, *, stat: str, topk: int, tau: float, tau_high: float, t_min: int,
                     t_max: int) -> _ReduceSpec:
    shape = tuple(scores.shape)
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"scores has shape {shape}: expected [B, Np] (per-patch values, B >= 1, Np >= 1)")
    if dtype_name(scores) not in DTYPES:
        raise TypeError(f"scores has dtype {dtype_name(scores)}: expected float32 or float16")
    b, n = shape
    if stat not in REDUCE_STATS:
        raise ValueError(f"stat {stat!r}: gate_reduce implements {list(REDUCE_STATS)}")
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)):
        raise ValueError(f"topk must be an int, got {topk!r}")
    if stat == "topk" and not 1 <= topk <= n:
        raise ValueError(f"topk = {topk} with stat 'topk': expected 1 <= topk <= Np = {n}")
    tau32, tau_high32 = check_decision(tau, tau_high, t_min, t_max)
    return _ReduceSpec(b, n, stat, int(topk), tau32, tau_high32, int(t_min), int(t_max))


def gate_reduce_reference(scores: Any, *, stat: str = "topk", topk: int = 0, tau: float, tau_high: float,
                          t_min: int, t_max: int, floor: bool = False) -> GateResult:
    """The numpy oracle of :func:`gate_reduce` (numpy in and out; ``patch_err`` = the values as float32)."""
    a = to_numpy(scores)
    spec = _validate_reduce(a, stat=stat, topk=topk, tau=tau, tau_high=tau_high, t_min=t_min, t_max=t_max)
    e = np.asarray(a, np.float32)
    score = _reduce_numpy(e, spec.stat, spec.topk)
    flag, t_star = decide_numpy(score, spec.tau, spec.tau_high, spec.t_min, spec.t_max, bool(floor))
    return GateResult(score, flag, t_star, e)


def gate_reduce_torch(scores: Any, *, stat: str = "topk", topk: int = 0, tau: float, tau_high: float,
                      t_min: int, t_max: int, floor: bool = False) -> GateResult:
    """:func:`gate_reduce` as torch ops on any device, differentiable w.r.t. ``scores`` through the score
    (the decision is discrete). Equal to the oracle to float rounding."""
    spec = _validate_reduce(scores, stat=stat, topk=topk, tau=tau, tau_high=tau_high, t_min=t_min, t_max=t_max)
    e = scores.float()
    score = e.topk(spec.topk, dim=1).values.mean(1) if spec.stat == "topk" else e.mean(1)
    flag, t_star = decide_torch(score, float(spec.tau), float(spec.tau_high), spec.t_min, spec.t_max, bool(floor))
    return GateResult(score, flag, t_star, e)


def _run_cuda(scores: Any, spec: _ReduceSpec, floor: bool) -> GateResult:
    import torch

    from medfedpure.gate.dispatch import _C_cuda

    if _C_cuda is None:
        raise RuntimeError("backend 'cuda' needs medfedpure._C_cuda: rebuild with nvcc on PATH (pip install -e .)")
    dev = scores.device
    sc = scores.detach().contiguous()
    score = torch.empty(spec.batch, dtype=torch.float32, device=dev)
    flag = torch.empty(spec.batch, dtype=torch.bool, device=dev)
    t_star = torch.empty(spec.batch, dtype=torch.int32, device=dev)
    stream = torch.cuda.current_stream(dev).cuda_stream
    with torch.cuda.device(dev):
        code = _C_cuda.gate_reduce(sc.data_ptr(), DTYPES[dtype_name(sc)], spec.batch, spec.num_patches,
                                   STATS[spec.stat], spec.topk, float(spec.tau), float(spec.tau_high), spec.t_min,
                                   spec.t_max, floor, score.data_ptr(), flag.data_ptr(), t_star.data_ptr(), stream)
    if code != 0:
        raise RuntimeError(f"gate_reduce CUDA launch failed with error {code}: {_C_cuda.error_string(code)} "
                           "(-1: Np beyond the kernel's limits, 12288 values)")
    return GateResult(score, flag, t_star, sc.float())


def gate_reduce(scores: Any, *, stat: str = "topk", topk: int = 0, tau: float, tau_high: float, t_min: int,
                t_max: int, floor: bool = False, backend: str = "auto") -> GateResult:
    """Score and decide from per-patch values computed elsewhere (module docstring).

    Args:
        scores: [B, Np] float32 or float16 (numpy, torch CPU or torch CUDA), e.g. the attack detector's
            patch logits.
        stat: "topk" (the mean of the ``topk`` largest) or "mean".
        tau, tau_high, t_min, t_max, floor: the decision, as in :func:`~medfedpure.gate.patch_gate`.
        backend: "auto" (CUDA tensors → CUDA kernel, else C++), "cpp", "cuda", "reference" or "torch".

    Returns:
        :class:`~medfedpure.gate.GateResult`; ``patch_err`` holds the values as float32. numpy for numpy
        input, torch tensors on the input's device for torch input. The caller's array is not modified.
    """
    from medfedpure.gate.dispatch import _C, BACKENDS, auto_backend

    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is unknown: expected one of {BACKENDS}")
    if not is_torch(scores):
        scores = np.asarray(scores)
    spec = _validate_reduce(scores, stat=stat, topk=topk, tau=tau, tau_high=tau_high, t_min=t_min, t_max=t_max)
    floor = bool(floor)
    on_cuda = is_torch(scores) and scores.device.type == "cuda"
    if backend == "auto":
        backend = auto_backend(on_cuda)
    if backend == "torch":
        if not is_torch(scores):
            raise TypeError("backend 'torch' needs a torch tensor")
        return gate_reduce_torch(scores, stat=stat, topk=topk, tau=tau, tau_high=tau_high, t_min=t_min, t_max=t_max,
                                 floor=floor)
    if backend == "cuda":
        if not on_cuda:
            raise ValueError("backend 'cuda' needs a torch CUDA tensor")
        return _run_cuda(scores, spec, floor)
    if on_cuda:
        raise ValueError(f"backend {backend!r} runs on the host: pass CPU data, or use backend 'cuda'")
    a = np.ascontiguousarray(to_numpy(scores))
    if backend == "cpp":
        if _C is None:
            raise RuntimeError("backend 'cpp' needs medfedpure._C: build it with pip install -e .")
        score, flag, t_star = _C.gate_reduce(a, stat=STATS[spec.stat], topk=spec.topk, tau=float(spec.tau),
                                             tau_high=float(spec.tau_high), t_min=spec.t_min, t_max=spec.t_max,
                                             floor=floor)
        e = a.astype(np.float32)
    else:
        score, flag, t_star, e = gate_reduce_reference(a, stat=stat, topk=topk, tau=tau, tau_high=tau_high,
                                                       t_min=t_min, t_max=t_max, floor=floor)
    if is_torch(scores):
        import torch

        score, flag, t_star, e = (torch.from_numpy(np.ascontiguousarray(v)) for v in (score, flag, t_star, e))
    return GateResult(score, flag, t_star, e)
