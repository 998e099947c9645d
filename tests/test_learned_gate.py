"""A bundle with the attack detector attached: `calibrate --bundle B --detector D` writes a signed bundle whose
gate is `learned`; the Defender runs the detector in the gate's stage on both engines, its scores are the
oracle's top-k reduction of the detector's logits, and what the gate cannot take is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from medfedpure.gate import GateSpec, gate_reduce_reference, run_gate, run_gate_scores
from medfedpure.models.detector import AttackDetector, DetectorConfig
from medfedpure.models.weights import model_from_bytes, save_model
from medfedpure.runtime.bundle import verify_bundle
from medfedpure.runtime.calibration import load_scan_folder, score_scans
from medfedpure.runtime.defender import Defender
from PIL import Image
from signing_keys import test_key_files as key_files
from tiny_bundle import cached_tiny_bundle, tiny_scans
from typer.testing import CliRunner


def _write_pngs(folder: Path, x: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(x):
        Image.fromarray(np.round(a[0] * 255).astype(np.uint8)).save(folder / f"s{i:04d}.png")


def _detector(tmp: Path, **cfg) -> Path:
    torch.manual_seed(0)
    det = AttackDetector(DetectorConfig.preset("tiny", **cfg)).eval()
    with torch.no_grad():  # a detector with BatchNorm statistics that are not the identity
        for m in det.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return save_model(tmp / "detector.safetensors", det, det.cfg, "detector", extra={"sites": [0, 1]})


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from medfedpure.cli import app

    root = tmp_path_factory.mktemp("learned")
    tiny = cached_tiny_bundle()
    _write_pngs(root / "cal", tiny_scans(120, 21))
    det = _detector(root)
    priv, pub = key_files()
    r = CliRunner().invoke(app, ["calibrate", "--bundle", str(tiny), "--scans", str(root / "cal"), "--out",
                                 str(root / "b"), "--key", str(priv), "--detector", str(det), "--topk", "3",
                                 "--backend", "onnxruntime"])
    assert r.exit_code == 0, r.output
    return {"root": root, "out": root / "b", "tiny": tiny, "det": det, "pub": pub, "output": r.output}


def test_the_bundle_carries_the_detector_and_a_calibrated_learned_gate(learned: dict) -> None:
    vb = verify_bundle(learned["out"], trusted_keys=[learned["pub"]])
    src = verify_bundle(learned["tiny"])
    assert vb.signer is not None
    g = vb.spec.gate
    assert (g.stat, g.topk, g.patch, g.t_min, g.t_max, g.policy) == ("learned", 3, src.spec.gate.patch,
                                                                      src.spec.gate.t_min, src.spec.gate.t_max,
                                                                      src.spec.gate.policy)
    roles = {(a.role, a.format, a.precision) for a in vb.artefacts.values()}
    assert {("detector", "onnx", "fp32"), ("detector", "onnx", "fp16"), ("detector", "safetensors", "fp32")} <= roles
    # every artefact of the source is carried unchanged (the card is regenerated)
    for n, a in src.artefacts.items():
        if n != "model_card":
            assert vb.artefacts[n].sha256 == a.sha256
    rec = vb.spec.provenance["recalibration"]
    assert rec["source_bundle_id"] == src.bundle_id and rec["num_scans"] == 120
    assert rec["previous_gate"]["stat"] == src.spec.gate.stat and rec["changed"]["stat"] == "learned"
    assert rec["achieved_false_flag_rate"] == 0.05
    assert src.bundle_id in g.calibration.source
    # without --t-max the command says what purifying flags at up to t_max cost
    assert f"note: flagged scans will be purified at up to t*={g.t_max}" in " ".join(learned["output"].split())
    det = vb.spec.provenance["detector"]
    assert det["config"]["topk"] == 4 and list(det["sites"]) == [0, 1] and len(det["checkpoint_sha256"]) == 64
    assert det["onnx_agreement"]["detector"]["max_abs"] < 1e-4
    assert "measured_metrics" not in vb.spec.provenance  # measured through another gate: not this bundle's
    card = vb.read_bytes("model_card").decode()
    assert "statistic learned" in card and "ONNX attack detector, largest patch-logit difference" in card
    assert "source gate: stat=" + src.spec.gate.stat in learned["output"]
    assert "recalibrated: stat=learned" in learned["output"]


def test_defender_scores_are_the_oracle_reduction_of_the_detector(learned: dict) -> None:
    vb = verify_bundle(learned["out"], trusted_keys=[learned["pub"]])
    det = model_from_bytes(vb.read_bytes("detector.torch"))[0].eval()
    x = tiny_scans(12, 5)
    with torch.no_grad():
        logits = det(torch.from_numpy(x)).numpy()
    g = vb.spec.gate
    ref = gate_reduce_reference(logits, stat="topk", topk=g.topk, tau=g.tau, tau_high=g.tau_high, t_min=g.t_min,
                                t_max=g.t_max, floor=g.policy == "floor")
    for backend in ("onnxruntime", "torch"):
        with Defender.load(learned["out"], backend=backend, trusted_keys=[learned["pub"]]) as d:
            assert d.engine.gate_model == "detector"
            res = d.run_array(x, seeds=list(range(12)), return_patch_error=True)
            assert all(r.status == "ok" for r in res), [r.reason for r in res]
            np.testing.assert_allclose([r.score for r in res], ref.score, rtol=1e-4, atol=1e-4)
            away = np.abs(ref.score - g.tau) > 1e-3  # away from τ the flags agree exactly
            assert np.array_equal(np.array([r.flagged for r in res])[away], ref.flag[away])
            assert ref.flag.any() or not any(r.flagged for r in res)
            assert all((r.t_star > 0) == r.flagged for r in res)  # policy adaptive
            np.testing.assert_allclose(score_scans(d.engine, x), ref.score, rtol=1e-4, atol=1e-4)


def test_calibration_scores_flag_five_percent(learned: dict) -> None:
    with Defender.load(learned["out"], backend="onnxruntime", trusted_keys=[learned["pub"]]) as d:
        folder = load_scan_folder(learned["root"] / "cal", d.image_size)
        s = score_scans(d.engine, folder.x)
        assert int(d.engine.gate_spec.decide(s)[0].sum()) == 6  # 5 % of 120


def test_a_learned_gate_is_refused_where_it_cannot_run(learned: dict, tmp_path: Path) -> None:
    from medfedpure.cli import app

    g = GateSpec(stat="learned", patch=8, topk=2, norm_pix=False, tau=0.0, tau_high=1.0, t_min=10, t_max=20)
    with pytest.raises(ValueError, match="run_gate_scores"):
        run_gate(g, np.zeros((1, 32, 32), np.float32), np.zeros((1, 4, 32, 32), np.float32),
                 np.zeros((4, 16), bool))
    mae_gate = GateSpec(stat="mean", patch=8, topk=0, norm_pix=False, tau=0.0, tau_high=1.0, t_min=10, t_max=20)
    with pytest.raises(ValueError, match="scores the MAE"):
        run_gate_scores(mae_gate, np.zeros((1, 16), np.float32))
    with pytest.raises(ValueError, match="expected the number of largest"):
        GateSpec(stat="learned", patch=8, topk=0, norm_pix=False, tau=0.0, tau_high=1.0, t_min=10, t_max=20)
    priv, _ = key_files()
    common = ["calibrate", "--bundle", str(learned["tiny"]), "--scans", str(learned["root"] / "cal"), "--key",
              str(priv), "--backend", "onnxruntime"]
    # a detector for another patch grid
    other = _detector(tmp_path, patch=4, channels=(4, 8, 8), topk=4)
    r = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "b1"), "--detector", str(other)])
    assert r.exit_code == 2 and "train the detector with the bundle's image size and patch" in r.output
    # a model that is not a detector
    clf = tmp_path / "clf.safetensors"
    clf.write_bytes(verify_bundle(learned["tiny"]).read_bytes("classifier.torch"))
    r = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "b2"), "--detector", str(clf)])
    assert r.exit_code == 2 and "not an attack detector" in r.output
    # a bundle that already carries one
    r = CliRunner().invoke(app, ["calibrate", "--bundle", str(learned["out"]), "--scans", str(learned["root"] / "cal"),
                                 "--key", str(priv), "--trusted-key", str(learned["pub"]), "--backend", "onnxruntime",
                                 "--out", str(tmp_path / "b3"), "--detector", str(learned["det"])])
    assert r.exit_code == 2 and "already carries an attack detector" in r.output
    r = CliRunner().invoke(app, ["calibrate", "--detector", str(learned["det"]), "--data", str(tmp_path),
                                 "--run", str(tmp_path)], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert r.exit_code != 0 and "use it with --bundle" in r.output


def test_recalibrating_a_learned_bundle_keeps_its_detector(learned: dict, tmp_path: Path) -> None:
    from medfedpure.cli import app

    priv, pub = key_files()
    r = CliRunner().invoke(app, ["calibrate", "--bundle", str(learned["out"]), "--scans", str(learned["root"] / "cal"),
                                 "--key", str(priv), "--trusted-key", str(learned["pub"]), "--backend", "torch",
                                 "--out", str(tmp_path / "again"), "--target-ffr", "0.1"])
    assert r.exit_code == 0, r.output
    vb = verify_bundle(tmp_path / "again", trusted_keys=[pub])
    assert vb.spec.gate.stat == "learned" and vb.spec.gate.calibration.target_false_flag_rate == 0.1
    assert vb.artefacts["detector.torch"].sha256 == verify_bundle(learned["out"], trusted_keys=[pub]).artefacts[
        "detector.torch"].sha256


def test_the_evasion_differentiates_the_detector_and_lowers_its_score(learned: dict) -> None:
    """Rung 3 on a learned gate: the torch detector's reduced logits are the attacked score; the scans it
    reports as evading are, by the deployed gate, under 0.95 τ and misclassified."""
    import dataclasses

    from medfedpure.eval import adaptive as ae
    from medfedpure.runtime.engines.torch_engine import TorchEngine

    d = Defender.load(learned["out"], backend="onnxruntime", trusted_keys=[learned["pub"]])
    ref = TorchEngine(d.bundle, device="cpu", precision="fp32", cuda_graphs=False)
    assert "detector" in ref.models
    x = torch.from_numpy(tiny_scans(12, 31))
    with torch.no_grad():
        y = ref.models["classifier"](x).argmax(1)
    eng = d.engine
    clean = eng.to_numpy(eng.gate(eng.to_native(x.numpy()), eng.gate_input(eng.to_native(x.numpy()))).score)
    # τ at the clean median: half the scans start flagged, so the evasion has to lower the score
    tau = float(np.median(clean))
    eng.gate_spec = dataclasses.replace(eng.gate_spec, tau=tau, tau_high=tau + 1.0)
    a, st = ae.evasion_pgd(d, ref, x, y, 32 / 255, steps=10, progress=False)
    assert float((a - x).abs().max()) <= 32 / 255 + 1e-6
    after = eng.to_numpy(eng.gate(eng.to_native(a.numpy()), eng.gate_input(eng.to_native(a.numpy()))).score)
    assert np.median(after) < np.median(clean)
    with torch.no_grad():
        wrong = (ref.models["classifier"](a).argmax(1) != y).numpy()
    evading = (after < tau - 0.05 * abs(tau)) & wrong  # under the evasion's margin below τ (logits may be < 0)
    assert evading.sum() == round(st["evading_and_wrong_during_attack"] * len(x))
