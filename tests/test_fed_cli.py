"""``medfedpure fed``: one option set for sim and deploy, turned into the FedConfig the runners get."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import typer
from medfedpure.cli import app
from medfedpure.cli.fed import ADV_OPTIONS, FEDERATION_OPTIONS, RUN_OPTIONS, SMOOTHING_OPTIONS
from medfedpure.fed.config import FedConfig
from medfedpure.models.diffusion import PURIFY_DEFAULTS
from typer.testing import CliRunner


@pytest.fixture()
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Replace both runners: record the FedConfig each command builds, return canned metrics."""
    seen: dict[str, object] = {}

    def fake(key: str):  # type: ignore[no-untyped-def]
        def run(cfg: FedConfig, timeout_s: float, **kw: object) -> dict:
            seen[key], seen[f"{key}_timeout"], seen[f"{key}_kw"] = cfg, timeout_s, kw
            return {"phases": {}, f"{key}_wall_s": 1.0, "leftover_pids": []}
        return run

    monkeypatch.setattr("medfedpure.fed.sim.run_sim", fake("sim"))
    monkeypatch.setattr("medfedpure.fed.deploy.run_deployment", fake("deploy"))
    return seen


def _invoke(*args: str) -> None:
    res = CliRunner().invoke(app, ["fed", *args])
    assert res.exit_code == 0, res.output


def test_sim_and_deploy_share_one_option_set(tmp_path: Path, captured: dict[str, object]) -> None:
    args = ["--data", str(tmp_path), "--out", str(tmp_path / "run"), "--sites", "3", "--rounds", "2",
            "--strategy", "krum", "--phases", "classifier,mae", "--no-calibrate", "--classifier-split", "fedbn",
            "--max-update-norm", "0", "--max-relative-norm", "2.5", "--max-median-ratio", "0", "--max-examples", "50",
            "--poison-site", "1", "--poison-scale", "-4",
            "--student-steps", "2", "--purify-range", "30", "90", "--seed", "7", "--max-train", "8", "--timeout", "60"]
    _invoke("sim", *args)
    _invoke("deploy", *args)
    assert captured["sim"] == captured["deploy"]
    cfg = captured["sim"]
    assert isinstance(cfg, FedConfig) and captured["sim_timeout"] == captured["deploy_timeout"] == 60.0
    assert (cfg.num_sites, cfg.rounds, cfg.strategy, cfg.phases, cfg.calibrate, cfg.classifier_split) == (
        3, 2, "krum", ("classifier", "mae"), False, "fedbn")
    assert cfg.max_update_norm == math.inf and cfg.max_relative_norm == 2.5  # 0: no bound
    assert cfg.max_median_ratio == math.inf and cfg.max_examples == 50
    assert (cfg.poison_site, cfg.poison_scale, cfg.seed, cfg.max_train) == (1, -4.0, 7, 8)
    assert (cfg.student_steps, cfg.purify_t_min, cfg.purify_t_max) == (2, 30, 90)


