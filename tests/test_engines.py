"""Backends: the numpy sampler equals models.diffusion.purify; onnxruntime and torch agree stage by stage."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from medfedpure.models.diffusion import DiffusionSchedule, forward_noise, purify
from medfedpure.models.unet import UNet, UNetConfig
from medfedpure.runtime.bundle import verify_bundle
from medfedpure.runtime.engines import EngineError, create_engine
from medfedpure.runtime.sampler import interp_alpha_bar, purify_numpy
from tiny_bundle import cached_tiny_bundle, tiny_scans

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bundle():
    return verify_bundle(cached_tiny_bundle())


@pytest.fixture(scope="module")
def engines(bundle):
    return (create_engine(bundle, "onnxruntime", "cpu", threads=1), create_engine(bundle, "torch", "cpu"))


def test_interp_alpha_bar_matches_schedule() -> None:
    sched = DiffusionSchedule("cosine", 1000)
    t = np.array([0, 0.5, 1, 37.25, 999.9, 1000, 1200], dtype=np.float32)
    got = interp_alpha_bar(sched.alphas_cumprod.numpy(), t)
    np.testing.assert_array_equal(got, sched.alpha_bar(torch.from_numpy(t)).numpy())


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_numpy_sampler_equals_diffusion_purify(steps: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        unet = UNet(UNetConfig.preset("tiny")).eval()
    x = torch.from_numpy(tiny_scans(4, 9))
    t_star = torch.tensor([0, 40, 120, 250])
    with torch.no_grad():
        ref = purify(unet, x, t_star, steps, generator=torch.Generator().manual_seed(11)).numpy()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(11)).numpy()

    def den(y: np.ndarray, t: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return unet(torch.from_numpy(y), torch.from_numpy(t)).numpy()

    got = purify_numpy(den, x.numpy(), t_star.numpy(), noise, unet.schedule.alphas_cumprod.numpy(), steps)
    np.testing.assert_array_equal(got[0], x.numpy()[0])  # t* = 0: bit-exact pass-through
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)
    assert np.abs(got[1:] - x.numpy()[1:]).max() > 1e-3  # it did purify


def test_onnxruntime_engine_reports_providers(engines) -> None:
    ort_eng, torch_eng = engines
    assert ort_eng.describe() == {"backend": "onnxruntime", "device": "cpu", "precision": "fp32",
                                  "providers": ["CPUExecutionProvider"]}
    assert torch_eng.describe()["backend"] == "torch" and torch_eng.device == "cpu"


def test_engine_options_refused(bundle) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(EngineError, match="onnxruntime-gpu"):
            create_engine(bundle, "onnxruntime", "cuda")
    with pytest.raises(ValueError, match="backend"):
        create_engine(bundle, "tflite")
    with pytest.raises(EngineError, match="FP16 only on CUDA"):
        create_engine(bundle, "torch", "cpu", precision="fp16")
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(EngineError, match="TensorRT"):
            create_engine(bundle, "tensorrt")


def test_fp16_onnx_engine_close_to_fp32(bundle) -> None:
    e32 = create_engine(bundle, "onnxruntime", "cpu", precision="fp32", threads=1)
    e16 = create_engine(bundle, "onnxruntime", "cpu", precision="fp16", threads=1)
    assert e16.precision == "fp16"
    x = tiny_scans(6, 4)
    assert np.abs(e16.classify(x) - e32.classify(x)).max() < 1e-3
    assert np.abs(e16.mae(x) - e32.mae(x)).max() < 1e-2


def test_backends_agree_stage_by_stage(engines) -> None:
    ort_eng, torch_eng = engines
    x = tiny_scans(6, 21)
    xt = torch_eng.to_native(x)
    r_ort, r_t = ort_eng.mae(x), torch_eng.to_numpy(torch_eng.mae(xt))
    assert r_ort.shape == (6, 4, 32, 32)
    np.testing.assert_allclose(r_ort, r_t, atol=1e-5)
    np.testing.assert_allclose(ort_eng.classify(x), torch_eng.to_numpy(torch_eng.classify(xt)), atol=1e-6)
    g_ort, g_t = ort_eng.gate(x, r_ort), torch_eng.gate(xt, torch_eng.mae(xt))
    np.testing.assert_allclose(g_ort.score, torch_eng.to_numpy(g_t.score), rtol=1e-4)
    y = (x * 2 - 1).astype(np.float32)
    t = np.array([0, 10, 40, 80, 150, 200], dtype=np.float32)
    np.testing.assert_allclose(ort_eng.denoise(y, t), torch_eng.to_numpy(torch_eng.denoise(torch_eng.to_native(y),
                                                                                          torch_eng.to_native(t))),
                               atol=1e-5)
    # purification with the same noise: the numpy sampler over ONNX vs models.diffusion over torch
    t_star = np.array([0, 40, 90, 120, 160, 200])
    noise = np.random.Generator(np.random.Philox(key=5)).standard_normal(x.shape, dtype=np.float32)
    p_ort = ort_eng.purify(x, t_star, noise)
    p_t = torch_eng.to_numpy(torch_eng.purify(xt, torch_eng.to_native(t_star), noise))
    np.testing.assert_allclose(p_ort, p_t, atol=1e-4)
    np.testing.assert_array_equal(p_ort[0], x[0])


def test_torch_engine_purify_is_models_diffusion_purify(bundle, engines) -> None:
    """The torch backend's purify == medfedpure.models.diffusion.purify given the same noise."""
    _, torch_eng = engines
    student = torch_eng.models["denoiser"]
    x = torch.from_numpy(tiny_scans(3, 2))
    t_star = torch.tensor([40, 100, 200])
    with torch.no_grad():
        ref = purify(student, x, t_star, torch_eng.steps, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).numpy()
    got = torch_eng.purify(x, t_star, noise)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    with torch.no_grad():  # the same function, given the noise instead of a generator: bit-identical
        same = purify(torch_eng.denoise, x, t_star, torch_eng.steps, noise=torch.from_numpy(noise),
                      schedule=torch_eng.schedule)
    assert torch.equal(got, same)


