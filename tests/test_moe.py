"""MoE classifier: shapes, probabilities, parameter groups, determinism, config errors, ONNX export."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from medfedpure.models.moe import MoEClassifier, MoEConfig
from medfedpure.models.weights import WeightsError as CheckpointError
from medfedpure.models.weights import load_model, save_model
from medfedpure.models.weights import model_metadata as read_metadata


def _model(seed: int = 0) -> MoEClassifier:
    torch.manual_seed(seed)  # parameter init only; tests compare two models built the same way
    return MoEClassifier(MoEConfig.preset("tiny")).eval()


def test_forward_shapes_and_probabilities():
    m = _model()
    x = torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    p = m(x)
    assert p.shape == (5, 2)
    assert torch.allclose(p.sum(1), torch.ones(5), atol=1e-6)
    assert (p >= 0).all()
    assert torch.allclose(m.log_probs(x).exp(), p, atol=1e-6)
    g = m.gate_value(x)
    assert g.shape == (5,) and ((g > 0) & (g < 1)).all()


def test_mixture_is_the_gated_average_of_the_experts():
    m = _model()
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    g_lp, l_lp, gate_logit = m._mixture(x)
    g = torch.sigmoid(gate_logit)
    expected = g * g_lp.exp() + (1 - g) * l_lp.exp()
    assert torch.allclose(m(x), expected, atol=1e-7)


def test_param_groups_partition_state_dict_and_global_roundtrip():
    m = _model(0)
    groups = m.param_groups()
    keys = set(m.state_dict())
    assert set(groups["global"]) | set(groups["local"]) == keys
    assert not set(groups["global"]) & set(groups["local"])
    assert all(k.startswith("global_expert.") for k in groups["global"])
    assert not any("norm" in k for k in groups["global"])  # FedBN: norms stay local
    assert any(k.startswith("gate.") for k in groups["local"])
    other = _model(1)
    other.load_global_state_dict(m.global_state_dict())
    for k in groups["global"]:
        assert torch.equal(other.state_dict()[k], m.state_dict()[k])
    assert not torch.equal(other.state_dict()["local_expert.head.weight"], m.state_dict()["local_expert.head.weight"])
    with pytest.raises(ValueError, match="mismatch"):
        other.load_global_state_dict({})


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_classes=1), dict(global_widths=()), dict(image_size=30), dict(dropout=1.0), dict(gate_hidden=0)],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        MoEConfig(**{**MoEConfig.preset("tiny").to_dict(), **kwargs})


def test_width_multiplies_every_experts_channels():
    base, wide = MoEConfig.preset("small"), MoEConfig.preset("small", width=2)
    assert wide.global_widths == tuple(2 * w for w in base.global_widths) == (24, 48, 96, 192)
    assert wide.local_widths == tuple(2 * w for w in base.local_widths)
    assert (wide.image_size, wide.gate_hidden) == (base.image_size, base.gate_hidden)
    n = [sum(p.numel() for p in MoEClassifier(c).parameters()) for c in (base, wide)]
    assert 3.5 < n[1] / n[0] < 4.1  # conv weights grow with the square of the width
    m = MoEClassifier(MoEConfig.preset("tiny", width=3)).eval()
    assert m(torch.rand(2, 1, 32, 32)).shape == (2, 2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="width="):
            MoEConfig.preset("small", width=bad)


def test_stem_adds_full_resolution_layers_and_keeps_the_stemless_layout():
    plain, stem = MoEConfig.preset("tiny"), MoEConfig.preset("tiny", stem=2)
    assert stem.stem == 2 and replace(stem, stem=0) == plain
    m0, m2 = MoEClassifier(plain), MoEClassifier(stem)
    # no stem: the state_dict keys of every bundle written before the option existed
    assert not any(".stem." in k for k in m0.state_dict())
    extra = set(m2.state_dict()) - set(m0.state_dict())
    assert extra and all(k.split(".")[1] == "stem" for k in extra)
    assert m2.global_expert.stem[0].conv.weight.shape == (4, 1, 3, 3)  # 1 → the first width
    assert m2.global_expert.stem[1].conv.weight.shape == (4, 4, 3, 3)
    assert m2.global_expert.stages[0].conv1.weight.shape == (4, 4, 3, 3)
    # the global expert's stem convolutions travel; its norms stay local (FedBN)
    groups = m2.param_groups()
    assert "global_expert.stem.0.conv.weight" in groups["global"]
    assert "global_expert.stem.0.norm.weight" in groups["local"]
    assert "local_expert.stem.0.conv.weight" in groups["local"]
    assert MoEConfig.from_dict({k: v for k, v in plain.to_dict().items() if k != "stem"}) == plain
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    assert m2.eval()(x).shape == (3, 2)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="stem="):
            MoEConfig.preset("tiny", stem=bad)


def test_bad_input_shape_raises():
    with pytest.raises(ValueError, match="expected"):
        _model()(torch.rand(2, 3, 32, 32))


def test_checkpoint_roundtrip(tmp_path):
    m = _model()
    path = save_model(tmp_path / "c.safetensors", m, m.cfg, "moe", extra={"val_accuracy": 0.5})
    m2, cfg2, meta = load_model(path)
    assert cfg2 == m.cfg and meta["kind"] == "moe" and meta["val_accuracy"] == 0.5
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    assert torch.equal(m(x), m2(x))
    assert read_metadata(path)["config"]["global_widths"] == list(m.cfg.global_widths)
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "missing.safetensors")


@pytest.mark.slow  # the dynamo exporter takes several seconds
def test_onnx_export_matches_onnxruntime(tmp_path):
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    ort = pytest.importorskip("onnxruntime")
    m = _model()
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    path = tmp_path / "moe.onnx"
    torch.onnx.export(m, (x,), str(path), dynamo=True, opset_version=20, external_data=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, m(x).detach().numpy(), atol=1e-5)
    torch.manual_seed(0)
    stem = MoEClassifier(MoEConfig.preset("tiny", stem=1)).eval()
    torch.onnx.export(stem, (x,), str(tmp_path / "stem.onnx"), dynamo=True, opset_version=20, external_data=False)
    sess = ort.InferenceSession(str(tmp_path / "stem.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, stem(x).detach().numpy(), atol=1e-5)
