"""``medfedpure train …``: one command per model. Argument handling only; the loops live beside.

Every command takes ``--data DIR --site K --out RUN --config tiny|small`` plus ``--seed``,
``--epochs``, ``--resume``, ``--threads`` and ``--dry-run`` (print the resolved options and exit).
It writes the resolved options into ``RUN/config.json`` and the results into ``RUN/metrics.json``
(one section per job, merged into what other jobs wrote), the model checkpoint, and per-epoch
resumption state under ``RUN/train_state/``.

To add a model: write ``train/<model>.py`` with a loop and a config preset, then a command here
that calls ``_common_setup`` / ``_finish`` like ``classifier`` and ``mae`` do.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
import typer

from medfedpure.cli.common import DEVICE_CHOICE, POLICY_CHOICE, PRESET_CHOICE, STAT_CHOICE, resolved_device

app = typer.Typer(help="Train one model on one site's data.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)

CONFIGS = ("tiny", "small")
ADV_CHOICES = ("pgd", "trades", "nfgsm", "fgsm-rs", "none")
# Image side of each preset: tiny runs on 32 px scans (tests), small on 128 px (the default bundle).
IMAGE_SIZE = {"tiny": 32, "small": 128}

DATA = typer.Option(..., "--data", help="Data root (site_k/yes|no + splits.json).", exists=True, file_okay=False)
SITE = typer.Option(0, "--site", min=0, help="Site index k.")
OUT = typer.Option(..., "--out", help="Run folder (created).")
CONFIG = typer.Option("small", "--config", help="Preset: tiny (tests) or small (default bundle).",
                      click_type=PRESET_CHOICE)
SEED = typer.Option(0, "--seed", help="Seeds initialisation and every generator of the job.")
EPOCHS = typer.Option(None, "--epochs", min=1, help="Override the preset's maximum epochs.")
RESUME = typer.Option(False, "--resume", help="Continue from RUN/train_state/ (pass the same options: the LR schedule depends on --epochs).")
THREADS = typer.Option(1, "--threads", min=1, help="torch CPU threads.")
# The schedule's defaults live in one place, medfedpure.models.diffusion.PURIFY_DEFAULTS; the options
# default to None and are resolved inside the commands, so that importing the CLI does not import torch.
DEFAULTS_NOTE = "medfedpure.models.diffusion.PURIFY_DEFAULTS.{}"
SCHEDULE_HELP = ("Purification schedule: given, --t-min/--t-max/--steps replace the student checkpoint's "
                 "(any not given takes its default). Default: the checkpoint's, else " + DEFAULTS_NOTE + ".")
T_MIN = typer.Option(None, "--t-min", min=0, help="t* of a scan scoring at tau (DDPM step of T = 1000), recorded "
                     "in the student for the gate's calibration. Default: " + DEFAULTS_NOTE.format("t_min") + ".")
T_MAX = typer.Option(None, "--t-max", min=0, help="t* at tau_high and above (DDPM step of T = 1000), recorded "
                     "in the student. Default: " + DEFAULTS_NOTE.format("t_max") + ".")
STEPS = typer.Option(None, "--steps", min=1, help="K: the student's sampling steps (1, 2 or 4). Default: "
                     + DEFAULTS_NOTE.format("steps") + ".")
DRY = typer.Option(False, "--dry-run", help="Print the resolved options and exit.")
PROGRESS = typer.Option(True, "--progress/--no-progress", help="Show progress bars.")


def load_site_split(data: Path, site: int, split: str, size: int):
    """``(x [N,1,S,S] float32, y [N] int64)`` of one split of one site (``medfedpure.data.load_split``)."""
    from medfedpure.data import load_split

    return load_split(data, site, split, size)


def update_json(path: Path, section: str, value: Any) -> None:
    """Merge ``{section: value}`` into the JSON object at ``path`` (created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cur = json.loads(path.read_text()) if path.is_file() else {}
    cur[section] = value
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(cur, indent=2, sort_keys=True))
    tmp.replace(path)


def _common_setup(config: str, threads: int, seed: int) -> None:
    import torch

    if config not in CONFIGS:
        raise typer.BadParameter(f"--config {config!r}: use one of {CONFIGS}")
    torch.set_num_threads(threads)
    # Parameter initialisation of torch modules draws from the global generator: seed it once here.
    torch.manual_seed(seed)


def _finish(out: Path, section: str, resolved: dict, metrics: dict) -> None:
    update_json(out / "config.json", section, resolved)
    update_json(out / "metrics.json", section, metrics)
    typer.echo(json.dumps({section: {k: v for k, v in metrics.items() if k != "history"}}, indent=1))


