"""The attack detector (models.detector) and its training (train.detector): shapes, the per-patch
semantics, the checkpoint round trip, the attacks it trains against, and that training separates an
attack it can see."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from medfedpure.gate.calibration import auroc
from medfedpure.models.detector import AttackDetector, DetectorConfig, reduce_topk
from medfedpure.models.moe import MoEClassifier, MoEConfig
from medfedpure.models.weights import load_model, save_model
from medfedpure.train.attacks import band_limited
from medfedpure.train.detector import (
    DetectorTrainConfig,
    attacked,
    detector_scores,
    evade,
    fit_detector,
    train_detector,
)


def _scans(n: int, s: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random 'scans' in [0.1, 0.9]: a blurred noise field (no fine-scale content of their own)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, 1, s // 4, s // 4), generator=g)
    return (0.1 + 0.8 * band_limited(x, 4)).clamp(0, 1)


def _classifier() -> MoEClassifier:
    torch.manual_seed(0)
    return MoEClassifier(MoEConfig.preset("tiny")).eval()


# --- the model -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(patch=6, channels=(4, 8, 8)), "power of two"),
    (dict(image_size=36), "multiple of patch"),
    (dict(channels=(4, 8, 8)), r"expected 4 positive ints"),
    (dict(channels=(4, 8, 0, 8)), "positive ints"),
    (dict(topk=17), r"1\.\.16"),
    (dict(topk=0), r"1\.\.16"),
    (dict(patch=8.0), "expected an int"),
])
def test_config_refuses_bad_values(kw, match):
    base = dict(image_size=32, patch=8, channels=(4, 8, 8, 8), topk=4)
    with pytest.raises(ValueError, match=match):
        DetectorConfig(**{**base, **kw})


def test_config_round_trip_and_presets():
    cfg = DetectorConfig.preset("small")
    assert (cfg.image_size, cfg.patch, cfg.grid, cfg.num_patches, cfg.topk) == (128, 8, 16, 256, 16)
    assert DetectorConfig.from_dict(cfg.to_dict() | {"channels": list(cfg.channels)}) == cfg
    patch16 = DetectorConfig(patch=16, channels=(8, 8, 16, 16, 16))
    assert patch16.num_patches == 64
    with pytest.raises(ValueError, match="unknown detector preset"):
        DetectorConfig.preset("huge")


def test_small_detector_size_and_output_shapes():
    det = AttackDetector(DetectorConfig.preset("small")).eval()
    assert 55_000 < sum(p.numel() for p in det.parameters()) < 70_000
    x = torch.rand(3, 1, 128, 128)
    with torch.no_grad():
        logits, score = det(x), det.score(x)
    assert logits.shape == (3, 256) and score.shape == (3,)
    np.testing.assert_allclose(score.numpy(), np.sort(logits.numpy(), 1)[:, -16:].mean(1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"expected \[B, 1, 128, 128\]"):
        det(torch.rand(3, 1, 64, 64))
    with pytest.raises(ValueError, match=r"expected \[B, 1, 128, 128\]"):
        det(torch.rand(3, 128, 128))


def test_reduce_topk_is_the_mean_of_the_largest():
    v = torch.tensor([[1.0, 5.0, 3.0, -2.0], [0.0, 0.0, 7.0, 1.0]])
    assert reduce_topk(v, 2).tolist() == [4.0, 4.0]
    assert reduce_topk(v, 4).tolist() == [1.75, 2.0]


def test_patch_logits_are_local_row_major():
    """Patch p's logit depends only on the pixels within 4–5 px of patch p (receptive field 17 px): change
    the top-left patch and only the logits of that patch and its neighbours move."""
    torch.manual_seed(1)
    det = AttackDetector(DetectorConfig.preset("tiny")).eval()
    x = _scans(1)
    x2 = x.clone()
    x2[..., :8, :8] = torch.rand(8, 8)
    with torch.no_grad():
        d = (det(x2) - det(x)).abs().reshape(4, 4)
    assert d[0, 0] > 1e-4
    assert torch.all(d[2:, :] == 0) and torch.all(d[:, 2:] == 0)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(2)
    det = AttackDetector(DetectorConfig.preset("tiny")).eval()
    path = save_model(tmp_path / "detector.safetensors", det, det.cfg, "detector")
    det2, cfg2, meta = load_model(path)
    assert isinstance(det2, AttackDetector) and cfg2 == det.cfg and meta["kind"] == "detector"
    x = _scans(4)
    with torch.no_grad():
        torch.testing.assert_close(det2(x), det(x), rtol=0, atol=0)


# --- training ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(train_eps=()), "train_eps"),
    (dict(train_eps=(8,)), "train_eps"),
    (dict(train_eps_l2=(0.5, 0.0)), "train_eps_l2"),
    (dict(epochs=0), "epochs"),
    (dict(harden_rounds=-1), "harden_rounds"),
    (dict(harden_lr=0.0), "harden_lr"),
    (dict(target_false_flag_rate=0.5), "target_false_flag_rate"),
])
def test_train_config_refuses_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        DetectorTrainConfig(**kw)


def test_attacked_keeps_each_scans_radius():
    clf = _classifier()
    x, y = _scans(6), torch.tensor([0, 1, 0, 1, 0, 1])
    x0 = x.clone()
    eps = np.array([2, 4, 8, 2, 4, 8]) / 255
    xa = attacked(clf, x, y, eps, steps=3, seed=0)
    assert torch.equal(x, x0)
    dist = (xa - x).abs().amax((1, 2, 3)).numpy()
    assert np.all(dist <= eps + 1e-6) and np.all(dist > 0.5 * eps)
    assert xa.min() >= 0 and xa.max() <= 1
    torch.testing.assert_close(attacked(clf, x, y, eps, steps=3, seed=0), xa, rtol=0, atol=0)
    assert all(t.is_contiguous() for t in clf.state_dict().values())  # channels-last inside, put back after


def test_attacked_mixes_linf_and_l2_scan_by_scan():
    """The config's cycle (ℓ∞ radii, then ℓ2 radii) reaches each scan; each scan stays in its own ball."""
    cfg = DetectorTrainConfig(train_eps=(4 / 255,), train_eps_l2=(0.5, 1.0))
    eps, norms = cfg.attacks(6)
    assert norms.tolist() == ["linf", "l2", "l2"] * 2
    np.testing.assert_allclose(eps, [4 / 255, 0.5, 1.0] * 2)
    clf = _classifier()
    x, y = _scans(6), torch.tensor([0, 1, 0, 1, 0, 1])
    x0 = x.clone()
    xa = attacked(clf, x, y, eps, steps=3, seed=0, norm=norms)
    assert torch.equal(x, x0)
    d = (xa - x).flatten(1)
    linf, l2 = d.abs().amax(1).numpy(), d.norm(dim=1).numpy()
    is_inf = norms == "linf"
    assert np.all(linf[is_inf] <= eps[is_inf] + 1e-6) and np.all(linf[is_inf] > 0.5 * eps[is_inf])
    assert np.all(l2[~is_inf] <= eps[~is_inf] + 1e-4) and np.all(l2[~is_inf] > 0.5 * eps[~is_inf])
    # an ℓ2 ball of 0.5 at this size allows single pixels far beyond 4/255: the norms really differ
    assert linf[~is_inf].max() > 4 / 255
    torch.testing.assert_close(attacked(clf, x, y, eps, steps=3, seed=0, norm=norms), xa, rtol=0, atol=0)