def test_options_left_out_take_fedconfig_defaults(tmp_path: Path, captured: dict[str, object]) -> None:
    _invoke("sim", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--sites", "2")
    defaults = FedConfig(data_dir=str(tmp_path), out_dir=str(tmp_path / "run"), num_sites=2)
    assert captured["sim"] == defaults
    assert (defaults.student_steps, defaults.purify_t_min, defaults.purify_t_max) == (
        PURIFY_DEFAULTS.steps, PURIFY_DEFAULTS.t_min, PURIFY_DEFAULTS.t_max)


def test_detector_phase_options_reach_the_config(tmp_path: Path, captured: dict[str, object]) -> None:
    _invoke("sim", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--sites", "2", "--rounds", "3",
            "--phases", "classifier,mae,detector", "--detector-harden-rounds", "2", "--detector-l2", "0.5")
    cfg = captured["sim"]
    assert cfg.phases == ("classifier", "mae", "detector") and cfg.detector_harden_rounds == 2
    assert cfg.detector_l2 == 0.5
    res = CliRunner().invoke(app, ["fed", "sim", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--sites", "2",
                                   "--rounds", "2", "--phases", "classifier,detector", "--detector-harden-rounds", "3"])
    assert res.exit_code == 2 and "detector_harden_rounds" in res.output


def test_bad_option_is_a_usage_error_and_every_option_is_listed(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["fed", "deploy", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                                   "--sites", "2", "--strategy", "fedsgd"])
    assert res.exit_code == 2 and "strategy" in res.output
    names = {p.name for p in RUN_OPTIONS + FEDERATION_OPTIONS}
    assert len(names) == len(RUN_OPTIONS) + len(FEDERATION_OPTIONS) == 28
    fed = typer.main.get_command(app).commands["fed"]  # type: ignore[attr-defined]
    params = {name: [p.name for p in fed.commands[name].params] for name in ("sim", "deploy", "compare")}
    shared = [*(p.name for p in RUN_OPTIONS + FEDERATION_OPTIONS + ADV_OPTIONS + SMOOTHING_OPTIONS), "timeout"]
    assert params["deploy"] == shared
    assert params["sim"] == [*shared, "resume", "pause_after"]  # a simulated run pauses and resumes
    assert params["compare"] == [*(p.name for p in RUN_OPTIONS), "methods", "timeout"]


def test_robustness_command_builds_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``fed robustness``: the strategies, the poisoned site and scale and the median bound reach the runner."""
    seen: dict[str, object] = {}

    def fake(cfg: FedConfig, out: Path, **kw: object) -> dict:
        seen.update(cfg=cfg, **kw)
        out.mkdir(parents=True, exist_ok=True)
        (out / "robustness.md").write_text("| table |\n")
        return {}

    monkeypatch.setattr("medfedpure.fed.compare.run_robustness", fake)
    base = ["--data", str(tmp_path), "--out", str(tmp_path / "r"), "--sites", "4", "--rounds", "3"]
    _invoke("robustness", *base, "--strategies", "fedavg,krum", "--poison-scale", "-20", "--max-median-ratio", "4")
    cfg = seen["cfg"]
    assert isinstance(cfg, FedConfig) and cfg.max_median_ratio == 4.0 and cfg.rounds == 3
    assert (seen["strategies"], seen["poison_site"], seen["poison_scale"]) == (("fedavg", "krum"), -1, -20.0)
    res = CliRunner().invoke(app, ["fed", "robustness", *base, "--strategies", "fedsgd"])
    assert res.exit_code == 2 and "fedsgd" in res.output


def test_sim_resume_and_pause_reach_the_runner_and_a_pause_exits_75(tmp_path: Path, captured: dict[str, object],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from medfedpure.fed.sim import FederationPaused

    _invoke("sim", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--sites", "2", "--resume",
            "--pause-after", "30")
    cfg = captured["sim"]
    assert isinstance(cfg, FedConfig) and cfg.pause_after_s == 30.0 and captured["sim_kw"] == {"resume": True}

    def paused(cfg: FedConfig, timeout_s: float, **kw: object) -> dict:
        raise FederationPaused("paused", "phase 'classifier' after round 4")

    monkeypatch.setattr("medfedpure.fed.sim.run_sim", paused)
    res = CliRunner().invoke(app, ["fed", "sim", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                                   "--sites", "2", "--pause-after", "30"])
    assert res.exit_code == 75 and "paused phase 'classifier' after round 4" in res.output and "--resume" in res.output


def test_deployment_refuses_pausing(tmp_path: Path) -> None:
    from medfedpure.fed.deploy import run_deployment

    with pytest.raises(ValueError, match="simulation runtime"):
        run_deployment(FedConfig(data_dir=str(tmp_path), out_dir=str(tmp_path / "r"), num_sites=2,
                                 pause_after_rounds=1))
    assert not (tmp_path / "r").exists()