@app.command()
def classifier(data: Path = DATA, site: int = SITE, out: Path = OUT, config: str = CONFIG, seed: int = SEED,
               epochs: int | None = EPOCHS, resume: bool = RESUME, threads: int = THREADS, dry_run: bool = DRY,
               progress: bool = PROGRESS,
               width: int = typer.Option(1, "--width", min=1, help="Multiply the preset's channel counts (2: about "
                                         "4x the parameters and the training time)."),
               stem: int = typer.Option(0, "--stem", min=0, help="Full-resolution conv layers before each "
                                        "expert's stages (0: none; each about 2x the training time at 128 px "
                                        "on CPU)."),
               adv_eps: float | None = typer.Option(
                   None, "--adv-eps", min=0.0, max=25.5,
                   help="Adversarial-training radius in 1/255 units (0 disables; default: the preset's)."),
               adv_start_epoch: int | None = typer.Option(
                   None, "--adv-start-epoch", min=0, help="First epoch with adversarial batches (default: the preset's)."),
               adv: str | None = typer.Option(
                   None, "--adv", help="Adversarial training: pgd, trades, nfgsm (single-step N-FGSM), fgsm-rs or none "
                   "(default: the preset's, fgsm-rs). Given (other than none), robust validation is on and selects the kept epoch.",
                   click_type=click.Choice(ADV_CHOICES)),
               adv_steps: int | None = typer.Option(None, "--adv-steps", min=1,
                                                    help="PGD / TRADES attack steps (default 7)."),
               adv_norm: str | None = typer.Option(
                   None, "--adv-norm", help="linf (default) or l2. With l2, --adv-eps is the l2 radius in scan "
                   "units ([0, 1] pixels, whole scan), e.g. 0.5.", click_type=click.Choice(("linf", "l2"))),
               adv_frac: float | None = typer.Option(
                   None, "--adv-frac", min=0.0, max=1.0, help="Fraction of each batch made adversarial (pgd, "
                   "nfgsm, fgsm-rs; default 0.5)."),
               trades_beta: float | None = typer.Option(None, "--trades-beta", min=0.0,
                                                        help="TRADES KL weight beta (default 6)."),
               robust_val: int | None = typer.Option(
                   None, "--robust-val", min=0, help="Validation scans attacked each epoch (PGD at the training "
                   "eps and norm; default 128 with --adv, else 0 = off)."),
               select: str | None = typer.Option(
                   None, "--select", help="Kept epoch: clean (validation accuracy) or robust (robust validation "
                   "accuracy; the default with --adv).", click_type=click.Choice(("clean", "robust"))),
               smoothing_sigmas: str | None = typer.Option(
                   None, "--smoothing-sigmas", help="Denoised-smoothing fine-tuning: comma-separated sigmas in "
                   "scan units, e.g. 0.12,0.25,0.5 (needs --denoiser)."),
               smoothing_frac: float | None = typer.Option(
                   None, "--smoothing-frac", min=0.0, max=1.0, help="Fraction of each batch noised and "
                   "denoised (default 0.25)."),
               denoiser: Path | None = typer.Option(
                   None, "--denoiser", exists=True, help="The frozen denoiser of --smoothing-sigmas and "
                   "--adv-through-purifier: a bundle folder (its torch/denoiser.safetensors, verified), a run "
                   "folder (student.safetensors) or a .safetensors file."),
               adv_through_purifier: bool = typer.Option(
                   False, "--adv-through-purifier", help="With --adv pgd: craft the attack through purification "
                   "at --purifier-t by the --denoiser (EOT over its noise) and train on the purified scans."),
               purifier_t: float | None = typer.Option(
                   None, "--purifier-t", min=1.0, help="t* of --adv-through-purifier (default: the bundle's gate "
                   "t_min, else the student's, else 60)."),
               purifier_eot: int | None = typer.Option(None, "--purifier-eot", min=1,
                                                       help="Purifier-noise draws per attack gradient (default 2)."),
               device: str = typer.Option(
                   "cpu", "--device", help="Where the training runs: cpu, cuda or auto (CUDA when torch sees a "
                   "GPU). The random draws are the CPU run's on every device; the result is saved for the CPU.",
                   click_type=DEVICE_CHOICE),
               ) -> None:
    """Train the personalized MoE classifier on site K → RUN/site_K/classifier.safetensors."""
    on = resolved_device(device)  # a missing GPU is an error before any data is read
    _common_setup(config, threads, seed)
    from medfedpure.models.moe import MoEClassifier, MoEConfig
    from medfedpure.models.weights import save_model
    from medfedpure.train.classifier import ClassifierTrainConfig, evaluate_classifier, train_classifier

    mcfg = MoEConfig.preset(config, width=width, stem=stem)
    adv_given = adv is not None and adv != "none"
    try:
        sigmas = None
        if smoothing_sigmas is not None:
            sigmas = tuple(float(v) for v in smoothing_sigmas.split(",") if v.strip())
        eps = None if adv_eps is None else (adv_eps if adv_norm == "l2" else adv_eps / 255)
        tcfg = ClassifierTrainConfig.preset(
            config, seed=seed, epochs=epochs, adv_eps=eps, adv_start_epoch=adv_start_epoch, adv=adv,
            adv_steps=adv_steps, adv_norm=adv_norm, adv_frac=adv_frac, trades_beta=trades_beta,
            robust_val=robust_val if robust_val is not None else (128 if adv_given else None),
            select=select if select is not None else ("robust" if adv_given else None),
            smoothing_sigmas=sigmas, smoothing_frac=smoothing_frac, adv_through_purifier=adv_through_purifier,
            purifier_eot=purifier_eot, purifier_t=purifier_t)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    needs_denoiser = bool(tcfg.smoothing_sigmas) or tcfg.adv_through_purifier
    if needs_denoiser and denoiser is None:
        raise typer.BadParameter("--smoothing-sigmas and --adv-through-purifier need --denoiser BUNDLE_OR_RUN "
                                 "(the diffusion student)")
    den = None
    if needs_denoiser and denoiser is not None:
        den, schedule = _load_denoiser(denoiser)
        if tcfg.adv_through_purifier:
            from dataclasses import replace

            from medfedpure.train.denoiser import purification_point

            t_star, k = purification_point(schedule, purifier_t)
            tcfg = replace(tcfg, purifier_t=t_star, purifier_steps=k)
    section = f"classifier/site_{site}"
    resolved = {"model": mcfg.to_dict(), "train": tcfg.to_dict(), "data": str(data), "site": site,
                "denoiser": None if denoiser is None else str(denoiser), "device": on}
    if dry_run:
        typer.echo(json.dumps(resolved, indent=1))
        return
    size = mcfg.image_size
    train, val, test = (load_site_split(data, site, s, size) for s in ("train", "val", "test"))
    model = MoEClassifier(mcfg)
    t0 = time.perf_counter()
    hist = train_classifier(model, train, val, tcfg, progress=progress, checkpoint_dir=out / "train_state" / f"site_{site}",
                            resume=resume, denoiser=den, device=on)
    wall = time.perf_counter() - t0
    test_m = evaluate_classifier(model, *test)
    save_model(out / f"site_{site}" / "classifier.safetensors", model, mcfg, "moe",
               extra={"site": site, "val": hist["val"], "test": test_m, "train_config": tcfg.to_dict()})
    _finish(out, section, resolved, {**hist, "test": test_m, "wall_s_this_invocation": wall,
                                     "threads": threads})


