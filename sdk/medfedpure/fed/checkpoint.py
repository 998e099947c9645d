"""Round checkpoints of a federated run: where a paused or interrupted run resumes.

After every round the server writes ``RUN/resume/``: the travelling tensors it just aggregated
(``global.safetensors``) and ``state.json`` — the run's identity (a hash of its config without the
settings that do not change its result: threads, device, round timeout, pacing), its run token, the
phases already finished (their metrics), the phase in progress with its rounds done, the per-site
records so far and the wall time spent. Each site keeps its own part the same way (its local expert,
gate and optimizer state, ``SITE/<phase>_{local,optim}.safetensors`` with the round they were written
in, and the round before). A run started with ``resume`` (``fed sim --resume``; the bundle build always)
reads the checkpoint, keeps the run token, so that every site restores its own state, and continues
with the next round: the sites' schedules, seeds and robust-selection draws are keyed by the global
round, so the resumed run computes what the uninterrupted one would (tested bit for bit on the CPU).
A checkpoint of another config is ignored (logged) and the run starts afresh; a run that finishes
removes its checkpoint.

A run may also stop itself at a round boundary (``FedConfig.pause_after_s`` / ``pause_after_rounds``):
it checkpoints, writes ``RUN/paused.json`` and exits; the runner raises :class:`FederationPaused`.
That is how a long build proceeds in slices on a machine lent for minutes at a time. A running
simulation also pauses after its current round when asked to (:func:`request_pause`, ``medfedpure fed
pause RUN``: the file ``RUN/pause_request.json``, consumed by the pause; a run that starts clears a
stale one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfedpure.fed.config import FedConfig

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

LOG = logging.getLogger("medfedpure.fed")

CHECKPOINT_DIR = "resume"
PAUSED_FILE = "paused.json"
PAUSE_REQUEST_FILE = "pause_request.json"
# Settings that change how (or how fast) a run computes, not what it computes.
NOT_IDENTITY = ("threads", "device", "round_timeout_s", "pause_after_s", "pause_after_rounds", "pause_on_request")
# Settings added after runs were checkpointed: part of the identity only when set, so those runs still resume.
IDENTITY_WHEN_SET = {"mae_rounds": 0}
_FORMAT = 1


def identity(cfg: FedConfig) -> str:
    """The hash that ties a checkpoint to a config (every field but :data:`NOT_IDENTITY`; those of
    :data:`IDENTITY_WHEN_SET` only when not at their default)."""
    d = {k: v for k, v in cfg.to_dict().items()
         if k not in NOT_IDENTITY and not (k in IDENTITY_WHEN_SET and v == IDENTITY_WHEN_SET[k])}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Checkpoint:
    """What the server knows after a round (``phase``, ``rounds_done``) or between phases (``phase == ""``).

    ``phases_done``: ``metrics["phases"]`` of every finished phase. ``records``: the strategy's
    ``history``, ``rejected`` and ``errors`` lists and its aggregated ``train`` / ``evaluate`` metrics
    (keyed by the phase's round) of the phase in progress. ``wall_s``: that phase's wall time so far.
    ``segments``: one entry per run segment (where it started, how long it ran).
    """

    identity: str
    run_token: str
    phases_done: dict[str, Any] = field(default_factory=dict)
    phase: str = ""
    rounds_done: int = 0
    records: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    segments: list[dict[str, Any]] = field(default_factory=list)
    arrays: ArrayRecord | None = None

    def where(self) -> str:
        if self.phase:
            return f"phase {self.phase!r} after round {self.rounds_done}"
        done = ", ".join(self.phases_done) or "none"
        return f"between phases (finished: {done})"


def folder(out: Path) -> Path:
    return Path(out) / CHECKPOINT_DIR


def save(out: Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` under ``RUN/resume/``: the tensors first, then the state that names them (atomically)."""
    d = folder(out)
    d.mkdir(parents=True, exist_ok=True)
    state = {f.name: getattr(ckpt, f.name) for f in fields(ckpt) if f.name != "arrays"}
    state["format"] = _FORMAT
    state["saved_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if ckpt.arrays is not None:
        from medfedpure.models.weights import save_tensors

        tensors = {k: v.contiguous() for k, v in ckpt.arrays.to_torch_state_dict().items()}
        save_tensors(d / "global.safetensors", tensors, {"phase": ckpt.phase, "round": str(ckpt.rounds_done)})
        state["arrays_sha256"] = _sha256(d / "global.safetensors")
    tmp = d / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True, default=float))
    tmp.replace(d / "state.json")


