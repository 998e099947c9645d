"""Adversarial classifier training through the federation and the bundle build.

The options of ``fed sim`` / ``fed deploy`` / ``bundle build`` (``--adv`` … ``--select``) become
``FedConfig`` fields, reach each site's ``ClassifierTrainConfig`` through ``LocalJob``, and at their
defaults change nothing (empty overrides: the preset's recipe).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from fed_helpers import tiny_fed_data
from medfedpure.build.config import BundleBuildConfig
from medfedpure.build.pipeline import BuildPaths, fed_configs, make_steps
from medfedpure.cli import app
from medfedpure.fed import tasks
from medfedpure.fed.config import ADV_DEFAULTS, ADV_FIELDS, FedConfig, adv_overrides
from medfedpure.fed.phases import build_model
from medfedpure.train.classifier import ClassifierTrainConfig
from typer.testing import CliRunner

EPS8 = 8 / 255


@pytest.fixture()
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, FedConfig]:
    """Replace both federated runners: record the FedConfig each command builds."""
    seen: dict[str, FedConfig] = {}

    def fake(key: str):  # type: ignore[no-untyped-def]
        def run(cfg: FedConfig, timeout_s: float, **kw: object) -> dict:
            seen[key] = cfg
            return {"phases": {}, f"{key}_wall_s": 1.0, "leftover_pids": []}
        return run

    monkeypatch.setattr("medfedpure.fed.sim.run_sim", fake("sim"))
    monkeypatch.setattr("medfedpure.fed.deploy.run_deployment", fake("deploy"))
    return seen


def _fed(tmp_path: Path, *extra: str) -> list[str]:
    return ["--data", str(tmp_path), "--out", str(tmp_path / "run"), "--sites", "2", "--config", "tiny",
            "--rounds", "2", *extra]


# --- options → FedConfig → each site's ClassifierTrainConfig ------------------------------------


def test_sim_and_deploy_pass_the_adversarial_options(tmp_path: Path, captured: dict[str, FedConfig]) -> None:
    args = _fed(tmp_path, "--adv", "trades", "--adv-eps", "8", "--adv-steps", "3", "--trades-beta", "2",
                "--robust-val", "16", "--select", "clean", "--adv-start-epoch", "1")
    for cmd in ("sim", "deploy"):
        r = CliRunner().invoke(app, ["fed", cmd, *args])
        assert r.exit_code == 0, r.output
    cfg = captured["sim"]
    assert captured["deploy"] == cfg
    assert (cfg.adv, cfg.adv_steps, cfg.adv_norm, cfg.trades_beta, cfg.robust_val, cfg.select,
            cfg.adv_start_epoch) == ("trades", 3, "linf", 2.0, 16, "clean", 1)
    assert cfg.adv_eps == pytest.approx(EPS8)  # 1/255 units on the command line, scan units in the config
    over = cfg.classifier_overrides()
    assert over == {"adv": "trades", "adv_eps": pytest.approx(EPS8), "adv_steps": 3, "trades_beta": 2.0,
                    "robust_val": 16, "adv_start_epoch": 1}
    # The Flower run config carries them to every site unchanged.
    assert FedConfig.from_run_config(cfg.to_run_config()) == cfg


def test_adv_defaults_robust_validation_and_l2_radius(tmp_path: Path, captured: dict[str, FedConfig]) -> None:
    r = CliRunner().invoke(app, ["fed", "sim", *_fed(tmp_path, "--adv", "pgd", "--adv-eps", "0.5",
                                                     "--adv-norm", "l2")])
    assert r.exit_code == 0, r.output
    cfg = captured["sim"]
    # --adv turns robust validation on and selects on it, as `train classifier` does; l2 eps is not /255
    assert (cfg.adv, cfg.adv_eps, cfg.adv_norm, cfg.robust_val, cfg.select) == ("pgd", 0.5, "l2", 128, "robust")
    # the single-step N-FGSM reaches each site's classifier recipe
    r = CliRunner().invoke(app, ["fed", "sim", *_fed(tmp_path, "--adv", "nfgsm", "--adv-eps", "8")])
    assert r.exit_code == 0, r.output
    over = captured["sim"].classifier_overrides()
    assert (over["adv"], over["adv_eps"], over["select"]) == ("nfgsm", pytest.approx(8 / 255), "robust")


def test_defaults_change_nothing(tmp_path: Path, captured: dict[str, FedConfig]) -> None:
    r = CliRunner().invoke(app, ["fed", "sim", *_fed(tmp_path)])
    assert r.exit_code == 0, r.output
    cfg = captured["sim"]
    assert {n: getattr(cfg, n) for n in ADV_FIELDS} == ADV_DEFAULTS
    assert cfg.classifier_overrides() == {}
    # The small preset's recipe (FGSM-RS at 4/255 from epoch 40) stays the preset's.
    assert FedConfig(data_dir="d", out_dir="o", preset="small", rounds=30, local_epochs=2).classifier_overrides() == {}
    # BundleBuildConfig's literal defaults are FedConfig's.
    b = BundleBuildConfig()
    assert {n: getattr(b, n) for n in ADV_FIELDS} == ADV_DEFAULTS and b.classifier_overrides() == {}


@pytest.mark.parametrize("extra, match", [
    (("--adv", "pgd"), "adv_eps=0"),  # the tiny preset has no radius of its own
    (("--select", "robust"), "select='robust' needs robust_val > 0"),
    (("--adv", "pgd", "--adv-eps", "8", "--robust-val", "0"), "select='robust' needs robust_val > 0"),
    (("--adv", "fgsm-rs", "--adv-eps", "1", "--adv-norm", "l2"), "fgsm-rs"),
    (("--adv", "nfgsm", "--adv-eps", "1", "--adv-norm", "l2"), "nfgsm"),
    (("--adv", "pgd", "--adv-eps", "30"), "adv_eps=0.117"),
    (("--adv", "pgd", "--adv-eps", "8", "--adv-start-epoch", "2"), "global epoch 2 but .* = 2 epochs"),
    (("--adv", "pgd2"), "'pgd2' is not one of"),
    (("--adv-norm", "l1"), "'l1' is not one of"),
    (("--select", "best"), "'best' is not one of"),
    (("--adv-steps", "0"), "--adv-steps"),
    (("--robust-val", "-1"), "--robust-val"),
])
def test_bad_values_exit_2_with_the_reason(tmp_path: Path, captured: dict[str, FedConfig], extra: tuple[str, ...],
                                           match: str) -> None:
    for cmd in ("sim", "deploy"):
        r = CliRunner().invoke(app, ["fed", cmd, *_fed(tmp_path, *extra)], terminal_width=400)
        assert r.exit_code == 2, r.output
        assert re.search(match, " ".join(r.output.replace("│", " ").split())), r.output
    assert captured == {}


def test_config_rejects_bad_values_directly() -> None:
    with pytest.raises(ValueError, match="adv_eps=-0.5: -1"):
        FedConfig(data_dir="d", out_dir="o", adv="pgd", adv_eps=-0.5)
    with pytest.raises(ValueError, match="adv='x'"):
        adv_overrides("tiny", 4, adv="x")
    with pytest.raises(ValueError, match="unknown adversarial-training options \\['eps'\\]"):
        adv_overrides("tiny", 4, eps=0.1)
    with pytest.raises(ValueError, match="adv_eps=0"):
        BundleBuildConfig(preset="tiny", adv="trades")


def _tiny_site(n: int = 12) -> tasks.SiteData:
    g = np.random.default_rng(0)
    x = g.random((n, 1, 32, 32), dtype=np.float32)
    y = np.arange(n, dtype=np.int64) % 2
    return tasks.SiteData(x, y, x[:8], y[:8], x[:8], y[:8])


def test_site_trains_with_the_runs_overrides(tmp_path: Path) -> None:
    """The classifier's round builds its ClassifierTrainConfig from the job's overrides and records it."""
    torch.set_num_threads(1)
    over = FedConfig(data_dir="d", out_dir="o", adv="pgd", adv_eps=EPS8, adv_steps=2, robust_val=4,
                     select="robust", rounds=2).classifier_overrides()
    job = tasks.LocalJob("tiny", 1, seed=3, site_dir=tmp_path / "site_0", schedule=(0, 2), classifier_overrides=over)
    assert job.classifier_overrides == tuple(sorted(over.items()))
    model, _ = build_model("classifier", "tiny", seed=0)
    metrics, _ = tasks.train_classifier_round(model, _tiny_site(), job, None)
    used = json.loads((tmp_path / "site_0" / "classifier_train_config.json").read_text())
    expect = ClassifierTrainConfig.preset("tiny", epochs=1, seed=3, patience=2, adv="pgd", adv_eps=EPS8, adv_steps=2,
                                          robust_val=4, select="robust")
    assert used["train"] == json.loads(json.dumps(expect.to_dict())) and used["schedule"] == [0, 2]
    assert 0.0 <= metrics["val_robust_accuracy"] <= 1.0 and math.isfinite(metrics["train_loss"])
    # Without overrides: the preset's config, and no robust metric.
    plain = tasks.LocalJob("tiny", 1, seed=3, site_dir=tmp_path / "site_1", schedule=(0, 2))
    metrics, _ = tasks.train_classifier_round(build_model("classifier", "tiny", seed=0)[0], _tiny_site(), plain, None)
    used = json.loads((tmp_path / "site_1" / "classifier_train_config.json").read_text())
    assert used["train"] == json.loads(json.dumps(ClassifierTrainConfig.preset("tiny", epochs=1, seed=3, patience=2).to_dict()))
    assert used["overrides"] == {} and "val_robust_accuracy" not in metrics


# --- bundle build -------------------------------------------------------------------------------


def test_bundle_build_dry_run_shows_and_passes_the_options(tmp_path: Path) -> None:
    work = tmp_path / "work"
    r = CliRunner().invoke(app, ["bundle", "build", "--work", str(work), "--dest", str(tmp_path / "dest"), "--dry-run",
                                 "--adv", "pgd", "--adv-eps", "8"])
    assert r.exit_code == 0, r.output
    shown = json.loads((work / "config.json").read_text())
    assert (shown["adv"], shown["robust_val"], shown["select"]) == ("pgd", 128, "robust")
    assert shown["adv_eps"] == pytest.approx(EPS8)
    assert '"adv": "pgd"' in r.output and '"select": "robust"' in r.output
    cfg = BundleBuildConfig.from_dict(shown)
    paths = BuildPaths(work)
    pur, cls = fed_configs(cfg, paths)
    assert (cls.adv, cls.adv_eps, cls.robust_val, cls.select) == ("pgd", cfg.adv_eps, 128, "robust")
    assert {n: getattr(pur, n) for n in ADV_FIELDS} == ADV_DEFAULTS  # the purifier federation trains no classifier
    steps = {s.name: s for s in make_steps(cfg, paths, federate=lambda c, t: {})}
    assert steps["fed_cls_mae"].inputs["adv"] == "pgd"  # a changed recipe reruns the classifier federation
    # At the defaults the classifier federation's recorded inputs are what they were before these options.
    default_steps = {s.name: s for s in make_steps(BundleBuildConfig(), paths, federate=lambda c, t: {})}
    assert set(default_steps["fed_cls_mae"].inputs) == {"preset", "seed", "rounds", "local_epochs", "max_train"}
    r = CliRunner().invoke(app, ["bundle", "build", "--work", str(work), "--dry-run", "--preset", "tiny", "--adv", "pgd"])
    assert r.exit_code == 2 and "adv_eps=0" in " ".join(r.output.replace("│", " ").split())


def _dry_run_build(tmp_path: Path, *opts: str) -> tuple:
    """``bundle build --dry-run`` with ``opts``: its recorded config, the purifier and classifier federations'
    configs, and its steps beside those of the default build, by name."""
    work = tmp_path / "work"
    r = CliRunner().invoke(app, ["bundle", "build", "--work", str(work), "--dest", str(tmp_path / "dest"), "--dry-run",
                                 *opts])
    assert r.exit_code == 0, r.output
    cfg = BundleBuildConfig.from_dict(json.loads((work / "config.json").read_text()))
    pur, cls = fed_configs(cfg, BuildPaths(work))
    steps = {s.name: s for s in make_steps(cfg, BuildPaths(work), federate=lambda c, t: {})}
    base = {s.name: s for s in make_steps(BundleBuildConfig(), BuildPaths(work), federate=lambda c, t: {})}
    return cfg, pur, cls, steps, base


def test_classifier_width_reaches_the_federation_and_reruns_only_the_classifier(tmp_path: Path,
                                                                                 captured: dict[str, FedConfig]) -> None:
    r = CliRunner().invoke(app, ["fed", "sim", *_fed(tmp_path, "--classifier-width", "2")])
    assert r.exit_code == 0, r.output
    assert captured["sim"].classifier_width == 2
    assert FedConfig.from_run_config(captured["sim"].to_run_config()).classifier_width == 2
    r = CliRunner().invoke(app, ["fed", "sim", *_fed(tmp_path, "--classifier-width", "0")])
    assert r.exit_code == 2 and "classifier-width" in r.output
    with pytest.raises(ValueError, match="classifier_width"):
        FedConfig(data_dir=".", out_dir=".", classifier_width=0)
    # the MAE and the purifier keep their preset's architecture
    assert build_model("mae", "tiny", 0, width=2)[1] == build_model("mae", "tiny", 0)[1]
    assert build_model("classifier", "tiny", 0, width=2)[1].global_widths == (8, 16)
    cfg, pur, cls, steps, base = _dry_run_build(tmp_path, "--classifier-width", "2")
    assert (cfg.classifier_width, cls.classifier_width, pur.classifier_width) == (2, 2, 1)
    assert steps["fed_cls_mae"].inputs["classifier_width"] == 2
    assert steps["fed_purifier"].inputs == base["fed_purifier"].inputs  # the purifier federation is reused


def test_device_reaches_the_sites_and_is_not_a_build_input(tmp_path: Path, captured: dict[str, FedConfig],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``--device``: fed sim/deploy and bundle build carry it to each site's classifier rounds (the run config,
    LocalJob, ``train_classifier(device=…)``); the simulation shares one GPU among the concurrent sites; a
    build keeps its step keys (the device is where, not what); a missing GPU or a bad name exits 2."""
    from medfedpure.fed.sim import ray_backend_config

    r = CliRunner().invoke(app, ["fed", "sim", *_fed(tmp_path, "--device", "auto")])
    assert r.exit_code == 0, r.output
    cfg = captured["sim"]
    assert cfg.device == "auto" and FedConfig.from_run_config(cfg.to_run_config()).device == "auto"
    assert FedConfig(data_dir=".", out_dir=".").device == "cpu"
    with pytest.raises(ValueError, match="device='tpu'"):
        FedConfig(data_dir=".", out_dir=".", device="tpu")
    for bad in (["--device", "tpu"], *([["--device", "cuda"]] if not torch.cuda.is_available() else [])):
        r = CliRunner().invoke(app, ["fed", "sim", *_fed(tmp_path, *bad)])
        assert r.exit_code == 2 and "--device" in r.output, (bad, r.output)
    # Ray resources: a GPU share per concurrent site only on cuda
    assert ray_backend_config(cfg, 2, "cpu")["client_resources"]["num_gpus"] == 0.0
    gpu = ray_backend_config(cfg, 4, "cuda")
    assert gpu["client_resources"]["num_gpus"] == 0.25 and gpu["init_args"]["num_gpus"] == 1
    # the job's device reaches train_classifier
    seen: dict[str, object] = {}

    def fake_train(model, train, val, cfg, **kw):  # type: ignore[no-untyped-def]
        seen.update(kw)
        return {"history": [{"train_loss": 0.5}], "val": {"loss": 0.5, "accuracy": 0.5}, "optimizer_state": {}}

    monkeypatch.setattr(tasks, "train_classifier", fake_train)
    job = tasks.LocalJob("tiny", 1, seed=3, schedule=(0, 2), device="auto")
    tasks.train_classifier_round(build_model("classifier", "tiny", seed=0)[0], _tiny_site(), job, None)
    assert seen["device"] == "auto"
    # bundle build: to the classifier federation only, and not a step input
    cfg_b, pur, cls, steps, base = _dry_run_build(tmp_path, "--device", "auto")
    assert (cfg_b.device, cls.device, pur.device) == ("auto", "auto", "cpu")
    same = {n: s.inputs for n, s in steps.items() if n != "install"}  # install: --dest differs from the base
    assert same == {n: s.inputs for n, s in base.items() if n != "install"} and "fed_cls_mae" in same
    with pytest.raises(ValueError, match="device='gpu'"):
        BundleBuildConfig(device="gpu")


