"""Simulation runtime: the federation on one machine, in a child process that leaves nothing behind.

``run_sim(cfg)`` writes ``RUN/config.json``, starts ``python -m medfedpure.fed.sim RUN/config.json``
in a new session with the run's marker in its environment (``procs.py``), shows progress from the
run's metrics, waits, then stops every marked process that is still alive (Ray daemons included)
and checks that none is left. The worker calls ``flwr.simulation.run_simulation`` with the
ServerApp and ClientApp of ``server_app.py`` / ``client_app.py`` bound to ``cfg.to_run_config()``
(the deployment runtime reads the same mapping from the app's ``pyproject.toml``), on the Ray
backend with one CPU: one client at a time, the fastest setting on a small machine (asking Ray for
more CPUs than exist hangs).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from medfedpure.fed import checkpoint, procs
from medfedpure.fed.config import FedConfig
from medfedpure.train.device import resolve_device


class FederationError(RuntimeError):
    """The federated run failed; the message carries the tail of its log."""


class FederationPaused(FederationError):
    """The run stopped itself at a round boundary (its pacing); a run started with ``resume`` continues it."""

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(message)
        self.where = where


def log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _rounds_done(progress_path: Path) -> int:
    """Rounds finished so far, over all phases (the server writes RUN/progress.json after each round)."""
    try:
        return int(json.loads(progress_path.read_text())["rounds_done"])
    except (OSError, ValueError, KeyError):
        return 0


def prepare_run_folder(cfg: FedConfig, *, resume: bool = False) -> FedConfig:
    """Create RUN, write ``RUN/config.json`` and clear the previous run's result files (and, unless
    ``resume``, its round checkpoint: the run starts afresh).

    Returns ``cfg`` with absolute data and run folders and denoiser path: every process of the run
    (Ray workers, SuperNodes) reads them from the run config, whatever its working directory.
    """
    out = Path(cfg.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = replace(cfg, out_dir=str(out), data_dir=str(Path(cfg.data_dir).resolve()),
                  denoiser=str(Path(cfg.denoiser).resolve()) if cfg.denoiser else "")
    cfg.save(out / "config.json")
    for stale in ("metrics.json", "server_error.txt", "progress.json", checkpoint.PAUSED_FILE,
                  checkpoint.PAUSE_REQUEST_FILE):  # a request is for the run that was going when it was made
        (out / stale).unlink(missing_ok=True)  # a stale file would pass for this run's result
    if not resume:
        checkpoint.clear(out)
    return cfg


def finish_metrics(out: Path, wall_key: str, wall: float, token: str, stragglers: list[int],
                   leftover: list[int]) -> dict[str, Any]:
    """``RUN/metrics.json`` plus the runner's wall time and process accounting, written back."""
    metrics = json.loads((out / "metrics.json").read_text())
    metrics[wall_key] = wall
    metrics["leftover_pids"] = leftover
    metrics["proc_token"] = token
    metrics["stragglers_stopped"] = len(stragglers)  # alive after the run ended; stopped by marker
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=float))
    return metrics


def rounds_checkpointed(cfg: FedConfig) -> tuple[int, str]:
    """Rounds done, over all phases, by the checkpoint a resumed run of ``cfg`` would continue, and where it
    stands in words ((0, "") without one)."""
    try:
        ckpt = checkpoint.load(Path(cfg.out_dir), cfg)
    except ValueError:
        return 0, ""
    if ckpt is None:
        return 0, ""
    done = sum(cfg.rounds_of(p) for p in cfg.phases if p in ckpt.phases_done) + (ckpt.rounds_done if ckpt.phase else 0)
    return done, ckpt.where()


