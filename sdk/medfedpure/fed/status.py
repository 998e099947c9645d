"""Where a federated run stands, read from its folder while it runs, after it paused, or after it finished.

``run_status(RUN)`` reads ``RUN/config.json``, then the round checkpoint ``RUN/resume/state.json`` (a run in
progress, stopped or paused) or ``RUN/metrics.json`` (a finished run), ``RUN/paused.json`` and a pending
``RUN/pause_request.json``. It returns, per phase, whether it is done, in progress (rounds done of the run's
rounds) or to do, its wall time so far, and each site's metrics in the last round recorded; plus an estimate of
the time left in the phase in progress (the mean wall time of its last three rounds, recorded by the server in
``round_s``, times the rounds left; for a run that did not record them, the phase's mean so far — an estimate,
labelled with the pace it used). Nothing is written; ``request_run_pause`` writes the pause request.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medfedpure.fed.checkpoint import CHECKPOINT_DIR, PAUSED_FILE, pause_requested
from medfedpure.fed.config import FedConfig

# The per-site numbers shown, in this order, when a row has them.
SITE_METRICS = ("val_accuracy", "test_accuracy", "val_robust_accuracy", "train_loss", "train_s")
RECENT_ROUNDS = 3  # the pace of a phase in progress: its last rounds (they get slower when adversarial epochs start)


class RunStatusError(ValueError):
    """The folder is not a federated run folder (no readable ``config.json``)."""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RunStatusError(f"{path} is not readable JSON: {exc}") from exc


def _last_round_by_site(rows: list[dict[str, Any]]) -> tuple[int, dict[int, dict[str, float]]]:
    """The last round with an evaluate row, and each site's train + evaluate metrics in it."""
    last = max((int(r["round"]) for r in rows if r.get("kind") == "evaluate"), default=0)
    sites: dict[int, dict[str, float]] = {}
    for r in rows:
        if int(r.get("round", -1)) == last:
            site = sites.setdefault(int(r.get("site", -1)), {})
            site.update({k: float(r[k]) for k in SITE_METRICS if k in r})
    return last, dict(sorted(sites.items()))


def run_status(run: str | Path) -> dict[str, Any]:
    """The status of the federated run in ``run`` (module docstring).

    Raises:
        RunStatusError: ``run`` has no readable ``config.json`` of a federated run.
    """
    run = Path(run)
    raw = _read_json(run / "config.json")
    if raw is None or "fed" not in raw:
        feds = sorted(p.name for p in run.glob("fed_*") if (p / "config.json").is_file())
        if (run / "bundle_metrics.json").is_file() and feds:
            raise RunStatusError(f"{run} is a bundle build's work folder: its federations are "
                                 f"{', '.join(str(run / f) for f in feds)} (pass one of them); "
                                 "`medfedpure bundle build … --dry-run` lists the build's steps done and to run")
        raise RunStatusError(f"{run} is not a federated run folder: no config.json with a 'fed' section "
                             "(written by medfedpure fed sim | deploy and by each federation of bundle build)")
    cfg = FedConfig(**raw["fed"])
    state = _read_json(run / CHECKPOINT_DIR / "state.json")
    metrics = _read_json(run / "metrics.json")
    paused = _read_json(run / PAUSED_FILE)
    finished = bool(metrics and "wall_s" in metrics and state is None)
    done: dict[str, Any] = dict((metrics if finished else state or {}).get("phases" if finished else "phases_done", {}))
    phases = []
    for name in cfg.phases:
        entry: dict[str, Any] = {"phase": name, "rounds": cfg.rounds_of(name)}
        if name in done:
            p = done[name]
            last, sites = _last_round_by_site(p.get("per_site", []))
            entry.update(state="done", rounds_done=cfg.rounds_of(name), wall_s=float(p.get("wall_s", 0.0)), last_round=last,
                         sites=sites)
        elif state and state.get("phase") == name:
            n, wall = int(state["rounds_done"]), float(state.get("wall_s", 0.0))
            records = state.get("records", {})
            last, sites = _last_round_by_site(records.get("history", []))
            # The pace: the last rounds' own wall times where the run recorded them, else the phase's mean.
            recent = [float(v) for _, v in sorted(records.get("round_s", {}).items(), key=lambda kv: int(kv[0]))]
            recent = recent[-RECENT_ROUNDS:]
            per_round = sum(recent) / len(recent) if recent else (wall / n if n else None)
            entry.update(state="in progress", rounds_done=n, wall_s=wall, last_round=last, sites=sites,
                         seconds_per_round=per_round,
                         pace=f"last {len(recent)} round(s)" if recent else "mean so far",
                         estimate_left_s=None if per_round is None else per_round * (cfg.rounds_of(name) - n))
        else:
            entry.update(state="to do", rounds_done=0)
        phases.append(entry)
    if finished:
        where = "finished"
    elif paused:
        where = f"paused {paused.get('where', '')}: {paused.get('reason', '')}"
    elif state:
        at = f"phase {state['phase']!r} after round {state['rounds_done']}" if state.get("phase") else "between phases"
        where = f"checkpointed {at} (running, or stopped: a resumed run continues there)"
    else:
        where = "no round finished yet"
    request = None if finished or paused else pause_requested(run)
    if request is not None:
        where += f"; pause requested at {request.get('requested_at', 'unknown')} (taken after the current round)"
    segments = (metrics if finished else state or {}).get("segments", [])
    return {"run": str(run), "where": where, "finished": finished, "paused": paused, "pause_requested": request,
            "phases": phases, "segments": segments, "saved_at": (state or {}).get("saved_at")}