def _load_denoiser(path: Path) -> tuple[Any, dict[str, Any]]:
    """The diffusion student of a bundle (verified first), a run folder or a safetensors file, and its
    purification schedule as far as known (``medfedpure.train.denoiser.load_denoiser``)."""
    from medfedpure.train.denoiser import DenoiserLoadError, load_denoiser

    try:
        return load_denoiser(path)
    except DenoiserLoadError as exc:
        raise typer.BadParameter(f"--{exc}") from exc


@app.command()
def detector(
    data: Path = DATA,
    out: Path = OUT,
    sites: str = typer.Option("0", "--sites", help="Comma-separated site indices whose train scans are pooled "
                              "(e.g. 0,1,2,3); τ for the report on each site's val split."),
    classifier: Path | None = typer.Option(None, "--classifier", help="The classifier the detector guards: a "
                                           "bundle folder, a run folder or a classifier .safetensors (default: "
                                           "the embedded default bundle)."),
    config: str = CONFIG, seed: int = SEED, epochs: int | None = EPOCHS, threads: int = THREADS,
    per_site: int = typer.Option(400, "--per-site", min=0, help="Train scans per site (random; 0: all)."),
    train_eps: str = typer.Option("2,4,8", "--train-eps", help="PGD ℓ∞ radii (/255) cycled over the train scans."),
    train_l2: str = typer.Option("", "--train-l2", help="PGD ℓ2 radii (input units, e.g. 0.5) cycled with the ℓ∞ "
                                 "ones ('' : ℓ∞ only)."),
    harden: int = typer.Option(0, "--harden", min=0, help="Rounds of training against the detector's own "
                               "evasion (PGD that keeps the score under τ)."),
    harden_scans: int = typer.Option(400, "--harden-scans", min=0, help="Train scans the evasion runs on (0: all)."),
    harden_steps: int | None = typer.Option(None, "--harden-steps", min=1, help="Steps of each hardening round's "
                                            "evasion (default: the preset's, 20 for small; 20 left 95 % of the evasion "
                                            "flagged in the measurements, so more steps teach more)."),
    eval_eps: str = typer.Option("4,8", "--eval-eps", help="Radii (/255) of the report's AUROC on each site's test split."),
    eval_l2: str = typer.Option("0.5", "--eval-l2", help="ℓ2 radii of the report's AUROC ('' : none)."),
    dry_run: bool = DRY, progress: bool = PROGRESS,
) -> None:
    """Train the attack detector for a classifier on clean and PGD-attacked scans → RUN/detector.safetensors.

    The detector scores every gate patch (one logit per patch; the gate takes the mean of the top k);
    `medfedpure calibrate --detector` puts it in a bundle as the gate. The report (metrics.json) gives, per
    site, τ at a 5 % false-flag rate on the val split, the false-flag rate on the test split and the AUROC
    clean vs PGD-10 (ℓ∞ and ℓ2) against the classifier alone.
    """
    _common_setup(config, threads, seed)
    import numpy as np
    import torch

    from medfedpure.models.detector import AttackDetector, DetectorConfig
    from medfedpure.models.weights import save_model
    from medfedpure.runtime.bundle import default_bundle_path
    from medfedpure.train.detector import (
        ClassifierLoadError,
        DetectorTrainConfig,
        evaluate_detector,
        load_classifier,
        train_detector,
    )

    try:
        site_list = [int(v) for v in sites.split(",")]
        radii = tuple(float(v) / 255 for v in train_eps.split(","))
        radii_l2 = tuple(float(v) for v in train_l2.split(",") if v)
        report_radii = [float(v) / 255 for v in eval_eps.split(",") if v]
        report_l2 = [float(v) for v in eval_l2.split(",") if v]
    except ValueError as exc:
        raise typer.BadParameter(f"--sites / --train-eps / --train-l2 / --eval-eps / --eval-l2: comma-separated "
                                 f"numbers ({exc})") from exc
    mcfg = DetectorConfig.preset(config)
    try:
        tcfg = DetectorTrainConfig.preset(config, seed=seed, train_eps=radii, train_eps_l2=radii_l2,
                                          harden_rounds=harden,
                                          harden_scans=harden_scans, **({"epochs": epochs} if epochs else {}),
                                          **({"harden_steps": harden_steps} if harden_steps else {}))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    source = classifier or default_bundle_path()
    resolved = {"model": mcfg.to_dict(), "train": tcfg.to_dict(), "data": str(data), "sites": site_list,
                "per_site": per_site, "classifier": str(source)}
    if dry_run:
        typer.echo(json.dumps(resolved, indent=1))
        return
    try:
        clf = load_classifier(source)
    except ClassifierLoadError as exc:
        raise typer.BadParameter(str(exc)) from exc
    size = mcfg.image_size
    xs, ys, xcal = [], [], []
    for site in site_list:
        x, y = load_site_split(data, site, "train", size)
        if per_site:
            idx = np.sort(np.random.default_rng([seed, site]).permutation(len(x))[:per_site])
            x, y = x[idx], y[idx]
        xs.append(torch.from_numpy(x))
        ys.append(torch.from_numpy(y))
        xcal.append(torch.from_numpy(load_site_split(data, site, "val", size)[0]))
    det = AttackDetector(mcfg)
    t0 = time.perf_counter()
    rep = train_detector(det, clf, torch.cat(xs), torch.cat(ys), torch.cat(xcal), tcfg, progress=progress)
    wall = time.perf_counter() - t0
    per_site_eval = {}
    for site, x_cal in zip(site_list, xcal, strict=True):
        xt, yt = load_site_split(data, site, "test", size)
        per_site_eval[f"site_{site}"] = evaluate_detector(det, clf, x_cal, torch.from_numpy(xt), torch.from_numpy(yt),
                                                          report_radii, seed=seed + 1, eps_l2=report_l2)
    save_model(out / "detector.safetensors", det, mcfg, "detector",
               extra={"sites": site_list, "classifier": str(source), "train_config": tcfg.to_dict(),
                      "report": per_site_eval})
    _finish(out, "detector", resolved, {**rep, "sites": per_site_eval, "wall_s_this_invocation": wall,
                                        "threads": threads})


