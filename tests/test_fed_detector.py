"""The federated attack-detector phase: each site attacks its own final classifier, only the detector travels."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from medfedpure.fed import tasks
from medfedpure.fed.config import FedConfig
from medfedpure.fed.phases import DEFAULT_PHASES, PHASES
from medfedpure.models.detector import AttackDetector, DetectorConfig
from medfedpure.models.moe import MoEClassifier, MoEConfig
from medfedpure.models.weights import load_model, save_model


def _site_data(n: int = 12, size: int = 32, seed: int = 0) -> tasks.SiteData:
    rng = np.random.default_rng(seed)

    def split(k: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.random((k, 1, size, size), dtype=np.float32), (np.arange(k) % 2).astype(np.int64)

    (xt, yt), (xv, yv), (xs, ys) = split(n), split(20), split(10)
    return tasks.SiteData(xt, yt, xv, yv, xs, ys)


def _write_classifier(site_dir: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    clf = MoEClassifier(MoEConfig.preset("tiny"))
    return save_model(site_dir / "classifier.safetensors", clf, clf.cfg, "moe")


def test_detector_phase_is_registered_and_opt_in() -> None:
    assert "detector" in PHASES and "detector" not in DEFAULT_PHASES
    assert FedConfig(data_dir="d", out_dir="o").phases == DEFAULT_PHASES
    cfg = FedConfig(data_dir="d", out_dir="o", rounds=3, phases="classifier,mae,detector", detector_harden_rounds=2,
                    detector_l2=0.5)
    assert FedConfig.from_run_config(cfg.to_run_config()) == cfg
    for bad, match in (({"detector_harden_rounds": 4}, "detector_harden_rounds"),
                       ({"detector_harden_rounds": -1}, "detector_harden_rounds"),
                       ({"detector_l2": -0.5}, "detector_l2"), ({"detector_l2": math.inf}, "detector_l2"),
                       ({"phases": "detector,classifier"}, "order")):
        with pytest.raises(ValueError, match=match):
            FedConfig(data_dir="d", out_dir="o", rounds=3, **bad)
    det, dcfg = PHASES["detector"].build("tiny", seed=3)
    assert isinstance(det, AttackDetector) and dcfg == DetectorConfig.preset("tiny")


def test_detector_round_attacks_the_sites_own_classifier_once(tmp_path: Path) -> None:
    site = tmp_path / "site_0"
    data = _site_data()
    x_before = data.x_train.copy()
    job = tasks.LocalJob("tiny", epochs=1, seed=5, site_dir=site, detector_l2=0.5)
    det = PHASES["detector"].build("tiny", seed=0)[0]
    with pytest.raises(FileNotFoundError, match="run the 'classifier' phase before 'detector'"):
        tasks.train_detector_round(det, data, job)
    _write_classifier(site, seed=1)
    w0 = {k: v.clone() for k, v in det.state_dict().items()}
    m, state = tasks.train_detector_round(det, data, job)
    assert state is None and math.isfinite(m["train_loss"]) and "evasion_flagged_before" not in m
    assert any(not torch.equal(w0[k], v) for k, v in det.state_dict().items())  # it trained
    np.testing.assert_array_equal(data.x_train, x_before)  # the site's scans are not modified
    cache = site / "detector_attacked.safetensors"
    from safetensors.torch import load_file

    adv = load_file(str(cache))["adv"]
    d = (adv - torch.from_numpy(data.x_train)).flatten(1)
    # the cycle is 2, 4, 8/255 (ℓ∞) then ℓ2 0.5: every fourth scan is the ℓ2 one
    linf, l2 = d.abs().amax(1), d.norm(dim=1)
    assert torch.all(linf[[0, 1, 2, 4, 5, 6]] <= torch.tensor([2, 4, 8, 2, 4, 8]) / 255 + 1e-6)
    assert torch.all(l2[[3, 7, 11]] <= 0.5 + 1e-4) and torch.all(linf[[3, 7, 11]] > 8 / 255)
    # a second round reuses the cached set; a new classifier invalidates it
    stamp = cache.stat().st_mtime_ns
    tasks.train_detector_round(det, data, job)
    assert cache.stat().st_mtime_ns == stamp
    _write_classifier(site, seed=2)
    tasks.train_detector_round(det, data, job)
    assert not torch.equal(load_file(str(cache))["adv"], adv)
    # hardening: the evasion of the received model, and the share it still flagged
    m, _ = tasks.train_detector_round(det, data, tasks.LocalJob("tiny", epochs=1, seed=6, site_dir=site, harden=True))
    assert 0.0 <= m["evasion_flagged_before"] <= 1.0
    ev = tasks.evaluate_detector_site(det, data, seed=0, site_dir=site)
    assert set(ev) == {"val_tau", "test_false_flag_rate", "test_auroc_4", "test_auroc_8"}
    assert all(0.0 <= ev[k] <= 1.0 for k in ("test_false_flag_rate", "test_auroc_4", "test_auroc_8"))


def test_detector_evaluation_keeps_its_attacked_test_scans_and_scores_as_without_them(tmp_path: Path) -> None:
    """The round's evaluation crafts the PGD copies of the test scans once per classifier: a second call reads them
    back (files untouched) and gives the same figures as ``train.detector.evaluate_detector`` crafting them afresh;
    a new classifier invalidates them."""
    from medfedpure.train.detector import evaluate_detector, load_classifier

    site = tmp_path / "site_0"
    data = _site_data()
    _write_classifier(site, seed=1)
    det = PHASES["detector"].build("tiny", seed=0)[0]
    first = tasks.evaluate_detector_site(det, data, seed=0, site_dir=site)
    files = sorted(p.name for p in site.glob("detector_eval_attacked_*.safetensors"))
    assert files == ["detector_eval_attacked_linf4.safetensors", "detector_eval_attacked_linf8.safetensors"]
    stamps = [(site / f).stat().st_mtime_ns for f in files]
    assert tasks.evaluate_detector_site(det, data, seed=0, site_dir=site) == first
    assert [(site / f).stat().st_mtime_ns for f in files] == stamps
    fresh = evaluate_detector(det, load_classifier(site / "classifier.safetensors"), torch.from_numpy(data.x_val),
                              torch.from_numpy(data.x_test), torch.from_numpy(data.y_test), [4 / 255, 8 / 255], seed=1)
    assert (first["test_auroc_4"], first["test_auroc_8"], first["val_tau"]) == (
        fresh["auroc"]["4/255"], fresh["auroc"]["8/255"], fresh["tau"])
    _write_classifier(site, seed=2)
    tasks.evaluate_detector_site(det, data, seed=0, site_dir=site)
    assert [(site / f).stat().st_mtime_ns for f in files] != stamps


def test_classifier_file_of_another_kind_is_refused(tmp_path: Path) -> None:
    site = tmp_path / "site_0"
    det = AttackDetector(DetectorConfig.preset("tiny"))
    save_model(site / "classifier.safetensors", det, det.cfg, "detector")
    with pytest.raises(ValueError, match="not the site's classifier"):
        tasks.train_detector_round(det, _site_data(), tasks.LocalJob("tiny", epochs=1, seed=0, site_dir=site))


@pytest.mark.slow
def test_simulation_trains_a_federated_detector(tmp_path: Path) -> None:
    """Classifier then detector on 2 tiny sites, 2 rounds, the last one hardened: one detector for both sites,
    finite per-site metrics, the evasion share reported only in the hardened round."""
    from medfedpure.data import SynthConfig, generate_synthetic, make_splits
    from medfedpure.fed.sim import run_sim

    data = tmp_path / "synth"
    generate_synthetic(data, SynthConfig(sites=2, per_site=20, size=32, seed=0), workers=1, progress=False)
    make_splits(data, seed=0)
    out = tmp_path / "run"
    cfg = FedConfig(data_dir=str(data), out_dir=str(out), rounds=2, num_sites=2, max_train=8,
                    phases=("classifier", "detector"), calibrate=False, detector_harden_rounds=1, detector_l2=0.5)
    m = run_sim(cfg, progress=False, timeout_s=600)
    server, mcfg, meta = load_model(out / "detector.safetensors")
    assert isinstance(server, AttackDetector) and mcfg == DetectorConfig.preset("tiny") and meta["kind"] == "detector"
    for k in range(2):
        site_det = load_model(out / f"site_{k}" / "global" / "detector.safetensors")[0]
        for name, v in server.state_dict().items():
            if not name.endswith("num_batches_tracked"):  # a counter, not a weight: it does not travel
                torch.testing.assert_close(site_det.state_dict()[name], v, rtol=0, atol=0)
        assert (out / f"site_{k}" / "detector_attacked.safetensors").is_file()
    p = m["phases"]["detector"]
    assert not p["rejected"] and not p["errors"]
    train = [r for r in p["per_site"] if r["kind"] == "train"]
    assert {(r["round"], r["site"]) for r in train} == {(1, 0), (1, 1), (2, 0), (2, 1)}
    assert all(("evasion_flagged_before" in r) == (r["round"] == 2) for r in train)
    ev = [r for r in p["per_site"] if r["kind"] == "evaluate"]
    assert len(ev) == 4 and all(0.0 <= r["test_auroc_8"] <= 1.0 and math.isfinite(r["val_tau"]) for r in ev)
    assert m["leftover_pids"] == []
