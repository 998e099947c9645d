"""Recalibrating a shipped bundle's gate on a site's clean scans (runtime side, no torch), the shared
τ rule, drift counts and each Result's score quantile."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from medfedpure.gate import GateCalibration
from medfedpure.gate.calibration import (
    binomial_cdf,
    calibrate_scores,
    expected_ffr,
    flagged_at_confidence,
    min_scans_for_confidence,
    tau_high_from,
    tau_high_rule_text,
    threshold_at_ffr,
)
from medfedpure.runtime.bundle import BundleError, verify_bundle
from medfedpure.runtime.calibration import (
    DriftMonitor,
    TooFewScansError,
    binomial_ci,
    chi2_sf,
    load_scan_folder,
    pixels_digest,
    recalibrate,
    score_quantile,
    score_scans,
    score_scans_with,
)
from medfedpure.runtime.defender import Defender
from PIL import Image
from signing_keys import test_key_files as key_files
from tiny_bundle import cached_tiny_bundle, tiny_scans
from typer.testing import CliRunner


def _write_pngs(folder: Path, x: np.ndarray, prefix: str = "s") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, a in enumerate(x):
        p = folder / f"{prefix}{i:04d}.png"
        Image.fromarray(np.round(a[0] * 255).astype(np.uint8)).save(p)
        paths.append(p)
    return paths


def _shifted(n: int, seed: int) -> np.ndarray:
    """Clean scans from "another scanner": another intensity response (gamma 0.6)."""
    return (tiny_scans(n, seed) ** 0.6).astype(np.float32)


@pytest.fixture(scope="module")
def tiny() -> Path:
    return cached_tiny_bundle()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, tiny: Path) -> dict:
    """A site's 120 clean calibration scans (shifted), recalibrated through the CLI, signed with the test key."""
    from medfedpure.cli import app

    root = tmp_path_factory.mktemp("site")
    _write_pngs(root / "cal", _shifted(120, 11))
    (root / "cal" / "notes.txt").write_text("not a scan")
    priv, pub = key_files()
    r = CliRunner().invoke(app, ["calibrate", "--bundle", str(tiny), "--scans", str(root / "cal"),
                                 "--out", str(root / "b2"), "--key", str(priv), "--backend", "onnxruntime"])
    assert r.exit_code == 0, r.output
    return {"root": root, "out": root / "b2", "pub": pub, "output": r.output}


# ---------------------------------------------------------------------------------------------
# the shared rule and the statistics
def test_both_calibrations_use_one_rule() -> None:
    import medfedpure.train.calibrate as tc

    assert tc.threshold_at_ffr is threshold_at_ffr
    s = np.random.default_rng(0).gamma(2.0, 1.0, 200).astype(np.float32)
    tau, tau_high, rec = calibrate_scores(s, 0.05, tau_high_k=3.0, source="x")
    assert int((s >= np.float32(tau)).sum()) == 10  # ⌊0.05 · 200⌋, no ties
    assert tau == float(np.nextafter(np.sort(s)[::-1][10], np.float32(np.inf), dtype=np.float32))
    assert tau_high == tau_high_from(tau, float(np.median(s)), 3.0)
    assert rec.tau_high_rule == tau_high_rule_text(3.0) and rec.source == "x"
    assert (rec.num_val_scans, rec.val_false_flag_rate) == (200, 0.05)
    assert GateCalibration.from_dict(rec.to_dict()) == rec


def test_statistics_match_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for dof in range(1, 9):
        for x in (0.0, 0.3, 1.0, 4.5, 11.0, 30.0):
            assert chi2_sf(x, dof) == pytest.approx(stats.chi2.sf(x, dof), rel=1e-9, abs=1e-15)
    for k, n in ((0, 50), (7, 140), (50, 50), (3, 10)):
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        lo, hi = binomial_ci(k, n)
        assert lo == pytest.approx(ci.low, abs=1e-9) and hi == pytest.approx(ci.high, abs=1e-9)
    with pytest.raises(ValueError, match="dof"):
        chi2_sf(1.0, 0)


