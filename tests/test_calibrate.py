"""Gate statistics (numpy) and per-site calibration: exact thresholds, invariances, file fields."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from medfedpure.gate import WHITE_RATIO, GateSpec, gate_scores, tissue_patches
from medfedpure.models.diffusion import PURIFY_DEFAULTS, PurifySchedule
from medfedpure.models.mae import MAEConfig, MaskedAutoencoder, scoring_masks
from medfedpure.models.weights import save_tensors
from medfedpure.train.calibrate import (
    CalibrationConfig,
    calibrate_gate,
    calibration_gate_spec,
    student_schedule,
    threshold_at_ffr,
)

VIS = scoring_masks(16, 4)  # 32 px scans, 8 px patches


def _band_limited(rng: np.random.Generator, n: int, s: int, frac: float) -> np.ndarray:
    """Gaussian noise keeping only |f| <= frac/2 per axis (k-space truncation, as MR scanners do)."""
    z = rng.standard_normal((n, s, s))
    f = np.abs(np.fft.fftfreq(s))
    keep = (f <= 0.5 * frac)[:, None] & (f <= 0.5 * frac)[None, :]
    return np.real(np.fft.ifft2(np.fft.fft2(z) * keep))


def test_threshold_at_ffr_exact():
    scores = np.arange(100, dtype=np.float32)
    tau, ffr = threshold_at_ffr(scores, 0.05)
    assert ffr == 0.05 and 94 < tau <= np.nextafter(np.float32(94), np.float32(100))
    assert (scores >= tau).sum() == 5
    tau, ffr = threshold_at_ffr(np.array([1, 1, 1, 1], np.float32), 0.3)  # ties: flag none rather than all
    assert ffr == 0.0 and tau > 1
    with pytest.raises(ValueError, match="NaN"):
        threshold_at_ffr(np.array([1.0, np.nan]), 0.05)


@pytest.mark.parametrize("kw", [dict(target_ffr=0), dict(target_ffr=1.5), dict(stat="median"), dict(stat="topk"),
                                dict(tau_high_k=0), dict(t_min=5, t_max=2), dict(policy="always"),
                                dict(schedule_from="checkpoint")])
def test_bad_calibration_config(kw):
    with pytest.raises(ValueError):
        CalibrationConfig(**kw)


def test_purify_schedule_defaults_and_validation():
    assert PURIFY_DEFAULTS == PurifySchedule(t_min=60, t_max=200, steps=1)
    assert PURIFY_DEFAULTS.to_dict() == {"t_min": 60, "t_max": 200, "steps": 1}
    c = CalibrationConfig()
    assert (c.t_min, c.t_max, c.steps) == (60, 200, 1) and c.schedule == PURIFY_DEFAULTS
    for kw, msg in ((dict(t_min=-1), "t_min"), (dict(t_min=201), "t_min"), (dict(t_max=1001), "T = 1000"),
                    (dict(steps=3), "K = 1, 2 or 4"), (dict(steps=0), "steps"), (dict(t_min=60.5), "int")):
        with pytest.raises(ValueError, match=msg):
            PurifySchedule(**kw)
    with pytest.raises(ValueError, match="steps"):
        CalibrationConfig(steps=3)
    with pytest.raises(ValueError, match="T = 1000"):
        CalibrationConfig(t_max=1500)


def _hfratio(x: np.ndarray, recon: np.ndarray, vis: np.ndarray, *, patch: int, m: int):
    """The gate's hfratio statistic over the m tissue patches (the oracle, as calibration scores it)."""
    return gate_scores(x, recon, vis, patch=patch, stat="hfratio", topk=m)


def test_hfratio_white_vs_band_limited_and_scale_invariance():
    rng = np.random.default_rng(0)
    s = 32
    recon = np.repeat(np.full((8, 1, s, s), 0.5, np.float32), 4, axis=1)
    white = (0.5 + 0.02 * rng.standard_normal((8, s, s))).astype(np.float32)
    sw, e = _hfratio(white, recon, VIS, patch=8, m=16)
    assert e.shape == (8, 16) and sw.shape == (8,)
    assert abs(float(sw.mean()) - WHITE_RATIO) < 0.15  # flat spectrum: 36/16 (L gain) over 1 (D gain)
    bl = _band_limited(rng, 8, s, 0.5)
    bl = (0.5 + 0.02 * bl / bl.std()).astype(np.float32)
    sb, _ = _hfratio(bl, recon, VIS, patch=8, m=16)
    assert sb.max() < 0.5 * WHITE_RATIO  # no energy near Nyquist: a far lower ratio
    # adding a ±eps sign pattern (what l_inf PGD does to every pixel) raises it
    signs = rng.choice([-1.0, 1.0], size=bl.shape).astype(np.float32)
    sa, _ = _hfratio(bl + 0.02 * signs, recon, VIS, patch=8, m=16)
    assert (sa > sb).all()
    # the ratio does not depend on the noise level: scaling the residual leaves it unchanged
    # (up to the 1e-6 guard in the denominator, negligible at these levels)
    big = (0.5 + 0.1 * (bl - 0.5) / 0.02).astype(np.float32)
    s1, _ = _hfratio(big, recon, VIS, patch=8, m=16)
    s2, _ = _hfratio(0.5 + 3 * (big - 0.5), recon, VIS, patch=8, m=16)
    np.testing.assert_allclose(s2, s1, rtol=2e-3)