@pytest.mark.parametrize("bad", [True, -1, 1.5])
def test_fedconfig_rejects_a_bad_classifier_stem(bad: object) -> None:
    with pytest.raises(ValueError, match=re.escape(f"classifier_stem={bad!r}")):
        FedConfig(data_dir=".", out_dir=".", classifier_stem=bad)  # type: ignore[arg-type]


def test_classifier_stem_builds_only_the_classifier_with_full_resolution_layers() -> None:
    from medfedpure.fed.phases import PHASES

    plain, plain_cfg = build_model("classifier", "tiny", 0)
    stem, stem_cfg = build_model("classifier", "tiny", 0, stem=1)
    assert (plain_cfg.stem, stem_cfg.stem) == (0, 1)
    assert PHASES["classifier"].build("tiny", 0, stem=1, width=2)[1] == build_model("classifier", "tiny", 0, 0, 2, 1)[1]
    keys, plain_keys = set(stem.state_dict()), set(plain.state_dict())
    assert plain_keys < keys and not any(".stem." in k for k in plain_keys)  # stem 0: the layout it always had
    assert {k.split(".")[1] for k in keys - plain_keys} == {"stem"}
    assert {k.split(".")[0] for k in keys - plain_keys} == {"global_expert", "local_expert"}
    for name in ("mae", "teacher", "student"):  # the other phases keep their preset's architecture
        model, cfg = PHASES[name].build("tiny", 0, stem=1)
        assert cfg == build_model(name, "tiny", 0)[1]
        assert set(model.state_dict()) == set(build_model(name, "tiny", 0)[0].state_dict())


