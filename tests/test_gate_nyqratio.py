"""Stat ``nyqratio``: its defining properties on hand-built scans, the oracle against the C++ kernel (bit
for bit) and the torch chain (to float rounding), and the places that accept it (validation, GateSpec,
calibration, the CLI's choices)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from medfedpure.gate import GateSpec, gate_scores, patch_gate, patch_gate_reference
from medfedpure.gate.reference import NYQ_TAPS, NYQ_WHITE_RATIO, WHITE_RATIO
from medfedpure.models.mae import MAEConfig, MaskedAutoencoder, scoring_masks
from medfedpure.train.calibrate import CalibrationConfig, calibrate_gate, calibration_gate_spec

VIS = scoring_masks(16, 4)  # 32 px scans, 8 px patches, K = 4


def _flat_recon(b: int, s: int = 32, k: int = 4) -> np.ndarray:
    return np.full((b, k, s, s), 0.5, np.float32)


def _band_limited(rng: np.random.Generator, n: int, s: int, frac: float) -> np.ndarray:
    """Gaussian noise keeping |f| <= frac/2 per axis (a scanner's square k-space truncation), std 0.02."""
    z = rng.standard_normal((n, s, s))
    f = np.abs(np.fft.fftfreq(s))
    keep = (f <= 0.5 * frac)[:, None] & (f <= 0.5 * frac)[None, :]
    b = np.real(np.fft.ifft2(np.fft.fft2(z) * keep))
    return (0.5 + 0.02 * b / b.std()).astype(np.float32)


# -- defining properties ---------------------------------------------------------------------------------


def test_checkerboard_ratio_by_hand():
    # z = 0.5 + c(-1)^(i+j): each 8-tap pass gives (sum of |taps|)/128 = 1 times the pattern, so q = ±c,
    # h = c²; the diagonal difference is 2c, d = 4c²: e = c² / (4c² + 1e-6) in every patch.
    c = np.float32(0.125)
    i, j = np.indices((32, 32))
    x = (0.5 + c * (-1.0) ** (i + j)).astype(np.float32)[None]
    score, e = gate_scores(x, _flat_recon(1), VIS, patch=8, stat="nyqratio")
    expect = np.float32(c * c) / (np.float32(4) * np.float32(c * c) + np.float32(1e-6))
    np.testing.assert_array_equal(e, np.full((1, 16), expect, np.float32))
    assert score[0] == expect
    assert sum(abs(t) for t in NYQ_TAPS) == 128


def test_polynomials_up_to_degree_six_score_zero_where_hfratio_does_not():
    # Within each 8x8 patch x = (u² v² + 3u³ + v⁶/64) / 4096 with u, v the in-patch coordinates:
    # degree <= 6 per axis, so the 7th-order difference is exactly 0 (all values exact in float32);
    # hfratio's L = Δ²ᵤΔ²ᵥ sees the u²v² term (Δ²ᵤΔ²ᵥ u²v² = 4).
    u, v = np.indices((32, 32)) % 8
    x = ((u**2 * v**2 + 3 * u**3 + v**6 / 64) / 4096).astype(np.float32)[None]
    score, e = gate_scores(x, _flat_recon(1), VIS, patch=8, stat="nyqratio")
    assert score[0] == 0.0 and not e.any()
    hf, _ = gate_scores(x, _flat_recon(1), VIS, patch=8, stat="hfratio")
    assert hf[0] > 1e-4


def test_white_noise_ratio_and_scale_invariance():
    rng = np.random.default_rng(0)
    white = (0.5 + 0.05 * rng.standard_normal((64, 32, 32))).astype(np.float32)
    xp = white.astype(np.float64).reshape(64, 4, 8, 4, 8).transpose(0, 1, 3, 2, 4).reshape(-1, 8, 8)
    taps = np.array(NYQ_TAPS) / 128.0
    q = np.einsum("t,ntu,u->n", taps, xp, taps)  # an 8x8 patch has one filter output
    g = (xp[:, :-1, :-1] - xp[:, :-1, 1:] - xp[:, 1:, :-1] + xp[:, 1:, 1:]) / 2
    # E[q²] / E[g²] for white noise: (ΣC(7,t)² / 128²)² = (3432/16384)²
    assert (q**2).mean() / (g**2).mean() == pytest.approx(NYQ_WHITE_RATIO, rel=0.15)
    s1, _ = gate_scores(white, _flat_recon(64), VIS, patch=8, stat="nyqratio")
    s2, _ = gate_scores(
        (0.5 + 3 * (white - 0.5)).astype(np.float32), _flat_recon(64), VIS, patch=8, stat="nyqratio"
    )
    np.testing.assert_allclose(s2, s1, rtol=1e-3)  # the 1e-6 guard is 0.04 % of d at this level


@pytest.mark.parametrize("frac", [0.9, 0.8, 0.7])
def test_sees_a_k_space_cutoff_that_hfratio_barely_sees(frac):
    # Relative to white noise, band-limited noise drops nyqratio far more than hfratio: its filter
    # concentrates on the band a scanner that keeps most of k-space removes.
    rng = np.random.default_rng(int(frac * 10))
    white = (0.5 + 0.02 * rng.standard_normal((16, 32, 32))).astype(np.float32)
    bl = _band_limited(rng, 16, 32, frac)
    rel = {}
    for stat in ("hfratio", "nyqratio"):
        sw, _ = gate_scores(white, _flat_recon(16), VIS, patch=8, stat=stat, topk=16)
        sb, _ = gate_scores(bl, _flat_recon(16), VIS, patch=8, stat=stat, topk=16)
        rel[stat] = float(sb.mean() / sw.mean())
    assert rel["nyqratio"] < 0.6 * rel["hfratio"], rel
    assert rel["hfratio"] > 0.4  # the 3x3 filter still passes most of the kept band
    # a ±0.02 sign pattern (what l_inf PGD adds) lifts the band-limited scans' scores
    signs = rng.choice([-1.0, 1.0], size=bl.shape).astype(np.float32)
    sb, _ = gate_scores(bl, _flat_recon(16), VIS, patch=8, stat="nyqratio", topk=16)
    sa, _ = gate_scores(
        bl + np.float32(0.02) * signs, _flat_recon(16), VIS, patch=8, stat="nyqratio", topk=16
    )
    assert sa.mean() > 1.2 * sb.mean()
    if frac <= 0.8:  # a wider removed band: every scan, and by far
        assert (sa > sb).all() and sa.mean() > 3 * sb.mean()


def test_tissue_selection_and_median_are_hfratios():
    rng = np.random.default_rng(1)
    x = np.full((1, 32, 32), 0.5, np.float32)
    x[0, :16] += 0.05 * rng.choice([-1.0, 1.0], size=(16, 32)).astype(np.float32)  # white top half
    recon = np.zeros((1, 4, 32, 32), np.float32)
    recon[:, :, :16] = 0.8  # the MAE says: tissue on top
    top, e = gate_scores(x, recon, VIS, patch=8, stat="nyqratio", topk=8)
    assert top[0] == np.float32(np.median(e[0, :8]))
    bottom, _ = gate_scores(x, recon[:, :, ::-1].copy(), VIS, patch=8, stat="nyqratio", topk=8)
    assert bottom[0] == 0.0 < top[0]  # the flat half scores exactly 0
    # m = 0 means Np // 2, as for hfratio
    a, _ = gate_scores(x, recon, VIS, patch=8, stat="nyqratio", topk=0)
    b, _ = gate_scores(x, recon, VIS, patch=8, stat="nyqratio", topk=8)
    assert a[0] == b[0]


# -- agreement between the implementations ---------------------------------------------------------------


def _case(seed: int, b: int, k: int, s: int, patch: int, dx: str, dr: str, levels: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.random((b, s, s), dtype=np.float32)
    recon = np.clip(x[:, None] + 0.3 * rng.standard_normal((b, k, s, s), dtype=np.float32), 0, 1)
    if levels:  # quantised: ties in w and e
        x = np.floor(x * levels) / np.float32(levels)
        recon = np.floor(recon * levels) / np.float32(levels)
    n = (s // patch) ** 2
    vis = rng.random((k, n)) < 0.6
    never = np.flatnonzero(vis.all(axis=0))
    vis[rng.integers(0, k, never.size), never] = False
    return x.astype(dx), recon.astype(dr), vis, int(rng.integers(0, n + 1))


CASES = [  # (s, patch, k, dtypes, levels)
    (32, 8, 4, ("float32", "float32"), 0),
    (64, 8, 4, ("float16", "float32"), 0),
    (40, 10, 2, ("float32", "float16"), 0),  # patch 10: 3x3 filter outputs, scalar loads
    (64, 16, 1, ("float16", "float16"), 0),
    (128, 8, 4, ("float32", "float32"), 0),  # the default bundle's geometry
    (32, 8, 4, ("float32", "float32"), 3),  # ties in tissue levels and ratios
    (24, 8, 2, ("float32", "float32"), 2),
]


@pytest.mark.parametrize(("s", "patch", "k", "dtypes", "levels"), CASES)
def test_cpp_kernel_is_bit_identical_to_the_oracle(s, patch, k, dtypes, levels):
    from medfedpure.gate import STATS, dispatch

    assert dispatch._C.STAT_NYQRATIO == STATS["nyqratio"] == 3
    x, recon, vis, m = _case(s * 7 + patch + levels, 3, k, s, patch, *dtypes, levels=levels)
    kw = dict(patch=patch, stat="nyqratio", topk=m, return_patch_err=True)
    ref = patch_gate_reference(x, recon, vis, tau=0.0, tau_high=1.0, t_min=0, t_max=1, **kw)
    tau = float(ref.score[1])  # a tie at tau: flags must agree exactly
    ref = patch_gate_reference(x, recon, vis, tau=tau, tau_high=tau * 1.5 + 1e-6, t_min=10, t_max=100, **kw)
    for threads in (1, 2):
        got = patch_gate(
            x,
            recon,
            vis,
            tau=tau,
            tau_high=tau * 1.5 + 1e-6,
            t_min=10,
            t_max=100,
            backend="cpp",
            num_threads=threads,
            **kw,
        )
        np.testing.assert_array_equal(got.patch_err, ref.patch_err)
        np.testing.assert_array_equal(got.score, ref.score)
        np.testing.assert_array_equal(got.flag, ref.flag)
        np.testing.assert_array_equal(got.t_star, ref.t_star)
    assert ref.flag[1] and ref.t_star[1] == 10


@pytest.mark.parametrize(("s", "patch", "k", "dtypes", "levels"), CASES[:5])
def test_torch_chain_agrees_to_float_rounding_and_differentiates(s, patch, k, dtypes, levels):
    x, recon, vis, m = _case(s + patch, 2, k, s, patch, *dtypes)
    ref = patch_gate_reference(
        x,
        recon,
        vis,
        patch=patch,
        stat="nyqratio",
        topk=m,
        tau=0.0,
        tau_high=1.0,
        t_min=0,
        t_max=1,
        return_patch_err=True,
    )
    xt = torch.from_numpy(x.astype(np.float32)).requires_grad_(True)
    got = patch_gate(
        xt,
        torch.from_numpy(recon),
        vis,
        patch=patch,
        stat="nyqratio",
        topk=m,
        tau=0.0,
        tau_high=1.0,
        t_min=0,
        t_max=1,
        backend="torch",
        return_patch_err=True,
    )
    np.testing.assert_allclose(got.patch_err.detach().numpy(), ref.patch_err, rtol=2e-5, atol=1e-9)
    np.testing.assert_allclose(got.score.detach().numpy(), ref.score, rtol=2e-5, atol=1e-9)
    (g,) = torch.autograd.grad(got.score.sum(), xt)
    assert torch.isfinite(g).all() and g.abs().sum() > 0  # what the evasion attack follows


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and medfedpure._C_cuda")
@pytest.mark.parametrize(("s", "patch", "k", "dtypes", "levels"), CASES)
def test_cuda_kernel_is_bit_identical_to_the_oracle(s, patch, k, dtypes, levels):
    # Without a GPU the same source runs under CPU emulation (tests/test_ops_cuda_emulated.py).
    x, recon, vis, m = _case(s * 7 + patch + levels, 3, k, s, patch, *dtypes, levels=levels)
    kw = dict(patch=patch, stat="nyqratio", topk=m, return_patch_err=True, t_min=10, t_max=100)
    tau = float(patch_gate_reference(x, recon, vis, tau=0.0, tau_high=1.0, **kw).score[1])
    kw.update(tau=tau, tau_high=tau * 1.5 + 1e-6)
    ref = patch_gate_reference(x, recon, vis, **kw)
    got = patch_gate(torch.from_numpy(x).cuda(), torch.from_numpy(recon).cuda(), vis, backend="cuda", **kw)
    np.testing.assert_array_equal(got.patch_err.cpu().numpy(), ref.patch_err)
    np.testing.assert_array_equal(got.score.cpu().numpy(), ref.score)
    np.testing.assert_array_equal(got.flag.cpu().numpy(), ref.flag)
    np.testing.assert_array_equal(got.t_star.cpu().numpy(), ref.t_star)


def test_nyqratio_on_the_bundle_geometry_through_run_gate():
    # 128 px, patch 8, m = 128: the default bundle's gate with the new statistic, every backend on the host
    x, recon, vis, _ = _case(5, 2, 4, 128, 8, "float32", "float32")
    spec = GateSpec(
        stat="nyqratio", patch=8, topk=128, norm_pix=False, tau=0.01, tau_high=0.02, t_min=60, t_max=200
    )
    from medfedpure.gate import run_gate

    ref = run_gate(spec, x, recon, vis, backend="reference", return_patch_err=True)
    cpp = run_gate(spec, x, recon, vis, backend="cpp", return_patch_err=True)
    np.testing.assert_array_equal(cpp.score, ref.score)
    np.testing.assert_array_equal(cpp.patch_err, ref.patch_err)
    assert ref.patch_err.shape == (2, 256)


# -- where it is accepted or refused ---------------------------------------------------------------------


def test_validation_names_the_problem():
    x, recon, vis, _ = _case(0, 1, 4, 32, 4, "float32", "float32")
    with pytest.raises(ValueError, match="8x8"):
        gate_scores(x, recon, vis, patch=4, stat="nyqratio")
    with pytest.raises(ValueError, match="pixel-space"):
        gate_scores(x, _flat_recon(1), VIS, patch=8, stat="nyqratio", norm_pix=True)
    with pytest.raises(ValueError, match="topk"):
        gate_scores(x, _flat_recon(1), VIS, patch=8, stat="nyqratio", topk=17)
    with pytest.raises(ValueError, match="8x8"):
        GateSpec(stat="nyqratio", patch=4, topk=0, norm_pix=False, tau=0.1, tau_high=0.2, t_min=0, t_max=1)
    with pytest.raises(ValueError, match="pixel-space"):
        GateSpec(stat="nyqratio", patch=8, topk=0, norm_pix=True, tau=0.1, tau_high=0.2, t_min=0, t_max=1)
    spec = GateSpec(
        stat="nyqratio", patch=8, topk=128, norm_pix=False, tau=0.01, tau_high=0.02, t_min=60, t_max=200
    )
    assert GateSpec.from_dict(spec.to_dict()) == spec
    assert NYQ_WHITE_RATIO < WHITE_RATIO
    # the CUDA kernel's shared memory: K·S + (2P − 8)·S/P floats for nyqratio (5·S/P fewer than hfratio)
    from medfedpure.gate import cuda_kernel_limits_ok

    assert cuda_kernel_limits_ok(224, 8, "nyqratio", 4) and cuda_kernel_limits_ok(128, 8, "nyqratio", 4)
    # S = 1544, P = 193, K = 6: K·S + 2·S − 8·8 = 12288 fits exactly; hfratio needs 40 floats more
    assert cuda_kernel_limits_ok(1544, 193, "nyqratio", 6) and not cuda_kernel_limits_ok(
        1544, 193, "hfratio", 6
    )
    s_edge = 1024  # K·S = 4096, Np = 16384 at P = 8: 3·Np = 49152 > 12288 floats, refused for both
    assert not cuda_kernel_limits_ok(s_edge, 8, "nyqratio", 4) and not cuda_kernel_limits_ok(
        s_edge, 8, "hfratio", 4
    )


def test_calibrate_gate_accepts_nyqratio():
    torch.manual_seed(0)  # parameter init only
    mae = MaskedAutoencoder(MAEConfig.preset("tiny")).eval()
    rng = np.random.default_rng(3)
    xv = np.clip(0.5 + 0.05 * rng.standard_normal((40, 1, 32, 32)), 0, 1).astype(np.float32)
    c = calibrate_gate(
        mae, xv, CalibrationConfig(stat="nyqratio", target_ffr=0.1, t_min=10, t_max=90, steps=4)
    )
    assert c["stat"] == "nyqratio" and c["topk"] == 8  # m = Np / 2 tissue patches, as for hfratio
    assert c["calibration"]["val_false_flag_rate"] <= 0.1 and c["tau_high"] > c["tau"] > 0
    assert calibration_gate_spec(c).stat == "nyqratio"


def test_cli_calibrate_stat_nyqratio(tmp_path, monkeypatch):
    import json

    from medfedpure.cli import app, common
    from medfedpure.cli import train as tcli
    from medfedpure.gate import STATS
    from medfedpure.models.weights import save_model
    from typer.testing import CliRunner

    assert "nyqratio" in common.STATS and set(common.STATS) == set(STATS)
    torch.manual_seed(0)  # parameter init only
    mae = MaskedAutoencoder(MAEConfig.preset("tiny"))
    run = tmp_path / "run"
    save_model(run / "mae.safetensors", mae, mae.cfg, "mae")
    rng = np.random.default_rng(4)

    def fake_split(data, site, split, size):
        x = np.clip(0.5 + 0.05 * rng.standard_normal((20, 1, size, size)), 0, 1).astype(np.float32)
        return x, np.zeros(20, np.int64)

    monkeypatch.setattr(tcli, "load_site_split", fake_split)
    r = CliRunner().invoke(
        app,
        [
            "calibrate",
            "--data",
            str(tmp_path),
            "--site",
            "1",
            "--run",
            str(run),
            "--stat",
            "nyqratio",
            "--target-ffr",
            "0.1",
            "--t-min",
            "10",
            "--t-max",
            "90",
        ],
    )
    assert r.exit_code == 0, r.output
    c = json.loads((run / "site_1" / "calibration.json").read_text())
    assert c["stat"] == "nyqratio" and c["topk"] == 8 and c["calibration"]["num_val_scans"] == 20
    assert (
        GateSpec.from_dict({k: v for k, v in c.items() if k not in ("steps", "schedule_source")}).stat
        == "nyqratio"
    )


def test_nyqratio_gate_through_the_engine():
    # A bundle whose gate is nyqratio: the engine's gate (the C++ kernel) equals calibration's scores (the
    # oracle) bit for bit, with the spec's decision rule.
    import dataclasses

    from medfedpure.runtime.bundle import verify_bundle
    from medfedpure.runtime.engines import create_engine
    from tiny_bundle import cached_tiny_bundle, tiny_scans

    eng = create_engine(verify_bundle(cached_tiny_bundle()), "onnxruntime", "cpu", threads=1)
    x = tiny_scans(6, 8)
    recon = eng.mae(x)
    score, err = gate_scores(x[:, 0], recon, eng.visible, patch=8, stat="nyqratio", topk=8)
    eng.gate_spec = dataclasses.replace(
        eng.gate_spec,
        stat="nyqratio",
        topk=8,
        tau=float(np.median(score)),
        tau_high=float(np.max(score)) * 2 + 1e-6,
    )
    g = eng.gate(x, recon, return_patch_err=True)
    np.testing.assert_array_equal(g.score, score)
    np.testing.assert_array_equal(g.patch_err, err)
    flag, t_star = eng.gate_spec.decide(score)
    np.testing.assert_array_equal(g.flag, flag)
    np.testing.assert_array_equal(g.t_star, t_star)
    assert g.flag.sum() >= 3 and err.shape == (6, eng.visible.shape[1])
