"""The Defender on a CUDA GPU: the torch backend in FP16 with CUDA graphs and the CUDA gate kernel.

Run by ``benchmarks/gpu_check.sh`` on a lent GPU; skipped on machines without one (CI).
Reference: the onnxruntime FP32 Defender on the CPU, same scans and purification seeds.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from medfedpure import Defender
from tiny_bundle import cached_tiny_bundle, tiny_scans

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def bundle_path():
    return cached_tiny_bundle()


@pytest.fixture(scope="module")
def d_gpu(bundle_path) -> Defender:
    return Defender.load(bundle_path, backend="torch", device="cuda")  # FP16 + CUDA graphs


@pytest.fixture(scope="module")
def d_ref(bundle_path) -> Defender:
    return Defender.load(bundle_path, backend="onnxruntime", device="cpu", threads=2)


@pytest.fixture(scope="module")
def scans() -> np.ndarray:
    return tiny_scans(64, 77)


def _assert_agree(rg, rr, tau: float, *, dp: float, label_rate: float = 0.99) -> None:
    assert all(r.ok for r in rg + rr), [r.reason for r in rg + rr if not r.ok][:3]
    labels = np.mean([a.label == b.label for a, b in zip(rg, rr, strict=True)])
    assert labels >= label_rate, labels
    for a, b in zip(rg, rr, strict=True):
        # a flag may differ only for a score within FP16 rounding of τ
        if a.flagged != b.flagged:
            assert abs(a.score - tau) <= 2e-2 * max(abs(tau), 1e-3), (a.score, b.score, tau)
        else:
            assert a.t_star == pytest.approx(b.t_star, abs=2)
            assert max(abs(a.probabilities[c] - b.probabilities[c]) for c in a.probabilities) < dp


def test_cuda_defender_agrees_with_onnxruntime_cpu(d_gpu: Defender, d_ref: Defender, scans) -> None:
    assert d_gpu.engine.describe() == {"backend": "torch", "device": "cuda", "precision": "fp16",
                                       "cuda_graphs": True}
    seeds = list(range(len(scans)))
    rg, rr = d_gpu.run_array(scans, seeds=seeds), d_ref.run_array(scans, seeds=seeds)
    assert 0 < sum(r.flagged for r in rr) < len(rr), "both paths should be exercised"
    assert {r.device for r in rg} == {"cuda"} and {r.precision for r in rg} == {"fp16"}
    _assert_agree(rg, rr, float(d_ref.bundle.spec.gate.tau), dp=5e-2)


def test_cuda_fp32_eager_matches_cpu_closely(bundle_path, d_ref: Defender, scans) -> None:
    d = Defender.load(bundle_path, backend="torch", device="cuda", precision="fp32", cuda_graphs=False)
    seeds = list(range(len(scans)))
    rg, rr = d.run_array(scans, seeds=seeds), d_ref.run_array(scans, seeds=seeds)
    # FP32 on the GPU (cuDNN may use TF32 convolutions): near-identical, flags may differ only at τ
    _assert_agree(rg, rr, float(d_ref.bundle.spec.gate.tau), dp=5e-3)


def test_cuda_same_seed_identical_result(d_gpu: Defender, scans) -> None:
    a = d_gpu.run_array(scans[:8], seeds=[3] * 8, return_purified=True)
    b = d_gpu.run_array(scans[:8], seeds=[3] * 8, return_purified=True)
    for ra, rb in zip(a, b, strict=True):
        assert (ra.label, ra.probabilities, ra.score, ra.t_star, ra.seed) == \
               (rb.label, rb.probabilities, rb.score, rb.t_star, rb.seed)
        np.testing.assert_array_equal(ra.purified, rb.purified)


def test_cuda_mixed_batch_purifies_only_flagged(d_gpu: Defender, scans) -> None:
    before = scans.copy()
    rs = d_gpu.run_array(scans[:16], seeds=list(range(16)), return_purified=True, return_patch_error=True)
    np.testing.assert_array_equal(scans, before)  # the caller's array is untouched
    flagged = np.array([r.flagged for r in rs])
    assert 0 < flagged.sum() < 16
    for r, x in zip(rs, scans[:16], strict=True):
        assert (r.t_star > 0) == r.flagged
        assert r.purified.shape == x.shape and r.purified.dtype == np.float32
        assert r.patch_error is not None and np.isfinite(r.patch_error).all()
        if r.flagged:
            assert np.abs(r.purified - x).max() > 1e-3
        else:
            np.testing.assert_array_equal(r.purified, x)


def test_cuda_graphs_per_batch_size_match_eager(bundle_path, d_gpu: Defender, scans) -> None:
    eager = Defender.load(bundle_path, backend="torch", device="cuda", cuda_graphs=False)
    for n in (1, 3, 8):
        rg = d_gpu.run_array(scans[:n], seeds=list(range(n)))
        re = eager.run_array(scans[:n], seeds=list(range(n)))
        for a, b in zip(rg, re, strict=True):
            assert a.label == b.label and a.flagged == b.flagged and a.t_star == b.t_star
            assert abs(a.probabilities["tumor"] - b.probabilities["tumor"]) < 2e-3
    shapes = {k[0][0] for k in d_gpu.engine._calls["classifier"].graphs}
    assert {1, 3, 8} <= shapes  # one captured graph per batch size


def test_cuda_gate_and_stages_stay_on_device(d_gpu: Defender, scans) -> None:
    eng = d_gpu.engine
    xg = eng.to_native(scans[:4])
    recon = eng.mae(xg)
    g = eng.gate(xg, recon, return_patch_err=True)
    assert recon.is_cuda and recon.dtype == torch.float32
    assert g.score.is_cuda and g.flag.is_cuda and g.t_star.is_cuda and g.patch_err.is_cuda
    assert eng.classify(xg).is_cuda


def test_default_bundle_on_cuda_agrees_with_onnxruntime(tmp_path) -> None:
    """The embedded bundle (128 px) on synthetic scans of an unseen scanner profile: FP16 GPU vs FP32 CPU."""
    from medfedpure.data import SynthConfig, generate_synthetic, load_split, make_splits

    generate_synthetic(tmp_path, SynthConfig(sites=1, per_site=60, size=128, seed=5), workers=1, progress=False)
    make_splits(tmp_path, seed=0)
    x = np.concatenate([load_split(tmp_path, 0, sp, size=128, cache=False)[0] for sp in ("test", "val", "train")])
    x = np.concatenate([x, tiny_scans(24, 3, size=128)]).astype(np.float32)
    seeds = list(range(len(x)))
    d_gpu = Defender.default(backend="torch", device="cuda")
    d_cpu = Defender.default(backend="onnxruntime", device="cpu", threads=2)
    rg, rr = d_gpu.run_array(x, seeds=seeds), d_cpu.run_array(x, seeds=seeds)
    assert rg[0].bundle_id == rr[0].bundle_id
    _assert_agree(rg, rr, float(d_cpu.bundle.spec.gate.tau), dp=5e-2)
