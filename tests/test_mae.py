"""MAE detector: patchify, scoring masks, training forward, scorer, determinism, ONNX export."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from medfedpure.models.mae import (
    MAEConfig,
    MAEScorer,
    MaskedAutoencoder,
    normalize_patches,
    patchify,
    scoring_masks,
    unpatchify,
)
from medfedpure.models.weights import load_model, save_model


def _mae(**kw) -> MaskedAutoencoder:
    torch.manual_seed(0)  # parameter init only
    return MaskedAutoencoder(MAEConfig(**{**MAEConfig.preset("tiny").to_dict(), **kw}))


def _x(b: int = 3, s: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 1, s, s, generator=torch.Generator().manual_seed(seed))


def test_patchify_roundtrip_and_order():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (1, 4, 4)
    assert p[0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]  # patch (0,1), pixels row-major
    assert torch.equal(unpatchify(p, 2), x[:, 0])
    y = _x(2, 16)
    assert torch.equal(unpatchify(patchify(y, 4), 4), y[:, 0])


def test_normalize_patches_zero_mean_unit_var():
    p = torch.rand(2, 5, 16, generator=torch.Generator().manual_seed(1))
    n = normalize_patches(p)
    assert torch.allclose(n.mean(-1), torch.zeros(2, 5), atol=1e-5)
    assert torch.allclose(n.var(-1, unbiased=False), torch.ones(2, 5), atol=1e-3)


@pytest.mark.parametrize("np_,k", [(16, 4), (256, 4), (64, 2), (36, 9), (64, 16)])
def test_scoring_masks_partition_the_patches(np_, k):
    v = scoring_masks(np_, k)
    assert v.shape == (k, np_) and v.dtype == bool
    assert (v.sum(0) == 1).all()  # each patch visible in exactly one set
    assert (v.sum(1) == np_ // k).all()  # each set hides 1 - 1/k
    if k == 4:  # 2x2 lattice: patch (0,0) in set 0, (0,1) in set 1, (1,0) in set 2
        g = int(np_**0.5)
        assert v[0, 0] and v[1, 1] and v[2, g] and v[3, g + 1]


def test_scoring_masks_errors():
    with pytest.raises(ValueError, match="square"):
        scoring_masks(15, 4)
    with pytest.raises(ValueError, match="unequal"):
        scoring_masks(25, 4)


@pytest.mark.parametrize(
    "kw",
    [dict(patch=7), dict(mask_ratio=1.0), dict(embed_dim=30), dict(score_sets=3), dict(visible_loss_weight=-1)],
)
def test_bad_config_raises(kw):
    with pytest.raises(ValueError):
        MAEConfig(**{**MAEConfig.preset("tiny").to_dict(), **kw})


def test_training_forward_masks_and_determinism():
    m = _mae()
    x = _x()
    o1 = m(x, generator=torch.Generator().manual_seed(5))
    o2 = m(x, generator=torch.Generator().manual_seed(5))
    o3 = m(x, generator=torch.Generator().manual_seed(6))
    assert o1.pred.shape == (3, 16, 64) and o1.mask.shape == (3, 16)
    assert (o1.mask.sum(1) == 12).all()  # 75 % of 16 patches hidden
    assert torch.equal(o1.loss, o2.loss) and torch.equal(o1.mask, o2.mask)
    assert not torch.equal(o1.mask, o3.mask)
    # the loss is the MSE over the hidden patches
    per = ((o1.pred - patchify(x, 8)) ** 2).mean(-1)
    assert torch.allclose(o1.loss, (per * o1.mask).sum() / o1.mask.sum())


def test_visible_loss_term_and_norm_pix_target():
    m = _mae(visible_loss_weight=0.5, norm_pix=True)
    x = _x()
    o = m(x, generator=torch.Generator().manual_seed(5))
    per = ((o.pred - normalize_patches(patchify(x, 8))) ** 2).mean(-1)
    exp = (per * o.mask).sum() / o.mask.sum() + 0.5 * (per * (1 - o.mask)).sum() / (1 - o.mask).sum()
    assert torch.allclose(o.loss, exp)


def test_scorer_equals_training_path_with_the_fixed_masks():
    """recon[:, k] must be exactly what the MAE predicts when shown the patches of set k."""
    m = _mae().eval()
    s = MAEScorer(m)
    x = _x(2)
    with torch.no_grad():
        r = s(x)
        assert r.shape == (2, 4, 32, 32)
        for k in range(4):
            keep = torch.nonzero(s.visible[k]).squeeze(1)
            hid = torch.nonzero(~s.visible[k]).squeeze(1)
            ids_shuffle = torch.cat([keep, hid])
            ids_restore = torch.argsort(ids_shuffle)
            p = patchify(x, 8)
            pred = m.decode(m.encode(p, keep.expand(2, -1)), ids_restore.expand(2, -1))
            torch.testing.assert_close(r[:, k], unpatchify(pred, 8), atol=1e-5, rtol=1e-5)
    # batch independence: scoring one scan alone gives the same reconstruction
    with torch.no_grad():
        torch.testing.assert_close(s(x[:1]), r[:1], atol=1e-5, rtol=1e-5)


def test_one_step_lowers_the_loss():
    m = _mae()
    x = _x(8, seed=3) * 0.5 + 0.25
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(2):
        loss = m(x, generator=torch.Generator().manual_seed(0)).loss
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[1] < losses[0]


def test_checkpoint_roundtrip(tmp_path):
    m = _mae().eval()
    path = save_model(tmp_path / "mae.safetensors", m, m.cfg, "mae")
    m2, cfg2, meta = load_model(path)
    assert cfg2 == m.cfg and meta["kind"] == "mae"
    x = _x(2)
    with torch.no_grad():
        assert torch.equal(MAEScorer(m)(x), MAEScorer(m2)(x))


@pytest.mark.slow  # the dynamo exporter takes several seconds
def test_scorer_onnx_export_matches_onnxruntime(tmp_path):
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    ort = pytest.importorskip("onnxruntime")
    s = MAEScorer(_mae()).eval()
    x = _x(2)
    path = tmp_path / "mae.onnx"
    torch.onnx.export(s, (x,), str(path), dynamo=True, opset_version=20, external_data=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, s(x).numpy(), atol=1e-5)
