"""``medfedpure eval --device``: where the attacks, the certification and the judged Defender run.

On CPU (every machine): ``--device cuda`` without CUDA is exit 2 with the fix named, before any work;
``--device cpu`` writes the same report as the default; the device is recorded in report.json and
report.md; the placement helpers of :mod:`medfedpure.eval.device` and the certification batch size are
unit-tested, and certifying all draws of a phase in one engine call (the CUDA batch) gives the same
certificates as the CPU batch. With a GPU (``-m cuda``): the same evaluation on ``--device cuda``."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
from medfedpure.cli import app
from tiny_bundle import cached_tiny_bundle, tiny_attack_setup, tiny_eval_data
from typer.testing import CliRunner

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# numbers that depend on the wall clock or the run's paths, not on what was computed
_VOLATILE = {"wall_s", "attack_s", "latency_ms", "train_s", "command", "figures", "seconds_per_scan"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_eval_data(tmp_path_factory.mktemp("evaldevdata") / "d")


@pytest.fixture(scope="module")
def bundle():
    return cached_tiny_bundle()


def _run(args: list[str]) -> tuple[int, str]:
    r = CliRunner().invoke(app, ["eval", *args])
    return r.exit_code, r.output + (f"\n{r.exception!r}" if r.exception and r.exit_code not in (0, 1, 2) else "")


def _small(data, bundle, out) -> list[str]:
    return ["--bundle", str(bundle), "--data", str(data), "--site", "0", "--attacks", "1,2", "--eps", "8",
            "--limit", "3", "--certify-sigmas", "0.25", "--certify-n", "10", "--no-progress", "--out", str(out)]


def _strip(o):
    if isinstance(o, dict):
        return {k: _strip(v) for k, v in o.items() if k not in _VOLATILE}
    if isinstance(o, list):
        return [_strip(v) for v in o]
    return o


# the CLI -----------------------------------------------------------------------------------------------

def test_device_cuda_without_cuda_exits_2_before_any_work(data, bundle, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "r"
    t0 = time.perf_counter()
    code, output = _run([*_small(data, bundle, out), "--device", "cuda"])
    assert code == 2, output
    assert "--device cuda" in output and "sees no CUDA device" in output and "--device cpu" in output
    assert not out.exists()  # nothing written: the check comes before the bundle, data or report folder
    assert time.perf_counter() - t0 < 10


def test_device_cpu_writes_the_default_report_and_records_the_device(data, bundle, tmp_path) -> None:
    code_a, out_a = _run(_small(data, bundle, tmp_path / "default"))
    code_b, out_b = _run([*_small(data, bundle, tmp_path / "cpu"), "--device", "cpu"])
    assert code_a == code_b == 0, (out_a, out_b)
    a = json.loads((tmp_path / "default" / "report.json").read_text())
    b = json.loads((tmp_path / "cpu" / "report.json").read_text())
    for rep in (a, b):
        m = rep["machine"]
        assert m["device"] == "cpu" and "gpu" not in m
        assert m["defender"] == {"backend": "onnxruntime", "device": "cpu", "precision": "fp32"}
    assert _strip(a["pooled"]) == _strip(b["pooled"]) and _strip(a["certified"]) == _strip(b["certified"])
    assert _strip(a) == _strip(b)  # every number, the sanity checks and the machine block
    assert a["pooled"]["rows"] and a["certified"]["0"]["per_sigma"]["0.25"]["certified_acc"]
    md = (tmp_path / "cpu" / "report.md").read_text()
    assert "- device **cpu** for the attacks" in md and "judged Defender: onnxruntime on cpu (fp32)" in md


def test_bad_device_name_exits_2(data, bundle, tmp_path) -> None:
    code, output = _run([*_small(data, bundle, tmp_path / "r"), "--device", "tpu"])
    assert code == 2 and "tpu" in output


# the helpers -------------------------------------------------------------------------------------------

def test_resolve_device() -> None:
    from medfedpure.eval.device import DeviceError, resolve_device

    assert resolve_device("cpu", cuda_available=True) == "cpu"
    assert resolve_device("cpu", cuda_available=False) == "cpu"
    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("auto", cuda_available=True) == "cuda"
    assert resolve_device("cuda", cuda_available=True) == "cuda"
    with pytest.raises(DeviceError, match="sees no CUDA device.*--device cpu"):
        resolve_device("cuda", cuda_available=False)
    with pytest.raises(DeviceError, match="'gpu'"):
        resolve_device("gpu", cuda_available=True)
    assert issubclass(DeviceError, ValueError)


def test_defender_device_follows_the_backend() -> None:
    from medfedpure.eval.device import DeviceError, defender_device

    assert defender_device("torch", "cuda") == "cuda"
    assert defender_device("tensorrt", "cuda") == "cuda"
    assert defender_device("onnxruntime", "cuda", ort_cuda=False) == "cpu"
    assert defender_device("onnxruntime", "cuda", ort_cuda=True) == "cuda"
    assert defender_device("auto", "cuda", ort_cuda=True) == "cuda"
    for backend in ("torch", "onnxruntime", "tensorrt"):
        assert defender_device(backend, "cpu", ort_cuda=True) == "cpu"
    with pytest.raises(DeviceError, match="resolve"):
        defender_device("torch", "auto")


def test_attack_generator_on_cpu_draws_what_a_plain_generator_draws() -> None:
    from medfedpure.eval.device import attack_generator, host

    g = attack_generator(123, "cpu")
    assert g.device == torch.device("cpu")
    ref = torch.Generator().manual_seed(123)
    assert torch.equal(torch.rand(5, generator=g), torch.rand(5, generator=ref))
    assert torch.equal(torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=ref))
    t = torch.arange(6.0, requires_grad=True).reshape(2, 3) * 2
    h = host(t)
    assert isinstance(h, np.ndarray) and h.shape == (2, 3) and h.dtype == np.float32
    np.testing.assert_array_equal(h, np.arange(6.0).reshape(2, 3) * 2)


def test_random_start_uses_the_generators_device_and_matches_the_cpu_draws() -> None:
    from medfedpure.eval.pipeline import random_start

    x = torch.full((2, 1, 4, 4), 0.5)
    for norm in ("linf", "l2"):
        a = random_start(x, 0.1, norm, torch.Generator().manual_seed(7))
        g = torch.Generator().manual_seed(7)
        if norm == "linf":
            want = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * 0.1).clamp(0, 1)
            assert torch.equal(a, want)
        assert a.device == x.device and a.shape == x.shape


def test_certify_batch_per_engine() -> None:
    from medfedpure.eval.runner import certify_batch

    class Eng:
        def __init__(self, name: str, device: str) -> None:
            self.name, self.device = name, device

    assert certify_batch(Eng("onnxruntime", "cpu"), 1000) == 50
    assert certify_batch(Eng("torch", "cpu"), 1000) == 50
    assert certify_batch(Eng("torch", "cuda"), 1000) == 512
    assert certify_batch(Eng("torch", "cuda"), 200) == 200
    assert certify_batch(Eng("torch", "cuda"), 20) == 50  # never below the CPU batch
    assert certify_batch(Eng("onnxruntime", "cuda"), 100) == 100
    assert certify_batch(Eng("tensorrt", "cuda"), 1000) == 8  # its plans hold 1–8


def test_device_info_records_the_device_and_the_defender() -> None:
    from medfedpure.eval.device import device_info

    class D:
        class engine:  # noqa: N801
            @staticmethod
            def describe() -> dict:
                return {"backend": "torch", "device": "cpu", "precision": "fp32", "cuda_graphs": False}

    assert device_info("cpu", D()) == {"device": "cpu",
                                       "defender": {"backend": "torch", "device": "cpu", "precision": "fp32"}}
    assert device_info("cpu") == {"device": "cpu"}


def test_surrogate_epochs_override_keeps_the_full_budget(data, bundle, tmp_path) -> None:
    from medfedpure.eval.runner import Budget

    b = Budget.preset("full", surrogate_epochs=10)
    assert b.name == "full" and b.is_full and b.surrogate_epochs == 10 and b.steps == 100
    assert Budget.preset("quick", surrogate_epochs=3).name == "quick+custom"
    code, output = _run([*_small(data, bundle, tmp_path / "r"), "--surrogate-epochs", "0"])
    assert code == 2 and "surrogate-epochs" in output


def test_eval_config_rejects_an_unknown_device() -> None:
    from medfedpure.eval.runner import EvalConfig

    with pytest.raises(ValueError, match="device='gpu'"):
        EvalConfig(data="d", eps=(0.1,), eps_labels=("x",), device="gpu")
    assert EvalConfig(data="d", eps=(0.1,), eps_labels=("x",)).device == "cpu"


def test_certifying_a_phase_in_one_call_equals_the_cpu_batches(bundle, monkeypatch) -> None:
    """The CUDA batch (every draw of a phase in one engine call) against the CPU batch of 50: the same
    certificates, so the certified accuracy does not depend on the device's batch."""
    from medfedpure import Defender
    from medfedpure.eval import runner
    from tiny_bundle import tiny_scans

    d = Defender.load(bundle, backend="onnxruntime", device="cpu", threads=1)
    x = tiny_scans(3, 11)
    y = np.array([0, 1, 0])
    a = runner.certify_site(d, x, y, (0.25, 0.5), 60, 3, False)  # n0 = 10, n = 60: two batches of 50
    calls: list[int] = []
    orig = runner.certify_batch

    def one_call(engine, n: int) -> int:
        calls.append(n)
        return n
    monkeypatch.setattr(runner, "certify_batch", one_call)
    b = runner.certify_site(d, x, y, (0.25, 0.5), 60, 3, False)
    assert calls == [60, 60] and orig(d.engine, 60) == 50
    for rep in (a, b):  # wall time is the only thing allowed to differ
        assert all(v.pop("seconds_per_scan") > 0 for v in rep["per_sigma"].values())
    assert a == b
    assert set(a["per_sigma"]) == {"0.25", "0.5"}
    ball = a["linf_2_255_radius"]
    assert ball == pytest.approx(2 / 255 * np.sqrt(x[0].size), abs=1e-4)
    for sigma, v in a["per_sigma"].items():
        s = float(sigma)
        assert v["radii"] == sorted({0.0, s / 4, s / 2, s, 1.5 * s, 2 * s, *runner.REPORT_RADII, ball})
        assert len(v["scans"]) == 3 and [c["true"] for c in v["scans"]] == ["no_tumor", "tumor", "no_tumor"]
        # each reported accuracy is the share of scans certified right at a radius at least that large
        for r, acc in zip(v["radii"], v["certified_acc"], strict=True):
            right = sum(c["label"] == c["true"] and c["radius"] >= r for c in v["scans"])
            assert acc == pytest.approx(right / 3)
        # within each true class the same count over that class's scans; the worst class is their minimum
        assert set(v["certified_acc_by_class"]) == {"no_tumor", "tumor"}
        for i, r in enumerate(v["radii"]):
            per = {}
            for cls, n_cls in (("no_tumor", 2), ("tumor", 1)):
                right = sum(c["label"] == cls and c["true"] == cls and c["radius"] >= r for c in v["scans"])
                per[cls] = right / n_cls
                assert v["certified_acc_by_class"][cls][i] == pytest.approx(per[cls])
            assert v["worst_class_certified_acc"][i] == pytest.approx(min(per.values()))


