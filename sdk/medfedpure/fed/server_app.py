"""The Flower ServerApp: runs the phases in order, each with a validated strategy, then calibration.

``run_federation(grid, cfg)`` is the whole server. The ServerApp reads ``cfg`` from Flower's
``context.run_config`` on both runtimes: ``app`` (deployment runtime: the generated app's
``[tool.flwr.app.config]``) and ``make_server_app(run_config)`` (simulation runtime: the same
mapping bound in-process).

Per phase (in the order of ``phases.PHASES``; what differs between phases is in its registry entry):

1. build the phase's model from ``cfg.seed`` (or from the final model of ``Phase.init_from``: the
   student starts from the federated teacher, as distillation requires); the initial travelling
   tensors go to every site;
2. ``strategy.start`` for the phase's rounds (``cfg.rounds_of``) (train on every site, validate and aggregate,
   federated evaluation on every site); each message carries only the per-round values (phase,
   split, run token; Flower adds the round);
3. save the result into the run folder, ``RUN/<Phase.server_file>``: the full model
   (``RUN/{mae,teacher,student}.safetensors``), or for a personalised phase only what travels
   (``RUN/classifier_global.safetensors``; each site writes its full ``site_k/classifier.safetensors``).

Before the first phase each site registers (a QUERY): it declares its training-set size, which caps
every ``num-examples`` it reports later (``validation.check_num_examples``; a node that does not
register validly has all its updates dropped). After the last phase each site calibrates its gate
(a QUERY message; the data never leaves the site). Metrics —
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
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from medfedpure.fed import checkpoint, params
from medfedpure.fed.config import FedConfig
from medfedpure.fed.phases import PHASES, Phase
from medfedpure.fed.strategies import WEIGHT_KEY, make_strategy
from medfedpure.fed.validation import UpdateValidationConfig, check_num_examples

LOG = logging.getLogger("medfedpure.fed")

REGISTER_POLL_S = 0.5  # how often registration looks for nodes that have not connected yet


def round_config(phase: str, split: str, run_token: str, round_offset: int = 0) -> ConfigRecord:
    """The per-round message config; the run's constants travel as ``context.run_config`` instead.

    ``round-offset``: the phase's rounds run before this segment (a resumed run); a site's round in
    the phase is Flower's ``server-round`` plus it.
    """
    return ConfigRecord({"phase": phase, "split": split, "run-token": run_token, "round-offset": int(round_offset)})


def _initial_model(cfg: FedConfig, phase: Phase, finals: dict[str, Any]) -> tuple[Any, Any]:
    """The phase's starting model: seeded fresh, or the final model of ``phase.init_from``."""
    model, mcfg = phase.build(cfg.preset, seed=cfg.seed, size=cfg.image_size, width=cfg.classifier_width,
                              stem=cfg.classifier_stem)
    if phase.init_from is not None:
        source = finals.get(phase.init_from)
        path = Path(cfg.out_dir) / PHASES[phase.init_from].server_file
        if source is None and path.is_file():
            from medfedpure.models.weights import load_model

            source = load_model(path)[0]
        if source is None:
            raise FileNotFoundError(f"the {phase.name} phase needs the {phase.init_from}: {path} is missing; "
                                    f"run phase {phase.init_from!r} first")
        model.load_state_dict(source.state_dict())
    return model, mcfg


