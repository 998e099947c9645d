"""``medfedpure bundle build``: synthetic data → two federations → one run folder → calibration →
export → verification → size check → install, as resumable steps (:mod:`medfedpure.build.steps`).

The work folder ``WORK`` (default ``runs/default_bundle``) holds::

    WORK/config.json            the resolved BundleBuildConfig
    WORK/bundle_metrics.json    per step: key, inputs, seconds, result; the bundle's bytes, gate,
                                verification report and whether the student is the teacher
    WORK/bundle_build.log       the log
    WORK/data/                  the synthetic data set (dataset.json, splits.json, site_k/)
    WORK/fed_purifier/          the purifier federation's run folder (teacher, student)
    WORK/fed_cls_mae/           the classifier + MAE federation's run folder
    WORK/fed_detector/          with ``detector_rounds``: the attack detector's federation (each site's folder
                                starts with its classifier from fed_cls_mae)
    WORK/run/                   the merged run folder (docs/interfaces.md "Run folder")
    WORK/bundle/                the exported, verified bundle before it is installed
    WORK/bundle_learned/        with ``detector_rounds``: the same bundle carrying the detector, its
                                ``learned`` gate calibrated on the site's validation scans (installed instead)

The purifier trains in a federation of its own (its own rounds and local epochs): it does not
depend on the classifier, so a re-tuned classifier federation reruns without retraining it. With
denoised-smoothing fine-tuning (``smoothing_sigmas``) the classifier federation depends on the
purifier: every site denoises with the purifier federation's student (:func:`purifier_denoiser`),
the weights the bundle ships, so that step comes after ``fed_purifier`` and reruns when it does;
without it the classifier federation's step is what it always was. The
merge writes the run folder's ``config.json`` in the shape ``fed sim`` writes (``{"fed":
FedConfig}``, plus ``"fed_purifier"``) so that export finds the data root in it, and records in
``metrics.json`` whether the distilled student is missing and the teacher samples in its place
(``student_is_teacher``).

Federated training runs through :func:`medfedpure.fed.sim.run_sim`, which starts Flower's
simulation in a child process and stops every process it started; everything else is a library
call in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfedpure.build.config import BundleBuildConfig
from medfedpure.build.steps import Step, StepsReport, read_record, run_steps

if TYPE_CHECKING:
    from medfedpure.fed.config import FedConfig

__all__ = ["BuildPaths", "BundleBuildError", "make_steps", "build_bundle", "detector_fed_config", "fed_configs",
           "install_default_bundle", "pin_default_bundle_id", "purifier_denoiser"]

Federate = Callable[["FedConfig", float], Mapping[str, Any]]


class BundleBuildError(RuntimeError):
    """A build step found a problem it cannot fix (the message names the fix)."""


@dataclass(frozen=True)
class BuildPaths:
    """Where each step writes, under the work folder ``work``."""

    work: Path

    @property
    def config(self) -> Path:
        return self.work / "config.json"

    @property
    def metrics(self) -> Path:
        return self.work / "bundle_metrics.json"

    @property
    def log(self) -> Path:
        return self.work / "bundle_build.log"

    @property
    def data(self) -> Path:
        return self.work / "data"

    @property
    def fed_purifier(self) -> Path:
        return self.work / "fed_purifier"

    @property
    def fed_cls_mae(self) -> Path:
        return self.work / "fed_cls_mae"

    @property
    def fed_detector(self) -> Path:
        return self.work / "fed_detector"

    @property
    def run(self) -> Path:
        return self.work / "run"

    @property
    def learned(self) -> Path:
        return self.work / "bundle_learned"

    @property
    def stage(self) -> Path:
        return self.work / "bundle"


def purifier_denoiser(cfg: BundleBuildConfig, paths: BuildPaths) -> Path:
    """The purifier federation's model that the bundle ships as its denoiser: the student, or the
    teacher when the build skips distillation (``_merge`` copies the same file into the run)."""
    name = "student" if "student" in cfg.purifier_phases else "teacher"
    return paths.fed_purifier / f"{name}.safetensors"


def detector_fed_config(cfg: BundleBuildConfig, paths: BuildPaths) -> FedConfig:
    """The attack detector's federation (phase ``detector`` only; its sites' classifiers come from fed_cls_mae)."""
    from medfedpure.fed.config import FedConfig

    return FedConfig(data_dir=str(paths.data), out_dir=str(paths.fed_detector), preset=cfg.preset,
                     num_sites=cfg.sites, seed=cfg.seed, calibrate=False, phases=("detector",),
                     rounds=cfg.detector_rounds, local_epochs=cfg.detector_local_epochs,
                     max_train=cfg.max_train, detector_harden_rounds=cfg.detector_harden_rounds,
                     detector_l2=cfg.detector_l2)


def fed_configs(cfg: BundleBuildConfig, paths: BuildPaths) -> tuple[FedConfig, FedConfig]:
    """``(purifier federation, classifier + MAE federation)`` configs of a build.

    With smoothing or training through the purifier (``cfg.uses_student``) the classifier federation's
    ``denoiser`` is :func:`purifier_denoiser` (a file the purifier federation writes before the classifier
    federation starts).
    """
    from medfedpure.fed.config import FedConfig

    common = dict(data_dir=str(paths.data), preset=cfg.preset, num_sites=cfg.sites, seed=cfg.seed,
                  calibrate=False)
    sched = cfg.schedule
    purifier = FedConfig(out_dir=str(paths.fed_purifier), phases=cfg.purifier_phases, rounds=cfg.purifier_rounds,
                         local_epochs=cfg.purifier_local_epochs, max_train=cfg.purifier_max_train,
                         student_steps=sched.steps, purify_t_min=sched.t_min, purify_t_max=sched.t_max,
                         denoise_t_max=cfg.denoise_t_max, **common)
    student = {"denoiser": str(purifier_denoiser(cfg, paths))} if cfg.uses_student else {}
    smoothing = {**cfg.smoothing_options(), **cfg.through_options(), **student}
    cls_mae = FedConfig(out_dir=str(paths.fed_cls_mae), phases=("classifier", "mae"), rounds=cfg.rounds,
                        mae_rounds=cfg.mae_rounds, local_epochs=cfg.local_epochs, max_train=cfg.max_train,
                        classifier_width=cfg.classifier_width, classifier_stem=cfg.classifier_stem, device=cfg.device, **cfg.adv_options(), **smoothing,
                        **common)
    return purifier, cls_mae


def _run_sim(fed_cfg: FedConfig, timeout_s: float) -> Mapping[str, Any]:
    from medfedpure.fed.sim import run_sim

    # A build resumes: an interrupted (or paused) federation continues from its last round checkpoint
    # when the config is the same; a changed config starts it afresh (fed.checkpoint).
    return run_sim(fed_cfg, timeout_s=timeout_s, resume=True)


def _bundle_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


# --- the steps --------------------------------------------------------------------------------


def _data(cfg: BundleBuildConfig, paths: BuildPaths) -> dict[str, Any]:
    from medfedpure.data import SynthConfig, generate_synthetic, make_splits

    meta = generate_synthetic(paths.data, SynthConfig(sites=cfg.sites, per_site=cfg.per_site, size=cfg.size,
                                                      seed=cfg.seed), overwrite=True)
    make_splits(paths.data, seed=cfg.seed)
    return {"fingerprint": meta.get("fingerprint")}


def _federate(fed_cfg: FedConfig, federate: Federate, timeout_s: float,
              deadline: float | None = None) -> dict[str, Any]:
    """Run one federation; with the build's ``deadline`` (``time.monotonic()``) it pauses at the first round
    boundary after it."""
    if deadline is not None:
        from medfedpure.fed.sim import FederationPaused

        left = deadline - time.monotonic()
        if left <= 0:
            raise FederationPaused(f"the build's time ran out before the federation in {fed_cfg.out_dir} started; "
                                   "run the same command again to continue")
        fed_cfg = replace(fed_cfg, pause_after_s=left)
    metrics = federate(fed_cfg, timeout_s)
    return {k: metrics[k] for k in ("sim_wall_s", "wall_s", "leftover_pids") if k in metrics}


def _federate_detector(cfg: BundleBuildConfig, paths: BuildPaths, federate: Federate,
                       deadline: float | None = None) -> dict[str, Any]:
    """Each site's folder of the detector federation gets its final classifier from the classifier federation
    (the detector of a site guards that classifier); then the federation."""
    for k in range(cfg.sites):
        src = paths.fed_cls_mae / f"site_{k}" / "classifier.safetensors"
        if not src.is_file():
            raise BundleBuildError(f"the classifier federation left no {src}: rerun the build")
        dst = paths.fed_detector / f"site_{k}"
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / "classifier.safetensors")
    return _federate(detector_fed_config(cfg, paths), federate, cfg.timeout_s, deadline)


def _calibration_scans(cfg: BundleBuildConfig, paths: BuildPaths, size: int) -> tuple[Any, str]:
    """The clean scans τ is set on (``cfg.calibrate_on``) [N,1,S,S] and what they are, in words."""
    import numpy as np

    from medfedpure.data import load_split

    sites = list(range(cfg.sites)) if cfg.calibrate_on == "pooled" else [cfg.site]
    x = np.concatenate([load_split(paths.data, k, "val", size)[0] for k in sites])
    where = f"site {cfg.site}" if len(sites) == 1 else f"sites {', '.join(map(str, sites))} pooled"
    return x, f"the {len(x)} clean validation scans of {where} (bundle build)"


def _learned_gate(cfg: BundleBuildConfig, paths: BuildPaths) -> dict[str, Any]:
    """The staged bundle with the federated detector attached and its ``learned`` gate calibrated on the clean
    validation scans of ``cfg.calibrate_on`` (the same call as ``medfedpure calibrate --bundle B --detector D --t-max T_MIN``) →
    ``WORK/bundle_learned`` (unsigned; signed on install). The purification range narrows to t_min: a flagged scan
    purified at up to t_max lost its class (site 2's worst rung 87.5 → 80.8 % at 4/255, benchmarks/RESULTS.md,
    "Gate and detector"), at t_min it keeps the classifier's answer."""
    import tempfile

    import torch

    from medfedpure.export.bundle_writer import write_recalibrated_bundle
    from medfedpure.export.learned_gate import calibrate_with_detector
    from medfedpure.runtime.defender import Defender

    torch.set_num_threads(cfg.threads)
    source = Defender.load(paths.stage, "onnxruntime", "auto", threads=cfg.threads, allow_unsigned=True)
    x_val, description = _calibration_scans(cfg, paths, source.image_size)
    with tempfile.TemporaryDirectory(prefix="medfedpure-build-detector-") as tmp:
        rc, target = calibrate_with_detector(
            source, paths.fed_detector / "detector.safetensors", x_val, tmp, backend="onnxruntime",
            threads=cfg.threads, min_scans=min(100, len(x_val)), t_max=source.bundle.spec.gate.t_min,
            target_ffr=cfg.calibration_target_ffr, confidence=cfg.calibration_confidence or None,
            description=description,
            detector_provenance={"federation": "fed_detector", "rounds": cfg.detector_rounds,
                                 "harden_rounds": cfg.detector_harden_rounds, "l2": cfg.detector_l2})
        vb = write_recalibrated_bundle(target, paths.learned, rc.gate, rc.provenance, signing_key=None,
                                       overwrite=True)
    g = rc.gate
    return {"bundle_id": vb.bundle_id, "stat": g.stat, "tau": g.tau, "tau_high": g.tau_high, "topk": g.topk,
            "t_min": g.t_min, "t_max": g.t_max, "val_false_flag_rate": rc.achieved_ffr, "num_val_scans": rc.n}