def test_binomial_cdf_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for k, n, p in ((0, 59, 0.05), (3, 100, 0.07), (9, 180, 0.05), (40, 1000, 0.05), (2, 3, 0.5), (700, 20000, 0.03)):
        assert binomial_cdf(k, n, p) == pytest.approx(stats.binom.cdf(k, n, p), rel=1e-9, abs=1e-300)
    assert binomial_cdf(-1, 10, 0.1) == 0.0 and binomial_cdf(10, 10, 0.1) == 1.0
    assert binomial_cdf(0, 10, 0.0) == 1.0 and binomial_cdf(9, 10, 1.0) == 0.0 and binomial_cdf(10, 10, 1.0) == 1.0


def test_confidence_rule_counts() -> None:
    # P(Bin(100, 0.07) <= 3) = 0.074 <= 0.1 < P(<= 4) = 0.163: 3 of 100 flagged
    assert flagged_at_confidence(100, 0.07, 0.9) == 3
    assert flagged_at_confidence(100, 0.07, 0.95) == 2 and flagged_at_confidence(180, 0.05, 0.95) == 3  # P(<= 4) = 0.0507
    assert min_scans_for_confidence(0.05, 0.95) == 59  # 0.95^58 = 0.051 > 0.05 >= 0.95^59 = 0.048
    assert flagged_at_confidence(59, 0.05, 0.95) == 0
    with pytest.raises(ValueError, match="at least 59 are needed"):
        flagged_at_confidence(58, 0.05, 0.95)
    for bad in (0.0, 1.0, True, "0.9"):
        with pytest.raises(ValueError, match="confidence"):
            min_scans_for_confidence(0.05, bad)
    s = np.random.default_rng(1).normal(size=100).astype(np.float32)
    tau, achieved = threshold_at_ffr(s, 0.07, confidence=0.9)
    assert int((s >= np.float32(tau)).sum()) == 3 and achieved == 0.03
    assert expected_ffr(100, 3) == pytest.approx(4 / 101)
    _, _, rec = calibrate_scores(s, 0.07, confidence=0.9)
    assert rec.val_false_flag_rate == 0.03 and rec.target_false_flag_rate == 0.07


def test_confidence_rule_holds_its_guarantee_by_simulation() -> None:
    """Uniform clean scores: τ's rate on new scans is exactly 1 − τ. Over 4000 calibration draws of 100 scans the
    share of draws whose rate exceeds 7 % is the rule's P(Bin(100, 0.07) <= 3) = 0.081 (not above 0.1), where
    flagging ⌊f·n⌋ = 7 exceeds it in about half of the draws."""
    rng = np.random.default_rng(0)
    draws = rng.random((4000, 100))
    over_conf = np.mean([1.0 - threshold_at_ffr(d, 0.07, confidence=0.9)[0] > 0.07 for d in draws])
    over_plain = np.mean([1.0 - threshold_at_ffr(d, 0.07)[0] > 0.07 for d in draws])
    assert abs(over_conf - binomial_cdf(3, 100, 0.07)) < 0.015 and over_conf <= 0.1
    assert abs(over_plain - binomial_cdf(7, 100, 0.07)) < 0.03 and over_plain > 0.4
    mean_rate = np.mean([1.0 - threshold_at_ffr(d, 0.07, confidence=0.9)[0] for d in draws[:1000]])
    assert mean_rate == pytest.approx(expected_ffr(100, 3), abs=0.003)


# ---------------------------------------------------------------------------------------------
# recalibration
def test_recalibrated_bundle_hits_the_quantile_rule(site: dict) -> None:
    d = Defender.load(site["out"], "onnxruntime", trusted_keys=[site["pub"]], timeout_s=None)
    files = sorted((site["root"] / "cal").glob("*.png"))
    rs = d.run_batch([str(p) for p in files], seeds=[0] * len(files))
    scores = np.array([r.score for r in rs], np.float32)
    assert len(rs) == 120
    assert sum(r.flagged for r in rs) == 6  # ⌊0.05 · 120⌋ exactly
    tau, _ = threshold_at_ffr(scores, 0.05)
    assert d.engine.gate_spec.tau == tau
    cal = d.calibration
    assert cal is not None and (cal.num_val_scans, cal.target_false_flag_rate, cal.val_false_flag_rate) == (120, 0.05, 0.05)
    assert "achieved false-flag rate on the calibration scans: 6/120 = 0.0500" in site["output"]
    lo, hi = binomial_ci(6, 120)
    assert f"95% CI [{lo:.4f}, {hi:.4f}] (Clopper-Pearson)" in site["output"]
    assert "1 files skipped" in site["output"]
    # τ just above the 7th-highest of 120: the rate on new scans exceeds 5 % with P(Bin(120, 0.05) <= 6) = 0.606
    assert "exceeds 0.05 with probability 60.6%; --confidence C bounds that" in site["output"]