def test_hfratio_tissue_selection_uses_the_reconstruction():
    rng = np.random.default_rng(1)
    x = np.full((1, 32, 32), 0.5, np.float32)
    x[0, :16] += 0.05 * rng.choice([-1.0, 1.0], size=(16, 32)).astype(np.float32)  # white top half
    recon = np.zeros((1, 4, 32, 32), np.float32)
    recon[:, :, :16] = 0.8  # the MAE says: tissue on top, air below
    top, e = _hfratio(x, recon, VIS, patch=8, m=8)
    assert top[0] == pytest.approx(np.median(e[0, :8]), rel=1e-6)
    recon2 = recon[:, :, ::-1].copy()  # tissue below: the smooth half is scored
    bottom, _ = _hfratio(x, recon2, VIS, patch=8, m=8)
    assert bottom[0] < 0.01 < top[0]
    # the scored patches are the gate's tissue selection: the top half of the scan
    sel = tissue_patches(recon, VIS, patch=8, m=8)
    assert sorted(sel[0].tolist()) == list(range(8))
    assert top[0] == np.float32(np.median(e[0, sel[0]]))
    with pytest.raises(ValueError, match="topk"):
        gate_scores(x, recon, VIS, patch=8, stat="hfratio", topk=17)


def test_gate_scores_mean_matches_ops_reference_and_rejects_unknown():
    ops = pytest.importorskip("medfedpure.gate")
    rng = np.random.default_rng(2)
    x = rng.random((3, 32, 32), dtype=np.float32)
    r = rng.random((3, 4, 32, 32), dtype=np.float32)
    score, err = gate_scores(x, r, VIS, patch=8, stat="mean")
    ref = ops.patch_gate_reference(x, r, VIS, patch=8, tau=0.1, tau_high=0.2, t_min=0, t_max=1, return_patch_err=True)
    np.testing.assert_array_equal(score, ref.score)
    np.testing.assert_array_equal(err, ref.patch_err)
    # by hand: e = mean over the 3 hiding sets of the patch MSE
    hidden = ~VIS[:, 0]
    manual = np.mean([((r[0, k, :8, :8] - x[0, :8, :8]) ** 2).mean() for k in np.flatnonzero(hidden)])
    assert err[0, 0] == pytest.approx(manual, rel=1e-5)
    with pytest.raises(ValueError, match="unknown"):
        gate_scores(x, r, VIS, patch=8, stat="max")
    with pytest.raises(ValueError, match="pixel-space"):
        gate_scores(x, r, VIS, patch=8, stat="hfratio", norm_pix=True)


def test_calibrate_gate_fields_and_rates(tmp_path):
    torch.manual_seed(0)  # parameter init only
    mae = MaskedAutoencoder(MAEConfig.preset("tiny")).eval()
    rng = np.random.default_rng(3)
    xv = np.clip(0.5 + 0.05 * rng.standard_normal((40, 1, 32, 32)), 0, 1).astype(np.float32)
    for stat in ("mean", "hfratio"):
        c = calibrate_gate(mae, xv, CalibrationConfig(stat=stat, target_ffr=0.1, t_min=10, t_max=90, steps=4))
        for key in ("stat", "topk", "norm_pix", "patch", "tau", "tau_high", "t_min", "t_max", "policy", "steps"):
            assert key in c
        cal = c["calibration"]
        for key in ("target_false_flag_rate", "num_val_scans", "val_false_flag_rate", "score_quantiles",
                    "tau_high_rule"):
            assert key in cal
        assert cal["num_val_scans"] == 40 and cal["val_false_flag_rate"] <= 0.1 and cal["target_false_flag_rate"] == 0.1
        # the file is the manifest's gate section plus the purifier's K and the schedule's source
        spec = calibration_gate_spec(c)
        assert {**spec.to_dict(), "steps": 4, "schedule_source": "options"} == c
        assert GateSpec.from_legacy_dict(spec.to_legacy_dict()) == spec
        assert c["tau_high"] > c["tau"] and (c["t_min"], c["t_max"], c["steps"]) == (10, 90, 4)
        assert c["schedule_source"] == "options"
        assert c["topk"] == (8 if stat == "hfratio" else 0)  # hfratio: m = Np / 2 tissue patches
        json.dumps(c)