@app.command()
def mae(data: Path = DATA, site: int = SITE, out: Path = OUT, config: str = CONFIG, seed: int = SEED,
        epochs: int | None = EPOCHS, resume: bool = RESUME, threads: int = THREADS, dry_run: bool = DRY,
        progress: bool = PROGRESS, norm_pix: bool = typer.Option(False, "--norm-pix/--pixels",
                                                                 help="Normalised-pixel targets.")) -> None:
    """Train the MAE detector on site K's scans (labels unused) → RUN/mae.safetensors."""
    _common_setup(config, threads, seed)
    from medfedpure.models.mae import MAEConfig, MaskedAutoencoder
    from medfedpure.models.weights import save_model
    from medfedpure.train.mae import MAETrainConfig, evaluate_mae, train_mae

    base = MAEConfig.preset(config)
    mcfg = MAEConfig(**{**base.to_dict(), "norm_pix": norm_pix})
    tcfg = MAETrainConfig.preset(config, seed=seed, epochs=epochs)
    resolved = {"model": mcfg.to_dict(), "train": tcfg.to_dict(), "data": str(data), "site": site}
    if dry_run:
        typer.echo(json.dumps(resolved, indent=1))
        return
    size = mcfg.image_size
    (xt, _), (xv, _), (xs, _) = (load_site_split(data, site, s, size) for s in ("train", "val", "test"))
    model = MaskedAutoencoder(mcfg)
    t0 = time.perf_counter()
    hist = train_mae(model, xt, xv, tcfg, progress=progress, checkpoint_dir=out / "train_state", resume=resume)
    wall = time.perf_counter() - t0
    test_m = evaluate_mae(model, xs)
    save_model(out / "mae.safetensors", model, mcfg, "mae",
               extra={"site": site, "val": hist["val"], "test": test_m, "train_config": tcfg.to_dict()})
    _finish(out, "mae", resolved, {**hist, "test": test_m, "wall_s_this_invocation": wall, "threads": threads})


