"""Denoised-smoothing fine-tuning through the federation and the bundle build.

``fed sim`` / ``fed deploy`` take ``--smoothing-sigmas``, ``--smoothing-frac`` and ``--denoiser``; they
become ``FedConfig`` fields, reach each site's ``ClassifierTrainConfig`` through ``LocalJob`` (the
denoiser as a path, loaded once per client process), and at their defaults change nothing. ``bundle
build`` takes the sigmas and fraction and denoises with the purifier federation's student; without
them its step keys are those of the code before these options existed (a resumed build reruns
nothing).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from fed_helpers import flower_message, tiny_fed_data
from flwr.app import Context, RecordDict
from medfedpure.build.config import BundleBuildConfig
from medfedpure.build.pipeline import BuildPaths, fed_configs, make_steps, purifier_denoiser
from medfedpure.build.steps import plan_steps, step_keys
from medfedpure.cli import app
from medfedpure.fed import client_app, params, tasks
from medfedpure.fed.config import SMOOTHING_DEFAULTS, SMOOTHING_FIELDS, FedConfig, smoothing_overrides
from medfedpure.fed.phases import build_model
from medfedpure.fed.sim import prepare_run_folder
from medfedpure.models.unet import UNet, UNetConfig
from medfedpure.models.weights import save_model
from medfedpure.train import denoiser as denoiser_mod
from medfedpure.train.classifier import ClassifierTrainConfig
from test_fed_adv import _fed, captured  # noqa: F401  (the fixture that replaces both federated runners)
from typer.testing import CliRunner

EPS8 = 8 / 255
NEW_FIELDS = {"smoothing_sigmas", "smoothing_frac", "denoiser"}


def _flat(output: str) -> str:
    return " ".join(output.replace("│", " ").split())


@pytest.fixture(scope="module")
def student_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder holding a tiny (32 px, untrained) diffusion student, as ``train distill`` writes it."""
    run = tmp_path_factory.mktemp("smoothing_student")
    ucfg = UNetConfig.preset("tiny")
    torch.manual_seed(0)
    save_model(run / "student.safetensors", UNet(ucfg), ucfg, "unet",
               extra={"role": "student", "steps": 1, "t_min": 60, "t_max": 200})
    return run


@pytest.fixture(autouse=True)
def _fresh_denoiser_cache() -> None:
    denoiser_mod.load_denoiser_cached.cache_clear()


# --- options → FedConfig → RUN/config.json --------------------------------------------------------


def test_sim_and_deploy_pass_the_smoothing_options(tmp_path: Path, captured: dict[str, FedConfig],  # noqa: F811
                                                   student_run: Path) -> None:
    args = _fed(tmp_path, "--smoothing-sigmas", "0.12, 0.25,0.5", "--smoothing-frac", "0.4",
                "--denoiser", str(student_run))
    for cmd in ("sim", "deploy"):
        r = CliRunner().invoke(app, ["fed", cmd, *args])
        assert r.exit_code == 0, r.output
    cfg = captured["sim"]
    assert captured["deploy"] == cfg
    assert (cfg.smoothing_sigmas, cfg.smoothing_frac, cfg.denoiser) == ((0.12, 0.25, 0.5), 0.4, str(student_run))
    assert cfg.classifier_overrides() == {"smoothing_sigmas": (0.12, 0.25, 0.5), "smoothing_frac": 0.4}
    # The Flower run config carries them to every site (sigmas as one comma-separated string).
    rc = cfg.to_run_config()
    assert rc["smoothing-sigmas"] == "0.12,0.25,0.5" and rc["denoiser"] == str(student_run)
    assert FedConfig.from_run_config(rc) == cfg
    # RUN/config.json records them like the adversarial options, the denoiser as an absolute path.
    prepared = prepare_run_folder(cfg)
    doc = json.loads((Path(prepared.out_dir) / "config.json").read_text())["fed"]
    assert (doc["smoothing_sigmas"], doc["smoothing_frac"]) == ([0.12, 0.25, 0.5], 0.4)
    assert doc["denoiser"] == str(student_run.resolve())
    assert FedConfig.load(Path(prepared.out_dir) / "config.json") == prepared