def run_sim(cfg: FedConfig, *, timeout_s: float = 3600.0, progress: bool = True,
            resume: bool = False) -> dict[str, Any]:
    """Run the simulation for ``cfg``; returns ``RUN/metrics.json`` plus ``sim_wall_s`` and ``leftover_pids``.

    ``resume``: continue from the run's round checkpoint when it holds one of this config
    (``fed.checkpoint``); without it every run starts afresh.

    Raises:
        FederationPaused: the run paused itself (``cfg.pause_after_s`` / ``pause_after_rounds``), checkpointed.
        FederationError: the run failed or timed out (after stopping its processes).
    """
    resolve_device(cfg.device)  # a missing GPU is an error before any process starts
    cfg = prepare_run_folder(cfg, resume=resume)
    out = Path(cfg.out_dir)
    log_path = out / "fed_sim.log"
    token = procs.new_token()
    env = procs.run_env(token, out / ".flwr")
    run_procs = procs.RunProcesses(token)
    total_rounds = cfg.total_rounds
    already, where = rounds_checkpointed(cfg) if resume else (0, "")
    if where:
        logging.getLogger("medfedpure.fed").info("resuming %s: %s", out, where)
    t0 = time.perf_counter()
    rc: int | None = None
    with open(log_path, "a" if resume else "w") as log, procs.exit_on_signals():
        proc = subprocess.Popen(
            [sys.executable, "-m", "medfedpure.fed.sim", str(out / "config.json")],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            bar = None
            if progress:
                from medfedpure.progress import progress as progress_bar

                bar = progress_bar(total=total_rounds, desc="federated rounds", unit="round")
                bar.set(already)
            while True:
                try:
                    rc = proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    pass
                run_procs.poll()
                if bar is not None:
                    bar.set(max(already, _rounds_done(out / "progress.json")))
                if time.perf_counter() - t0 > timeout_s:
                    break
            if bar is not None:
                bar.set(max(already, _rounds_done(out / "progress.json")))
                bar.close()
        finally:
            run_procs.poll()
            procs.stop_groups([proc])
            stragglers = run_procs.alive()
            leftover = run_procs.stop()
    wall = time.perf_counter() - t0
    if rc is None:
        raise FederationError(f"simulation exceeded {timeout_s:.0f} s and was stopped; log {log_path}:\n{log_tail(log_path)}")
    if rc != 0:
        raise FederationError(f"simulation failed (exit {rc}); log {log_path}:\n{log_tail(log_path)}")
    if leftover:
        raise FederationError(f"processes {leftover} of the run survived SIGKILL")
    paused = out / checkpoint.PAUSED_FILE
    if paused.is_file():
        info = json.loads(paused.read_text())
        raise FederationPaused(f"the federation in {out} paused {info['where']} ({info['reason']}); its round "
                               f"checkpoint is in {checkpoint.folder(out)}", info["where"])
    return finish_metrics(out, "sim_wall_s", wall, token, stragglers, leftover)


def parallel_clients(num_sites: int, threads: int, cpus: int | None = None) -> int:
    """How many simulated sites train at once: as many as the CPUs this process may use hold at
    ``threads`` torch threads each, at most one per site and at least one.

    Only the wall time depends on it: the server aggregates the replies in site order
    (``ValidatingMixin``), so the global model is the same whether the sites ran one after the
    other or side by side.
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(num_sites, cpus // max(1, threads)))


def ray_backend_config(cfg: FedConfig, workers: int, device: str) -> dict[str, Any]:
    """The simulation's Ray resources: ``cfg.threads`` CPUs per site and ``workers`` sites at a time; with
    ``device == "cuda"`` one GPU shared equally by the ``workers`` concurrent sites (Ray hides the GPU from a
    client that asks for none, so the share is what makes it visible to the classifier's rounds)."""
    gpu = device == "cuda"
    return {
        "client_resources": {"num_cpus": cfg.threads, "num_gpus": 1.0 / workers if gpu else 0.0},
        "init_args": {"num_cpus": workers * cfg.threads, "num_gpus": 1 if gpu else 0, "include_dashboard": False,
                      "logging_level": "warning"},
    }


def _worker(config_path: str) -> int:
    """Child-process entry: run the simulation for the config at ``config_path``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import torch
    from flwr.simulation import run_simulation

    from medfedpure.fed.client_app import make_client_app
    from medfedpure.fed.server_app import make_server_app

    torch.set_num_threads(1)
    cfg = FedConfig.load(Path(config_path))
    run_config = cfg.to_run_config()
    workers = parallel_clients(cfg.num_sites, cfg.threads)
    logging.getLogger(__name__).info("%d site(s) train at a time (%d torch thread(s) each, classifier on %s)", workers,
                                     cfg.threads, cfg.device)
    run_simulation(
        server_app=make_server_app(run_config), client_app=make_client_app(run_config), num_supernodes=cfg.num_sites,
        backend_name="ray", backend_config=ray_backend_config(cfg, workers, resolve_device(cfg.device)),
    )
    # run_simulation logs ServerApp exceptions instead of raising them: the metrics decide.
    if (Path(cfg.out_dir) / checkpoint.PAUSED_FILE).is_file():
        return 0  # the runner reads why
    metrics_path = Path(cfg.out_dir) / "metrics.json"
    if not metrics_path.is_file():
        return 2
    m = json.loads(metrics_path.read_text())
    done = [p for p in cfg.phases if p in m.get("phases", {})]
    if done != list(cfg.phases) or (cfg.calibrate and "calibration" not in m) or "wall_s" not in m:
        print(f"federation incomplete: phases done {done} of {list(cfg.phases)}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