def load(out: Path, cfg: FedConfig) -> Checkpoint | None:
    """The checkpoint under ``RUN/resume/`` when it belongs to ``cfg``; else ``None`` (logged).

    Raises:
        ValueError: the checkpoint is damaged (its tensors are not the ones its state names).
    """
    d = folder(out)
    path = d / "state.json"
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if state.get("format") != _FORMAT or state.get("identity") != identity(cfg):
        LOG.warning("ignoring the checkpoint in %s: it was written by a run of another config", d)
        return None
    arrays = None
    if state.get("arrays_sha256"):
        tensor_path = d / "global.safetensors"
        if not tensor_path.is_file() or _sha256(tensor_path) != state["arrays_sha256"]:
            raise ValueError(f"the checkpoint in {d} is damaged: global.safetensors is missing or not the one "
                             "state.json names; delete the folder to start the run afresh")
        from flwr.app import ArrayRecord

        from medfedpure.models.weights import load_tensors

        tensors = load_tensors(tensor_path)
        arrays = ArrayRecord({k: tensors[k] for k in sorted(tensors)})
    known = {k: state[k] for k in ("identity", "run_token", "phases_done", "phase", "rounds_done", "records",
                                   "wall_s", "segments") if k in state}
    return Checkpoint(**known, arrays=arrays)


def clear(out: Path) -> None:
    """Remove ``RUN/resume/`` (a finished run, or one that must start afresh)."""
    shutil.rmtree(folder(out), ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Paused(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """Raised inside the server's round loop when the run's pacing says stop after this round."""


def request_pause(out: Path, by: str = "") -> dict[str, Any]:
    """Ask the run in ``out`` to pause after its current round (writes ``RUN/pause_request.json``); → the request."""
    req = {"requested_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "by": by}
    tmp = Path(out) / (PAUSE_REQUEST_FILE + ".tmp")
    tmp.write_text(json.dumps(req))
    tmp.replace(Path(out) / PAUSE_REQUEST_FILE)
    return req


def pause_requested(out: Path) -> dict[str, Any] | None:
    """The pending pause request of the run in ``out`` (``None``: none; an unreadable file still counts)."""
    path = Path(out) / PAUSE_REQUEST_FILE
    if not path.is_file():
        return None
    try:
        req = json.loads(path.read_text())
    except (OSError, ValueError):
        req = None
    return req if isinstance(req, dict) else {"requested_at": "unknown"}


def clear_request(out: Path) -> None:
    (Path(out) / PAUSE_REQUEST_FILE).unlink(missing_ok=True)


class Pacer:
    """Counts this segment's rounds and seconds against ``pause_after_rounds`` / ``pause_after_s`` (0: never),
    and watches for a pause request (``cfg.pause_on_request``)."""

    def __init__(self, cfg: FedConfig) -> None:
        self.max_rounds = int(cfg.pause_after_rounds)
        self.max_s = float(cfg.pause_after_s)
        self.out = Path(cfg.out_dir) if cfg.pause_on_request else None
        self.rounds = 0
        self.t0 = time.monotonic()

    def tick(self) -> None:
        self.rounds += 1

    def due(self) -> str:
        """Why the run should pause now ("" when it should go on; never before this segment's first round)."""
        if not self.rounds:
            return ""
        if self.max_rounds and self.rounds >= self.max_rounds:
            return f"{self.rounds} round(s) run in this segment (pause_after_rounds={self.max_rounds})"
        elapsed = time.monotonic() - self.t0
        if self.max_s and elapsed >= self.max_s:
            return f"{elapsed:.0f} s run in this segment (pause_after_s={self.max_s:g})"
        req = pause_requested(self.out) if self.out is not None else None
        if req is not None:
            by = f" by {req['by']}" if req.get("by") else ""
            return f"pause requested{by} at {req.get('requested_at', 'unknown')}"
        return ""


def write_paused(out: Path, ckpt: Checkpoint, reason: str) -> None:
    (Path(out) / PAUSED_FILE).write_text(json.dumps(
        {"where": ckpt.where(), "phase": ckpt.phase, "rounds_done": ckpt.rounds_done, "reason": reason}, indent=1))

