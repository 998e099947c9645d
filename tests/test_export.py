"""Export: ONNX with a dynamic batch, FP16 conversion that keeps FP32 islands, the manifest, the gate rule."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from medfedpure.export.fp16 import FP32_OPS, convert_to_fp16, fp16_summary
from medfedpure.export.onnx_export import compare_outputs, export_module, ort_session, verify_against_torch
from medfedpure.export.pipeline import ExportVerificationError, check_report
from medfedpure.runtime.bundle import verify_bundle
from tiny_bundle import cached_tiny_bundle, tiny_scans
from torch import nn

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
torch.set_num_threads(1)


class StandIn(nn.Module):
    """Conv + GroupNorm + LayerNorm + nearest upsampling + mean + softmax, with a side input t."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.gn(torch.relu(self.conv(x))) * (1 + t.reshape(-1, 1, 1, 1))
        h = nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
        return torch.softmax(self.head(self.ln(h.mean((2, 3)))), -1)


@pytest.fixture(scope="module")
def standin() -> tuple[nn.Module, onnx.ModelProto]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = StandIn().eval()
    g = torch.Generator().manual_seed(1)
    return m, export_module(m, (torch.rand(2, 1, 16, 16, generator=g), torch.rand(2, generator=g)), ["x", "t"],
                            ["probs"])


def _inputs(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.random((n, 1, 16, 16), dtype=np.float32), "t": rng.random(n, dtype=np.float32)}


def test_dynamic_batch_matches_torch(standin) -> None:
    m, model = standin
    assert model.opset_import[0].version == 20
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    for n in (1, 3, 8):
        r = verify_against_torch(m, model, _inputs(n, n), classify=True)
        assert r.n == n and r.max_abs < 1e-6 and r.top1 == 1.0


def test_fp16_keeps_fp32_interface_and_islands(standin) -> None:
    m, model = standin
    half = convert_to_fp16(model)
    g = half.graph
    for v in list(g.input) + list(g.output):
        assert v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, v.name
    summary = fp16_summary(half)
    assert summary["fp16_initializers"] >= 2 and summary["casts"] >= 2  # conv/linear weights went FP16
    inferred = onnx.shape_inference.infer_shapes(half)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(g.input)}
    types.update({i.name: i.data_type for i in g.initializer})
    kept = [n for n in g.node if n.op_type in FP32_OPS and n.op_type not in ("Cast", "CastLike")]
    assert {n.op_type for n in kept} >= {"Softmax", "ReduceMean"}
    for n in kept:  # every input and output of a normalisation / softmax / reduction is FP32
        for name in [*n.input, *n.output]:
            if name and types.get(name) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                assert types[name] == onnx.TensorProto.FLOAT, (n.op_type, name)
    convs = [n for n in g.node if n.op_type == "Conv"]
    assert convs and types[convs[0].input[1]] == onnx.TensorProto.FLOAT16
    r = verify_against_torch(m, half, _inputs(16), classify=True)
    assert r.max_abs < 2e-3 and r.top1 == 1.0
    assert ort_session(half).get_outputs()[0].type == "tensor(float)"