def calibrate_command(
    data: Path | None = typer.Option(None, "--data", help="Training-side form: data root (site_k/yes|no + "
                                     "splits.json).", exists=True, file_okay=False),
    site: int = SITE,
    run: Path | None = typer.Option(None, "--run", help="Training-side form: run folder holding mae.safetensors.",
                                    exists=True, file_okay=False),
    bundle: Path | None = typer.Option(None, "--bundle", help="Bundle form: recalibrate this bundle's gate on "
                                       "--scans and write a new bundle to --out (no torch needed).",
                                       exists=True, file_okay=False),
    scans: Path | None = typer.Option(None, "--scans", help="Bundle form: folder of the site's clean, unlabelled "
                                      "scans (any file load_scan reads; searched recursively).",
                                      exists=True, file_okay=False),
    out: Path | None = typer.Option(None, "--out", help="Bundle form: the new bundle's folder (created)."),
    min_scans: int = typer.Option(100, "--min-scans", min=1, help="Bundle form: refuse fewer usable scans."),
    key: Path | None = typer.Option(None, "--key", dir_okay=False, help="Bundle form: Ed25519 private key (PEM) "
                                    "that signs the new bundle (default: MEDFEDPURE_SIGNING_KEY, else unsigned)."),
    trusted_key: list[Path] | None = typer.Option(None, "--trusted-key", dir_okay=False, help="Bundle form: also "
                                                  "trust this public key (PEM) for the source bundle; repeatable."),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help="Bundle form: accept an unsigned source "
                                        "bundle."),
    backend: str = typer.Option("auto", "--backend", help="Bundle form: auto, onnxruntime, torch or tensorrt."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Bundle form: replace an existing bundle at --out."),
    description: str | None = typer.Option(None, "--description", help="Bundle form: what the calibration scans "
                                           "are (e.g. 'site A, 3T, Jan 2027'; no patient data), recorded in the "
                                           "provenance and the model card."),
    target_ffr: float = typer.Option(0.05, "--target-ffr", min=0.0, max=1.0, help="False-flag rate on clean val scans."),
    stat: str | None = typer.Option(None, "--stat", help="Gate statistic: hfratio, nyqratio, mean or topk (default "
                                    "hfratio; with --bundle: the bundle's).", click_type=STAT_CHOICE),
    topk: int | None = typer.Option(None, "--topk", min=0, help="k for --stat topk; m for hfratio / nyqratio (default "
                                    "0: half the patches; with --bundle: the bundle's)."),
    tau_high_k_given: float | None = typer.Option(None, "--tau-high-k", help="tau_high = tau + k * (tau - median) "
                                                  "(default 2; with --bundle: the bundle's recorded k)."),
    t_min: int | None = typer.Option(None, "--t-min", min=0, help=SCHEDULE_HELP.format("t_min")),
    t_max: int | None = typer.Option(None, "--t-max", min=0, help=SCHEDULE_HELP.format("t_max") + " With --bundle: "
                                     "narrow the purification range to t_min … T within the bundle's (T = t_min: "
                                     "every flagged scan purified at t_min)."),
    steps: int | None = typer.Option(None, "--steps", min=1, help=SCHEDULE_HELP.format("steps")),
    policy: str | None = typer.Option(None, "--policy", help="adaptive or floor (default adaptive; with --bundle: "
                                      "the bundle's).", click_type=POLICY_CHOICE),
    detector: Path | None = typer.Option(None, "--detector", dir_okay=False, exists=True, help="Bundle form: attach "
                                         "this attack detector (`medfedpure train detector` → detector.safetensors) "
                                         "and calibrate a 'learned' gate on it (--topk: its k, default the "
                                         "detector's)."),
    confidence: float | None = typer.Option(None, "--confidence", min=0.0, max=1.0, help="Bundle form: set τ so "
                                            "that the false-flag rate on the site's new clean scans is at most "
                                            "--target-ffr with this probability (e.g. 0.95); flags fewer "
                                            "calibration scans. Default: flag --target-ffr of them."),
    threads: int = THREADS,
) -> None:
    """Calibrate site K's gate on its clean validation scans → RUN/site_K/calibration.json; or, with
    --bundle, recalibrate a shipped bundle's gate on a site's own clean scans → a new bundle at --out."""
    if bundle is not None:
        if data is not None or run is not None:
            raise typer.BadParameter("--bundle recalibrates a bundle on --scans; --data/--run are the training-side "
                                     "form: give one form or the other")
        if scans is None or out is None:
            raise typer.BadParameter("--bundle needs --scans DIR (the site's clean scans) and --out DIR (the new "
                                     "bundle)")
        fixed = [f"--{n.replace('_', '-')}" for n, v in (("t_min", t_min), ("steps", steps)) if v is not None]
        if fixed:
            raise typer.BadParameter(f"{', '.join(fixed)}: --bundle recalibrates the gate of a built bundle, whose "
                                     "purification schedule belongs to its student denoiser (only --t-max may narrow "
                                     "its range); rebuild or re-export the bundle to change it")
        _recalibrate_bundle(bundle, scans, out, target_ffr=target_ffr, min_scans=min_scans, key=key,
                            trusted_keys=trusted_key, allow_unsigned=allow_unsigned, backend=backend,
                            threads=threads, overwrite=overwrite,
                            tau_high_k=tau_high_k_given, description=description, stat=stat, topk=topk,
                            policy=policy, detector=detector, t_max=t_max, confidence=confidence)
        return
    if detector is not None:
        raise typer.BadParameter("--detector attaches an attack detector to a bundle: use it with --bundle")
    if confidence is not None:
        raise typer.BadParameter("--confidence sets a shipped bundle's τ for a site's future scans: use it with "
                                 "--bundle")
    if data is None or run is None:
        raise typer.BadParameter("give --data DIR and --run RUN (training-side calibration), or --bundle B --scans "
                                 "DIR --out B2 (recalibrate a bundle)")
    import torch

    from medfedpure.models.weights import load_model
    from medfedpure.train.calibrate import CalibrationConfig, calibrate_gate, write_calibration

    torch.set_num_threads(threads)
    try:
        given = {k: v for k, v in (("t_min", t_min), ("t_max", t_max), ("steps", steps)) if v is not None}
        tau_high_k = 2.0 if tau_high_k_given is None else tau_high_k_given
        cfg = CalibrationConfig(target_ffr=target_ffr, stat=stat or "hfratio", topk=topk or 0,
                                tau_high_k=tau_high_k, policy=policy or "adaptive",
                                schedule_from="options" if given else "student", **given)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    mae_model, mcfg, _ = load_model(run / "mae.safetensors")
    xv, _ = load_site_split(data, site, "val", mcfg.image_size)
    calib = calibrate_gate(mae_model, xv, cfg, run=run)
    path = write_calibration(run / f"site_{site}" / "calibration.json", calib)
    typer.echo(f"{path}: tau={calib['tau']:.6g} tau_high={calib['tau_high']:.6g} stat={calib['stat']} "
               f"val_false_flag_rate={calib['calibration']['val_false_flag_rate']:.3f} "
               f"(n={calib['calibration']['num_val_scans']})")