def test_classifier_stem_reaches_the_federation_and_reruns_only_the_classifier(tmp_path: Path,
                                                                                captured: dict[str, FedConfig]) -> None:
    r = CliRunner().invoke(app, ["fed", "sim", *_fed(tmp_path, "--classifier-stem", "1")])
    assert r.exit_code == 0, r.output
    assert captured["sim"].classifier_stem == 1
    assert FedConfig.from_run_config(captured["sim"].to_run_config()).classifier_stem == 1
    r = CliRunner().invoke(app, ["fed", "deploy", *_fed(tmp_path, "--classifier-stem", "2", "--classifier-width", "2")])
    assert r.exit_code == 0, r.output
    assert (captured["deploy"].classifier_stem, captured["deploy"].classifier_width) == (2, 2)
    r = CliRunner().invoke(app, ["fed", "sim", *_fed(tmp_path, "--classifier-stem", "-1")])
    assert r.exit_code == 2 and "classifier-stem" in r.output
    cfg, pur, cls, steps, base = _dry_run_build(tmp_path, "--classifier-stem", "1")
    assert (cfg.classifier_stem, cls.classifier_stem, pur.classifier_stem) == (1, 1, 0)
    assert steps["fed_cls_mae"].inputs["classifier_stem"] == 1
    assert "classifier_stem" not in base["fed_cls_mae"].inputs  # stem 0: an older build's steps stay resumable
    assert steps["fed_purifier"].inputs == base["fed_purifier"].inputs  # the purifier federation is reused
    r = CliRunner().invoke(app, ["bundle", "build", "--work", str(tmp_path / "work"), "--dry-run", "--classifier-stem", "-1"])
    assert r.exit_code == 2 and "classifier-stem" in r.output
    with pytest.raises(ValueError, match="classifier_stem=-1"):
        BundleBuildConfig(classifier_stem=-1)