def run_federation(grid: Grid, cfg: FedConfig) -> dict[str, Any]:
    """Run every phase of ``cfg`` on ``grid``; returns (and writes) the metrics dict.

    Continues from ``RUN/resume/`` when it holds a checkpoint of this config (``fed.checkpoint``; the
    runner removes it unless asked to resume). Returns early, with ``RUN/paused.json`` written, when the
    config's pacing says pause.
    """
    from medfedpure.models.weights import save_model, save_tensors

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {
        "config": cfg.to_dict(),
        "machine": {"node": platform.node(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "phases": {},
    }
    finals: dict[str, Any] = {}
    resumed = checkpoint.load(out, cfg)
    # Identifies this run to the sites: their saved local state is reused only within the same run
    # (a resumed run keeps its token, so every site finds its own state again).
    run_token = resumed.run_token if resumed else secrets.token_hex(8)
    metrics["run_token"] = run_token
    segments = list(resumed.segments) if resumed else []
    segment: dict[str, Any] = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "resumed_from": resumed.where() if resumed else None}
    segments.append(segment)
    metrics["segments"] = segments
    if resumed:
        LOG.info("resuming run %s: %s", run_token, resumed.where())
    base = checkpoint.Checkpoint(identity=checkpoint.identity(cfg), run_token=run_token, segments=segments)
    pacer = checkpoint.Pacer(cfg)
    validation = cfg.validation
    metrics["registration"] = _register(grid, cfg, validation)
    declared = {int(node): int(n) for node, n in metrics["registration"]["declared_by_node"].items()}
    t_run = time.perf_counter()
    for phase in (PHASES[name] for name in cfg.phases):
        if resumed and phase.name in resumed.phases_done:
            metrics["phases"][phase.name] = resumed.phases_done[phase.name]
            continue
        if pacer.due():
            return _pause(out, metrics, replace(base, phases_done=metrics["phases"]), pacer.due(), t_run)
        split = phase.split(cfg)
        n_rounds = cfg.rounds_of(phase.name)
        model, mcfg = _initial_model(cfg, phase, finals)
        strategy = make_strategy(
            cfg.strategy, cfg.num_sites, validation=validation, phase=phase.name, trim_beta=cfg.trim_beta,
            krum_f=None if cfg.krum_f < 0 else cfg.krum_f, declared_examples=declared,
        )
        arrays = params.get_travelling(model, split)
        done, wall_before = 0, 0.0
        if resumed and resumed.phase == phase.name:
            done, wall_before = resumed.rounds_done, resumed.wall_s
            arrays = resumed.arrays if resumed.arrays is not None else arrays
            strategy.restore_records(resumed.records, done)
        conf = round_config(phase.name, split, run_token, done)

        def _progress(rnd: int, phase: str = phase.name) -> None:
            before = cfg.rounds_before(phase)
            (out / "progress.json").write_text(json.dumps({"phase": phase, "round": rnd, "rounds_done": before + rnd}))

        strategy.on_evaluated = _progress
        t0 = time.perf_counter()
        state = {"arrays": arrays, "round_end": t0}

        def _round_done(rnd: int, arrays: Any, phase: str = phase.name, offset: int = done,
                        t0: float = t0, wall_before: float = wall_before, strategy: Any = strategy,
                        state: dict[str, Any] = state, n_rounds: int = n_rounds) -> None:
            # Flower's centralised-evaluation hook: called after every round with the global tensors
            # (and once before the first round, which is not a round).
            if rnd == 0:
                return None
            now = time.perf_counter()
            strategy.round_s[offset + rnd] = now - state["round_end"]
            state.update(arrays=arrays, round_end=now)
            segment["wall_s"] = now - t_run
            ckpt = replace(base, phases_done=metrics["phases"], phase=phase, rounds_done=offset + rnd, arrays=arrays,
                           wall_s=wall_before + time.perf_counter() - t0, records=strategy.records())
            checkpoint.save(out, ckpt)
            pacer.tick()
            why = pacer.due()
            if why and offset + rnd < n_rounds:
                raise checkpoint.Paused(why)
            return None

        if done < n_rounds:
            try:
                strategy.start(
                    grid=grid, initial_arrays=arrays, num_rounds=n_rounds - done,
                    timeout=cfg.round_timeout_s, train_config=conf, evaluate_config=ConfigRecord(dict(conf)),
                    evaluate_fn=_round_done,
                )
            except checkpoint.Paused as why:
                return _pause(out, metrics, checkpoint.load(out, cfg) or base, str(why), t_run)
        wall = wall_before + time.perf_counter() - t0
        n_ok = sum(1 for h in strategy.history if h["kind"] == "train")
        if n_ok == 0:
            raise RuntimeError(
                f"phase {phase.name!r}: no site returned a valid update in {n_rounds} round(s); "
                f"errors: {strategy.errors[:3]}; dropped: {strategy.rejected[:3]}"
            )
        params.set_travelling(model, state["arrays"], split)
        extra: dict[str, Any] = {"rounds": n_rounds, "strategy": cfg.strategy, "num_sites": cfg.num_sites,
                                 "federated": True, "role": phase.name, **phase.metadata(cfg)}
        if phase.personalised:  # only what travels is global; each site saves its full model
            save_tensors(
                out / phase.server_file,
                dict(state["arrays"].to_torch_state_dict()),
                {"kind": f"{phase.kind}-global", "config": json.dumps(mcfg.to_dict()), "split": split,
                 **{k: json.dumps(v) for k, v in extra.items()}},
            )
        else:
            save_model(out / phase.server_file, model, mcfg, phase.kind, extra=extra)
            finals[phase.name] = model
        metrics["phases"][phase.name] = {
            "split": split,
            "wall_s": wall,
            "rounds": n_rounds,
            "per_site": strategy.history,
            "rejected": strategy.rejected,
            "errors": strategy.errors,
            "train_aggregated": strategy.aggregated["train"],
            "evaluate_aggregated": strategy.aggregated["evaluate"],
            "round_s": strategy.round_s,
        }
        segment["wall_s"] = time.perf_counter() - t_run
        _write(out, metrics)
        checkpoint.save(out, replace(base, phases_done=metrics["phases"]))
    if cfg.calibrate:
        metrics["calibration"] = _calibrate(grid, cfg)
    from medfedpure.fed.plots import plot_run

    plot_run(metrics, out / "fed_metrics.png")
    if "classifier" in metrics["phases"]:
        plot_run(metrics, out / "accuracy_per_site.png", phases=("classifier",))
    segment["wall_s"] = time.perf_counter() - t_run
    # Written last: a metrics.json with "wall_s" tells the runners that the server is done.
    metrics["wall_s"] = sum(float(s.get("wall_s", 0.0)) for s in segments)
    _write(out, metrics)
    checkpoint.clear(out)
    checkpoint.clear_request(out)  # came too late: nothing left to pause
    return metrics


def _pause(out: Path, metrics: dict[str, Any], ckpt: checkpoint.Checkpoint, reason: str,
           t_run: float) -> dict[str, Any]:
    """Stop at a round boundary: the checkpoint is on disk; leave the reason where the runner looks."""
    metrics["segments"][-1]["wall_s"] = time.perf_counter() - t_run
    ckpt = replace(ckpt, segments=metrics["segments"])
    checkpoint.save(out, ckpt)
    checkpoint.write_paused(out, ckpt, reason)
    checkpoint.clear_request(out)  # answered
    metrics["paused"] = {"where": ckpt.where(), "reason": reason}
    _write(out, metrics)
    LOG.info("paused %s: %s", ckpt.where(), reason)
    return metrics


def _register(grid: Grid, cfg: FedConfig, validation: UpdateValidationConfig) -> dict[str, Any]:
    """Ask every node for its training-set size before the first phase; the declared counts cap its replies.

    Returns ``{"declared_by_node": {node: n}, "declared_by_site": {site: n}, "rejected": [...]}``. A
    declaration that is not a finite positive integer within ``validation.max_examples`` (or a
    node that fails to answer) is recorded under "rejected": that node's updates are all dropped.
    """
    conf = round_config("register", "all", "")
    # Nodes connect asynchronously: wait (as the strategies do before a round) for all of them.
    deadline = time.monotonic() + cfg.round_timeout_s
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < cfg.num_sites and time.monotonic() < deadline:
        time.sleep(REGISTER_POLL_S)
        node_ids = list(grid.get_node_ids())
    msgs = [Message(RecordDict({"config": conf}), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
    out: dict[str, Any] = {"declared_by_node": {}, "declared_by_site": {}, "rejected": []}
    replies = list(grid.send_and_receive(msgs, timeout=cfg.round_timeout_s))
    for node in sorted(set(node_ids) - {int(r.metadata.src_node_id) for r in replies}):
        LOG.warning("node %d not registered: no reply to the registration query", node)
        out["rejected"].append({"node": int(node), "site": -1, "reason": "no reply to the registration query"})
    for r in replies:
        node = int(r.metadata.src_node_id)
        if r.has_error():
            reason, site = f"registration failed: {r.error.reason}", -1
        else:
            rec = r.content.metric_records.get("metrics", {})
            site = int(rec.get("site", -1))
            reason = check_num_examples(rec.get(WEIGHT_KEY), validation)
        if reason:
            LOG.warning("node %d (site %d) not registered: %s", node, site, reason)
            out["rejected"].append({"node": node, "site": site, "reason": reason})
            continue
        out["declared_by_node"][str(node)] = int(rec[WEIGHT_KEY])
        out["declared_by_site"][str(site)] = int(rec[WEIGHT_KEY])
    return out


def _calibrate(grid: Grid, cfg: FedConfig) -> dict[str, Any]:
    """Ask every site to calibrate its own gate; returns ``{site: calibration dict}``."""
    missing = [p for p in ("mae", "student") if not (Path(cfg.out_dir) / f"{p}.safetensors").is_file()]
    if missing:
        raise FileNotFoundError(f"calibration needs the federated {missing}: run those phases (or pass --no-calibrate)")
    conf = round_config("calibrate", "all", "")
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


def _serve(grid: Grid, run_config: dict[str, Any]) -> None:
    """Run the federation configured by ``run_config``; a failure leaves ``RUN/server_error.txt``."""
    cfg = FedConfig.from_run_config(run_config)
    try:
        run_federation(grid, cfg)
    except BaseException:
        # On the deployment runtime the ServerApp runs in a SuperLink subprocess: leave the reason
        # where the operator (and the runner's poll) looks.
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out_dir) / "server_error.txt").write_text(traceback.format_exc())
        raise


def make_server_app(run_config: dict[str, Any] | None = None) -> ServerApp:
    """The ServerApp; ``run_config`` (``FedConfig.to_run_config()``) is bound for the simulation runtime.

    The simulation runtime of ``flwr.simulation.run_simulation`` hands its apps an empty
    ``context.run_config``; the bound mapping fills it (keys the runtime sets win).
    """
    bound = dict(run_config or {})
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        _serve(grid, {**bound, **dict(context.run_config)})

    return server


# The deployment runtime's ServerApp: the run config comes from the app's pyproject.toml.
app = make_server_app()