def _recalibrate_bundle(bundle: Path, scans: Path, out: Path, *, target_ffr: float, min_scans: int,
                        key: Path | None, trusted_keys: list[Path] | None, allow_unsigned: bool, backend: str,
                        threads: int, overwrite: bool, tau_high_k: float | None,
                        description: str | None = None, stat: str | None = None, topk: int | None = None,
                        policy: str | None = None, detector: Path | None = None, t_max: int | None = None,
                        confidence: float | None = None) -> None:
    """The bundle form of ``calibrate``: score, set τ, report, write. Exit 2 on a refusal. With ``detector``:
    first a copy of the bundle carrying it (unsigned, in a temporary folder) whose gate is ``learned``, then
    the same recalibration on that copy; the provenance names the original bundle and its gate."""
    import tempfile

    from medfedpure.cli.runtime import _load
    from medfedpure.export.bundle_writer import write_recalibrated_bundle
    from medfedpure.export.learned_gate import calibrate_with_detector
    from medfedpure.runtime.bundle import BundleError
    from medfedpure.runtime.calibration import TooFewScansError, load_scan_folder, recalibrate

    d = _load(bundle, backend, "auto", threads, trusted_keys=trusted_keys, allow_unsigned=allow_unsigned)
    tmp = tempfile.TemporaryDirectory(prefix="medfedpure-detector-")
    try:
        folder = load_scan_folder(scans, d.image_size, limits=d.limits)
        source, target = d, d.bundle
        kw = dict(target_ffr=target_ffr, min_scans=min_scans, pixels_sha256=folder.pixels_sha256,
                  tau_high_k=tau_high_k, description=description, policy=policy, t_max=t_max,
                  confidence=confidence)
        if detector is not None:
            rc, target = calibrate_with_detector(d, detector, folder.x, tmp.name, topk=topk, backend=backend,
                                                 threads=threads, stat=stat, **kw)
        else:
            rc = recalibrate(d.bundle, d.engine, folder.x, stat=stat, topk=topk, **kw)
    except TooFewScansError as e:
        typer.echo(f"error: TooFewScansError: {e} ({len(folder.skipped)} files in {scans} were not usable scans)",
                   err=True)
        raise typer.Exit(2) from e
    except (ValueError, OSError) as e:
        typer.echo(f"error: {type(e).__name__}: {e}", err=True)
        raise typer.Exit(2) from e
    n, lo, hi = rc.n, *rc.ffr_ci
    attached = " with the attack detector attached" if detector is not None else ""
    typer.echo(f"scored {n} clean scans from {scans} ({len(folder.skipped)} files skipped) with bundle "
               f"{source.bundle.short_id}{attached} ({d.engine.name})")
    typer.echo(f"source gate: stat={rc.previous.stat} tau={rc.previous.tau:.6g} flags {rc.flagged_before}/{n} = "
               f"{rc.flagged_before / n:.3f}")
    typer.echo(f"recalibrated: stat={rc.gate.stat} tau={rc.gate.tau:.6g} tau_high={rc.gate.tau_high:.6g} policy="
               f"{rc.gate.policy} t*∈[{rc.gate.t_min}, {rc.gate.t_max}] (target false-flag rate {target_ffr:g})")
    typer.echo(f"achieved false-flag rate on the calibration scans: {rc.flagged}/{n} = {rc.achieved_ffr:.4f}, "
               f"95% CI [{lo:.4f}, {hi:.4f}] (Clopper-Pearson); expected on new clean scans like them: "
               f"{rc.provenance['expected_false_flag_rate']:.4f}")
    above = rc.provenance["probability_rate_above_target"]
    if confidence is not None:
        typer.echo(f"guarantee: the false-flag rate on new clean scans like these is at most {target_ffr:g} with "
                   f"probability {confidence:g} (it exceeds it with probability {above:.1%})")
    else:
        typer.echo(f"note: the false-flag rate on new clean scans like these exceeds {target_ffr:g} with probability "
                   f"{above:.1%}; --confidence C bounds that by 1 − C (it flags fewer of the site's scans)")
    if detector is not None and rc.gate.t_max > rc.gate.t_min:
        typer.echo(f"note: flagged scans will be purified at up to t*={rc.gate.t_max}; with a learned gate "
                   f"--t-max {rc.gate.t_min} kept the robust accuracy that t* up to 200 lost (benchmarks/RESULTS.md, "
                   "'Gate and detector')")
    try:
        vb = write_recalibrated_bundle(target, out, rc.gate, rc.provenance, signing_key=key, overwrite=overwrite)
    except (BundleError, ValueError, FileExistsError) as e:
        typer.echo(f"error: {type(e).__name__}: {e}", err=True)
        raise typer.Exit(2) from e
    finally:
        tmp.cleanup()
    typer.echo(f"wrote {vb.root} (bundle id {vb.bundle_id})")
    if vb.signer is None:
        typer.echo("UNSIGNED: the runtime refuses this bundle unless it is signed (`medfedpure bundle sign "
                   f"{vb.root} --key KEY`) by a trusted key, or loaded with allow_unsigned / --allow-unsigned")
    else:
        typer.echo(f"signed by key {vb.signer.key_id}")