# the batched EOT path (the default on CUDA) against the sequential one (the CPU's), on CPU -----------

@pytest.fixture(scope="module")
def tiny(bundle):
    return tiny_attack_setup(bundle, 5, 21)


def test_eot_noise_is_the_sequential_draws() -> None:
    from medfedpure.eval.pipeline import eot_noise

    x = torch.zeros(3, 1, 4, 4)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    n = eot_noise(x, 4, g1)
    assert n.shape == (12, 1, 4, 4)
    assert torch.equal(n, torch.cat([torch.randn(x.shape, generator=g2) for _ in range(4)]))
    assert torch.equal(torch.rand(2, generator=g1), torch.rand(2, generator=g2))  # the generators advanced alike


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_batched_eot_gradient_equals_the_sequential_one(tiny, loss) -> None:
    from medfedpure.eval.pipeline import eot_gradient, gate_t_star

    d, ref, x, y = tiny
    ts = torch.from_numpy(gate_t_star(d, x.numpy()))
    ts[::2] = torch.clamp(ts[::2], min=d.engine.gate_spec.t_min)  # some purified rows, whatever the gate said
    out = {}
    for batched in (False, True):
        g = torch.Generator().manual_seed(9)
        out[batched] = (*eot_gradient(ref, x, y, ts, eot=4, generator=g, loss=loss, batched=batched),
                        torch.rand(3, generator=g))
    (ga, la, na), (gb, lb, nb) = out[False], out[True]
    assert torch.equal(na, nb)  # the same draws consumed
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)
    big = ga.abs() > 1e-6 * ga.abs().max()
    assert torch.equal(ga.sign()[big], gb.sign()[big])  # what the ℓ∞ step uses


