"""The purifier's training range of diffusion times (``denoise_t_max``): certification by denoised
smoothing at σ asks the shipped student for t(σ) (290 at σ 0.25, 496 at σ 0.5), beyond the presets'
250; the option reaches the teacher's and the student's training configs in a site's federated round,
the single-site CLIs, ``fed`` and ``bundle build``, and is refused where the student would not cover its
own purification range."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from medfedpure.build.config import BundleBuildConfig
from medfedpure.build.pipeline import BuildPaths, fed_configs, make_steps
from medfedpure.cli import app
from medfedpure.fed import tasks
from medfedpure.fed.config import FedConfig
from typer.testing import CliRunner


def _site() -> SimpleNamespace:
    x = np.zeros((2, 1, 32, 32), np.float32)
    return SimpleNamespace(x_train=x, x_val=x)


def test_a_round_trains_the_teacher_and_student_on_the_given_range(monkeypatch, tmp_path: Path) -> None:
    seen: dict[str, object] = {}
    monkeypatch.setattr(tasks, "train_denoiser", lambda model, sched, xt, xv, cfg, **kw: seen.update(teacher=cfg) or {})
    monkeypatch.setattr(tasks, "distill_student", lambda t, s, sched, xt, xv, cfg, **kw: seen.update(student=cfg) or {})
    stub = SimpleNamespace(schedule=None)  # the rounds read model.schedule / teacher.schedule only
    monkeypatch.setattr(tasks, "load_model", lambda path: (stub, None, None))
    (tmp_path / "global").mkdir()
    (tmp_path / "global" / "teacher.safetensors").write_bytes(b"")
    for t_max, teacher_hi, student_max in ((0, 250.0, 250.0), (520, 520.0, 520.0)):
        job = tasks.LocalJob("tiny", 1, seed=0, site_dir=tmp_path, denoise_t_max=t_max)
        tasks.train_teacher_round(stub, _site(), job)
        tasks.train_student_round(stub, _site(), job)
        assert (seen["teacher"].t_hi, seen["student"].t_max) == (teacher_hi, student_max)
        assert seen["teacher"].t_lo == 1.0 and seen["student"].t_min == 10.0  # only the upper end moves
    with pytest.raises(ValueError, match="denoise_t_max"):
        tasks.LocalJob("tiny", 1, seed=0, denoise_t_max=-1)


def test_fed_config_carries_and_checks_the_range(tmp_path: Path) -> None:
    cfg = FedConfig(data_dir=str(tmp_path), out_dir=str(tmp_path / "o"), denoise_t_max=520)
    assert FedConfig.from_run_config(cfg.to_run_config()).denoise_t_max == 520  # what each site reads
    assert FedConfig(data_dir=str(tmp_path), out_dir=str(tmp_path / "o")).denoise_t_max == 0
    for bad in (150, 1001):  # below the default purify_t_max 200: the student would not cover its t*
        with pytest.raises(ValueError, match=f"denoise_t_max={bad}"):
            FedConfig(data_dir=str(tmp_path), out_dir=str(tmp_path / "o"), denoise_t_max=bad)


def test_bundle_build_passes_it_to_the_purifier_federation_only(tmp_path: Path) -> None:
    work = tmp_path / "work"
    r = CliRunner().invoke(app, ["bundle", "build", "--work", str(work), "--dest", str(tmp_path / "dest"), "--dry-run",
                                 "--denoise-t-max", "520"])
    assert r.exit_code == 0, r.output
    cfg = BundleBuildConfig.from_dict(json.loads((work / "config.json").read_text()))
    assert cfg.denoise_t_max == 520
    pur, cls = fed_configs(cfg, BuildPaths(work))
    assert (pur.denoise_t_max, cls.denoise_t_max) == (520, 0)
    steps = {s.name: s for s in make_steps(cfg, BuildPaths(work), federate=lambda c, t: {})}
    assert steps["fed_purifier"].inputs["denoise_t_max"] == 520  # a changed range reruns the purifier federation
    default = {s.name: s for s in make_steps(BundleBuildConfig(), BuildPaths(work), federate=lambda c, t: {})}
    assert "denoise_t_max" not in default["fed_purifier"].inputs  # a default build resumes as before
    r = CliRunner().invoke(app, ["bundle", "build", "--work", str(work), "--dry-run", "--denoise-t-max", "100"],
                           env={"COLUMNS": "400"})
    assert r.exit_code == 2 and "denoise_t_max=100" in r.output


def test_single_site_commands_take_the_range(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["train", "purifier", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                                 "--config", "tiny", "--denoise-t-max", "520", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["train"]["t_hi"] == 520.0
    r = CliRunner().invoke(app, ["train", "distill", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                                 "--config", "tiny", "--teacher", str(tmp_path), "--denoise-t-max", "520", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["distill"]["t_max"] == 520.0
    r = CliRunner().invoke(app, ["train", "distill", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                                 "--config", "tiny", "--teacher", str(tmp_path), "--denoise-t-max", "150", "--dry-run"],
                           env={"COLUMNS": "400"})
    assert r.exit_code == 2 and "t_max <= 150.0 (the distillation range)" in r.output  # t* must lie inside it


def test_distill_refuses_a_range_beyond_the_teachers(tmp_path: Path) -> None:
    """A teacher trained on t <= 250 (the presets') cannot teach a student at t 520; one trained to 520 can."""
    from medfedpure.models.unet import UNet, UNetConfig
    from medfedpure.models.weights import save_model
    from medfedpure.train.purifier import DenoiserTrainConfig

    ucfg = UNetConfig.preset("tiny")
    for t_hi in (250, 520):
        folder = tmp_path / f"teacher{t_hi}"
        save_model(folder / "teacher.safetensors", UNet(ucfg), ucfg, "unet",
                   extra={"role": "teacher", "train_config": DenoiserTrainConfig.preset("tiny", t_hi=float(t_hi)).to_dict()})
    wide = {"COLUMNS": "400"}
    base = ["train", "distill", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--config", "tiny", "--dry-run"]
    r = CliRunner().invoke(app, [*base, "--teacher", str(tmp_path / "teacher250"), "--denoise-t-max", "520"], env=wide)
    assert r.exit_code == 2 and "reaches t 520 but the teacher" in r.output and "trained on t <= 250" in r.output, r.output
    r = CliRunner().invoke(app, [*base, "--teacher", str(tmp_path / "teacher250")], env=wide)
    assert r.exit_code == 0 and json.loads(r.output)["distill"]["t_max"] == 250.0, r.output
    r = CliRunner().invoke(app, [*base, "--teacher", str(tmp_path / "teacher520"), "--denoise-t-max", "520"], env=wide)
    assert r.exit_code == 0 and json.loads(r.output)["distill"]["t_max"] == 520.0, r.output
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "teacher.safetensors").write_bytes(b"not a model")
    r = CliRunner().invoke(app, [*base, "--teacher", str(tmp_path / "junk")], env=wide)
    assert r.exit_code == 2 and "not a readable teacher checkpoint" in r.output, r.output