def test_fit_detector_learns_a_visible_attack():
    """Fine-scale ±16/255 sign noise on smooth scans: a few epochs separate held-out clean and noisy scans."""
    g = torch.Generator().manual_seed(3)

    def noisy(x: torch.Tensor) -> torch.Tensor:
        return (x + 16 / 255 * torch.randint(0, 2, x.shape, generator=g).mul(2).sub(1)).clamp(0, 1)

    x_tr, x_te = _scans(96, seed=4), _scans(32, seed=5)
    torch.manual_seed(0)
    det = AttackDetector(DetectorConfig.preset("tiny"))
    losses = fit_detector(det, x_tr, noisy(x_tr), epochs=6, seed=0, batch_size=32, lr=1e-2, progress=False)
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert not det.training
    assert all(t.is_contiguous() for t in det.state_dict().values())  # trained in channels-last, put back after
    assert auroc(detector_scores(det, x_te), detector_scores(det, noisy(x_te))) > 0.95
    with pytest.raises(ValueError, match="need both"):
        fit_detector(det, x_tr, x_tr[:0], epochs=1, seed=0, progress=False)


def test_evade_stays_in_the_ball_and_band_limits():
    clf = _classifier()
    torch.manual_seed(0)
    det = AttackDetector(DetectorConfig.preset("tiny")).eval()
    x, y = _scans(4), torch.tensor([0, 1, 0, 1])
    eps = 8 / 255
    pixel = evade(clf, det, x, y, eps, tau=0.0, steps=4, factor=1)
    band = evade(clf, det, x, y, eps, tau=0.0, steps=4, factor=4)
    for xe in (pixel, band):
        assert (xe - x).abs().max() <= eps + 1e-6 and xe.min() >= 0 and xe.max() <= 1

    def finest(d: torch.Tensor) -> float:  # energy of the diagonal difference: the finest scale
        return float((d[..., 1:, 1:] - d[..., :-1, :-1]).pow(2).mean() / d.pow(2).mean().clamp_min(1e-12))

    assert finest(band - x) < 0.25 * finest(pixel - x)
    with pytest.raises(ValueError, match="does not divide"):
        evade(clf, det, x, y, eps, tau=0.0, steps=1, factor=5)


