"""UNet purifier network: config validation, shapes, preconditioner identities, ONNX export."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from medfedpure.models.unet import UNet, UNetConfig, timestep_embedding


def _tiny(**kw) -> UNet:
    torch.manual_seed(0)  # weight init only; no sampling below uses global RNG
    return UNet(UNetConfig.preset("tiny", **kw)).eval()


@pytest.mark.parametrize(
    "kw",
    [
        dict(image_size=30),  # not a multiple of 4 for 3 levels
        dict(channel_mults=()),
        dict(channel_mults=(1, 0)),
        dict(groups=3),  # does not divide 8 channels
        dict(time_dim=33),
        dict(dropout=1.0),
        dict(sigma_data=0.0),
        dict(schedule="quadratic"),
        dict(num_timesteps=5),
        dict(base_channels=0),
        dict(unshuffle=0),
        dict(unshuffle=3),  # 32 is not a multiple of 3 · 4
        dict(image_size=20, unshuffle=2),  # 20 is a multiple of 4 but not of 2 · 4
    ],
)
def test_bad_config_raises(kw):
    with pytest.raises(ValueError):
        UNetConfig.preset("tiny", **kw)


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="unknown UNet preset"):
        UNetConfig.preset("huge")


def test_small_preset_size():
    n = UNet(UNetConfig.preset("small")).num_parameters()
    assert 0.2e6 <= n <= 1e6, n


def test_small_preset_unshuffles_by_two():
    cfg = UNetConfig.preset("small")
    assert cfg.unshuffle == 2
    m = UNet(cfg)
    assert m.stem.in_channels == 4 and m.out_conv.out_channels == 4  # 2² polyphase sub-images in and out


def test_config_saved_before_unshuffle_loads_at_full_resolution():
    d = UNetConfig.preset("tiny").to_dict()
    del d["unshuffle"]  # checkpoints written before the option existed
    assert UNetConfig(**d).unshuffle == 1


def test_unshuffle_body_runs_at_reduced_resolution():
    # The UNet body sees r² channels at S / r: its deepest level is r times smaller than without.
    seen: list[tuple[int, ...]] = []
    m = _tiny(unshuffle=2)
    hook = m.mid.register_forward_hook(lambda _m, inp, _out: seen.append(tuple(inp[0].shape)))
    m(torch.zeros(1, 1, 32, 32), torch.tensor([50.0]))
    hook.remove()
    assert seen == [(1, 32, 4, 4)]  # 32 px / 2 (unshuffle) / 4 (three levels) with 8·4 channels


@pytest.mark.parametrize("r", [1, 2, 4])
def test_unshuffle_shapes_identity_and_locality(r):
    m = _tiny(unshuffle=r)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 1, 32, 32, generator=g) * 2 - 1
    assert torch.equal(m(x, torch.zeros(2)), x)  # still the identity at σ = 0
    out = m(x, torch.tensor([80.0, 150.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    # Batch members stay independent (GroupNorm is per sample): scan 0 alone gives the same output.
    torch.testing.assert_close(m(x[:1], torch.tensor([80.0])), out[:1], rtol=1e-5, atol=1e-6)


def test_config_json_round_trip_lists():
    cfg = UNetConfig.preset("tiny")
    d = cfg.to_dict()
    d["channel_mults"] = list(d["channel_mults"])
    assert UNetConfig(**d) == cfg


def test_shapes_and_dtype():
    m = _tiny()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 32, 32, generator=g)
    out = m(x, torch.tensor([0.0, 17.5, 999.0]))
    assert out.shape == (3, 1, 32, 32) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_identity_at_t0_and_skip_dominates_at_small_t():
    m = _tiny()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 1, 32, 32, generator=g) * 2 - 1
    assert torch.equal(m(x, torch.zeros(2)), x)  # c_skip = 1, c_out = 0 at σ = 0
    # c_skip(σ) and c_out(σ) at t = 1000 and t = 1 (EDM eq. 7 with σ_d = 0.5)
    _, c_skip, c_out, c_in = m.precondition(torch.tensor([1.0]))
    assert c_skip.item() > 0.999 and c_out.item() < 0.02


def test_fresh_network_is_preconditioned_identity():
    # ResBlocks start at zero residual but the output conv is random: the net output is c_skip·x̂
    # plus a small term; check the wrapper algebra against a hand computation instead.
    m = _tiny()
    t = torch.tensor([100.0])
    x = torch.full((1, 1, 32, 32), 0.3)
    inv, c_skip, c_out, c_in = m.precondition(t)
    expected = c_skip * x * inv + c_out * m.network(c_in * x * inv, t)
    torch.testing.assert_close(m(x, t), expected)


def test_timestep_embedding_values():
    e = timestep_embedding(torch.tensor([0.0, 1.0]), 4)
    # freqs = [1, 1e-2]; [cos(t f), sin(t f)]
    expected = torch.tensor([[1.0, 1.0, 0.0, 0.0], [np.cos(1.0), np.cos(0.01), np.sin(1.0), np.sin(0.01)]])
    torch.testing.assert_close(e, expected.float())


@pytest.mark.slow
@pytest.mark.parametrize("r", [1, 2])
def test_onnx_export_matches_onnxruntime(tmp_path, r):
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    ort = pytest.importorskip("onnxruntime")
    m = _tiny(unshuffle=r)
    for p in m.parameters():  # non-zero residual branches, so that every layer shows in the output
        p.data.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 32, 32, generator=g)
    t = torch.tensor([12.5, 180.0])
    path = tmp_path / "unet.onnx"
    torch.onnx.export(m, (x, t), str(path), input_names=["x_t", "t"], output_names=["x0_hat"],
                      opset_version=20, dynamo=True, external_data=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x2 = torch.randn(2, 1, 32, 32, generator=g)  # new values, same static shapes
    t2 = torch.tensor([0.0, 63.25])
    got = sess.run(None, {"x_t": x2.numpy(), "t": t2.numpy()})[0]
    with torch.no_grad():
        ref = m(x2, t2).numpy()
    assert np.abs(got - ref).max() < 1e-5
