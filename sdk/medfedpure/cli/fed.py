"""``medfedpure fed sim | deploy | compare``: argument handling only (the work is in sim / deploy / compare).

The run's options are declared once, in :data:`RUN_OPTIONS` (what every command shares) and
:data:`FEDERATION_OPTIONS` (what a federated run adds; :data:`ADV_OPTIONS`, each site's adversarial
classifier training, shared with ``bundle build``; :data:`SMOOTHING_OPTIONS`, each site's
denoised-smoothing fine-tuning, whose sigmas and fraction ``bundle build`` shares); :func:`fed_options` gives a command those
options and hands it the :class:`~medfedpure.fed.config.FedConfig` they build. An option left out
takes ``FedConfig``'s default, so the defaults have one source (the purification schedule's is
``models.diffusion.PURIFY_DEFAULTS``). Heavy imports (torch, flwr) happen inside the commands.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import typer

from medfedpure.cli.common import (
    CLASSIFIER_SPLIT_CHOICE,
    DEVICE_CHOICE,
    PRESET_CHOICE,
    STRATEGY_CHOICE,
    check_extra,
    resolved_device,
)

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)

_DEFAULT = "from FedConfig"


def _option(name: str, annotation: Any, default: Any, *decls: str, help: str, **kw: Any) -> inspect.Parameter:
    """One command-line option as a keyword parameter (``default`` None: FedConfig's default)."""
    shown = kw.pop("show_default", _DEFAULT if default is None else True)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, *decls, help=help, show_default=shown, **kw))


RUN_OPTIONS: tuple[inspect.Parameter, ...] = (
    _option("data", Path, ..., "--data", exists=True, file_okay=False,
            help="Data folder (dataset.json, splits.json, site_k/)."),
    _option("out", Path, ..., "--out", file_okay=False, help="Run folder to write (docs/interfaces.md 'Run folder')."),
    _option("config", str | None, None, "--config", click_type=PRESET_CHOICE,
            help="Model/training preset: tiny (tests, 32 px) or small (default bundle)."),
    _option("rounds", int | None, None, "--rounds", min=1, help="Federated rounds per phase."),
    _option("local_epochs", int | None, None, "--local-epochs", min=1, help="Local epochs per round."),
    _option("sites", int, 0, "--sites", min=0, help="Number of sites (0: all sites of the data set)."),
    _option("image_size", int | None, None, "--image-size", min=0,
            help="Override the preset's image side (0: the preset's)."),
    _option("seed", int | None, None, "--seed", min=0, help="Seed of initialisation and local training."),
    _option("max_train", int | None, None, "--max-train", min=0,
            help="At most this many training scans per site (0: all)."),
)

FEDERATION_OPTIONS: tuple[inspect.Parameter, ...] = (
    _option("mae_rounds", int | None, None, "--mae-rounds", min=0,
            help="The MAE phase's rounds when they should differ from --rounds (0: as many)."),
    _option("strategy", str | None, None, "--strategy", click_type=STRATEGY_CHOICE,
            help="fedavg | fedmedian | fedtrimmedavg | krum (every phase)."),
    _option("phases", str | None, None, "--phases",
            help="Comma-separated phases, in order (subset of classifier,mae,teacher,student,detector; default "
                 "the first four: the attack detector of a learned gate is opt-in)."),
    _option("calibrate", bool, True, "--calibrate/--no-calibrate", help="End with per-site gate calibration."),
    _option("classifier_split", str | None, None, "--classifier-split", click_type=CLASSIFIER_SPLIT_CHOICE,
            help="moe (global expert only) | fedbn | all."),
    _option("classifier_width", int | None, None, "--classifier-width", min=1,
            help="Multiply the classifier's channel counts (1: the preset's; 2: about 4x the parameters and "
                 "the training time)."),
    _option("classifier_stem", int | None, None, "--classifier-stem", min=0,
            help="Full-resolution conv layers before each classifier expert's stages (0: none; each about 2x "
                 "the training time at 128 px on CPU)."),
    _option("max_update_norm", float | None, None, "--max-update-norm", min=0.0,
            help="Drop updates with ‖Δ‖₂ above this (0: no bound)."),
    _option("max_relative_norm", float | None, None, "--max-relative-norm", min=0.0,
            help="Drop updates with ‖Δ‖/‖w‖ above this (0: no bound)."),
    _option("max_median_ratio", float | None, None, "--max-median-ratio", min=0.0,
            help="Drop updates longer than this × the round's median update norm (0: no bound)."),
    _option("max_examples", int | None, None, "--max-examples", min=0,
            help="Cap on a site's self-reported example count (0: only its registered count)."),
    _option("poison_site", int | None, None, "--poison-site", min=-1,
            help="Robustness experiments: this site sends poisoned updates (-1: none)."),
    _option("poison_scale", float | None, None, "--poison-scale",
            help="The poisoned site sends w + scale·Δ (−10: sign-flipped ×10)."),
    _option("student_steps", int | None, None, "--student-steps",
            help="K: the student's sampling steps (1, 2 or 4), recorded in it."),
    _option("purify_range", tuple[int, int] | None, None, "--purify-range",
            help="t* range: t_min t_max (of T = 1000), recorded in the student."),
    _option("detector_harden_rounds", int | None, None, "--detector-harden-rounds", min=0,
            help="With the detector phase: its last N rounds also train on each site's evasion of the round's "
                 "detector."),
    _option("detector_l2", float | None, None, "--detector-l2", min=0.0,
            help="With the detector phase: add PGD at this l2 radius (scan units, e.g. 0.5) to its training "
                 "attacks (0: linf only)."),
    _option("denoise_t_max", int | None, None, "--denoise-t-max", min=0,
            help="Train the purifier's teacher and student on diffusion times up to this (0: 250, the presets'); "
                 "certifying at sigma 0.5 uses t 496."),
    _option("device", str | None, None, "--device", click_type=DEVICE_CHOICE,
            help="Where each site's classifier rounds train: cpu, cuda (the sites share one GPU) or auto; "
                 "the other phases train on the CPU."),
)