def test_written_bundle_is_signed_and_carries_provenance(site: dict, tiny: Path) -> None:
    vb = verify_bundle(site["out"], trusted_keys=[site["pub"]])
    src = verify_bundle(tiny)
    assert vb.signer is not None and vb.bundle_id != src.bundle_id
    rec = vb.spec.provenance["recalibration"]
    folder = load_scan_folder(site["root"] / "cal", 32)
    assert rec["num_scans"] == 120 and rec["source_bundle_id"] == src.bundle_id
    assert rec["pixels_sha256"] == folder.pixels_sha256 and len(rec["pixels_sha256"]) == 64
    assert len(rec["date"]) == 10 and rec["date"][4] == "-"
    assert rec["achieved_false_flag_rate"] == 0.05 and rec["target_false_flag_rate"] == 0.05
    assert rec["probability_rate_above_target"] == pytest.approx(binomial_cdf(6, 120, 0.05), rel=1e-12)
    assert src.bundle_id in vb.spec.gate.calibration.source
    # everything but the gate, the provenance and the model card (its calibration section) is the source bundle's
    assert ({n: a.sha256 for n, a in vb.artefacts.items() if n != "model_card"}
            == {n: a.sha256 for n, a in src.artefacts.items() if n != "model_card"})
    for k in ("stat", "patch", "topk", "norm_pix", "t_min", "t_max", "policy"):
        assert getattr(vb.spec.gate, k) == getattr(src.spec.gate, k)
    assert {k: v for k, v in vb.manifest.items() if k not in ("gate", "provenance", "artefacts")} == \
        {k: v for k, v in src.manifest.items() if k not in ("gate", "provenance", "artefacts")}


def test_fingerprint_ignores_names_and_order(tmp_path: Path) -> None:
    x = _shifted(5, 3)
    _write_pngs(tmp_path / "a", x, "a")
    _write_pngs(tmp_path / "b", x[::-1], "zz")
    fa, fb = load_scan_folder(tmp_path / "a", 32), load_scan_folder(tmp_path / "b", 32)
    assert fa.pixels_sha256 == fb.pixels_sha256 and fa.files != fb.files
    _write_pngs(tmp_path / "c", x[:4], "a")
    assert load_scan_folder(tmp_path / "c", 32).pixels_sha256 != fa.pixels_sha256
    assert pixels_digest(np.zeros((2, 3), np.float32)) != pixels_digest(np.zeros((3, 2), np.float32))


def test_unsigned_without_key_and_refused_by_the_runtime(tmp_path: Path, tiny: Path, monkeypatch) -> None:
    from medfedpure.cli import app

    monkeypatch.delenv("MEDFEDPURE_SIGNING_KEY", raising=False)
    _write_pngs(tmp_path / "cal", _shifted(20, 5))
    r = CliRunner().invoke(app, ["calibrate", "--bundle", str(tiny), "--scans", str(tmp_path / "cal"),
                                 "--out", str(tmp_path / "b2"), "--min-scans", "20", "--backend", "onnxruntime"])
    assert r.exit_code == 0, r.output
    assert "UNSIGNED" in r.output
    with pytest.raises(BundleError):
        verify_bundle(tmp_path / "b2")
    assert verify_bundle(tmp_path / "b2", allow_unsigned=True).signer is None


def test_refuses_fewer_than_min_scans(tmp_path: Path, tiny: Path) -> None:
    from medfedpure.cli import app

    _write_pngs(tmp_path / "cal", _shifted(30, 5))
    r = CliRunner().invoke(app, ["calibrate", "--bundle", str(tiny), "--scans", str(tmp_path / "cal"),
                                 "--out", str(tmp_path / "b2"), "--min-scans", "31"])
    assert r.exit_code == 2
    assert "TooFewScansError: 30 usable clean scans, fewer than the minimum of 31" in r.output
    assert not (tmp_path / "b2").exists()
    d = Defender.load(tiny, "onnxruntime")
    with pytest.raises(TooFewScansError, match="minimum of 100"):
        recalibrate(d.bundle, d.engine, _shifted(99, 1))
    with pytest.raises(ValueError, match="target_ffr"):
        recalibrate(d.bundle, d.engine, _shifted(5, 1), target_ffr=0.0, min_scans=1)