def test_defaults_change_nothing(tmp_path: Path, captured: dict[str, FedConfig]) -> None:  # noqa: F811
    r = CliRunner().invoke(app, ["fed", "sim", *_fed(tmp_path)])
    assert r.exit_code == 0, r.output
    cfg = captured["sim"]
    assert (cfg.smoothing_sigmas, cfg.smoothing_frac, cfg.denoiser) == ((), 0.25, "")
    assert {n: getattr(cfg, n) for n in SMOOTHING_FIELDS} == SMOOTHING_DEFAULTS
    assert SMOOTHING_DEFAULTS["smoothing_frac"] == ClassifierTrainConfig().smoothing_frac
    assert cfg.classifier_overrides() == {}
    # config diff against a run folder written before these options: only the new fields, at defaults,
    # and the old file loads to the same config.
    old = {k: v for k, v in cfg.to_dict().items() if k not in NEW_FIELDS}
    (tmp_path / "old.json").write_text(json.dumps({"fed": old}))
    assert FedConfig.load(tmp_path / "old.json") == cfg
    assert {k: v for k, v in cfg.to_dict().items() if k in NEW_FIELDS} == {
        "smoothing_sigmas": [], "smoothing_frac": 0.25, "denoiser": ""}
    b = BundleBuildConfig()
    assert {n: getattr(b, n) for n in SMOOTHING_FIELDS} == SMOOTHING_DEFAULTS and b.classifier_overrides() == {}


@pytest.mark.parametrize("extra, match", [
    (("--smoothing-sigmas", "0.25"), "needs a denoiser: give --denoiser BUNDLE\\|RUN"),
    (("--smoothing-sigmas", "0,0.25", "DEN"), "each σ must be in \\(0, 1\\]"),
    (("--smoothing-sigmas", "1.5", "DEN"), "each σ must be in \\(0, 1\\]"),
    (("--smoothing-sigmas", "-0.1", "DEN"), "each σ must be in \\(0, 1\\]"),
    (("--smoothing-sigmas", "0.25,abc", "DEN"), "'abc' is not a number"),
    (("--smoothing-sigmas", "0.25", "--smoothing-frac", "0.75", "--adv", "pgd", "--adv-eps", "8", "DEN"),
     "adv_frac \\+ smoothing_frac = 1.25 > 1"),
    (("--smoothing-frac", "0.5", "DEN"), "without smoothing_sigmas does nothing"),
    (("--smoothing-frac", "0.5"), "without smoothing_sigmas does nothing"),
    (("DEN",), "without smoothing_sigmas or adv_through_purifier is never used"),
    (("--smoothing-sigmas", "0.25", "--smoothing-frac", "1.5", "DEN"), "--smoothing-frac"),
    (("--smoothing-sigmas", "0.25", "NOTUNET"), "not a diffusion unet"),
])
def test_bad_values_exit_2_before_launching(tmp_path: Path, captured: dict[str, FedConfig],  # noqa: F811
                                            student_run: Path, extra: tuple[str, ...], match: str) -> None:
    moe_file = tmp_path / "moe.safetensors"
    model, mcfg = build_model("classifier", "tiny", seed=0)
    save_model(moe_file, model, mcfg, "moe")
    swap = {"DEN": ("--denoiser", str(student_run)), "NOTUNET": ("--denoiser", str(moe_file))}
    args = [a for e in extra for a in swap.get(e, (e,))]
    for cmd in ("sim", "deploy"):
        r = CliRunner().invoke(app, ["fed", cmd, *_fed(tmp_path, *args)], terminal_width=400)
        assert r.exit_code == 2, r.output
        assert re.search(match, _flat(r.output)), r.output
    assert captured == {}  # nothing was launched