ADV_CHOICE = click.Choice(("none", "fgsm-rs", "nfgsm", "pgd", "trades"))

#: Each site's local classifier training (``FedConfig.ADV_FIELDS``); shared with ``bundle build``.
ADV_OPTIONS: tuple[inspect.Parameter, ...] = (
    _option("adv", str | None, None, "--adv", click_type=ADV_CHOICE,
            help="Each site's adversarial training: pgd, trades, nfgsm (single-step N-FGSM), fgsm-rs or none "
                 "(default: the preset's, fgsm-rs). "
                 "Given (other than none), robust validation is on and selects each round's kept epoch."),
    _option("adv_eps", float | None, None, "--adv-eps", min=0.0,
            help="Adversarial radius in 1/255 units (with --adv-norm l2: the l2 radius in scan units; "
                 "default: the preset's)."),
    _option("adv_steps", int | None, None, "--adv-steps", min=1, help="PGD / TRADES attack steps."),
    _option("adv_norm", str | None, None, "--adv-norm", click_type=click.Choice(("linf", "l2")),
            help="linf or l2."),
    _option("adv_start_epoch", int | None, None, "--adv-start-epoch", min=0,
            help="First global epoch (of rounds × local epochs) with adversarial batches (default: the preset's)."),
    _option("trades_beta", float | None, None, "--trades-beta", min=0.0, help="TRADES KL weight beta."),
    _option("robust_val", int | None, None, "--robust-val", min=0,
            help="Validation scans each site attacks each epoch (PGD at the training eps and norm; "
                 "default 128 with --adv, else 0 = off); recorded per round as val_robust_accuracy."),
    _option("select", str | None, None, "--select", click_type=click.Choice(("clean", "robust")),
            help="Each round's kept epoch: clean or robust (robust validation accuracy; the default with --adv)."),
    _option("adv_through_purifier", bool, False, "--adv-through-purifier/--no-adv-through-purifier",
            help="With --adv pgd: craft each site's attack through the purification the deployed classifier sees "
                 "(the denoiser at --purifier-t, EOT over its noise) and train on the purified scans (needs "
                 "--denoiser; bundle build: the purifier federation's student). About 5x the PGD epochs' time."),
    _option("purifier_t", float | None, None, "--purifier-t", min=0.0,
            help="t* of --adv-through-purifier (0 or left out: the denoiser's t_min)."),
    _option("purifier_eot", int | None, None, "--purifier-eot", min=1,
            help="Purifier-noise draws per attack gradient with --adv-through-purifier (default 2)."),
)


#: Each site's denoised-smoothing fine-tuning (``FedConfig.SMOOTHING_FIELDS`` and ``denoiser``); ``bundle
#: build`` shares the first two (its denoiser is the purifier federation's student).
SMOOTHING_OPTIONS: tuple[inspect.Parameter, ...] = (
    _option("smoothing_sigmas", str | None, None, "--smoothing-sigmas",
            help="Denoised-smoothing fine-tuning of each site's classifier: comma-separated sigmas in scan "
                 "units, e.g. 0.12,0.25,0.5 (needs --denoiser; default: off)."),
    _option("smoothing_frac", float | None, None, "--smoothing-frac", min=0.0, max=1.0,
            help="Fraction of each batch noised and denoised (with --smoothing-sigmas; adv_frac + this <= 1)."),
    _option("denoiser", Path | None, None, "--denoiser", exists=True,
            help="The frozen denoiser every site uses with --smoothing-sigmas or --adv-through-purifier: a bundle folder, a run folder "
                 "holding student.safetensors, or a unet .safetensors file (read by each site, never sent)."),
)