def test_cli_forms_are_exclusive(tmp_path: Path, tiny: Path) -> None:
    from medfedpure.cli import app

    wide = {"COLUMNS": "400"}  # one line per message in the error box
    r = CliRunner().invoke(app, ["calibrate"], env=wide)
    assert r.exit_code == 2 and "--data DIR and --run RUN" in r.output
    r = CliRunner().invoke(app, ["calibrate", "--bundle", str(tiny), "--data", str(tmp_path)], env=wide)
    assert r.exit_code == 2 and "one form or the other" in r.output
    r = CliRunner().invoke(app, ["calibrate", "--bundle", str(tiny), "--scans", str(tmp_path)], env=wide)
    assert r.exit_code == 2 and "--out DIR" in r.output


def test_recalibrated_gate_flags_fewer_shifted_clean_scans(site: dict, tiny: Path, tmp_path: Path) -> None:
    held = [str(p) for p in _write_pngs(tmp_path, _shifted(200, 99))]  # the calibration's scanner, other scans
    before = Defender.load(tiny, "onnxruntime", timeout_s=None)
    after = Defender.load(site["out"], "onnxruntime", trusted_keys=[site["pub"]], timeout_s=None)
    fb = sum(r.flagged for r in before.run_batch(held, seeds=[0] * 200))
    fa = sum(r.flagged for r in after.run_batch(held, seeds=[0] * 200))
    assert fb >= 190 and fa <= 30 and 5 * fa < fb, (fb, fa)  # 200 and 17 when written