def _copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(".flwr", "*.tmp", "progress.json", "train_state"))


def _merge(cfg: BundleBuildConfig, paths: BuildPaths) -> dict[str, Any]:
    """One run folder from the two federations; ``config.json`` in the shape ``fed sim`` writes."""
    from medfedpure.fed.config import FedConfig

    pur, cls_mae, run = paths.fed_purifier, paths.fed_cls_mae, paths.run
    need = [pur / "teacher.safetensors", pur / "config.json", pur / "metrics.json",
            cls_mae / "mae.safetensors", cls_mae / "config.json", cls_mae / "metrics.json",
            cls_mae / f"site_{cfg.site}" / "classifier.safetensors"]
    missing = [str(p) for p in need if not p.is_file()]
    if missing:
        raise BundleBuildError(f"the federations left no {missing}: rerun the build (the fed steps rerun when "
                               "their outputs are missing)")
    if run.exists():
        shutil.rmtree(run)
    _copy_tree(cls_mae, run)
    shutil.copy2(pur / "teacher.safetensors", run / "teacher.safetensors")
    student = pur / "student.safetensors"
    student_is_teacher = not student.is_file()
    # Without a distilled student the federated teacher samples in the same K-step DDIM: an
    # x0-predictor is a valid few-step sampler, a less accurate one. Recorded in the run's metrics.
    shutil.copy2(pur / "teacher.safetensors" if student_is_teacher else student, run / "student.safetensors")
    for glob_dir in sorted(pur.glob("site_*/global")):
        dst = run / glob_dir.parent.name / "global"
        dst.mkdir(parents=True, exist_ok=True)
        for f in sorted(glob_dir.iterdir()):
            if f.is_file():
                shutil.copy2(f, dst / f.name)

    cls_cfg, pur_cfg = FedConfig.load(cls_mae / "config.json"), FedConfig.load(pur / "config.json")
    # The classifier + MAE federation's config, with the schedule the purifier federation recorded
    # in the student: the run folder's student is that federation's.
    merged = replace(cls_cfg, out_dir=str(run), student_steps=pur_cfg.student_steps,
                     purify_t_min=pur_cfg.purify_t_min, purify_t_max=pur_cfg.purify_t_max)
    merged.save(run / "config.json")
    doc = json.loads((run / "config.json").read_text())
    doc["fed_purifier"] = pur_cfg.to_dict()
    (run / "config.json").write_text(json.dumps(doc, indent=2, sort_keys=True, default=str))

    metrics = json.loads((cls_mae / "metrics.json").read_text())
    pur_metrics = json.loads((pur / "metrics.json").read_text())
    metrics.setdefault("phases", {}).update(pur_metrics.get("phases", {}))
    metrics["purifier_federation"] = {k: v for k, v in pur_metrics.items() if k != "phases"}
    metrics["student_is_teacher"] = student_is_teacher
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=float))
    return {"student_is_teacher": student_is_teacher}