def test_config_rejects_bad_values_directly() -> None:
    with pytest.raises(ValueError, match="needs a denoiser"):
        FedConfig(data_dir="d", out_dir="o", smoothing_sigmas=(0.25,))
    with pytest.raises(ValueError, match="adv_frac \\+ smoothing_frac = 1.1"):
        # the small preset trains FGSM-RS on half of each batch: 0.5 + 0.6 > 1
        FedConfig(data_dir="d", out_dir="o", preset="small", smoothing_sigmas="0.25", smoothing_frac=0.6,
                  denoiser="x")
    with pytest.raises(ValueError, match="adv_frac \\+ smoothing_frac"):
        BundleBuildConfig(smoothing_sigmas=(0.25,), smoothing_frac=0.6)
    with pytest.raises(ValueError, match="unknown denoised-smoothing options \\['sigmas'\\]"):
        smoothing_overrides("tiny", sigmas=(0.1,))
    # TRADES has no adversarial fraction of the batch: any smoothing fraction goes with it
    ok = FedConfig(data_dir="d", out_dir="o", adv="trades", adv_eps=EPS8, smoothing_sigmas="0.25",
                   smoothing_frac=1.0, denoiser="x")
    assert ok.classifier_overrides()["smoothing_frac"] == 1.0


# --- a site's classifier round --------------------------------------------------------------------


def _tiny_site(n: int = 12) -> tasks.SiteData:
    g = np.random.default_rng(0)
    x = g.random((n, 1, 32, 32), dtype=np.float32)
    y = np.arange(n, dtype=np.int64) % 2
    return tasks.SiteData(x, y, x[:8], y[:8], x[:8], y[:8])