def _teacher_t_hi(path: Path) -> float | None:
    """The top of the diffusion times a ``train purifier`` teacher trained on (its ``train_config.t_hi``),
    or None when there is no such file yet (a dry run) or its metadata does not say.

    Raises:
        typer.BadParameter: the file is not a saved model.
    """
    from medfedpure.models.weights import WeightsError, model_metadata

    if not path.is_file():
        return None
    try:
        meta = model_metadata(path)
    except (OSError, WeightsError) as exc:
        raise typer.BadParameter(f"--teacher: {path} is not a readable teacher checkpoint ({exc})") from exc
    train_config = meta.get("train_config")
    hi = train_config.get("t_hi") if isinstance(train_config, dict) else None
    return float(hi) if isinstance(hi, (int, float)) and not isinstance(hi, bool) else None


DENOISE_T_MAX = typer.Option(None, "--denoise-t-max", min=1, help="Train on diffusion times up to this (default: the "
                             "preset's 250); certifying at sigma 0.25 / 0.5 asks the denoiser for t 290 / 496.")


@app.command()
def purifier(data: Path = DATA, site: int = SITE, out: Path = OUT, config: str = CONFIG, seed: int = SEED,
             epochs: int | None = EPOCHS, denoise_t_max: int | None = DENOISE_T_MAX, resume: bool = RESUME,
             threads: int = THREADS, dry_run: bool = DRY, progress: bool = PROGRESS) -> None:
    """Train the diffusion teacher (x0-denoiser, many-step DDIM) on site K's scans → RUN/teacher.safetensors."""
    _common_setup(config, threads, seed)
    from medfedpure.models.unet import UNet, UNetConfig
    from medfedpure.models.weights import save_model
    from medfedpure.train.purifier import DenoiserTrainConfig, train_denoiser

    ucfg = UNetConfig.preset(config)
    try:
        tcfg = DenoiserTrainConfig.preset(config, seed=seed, epochs=epochs,
                                          **({"t_hi": float(denoise_t_max)} if denoise_t_max else {}))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    resolved = {"model": ucfg.to_dict(), "train": tcfg.to_dict(), "data": str(data), "site": site}
    if dry_run:
        typer.echo(json.dumps(resolved, indent=1))
        return
    (xt, _), (xv, _) = (load_site_split(data, site, s, ucfg.image_size) for s in ("train", "val"))
    model = UNet(ucfg)
    t0 = time.perf_counter()
    hist = train_denoiser(model, model.schedule, xt, xv, tcfg, progress=progress,
                          checkpoint_dir=out / "train_state", resume=resume, name="teacher")
    wall = time.perf_counter() - t0
    save_model(out / "teacher.safetensors", model, ucfg, "unet",
               extra={"role": "teacher", "site": site, "val": hist["val"], "train_config": tcfg.to_dict()})
    _finish(out, "purifier", resolved, {**hist, "wall_s_this_invocation": wall, "threads": threads})


