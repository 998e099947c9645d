"""gate_reduce: the gate's score and decision on per-patch values computed elsewhere (the attack detector's
patch logits) — the numpy oracle, the C++ kernel (bit for bit), the torch chain (to rounding, with
gradients), the CUDA kernel on a GPU (marked), and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from medfedpure.gate import gate_reduce, gate_reduce_reference, gate_reduce_torch
from medfedpure.gate.dispatch import _C, _C_cuda

KW = dict(tau=0.5, tau_high=2.0, t_min=60, t_max=200)
needs_cpp = pytest.mark.skipif(_C is None, reason="medfedpure._C is not built")


def _values(rng: np.random.Generator, b: int, n: int, dtype: str, levels: int) -> np.ndarray:
    v = rng.standard_normal((b, n)).astype(np.float32) * np.float32(3)
    if levels:  # quantised: ties in the selection
        v = np.round(v * levels) / np.float32(levels)
    return v.astype(dtype)


def test_reference_topk_and_mean_are_the_plain_statistics():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((4, 256)).astype(np.float32)  # distinct values
    top = gate_reduce_reference(v, stat="topk", topk=16, **KW)
    np.testing.assert_allclose(top.score, np.sort(v, 1)[:, -16:].mean(1), rtol=1e-5, atol=1e-6)
    mean = gate_reduce_reference(v, stat="mean", **KW)
    np.testing.assert_allclose(mean.score, v.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(top.patch_err, v)
    assert top.score.dtype == np.float32 and top.flag.dtype == np.bool_ and top.t_star.dtype == np.int32


def test_reference_ties_and_the_decision():
    v = np.array([[3.0, 1.0, 3.0, 3.0], [-1.0, -2.0, -3.0, -4.0]], np.float32)
    r = gate_reduce_reference(v, stat="topk", topk=2, tau=0.0, tau_high=4.0, t_min=10, t_max=50)
    assert r.score.tolist() == [3.0, -1.5]
    assert r.flag.tolist() == [True, False]
    assert r.t_star.tolist() == [40, 0]  # 10 + 40 · 3/4
    f = gate_reduce_reference(v, stat="topk", topk=2, tau=0.0, tau_high=4.0, t_min=10, t_max=50, floor=True)
    assert f.t_star.tolist() == [40, 10]


@needs_cpp
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 4), n=st.integers(1, 300),
       dtype=st.sampled_from(["float32", "float16"]), stat=st.sampled_from(["mean", "topk"]),
       levels=st.sampled_from([0, 2]), floor=st.booleans(), mode=st.sampled_from(["at", "ulp_above", "below"]))
def test_cpp_equals_the_oracle_bit_for_bit(seed, b, n, dtype, stat, levels, floor, mode):
    rng = np.random.default_rng(seed)
    v = _values(rng, b, n, dtype, levels)
    topk = int(rng.integers(1, n + 1)) if stat == "topk" else 0
    probe = gate_reduce_reference(v, stat=stat, topk=topk, tau=0.0, tau_high=1.0, t_min=0, t_max=1)
    s0 = np.float32(probe.score[int(rng.integers(0, b))])
    tau = {"at": s0, "ulp_above": np.nextafter(s0, np.float32(np.inf)), "below": s0 - np.float32(1)}[mode]
    kw = dict(stat=stat, topk=topk, tau=float(tau), tau_high=float(tau) + 2.0, t_min=10, t_max=100, floor=floor)
    ref = gate_reduce_reference(v, **kw)
    got = gate_reduce(v, backend="cpp", **kw)
    np.testing.assert_array_equal(got.score, ref.score)
    np.testing.assert_array_equal(got.flag, ref.flag)
    np.testing.assert_array_equal(got.t_star, ref.t_star)
    if mode == "at":  # the scan whose score is τ is flagged everywhere
        assert ref.flag.any()


@needs_cpp
def test_auto_backend_takes_torch_cpu_and_leaves_the_input_alone():
    v = torch.randn(3, 64)
    v0 = v.clone()
    r = gate_reduce(v, stat="topk", topk=8, **KW)
    assert torch.equal(v, v0)
    assert isinstance(r.score, torch.Tensor) and r.score.dtype == torch.float32 and r.t_star.dtype == torch.int32
    ref = gate_reduce_reference(v0.numpy(), stat="topk", topk=8, **KW)
    np.testing.assert_array_equal(r.score.numpy(), ref.score)


def test_torch_chain_agrees_and_carries_the_gradient():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(2, 64, generator=g, requires_grad=True)
    r = gate_reduce_torch(v, stat="topk", topk=4, **KW)
    ref = gate_reduce_reference(v.detach().numpy(), stat="topk", topk=4, **KW)
    np.testing.assert_allclose(r.score.detach().numpy(), ref.score, rtol=1e-6, atol=1e-6)
    r.score.sum().backward()
    grad = v.grad.numpy()
    top = np.argsort(-v.detach().numpy(), 1)[:, :4]
    expect = np.zeros_like(grad)
    np.put_along_axis(expect, top, 0.25, axis=1)
    np.testing.assert_allclose(grad, expect)


@pytest.mark.parametrize("args, kw, err, match", [
    ((np.zeros(5, np.float32),), {}, ValueError, r"expected \[B, Np\]"),
    ((np.zeros((2, 3, 4), np.float32),), {}, ValueError, r"expected \[B, Np\]"),
    ((np.zeros((0, 4), np.float32),), {}, ValueError, r"B >= 1"),
    ((np.zeros((2, 4), np.int32),), {}, TypeError, "float32 or float16"),
    ((np.zeros((2, 4), np.float32),), dict(stat="hfratio"), ValueError, "gate_reduce implements"),
    ((np.zeros((2, 4), np.float32),), dict(topk=5), ValueError, r"1 <= topk <= Np = 4"),
    ((np.zeros((2, 4), np.float32),), dict(topk=0), ValueError, r"1 <= topk <= Np = 4"),
    ((np.zeros((2, 4), np.float32),), dict(tau_high=0.5), ValueError, "must be > tau"),
    ((np.zeros((2, 4), np.float32),), dict(t_min=300), ValueError, "t_min <= t_max"),
    ((np.zeros((2, 4), np.float32),), dict(tau=float("nan")), ValueError, "finite"),
    ((np.zeros((2, 4), np.float32),), dict(backend="gpu"), ValueError, "backend 'gpu' is unknown"),
    ((np.zeros((2, 4), np.float32),), dict(backend="torch"), TypeError, "torch tensor"),
    ((np.zeros((2, 4), np.float32),), dict(backend="cuda"), ValueError, "CUDA tensor"),
])
def test_bad_calls_are_refused(args, kw, err, match):
    with pytest.raises(err, match=match):
        gate_reduce(*args, **{"stat": "topk", "topk": 2, **KW, **kw})


@needs_cpp
def test_the_compiled_module_checks_too():
    with pytest.raises(ValueError, match=r"topk must be in \[1, Np\]"):
        _C.gate_reduce(np.zeros((2, 4), np.float32), stat=1, topk=9, tau=0.0, tau_high=1.0, t_min=0, t_max=1,
                       floor=False)
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.gate_reduce(np.zeros((4, 2), np.float32).T, stat=0, topk=0, tau=0.0, tau_high=1.0, t_min=0, t_max=1,
                       floor=False)


@pytest.mark.cuda
@pytest.mark.skipif(_C_cuda is None or not torch.cuda.is_available(), reason="needs a CUDA GPU and medfedpure._C_cuda")
@pytest.mark.parametrize("n, stat, dtype", [(1, "topk", torch.float32), (256, "topk", torch.float32),
                                            (256, "mean", torch.float16), (784, "topk", torch.float16),
                                            (2304, "topk", torch.float32)])
def test_cuda_equals_the_oracle(n, stat, dtype):
    rng = np.random.default_rng(n)
    v = _values(rng, 5, n, "float32", 2)
    topk = min(16, n) if stat == "topk" else 0
    tau = float(gate_reduce_reference(v.astype(np.float16 if dtype == torch.float16 else np.float32), stat=stat,
                                      topk=topk, tau=0.0, tau_high=1.0, t_min=0, t_max=1).score[2])
    kw = dict(stat=stat, topk=topk, tau=tau, tau_high=tau + 2.0, t_min=60, t_max=200)
    vt = torch.from_numpy(v).to(dtype)
    ref = gate_reduce_reference(vt.numpy(), **kw)
    got = gate_reduce(vt.cuda(), **kw)
    np.testing.assert_array_equal(got.score.cpu().numpy(), ref.score)
    np.testing.assert_array_equal(got.flag.cpu().numpy(), ref.flag)
    np.testing.assert_array_equal(got.t_star.cpu().numpy(), ref.t_star)