def test_batched_eot_attacks_equal_the_sequential_ones(tiny) -> None:
    from medfedpure.eval.adaptive import evasion_pgd, pipeline_pgd

    d, ref, x, y = tiny
    eps = 8 / 255
    a, sa = pipeline_pgd(d, ref, x, y, eps, steps=3, eot=3, seed=2, progress=False, batched_eot=False)
    b, sb = pipeline_pgd(d, ref, x, y, eps, steps=3, eot=3, seed=2, progress=False, batched_eot=True)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert sa == sb
    a, sa = evasion_pgd(d, ref, x, y, eps, steps=3, eot=3, seed=2, factor=2, progress=False, batched_eot=False)
    b, sb = evasion_pgd(d, ref, x, y, eps, steps=3, eot=3, seed=2, factor=2, progress=False, batched_eot=True)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert sa == sb


# with a GPU --------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_eval_on_cuda_writes_the_report_and_agrees_with_the_cpu_reference(data, bundle, tmp_path) -> None:
    code, output = _run([*_small(data, bundle, tmp_path / "gpu"), "--device", "cuda", "--backend", "torch"])
    assert code in (0, 1), output
    rep = json.loads((tmp_path / "gpu" / "report.json").read_text())
    m = rep["machine"]
    assert m["device"] == "cuda" and m["gpu"] and m["defender"]["device"] == "cuda"
    checks = {c["name"]: c for c in rep["sanity"]["checks"]}
    assert checks["reference_agreement"]["t_star_equal"] is True
    assert checks["reference_agreement"]["top1_agreement"] >= 0.99
    assert "device **cuda**" in (tmp_path / "gpu" / "report.md").read_text()
    code, output = _run(_small(data, bundle, tmp_path / "cpu"))
    cpu = json.loads((tmp_path / "cpu" / "report.json").read_text())
    # the bare classifier on the clean scans: the same FP32 weights on both devices
    assert rep["pooled"]["clean"]["undefended_acc"] == cpu["pooled"]["clean"]["undefended_acc"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pipeline_attack_and_keyed_forward_on_cuda(bundle) -> None:
    from medfedpure import Defender
    from medfedpure.eval.adaptive import pipeline_pgd
    from medfedpure.eval.pipeline import keyed_forward
    from medfedpure.runtime.engines.torch_engine import TorchEngine
    from tiny_bundle import tiny_scans

    d = Defender.load(bundle, backend="torch", device="cuda")
    refs = {dev: TorchEngine(d.bundle, device=dev, precision="fp32", cuda_graphs=False) for dev in ("cpu", "cuda")}
    for r in refs.values():
        for mod in r.models.values():
            mod.requires_grad_(False)
    x = tiny_scans(4, 5)
    seeds = [11, 12, 13, 14]
    kc, kg = keyed_forward(d, refs["cpu"], x, seeds), keyed_forward(d, refs["cuda"], x, seeds)
    np.testing.assert_array_equal(kc["t_star"], kg["t_star"])
    np.testing.assert_allclose(kc["probs"], kg["probs"], atol=1e-4)
    xt = torch.from_numpy(x).cuda()
    with torch.no_grad():
        y = refs["cuda"].models["classifier"](xt).argmax(1)
    xa, _ = pipeline_pgd(d, refs["cuda"], xt, y, 8 / 255, steps=3, eot=2, seed=0, progress=False)
    assert xa.device.type == "cuda" and float((xa - xt).abs().max()) <= 8 / 255 + 1e-6
    xb, _ = pipeline_pgd(d, refs["cuda"], xt, y, 8 / 255, steps=3, eot=2, seed=0, progress=False)
    assert torch.equal(xa, xb)  # the same seed on the same device: the same attack


def test_the_attackers_reference_pipeline_runs_channels_last_on_the_cpu(bundle) -> None:
    """open_defender's torch reference (what every white-box rung differentiates): eval mode, no weight gradients,
    its convolutions in channels-last on the CPU; the Defender's own engine is not touched."""
    from medfedpure.eval.runner import EvalConfig, open_defender

    d, ref = open_defender(EvalConfig(data="d", eps=(0.1,), eps_labels=("x",), bundle=str(bundle),
                                      allow_unsigned=True))
    convs = [c for m in ref.models.values() for c in m.modules()
             if isinstance(c, torch.nn.Conv2d) and c.in_channels > 1 and c.kernel_size != (1, 1)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last)
                         and not c.weight.is_contiguous() for c in convs)
    assert all(not m.training and not any(p.requires_grad for p in m.parameters()) for m in ref.models.values())