def work_status(work: str | Path) -> dict[str, Any]:
    """The status of every federation of a bundle build's work folder (``WORK/fed_*``), in the order they started
    (those not started yet last): ``{"work": …, "federations": [run_status(fed), …]}``.

    Raises:
        RunStatusError: ``work`` holds no federation's run folder.
    """
    work = Path(work)
    feds = [p for p in work.glob("fed_*") if (p / "config.json").is_file()]
    if not feds:
        raise RunStatusError(f"{work} is neither a federated run folder nor a bundle build's work folder with "
                             "federations (WORK/fed_*/config.json)")
    statuses = [run_status(p) for p in feds]

    def started(st: dict[str, Any]) -> tuple[int, str, str]:
        first = st["segments"][0].get("started_at", "") if st["segments"] else ""
        return (0, first, st["run"]) if first else (1, "", st["run"])

    return {"work": str(work), "federations": sorted(statuses, key=started)}


def request_run_pause(run: str | Path, by: str = "") -> list[tuple[Path, str]]:
    """Ask the federated simulation in ``run`` to pause after its current round; on a bundle build's work folder,
    every federation of it that has not finished (the build runs one at a time). → (run folder, its last round
    checkpoint) for each request written.

    Raises:
        RunStatusError: not a run folder (or a work folder with federations), a run that finished or is paused
            already, or a run of the deployment runtime (it cannot pause).
    """
    run = Path(run)
    raw = _read_json(run / "config.json")
    if raw is not None and "fed" in raw:
        targets = {run: run_status(run)}
    else:
        feds = sorted(p for p in run.glob("fed_*") if (p / "config.json").is_file())
        if not feds:
            run_status(run)  # raises the error that names what the folder is
        statuses = {p: run_status(p) for p in feds}
        targets = {p: st for p, st in statuses.items() if not st["finished"]}  # finished ones are left alone
        if not targets:
            raise RunStatusError(f"every federation in {run} has finished ({', '.join(p.name for p in feds)}): "
                                 "nothing to pause")
    asked = []
    for target, st in targets.items():
        cfg = FedConfig(**json.loads((target / "config.json").read_text())["fed"])
        if not cfg.pause_on_request:
            raise RunStatusError(f"{target} runs on the deployment runtime, which cannot pause (its runs start afresh)")
        if st["finished"]:
            raise RunStatusError(f"{target} has finished: nothing to pause")
        if st["paused"]:
            raise RunStatusError(f"{target} is paused already ({st['where']})")
        from medfedpure.fed.checkpoint import request_pause

        request_pause(target, by)
        going = [p for p in st["phases"] if p["state"] == "in progress"]
        asked.append((target, f"phase {going[0]['phase']!r} after round {going[0]['rounds_done']}" if going else
                      "no round of a phase in progress yet"))
    return asked
