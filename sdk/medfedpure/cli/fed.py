"""``medfedpure fed sim | deploy | compare``: argument handling only (the work is in sim / deploy / compare)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)

DATA = typer.Option(..., "--data", exists=True, file_okay=False, help="Data folder (dataset.json, splits.json, site_k/).")
OUT = typer.Option(..., "--out", file_okay=False, help="Run folder to write (docs/interfaces.md 'Run folder').")
CONFIG = typer.Option("tiny", "--config", help="Model/training preset: tiny (tests, 32 px) or small (default bundle).")
ROUNDS = typer.Option(3, "--rounds", min=1, help="Federated rounds per phase.")
LOCAL_EPOCHS = typer.Option(1, "--local-epochs", min=1, help="Local epochs per round.")
SITES = typer.Option(0, "--sites", min=0, help="Number of sites (0: all sites of the data set).")
IMAGE_SIZE = typer.Option(0, "--image-size", min=0, help="Override the preset's image side (0: the preset's).")
SEED = typer.Option(0, "--seed", min=0, help="Seed of initialisation and local training.")
MAX_TRAIN = typer.Option(0, "--max-train", min=0, help="At most this many training scans per site (0: all).")
STUDENT_STEPS = typer.Option(2, "--student-steps", help="K: the student's sampling steps (1, 2 or 4), recorded in it.")
PURIFY_RANGE = typer.Option((60, 200), "--purify-range", help="t* range [t_min, t_max] (of T = 1000) recorded in the student.")
TIMEOUT = typer.Option(7200.0, "--timeout", min=1.0, help="Stop the run (and all its processes) after this many seconds.")


def _config(data: Path, out: Path, config: str, rounds: int, local_epochs: int, sites: int, image_size: int,
            seed: int, max_train: int, **kw: object):
    from medfedpure.data import num_sites
    from medfedpure.fed.config import FedConfig

    n = sites or num_sites(data)
    try:
        return FedConfig(data_dir=str(data), out_dir=str(out), rounds=rounds, local_epochs=local_epochs,
                         preset=config, num_sites=n, image_size=image_size, seed=seed, max_train=max_train, **kw)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _run_options(strategy: str, phases: str, calibrate: bool, split: str, max_update_norm: float,
                 max_relative_norm: float, poison_site: int, poison_scale: float) -> dict[str, object]:
    return {"strategy": strategy, "phases": phases, "calibrate": calibrate, "classifier_split": split,
            "max_update_norm": max_update_norm if max_update_norm > 0 else math.inf,
            "max_relative_norm": max_relative_norm if max_relative_norm > 0 else math.inf,
            "poison_site": poison_site, "poison_scale": poison_scale}


STRATEGY = typer.Option("fedavg", "--strategy", help="fedavg | fedmedian | fedtrimmedavg | krum (every phase).")
PHASES = typer.Option("classifier,mae,teacher,student", "--phases", help="Comma-separated phases, in order.")
CALIBRATE = typer.Option(True, "--calibrate/--no-calibrate", help="End with per-site gate calibration.")
SPLIT = typer.Option("moe", "--classifier-split", help="moe (global expert only) | fedbn | all.")
MAX_NORM = typer.Option(0.0, "--max-update-norm", min=0.0, help="Drop updates with ‖Δ‖₂ above this (0: no bound).")
MAX_REL = typer.Option(1.0, "--max-relative-norm", min=0.0, help="Drop updates with ‖Δ‖/‖w‖ above this (0: no bound).")
POISON = typer.Option(-1, "--poison-site", min=-1, help="Robustness experiments: this site sends poisoned updates.")
POISON_SCALE = typer.Option(-10.0, "--poison-scale", help="The poisoned site sends w + scale·Δ (−10: sign-flipped ×10).")


def _summary(metrics: dict, wall_key: str) -> None:
    from medfedpure.fed.tasks import PHASES

    for phase in (ph for ph in PHASES if ph in metrics["phases"]):
        p = metrics["phases"][phase]
        last = max((int(r["round"]) for r in p["per_site"] if r["kind"] == "evaluate"), default=0)
        vals = {int(r["site"]): {k: round(float(v), 4) for k, v in r.items() if k.startswith("test_")}
                for r in p["per_site"] if r["kind"] == "evaluate" and int(r["round"]) == last}
        typer.echo(f"{phase}: round {last} per site {json.dumps(dict(sorted(vals.items())))}; dropped updates {len(p['rejected'])}")
    typer.echo(f"{wall_key}: {metrics[wall_key]:.1f} s; leftover processes: {metrics['leftover_pids']}")


@app.command()
def sim(data: Path = DATA, out: Path = OUT, config: str = CONFIG, rounds: int = ROUNDS, local_epochs: int = LOCAL_EPOCHS,
        sites: int = SITES, strategy: str = STRATEGY, phases: str = PHASES, calibrate: bool = CALIBRATE,
        classifier_split: str = SPLIT, image_size: int = IMAGE_SIZE, max_update_norm: float = MAX_NORM,
        max_relative_norm: float = MAX_REL, poison_site: int = POISON, poison_scale: float = POISON_SCALE,
        seed: int = SEED, max_train: int = MAX_TRAIN, student_steps: int = STUDENT_STEPS,
        purify_range: tuple[int, int] = PURIFY_RANGE, timeout: float = TIMEOUT) -> None:
    """Federated training on the simulation runtime (Ray; one machine) → RUN folder with per-site checkpoints."""
    from medfedpure.fed.sim import run_sim

    cfg = _config(data, out, config, rounds, local_epochs, sites, image_size, seed, max_train,
                  **_run_options(strategy, phases, calibrate, classifier_split, max_update_norm, max_relative_norm,
                                 poison_site, poison_scale),
                  student_steps=student_steps, purify_t_min=purify_range[0], purify_t_max=purify_range[1])
    metrics = run_sim(cfg, timeout_s=timeout)
    _summary(metrics, "sim_wall_s")
    typer.echo(f"wrote {out}/metrics.json, {out}/fed_metrics.png, {out}/site_k/")


@app.command()
def deploy(data: Path = DATA, out: Path = OUT, config: str = CONFIG, rounds: int = ROUNDS,
           local_epochs: int = LOCAL_EPOCHS, sites: int = SITES, strategy: str = STRATEGY, phases: str = PHASES,
           calibrate: bool = CALIBRATE, classifier_split: str = SPLIT, image_size: int = IMAGE_SIZE,
           max_update_norm: float = MAX_NORM, max_relative_norm: float = MAX_REL, seed: int = SEED,
           max_train: int = MAX_TRAIN, student_steps: int = STUDENT_STEPS,
           purify_range: tuple[int, int] = PURIFY_RANGE, timeout: float = TIMEOUT) -> None:
    """The same app on the deployment runtime: SuperLink + one SuperNode per site on 127.0.0.1, then stop all."""
    from medfedpure.fed.deploy import run_deployment

    cfg = _config(data, out, config, rounds, local_epochs, sites, image_size, seed, max_train,
                  **_run_options(strategy, phases, calibrate, classifier_split, max_update_norm, max_relative_norm,
                                 -1, -10.0),
                  student_steps=student_steps, purify_t_min=purify_range[0], purify_t_max=purify_range[1])
    metrics = run_deployment(cfg, timeout_s=timeout)
    _summary(metrics, "deploy_wall_s")
    typer.echo(f"wrote {out}/metrics.json; logs in {out}/deploy_logs/")


@app.command()
def compare(data: Path = DATA, out: Path = OUT, config: str = CONFIG, rounds: int = ROUNDS,
            local_epochs: int = LOCAL_EPOCHS, sites: int = SITES, image_size: int = IMAGE_SIZE, seed: int = SEED,
            max_train: int = MAX_TRAIN,
            methods: str = typer.Option("local,fedavg,fedbn,moe", "--methods", help="Subset of local,fedavg,fedbn,moe."),
            timeout: float = TIMEOUT) -> None:
    """Per-site test accuracy (mean ± std): local-only vs FedAvg vs FedBN-style vs personalised MoE."""
    from medfedpure.fed.compare import METHODS, run_compare

    chosen = tuple(m for m in methods.split(",") if m)
    unknown = set(chosen) - {k for k, _, _ in METHODS}
    if unknown or not chosen:
        raise typer.BadParameter(f"--methods {methods!r}: choose from local, fedavg, fedbn, moe")
    cfg = _config(data, out, config, rounds, local_epochs, sites, image_size, seed, max_train)
    results = run_compare(cfg, out, methods=chosen, timeout_s=timeout)
    typer.echo((out / "compare.md").read_text())
    typer.echo(f"wrote {out}/compare.json, compare.md, compare.png ({len(results['methods'])} methods)")
