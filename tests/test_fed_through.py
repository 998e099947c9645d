"""Adversarial training through the purifier, federated: ``fed sim|deploy --adv-through-purifier [--purifier-t T
--purifier-eot E] --denoiser D`` and ``bundle build --adv-through-purifier`` (the purifier federation's student).

The options become ``FedConfig`` fields, reach each site's ``ClassifierTrainConfig`` (t* and K resolved at the
site from the denoiser's own schedule unless the run sets t*), refuse what would do nothing or cannot run, and at
their defaults change no build step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from medfedpure.build.config import BundleBuildConfig
from medfedpure.build.pipeline import BuildPaths, fed_configs
from medfedpure.cli import app
from medfedpure.fed import tasks
from medfedpure.fed.config import THROUGH_DEFAULTS, THROUGH_FIELDS, FedConfig, through_overrides
from medfedpure.fed.phases import build_model
from medfedpure.train import denoiser as denoiser_mod
from medfedpure.train.classifier import ClassifierTrainConfig
from test_fed_adv import _dry_run_build, _fed, captured  # noqa: F401  (the fixture that replaces both runners)
from test_fed_smoothing import _count_denoiser, _steps, _tiny_site, student_run  # noqa: F401
from typer.testing import CliRunner

EPS8 = 8 / 255


@pytest.fixture(autouse=True)
def _fresh_denoiser_cache() -> None:
    denoiser_mod.load_denoiser_cached.cache_clear()


def test_options_reach_the_config_and_bad_ones_exit_2(tmp_path: Path, student_run: Path,  # noqa: F811
                                                      captured: dict[str, FedConfig]) -> None:  # noqa: F811
    ok = _fed(tmp_path, "--adv", "pgd", "--adv-eps", "8", "--adv-through-purifier", "--purifier-eot", "3",
              "--denoiser", str(student_run))
    for cmd in ("sim", "deploy"):
        r = CliRunner().invoke(app, ["fed", cmd, *ok])
        assert r.exit_code == 0, r.output
    cfg = captured["sim"]
    assert captured["deploy"] == cfg and FedConfig.from_run_config(cfg.to_run_config()) == cfg
    assert (cfg.adv_through_purifier, cfg.purifier_t, cfg.purifier_eot) == (True, 0.0, 3)
    over = cfg.classifier_overrides()
    assert over["adv_through_purifier"] is True and over["purifier_eot"] == 3 and "purifier_t" not in over
    r = CliRunner().invoke(app, ["fed", "sim", *_fed(tmp_path)])
    assert r.exit_code == 0 and {n: getattr(captured["sim"], n) for n in THROUGH_FIELDS} == THROUGH_DEFAULTS
    assert THROUGH_DEFAULTS["purifier_eot"] == ClassifierTrainConfig().purifier_eot
    for extra, match in ((("--adv", "pgd", "--adv-eps", "8", "--adv-through-purifier"), "needs a denoiser"),
                         (("--purifier-eot", "3"), "without adv_through_purifier does nothing"),
                         (("--adv", "trades", "--adv-eps", "8", "--adv-through-purifier", "--denoiser",
                           str(student_run)), "only adv='pgd'")):
        r = CliRunner().invoke(app, ["fed", "sim", *_fed(tmp_path, *extra)])
        assert r.exit_code == 2 and match in " ".join(r.output.replace("│", " ").split()), (extra, r.output)
    with pytest.raises(ValueError, match="purifier_t=-1.0"):
        through_overrides("tiny", {"adv": "pgd", "adv_eps": EPS8}, adv_through_purifier=True, purifier_t=-1)


def test_site_round_crafts_through_the_denoiser_at_its_t_min(tmp_path: Path, student_run: Path,  # noqa: F811
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    counts = _count_denoiser(monkeypatch)
    run = FedConfig(data_dir="d", out_dir="o", rounds=2, adv="pgd", adv_eps=EPS8, adv_steps=1,
                    adv_through_purifier=True, purifier_eot=1, denoiser=str(student_run))
    job = tasks.LocalJob("tiny", 1, seed=3, site_dir=tmp_path / "site_0", schedule=(0, 2),
                         classifier_overrides=run.classifier_overrides(), denoiser=run.denoiser)
    metrics, _ = tasks.train_classifier_round(build_model("classifier", "tiny", seed=0)[0], _tiny_site(), job, None)
    assert counts["loads"] == 1 and counts["calls"] > 0 and metrics["train_loss"] == metrics["train_loss"]
    used = json.loads((tmp_path / "site_0" / "classifier_train_config.json").read_text())["train"]
    # the student records t_min 60 and one step (the fixture): the round's t* and K come from it
    assert (used["adv_through_purifier"], used["purifier_t"], used["purifier_steps"], used["purifier_eot"]) == \
        (True, 60.0, 1, 1)
    # a t* set by the run wins over the denoiser's
    run2 = FedConfig(data_dir="d", out_dir="o", rounds=2, adv="pgd", adv_eps=EPS8, adv_steps=1,
                     adv_through_purifier=True, purifier_t=90, purifier_eot=1, denoiser=str(student_run))
    job2 = tasks.LocalJob("tiny", 1, seed=3, site_dir=tmp_path / "site_1", schedule=(0, 2),
                          classifier_overrides=run2.classifier_overrides(), denoiser=run2.denoiser)
    tasks.train_classifier_round(build_model("classifier", "tiny", seed=0)[0], _tiny_site(), job2, None)
    assert json.loads((tmp_path / "site_1" / "classifier_train_config.json").read_text())["train"]["purifier_t"] == 90
    bare = tasks.LocalJob("tiny", 1, seed=3, classifier_overrides=run.classifier_overrides())
    with pytest.raises(ValueError, match="adv_through_purifier is set but the job has no denoiser"):
        tasks.train_classifier_round(build_model("classifier", "tiny", seed=0)[0], _tiny_site(), bare, None)


def test_bundle_build_crafts_through_the_purifier_federations_student(tmp_path: Path) -> None:
    cfg, pur, cls, steps, base = _dry_run_build(tmp_path, "--adv", "pgd", "--adv-eps", "8", "--adv-through-purifier")
    work = tmp_path / "work"
    assert cfg.adv_through_purifier and cls.adv_through_purifier and not pur.adv_through_purifier
    assert cls.denoiser == str(work / "fed_purifier" / "student.safetensors") and cls.smoothing_sigmas == ()
    assert steps["fed_cls_mae"].after == ("data", "fed_purifier")
    assert steps["fed_cls_mae"].inputs["adv_through_purifier"] is True
    assert steps["fed_purifier"].inputs == base["fed_purifier"].inputs
    # at the defaults nothing changes: no denoiser, no purifier dependency, no new inputs
    plain = _steps(BundleBuildConfig(), work)["fed_cls_mae"]
    assert plain.after == ("data",) and "adv_through_purifier" not in plain.inputs
    assert fed_configs(BundleBuildConfig(), BuildPaths(work))[1].denoiser == ""
    with pytest.raises(ValueError, match="without adv_through_purifier does nothing"):
        BundleBuildConfig(purifier_t=90)
