"""The Flower ServerApp: runs the phases in order, each with a validated strategy, then calibration.

``run_federation(grid, cfg)`` is the whole server; ``app`` (deployment runtime, reads the run config
that ``flwr run`` delivers) and ``make_server_app(cfg)`` (simulation runtime, in-process) both call it.

Per phase (classifier → mae → teacher → student):

1. build the phase's model from ``cfg.seed``; the initial travelling tensors go to every site (the
   student starts from the final federated teacher, as distillation requires);
2. ``strategy.start`` for ``cfg.rounds`` rounds (train on every site, validate and aggregate,
   federated evaluation on every site);
3. save the result into the run folder: ``RUN/{mae,teacher,student}.safetensors`` (full models);
   for the classifier only the global expert is global: ``RUN/classifier_global.safetensors``
   (each site writes its full personalised ``site_k/classifier.safetensors``).

Then each site calibrates its gate (a QUERY message; the data never leaves the site). Metrics —
per site, per round, per phase, plus every dropped update with its reason — go to
``RUN/metrics.json`` after every phase, and a plot to ``RUN/fed_metrics.png``.
"""

from __future__ import annotations

import json
import logging
import platform
import secrets
import time
import traceback
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from medfedpure.fed import params, tasks
from medfedpure.fed.config import FedConfig
from medfedpure.fed.strategies import make_strategy
from medfedpure.fed.validation import UpdateValidationConfig

LOG = logging.getLogger("medfedpure.fed")


def _message_config(cfg: FedConfig, phase: str, split: str, run_token: str) -> ConfigRecord:
    return ConfigRecord(
        {
            "run-token": run_token,
            "phase": phase,
            "preset": cfg.preset,
            "image-size": cfg.image_size,
            "split": split,
            "data-dir": str(Path(cfg.data_dir).resolve()),
            "run-dir": str(Path(cfg.out_dir).resolve()),
            "local-epochs": cfg.local_epochs,
            "num-rounds": cfg.rounds,
            "seed": cfg.seed,
            "max-train": cfg.max_train,
            "threads": cfg.threads,
            "poison-site": cfg.poison_site,
            "poison-scale": cfg.poison_scale,
            "student-steps": cfg.student_steps,
            "t-min": cfg.purify_t_min,
            "t-max": cfg.purify_t_max,
        }
    )


def _initial_model(cfg: FedConfig, phase: str, finals: dict[str, Any]):
    model, mcfg = tasks.build_model(phase, cfg.preset, seed=cfg.seed, size=cfg.image_size)
    if phase == "student":
        teacher = finals.get("teacher")
        path = Path(cfg.out_dir) / "teacher.safetensors"
        if teacher is None and path.is_file():
            from medfedpure.train.checkpoint import load_model

            teacher = load_model(path)[0]
        if teacher is None:
            raise FileNotFoundError(f"the student phase needs the teacher: {path} is missing; run phase 'teacher' first")
        model.load_state_dict(teacher.state_dict())
    return model, mcfg