def test_bundle_build_fields_match_fedconfig() -> None:
    from medfedpure.fed.config import THROUGH_DEFAULTS, THROUGH_FIELDS

    names = {f.name for f in fields(BundleBuildConfig)}
    assert set(ADV_FIELDS) | set(THROUGH_FIELDS) <= names
    b = BundleBuildConfig()
    assert {n: getattr(b, n) for n in THROUGH_FIELDS} == THROUGH_DEFAULTS  # the literals of the torch-free config


# --- one tiny federated run ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_fed_data(tmp_path_factory, "fed_adv_data", sites=2)


@pytest.mark.slow
def test_tiny_sim_trains_adversarially_and_records_robust_accuracy(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["fed", "sim", "--data", str(tiny_data), "--out", str(out), "--sites", "2",
                                 "--config", "tiny", "--rounds", "1", "--phases", "classifier", "--no-calibrate",
                                 "--max-train", "8", "--adv", "pgd", "--adv-eps", "8", "--adv-steps", "2",
                                 "--robust-val", "8", "--select", "robust", "--timeout", "600"])
    assert r.exit_code == 0, r.output
    assert "classifier: round 1 robust validation accuracy per site" in r.output
    m = json.loads((out / "metrics.json").read_text())
    rows = [row for row in m["phases"]["classifier"]["per_site"] if row["kind"] == "train"]
    assert sorted(row["site"] for row in rows) == [0, 1]
    for row in rows:
        assert 0.0 <= row["val_robust_accuracy"] <= 1.0
    for k in range(2):
        used = json.loads((out / f"site_{k}" / "classifier_train_config.json").read_text())["train"]
        assert (used["adv"], used["adv_steps"], used["robust_val"], used["select"]) == ("pgd", 2, 8, "robust")
        assert used["adv_eps"] == pytest.approx(EPS8) and used["seed"] == tasks.SITE_STRIDE * k
    assert (out / "site_0" / "classifier.safetensors").is_file()
    assert FedConfig.load(out / "config.json").classifier_overrides()["adv"] == "pgd"


