"""The bundle build: its config, the resumable step runner, ``--dry-run``, and one build end to end.

The end-to-end build runs every real step (synthetic data, merge, calibration, export, verification,
size check, install) at the tiniest settings; only the federated simulation is replaced by a stand-in
that writes the same run folders (``{"fed": FedConfig}`` config, metrics, checkpoints) with
untrained tiny models — Flower's simulation on two cores takes longer than a unit test may.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from medfedpure.build import BundleBuildConfig
from medfedpure.build.steps import Step, plan_steps, read_record, run_steps
from medfedpure.models.diffusion import PURIFY_DEFAULTS, PurifySchedule

STEP_NAMES = ["data", "fed_purifier", "fed_cls_mae", "merge", "calibrate", "export", "verify", "size_check",
              "install"]


# --- config --------------------------------------------------------------------------------------


def test_config_defaults_are_the_default_bundles():
    c = BundleBuildConfig()
    assert (c.sites, c.per_site, c.size, c.site, c.preset, c.seed) == (2, 600, 128, 1, "small", 0)
    assert (c.rounds, c.local_epochs, c.max_train) == (30, 2, 0)
    assert (c.purifier_rounds, c.purifier_local_epochs, c.purifier_phases) == (10, 2, ("teacher", "student"))
    assert c.schedule == PURIFY_DEFAULTS == PurifySchedule(t_min=60, t_max=200, steps=1)
    assert (c.threads, c.timeout_s, c.max_bundle_bytes) == (2, 5400.0, 25 * 1024 * 1024)
    assert c.dest_path.name == "default" and c.dest_path.parent.name == "bundles"
    d = c.to_dict()
    assert d["schedule"] == {"t_min": 60, "t_max": 200, "steps": 1} and d["purifier_phases"] == ["teacher", "student"]
    assert BundleBuildConfig.from_dict(json.loads(json.dumps(d))) == c
    assert BundleBuildConfig(purifier_phases="teacher").purifier_phases == ("teacher",)
    assert (c.detector_rounds, c.detector_local_epochs, c.detector_harden_rounds, c.detector_l2) == (0, 2, 0, 0.0)


@pytest.mark.parametrize("kw, match", [
    (dict(sites=0), "sites"), (dict(sites=65), "sites"), (dict(per_site=5), "per_site"), (dict(size=16), "size"),
    (dict(site=2), "site"), (dict(site=-1), "site"), (dict(preset="large"), "preset"), (dict(seed=-1), "seed"),
    (dict(rounds=0), "rounds"), (dict(local_epochs=0), "local_epochs"), (dict(purifier_rounds=0), "purifier_rounds"),
    (dict(max_train=-1), "max_train"), (dict(purifier_phases=("student",)), "purifier_phases"),
    (dict(purifier_phases="student,teacher"), "purifier_phases"), (dict(threads=0), "threads"),
    (dict(timeout_s=0), "timeout_s"), (dict(max_bundle_bytes=0), "max_bundle_bytes"),
    (dict(schedule={"t_min": 300, "t_max": 200, "steps": 1}), "t_min"),
    (dict(schedule={"t_min": 60, "t_max": 200, "steps": 3}), "K = 1, 2 or 4"),
    (dict(schedule=(60, 200, 1)), "schedule"),
    (dict(detector_rounds=-1), "detector_rounds"), (dict(detector_rounds=2, detector_local_epochs=0), "detector_rounds"),
    (dict(detector_rounds=2, detector_harden_rounds=3), "detector_harden_rounds"),
    (dict(detector_harden_rounds=1), "detector_harden_rounds"), (dict(detector_l2=-0.1), "detector_l2"),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        BundleBuildConfig(**kw)


def test_config_changed_names_only_the_options_off_their_defaults():
    cfg = BundleBuildConfig(calibrate_on="pooled", calibration_target_ffr=0.05, classifier_width=2)
    assert cfg.changed("calibrate_on", "calibration_target_ffr", "calibration_confidence") == {"calibrate_on": "pooled"}
    assert cfg.changed("classifier_width", "classifier_stem", "denoise_t_max") == {"classifier_width": 2}
    assert BundleBuildConfig().changed("calibrate_on", "denoise_t_max") == {}
    with pytest.raises(AttributeError, match="no_such_option"):
        cfg.changed("no_such_option")


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown bundle build options \\['round'\\]"):
        BundleBuildConfig.from_dict({"round": 3})


# --- the step runner -----------------------------------------------------------------------------


class FakeSteps:
    """Three steps a → b and an independent c, each writing one file and counting its runs."""

    def __init__(self, root: Path, a_opt: int = 1, c_opt: int = 1, fail_b: bool = False) -> None:
        self.root, self.calls = root, []
        self.fail_b = fail_b
        self.steps = [
            Step("a", lambda: self._write("a"), {"opt": a_opt}, (root / "a.txt",)),
            Step("b", lambda: self._write("b"), {}, (root / "b.txt",), ("a",)),
            Step("c", lambda: self._write("c"), {"opt": c_opt}, (root / "c.txt",)),
            Step("check", lambda: self._write("check", file=False), {}, (), ("b",)),
        ]

    def _write(self, name: str, file: bool = True) -> dict:
        self.calls.append(name)
        if name == "b" and self.fail_b:
            raise RuntimeError("b failed")
        if file:
            (self.root / f"{name}.txt").write_text(name)
        return {"n": len(self.calls)}


def test_runner_runs_then_skips_then_reruns_what_a_changed_option_reaches(tmp_path):
    state = tmp_path / "state.json"
    logs: list[str] = []
    f = FakeSteps(tmp_path)
    rep = run_steps(f.steps, state, log=logs.append)
    assert f.calls == ["a", "b", "c", "check"] and all(d.run for d in rep.decisions)
    rec = read_record(state)
    assert set(rec["steps"]) == {"a", "b", "c", "check"} and set(rec["step_seconds"]) == {"a", "b", "c", "check"}
    assert rec["steps"]["a"]["inputs"] == {"opt": 1} and rec["steps"]["c"]["result"] == {"n": 3}

    # Same options, outputs present: everything with outputs is skipped; its recorded result stands.
    f = FakeSteps(tmp_path)
    rep = run_steps(f.steps, state, log=logs.append)
    assert f.calls == ["check"]
    assert [d.run for d in rep.decisions] == [False, False, False, True]
    assert rep.results["c"] == {"n": 3} and rep.decisions[0].reason == "outputs present, inputs unchanged"

    # A changed option reruns its step and every step after it, not the independent one.
    f = FakeSteps(tmp_path, a_opt=2)
    rep = run_steps(f.steps, state, log=logs.append)
    assert f.calls == ["a", "b", "check"]
    assert rep.decisions[0].reason == "inputs changed: opt"
    assert rep.decisions[1].reason == "an earlier step's inputs changed"
    assert read_record(state)["steps"]["a"]["inputs"] == {"opt": 2}

    # A missing output reruns its step and the steps after it.
    (tmp_path / "a.txt").unlink()
    f = FakeSteps(tmp_path, a_opt=2)
    rep = run_steps(f.steps, state, log=logs.append)
    assert f.calls == ["a", "b", "check"]
    assert rep.decisions[0].reason == "outputs missing: a.txt" and rep.decisions[1].reason == "reruns after a"
    assert any("skipped" in m for m in logs) and any("running" in m for m in logs)


def test_runner_dry_run_writes_nothing_and_a_failed_step_is_not_done(tmp_path):
    state = tmp_path / "state.json"
    f = FakeSteps(tmp_path)
    rep = run_steps(f.steps, state, dry_run=True, log=lambda m: None)
    assert f.calls == [] and not state.exists() and [d.run for d in rep.decisions] == [True] * 4
    run_steps(f.steps, state, log=lambda m: None)

    f = FakeSteps(tmp_path, a_opt=3, fail_b=True)
    with pytest.raises(RuntimeError, match="b failed"):
        run_steps(f.steps, state, log=lambda m: None)
    assert f.calls == ["a", "b"]
    rec = read_record(state)
    assert "b" not in rec["steps"] and rec["steps"]["a"]["inputs"] == {"opt": 3}  # b's old record is gone
    f = FakeSteps(tmp_path, a_opt=3)
    decisions = plan_steps(f.steps, read_record(state))
    assert [(d.name, d.run) for d in decisions] == [("a", False), ("b", True), ("c", False), ("check", True)]
    assert decisions[1].reason == "no recorded run"


def test_runner_rejects_bad_step_lists(tmp_path):
    noop = lambda: None  # noqa: E731
    with pytest.raises(ValueError, match="not earlier steps"):
        plan_steps([Step("b", noop, after=("a",)), Step("a", noop)], {})
    with pytest.raises(ValueError, match="used twice"):
        plan_steps([Step("a", noop), Step("a", noop)], {})
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(ValueError, match="remove it"):
        read_record(tmp_path / "bad.json")


# --- the command line: --dry-run -----------------------------------------------------------------


def test_cli_dry_run_lists_the_steps_and_writes_only_the_config(tmp_path):
    from medfedpure.cli import app
    from typer.testing import CliRunner

    work, dest = tmp_path / "work", tmp_path / "dest"
    r = CliRunner().invoke(app, ["bundle", "build", "--work", str(work), "--dest", str(dest), "--dry-run",
                                 "--sites", "3", "--t-max", "150", "--preset", "tiny", "--size", "32"])
    assert r.exit_code == 0, r.output
    for name in STEP_NAMES:
        assert f"{name}: would run" in r.output
    assert sorted(p.name for p in work.iterdir()) == ["config.json"] and not dest.exists()
    cfg = json.loads((work / "config.json").read_text())
    assert cfg["sites"] == 3 and cfg["schedule"] == {"t_min": 60, "t_max": 150, "steps": 1}
    assert cfg["dest"] == str(dest) and cfg["preset"] == "tiny"
    r = CliRunner().invoke(app, ["bundle", "build", "--work", str(work), "--dry-run", "--site", "5"])
    assert r.exit_code != 0 and "site=5" in r.output


def test_recorded_takes_the_recipe_from_the_work_folder_and_the_given_options_from_the_command_line(tmp_path):
    from medfedpure.cli import app
    from typer.testing import CliRunner

    work = tmp_path / "work"

    def build(*args: str) -> tuple[int, str]:
        r = CliRunner().invoke(app, ["bundle", "build", "--work", str(work), "--dry-run", *args])
        return r.exit_code, " ".join(r.output.replace("│", " ").split())  # the error box's lines joined

    code, out = build("--recorded", "--site", "0")
    assert code == 2 and "does not exist; run the build once with its options" in out
    code, out = build("--dest", str(tmp_path / "site2"), "--sites", "3", "--preset", "tiny", "--size", "32",
                      "--rounds", "4", "--mae-rounds", "2", "--t-max", "150", "--adv", "pgd", "--adv-eps", "8",
                      "--timeout", "900", "--target-ffr", "0.07", "--site", "2")
    assert code == 0, out
    first = json.loads((work / "config.json").read_text())
    # another site's bundle of the same build: only --site and --dest given
    code, out = build("--recorded", "--site", "0", "--dest", str(tmp_path / "site0"))
    assert code == 0, out
    again = json.loads((work / "config.json").read_text())
    assert again == {**first, "site": 0, "dest": str(tmp_path / "site0")}
    assert (again["rounds"], again["mae_rounds"], again["schedule"]["t_max"], again["adv_eps"]) == (4, 2, 150, 8 / 255)
    assert (again["timeout_s"], again["calibration_target_ffr"]) == (900.0, 0.07)
    # an option given overrides the record (also one of the schedule's, and a renamed one); the rest stays
    code, out = build("--recorded", "--rounds", "5", "--t-min", "40", "--pause-after", "60")
    assert code == 0, out
    third = json.loads((work / "config.json").read_text())
    assert third == {**again, "rounds": 5, "schedule": {**again["schedule"], "t_min": 40}, "pause_after_s": 60.0}
    # another site without its own --dest would install over the recorded site's bundle
    code, out = build("--recorded", "--site", "1")
    assert code == 2 and "give --dest for site 1's" in out
    (work / "config.json").write_text(json.dumps({**first, "roundz": 3}))
    code, out = build("--recorded")
    assert code == 2 and "not a bundle build's config" in out and "roundz" in out


def test_mae_rounds_reach_the_federation_and_enter_its_step_inputs_only_when_set(tmp_path):
    from medfedpure.build.pipeline import BuildPaths, fed_configs, make_steps
    from medfedpure.cli import app
    from typer.testing import CliRunner

    work = tmp_path / "work"
    r = CliRunner().invoke(app, ["bundle", "build", "--work", str(work), "--dest", str(tmp_path / "dest"), "--dry-run",
                                 "--preset", "tiny", "--size", "32", "--rounds", "4", "--mae-rounds", "2"])
    assert r.exit_code == 0, r.output
    cfg = BundleBuildConfig.from_dict(json.loads((work / "config.json").read_text()))
    assert (cfg.rounds, cfg.mae_rounds) == (4, 2)
    paths = BuildPaths(work)
    cls_mae = fed_configs(cfg, paths)[1]
    assert (cls_mae.rounds_of("classifier"), cls_mae.rounds_of("mae"), cls_mae.total_rounds) == (4, 2, 6)
    inputs = {s.name: dict(s.inputs) for s in make_steps(cfg, paths)}
    assert inputs["fed_cls_mae"]["mae_rounds"] == 2
    # a build at the default records no such input, so a build made before the option existed keeps its steps
    default = BundleBuildConfig(preset="tiny", size=32, rounds=4)
    assert "mae_rounds" not in {s.name: dict(s.inputs) for s in make_steps(default, paths)}["fed_cls_mae"]
    assert fed_configs(default, paths)[1].rounds_of("mae") == 4
    with pytest.raises(ValueError, match="mae_rounds"):
        BundleBuildConfig(mae_rounds=-1)


def test_cli_pause_after_reaches_the_build_and_a_pause_exits_75(tmp_path, monkeypatch):
    from medfedpure.cli import app
    from medfedpure.fed.sim import FederationPaused
    from typer.testing import CliRunner

    seen = {}

    def paused(cfg, work, **kw):
        seen["cfg"] = cfg
        raise FederationPaused("the federation in W paused phase 'classifier' after round 7 (x)", "x")

    monkeypatch.setattr("medfedpure.build.pipeline.build_bundle", paused)
    r = CliRunner().invoke(app, ["bundle", "build", "--work", str(tmp_path / "w"), "--preset", "tiny", "--size", "32",
                                 "--pause-after", "120"])
    assert r.exit_code == 75, r.output
    assert seen["cfg"].pause_after_s == 120.0
    assert "paused phase 'classifier' after round 7" in r.output and "run the same command again" in r.output


# --- the data root of a run folder -------------------------------------------------------------


def test_run_data_root_from_each_run_folder_shape(tmp_path):
    from medfedpure.export.pipeline import run_data_root
    from medfedpure.fed.config import FedConfig

    run = tmp_path / "run"
    with pytest.raises(ValueError, match="does not exist"):
        run_data_root(run)
    FedConfig(data_dir=str(tmp_path / "d"), out_dir=str(run)).save(run / "config.json")  # fed sim's shape
    assert run_data_root(run) == tmp_path / "d"
    (run / "config.json").write_text(json.dumps({"mae": {"data": "x", "site": 0},
                                                 "classifier/site_0": {"data": "x"}}))  # per-site training
    assert run_data_root(run) == Path("x")
    (run / "config.json").write_text(json.dumps({"mae": {"data": "x"}, "classifier/site_0": {"data": "y"}}))
    with pytest.raises(ValueError, match="several data roots"):
        run_data_root(run)
    (run / "config.json").write_text(json.dumps({"data": "z", "note": "hand-written"}))
    with pytest.raises(ValueError, match="names no data root"):
        run_data_root(run)


# --- one build end to end ------------------------------------------------------------------------


def fake_federate(fed_cfg, timeout_s: float) -> dict:
    """Stand-in for ``fed.sim.run_sim``: the run folder a federation writes, with untrained tiny models."""
    from medfedpure.models.mae import MAEConfig, MaskedAutoencoder
    from medfedpure.models.moe import MoEClassifier, MoEConfig
    from medfedpure.models.unet import UNet, UNetConfig
    from medfedpure.models.weights import save_model

    out = Path(fed_cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fed_cfg.save(out / "config.json")
    metrics: dict = {"config": fed_cfg.to_dict(), "phases": {}}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(fed_cfg.seed)
        for phase in fed_cfg.phases:
            if phase == "classifier":
                for k in range(fed_cfg.num_sites):
                    m = MoEClassifier(MoEConfig.preset(fed_cfg.preset))
                    save_model(out / f"site_{k}" / "classifier.safetensors", m, m.cfg, "moe")
            elif phase == "detector":
                from medfedpure.models.detector import AttackDetector, DetectorConfig

                assert all((out / f"site_{k}" / "classifier.safetensors").is_file() for k in range(fed_cfg.num_sites))
                m = AttackDetector(DetectorConfig.preset(fed_cfg.preset))
                save_model(out / "detector.safetensors", m, m.cfg, "detector", extra={"role": phase})
            else:
                m = MaskedAutoencoder(MAEConfig.preset(fed_cfg.preset)) if phase == "mae" \
                    else UNet(UNetConfig.preset(fed_cfg.preset))
                kind = "mae" if phase == "mae" else "unet"
                extra = {"role": phase}
                if phase == "student":
                    extra.update(steps=fed_cfg.student_steps, t_min=fed_cfg.purify_t_min, t_max=fed_cfg.purify_t_max)
                save_model(out / f"{phase}.safetensors", m, m.cfg, kind, extra=extra)
                for k in range(fed_cfg.num_sites):
                    save_model(out / f"site_{k}" / "global" / f"{phase}.safetensors", m, m.cfg, kind, extra=extra)
            metrics["phases"][phase] = {"rounds": fed_cfg.rounds, "per_site": [], "rejected": []}
    metrics["wall_s"] = 0.0
    (out / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def test_build_pauses_in_a_federation_and_the_same_command_continues(tmp_path, monkeypatch):
    """``pause_after_s`` reaches each federation as the time left; a paused federation leaves the steps before
    it recorded, and the same command (any pacing: not a step input) runs only what is left."""
    import time
    from dataclasses import replace

    from medfedpure.build.pipeline import _federate, _run_sim, build_bundle
    from medfedpure.fed.config import FedConfig
    from medfedpure.fed.sim import FederationPaused

    work = tmp_path / "work"
    cfg = BundleBuildConfig(sites=2, per_site=20, size=32, site=1, preset="tiny", rounds=1, local_epochs=1,
                            purifier_rounds=1, purifier_local_epochs=1, threads=1, purifier_phases=("teacher",),
                            dest=str(tmp_path / "dest"), pause_after_s=3600.0)
    seen: list[tuple[tuple[str, ...], float]] = []

    def federate(fed_cfg, timeout_s):
        seen.append((fed_cfg.phases, fed_cfg.pause_after_s))
        if fed_cfg.phases == ("classifier", "mae") and fed_cfg.pause_after_s:
            raise FederationPaused("the federation paused phase 'classifier' after round 1", "x")
        return fake_federate(fed_cfg, timeout_s)

    with pytest.raises(FederationPaused):
        build_bundle(cfg, work, federate=federate, log=lambda m: None)
    assert [p for p, _ in seen] == [("teacher",), ("classifier", "mae")]
    assert 0 < seen[1][1] <= seen[0][1] <= 3600.0
    assert set(read_record(work / "bundle_metrics.json")["steps"]) == {"data", "fed_purifier"}
    out = build_bundle(replace(cfg, pause_after_s=0.0), work, federate=federate, log=lambda m: None)
    assert seen[2:] == [(("classifier", "mae"), 0.0)] and out["bundle_id"]
    # a budget already spent pauses before the federation starts; the build's federations always resume
    fed_cfg = FedConfig(data_dir="d", out_dir=str(tmp_path / "f"))
    with pytest.raises(FederationPaused, match="ran out"):
        _federate(fed_cfg, federate, 10.0, deadline=time.monotonic() - 1.0)
    got = {}
    monkeypatch.setattr("medfedpure.fed.sim.run_sim", lambda c, **kw: got.update(kw) or {})
    _run_sim(fed_cfg, 5.0)
    assert got == {"timeout_s": 5.0, "resume": True}


def test_bundle_build_end_to_end_and_resume(tmp_path):
    from medfedpure.build.pipeline import build_bundle
    from medfedpure.fed.config import FedConfig
    from medfedpure.runtime.bundle import verify_bundle

    work, dest = tmp_path / "work", tmp_path / "dest"
    sched = PurifySchedule(t_min=40, t_max=160, steps=2)
    cfg = BundleBuildConfig(sites=2, per_site=20, size=32, site=1, preset="tiny", rounds=1, local_epochs=1,
                            purifier_rounds=1, purifier_local_epochs=1, schedule=sched, threads=1,
                            purifier_phases=("teacher",), dest=str(dest))
    calls: list[tuple[str, ...]] = []

    def federate(fed_cfg, timeout_s):
        calls.append(fed_cfg.phases)
        return fake_federate(fed_cfg, timeout_s)

    logs: list[str] = []
    out = build_bundle(cfg, work, federate=federate, log=logs.append)
    assert calls == [("teacher",), ("classifier", "mae")]
    assert set(out["step_seconds"]) == set(STEP_NAMES) and all(v >= 0 for v in out["step_seconds"].values())
    vb = verify_bundle(dest)
    assert vb.bundle_id == out["bundle_id"] and out["installed"] == str(dest.resolve())
    assert 0 < out["bundle_bytes"] <= cfg.max_bundle_bytes
    assert (out["gate"]["t_min"], out["gate"]["t_max"], out["gate"]["steps"]) == (40, 160, 2)
    assert out["purifier_steps"] == 2 and out["student_is_teacher"] is True
    assert out["verification"]["fp32"]["classifier"]["top1"] == 1.0
    assert json.loads((work / "config.json").read_text())["schedule"] == {"t_min": 40, "t_max": 160, "steps": 2}

    # One run-folder shape: config.json as fed sim writes it (the data root export found), the
    # student-is-teacher fallback recorded in the run's metrics, no side files.
    run = work / "run"
    fc = FedConfig.load(run / "config.json")
    assert Path(fc.data_dir) == (work / "data").resolve() and fc.out_dir == str(run.resolve())
    assert (fc.purify_t_min, fc.purify_t_max, fc.student_steps) == (40, 160, 2)
    assert json.loads((run / "config.json").read_text())["fed_purifier"]["phases"] == ["teacher"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["student_is_teacher"] is True and set(metrics["phases"]) == {"classifier", "mae", "teacher"}
    assert (run / "student.safetensors").read_bytes() == (run / "teacher.safetensors").read_bytes()
    assert (run / "site_0" / "global" / "teacher.safetensors").is_file()
    assert not (run / "purifier_note.json").exists() and not (run / "metrics_purifier.json").exists()
    calib = json.loads((run / "site_1" / "calibration.json").read_text())
    assert (calib["t_min"], calib["t_max"], calib["steps"], calib["schedule_source"]) == (40, 160, 2, "options")
    # τ on the bundle's site's validation scans (the default, calibrate_on="site"), said so in the shipped record
    n_val = [len(json.loads((work / "data" / "splits.json").read_text())["sites"][f"site_{k}"]["val"]) for k in (0, 1)]
    assert calib["calibration"]["num_val_scans"] == n_val[1] == vb.spec.gate.calibration.num_val_scans
    assert vb.spec.gate.calibration.source == f"the {n_val[1]} clean validation scans of site 1 (bundle build)"

    # Resume: nothing with outputs reruns; a changed knob reruns the steps it reaches only.
    logs.clear()
    out2 = build_bundle(cfg, work, federate=federate, log=logs.append)
    assert calls == [("teacher",), ("classifier", "mae")] and out2["bundle_id"] == out["bundle_id"]
    ran = [m.split(":")[0].split("] ")[1] for m in logs if ": running" in m]
    assert ran == ["verify", "size_check", "install"]
    plan = build_bundle(BundleBuildConfig(**{**cfg.to_dict(), "site": 0}), work, federate=federate, dry_run=True,
                        log=lambda m: None)["plan"]
    assert [p["step"] for p in plan if p["run"]] == ["merge", "calibrate", "export", "verify", "size_check", "install"]
    assert plan[3]["reason"] == "inputs changed: site"
    assert json.loads((work / "config.json").read_text())["site"] == 0  # the dry run wrote its config
    plan = build_bundle(BundleBuildConfig(**{**cfg.to_dict(), "calibrate_on": "pooled"}), work, federate=federate,
                        dry_run=True, log=lambda m: None)["plan"]
    assert [p["step"] for p in plan if p["run"]] == ["calibrate", "export", "verify", "size_check", "install"]
    assert plan[4]["reason"] == "inputs changed: calibrate_on"
    with pytest.raises(ValueError, match="calibrate_on='everywhere'"):
        BundleBuildConfig(**{**cfg.to_dict(), "calibrate_on": "everywhere"})
    with pytest.raises(ValueError, match="calibration_confidence=1.0"):
        BundleBuildConfig(**{**cfg.to_dict(), "calibration_confidence": 1.0})
    plan = build_bundle(BundleBuildConfig(**{**cfg.to_dict(), "calibration_target_ffr": 0.07}), work,
                        federate=federate, dry_run=True, log=lambda m: None)["plan"]
    assert [p["step"] for p in plan if p["run"]] == ["calibrate", "export", "verify", "size_check", "install"]
    assert plan[4]["reason"] == "inputs changed: calibration_target_ffr"
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match=f"calibration_target_ffr={bad}"):
            BundleBuildConfig(**{**cfg.to_dict(), "calibration_target_ffr": bad})
    # a confidence level reaches the calibration: 3 val scans cannot bound the rate by 5 % with probability 0.9
    sure = BundleBuildConfig(**{**cfg.to_dict(), "calibration_confidence": 0.9})
    plan = build_bundle(sure, work, federate=federate, dry_run=True, log=lambda m: None)["plan"]
    assert plan[4]["reason"] == "inputs changed: calibration_confidence"
    with pytest.raises(ValueError, match="at least 45 are needed"):
        build_bundle(sure, work, federate=federate, log=lambda m: None)
    # the target reaches the shipped calibration record: ⌊0.34·n⌋ of the site's n val scans flagged (0 at 5 %)
    loose = BundleBuildConfig(**{**cfg.to_dict(), "calibration_target_ffr": 0.34})
    assert build_bundle(loose, work, federate=federate, log=lambda m: None)["bundle_id"] != out["bundle_id"]
    rec = verify_bundle(dest).spec.gate.calibration
    assert rec.target_false_flag_rate == 0.34 and rec.num_val_scans == n_val[1]
    assert rec.val_false_flag_rate == pytest.approx(int(0.34 * n_val[1]) / n_val[1]) and rec.val_false_flag_rate > 0
    assert vb.spec.gate.calibration.val_false_flag_rate == 0

    # benchmarks/release_eval.sh's bundles step: site 0's bundle by the recipe the work folder recorded (the last
    # build's, target 0.34), signed by the candidate key; a second instance on the same work folder is refused
    import fcntl
    import os
    import subprocess
    import sys

    from medfedpure.export.signing import generate_key_pair

    root = Path(__file__).resolve().parents[1]
    key = tmp_path / "keys" / "candidate"
    generate_key_pair(key.parent, "candidate")
    env = {**os.environ, "WORK": str(work), "KEY": str(key), "STEPS": "bundles", "SITES": "0",
           "BIN": str(Path(sys.executable).parent)}
    script = ["bash", str(root / "benchmarks" / "release_eval.sh")]
    r = subprocess.run(script, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "site 0: bundle → " in r.stdout
    site0 = verify_bundle(work / "bundle_site0", trusted_keys=[key.parent / "candidate.pub.pem"])
    assert site0.signer is not None and site0.signer.name == "candidate"
    assert site0.spec.gate.calibration.target_false_flag_rate == 0.34 and site0.bundle_id != verify_bundle(dest).bundle_id
    assert json.loads((work / "bundle_site0" / "manifest.json").read_text())["provenance"]["site"] == 0
    log = (work / "eval" / "bundle_site0.log").read_text()
    assert "fed_cls_mae: skipped" in log and "merge: running (inputs changed: site)" in log
    with open(work / "eval" / ".release_eval.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = subprocess.run(script, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 4 and "another release_eval.sh is working on" in r.stdout
    r = subprocess.run(script, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "bundle_site0 exists" in r.stdout


def test_bundle_build_with_a_detector_federation_ships_the_learned_gate(tmp_path):
    from medfedpure.build.pipeline import build_bundle
    from medfedpure.runtime.bundle import verify_bundle

    work, dest = tmp_path / "work", tmp_path / "dest"
    cfg = BundleBuildConfig(sites=2, per_site=20, size=32, site=1, preset="tiny", rounds=1, local_epochs=1,
                            purifier_rounds=1, purifier_local_epochs=1, threads=1, purifier_phases=("teacher",),
                            dest=str(dest), detector_rounds=2, detector_harden_rounds=1, detector_l2=0.5,
                            calibrate_on="pooled")
    calls: list = []

    def federate(fed_cfg, timeout_s):
        calls.append((fed_cfg.phases, fed_cfg.rounds, fed_cfg.detector_harden_rounds, fed_cfg.detector_l2))
        return fake_federate(fed_cfg, timeout_s)

    out = build_bundle(cfg, work, federate=federate, log=lambda m: None)
    assert [c[0] for c in calls] == [("teacher",), ("classifier", "mae"), ("detector",)]
    assert calls[2][1:] == (2, 1, 0.5)
    for k in (0, 1):  # each site's detector federation starts from its own classifier
        assert (work / "fed_detector" / f"site_{k}" / "classifier.safetensors").read_bytes() == (
            work / "fed_cls_mae" / f"site_{k}" / "classifier.safetensors").read_bytes()
    assert set(out["step_seconds"]) == {*STEP_NAMES, "fed_detector", "learned_gate"}
    vb = verify_bundle(dest)
    g = vb.spec.gate
    assert vb.bundle_id == out["bundle_id"] and g.stat == "learned" and out["gate"]["stat"] == "learned"
    assert g.t_max == g.t_min == out["gate"]["t_max"]  # flagged scans purified at t_min
    assert {a.role for a in vb.artefacts.values()} >= {"detector", "classifier", "mae", "denoiser"}
    assert out["gate"]["tau"] == pytest.approx(g.tau) and out["gate"]["num_val_scans"] == g.calibration.num_val_scans
    prov = vb.spec.provenance
    assert prov["detector"]["federation"] == "fed_detector" and prov["detector"]["harden_rounds"] == 1
    assert "sites 0, 1 pooled" in prov["recalibration"]["description"]
    n_val = [len(json.loads((work / "data" / "splits.json").read_text())["sites"][f"site_{k}"]["val"]) for k in (0, 1)]
    assert g.calibration.num_val_scans == sum(n_val) == prov["recalibration"]["num_scans"] > n_val[1]
    # the staged hfratio gate was set on the same pooled scans
    staged = verify_bundle(work / "bundle", allow_unsigned=True).spec.gate.calibration
    assert staged.num_val_scans == sum(n_val) and "sites 0, 1 pooled" in staged.source
    # the hfratio bundle staged before the detector is untouched; a dry rerun plans nothing but the checks
    assert verify_bundle(work / "bundle", allow_unsigned=True).spec.gate.stat != "learned"
    plan = build_bundle(cfg, work, federate=federate, dry_run=True, log=lambda m: None)["plan"]
    assert [p["step"] for p in plan if p["run"]] == ["verify", "size_check", "install"]
    plan = build_bundle(BundleBuildConfig(**{**cfg.to_dict(), "detector_l2": 0.0}), work, federate=federate,
                        dry_run=True, log=lambda m: None)["plan"]
    assert [p["step"] for p in plan if p["run"]] == ["fed_detector", "learned_gate", "verify", "size_check", "install"]


@pytest.mark.slow
def test_bundle_build_with_flower_simulation(tmp_path):
    """The real federations (Flower simulation, one round each) at the tiniest settings; about a minute."""
    pytest.importorskip("flwr")
    from medfedpure.build.pipeline import build_bundle
    from medfedpure.fed.config import FedConfig
    from medfedpure.runtime.bundle import verify_bundle

    work, dest = tmp_path / "work", tmp_path / "dest"
    cfg = BundleBuildConfig(sites=2, per_site=20, size=32, site=1, preset="tiny", rounds=1, local_epochs=1,
                            max_train=8, purifier_rounds=1, purifier_local_epochs=1, purifier_max_train=8,
                            threads=1, timeout_s=240, dest=str(dest), detector_rounds=1)
    out = build_bundle(cfg, work, log=lambda m: None)
    assert verify_bundle(dest).bundle_id == out["bundle_id"] and out["student_is_teacher"] is False
    assert verify_bundle(dest).spec.gate.stat == "learned"  # the detector federation ran for real
    det = json.loads((work / "fed_detector" / "metrics.json").read_text())["phases"]["detector"]
    assert not det["errors"] and {r["site"] for r in det["per_site"] if r["kind"] == "evaluate"} == {0, 1}
    run = work / "run"
    assert Path(FedConfig.load(run / "config.json").data_dir) == (work / "data").resolve()
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["phases"]) == {"classifier", "mae", "teacher", "student"}
    assert metrics["leftover_pids"] == [] and metrics["purifier_federation"]["leftover_pids"] == []
    for k in (0, 1):
        assert {p.name for p in (run / f"site_{k}" / "global").iterdir()} >= {"mae.safetensors", "teacher.safetensors",
                                                                                 "student.safetensors"}
    calib = json.loads((run / "site_1" / "calibration.json").read_text())
    assert (calib["t_min"], calib["t_max"], calib["steps"]) == (60, 200, 1)
    assert build_bundle(cfg, work, dry_run=True, log=lambda m: None)["plan"][:6] == [
        {"step": s, "run": False, "reason": "outputs present, inputs unchanged"} for s in STEP_NAMES[:6]]