# ---------------------------------------------------------------------------------------------
# drift and score quantiles
def test_drift_counts_equal_a_hand_count(site: dict) -> None:
    d = Defender.load(site["out"], "onnxruntime", trusted_keys=[site["pub"]], timeout_s=None)
    x = np.concatenate([tiny_scans(30, 7), _shifted(30, 8)])
    threads = [threading.Thread(target=d.run_array, args=(x[i::3],), kwargs={"seeds": [0] * len(x[i::3])})
               for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rep = d.drift()
    scores = score_scans(d.engine, x)
    cal = d.calibration
    edges = [v for _, v in sorted((float(q), v) for q, v in cal.score_quantiles)]
    hand = [0] * (len(edges) + 1)
    for s in scores.tolist():
        b = 0
        while b < len(edges) and s >= edges[b]:
            b += 1
        hand[b] += 1
    assert rep.n == 60 and list(rep.counts) == hand
    assert rep.expected == pytest.approx((0.05, 0.2, 0.25, 0.25, 0.2, 0.05))
    assert rep.flagged == int((scores >= np.float32(d.engine.gate_spec.tau)).sum())
    e = 60 * np.array(rep.expected)
    chi2 = float(((np.array(hand) - e) ** 2 / e).sum())
    assert rep.chi2 == pytest.approx(chi2) and rep.dof == 5 and rep.p_value == pytest.approx(chi2_sf(chi2, 5))
    assert rep.flag_rate_ci95 == binomial_ci(rep.flagged, 60)
    json.dumps(rep.to_dict())
    d.reset_drift()
    assert d.drift().n == 0 and d.drift().p_value is None


def test_score_quantile_is_monotone_and_interpolated(site: dict) -> None:
    d = Defender.load(site["out"], "onnxruntime", trusted_keys=[site["pub"]], timeout_s=None)
    x = np.concatenate([tiny_scans(20, 3), _shifted(40, 4)])
    rs = d.run_array(x, seeds=[0] * len(x))
    pairs = sorted((r.score, r.score_quantile) for r in rs)
    qs = [q for _, q in pairs]
    assert all(a <= b for a, b in zip(qs, qs[1:], strict=False)) and len(set(qs)) > 10
    assert all(0.05 <= q <= 0.95 for q in qs)
    cal = d.calibration
    q = dict(cal.score_quantiles)
    assert score_quantile(q["0.5"], cal) == pytest.approx(0.5)
    assert score_quantile((q["0.5"] + q["0.75"]) / 2, cal) == pytest.approx(0.625)
    assert score_quantile(None, cal) is None and score_quantile(1.0, None) is None
    grid = np.linspace(q["0.05"] - 1, q["0.95"] + 1, 500)
    v = [score_quantile(float(s), cal) for s in grid]
    assert all(a <= b for a, b in zip(v, v[1:], strict=False))
    full = GateCalibration(0.05, 0.05, 10, {"0": 0.0, "0.5": 1.0, "1": 2.0})
    assert [score_quantile(s, full) for s in (-1.0, 0.5, 1.5, 3.0)] == [0.0, 0.25, 0.75, 1.0]
    dct = rs[0].to_dict()
    assert dct["score_quantile"] == rs[0].score_quantile
    assert {"label", "probabilities", "flagged", "score", "t_star", "status", "reason", "seed", "latency_ms",
            "backend", "device", "precision", "bundle_id", "error", "purified", "patch_error"} < set(dct)


def test_drift_monitor_merges_empty_bins_and_ignores_nan() -> None:
    m = DriftMonitor(GateCalibration(0.05, 0.05, 10, {"0": 0.0, "0.5": 1.0, "1": 2.0}), tau=1.5)
    m.update([-1.0, 0.5, 1.2, 1.7, 5.0, float("nan")])
    r = m.report()
    assert r.counts == (1, 1, 2, 1) and r.expected == (0.0, 0.5, 0.5, 0.0) and r.n == 5 and r.flagged == 2
    assert r.dof == 1 and r.chi2 == pytest.approx((2 - 2.5) ** 2 / 2.5 + (3 - 2.5) ** 2 / 2.5)
    none = DriftMonitor(None, tau=0.0)
    none.update([1.0, 2.0])
    assert none.report().counts == (2,) and none.report().p_value is None


def test_recalibration_needs_neither_torch_nor_onnx(site: dict, tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys\nfrom typer.testing import CliRunner\nfrom medfedpure.cli import app\n"
            f"r = CliRunner().invoke(app, ['calibrate', '--bundle', {str(site['out'])!r}, '--scans', "
            f"{str(site['root'] / 'cal')!r}, '--out', {str(tmp_path / 'b3')!r}, '--backend', 'onnxruntime'])\n"
            "assert r.exit_code == 0, r.output\n"
            "print(sorted(m for m in ('torch', 'onnx', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert verify_bundle(tmp_path / "b3").spec.provenance["recalibration"]["source_bundle_id"] == \
        verify_bundle(site["out"]).bundle_id


# ---------------------------------------------------------------------------------------------
# recalibrating with another statistic or policy
def test_recalibration_can_switch_the_statistic_and_policy(site: dict, tiny: Path) -> None:
    from medfedpure.cli import app

    root, (priv, pub) = site["root"], key_files()
    files = [str(p) for p in sorted((root / "cal").glob("*.png"))]
    r = CliRunner().invoke(app, ["calibrate", "--bundle", str(tiny), "--scans", str(root / "cal"), "--out",
                                 str(root / "b_nyq"), "--key", str(priv), "--backend", "onnxruntime",
                                 "--stat", "nyqratio", "--policy", "floor"])
    assert r.exit_code == 0, r.output
    src = Defender.load(tiny, "onnxruntime", timeout_s=None)
    new = Defender.load(root / "b_nyq", "onnxruntime", trusted_keys=[pub], timeout_s=None)
    assert src.engine.gate_spec.stat == "mean"
    g = new.engine.gate_spec
    assert (g.stat, g.policy, g.patch, g.t_min, g.t_max) == ("nyqratio", "floor", 8, 40, 200)
    # τ is the quantile rule on the new statistic's scores, as the new bundle computes them
    scores = np.array([res.score for res in new.run_batch(files, seeds=[0] * len(files))], np.float32)
    assert g.tau == threshold_at_ffr(scores, 0.05)[0]
    assert int((scores >= np.float32(g.tau)).sum()) == 6
    # the source gate's count is on its own statistic's scores of the same scans
    before = sum(res.flagged for res in src.run_batch(files, seeds=[0] * len(files)))
    assert f"source gate: stat=mean tau={src.engine.gate_spec.tau:.6g} flags {before}/120" in r.output
    assert "recalibrated: stat=nyqratio" in r.output and "policy=floor" in r.output
    rec = new.bundle.spec.provenance["recalibration"]
    assert rec["changed"] == {"stat": "nyqratio", "policy": "floor"}
    assert rec["previous_gate"]["stat"] == "mean" and rec["previous_gate"]["policy"] == "adaptive"


def test_recalibration_refuses_what_the_gate_cannot_take(tmp_path: Path, tiny: Path) -> None:
    from medfedpure.cli import app

    wide = {"COLUMNS": "400"}
    _write_pngs(tmp_path / "cal", _shifted(20, 5))
    common = ["calibrate", "--bundle", str(tiny), "--scans", str(tmp_path / "cal"), "--min-scans", "20",
              "--backend", "onnxruntime"]
    r = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "b1"), "--stat", "topk"], env=wide)
    assert r.exit_code == 2 and "topk = 0 with stat 'topk'" in r.output, r.output
    assert not (tmp_path / "b1").exists()
    r = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "b2"), "--t-min", "10", "--steps", "2"], env=wide)
    assert r.exit_code == 2 and "--t-min, --steps: --bundle recalibrates the gate" in r.output, r.output
    assert not (tmp_path / "b2").exists()
    d = Defender.load(tiny, "onnxruntime")
    with pytest.raises(ValueError, match="cannot take"):
        recalibrate(d.bundle, d.engine, _shifted(5, 1), min_scans=1, policy="sideways")
    g = d.bundle.spec.gate
    for bad in (g.t_min - 1, g.t_max + 1, float(g.t_max)):  # widening the range, or not an int
        with pytest.raises(ValueError, match="can only narrow"):
            recalibrate(d.bundle, d.engine, _shifted(5, 1), min_scans=1, t_max=bad)
    r = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "b3"), "--t-max", str(g.t_max + 1)], env=wide)
    assert r.exit_code == 2 and "can only narrow" in r.output and not (tmp_path / "b3").exists()


