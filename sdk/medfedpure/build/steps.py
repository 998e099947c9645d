"""A resumable runner of pipeline steps: each step timed, logged and recorded in one JSON file.

A step names its inputs (the options it depends on, JSON-ready), its outputs (files) and the steps
it comes after. Its *key* hashes its inputs with the keys of the steps it comes after, so a changed
option reaches every step downstream. The rule, decided for all steps before any runs:

- a step runs when it has no recorded run, when its key differs from the recorded one (the
  options that changed are named), when one of its outputs is missing, when it has no outputs
  (checks and installs: always run), or when a step it comes after runs;
- otherwise it is skipped and its recorded result stands.

The record (``state_path``, e.g. ``WORK/bundle_metrics.json``) holds per step ``key``, ``inputs``,
``seconds``, ``result`` and ``finished_utc`` under ``"steps"``, and ``"step_seconds"``; other
top-level entries of the file are kept. A step's record is removed before it runs and written when
it succeeds, so an interrupted or failed step never passes for done.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Step", "Decision", "StepsReport", "step_keys", "plan_steps", "run_steps", "read_record"]


@dataclass(frozen=True)
class Step:
    """One pipeline step.

    Attributes:
        name: unique within a pipeline.
        run: does the work; returns a JSON-ready result (recorded) or None.
        inputs: the options the step's outputs depend on (JSON-ready values).
        outputs: files the step writes; empty means the step always runs.
        after: names of earlier steps whose outputs this one reads.
    """

    name: str
    run: Callable[[], Mapping[str, Any] | None]
    inputs: Mapping[str, Any] = field(default_factory=dict)
    outputs: tuple[Path, ...] = ()
    after: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    """Whether a step runs, and why (``reason`` is meant for a log line)."""

    name: str
    run: bool
    reason: str
    key: str


@dataclass(frozen=True)
class StepsReport:
    """What :func:`run_steps` decided and did: decisions in step order, results and seconds per step."""

    decisions: tuple[Decision, ...]
    results: dict[str, Any]
    seconds: dict[str, float]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def step_keys(steps: Sequence[Step]) -> dict[str, str]:
    """Key of each step: a hash of its inputs and of the keys of the steps it comes after."""
    keys: dict[str, str] = {}
    for s in steps:
        unknown = [a for a in s.after if a not in keys]
        if unknown:
            raise ValueError(f"step {s.name!r} comes after {unknown}, which are not earlier steps: reorder the steps")
        if s.name in keys:
            raise ValueError(f"step name {s.name!r} is used twice: names must be unique")
        keys[s.name] = _digest({"inputs": dict(s.inputs), "after": {a: keys[a] for a in s.after}})
    return keys


def read_record(state_path: Path) -> dict[str, Any]:
    """The JSON object at ``state_path`` ({} when the file does not exist)."""
    path = Path(state_path)
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): remove it to rebuild every step") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{path} does not hold a JSON object: remove it to rebuild every step")
    return doc


def plan_steps(steps: Sequence[Step], record: Mapping[str, Any]) -> list[Decision]:
    """Decide, for every step in order, whether it runs (the rule in the module docstring)."""
    keys = step_keys(steps)
    done = record.get("steps", {}) if isinstance(record.get("steps"), dict) else {}
    runs: set[str] = set()
    out = []
    for s in steps:
        rec = done.get(s.name)
        missing = [p for p in s.outputs if not Path(p).exists()]
        upstream = [a for a in s.after if a in runs]
        if not s.outputs:
            reason = "no outputs to reuse"
        elif rec is None:
            reason = "no recorded run"
        elif rec.get("key") != keys[s.name]:
            old = rec.get("inputs", {})
            changed = sorted(k for k in set(old) | set(s.inputs) if old.get(k) != s.inputs.get(k))
            reason = f"inputs changed: {', '.join(changed)}" if changed else "an earlier step's inputs changed"
        elif missing:
            reason = f"outputs missing: {', '.join(Path(p).name for p in missing)}"
        elif upstream:
            reason = f"reruns after {', '.join(upstream)}"
        else:
            out.append(Decision(s.name, False, "outputs present, inputs unchanged", keys[s.name]))
            continue
        runs.add(s.name)
        out.append(Decision(s.name, True, reason, keys[s.name]))
    return out


def _write_record(path: Path, doc: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True, default=float))
    tmp.replace(path)


def run_steps(steps: Sequence[Step], state_path: str | Path, *, dry_run: bool = False,
              log: Callable[[str], None] = print) -> StepsReport:
    """Run the steps that need it, in order; skip the others (their recorded results stand).

    With ``dry_run`` nothing runs and nothing is written: the report holds the decisions only.
    A step that raises stops the pipeline (the exception propagates, its record stays removed).
    """
    state_path = Path(state_path)
    record = read_record(state_path)
    decisions = plan_steps(steps, record)
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    n = len(steps)
    if dry_run:
        for i, (s, d) in enumerate(zip(steps, decisions, strict=True), 1):
            log(f"[{i}/{n}] {s.name}: {'would run' if d.run else 'would skip'} ({d.reason})")
        return StepsReport(tuple(decisions), results, seconds)
    record.setdefault("steps", {})
    record.setdefault("step_seconds", {})
    for i, (s, d) in enumerate(zip(steps, decisions, strict=True), 1):
        if not d.run:
            rec = record["steps"][s.name]
            results[s.name] = rec.get("result")
            seconds[s.name] = float(rec.get("seconds", 0.0))
            log(f"[{i}/{n}] {s.name}: skipped ({d.reason}; took {seconds[s.name]:.1f} s when it ran)")
            continue
        log(f"[{i}/{n}] {s.name}: running ({d.reason})")
        record["steps"].pop(s.name, None)
        record["step_seconds"].pop(s.name, None)
        _write_record(state_path, record)
        t0 = time.perf_counter()
        result = s.run()
        dt = time.perf_counter() - t0
        result = dict(result) if result is not None else None
        results[s.name], seconds[s.name] = result, dt
        record["steps"][s.name] = {
            "key": d.key, "inputs": dict(s.inputs), "seconds": round(dt, 3), "result": result,
            "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        record["step_seconds"][s.name] = round(dt, 3)
        _write_record(state_path, record)
        log(f"[{i}/{n}] {s.name}: done in {dt:.1f} s")
    return StepsReport(tuple(decisions), results, seconds)