def adv_fields(adv: str | None = None, adv_eps: float | None = None, adv_norm: str | None = None,
               robust_val: int | None = None, select: str | None = None, **given: Any) -> dict[str, Any]:
    """The adversarial-training fields (``FedConfig.ADV_FIELDS``) of the options given on the command line.

    ``adv_eps`` arrives in 1/255 units (ℓ∞) or scan units (ℓ2) and leaves in scan units; with ``--adv``
    (other than none) ``robust_val`` defaults to 128 and ``select`` to robust, as ``train classifier``
    does. Options left out are not returned (the config's defaults: the preset's recipe).
    """
    adv_given = adv is not None and adv != "none"
    fields = {"adv": adv, "adv_norm": adv_norm,
              "adv_eps": None if adv_eps is None else (adv_eps if adv_norm == "l2" else adv_eps / 255),
              "robust_val": robust_val if robust_val is not None else (128 if adv_given else None),
              "select": select if select is not None else ("robust" if adv_given else None), **given}
    return {k: v for k, v in fields.items() if v is not None}


TIMEOUT = typer.Option(7200.0, "--timeout", min=1.0, help="Stop the run (and all its processes) after this many seconds.")


def _config(data: Path, out: Path, sites: int, config: str | None = None, purify_range: tuple[int, int] | None = None,
            max_update_norm: float | None = None, max_relative_norm: float | None = None,
            max_median_ratio: float | None = None, **given: Any) -> Any:
    """The ``FedConfig`` of the options given on the command line (the rest: FedConfig's defaults)."""
    from medfedpure.data import num_sites
    from medfedpure.fed.config import ADV_FIELDS, FedConfig

    fields: dict[str, Any] = {k: v for k, v in given.items() if v is not None and k not in ADV_FIELDS}
    fields.update(adv_fields(**{k: v for k, v in given.items() if k in ADV_FIELDS}))
    if config is not None:
        fields["preset"] = config
    if purify_range is not None:
        fields["purify_t_min"], fields["purify_t_max"] = (int(v) for v in purify_range)
    for name, value in (("max_update_norm", max_update_norm), ("max_relative_norm", max_relative_norm),
                        ("max_median_ratio", max_median_ratio)):
        if value is not None:
            fields[name] = value if value > 0 else math.inf
    try:
        cfg = FedConfig(data_dir=str(data), out_dir=str(out), num_sites=sites or num_sites(data), **fields)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    resolved_device(cfg.device)  # a missing GPU is an error before any process starts
    if cfg.denoiser:  # every site loads it: a source that is not a diffusion unet fails here, before any launch
        from medfedpure.train.denoiser import DenoiserLoadError, load_denoiser

        try:
            load_denoiser(cfg.denoiser)
        except DenoiserLoadError as exc:
            raise typer.BadParameter(f"--{exc}") from exc
    return cfg