@pytest.mark.slow
def test_tiny_sim_trains_a_wider_classifier_with_a_stem(tiny_data: Path, tmp_path: Path) -> None:
    """--classifier-width 2 --classifier-stem 1: the server and every site build the same wider MoE with a
    full-resolution stem (the server refuses a site whose config differs); the global expert, stem included,
    travels, the local expert stays at home, and the saved configs record both."""
    from medfedpure.models.weights import load_model
    from safetensors.numpy import load_file

    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["fed", "sim", "--data", str(tiny_data), "--out", str(out), "--sites", "2",
                                 "--config", "tiny", "--rounds", "1", "--phases", "classifier", "--no-calibrate",
                                 "--max-train", "8", "--classifier-width", "2", "--classifier-stem", "1",
                                 "--timeout", "600"])
    assert r.exit_code == 0, r.output
    for k in range(2):
        model, mcfg, _ = load_model(out / f"site_{k}" / "classifier.safetensors")
        assert (mcfg.global_widths, mcfg.local_widths, mcfg.stem) == ((8, 16), (8, 8), 1)
        assert model.local_expert.stem[0].conv.weight.shape == (8, 1, 3, 3)
        assert model(torch.rand(1, 1, 32, 32)).shape == (1, 2)
    glob = load_file(str(out / "classifier_global.safetensors"))  # what travelled: the global expert only
    first = next(v for k, v in sorted(glob.items()) if k.endswith("stages.0.conv1.weight"))
    assert first.shape[0] == 8 and glob["global_expert.stem.0.conv.weight"].shape == (8, 1, 3, 3)
    assert not any("local_expert" in k for k in glob)