def _count_denoiser(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count loads of the site's denoiser and forward passes through it (x_t batches and scans)."""
    counts = {"loads": 0, "calls": 0, "scans": 0}
    real = denoiser_mod.load_denoiser

    def load(path):  # type: ignore[no-untyped-def]
        counts["loads"] += 1
        model, sched = real(path)

        def hook(module, args, out):  # type: ignore[no-untyped-def]
            counts["calls"] += 1
            counts["scans"] += int(args[0].shape[0])

        model.register_forward_hook(hook)
        return model, sched

    monkeypatch.setattr(denoiser_mod, "load_denoiser", load)
    return counts


def test_site_round_denoises_with_smoothing_and_not_without(tmp_path: Path, student_run: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    counts = _count_denoiser(monkeypatch)
    run = FedConfig(data_dir="d", out_dir="o", rounds=2, smoothing_sigmas="0.25", smoothing_frac=0.5,
                    denoiser=str(student_run))
    job = tasks.LocalJob("tiny", 1, seed=3, site_dir=tmp_path / "site_0", schedule=(0, 2),
                         classifier_overrides=run.classifier_overrides(), denoiser=run.denoiser)
    model, _ = build_model("classifier", "tiny", seed=0)
    metrics, _ = tasks.train_classifier_round(model, _tiny_site(), job, None)
    # tiny preset: batch 8 → 12 scans in batches of 8 and 4; half of each batch is denoised (4 + 2 scans)
    assert counts == {"loads": 1, "calls": 2, "scans": 6}
    assert np.isfinite(metrics["train_loss"])
    used = json.loads((tmp_path / "site_0" / "classifier_train_config.json").read_text())
    assert (used["train"]["smoothing_sigmas"], used["train"]["smoothing_frac"]) == ([0.25], 0.5)
    assert used["denoiser"] == str(student_run)
    # A second round in the same process reuses the loaded denoiser.
    tasks.train_classifier_round(model, _tiny_site(), job, None)
    assert counts["loads"] == 1 and counts["calls"] == 4
    # Without smoothing the denoiser is neither loaded nor called, even when the job names one.
    plain = tasks.LocalJob("tiny", 1, seed=3, site_dir=tmp_path / "site_1", schedule=(0, 2), denoiser=str(student_run))
    denoiser_mod.load_denoiser_cached.cache_clear()
    tasks.train_classifier_round(build_model("classifier", "tiny", seed=0)[0], _tiny_site(), plain, None)
    assert counts == {"loads": 1, "calls": 4, "scans": 12}
    used = json.loads((tmp_path / "site_1" / "classifier_train_config.json").read_text())
    assert used["train"]["smoothing_sigmas"] == [] and "denoiser" not in used
    # A job with sigmas but no denoiser names the fix.
    bare = tasks.LocalJob("tiny", 1, seed=3, classifier_overrides={"smoothing_sigmas": (0.25,)})
    with pytest.raises(ValueError, match="no denoiser: set the run's denoiser"):
        tasks.train_classifier_round(build_model("classifier", "tiny", seed=0)[0], _tiny_site(), bare, None)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_fed_data(tmp_path_factory, "fed_smoothing_data", sites=1)


def test_client_app_rounds_use_the_runs_denoiser(tiny_data: Path, tmp_path: Path, student_run: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the ClientApp's train handler: the run config's denoiser, loaded once for two rounds."""
    counts = _count_denoiser(monkeypatch)
    sent = params.get_travelling(build_model("classifier", "tiny", seed=0)[0], "moe")
    conf = {"phase": "classifier", "split": "moe", "run-token": "run-S"}
    rc = FedConfig(data_dir=str(tiny_data), out_dir=str(tmp_path), preset="tiny", rounds=2, seed=0, max_train=8,
                   num_sites=1, smoothing_sigmas="0.12,0.5", denoiser=str(student_run)).to_run_config()
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config=rc)
    for r in (1, 2):
        reply = client_app.train(flower_message({**conf, "server-round": r}, sent, monkeypatch), ctx)
        assert set(reply.content["arrays"]) == set(sent)  # only the travelling tensors go back
    # max-train 8, batch 8: one batch per round, a quarter of it (2 scans) denoised
    assert counts == {"loads": 1, "calls": 2, "scans": 4}
    used = json.loads((tmp_path / "site_0" / "classifier_train_config.json").read_text())
    assert used["train"]["smoothing_sigmas"] == [0.12, 0.5] and used["denoiser"] == str(student_run)


# --- bundle build ---------------------------------------------------------------------------------

#: Step keys of ``BundleBuildConfig()`` as computed by the build before the smoothing options existed
#: (``install`` is left out: its input is the install path, which depends on where the package lives).
LEGACY_DEFAULT_KEYS = {
    "data": "38bce61145570aad", "fed_purifier": "cc2b1b292bbfe809", "fed_cls_mae": "07b2a87abba907f8",
    "merge": "602650c79657ae64", "calibrate": "7a0897f484706592", "export": "d8664e5faaca0ebc",
    "verify": "49a2015ff796fabd", "size_check": "0febb64ee400e396",
}


def _steps(cfg: BundleBuildConfig, work: Path) -> dict:
    return {s.name: s for s in make_steps(cfg, BuildPaths(work), federate=lambda c, t: {})}


def test_build_step_keys_unchanged_without_smoothing(tmp_path: Path) -> None:
    steps = _steps(BundleBuildConfig(), tmp_path / "work")
    keys = step_keys(list(steps.values()))
    assert {k: v for k, v in keys.items() if k != "install"} == LEGACY_DEFAULT_KEYS
    cls = steps["fed_cls_mae"]
    assert cls.after == ("data",)
    assert dict(cls.inputs) == {"preset": "small", "seed": 0, "rounds": 30, "local_epochs": 2, "max_train": 0}
    # The key is the old rule's: its inputs and the data step only (the purifier does not enter it).
    import hashlib

    old = hashlib.sha256(json.dumps({"inputs": dict(cls.inputs), "after": {"data": keys["data"]}},
                                    sort_keys=True).encode()).hexdigest()[:16]
    assert keys["fed_cls_mae"] == old
    # A retrained purifier does not touch the classifier federation without smoothing.
    other = step_keys(list(_steps(BundleBuildConfig(purifier_rounds=3), tmp_path / "work").values()))
    assert other["fed_purifier"] != keys["fed_purifier"] and other["fed_cls_mae"] == keys["fed_cls_mae"]
    assert fed_configs(BundleBuildConfig(), BuildPaths(tmp_path / "work"))[1].denoiser == ""


def _record_of(steps: dict) -> dict:
    keys = step_keys(list(steps.values()))
    for s in steps.values():
        for p in s.outputs:
            Path(p).parent.mkdir(parents=True, exist_ok=True)
            Path(p).touch()
    return {"steps": {n: {"key": keys[n], "inputs": dict(s.inputs)} for n, s in steps.items()}}


def test_build_with_smoothing_depends_on_the_purifier(tmp_path: Path) -> None:
    work = tmp_path / "work"
    base = _steps(BundleBuildConfig(), work)
    record = _record_of(base)  # a finished default build
    # resuming it at the defaults reruns nothing that has outputs
    assert [d.name for d in plan_steps(list(base.values()), record) if d.run] == ["verify", "size_check", "install"]
    cfg = BundleBuildConfig(smoothing_sigmas="0.12,0.25,0.5", smoothing_frac=0.4)
    steps = _steps(cfg, work)
    cls = steps["fed_cls_mae"]
    assert cls.after == ("data", "fed_purifier")
    assert cls.inputs["smoothing_sigmas"] == [0.12, 0.25, 0.5] and cls.inputs["smoothing_frac"] == 0.4
    keys = step_keys(list(steps.values()))
    assert keys["fed_purifier"] == LEGACY_DEFAULT_KEYS["fed_purifier"]
    assert keys["fed_cls_mae"] != LEGACY_DEFAULT_KEYS["fed_cls_mae"]
    plan = {d.name: d for d in plan_steps(list(steps.values()), record)}
    assert not plan["data"].run and not plan["fed_purifier"].run
    assert plan["fed_cls_mae"].run and "smoothing_frac, smoothing_sigmas" in plan["fed_cls_mae"].reason
    # The classifier federation denoises with the purifier federation's student, the shipped weights.
    pur, fed_cls = fed_configs(cfg, BuildPaths(work))
    assert fed_cls.denoiser == str(work / "fed_purifier" / "student.safetensors") == str(purifier_denoiser(cfg, BuildPaths(work)))
    assert (fed_cls.smoothing_sigmas, fed_cls.smoothing_frac) == ((0.12, 0.25, 0.5), 0.4)
    assert pur.smoothing_sigmas == () and pur.denoiser == ""
    assert fed_configs(BundleBuildConfig(smoothing_sigmas=(0.25,), purifier_phases=("teacher",)),
                       BuildPaths(work))[1].denoiser == str(work / "fed_purifier" / "teacher.safetensors")
    # Once built with smoothing, a changed purifier reruns the classifier federation (and its key changes).
    record = _record_of(steps)
    assert not any(d.run for d in plan_steps(list(steps.values()), record) if d.name in ("fed_purifier", "fed_cls_mae"))
    retrained = _steps(BundleBuildConfig(smoothing_sigmas="0.12,0.25,0.5", smoothing_frac=0.4, purifier_rounds=3),
                       work)
    plan = {d.name: d for d in plan_steps(list(retrained.values()), record)}
    assert plan["fed_purifier"].run and plan["fed_cls_mae"].run
    assert plan["fed_cls_mae"].reason == "an earlier step's inputs changed"
    # ... and a purifier whose outputs went missing reruns it too.
    (work / "fed_purifier" / "student.safetensors").unlink()
    plan = {d.name: d for d in plan_steps(list(steps.values()), record)}
    assert plan["fed_purifier"].run and plan["fed_cls_mae"].reason == "reruns after fed_purifier"


def test_bundle_build_dry_run_passes_the_smoothing_options(tmp_path: Path) -> None:
    work = tmp_path / "work"
    r = CliRunner().invoke(app, ["bundle", "build", "--work", str(work), "--dest", str(tmp_path / "dest"), "--dry-run",
                                 "--smoothing-sigmas", "0.25,0.5"])
    assert r.exit_code == 0, r.output
    shown = json.loads((work / "config.json").read_text())
    assert (shown["smoothing_sigmas"], shown["smoothing_frac"]) == ([0.25, 0.5], 0.25)
    assert BundleBuildConfig.from_dict(shown).smoothing_sigmas == (0.25, 0.5)
    assert "fed_cls_mae: would run" in _flat(r.output)
    r = CliRunner().invoke(app, ["bundle", "build", "--work", str(work), "--dry-run", "--smoothing-sigmas", "0.25",
                                 "--smoothing-frac", "0.6"], terminal_width=400)
    assert r.exit_code == 2 and "adv_frac + smoothing_frac = 1.1 > 1" in _flat(r.output)
    r = CliRunner().invoke(app, ["bundle", "build", "--work", str(work), "--dry-run", "--smoothing-sigmas", "2"],
                           terminal_width=400)
    assert r.exit_code == 2 and "each σ must be in (0, 1]" in _flat(r.output)