def fed_options(*groups: tuple[inspect.Parameter, ...]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command the options of ``groups``; it is called with ``cfg`` (a FedConfig) in their place.

    The command's own parameters (after ``cfg``) stay its own options.
    """
    shared = [p for group in groups for p in group]

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(command).parameters.values() if p.name != "cfg"]

        def run(**values: Any) -> None:
            cfg = _config(**{p.name: values.pop(p.name) for p in shared})
            command(cfg, **values)

        run.__name__, run.__qualname__, run.__doc__ = command.__name__, command.__qualname__, command.__doc__
        run.__module__ = command.__module__
        run.__signature__ = inspect.Signature(shared + own)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in shared + own}
        return run

    return decorate


def _summary(metrics: dict, wall_key: str, wrote: str) -> None:
    """Per phase the last round's test metrics per site and the dropped updates; then what was written."""
    from medfedpure.fed.phases import PHASES

    for phase in (ph for ph in PHASES if ph in metrics["phases"]):
        p = metrics["phases"][phase]
        last = max((int(r["round"]) for r in p["per_site"] if r["kind"] == "evaluate"), default=0)
        vals = {int(r["site"]): {k: round(float(v), 4) for k, v in r.items() if k.startswith("test_")}
                for r in p["per_site"] if r["kind"] == "evaluate" and int(r["round"]) == last}
        typer.echo(f"{phase}: round {last} per site {json.dumps(dict(sorted(vals.items())))}; dropped updates {len(p['rejected'])}")
        robust = {int(r["site"]): round(float(r["val_robust_accuracy"]), 4) for r in p["per_site"]
                  if r["kind"] == "train" and int(r["round"]) == last and "val_robust_accuracy" in r}
        if robust:
            typer.echo(f"{phase}: round {last} robust validation accuracy per site {json.dumps(dict(sorted(robust.items())))}")
    typer.echo(f"{wall_key}: {metrics[wall_key]:.1f} s; leftover processes: {metrics['leftover_pids']}")
    typer.echo(wrote)


# A paused run is not a failure, and not done: the exit status says "run me again" (EX_TEMPFAIL).
PAUSED_EXIT = 75
RESUME = typer.Option(False, "--resume", help="Continue from RUN/resume/, the round checkpoint an interrupted or "
                      "paused run of the same options left (without it the run starts afresh).")
PAUSE_AFTER = typer.Option(0.0, "--pause-after", min=0.0, help="Pause at the first round boundary after this many "
                           "seconds (0: never): checkpoint, exit with status 75; --resume continues.")


@app.command()
@fed_options(RUN_OPTIONS, FEDERATION_OPTIONS, ADV_OPTIONS, SMOOTHING_OPTIONS)
def sim(cfg: Any, timeout: float = TIMEOUT, resume: bool = RESUME, pause_after: float = PAUSE_AFTER) -> None:
    """Federated training on the simulation runtime (Ray; one machine) → RUN folder with per-site checkpoints.

    Every round is checkpointed: --resume continues an interrupted or paused run where it stopped."""
    check_extra("fed")  # the simulation runs in child processes: check flwr/ray here, in one line
    from dataclasses import replace

    from medfedpure.fed.sim import FederationPaused, run_sim

    out = cfg.out_dir
    try:
        metrics = run_sim(replace(cfg, pause_after_s=pause_after), timeout_s=timeout, resume=resume)
    except FederationPaused as exc:
        typer.echo(f"paused {exc.where}; run the same command with --resume to continue")
        raise typer.Exit(PAUSED_EXIT) from exc
    _summary(metrics, "sim_wall_s", f"wrote {out}/metrics.json, {out}/fed_metrics.png, {out}/site_k/")


@app.command()
@fed_options(RUN_OPTIONS, FEDERATION_OPTIONS, ADV_OPTIONS, SMOOTHING_OPTIONS)
def deploy(cfg: Any, timeout: float = TIMEOUT) -> None:
    """The same app on the deployment runtime: SuperLink + one SuperNode per site on 127.0.0.1, then stop all."""
    check_extra("fed")  # the simulation runs in child processes: check flwr/ray here, in one line
    from medfedpure.fed.deploy import run_deployment

    out = cfg.out_dir
    _summary(run_deployment(cfg, timeout_s=timeout), "deploy_wall_s", f"wrote {out}/metrics.json; logs in {out}/deploy_logs/")


@app.command()
@fed_options(RUN_OPTIONS)
def compare(cfg: Any,
            methods: str = typer.Option("local,fedavg,fedbn,moe", "--methods", help="Subset of local,fedavg,fedbn,moe."),
            timeout: float = TIMEOUT) -> None:
    """Per-site test accuracy (mean ± std): local-only vs FedAvg vs FedBN-style vs personalised MoE."""
    check_extra("fed")  # the simulation runs in child processes: check flwr/ray here, in one line
    from medfedpure.fed.compare import METHODS, run_compare

    chosen = tuple(m for m in methods.split(",") if m)
    unknown = set(chosen) - {k for k, _, _ in METHODS}
    if unknown or not chosen:
        raise typer.BadParameter(f"--methods {methods!r}: choose from local, fedavg, fedbn, moe")
    out = Path(cfg.out_dir)
    results = run_compare(cfg, out, methods=chosen, timeout_s=timeout)
    typer.echo((out / "compare.md").read_text())
    typer.echo(f"wrote {out}/compare.json, compare.md, compare.png ({len(results['methods'])} methods)")


@app.command()
@fed_options(RUN_OPTIONS)
def robustness(cfg: Any,
               strategies: str = typer.Option("fedavg,fedmedian,fedtrimmedavg,krum", "--strategies",
                                              help="Subset of fedavg,fedmedian,fedtrimmedavg,krum."),
               poison_site: int = typer.Option(-1, "--poison-site", min=-1, help="The poisoned site (-1: the last)."),
               poison_scale: float = typer.Option(-20.0, "--poison-scale",
                                                  help="The poisoned site replies w + scale·Δ."),
               max_median_ratio: float = typer.Option(0.0, "--max-median-ratio", min=0.0,
                                                      help="Median-relative norm bound (0: FedConfig's default)."),
               timeout: float = TIMEOUT) -> None:
    """Classifier accuracy per strategy: clean vs one site sending poisoned (e.g. sign-flipped ×20) updates."""
    from dataclasses import replace

    check_extra("fed")  # the simulation runs in child processes: check flwr/ray here, in one line
    from medfedpure.fed.compare import run_robustness
    from medfedpure.fed.strategies import STRATEGIES

    chosen = tuple(s for s in strategies.split(",") if s)
    if set(chosen) - set(STRATEGIES) or not chosen:
        raise typer.BadParameter(f"--strategies {strategies!r}: choose from {', '.join(STRATEGIES)}")
    if max_median_ratio:
        try:
            cfg = replace(cfg, max_median_ratio=max_median_ratio)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
    out = Path(cfg.out_dir)
    run_robustness(cfg, out, strategies=chosen, poison_site=poison_site, poison_scale=poison_scale, timeout_s=timeout)
    typer.echo((out / "robustness.md").read_text())
    typer.echo(f"wrote {out}/robustness.json, robustness.md")


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


@app.command()
def pause(run: Path = typer.Argument(..., file_okay=False, help="The run folder (a `fed sim --out`), or a bundle "
                                     "build's work folder (its federation that is running).")) -> None:
    """Ask a running federated simulation to stop after its current round: it checkpoints and exits with status 75,
    as with --pause-after. `fed sim --resume` (or the same `bundle build` command) continues it; `fed status RUN`
    shows when it has stopped. A run that is not going ignores the request (its next start clears it)."""
    import getpass

    from medfedpure.fed.status import RunStatusError, request_run_pause

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name in this environment: the request says nothing about who
        user = ""
    try:
        asked = request_run_pause(run, by=user)
    except (RunStatusError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    for target, where in asked:
        typer.echo(f"{target}: pause requested; it stops after the round in progress (last checkpoint: {where}); "
                   f"`medfedpure fed status {target}` shows when")


def _print_status(con: Any, st: dict[str, Any]) -> None:
    """One federated run's status: its phases, the last round's per-site metrics, its segments."""
    from rich.markup import escape
    from rich.table import Table

    from medfedpure.fed.status import SITE_METRICS

    con.print(f"{st['run']}: {st['where']}", markup=False)
    table = Table("phase", "state", "rounds", "wall", "s / round", "left at this pace")
    for p in st["phases"]:
        per_round = p.get("seconds_per_round")
        table.add_row(p["phase"], p["state"], f"{p['rounds_done']} / {p['rounds']}", _fmt_s(p.get("wall_s")),
                      "–" if per_round is None else f"{per_round:.0f} s ({p['pace']})", _fmt_s(p.get("estimate_left_s")))
    con.print(table)
    shown = [p for p in st["phases"] if p.get("sites")]
    if shown:
        p = shown[-1]
        cols = [k for k in SITE_METRICS if any(k in m for m in p["sites"].values())]
        sites = Table("site", *cols, title=f"{escape(p['phase'])}, round {p['last_round']}")
        for site, m in p["sites"].items():
            sites.add_row(str(site), *("–" if k not in m else _fmt_s(m[k]) if k == "train_s" else f"{m[k]:.4f}"
                                       for k in cols))
        con.print(sites)
    if st["segments"]:
        con.print(f"{len(st['segments'])} run segment(s); the last started {st['segments'][-1].get('started_at')}",
                  markup=False)


@app.command()
def status(run: Path = typer.Argument(..., file_okay=False, help="The run folder (a `fed sim|deploy --out`), or a "
                                      "bundle build's work folder (every federation of it) or one of its WORK/fed_* "
                                      "folders."),
           as_json: bool = typer.Option(False, "--json", help="Print the status as JSON.")) -> None:
    """Where a federated run stands: each phase's rounds and wall time, an estimate of the time left, each site's
    last-round metrics. On a bundle build's work folder, each of its federations in the order they started. Reads
    the run folder only (also while the run is going)."""
    from medfedpure.cli.common import console as make_console
    from medfedpure.fed.status import RunStatusError, run_status, work_status

    try:
        try:
            st = run_status(run)
        except RunStatusError:
            if not any((p / "config.json").is_file() for p in run.glob("fed_*")):
                raise
            st = work_status(run)
    except RunStatusError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps(st, indent=1, sort_keys=True))
        return
    con = make_console(highlight=False)
    for one in st.get("federations", [st]):
        _print_status(con, one)