@app.command()
def distill(data: Path = DATA, site: int = SITE, out: Path = OUT, config: str = CONFIG, seed: int = SEED,
            teacher: Path = typer.Option(..., "--teacher", help="Run folder holding teacher.safetensors.",
                                         exists=True, file_okay=False),
            steps: int | None = STEPS, t_min: int | None = T_MIN, t_max: int | None = T_MAX,
            epochs: int | None = EPOCHS, denoise_t_max: int | None = DENOISE_T_MAX, resume: bool = RESUME,
            threads: int = THREADS, dry_run: bool = DRY, progress: bool = PROGRESS) -> None:
    """Distil the teacher into a K-step student → RUN/student.safetensors (steps, t_min, t_max in metadata)."""
    _common_setup(config, threads, seed)
    from dataclasses import replace

    from medfedpure.models.diffusion import PURIFY_DEFAULTS
    from medfedpure.models.unet import UNet
    from medfedpure.models.weights import load_model, save_model
    from medfedpure.train.distill import DistillConfig, distill_student

    try:
        given = {k: v for k, v in (("t_min", t_min), ("t_max", t_max), ("steps", steps)) if v is not None}
        sched = replace(PURIFY_DEFAULTS, **given)
        dcfg = DistillConfig.preset(config, seed=seed, epochs=epochs, val_steps=sched.steps,
                                    **({"t_max": float(denoise_t_max)} if denoise_t_max else {}))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    t_min, t_max, steps = sched.t_min, sched.t_max, sched.steps
    if not 0 <= t_min <= t_max <= dcfg.t_max:
        raise typer.BadParameter(f"--t-min {t_min} --t-max {t_max}: need 0 <= t_min <= t_max <= {dcfg.t_max} "
                                 "(the distillation range)")
    teacher_hi = _teacher_t_hi(teacher / "teacher.safetensors")
    if teacher_hi is not None and dcfg.t_max > teacher_hi:
        raise typer.BadParameter(f"the distillation range reaches t {dcfg.t_max:g} but the teacher in {teacher} was "
                                 f"trained on t <= {teacher_hi:g}: the student would copy a teacher outside its "
                                 f"range; retrain the teacher with `train purifier --denoise-t-max {dcfg.t_max:g}` "
                                 f"or distil with --denoise-t-max <= {teacher_hi:g}")
    resolved = {"distill": dcfg.to_dict(), "teacher": str(teacher / "teacher.safetensors"), "data": str(data),
                "site": site, "steps": steps, "t_min": t_min, "t_max": t_max}
    if dry_run:
        typer.echo(json.dumps(resolved, indent=1))
        return
    teacher_model, ucfg, _ = load_model(teacher / "teacher.safetensors")
    (xt, _), (xv, _) = (load_site_split(data, site, s, ucfg.image_size) for s in ("train", "val"))
    student = UNet(ucfg)
    t0 = time.perf_counter()
    hist = distill_student(teacher_model, student, teacher_model.schedule, xt, xv, dcfg, progress=progress,
                           checkpoint_dir=out / "train_state", resume=resume, name="student")
    wall = time.perf_counter() - t0
    save_model(out / "student.safetensors", student, ucfg, "unet",
               extra={"role": "student", "site": site, "steps": steps, "t_min": t_min, "t_max": t_max,
                      "val": hist["val"], "distill_config": dcfg.to_dict()})
    _finish(out, "distill", resolved, {**hist, "wall_s_this_invocation": wall, "threads": threads})