def test_calibrate_gate_with_a_confidence_level():
    """τ that bounds the rate on new scans by 10 % with probability 0.9: of 40 scans it flags the largest k with
    P(Bin(40, 0.1) <= k) <= 0.1, i.e. 1 (P(<= 1) = 0.080, P(<= 2) = 0.223); 22 scans at least."""
    torch.manual_seed(0)
    mae = MaskedAutoencoder(MAEConfig.preset("tiny")).eval()
    xv = np.clip(0.5 + 0.05 * np.random.default_rng(3).standard_normal((40, 1, 32, 32)), 0, 1).astype(np.float32)
    c = calibrate_gate(mae, xv, CalibrationConfig(stat="mean", target_ffr=0.1, confidence=0.9, t_min=10, t_max=90,
                                                  steps=4), source="forty scans")
    plain = calibrate_gate(mae, xv, CalibrationConfig(stat="mean", target_ffr=0.1, t_min=10, t_max=90, steps=4))
    assert c["calibration"]["val_false_flag_rate"] == 1 / 40 and plain["calibration"]["val_false_flag_rate"] == 4 / 40
    assert c["tau"] > plain["tau"] and c["calibration"]["source"] == (
        "forty scans; τ bounds the false-flag rate on new clean scans by 0.1 with probability 0.9")
    with pytest.raises(ValueError, match="at least 22 are needed"):
        calibrate_gate(mae, xv[:21], CalibrationConfig(stat="mean", target_ffr=0.1, confidence=0.9))
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="confidence"):
            CalibrationConfig(confidence=bad)


def test_student_schedule_from_checkpoint_metadata(tmp_path):
    assert student_schedule(tmp_path) is None
    save_tensors(tmp_path / "student.safetensors", {"w": torch.zeros(1)},
                 metadata={"kind": "unet", "config": json.dumps({"t_min": 5, "t_max": 200, "steps": 2})})
    assert student_schedule(tmp_path) == {"t_min": 5, "t_max": 200, "steps": 2}
    # the purifier's layout: steps at the top level, the range (floats) under "distill"
    save_tensors(tmp_path / "student.safetensors", {"w": torch.zeros(1)},
                 metadata={"kind": "unet", "config": json.dumps({"image_size": 32}), "steps": "2",
                           "distill": json.dumps({"t_min": 10.0, "t_max": 250.0, "val_steps": 3})})
    assert student_schedule(tmp_path) == {"t_min": 10, "t_max": 250, "steps": 2}


def test_cli_calibrate(tmp_path, monkeypatch):
    from medfedpure.cli import app
    from medfedpure.cli import train as tcli
    from medfedpure.models.weights import save_model
    from typer.testing import CliRunner

    torch.manual_seed(0)  # parameter init only
    mae = MaskedAutoencoder(MAEConfig.preset("tiny"))
    run = tmp_path / "run"
    save_model(run / "mae.safetensors", mae, mae.cfg, "mae")
    rng = np.random.default_rng(4)

    def fake_split(data, site, split, size):
        x = np.clip(0.5 + 0.05 * rng.standard_normal((20, 1, size, size)), 0, 1).astype(np.float32)
        return x, np.zeros(20, np.int64)

    monkeypatch.setattr(tcli, "load_site_split", fake_split)
    r = CliRunner().invoke(app, ["calibrate", "--data", str(tmp_path), "--site", "2", "--run", str(run),
                                 "--target-ffr", "0.1"])
    assert r.exit_code == 0, r.output
    c = json.loads((run / "site_2" / "calibration.json").read_text())
    assert c["stat"] == "hfratio" and c["calibration"]["num_val_scans"] == 20
    assert c["calibration"]["val_false_flag_rate"] <= 0.1
    r = CliRunner().invoke(app, ["calibrate", "--data", str(tmp_path), "--run", str(run), "--stat", "nope"])
    assert r.exit_code != 0

    # A student checkpoint naming its schedule: used by default; explicit options replace it.
    from medfedpure.models.unet import UNet, UNetConfig

    unet = UNet(UNetConfig.preset("tiny"))
    save_model(run / "student.safetensors", unet, unet.cfg, "unet", extra={"steps": 2, "t_min": 20, "t_max": 150})
    r = CliRunner().invoke(app, ["calibrate", "--data", str(tmp_path), "--run", str(run)])
    assert r.exit_code == 0, r.output
    c = json.loads((run / "site_0" / "calibration.json").read_text())
    assert (c["steps"], c["t_min"], c["t_max"], c["schedule_source"]) == (2, 20, 150, "student checkpoint")
    r = CliRunner().invoke(app, ["calibrate", "--data", str(tmp_path), "--run", str(run), "--steps", "1",
                                 "--t-min", "60", "--t-max", "200"])
    assert r.exit_code == 0, r.output
    c = json.loads((run / "site_0" / "calibration.json").read_text())
    assert (c["steps"], c["t_min"], c["t_max"], c["schedule_source"]) == (1, 60, 200, "options")
    r = CliRunner().invoke(app, ["calibrate", "--data", str(tmp_path), "--run", str(run), "--steps", "4"])
    c = json.loads((run / "site_0" / "calibration.json").read_text())
    assert (c["steps"], c["t_min"], c["t_max"]) == (4, 60, 200)  # the others at their defaults
    assert (c["t_min"], c["t_max"]) == (PURIFY_DEFAULTS.t_min, PURIFY_DEFAULTS.t_max)