def test_narrowing_the_purification_range_purifies_every_flag_at_t_min(tmp_path: Path, tiny: Path) -> None:
    """--t-max t_min: the same τ and flags, every flagged scan purified at t_min (the kernels' rule with t_max =
    t_min), and the change recorded."""
    from medfedpure.cli import app

    src = Defender.load(tiny, "onnxruntime")
    g = src.bundle.spec.gate
    _write_pngs(tmp_path / "cal", _shifted(40, 2))
    r = CliRunner().invoke(app, ["calibrate", "--bundle", str(tiny), "--scans", str(tmp_path / "cal"), "--min-scans",
                                 "20", "--backend", "onnxruntime", "--out", str(tmp_path / "b"), "--t-max",
                                 str(g.t_min)], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    assert f"t*∈[{g.t_min}, {g.t_min}]" in r.output
    new = Defender.load(tmp_path / "b", "onnxruntime", allow_unsigned=True)
    ng = new.bundle.spec.gate
    assert (ng.t_min, ng.t_max) == (g.t_min, g.t_min)
    rec = new.bundle.spec.provenance["recalibration"]
    assert rec["changed"] == {"t_max": g.t_min} and rec["previous_gate"]["t_max"] == g.t_max
    scores = np.linspace(ng.tau - 1, ng.tau_high + 5, 50)
    flag, t_star = ng.decide(scores)
    assert flag.any() and (~flag).any()
    assert np.all(t_star[flag] == g.t_min) and np.all(t_star[~flag] == 0)


def test_switching_the_statistic_runs_the_mae_once_per_batch(tiny: Path) -> None:
    """Scoring the new statistic and the old gate shares one MAE pass; the scores are those of separate passes."""
    d = Defender.load(tiny, "onnxruntime", timeout_s=None)
    x = _shifted(40, 3)
    nyq = dataclasses.replace(d.bundle.spec.gate, stat="nyqratio")
    alone_new, alone_old = score_scans(d.engine, x, spec=nyq), score_scans(d.engine, x)
    calls = []
    real_mae = d.engine.mae

    def counting_mae(xn):
        calls.append(len(xn))
        return real_mae(xn)

    d.engine.mae = counting_mae
    try:
        both = score_scans_with(d.engine, x, (nyq, None), batch_size=16)
        assert calls == [16, 16, 8]
        calls.clear()
        rec = recalibrate(d.bundle, d.engine, x, min_scans=40, stat="nyqratio")
        assert calls == [16, 16, 8]
    finally:
        d.engine.mae = real_mae
    np.testing.assert_array_equal(both[0], alone_new)
    np.testing.assert_array_equal(both[1], alone_old)
    assert not np.array_equal(alone_new, alone_old)
    np.testing.assert_array_equal(rec.scores, alone_new)
    assert rec.flagged_before == int(d.bundle.spec.gate.decide(alone_old)[0].sum())
    with pytest.raises(ValueError, match="specs is empty"):
        score_scans_with(d.engine, x, ())


def test_a_new_statistic_moves_the_measured_metrics_out_of_the_card(tmp_path: Path) -> None:
    """The default bundle's robustness metrics were measured through its hfratio gate: a recalibration that keeps
    the statistic keeps them on the card, one that changes it records them aside."""
    from medfedpure.export.bundle_writer import write_recalibrated_bundle

    d = Defender.default(backend="onnxruntime", threads=1)
    assert d.bundle.spec.provenance.get("measured_metrics")
    rng = np.random.default_rng(0)
    x = np.clip(0.4 + 0.1 * rng.standard_normal((100, 1, 128, 128)), 0, 1).astype(np.float32)
    for stat, kept in ((None, True), ("nyqratio", False)):
        rc = recalibrate(d.bundle, d.engine, x, stat=stat)
        vb = write_recalibrated_bundle(d.bundle, tmp_path / str(stat), rc.gate, rc.provenance, signing_key=None)
        prov = vb.spec.provenance
        card = vb.read_bytes("model_card").decode()
        assert ("measured_metrics" in prov) == kept
        assert ("worst rung of the adaptive ladder" in card) == kept
        if not kept:
            moved = prov["recalibration"]["source_bundle_metrics"]
            assert "'hfratio' gate" in moved["note"] and len(moved["metrics"]) == len(
                d.bundle.spec.provenance["measured_metrics"])


def test_cli_confidence_bounds_the_site_rate_and_says_so(tmp_path: Path, tiny: Path) -> None:
    from medfedpure.cli import app

    _write_pngs(tmp_path / "cal", _shifted(100, 21))
    priv, pub = key_files()
    args = ["calibrate", "--bundle", str(tiny), "--scans", str(tmp_path / "cal"), "--key", str(priv),
            "--backend", "onnxruntime", "--target-ffr", "0.07", "--confidence", "0.9"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b2")])
    assert r.exit_code == 0, r.output
    assert "3/100 = 0.0300" in r.output and f"expected on new clean scans like them: {4 / 101:.4f}" in r.output
    assert "at most 0.07 with probability 0.9 (it exceeds it with probability 7.4%)" in r.output
    vb = verify_bundle(tmp_path / "b2", trusted_keys=[pub])
    rec = vb.spec.provenance["recalibration"]
    assert rec["false_flag_guarantee"]["confidence"] == 0.9 and rec["false_flag_guarantee"]["rate"] == 0.07
    assert rec["expected_false_flag_rate"] == pytest.approx(4 / 101) and rec["achieved_false_flag_rate"] == 0.03
    assert rec["probability_rate_above_target"] == pytest.approx(binomial_cdf(3, 100, 0.07)) and \
        rec["probability_rate_above_target"] <= 0.1
    assert "probability 0.9" in vb.spec.gate.calibration.source
    card = (tmp_path / "b2" / "MODEL_CARD.md").read_text()
    assert "is at most 0.07 with probability 0.9" in card
    d = Defender.load(tmp_path / "b2", "onnxruntime", trusted_keys=[pub], timeout_s=None)
    files = sorted((tmp_path / "cal").glob("*.png"))
    assert sum(x.flagged for x in d.run_batch([str(f) for f in files], seeds=[0] * len(files))) == 3
    # too few scans for the guarantee: refused before anything is written, with the count that would do
    r = CliRunner().invoke(app, [*args[:-1], "0.9995", "--out", str(tmp_path / "b3")])
    assert r.exit_code == 2 and "at least 105 are needed" in r.output and not (tmp_path / "b3").exists()
    r = CliRunner().invoke(app, ["calibrate", "--data", str(tmp_path), "--run", str(tmp_path), "--confidence", "0.9"])
    assert r.exit_code == 2 and "use it with --bundle" in r.output