def _calibrate(cfg: BundleBuildConfig, paths: BuildPaths) -> dict[str, Any]:
    import torch

    from medfedpure.models.weights import load_model
    from medfedpure.train.calibrate import CalibrationConfig, calibrate_gate, write_calibration

    torch.set_num_threads(cfg.threads)
    s = cfg.schedule
    ccfg = CalibrationConfig(t_min=s.t_min, t_max=s.t_max, steps=s.steps, schedule_from="options",
                             target_ffr=cfg.calibration_target_ffr, confidence=cfg.calibration_confidence or None)
    mae, mcfg, _ = load_model(paths.run / "mae.safetensors")
    x_val, description = _calibration_scans(cfg, paths, mcfg.image_size)
    calib = calibrate_gate(mae, x_val, ccfg, run=paths.run, source=description)
    write_calibration(paths.run / f"site_{cfg.site}" / "calibration.json", calib)
    record = {**calib, **calib.get("calibration", {})}  # the gate section's calibration record, flattened
    return {k: record[k] for k in ("stat", "tau", "tau_high", "t_min", "t_max", "steps", "val_false_flag_rate",
                                   "num_val_scans") if k in record}


def _export(cfg: BundleBuildConfig, paths: BuildPaths, log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from medfedpure.export.pipeline import export_run

    torch.set_num_threads(cfg.threads)
    # No data argument: export finds the data root in the run folder's config.json.
    vb, report = export_run(paths.run, cfg.site, paths.stage, overwrite=True, progress=lambda m: log(f"  · {m}"))
    return {"bundle_id": vb.bundle_id, "verification": report}


def _verify(root: Path, trusted_keys: Any = None) -> dict[str, Any]:
    """Every check of the runtime; an unsigned bundle passes here (it is signed on install, or later
    with ``medfedpure bundle sign``) and ``signer`` says whether a trusted key signed it."""
    from medfedpure.runtime.bundle import verify_bundle

    vb = verify_bundle(root, allow_unsigned=True, trusted_keys=trusted_keys)
    return {"bundle_id": vb.bundle_id, "signer": None if vb.signer is None else vb.signer.name}


def pin_default_bundle_id(bundle_id: str, module: Path | None = None) -> Path:
    """Rewrite ``DEFAULT_BUNDLE_ID`` in :mod:`medfedpure.runtime.default_id` (the id ``Defender.default()``
    pins) to ``bundle_id``; returns the module's path."""
    import re

    if len(bundle_id) != 64 or any(c not in "0123456789abcdef" for c in bundle_id):
        raise BundleBuildError(f"bundle id {bundle_id!r} is not 64 lower-case hex digits")
    if module is None:
        from medfedpure.runtime import default_id

        module = Path(default_id.__file__)
    text = module.read_text()
    new, n = re.subn(r'^DEFAULT_BUNDLE_ID = "[0-9a-f]*"$', f'DEFAULT_BUNDLE_ID = "{bundle_id}"', text, flags=re.M)
    if n != 1:
        raise BundleBuildError(f"{module} does not hold exactly one DEFAULT_BUNDLE_ID line; fix it by hand")
    module.write_text(new)
    return module


def _replace_bundle_dir(src: Path, dest: Path) -> None:
    """Put a copy of bundle folder ``src`` at ``dest``, replacing the bundle there (refused when ``dest`` is
    something else than a bundle folder or an empty one)."""
    if dest.exists():
        if not dest.is_dir() or (any(dest.iterdir()) and not (dest / "manifest.json").is_file()):
            raise BundleBuildError(f"{dest} exists and is not a bundle folder (no manifest.json): "
                                   "remove it or choose another destination")
        shutil.rmtree(dest)
    shutil.copytree(src, dest)


def install_default_bundle(src: str | Path, *, dest: str | Path | None = None,
                           module: Path | None = None) -> dict[str, Any]:
    """Make the bundle ``src`` the embedded default: verify it as ``Defender.default()`` will (every runtime check
    and a signature by a key it trusts: the shipped release key or one in ``MEDFEDPURE_TRUSTED_KEYS``), copy it
    over ``dest`` (default: the embedded default bundle's folder) and pin ``DEFAULT_BUNDLE_ID`` in ``module``
    (default: ``medfedpure.runtime.default_id``) to its id. ``src`` is not modified. Returns ``{"dest",
    "bundle_id", "signer", "replaced" (the id of the bundle replaced, or None), "pinned_in"}``."""
    import hashlib

    from medfedpure.runtime.bundle import SIGNATURE_NAME, BundleError, default_bundle_path, verify_bundle

    src = Path(src).resolve()
    dest = (default_bundle_path() if dest is None else Path(dest)).resolve()
    if src == dest or dest in src.parents or src in dest.parents:
        raise BundleBuildError(f"{src} and the default bundle's folder {dest} overlap: install from a copy "
                               "outside it")
    if not (src / SIGNATURE_NAME).is_file():
        raise BundleError(f"{src} is unsigned, and Defender.default() accepts only a bundle signed by a trusted key: "
                          f"sign it first (`medfedpure bundle sign {src} --key RELEASE_KEY.pem`)")
    vb = verify_bundle(src)  # no allow_unsigned: an untrusted or broken signature is refused here too
    old = dest / "manifest.json"
    replaced = hashlib.sha256(old.read_bytes()).hexdigest() if old.is_file() else None
    _replace_bundle_dir(src, dest)
    installed = verify_bundle(dest, expected_id=vb.bundle_id)
    return {"dest": str(dest), "bundle_id": installed.bundle_id, "signer": installed.signer.name,
            "replaced": replaced, "pinned_in": str(pin_default_bundle_id(installed.bundle_id, module))}


def _final(cfg: BundleBuildConfig, paths: BuildPaths) -> Path:
    """The staged bundle that is checked and installed: the one with the learned gate when the build trains a
    detector."""
    return paths.learned if cfg.detector_rounds else paths.stage


def _size_check(cfg: BundleBuildConfig, paths: BuildPaths) -> dict[str, Any]:
    nbytes = _bundle_bytes(_final(cfg, paths))
    if nbytes > cfg.max_bundle_bytes:
        raise BundleBuildError(f"the bundle is {nbytes} bytes, more than max_bundle_bytes={cfg.max_bundle_bytes}: "
                               "build with a smaller preset or raise --max-bytes")
    return {"bundle_bytes": nbytes}


def _install(cfg: BundleBuildConfig, paths: BuildPaths, signing_key: Any = None) -> dict[str, Any]:
    """Copy the staged bundle to ``dest``, sign it when a key is given, and — when ``dest`` is the
    embedded default bundle — pin ``Defender.default()`` to its id."""
    from medfedpure.runtime.bundle import default_bundle_path

    dest = cfg.dest_path.resolve()
    work = paths.work.resolve()
    if dest == work or dest in work.parents:
        raise BundleBuildError(f"dest {dest} contains the work folder {work}: choose another --dest")
    for staged in (paths.stage.resolve(), paths.learned.resolve()):
        if dest == staged or staged in dest.parents:
            raise BundleBuildError(f"dest {dest} is the build's staging folder: choose another --dest")
    _replace_bundle_dir(_final(cfg, paths), dest)
    trusted = None
    if signing_key is not None:
        from medfedpure.export.signing import load_private_key, sign_bundle
        from medfedpure.export.signing import trusted as trusted_key

        key = load_private_key(signing_key)
        sign_bundle(dest, key)
        trusted = [trusted_key(key)]
    out = {"dest": str(dest), **_verify(dest, trusted)}
    if dest == default_bundle_path().resolve():
        out["pinned_in"] = str(pin_default_bundle_id(out["bundle_id"]))
    return out


def make_steps(cfg: BundleBuildConfig, paths: BuildPaths, *, federate: Federate | None = None,
               log: Callable[[str], None] = print, signing_key: Any = None) -> list[Step]:
    """The build's steps, in order, each with its inputs (options), outputs and predecessors.

    With ``cfg.pause_after_s`` the federations pause (checkpointed) at the first round boundary that
    many seconds after the steps were made.
    """
    fed_run = federate or _run_sim
    deadline = time.monotonic() + cfg.pause_after_s if cfg.pause_after_s else None
    fed_pur, fed_cls = fed_configs(cfg, paths)
    sched = cfg.schedule.to_dict()
    data_in = {"sites": cfg.sites, "per_site": cfg.per_site, "size": cfg.size, "seed": cfg.seed}
    pur_in = {"preset": cfg.preset, "seed": cfg.seed, "purifier_rounds": cfg.purifier_rounds,
              "purifier_local_epochs": cfg.purifier_local_epochs, "purifier_max_train": cfg.purifier_max_train,
              "purifier_phases": list(cfg.purifier_phases), "schedule": sched,
              # recorded only when set, so a build at the default keeps its resumable purifier step
              **cfg.changed("denoise_t_max")}
    # Only the adversarial-training and smoothing options that differ from the preset's recipe are recorded
    # inputs, so a build at the defaults keeps the inputs (and the resumable steps) it had before they
    # existed. With smoothing or through-the-purifier training the classifier federation also comes after the
    # purifier federation (its denoiser): the purifier's key enters the classifier's, and a rerun purifier reruns it.
    over = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.classifier_overrides().items()}
    cls_in = {"preset": cfg.preset, "seed": cfg.seed, "rounds": cfg.rounds, "local_epochs": cfg.local_epochs,
              "max_train": cfg.max_train, **over,
              # recorded only when set, so a build at the preset's width and no stem keeps its resumable steps
              **cfg.changed("classifier_width", "classifier_stem", "mae_rounds")}
    cls_after = ("data", "fed_purifier") if cfg.uses_student else ("data",)
    # The calibration's inputs, recorded only when not the defaults, so a build calibrated as before (its site's
    # scans, 5 %, the plain rule) keeps its resumable steps.
    calib_in = cfg.changed("calibrate_on", "calibration_target_ffr", "calibration_confidence")
    pur_out = (paths.fed_purifier / "teacher.safetensors", paths.fed_purifier / "metrics.json")
    if "student" in cfg.purifier_phases:
        pur_out += (paths.fed_purifier / "student.safetensors",)
    site_dir = f"site_{cfg.site}"
    det_in = {"detector_rounds": cfg.detector_rounds, "detector_local_epochs": cfg.detector_local_epochs,
              "detector_harden_rounds": cfg.detector_harden_rounds, "detector_l2": cfg.detector_l2}
    detector_steps = [
        Step("fed_detector", lambda: _federate_detector(cfg, paths, fed_run, deadline), det_in,
             (paths.fed_detector / "detector.safetensors", paths.fed_detector / "metrics.json"), ("fed_cls_mae",)),
        Step("learned_gate", lambda: _learned_gate(cfg, paths), {"site": cfg.site, **calib_in},
             (paths.learned / "manifest.json",), ("export", "fed_detector")),
    ] if cfg.detector_rounds else []
    checked = ("learned_gate",) if cfg.detector_rounds else ("export",)
    return [
        Step("data", lambda: _data(cfg, paths), data_in,
             (paths.data / "dataset.json", paths.data / "splits.json")),
        Step("fed_purifier", lambda: _federate(fed_pur, fed_run, cfg.timeout_s, deadline), pur_in, pur_out,
             ("data",)),
        Step("fed_cls_mae", lambda: _federate(fed_cls, fed_run, cfg.timeout_s, deadline), cls_in,
             (paths.fed_cls_mae / "mae.safetensors", paths.fed_cls_mae / site_dir / "classifier.safetensors",
              paths.fed_cls_mae / "metrics.json"), cls_after),
        Step("merge", lambda: _merge(cfg, paths), {"site": cfg.site},
             (paths.run / "config.json", paths.run / "metrics.json", paths.run / "student.safetensors",
              paths.run / "mae.safetensors", paths.run / site_dir / "classifier.safetensors"),
             ("fed_purifier", "fed_cls_mae")),
        Step("calibrate", lambda: _calibrate(cfg, paths), {"site": cfg.site, "schedule": sched, **calib_in},
             (paths.run / site_dir / "calibration.json",), ("data", "merge")),
        Step("export", lambda: _export(cfg, paths, log), {"site": cfg.site}, (paths.stage / "manifest.json",),
             ("calibrate",)),
        *detector_steps,
        Step("verify", lambda: _verify(_final(cfg, paths)), {}, (), checked),
        Step("size_check", lambda: _size_check(cfg, paths), {"max_bundle_bytes": cfg.max_bundle_bytes}, (),
             checked),
        Step("install", lambda: _install(cfg, paths, signing_key), {"dest": str(cfg.dest_path)}, (), ("verify", "size_check")),
    ]