def test_fp16_from_keeps_side_branch_fp32(standin) -> None:
    _, model = standin
    half = convert_to_fp16(model, fp16_from=frozenset({"x"}))
    inferred = onnx.shape_inference.infer_shapes(half)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    t_consumers = [n for n in half.graph.node if "t" in n.input]
    assert t_consumers and all(n.op_type != "Cast" or dict((a.name, a.i) for a in n.attribute)["to"] != 10
                               for n in t_consumers)  # t is never cast to FP16 directly
    for n in t_consumers:
        for o in n.output:
            assert types.get(o, onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT16
    with pytest.raises(ValueError, match="not graph inputs"):
        convert_to_fp16(model, fp16_from=frozenset({"nope"}))


def test_compare_outputs_statistics() -> None:
    ref = np.array([[0.9, 0.1], [0.4, 0.6]], np.float32)
    got = np.array([[0.8, 0.2], [0.6, 0.4]], np.float32)
    r = compare_outputs(ref, got, classify=True)
    assert r.top1 == 0.5 and abs(r.max_abs - 0.2) < 1e-6 and abs(r.mean_abs - 0.15) < 1e-6
    with pytest.raises(ValueError, match="shapes"):
        compare_outputs(ref, got[:1])


def test_check_report_thresholds() -> None:
    ok = {"fp32": {"classifier": {"max_abs": 1e-7, "top1": 1.0}, "mae": {"max_abs": 1e-6},
                   "denoiser": {"max_abs": 1e-6}},
          "fp16": {"classifier": {"top1": 1.0}}}
    check_report(ok)
    bad = {**ok, "fp16": {"classifier": {"top1": 0.9}}}
    with pytest.raises(ExportVerificationError, match="FP16 classifier"):
        check_report(bad)


def test_tiny_bundle_manifest() -> None:
    from medfedpure.models.diffusion import make_alphas_cumprod
    from medfedpure.models.mae import scoring_masks

    vb = verify_bundle(cached_tiny_bundle())
    m = vb.manifest
    assert vb.classes == ("no_tumor", "tumor") and vb.image_size == 32
    assert {(a.role, a.format, a.precision) for a in vb.artefacts.values()} == {
        (r, f, p) for r in ("classifier", "mae", "denoiser") for f, p in (("onnx", "fp32"), ("onnx", "fp16"),
                                                                          ("safetensors", "fp32"))} | {
        ("card", "markdown", "none")}  # MODEL_CARD.md
    spec = vb.spec
    np.testing.assert_array_equal(spec.mae.visible, scoring_masks(16, 4))
    assert m["mae"]["visible"]["encoding"] == "packbits-base64" and m["mae"]["visible"]["shape"] == [4, 16]
    np.testing.assert_array_equal(spec.purifier.alphas_cumprod,
                                  make_alphas_cumprod(spec.purifier.schedule, spec.purifier.num_timesteps).numpy())
    assert spec.preprocessing.size == 32 and spec.purifier.sampler == "ddim_eta0_uniform"
    assert m["format_version"] == 2
    v = m["provenance"]["verification"]
    assert v["fp32"]["classifier"]["top1"] == 1.0 and v["fp32"]["classifier"]["max_abs"] < 1e-5
    assert v["fp32"]["mae"]["max_abs"] < 1e-4 and v["fp32"]["denoiser"]["max_abs"] < 1e-4
    assert v["fp16"]["mae"]["max_abs"] < 1e-2 and v["fp16"]["gate_flag_agreement"] >= 0.9
    assert all(a >= 0.99 for a in v["purifier_fp16_top1"].values())
    for name in ("classifier", "mae", "denoiser"):
        model = onnx.load_from_string(vb.read_bytes(name))
        assert [i.name for i in model.graph.input][0] in ("x", "x_t")


def _names_a_source_path(text: str) -> bool:
    return ".py" in text or "/work/" in text or "site-packages" in text or "File \"" in text


@pytest.mark.parametrize("name", ["classifier", "classifier.fp16", "mae", "mae.fp16", "denoiser", "denoiser.fp16"])
def test_shipped_graphs_hold_no_exporter_metadata(name: str) -> None:
    """Neither the exported tiny bundle's graphs nor the default bundle's carry metadata or paths."""
    from medfedpure.export.onnx_export import metadata_entries
    from medfedpure.runtime.bundle import default_bundle_path

    for root in (cached_tiny_bundle(), default_bundle_path()):
        data = verify_bundle(root).read_bytes(name)
        assert metadata_entries(onnx.load_from_string(data)) == []
        assert b"stack_trace" not in data and b"site-packages" not in data and b"/work/" not in data


def test_strip_metadata_keeps_the_graph(standin) -> None:
    """A fresh dynamo export has stack traces naming source files; stripping leaves only the computation."""
    from medfedpure.export.onnx_export import metadata_entries, strip_metadata

    module, exported = standin
    g = torch.Generator().manual_seed(1)
    inputs = (torch.rand(2, 1, 16, 16, generator=g), torch.rand(2, generator=g))
    raw = torch.onnx.export(module.eval(), inputs, dynamo=True, opset_version=20, input_names=["x", "t"],
                            output_names=["probs"], external_data=False, verbose=False).model_proto
    assert any(_names_a_source_path(v) for _, v in metadata_entries(raw))
    before = [(i.name, i.raw_data) for i in raw.graph.initializer]
    ops = [(n.op_type, list(n.input), list(n.output)) for n in raw.graph.node]
    clean = strip_metadata(raw)
    assert metadata_entries(clean) == []
    assert [(i.name, i.raw_data) for i in clean.graph.initializer] == before
    assert [(n.op_type, list(n.input), list(n.output)) for n in clean.graph.node] == ops
    assert metadata_entries(exported) == []  # export_module strips on the way out


def test_gate_decision_rule_matches_ops() -> None:
    from medfedpure.gate import GateSpec, patch_gate_reference

    rng = np.random.default_rng(0)
    x = rng.random((12, 32, 32), dtype=np.float32)
    recon = rng.random((12, 4, 32, 32), dtype=np.float32)
    from medfedpure.models.mae import scoring_masks

    vis = scoring_masks(16, 4)
    base = patch_gate_reference(x, recon, vis, patch=8, tau=0.0, tau_high=1.0, t_min=0, t_max=0).score
    tau, tau_high = float(np.median(base)), float(np.max(base))
    for floor in (False, True):
        ref = patch_gate_reference(x, recon, vis, patch=8, tau=tau, tau_high=tau_high, t_min=20, t_max=150,
                                   floor=floor)
        spec = GateSpec(stat="mean", patch=8, topk=0, norm_pix=False, tau=tau, tau_high=tau_high, t_min=20, t_max=150,
                        policy="floor" if floor else "adaptive")
        flag, t_star = spec.decide(ref.score)
        np.testing.assert_array_equal(flag, ref.flag)
        np.testing.assert_array_equal(t_star, ref.t_star)


def test_hfratio_gate_through_the_engine() -> None:
    """hfratio through the engine's gate (the C++ kernel) equals the calibration's scores (the gate's
    oracle) bit for bit, with the spec's decision rule."""
    import dataclasses

    from medfedpure.gate import gate_scores
    from medfedpure.runtime.engines import create_engine

    vb = verify_bundle(cached_tiny_bundle())
    eng = create_engine(vb, "onnxruntime", "cpu", threads=1)
    x = tiny_scans(6, 8)
    recon = eng.mae(x)
    score, err = gate_scores(x[:, 0], recon, eng.visible, patch=8, stat="hfratio", topk=8)
    eng.gate_spec = dataclasses.replace(eng.gate_spec, stat="hfratio", topk=8, tau=float(np.median(score)),
                                        tau_high=float(np.max(score)) + 1)
    g = eng.gate(x, recon, return_patch_err=True)
    np.testing.assert_array_equal(g.score, score)
    np.testing.assert_array_equal(g.patch_err, err)
    flag, t_star = eng.gate_spec.decide(score)
    np.testing.assert_array_equal(g.flag, flag)
    np.testing.assert_array_equal(g.t_star, t_star)
    assert g.flag.sum() >= 3 and g.patch_err.shape == err.shape


@pytest.mark.tensorrt
def test_tensorrt_builder_guarded() -> None:
    from medfedpure.export.tensorrt import ProfileSpec, TensorRTUnavailable, import_tensorrt

    with pytest.raises(ValueError):
        ProfileSpec(2, 1, 8)
    try:
        import_tensorrt()
    except TensorRTUnavailable as e:
        assert "pip install" in str(e)
        pytest.skip("TensorRT is not installed")