def test_evade_without_a_threshold_attacks_the_classifier():
    """τ = +inf: no scan is ever flagged, so the evasion is PGD on the classifier and lowers its accuracy."""
    clf = _classifier()
    det = AttackDetector(DetectorConfig.preset("tiny")).eval()
    x = _scans(16, seed=6)
    with torch.no_grad():
        y = clf(x).argmax(1)  # right on every clean scan by construction
    xe = evade(clf, det, x, y, 16 / 255, tau=float("inf"), steps=10)
    with torch.no_grad():
        assert (clf(xe).argmax(1) == y).float().mean() < 1.0


def test_train_detector_reports_every_round_and_leaves_inputs_alone():
    clf = _classifier()
    x, x_cal = _scans(24, seed=7), _scans(20, seed=8)
    y = torch.arange(24) % 2
    x0 = x.clone()
    torch.manual_seed(0)
    det = AttackDetector(DetectorConfig.preset("tiny"))
    cfg = DetectorTrainConfig(epochs=2, batch_size=16, attack_steps=2, harden_rounds=2, harden_scans=8,
                              harden_steps=2, harden_epochs=1)
    rep = train_detector(det, clf, x, y, x_cal, cfg, progress=False)
    assert torch.equal(x, x0)
    assert len(rep["losses"]) == 2 and rep["n_train"] == 24 and rep["n_cal"] == 20
    assert len(rep["rounds"]) == 2
    for r in rep["rounds"]:
        assert 0.0 <= r["evasion_flagged_before"] <= 1.0 and np.isfinite(r["tau"]) and len(r["losses"]) == 1
    with pytest.raises(ValueError, match="at least 20"):
        train_detector(det, clf, x, y, x_cal[:5], cfg, progress=False)


# --- export --------------------------------------------------------------------------------------------


def test_onnx_export_matches_torch_fp32_and_fp16():
    from medfedpure.export.fp16 import convert_to_fp16
    from medfedpure.export.onnx_export import export_detector, verify_against_torch

    torch.manual_seed(3)
    det = AttackDetector(DetectorConfig.preset("tiny")).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that the folded graph is checked
        for m in det.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    model = export_detector(det, 32)
    assert [o.name for o in model.graph.output] == ["patch_logits"]
    x = {"x": _scans(5, seed=9).numpy()}
    r32 = verify_against_torch(det, model, x)
    assert r32.n == 5 and r32.max_abs < 1e-5
    r16 = verify_against_torch(det, convert_to_fp16(model), x)
    assert r16.max_abs < 2e-2


# --- the classifier it guards, the report, the command ------------------------------------------------


def test_load_classifier_from_file_run_folder_and_bundle(tmp_path):
    from medfedpure.train.detector import ClassifierLoadError, load_classifier
    from tiny_bundle import cached_tiny_bundle

    clf = _classifier()
    save_model(tmp_path / "run" / "classifier.safetensors", clf, clf.cfg, "moe")
    x = _scans(3)
    for src in (tmp_path / "run", tmp_path / "run" / "classifier.safetensors"):
        got = load_classifier(src)
        assert not got.training and not any(p.requires_grad for p in got.parameters())
        with torch.no_grad():
            torch.testing.assert_close(got(x), clf(x))
    assert isinstance(load_classifier(cached_tiny_bundle()), MoEClassifier)
    det = AttackDetector(DetectorConfig.preset("tiny"))
    save_model(tmp_path / "det.safetensors", det, det.cfg, "detector")
    with pytest.raises(ClassifierLoadError, match="not a classifier"):
        load_classifier(tmp_path / "det.safetensors")
    with pytest.raises(ClassifierLoadError, match="give a bundle folder"):
        load_classifier(tmp_path / "missing.safetensors")