def _summary(cfg: BundleBuildConfig, rep: StepsReport) -> dict[str, Any]:
    """The bundle's headline numbers for ``bundle_metrics.json`` (the gate as calibrated)."""
    res = rep.results
    return {
        "training_mode": "fed",
        "student_is_teacher": (res.get("merge") or {}).get("student_is_teacher"),
        "bundle_bytes": (res.get("size_check") or {}).get("bundle_bytes"),
        "bundle_id": (res.get("verify") or {}).get("bundle_id"),
        "installed": (res.get("install") or {}).get("dest"),
        "gate": res.get("learned_gate") or res.get("calibrate"),
        "purifier_steps": cfg.schedule.steps,
        "verification": (res.get("export") or {}).get("verification"),
    }


def build_bundle(cfg: BundleBuildConfig, work: str | Path, *, dry_run: bool = False,
                 federate: Federate | None = None, log: Callable[[str], None] | None = None,
                 signing_key: Any = None) -> dict[str, Any]:
    """Build (or resume building) the bundle of ``cfg`` in the work folder ``work``.

    Writes ``WORK/config.json`` first (also with ``dry_run``, which writes nothing else and returns
    the plan). Returns the content of ``WORK/bundle_metrics.json`` (with ``dry_run``: the config
    and the plan). ``federate(fed_config, timeout_s) -> metrics`` replaces the federated simulation
    (tests); the default runs :func:`medfedpure.fed.sim.run_sim`. ``signing_key`` (an Ed25519 private
    key or its PEM file) signs the installed bundle; without it the exporter signs with
    ``MEDFEDPURE_SIGNING_KEY`` when set, else the bundle is installed unsigned (sign it with
    ``medfedpure bundle sign``). Installing into the embedded default bundle's folder also pins
    ``Defender.default()`` to the new id (:func:`pin_default_bundle_id`).

    Raises:
        BundleBuildError, FederationError, ExportVerificationError, BundleError: the failing step's
        error; the steps done so far are recorded and are not rerun by the next build.
    """
    paths = BuildPaths(Path(work).resolve())
    paths.work.mkdir(parents=True, exist_ok=True)
    say = log or print
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    paths.config.write_text(json.dumps({**cfg.to_dict(), "dest": str(cfg.dest_path)}, indent=2, sort_keys=True))
    steps = make_steps(cfg, paths, federate=federate, log=say, signing_key=signing_key)
    rep = run_steps(steps, paths.metrics, dry_run=dry_run, log=say)
    if dry_run:
        return {"config": cfg.to_dict(), "plan": [{"step": d.name, "run": d.run, "reason": d.reason}
                                                  for d in rep.decisions]}
    record = read_record(paths.metrics)
    record.update(config=cfg.to_dict(), **_summary(cfg, rep))
    tmp = paths.metrics.with_name(paths.metrics.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=float))
    tmp.replace(paths.metrics)
    return record