def run_federation(grid: Grid, cfg: FedConfig) -> dict[str, Any]:
    """Run every phase of ``cfg`` on ``grid``; returns (and writes) the metrics dict."""
    from medfedpure.train.checkpoint import save_model, save_tensors

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {
        "config": cfg.to_dict(),
        "machine": {"node": platform.node(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "phases": {},
    }
    finals: dict[str, Any] = {}
    # Identifies this run to the sites: their saved local state is reused only within the same run.
    run_token = secrets.token_hex(8)
    metrics["run_token"] = run_token
    validation = UpdateValidationConfig(cfg.max_update_norm, cfg.max_relative_norm)
    t_run = time.perf_counter()
    for index, phase in enumerate(cfg.phases):
        split = cfg.classifier_split if phase == "classifier" else "all"
        model, mcfg = _initial_model(cfg, phase, finals)
        strategy = make_strategy(
            cfg.strategy, cfg.num_sites, validation=validation, phase=phase, trim_beta=cfg.trim_beta,
            krum_f=None if cfg.krum_f < 0 else cfg.krum_f,
        )
        conf = _message_config(cfg, phase, split, run_token)

        def _progress(rnd: int, phase: str = phase, index: int = index) -> None:
            (out / "progress.json").write_text(json.dumps({"phase": phase, "round": rnd, "rounds_done": index * cfg.rounds + rnd}))

        strategy.on_evaluated = _progress
        t0 = time.perf_counter()
        result = strategy.start(
            grid=grid, initial_arrays=params.get_travelling(model, split), num_rounds=cfg.rounds,
            timeout=cfg.round_timeout_s, train_config=conf, evaluate_config=ConfigRecord(dict(conf)),
        )
        wall = time.perf_counter() - t0
        n_ok = sum(1 for h in strategy.history if h["kind"] == "train")
        if n_ok == 0:
            raise RuntimeError(
                f"phase {phase!r}: no site returned a valid update in {cfg.rounds} round(s); "
                f"errors: {strategy.errors[:3]}; dropped: {strategy.rejected[:3]}"
            )
        params.set_travelling(model, result.arrays, split)
        extra: dict[str, Any] = {"rounds": cfg.rounds, "strategy": cfg.strategy, "num_sites": cfg.num_sites,
                                 "federated": True, "role": phase}
        if phase == "student":
            extra.update(steps=cfg.student_steps, t_min=cfg.purify_t_min, t_max=cfg.purify_t_max)
        if phase == "classifier":
            save_tensors(
                out / "classifier_global.safetensors",
                {k: v for k, v in result.arrays.to_torch_state_dict().items()},
                {"kind": "moe-global", "config": json.dumps(mcfg.to_dict()), "split": split, **{k: json.dumps(v) for k, v in extra.items()}},
            )
        else:
            save_model(out / f"{phase}.safetensors", model, mcfg, tasks.KINDS[phase], extra=extra)
            finals[phase] = model
        metrics["phases"][phase] = {
            "split": split,
            "wall_s": wall,
            "rounds": cfg.rounds,
            "per_site": strategy.history,
            "rejected": strategy.rejected,
            "errors": strategy.errors,
            "train_aggregated": {int(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
            "evaluate_aggregated": {int(r): dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
        }
        _write(out, metrics)
    if cfg.calibrate:
        metrics["calibration"] = _calibrate(grid, cfg)
    from medfedpure.fed.plots import plot_run

    plot_run(metrics, out / "fed_metrics.png")
    if "classifier" in metrics["phases"]:
        plot_run(metrics, out / "accuracy_per_site.png", phases=("classifier",))
    # Written last: a metrics.json with "wall_s" tells the runners that the server is done.
    metrics["wall_s"] = time.perf_counter() - t_run
    _write(out, metrics)
    return metrics


def _calibrate(grid: Grid, cfg: FedConfig) -> dict[str, Any]:
    """Ask every site to calibrate its own gate; returns ``{site: calibration dict}``."""
    missing = [p for p in ("mae", "student") if not (Path(cfg.out_dir) / f"{p}.safetensors").is_file()]
    if missing:
        raise FileNotFoundError(f"calibration needs the federated {missing}: run those phases (or pass --no-calibrate)")
    conf = _message_config(cfg, "calibrate", "all", "")
    node_ids = list(grid.get_node_ids())
    msgs = [Message(RecordDict({"config": conf}), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
    replies = list(grid.send_and_receive(msgs, timeout=cfg.round_timeout_s))
    out: dict[str, Any] = {}
    errors = []
    for r in replies:
        if r.has_error():
            errors.append(f"node {r.metadata.src_node_id}: {r.error.reason}")
            continue
        site = int(r.content["metrics"]["site"])
        out[str(site)] = json.loads(str(r.content["calibration"]["json"]))
    if errors or len(out) != cfg.num_sites:
        raise RuntimeError(f"calibration failed on {cfg.num_sites - len(out)} site(s): {errors[:3]}")
    return out


def _write(out: Path, metrics: dict[str, Any]) -> None:
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True, default=float))
    tmp.replace(out / "metrics.json")


def make_server_app(cfg: FedConfig) -> ServerApp:
    """A ServerApp bound to ``cfg`` (simulation runtime, in-process)."""
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg)

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment runtime: the configuration comes from the app's run config."""
    cfg = FedConfig.from_run_config(dict(context.run_config))
    try:
        run_federation(grid, cfg)
    except BaseException:
        # The ServerApp runs in a SuperLink subprocess: leave the reason where the operator looks.
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out_dir) / "server_error.txt").write_text(traceback.format_exc())
        raise
