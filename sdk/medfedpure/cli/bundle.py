"""``medfedpure bundle build``: argument handling only (the pipeline is :mod:`medfedpure.build.pipeline`).

Option defaults are read from :class:`medfedpure.build.BundleBuildConfig`; the schedule options
(``--t-min/--t-max/--steps``) default to ``medfedpure.models.diffusion.PURIFY_DEFAULTS``.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, fields
from pathlib import Path

import typer
from rich.markup import escape

from medfedpure.build.config import BundleBuildConfig
from medfedpure.cli.common import DEVICE_CHOICE, PRESET_CHOICE, resolved_device
from medfedpure.cli.fed import ADV_OPTIONS, adv_fields
from medfedpure.cli.keys import sign_command

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)
app.command("sign")(sign_command)

_D = {f.name: f.default for f in fields(BundleBuildConfig) if f.default is not MISSING}
_SCHED = "Default: medfedpure.models.diffusion.PURIFY_DEFAULTS.{}."
_ADV = {p.name: p.default for p in ADV_OPTIONS}  # the classifier federation's adversarial-training options


# `bundle build` options whose config field has another name; t_min / t_max / steps are the schedule's, and
# work / dry_run / key / recorded are no build options
_FIELD_OF = {"timeout": "timeout_s", "pause_after": "pause_after_s", "max_bytes": "max_bundle_bytes",
             "target_ffr": "calibration_target_ffr"}
_NOT_FIELDS = {"work", "dry_run", "key", "recorded", "t_min", "t_max", "steps"}


def _with_recorded(ctx: typer.Context, cfg: BundleBuildConfig, work: Path) -> BundleBuildConfig:
    """``--recorded``: the recipe recorded in ``WORK/config.json``, with the options given on this command line."""
    from dataclasses import replace

    from click.core import ParameterSource

    path = work / "config.json"
    if not path.is_file():
        raise typer.BadParameter(f"--recorded: {path} does not exist; run the build once with its options")
    try:
        rec = BundleBuildConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise typer.BadParameter(f"--recorded: {path} is not a bundle build's config: {exc}") from exc
    given = {name for name in ctx.params
             if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    if "site" in given and "dest" not in given and cfg.site != rec.site:
        raise typer.BadParameter(f"--recorded --site {cfg.site}: the recorded build installs site {rec.site}'s "
                                 f"bundle in {rec.dest or 'the embedded default bundle'}; give --dest for site "
                                 f"{cfg.site}'s")
    over = {_FIELD_OF.get(n, n) for n in given - _NOT_FIELDS}
    schedule = replace(rec.schedule, **{n: getattr(cfg.schedule, n) for n in ("t_min", "t_max", "steps") if n in given})
    return replace(rec, schedule=schedule, **{f: getattr(cfg, f) for f in over})


@app.command("build")
def build(
    ctx: typer.Context,
    work: Path = typer.Option(Path("runs/default_bundle"), "--work", file_okay=False,
                              help="Work folder: data, run folders, staged bundle, config.json, bundle_metrics.json."),
    recorded: bool = typer.Option(False, "--recorded", help="Every option not given on this command line takes "
                                  "the value recorded in WORK/config.json by the build's last call: `--work W "
                                  "--recorded --site 0 --dest D` is the same build's bundle for site 0 (only the "
                                  "per-site steps run)."),
    dest: Path | None = typer.Option(None, "--dest", file_okay=False,
                                     help="Install the bundle here (default: the package's embedded default bundle)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and the steps that would run; "
                                 "write only WORK/config.json."),
    sites: int = typer.Option(_D["sites"], "--sites", min=1, max=64, help="Synthetic data: number of sites."),
    per_site: int = typer.Option(_D["per_site"], "--per-site", min=10, help="Synthetic data: scans per site."),
    size: int = typer.Option(_D["size"], "--size", min=32, max=1024, help="Synthetic data: image side in pixels."),
    site: int = typer.Option(_D["site"], "--site", min=0, help="The bundle's site (classifier and calibrated gate)."),
    preset: str = typer.Option(_D["preset"], "--preset", help="Model and training preset: tiny (tests) or small.",
                               click_type=PRESET_CHOICE),
    seed: int = typer.Option(_D["seed"], "--seed", min=0, help="Seed of the data and of both federations."),
    rounds: int = typer.Option(_D["rounds"], "--rounds", min=1, help="Classifier + MAE federation: rounds per phase."),
    local_epochs: int = typer.Option(_D["local_epochs"], "--local-epochs", min=1,
                                     help="Classifier + MAE federation: local epochs per round."),
    max_train: int = typer.Option(_D["max_train"], "--max-train", min=0,
                                  help="Classifier + MAE federation: training scans per site (0: all)."),
    mae_rounds: int = typer.Option(_D["mae_rounds"], "--mae-rounds", min=0,
                                   help="Classifier + MAE federation: the MAE's rounds (0: as many as --rounds)."),
    purifier_rounds: int = typer.Option(_D["purifier_rounds"], "--purifier-rounds", min=1,
                                        help="Purifier federation: rounds per phase."),
    purifier_local_epochs: int = typer.Option(_D["purifier_local_epochs"], "--purifier-local-epochs", min=1,
                                              help="Purifier federation: local epochs per round."),
    purifier_max_train: int = typer.Option(_D["purifier_max_train"], "--purifier-max-train", min=0,
                                           help="Purifier federation: training scans per site (0: all)."),
    purifier_phases: str = typer.Option(",".join(_D["purifier_phases"]), "--purifier-phases",
                                        help="teacher,student or teacher (the teacher then samples in K steps)."),
    t_min: int | None = typer.Option(None, "--t-min", min=0, help="t* at the threshold tau. " + _SCHED.format("t_min")),
    t_max: int | None = typer.Option(None, "--t-max", min=0, help="t* at tau_high. " + _SCHED.format("t_max")),
    steps: int | None = typer.Option(None, "--steps", min=1, help="K, the student's sampling steps (1, 2 or 4). "
                                     + _SCHED.format("steps")),
    threads: int = typer.Option(_D["threads"], "--threads", min=1, help="torch CPU threads of calibration and export."),
    device: str = typer.Option(_D["device"], "--device", click_type=DEVICE_CHOICE,
                               help="Where each site's classifier rounds train (cuda: the sites share one GPU); "
                                    "the other phases train on the CPU. Not a step input: a build resumes across "
                                    "devices."),
    timeout: float = typer.Option(_D["timeout_s"], "--timeout", min=1.0,
                                  help="Stop a federation (all its processes) after this many seconds."),
    pause_after: float = typer.Option(_D["pause_after_s"], "--pause-after", min=0.0,
                                      help="Pause at the first federated round boundary after this many seconds "
                                           "(0: never): checkpoint and exit with status 75; the same command "
                                           "continues. Not a step input."),
    max_bytes: int = typer.Option(_D["max_bundle_bytes"], "--max-bytes", min=1,
                                  help="Fail when the bundle is larger than this many bytes."),
    key: Path | None = typer.Option(None, "--key", dir_okay=False,
                                    help="Ed25519 private key (PEM) that signs the installed bundle (default: "
                                         "MEDFEDPURE_SIGNING_KEY, else installed unsigned)."),
    adv: str | None = _ADV["adv"],
    adv_eps: float | None = _ADV["adv_eps"],
    adv_steps: int | None = _ADV["adv_steps"],
    adv_norm: str | None = _ADV["adv_norm"],
    adv_start_epoch: int | None = _ADV["adv_start_epoch"],
    trades_beta: float | None = _ADV["trades_beta"],
    robust_val: int | None = _ADV["robust_val"],
    select: str | None = _ADV["select"],
    adv_through_purifier: bool = _ADV["adv_through_purifier"],
    purifier_t: float | None = _ADV["purifier_t"],
    purifier_eot: int | None = _ADV["purifier_eot"],
    smoothing_sigmas: str | None = typer.Option(
        None, "--smoothing-sigmas", help="Denoised-smoothing fine-tuning of each site's classifier through the "
        "purifier federation's student (the shipped denoiser): comma-separated sigmas in scan units, e.g. "
        "0.12,0.25,0.5 (default: off). The classifier federation then reruns whenever the purifier does."),
    smoothing_frac: float | None = typer.Option(
        None, "--smoothing-frac", min=0.0, max=1.0, help="Fraction of each batch noised and denoised (with "
        "--smoothing-sigmas; default " + str(_D["smoothing_frac"]) + ")."),
    denoise_t_max: int = typer.Option(_D["denoise_t_max"], "--denoise-t-max", min=0, help="Train the purifier's "
                                      "teacher and student on diffusion times up to this (0: 250, the presets'); "
                                      "certifying at sigma 0.25 / 0.5 asks the student for t 290 / 496."),
    classifier_width: int = typer.Option(_D["classifier_width"], "--classifier-width", min=1, help="Multiply the "
                                         "classifier's channel counts (1: the preset's; 2: about 4x the parameters "
                                         "and the classifier federation's time)."),
    classifier_stem: int = typer.Option(_D["classifier_stem"], "--classifier-stem", min=0, help="Full-"
                                        "resolution conv layers before each classifier expert's stages (0: "
                                        "none; each about 2x the classifier federation's time at 128 px on "
                                        "CPU)."),
    detector_rounds: int = typer.Option(_D["detector_rounds"], "--detector-rounds", min=0, help="Train the attack "
                                        "detector in a third federation of this many rounds (each site attacks its "
                                        "own classifier) and ship the 'learned' gate on it (0: no detector)."),
    detector_local_epochs: int = typer.Option(_D["detector_local_epochs"], "--detector-local-epochs", min=1,
                                              help="Detector federation: local epochs per round."),
    detector_harden_rounds: int = typer.Option(_D["detector_harden_rounds"], "--detector-harden-rounds", min=0,
                                               help="Detector federation: its last N rounds also train on each "
                                                    "site's evasion of the round's detector."),
    detector_l2: float = typer.Option(_D["detector_l2"], "--detector-l2", min=0.0, help="Detector federation: add "
                                      "PGD at this l2 radius (scan units, e.g. 0.5) to the training attacks."),
    calibrate_on: str = typer.Option(_D["calibrate_on"], "--calibrate-on", help="The clean scans the gate's tau "
                                     "is set on: 'pooled' (every site's validation scans: one tau for scanners "
                                     "nobody calibrated it for, until a site runs `calibrate --bundle`) or 'site' "
                                     "(the bundle's site's)."),
    target_ffr: float = typer.Option(_D["calibration_target_ffr"], "--target-ffr",
                                     help="The false-flag rate tau is set for on the calibration scans."),
    calibration_confidence: float = typer.Option(_D["calibration_confidence"], "--calibration-confidence",
                                                 help="0: tau flags the target share of the calibration scans; a "
                                                 "level C in (0, 1): tau bounds the false-flag rate on new clean "
                                                 "scans like them by the target with probability C (fewer flagged)."),
) -> None:
    """Build the bundle: data → federated purifier → federated classifier + MAE → merge → calibrate →
    export → (with --detector-rounds: federated attack detector → learned gate) → verify → size check → install. Resumable: a step whose outputs exist and whose recorded
    inputs match is skipped; a changed option reruns the steps it reaches."""
    from dataclasses import replace

    from medfedpure.build.pipeline import build_bundle
    from medfedpure.models.diffusion import PURIFY_DEFAULTS

    try:
        given = {k: v for k, v in (("t_min", t_min), ("t_max", t_max), ("steps", steps)) if v is not None}
        cfg = BundleBuildConfig(
            sites=sites, per_site=per_site, size=size, site=site, preset=preset, seed=seed, rounds=rounds,
            local_epochs=local_epochs, max_train=max_train, mae_rounds=mae_rounds, purifier_rounds=purifier_rounds,
            purifier_local_epochs=purifier_local_epochs, purifier_max_train=purifier_max_train,
            purifier_phases=purifier_phases, schedule=replace(PURIFY_DEFAULTS, **given),
            denoise_t_max=denoise_t_max, classifier_width=classifier_width, classifier_stem=classifier_stem,
            detector_rounds=detector_rounds, detector_local_epochs=detector_local_epochs,
            detector_harden_rounds=detector_harden_rounds, detector_l2=detector_l2, calibrate_on=calibrate_on,
            calibration_target_ffr=target_ffr, calibration_confidence=calibration_confidence, threads=threads,
            device=device, timeout_s=timeout, pause_after_s=pause_after, max_bundle_bytes=max_bytes,
            dest="" if dest is None else str(dest),
            **adv_fields(adv=adv, adv_eps=adv_eps, adv_steps=adv_steps, adv_norm=adv_norm,
                         adv_start_epoch=adv_start_epoch, trades_beta=trades_beta, robust_val=robust_val,
                         select=select),
            **{k: v for k, v in (("smoothing_sigmas", smoothing_sigmas), ("smoothing_frac", smoothing_frac),
                                 ("adv_through_purifier", adv_through_purifier), ("purifier_t", purifier_t),
                                 ("purifier_eot", purifier_eot)) if v is not None})
        if recorded:
            cfg = _with_recorded(ctx, cfg, work)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    resolved_device(cfg.device)  # a missing GPU is an error before any step runs

    from medfedpure.cli.common import console as make_console

    console = make_console(highlight=False, log_path=False)
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "bundle_build.log"

    def log(msg: str) -> None:
        console.log(msg)
        if not dry_run:
            with open(log_path, "a") as f:
                f.write(msg + "\n")

    if dry_run:
        console.print_json(json.dumps({**cfg.to_dict(), "dest": str(cfg.dest_path), "work": str(work)}))
    from medfedpure.fed.sim import FederationPaused

    try:
        out = build_bundle(cfg, work, dry_run=dry_run, log=log, signing_key=key)
    except FederationPaused as exc:
        console.print(f"bundle build paused: {exc}", markup=False)
        console.print("run the same command again to continue (every step done and the federation's last round are "
                      "kept)", markup=False)
        raise typer.Exit(75) from exc
    except Exception as exc:  # noqa: BLE001 - every failure is reported with its step's message
        console.print(f"[red]bundle build failed:[/red] {type(exc).__name__}: {escape(str(exc))}")
        console.print(f"the steps done are recorded in {work / 'bundle_metrics.json'}; rerun to resume", markup=False)
        raise typer.Exit(1) from exc
    if dry_run:
        return
    console.print(f"bundle {out.get('bundle_id')} ({out.get('bundle_bytes')} bytes) installed in "
                  f"{out.get('installed')}; step seconds {json.dumps(out.get('step_seconds'))}", markup=False)


# the options of the commands that write a new bundle from a verified one (reissue, choose-policy)
_NEW_KEY = typer.Option(None, "--key", "-k", dir_okay=False, help="Ed25519 private key (PEM) that signs the new "
                        "bundle (default: MEDFEDPURE_SIGNING_KEY; else unsigned).")
_SOURCE_TRUSTED_KEY = typer.Option(None, "--trusted-key", dir_okay=False,
                                   help="Also trust this public key (PEM) for the source bundle.")
_SOURCE_UNSIGNED = typer.Option(False, "--allow-unsigned", help="Accept an unsigned source bundle.")
_OVERWRITE_OUT = typer.Option(False, "--overwrite", help="Replace an existing bundle at --out.")


@app.command("install")
def install_command(
    bundle: Path = typer.Argument(..., help="The bundle to install as the embedded default (a copy is made).",
                                  exists=True, file_okay=False),
) -> None:
    """Make BUNDLE the embedded default bundle: verified as `Defender.default()` will verify it (signed by the
    release key or a key in MEDFEDPURE_TRUSTED_KEYS; `medfedpure bundle sign` first), copied over
    sdk/medfedpure/bundles/default and pinned as DEFAULT_BUNDLE_ID (medfedpure/runtime/default_id.py)."""
    from medfedpure.build.pipeline import BundleBuildError, install_default_bundle
    from medfedpure.runtime.bundle import BundleError

    try:
        out = install_default_bundle(bundle)
    except (BundleError, BundleBuildError, OSError) as e:
        typer.echo(f"error: {type(e).__name__}: {e}", err=True)
        raise typer.Exit(2) from e
    was = f"replacing {out['replaced'][:16]}" if out["replaced"] else "(there was none)"
    typer.echo(f"installed bundle {out['bundle_id']} (signed by {out['signer']}) at {out['dest']} {was}; "
               f"DEFAULT_BUNDLE_ID pinned in {out['pinned_in']}")


@app.command("reissue")
def reissue(
    bundle: Path = typer.Argument(..., help="The bundle to reissue (verified first).", exists=True, file_okay=False),
    out: Path = typer.Option(..., "--out", "-o", file_okay=False, help="The new bundle's folder (created)."),
    reason: str = typer.Option(..., "--reason", help="Why it is reissued (recorded in its provenance)."),
    metrics: Path | None = typer.Option(None, "--metrics", exists=True, dir_okay=False, help="JSON list of "
                                        "measurements of this bundle, each {name, value, command[, split, n]}, "
                                        "added to its provenance and model card."),
    key: Path | None = _NEW_KEY,
    trusted_key: list[Path] | None = _SOURCE_TRUSTED_KEY,
    allow_unsigned: bool = _SOURCE_UNSIGNED,
    overwrite: bool = _OVERWRITE_OUT,
) -> None:
    """Reissue a bundle in the current format: same models and gate (same decisions), the scope written out
    and a model card generated from its manifest; a new bundle id, signed with --key."""
    from medfedpure.export.bundle_writer import write_reissued_bundle
    from medfedpure.runtime.bundle import BundleError, verify_bundle

    try:
        src = verify_bundle(bundle, trusted_keys=list(trusted_key or []) or None, allow_unsigned=allow_unsigned)
        rows = json.loads(metrics.read_text()) if metrics is not None else []
        if not isinstance(rows, list):
            raise ValueError(f"{metrics}: expected a JSON list of metrics")
        vb = write_reissued_bundle(src, out, reason=reason, metrics=rows, signing_key=key, overwrite=overwrite)
    except (BundleError, ValueError, OSError) as e:
        typer.echo(f"error: {type(e).__name__}: {e}", err=True)
        raise typer.Exit(2) from e
    signed = f"signed by key {vb.signer.key_id}" if vb.signer is not None else "UNSIGNED (no --key)"
    typer.echo(f"wrote {out} (bundle id {vb.bundle_id}, from {src.bundle_id}); {signed}")


@app.command("choose-policy")
def choose_policy_command(
    bundle: Path = typer.Argument(..., help="The bundle the reports evaluated (verified first).", exists=True,
                                  file_okay=False),
    report: list[Path] = typer.Option(..., "--report", "-r", exists=True, dir_okay=False,
                                      help="A `medfedpure eval` report.json: one with --policy adaptive and one "
                                           "with --policy floor, otherwise the same command."),
    out: Path = typer.Option(..., "--out", "-o", file_okay=False, help="The new bundle's folder (created)."),
    min_gain: float = typer.Option(2.0, "--min-gain", min=0.0, help="Smallest worst-rung gain, in points, that "
                                   "justifies purifying every scan (the rule also needs twice the standard error)."),
    allow_quick: bool = typer.Option(False, "--allow-quick", help="Accept reports below the full budget (an upper "
                                     "bound on robustness): the choice is recorded as provisional."),
    key: Path | None = _NEW_KEY,
    trusted_key: list[Path] | None = _SOURCE_TRUSTED_KEY,
    allow_unsigned: bool = _SOURCE_UNSIGNED,
    overwrite: bool = _OVERWRITE_OUT,
) -> None:
    """Set the bundle's purification policy (adaptive or floor) from two evaluations of it, one per policy, and
    record the reason and the evidence in its provenance and model card; a new bundle signed with --key."""
    import hashlib

    from rich.table import Table

    from medfedpure.cli.common import console as make_console
    from medfedpure.eval.policy import PolicyChoiceError, PolicyReport, choose_policy
    from medfedpure.export.bundle_writer import write_policy_bundle
    from medfedpure.runtime.bundle import BundleError, verify_bundle

    console = make_console(highlight=False)
    try:
        src = verify_bundle(bundle, trusted_keys=list(trusted_key or []) or None, allow_unsigned=allow_unsigned)
        reports = []
        for path in report:
            raw = path.read_bytes()
            try:
                rep = json.loads(raw)
            except ValueError as exc:
                raise PolicyChoiceError(f"{path}: not JSON ({exc})") from exc
            reports.append(PolicyReport(str(path), hashlib.sha256(raw).hexdigest(), rep))
        choice = choose_policy(reports, min_gain=min_gain, allow_quick=allow_quick, bundle_id=src.bundle_id)
        table = Table(title=f"bundle {src.short_id}: {choice.rule['norm']}, sites {choice.rule['sites']}, "
                            f"{choice.evidence[0]['n']} scans, {choice.budget} budget")
        radii = list(choice.evidence[0]["worst_rung"])
        for col in ("policy", "clean (defence)", *(f"worst rung {e}" for e in radii), "median clean call, ms"):
            table.add_column(col, justify="left" if col == "policy" else "right")
        for e in choice.evidence:
            lat = e.get("latency_ms_total")
            table.add_row(e["policy"], f"{100 * e['clean']:.1f} %",
                          *(f"{100 * e['worst_rung'][r]:.1f} %" for r in radii),
                          "–" if lat is None else f"{float(lat):.1f}")
        console.print(table)
        vb = write_policy_bundle(src, out, choice.to_dict(), signing_key=key, overwrite=overwrite)
    except (BundleError, ValueError, OSError) as e:
        console.print(f"[red]error:[/red] {type(e).__name__}: {escape(str(e))}")
        raise typer.Exit(2) from e
    console.print(f"policy [bold]{choice.policy}[/bold] (was {src.spec.gate.policy}): {escape(choice.reason)}")
    signed = f"signed by key {vb.signer.key_id}" if vb.signer is not None else "UNSIGNED (no --key)"
    console.print(f"wrote {out} (bundle id {vb.bundle_id}, from {src.bundle_id}); {signed}", markup=False)