def test_model_from_bytes_is_load_model(tmp_path) -> None:
    """The runtime's rebuild from verified bytes and training's load from a path give the same model."""
    from medfedpure.models.weights import (
        load_model,
        model_from_bytes,
        model_metadata,
        read_metadata,
        save_model,
        save_tensors,
    )
    from medfedpure.runtime.engines.torch_engine import model_from_bytes as engine_rebuild

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        unet = UNet(UNetConfig.preset("tiny")).eval()
    path = save_model(tmp_path / "u.safetensors", unet, unet.cfg, "unet", extra={"steps": 2})
    data = path.read_bytes()
    assert read_metadata(data) == read_metadata(path)
    assert model_metadata(data)["steps"] == 2 and model_metadata(data)["config"]["channel_mults"] == [1, 2, 4]
    (m1, c1, _), (m2, c2, _) = load_model(path), model_from_bytes(data)
    assert c1 == c2 == unet.cfg
    y, t = torch.rand(2, 1, 32, 32), torch.tensor([10.0, 90.0])
    with torch.no_grad():
        assert torch.equal(m1(y, t), m2(y, t)) and torch.equal(m1(y, t), unet(y, t))
    with pytest.raises(EngineError, match="kind"):
        engine_rebuild(save_tensors(tmp_path / "n.safetensors", unet.state_dict(),
                                    {"kind": "nope", "config": "{}"}).read_bytes())
    with pytest.raises(EngineError, match="header"):
        engine_rebuild(b"\xff" * 16)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_cuda_engine_matches_cpu(bundle) -> None:  # pragma: no cover - GPU only
    cpu = create_engine(bundle, "torch", "cpu")
    gpu = create_engine(bundle, "torch", "cuda")  # FP16 autocast + CUDA graphs
    assert gpu.describe() == {"backend": "torch", "device": "cuda", "precision": "fp16", "cuda_graphs": True}
    x = tiny_scans(8, 3)
    xg = gpu.to_native(x)
    assert xg.is_cuda
    recon = gpu.mae(xg)
    assert recon.is_cuda and recon.dtype == torch.float32
    g = gpu.gate(xg, recon)
    assert g.score.is_cuda  # the CUDA gate kernel ran on device tensors
    np.testing.assert_allclose(gpu.to_numpy(recon), cpu.mae(cpu.to_native(x)).numpy(), atol=2e-2)
    np.testing.assert_allclose(gpu.to_numpy(gpu.classify(xg)), cpu.classify(cpu.to_native(x)).numpy(), atol=1e-2)
    noise = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    ts = np.array([40, 60, 80, 100, 120, 140, 160, 200])
    pg = gpu.to_numpy(gpu.purify(xg, gpu.to_native(ts), noise))
    pc = cpu.to_numpy(cpu.purify(cpu.to_native(x), cpu.to_native(ts), noise))
    assert np.abs(pg - pc).max() < 5e-2
    # CUDA graph replay returns the same values as the first (captured) call
    np.testing.assert_array_equal(gpu.to_numpy(gpu.classify(xg)), gpu.to_numpy(gpu.classify(xg)))


@pytest.mark.tensorrt
def test_tensorrt_engine_builds_and_matches(bundle, tmp_path) -> None:  # pragma: no cover - needs TensorRT
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from medfedpure.export.tensorrt import ProfileSpec, build_engine

    plan = build_engine(bundle.read_bytes("classifier.fp16"), profile=ProfileSpec(1, 4, 8),
                        timing_cache=tmp_path / "timing.cache")
    assert len(plan) > 0 and (tmp_path / "timing.cache").stat().st_size > 0


def test_embedded_bundle_denoiser_backends_and_fp16_agree() -> None:
    """The shipped purifier (UNet on 2×2 polyphase sub-images): torch, ONNX FP32 and ONNX FP16 agree."""
    from medfedpure.runtime.bundle import default_bundle_path

    if not (default_bundle_path() / "manifest.json").is_file():
        pytest.skip("no embedded default bundle yet (make bundle)")
    vb = verify_bundle(default_bundle_path())
    e32 = create_engine(vb, "onnxruntime", "cpu", precision="fp32", threads=1)
    e16 = create_engine(vb, "onnxruntime", "cpu", precision="fp16", threads=1)
    et = create_engine(vb, "torch", "cpu")
    unet = et.models["denoiser"]
    assert unet.cfg.image_size == vb.image_size == 128 and unet.cfg.unshuffle == 2
    x = tiny_scans(3, 8, size=128)
    y = (x * 2 - 1).astype(np.float32)
    t = np.array([60, 130, 200], dtype=np.float32)  # the bundle's purification range
    noise = np.random.Generator(np.random.Philox(key=2)).standard_normal(x.shape, dtype=np.float32)
    y_t = forward_noise(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(noise), et.schedule).numpy()
    ref = et.to_numpy(et.denoise(et.to_native(y_t), et.to_native(t)))
    np.testing.assert_allclose(e32.denoise(y_t, t), ref, atol=1e-5)
    assert np.abs(e16.denoise(y_t, t) - ref).max() < 5e-3  # FP16 body, FP32 input/output
    assert np.abs(ref - y).mean() < np.abs(y_t - y).mean()  # it denoises: closer to the clean scan