def test_evaluate_detector_reports_the_calibrated_rates():
    from medfedpure.train.detector import evaluate_detector

    clf = _classifier()
    torch.manual_seed(0)
    det = AttackDetector(DetectorConfig.preset("tiny"))
    x_cal, x = _scans(40, seed=10), _scans(20, seed=11)
    y = torch.arange(20) % 2
    r = evaluate_detector(det, clf, x_cal, x, y, [4 / 255, 8 / 255], steps=2, eps_l2=[0.5])
    s_cal = detector_scores(det, x_cal)
    assert r["tau"] == pytest.approx(float(np.quantile(s_cal, 0.95)))
    assert r["false_flag_rate"] == pytest.approx(float((detector_scores(det, x) >= r["tau"]).mean()))
    assert set(r["auroc"]) == {"4/255", "8/255", "l2 0.5"} and all(0.0 <= v <= 1.0 for v in r["auroc"].values())
    assert set(r["flagged_attacked"]) == set(r["auroc"])
    assert (r["n_cal"], r["n_test"]) == (40, 20)


def test_cli_train_detector_tiny(tmp_path, monkeypatch):
    import json

    from medfedpure.cli import app
    from medfedpure.cli import train as tcli
    from typer.testing import CliRunner

    def fake_split(data, site, split, size):
        n = {"train": 24, "val": 20, "test": 10}[split]
        x = _scans(n, s=size, seed=100 * site + len(split)).numpy()
        return x, (np.arange(n) % 2).astype(np.int64)

    monkeypatch.setattr(tcli, "load_site_split", fake_split)
    clf = _classifier()
    save_model(tmp_path / "clf.safetensors", clf, clf.cfg, "moe")
    data = tmp_path / "data"
    data.mkdir()
    run = tmp_path / "run"
    base = ["train", "detector", "--data", str(data), "--out", str(run), "--classifier", str(tmp_path / "clf.safetensors"),
            "--config", "tiny", "--sites", "0,1", "--per-site", "16", "--no-progress"]
    r = CliRunner().invoke(app, [*base, "--harden", "1", "--harden-scans", "8", "--eval-eps", "8"])
    assert r.exit_code == 0, r.output
    det, cfg, meta = load_model(run / "detector.safetensors")
    assert isinstance(det, AttackDetector) and cfg == DetectorConfig.preset("tiny") and meta["sites"] == [0, 1]
    m = json.loads((run / "metrics.json").read_text())["detector"]
    assert m["n_train"] == 32 and m["n_cal"] == 40 and len(m["rounds"]) == 1 and len(m["losses"]) == 2
    assert set(m["sites"]) == {"site_0", "site_1"} and set(m["sites"]["site_1"]["auroc"]) == {"8/255", "l2 0.5"}
    r = CliRunner().invoke(app, [*base, "--dry-run"])
    assert r.exit_code == 0 and '"harden_rounds": 0' in r.output and '"harden_steps": 2' in r.output
    assert json.loads(r.output)["train"]["train_eps_l2"] == []
    r = CliRunner().invoke(app, [*base, "--dry-run", "--train-l2", "0.5,1"])
    assert r.exit_code == 0 and json.loads(r.output)["train"]["train_eps_l2"] == [0.5, 1.0]
    r = CliRunner().invoke(app, [*base, "--train-l2", "-1"])
    assert r.exit_code != 0 and "train_eps_l2" in r.output
    r = CliRunner().invoke(app, [*base, "--dry-run", "--harden-steps", "100"])
    assert r.exit_code == 0 and '"harden_steps": 100' in r.output
    r = CliRunner().invoke(app, [*base, "--train-eps", "2,x"])
    assert r.exit_code != 0 and "comma-separated numbers" in r.output
    r = CliRunner().invoke(app, [*base, "--train-eps", "300"])
    assert r.exit_code != 0 and "train_eps" in r.output
    r = CliRunner().invoke(app, [*base, "--classifier", str(run / "detector.safetensors")])
    assert r.exit_code != 0 and "not a classifier" in r.output
