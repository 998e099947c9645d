"""Processes a federated run starts, found again and stopped — nothing is left behind.

Every process a run starts (the simulation worker, Ray's raylet / GCS / workers, SuperLink,
SuperNodes, their ClientApp and ServerApp subprocesses) inherits the environment variable
``MEDFEDPURE_FED_RUN=<token>`` with a fresh random token. After the run, :func:`stop_marked` finds
every process of this user whose environment carries that token (``/proc/<pid>/environ``) and
stops it (SIGTERM, then SIGKILL after a grace period). Processes that re-parent themselves to
init (Ray daemons do) are found all the same; processes of other runs are never touched.
:class:`RunProcesses` also remembers, while the run goes on, every descendant of a marked process,
so one whose environment reads without the marker when the run ends is stopped all the same.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

MARKER = "MEDFEDPURE_FED_RUN"

# Environment for every Flower / Ray process of a run: no runtime dependency installs, quiet logs.
QUIET_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ORT_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def new_token() -> str:
    return secrets.token_hex(8)


def run_env(token: str, flwr_home: Path) -> dict[str, str]:
    """``os.environ`` plus the quiet settings, ``FLWR_HOME`` and the run's marker."""
    env = dict(os.environ)
    env.update(QUIET_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    env[MARKER] = token
    return env


class ProcInfo(NamedTuple):
    """One row of :func:`process_table`."""

    ppid: int
    start: str  # start time in clock ticks since boot: with the pid, names one process for good
    state: str
    marked: bool  # its environment carries the run's marker


def process_table(token: str | None = None) -> dict[int, ProcInfo]:
    """This user's live processes in one walk of ``/proc``: pid → parent, start time, state and whether
    the environment carries ``MARKER=token`` (never, without a token)."""
    needle = f"{MARKER}={token}".encode() if token is not None else None
    uid = os.getuid()
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if d.stat().st_uid != uid:
                continue
            # After the command name: state, ppid, …; the start time is field 22 of stat (index 19 here).
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        marked = False
        if needle is not None:
            try:  # an unreadable environment is an unmarked process, still one of the table (and a descendant)
                marked = needle in (d / "environ").read_bytes().split(b"\0")
            except OSError:
                pass
        out[int(d.name)] = ProcInfo(int(fields[1]), fields[19], fields[0], marked)
    return out


def marked_pids(token: str, cmd_contains: str = "") -> list[int]:
    """PIDs of this user's live processes whose environment carries ``MARKER=token``
    (and whose command line contains ``cmd_contains``, when given)."""
    return _marked(process_table(token), cmd_contains)


def _marked(table: dict[int, ProcInfo], cmd_contains: str = "") -> list[int]:
    """The marked live processes of ``table`` (zombies hold nothing: their parent reaps them), this one excepted."""
    me = os.getpid()
    pids = []
    for pid, proc in table.items():
        if pid == me or not proc.marked or proc.state == "Z":
            continue
        if cmd_contains:
            try:
                if cmd_contains.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    continue
            except OSError:
                continue
        pids.append(pid)
    return sorted(pids)


def _stop(alive: Callable[[], list[int]], grace_s: float) -> list[int]:
    """SIGTERM to every pid ``alive()`` names, SIGKILL after ``grace_s`` to those still there; the survivors."""
    pids = alive()
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            pids = alive()
            if not pids:
                break
            time.sleep(0.1)
    return alive()


def stop_marked(token: str, grace_s: float = 5.0) -> list[int]:
    """Stop every process carrying the token; returns the PIDs still alive afterwards (normally [])."""
    return _stop(lambda: marked_pids(token), grace_s)


class RunProcesses:
    """The processes of one run: those carrying its marker, and every descendant of one of them seen
    while the run went on (``poll`` it now and then).

    The marker alone can miss a process: one whose environment reads back without it at the moment of the
    check looks like no process of the run (CI once saw the raylet's agents, ``ray::DashboardAgent`` and
    ``ray::RuntimeEnvAgent``, alive and unmarked after a run had stopped everything marked). A descendant is
    remembered by pid and start time, so a pid the system hands to another process later is never stopped.
    """

    def __init__(self, token: str) -> None:
        self.token = token
        self.seen: dict[int, str] = {}  # pid → start time

    def poll(self) -> None:
        """Remember the marked processes and their descendants as they are now."""
        table = process_table(self.token)
        children: dict[int, list[int]] = {}
        for pid, proc in table.items():
            children.setdefault(proc.ppid, []).append(pid)
        todo = _marked(table)
        while todo:
            pid = todo.pop()
            if self.seen.get(pid) == table[pid].start:
                continue
            self.seen[pid] = table[pid].start
            todo.extend(children.get(pid, []))

    def alive(self) -> list[int]:
        """The run's processes still running (zombies excepted), marked or remembered."""
        table = process_table(self.token)
        remembered = {p for p, start in self.seen.items()
                      if p in table and table[p].start == start and table[p].state != "Z"}
        return sorted((remembered | set(_marked(table))) - {os.getpid()})

    def stop(self, grace_s: float = 5.0) -> list[int]:
        """Stop every process of the run; returns the PIDs still alive afterwards (normally [])."""
        self.poll()
        return _stop(self.alive, grace_s)


@contextmanager
def exit_on_signals() -> Iterator[None]:
    """Turn SIGTERM / SIGHUP into ``SystemExit`` while the block runs (the shell's ``trap``).

    Python's default SIGTERM action ends the process without running ``finally`` blocks, which
    would orphan the SuperLink, SuperNodes or Ray daemons of a run; as an exception, the caller's
    cleanup runs. Only installed from the main thread (signal handlers cannot be set elsewhere).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    old = {sig: signal.signal(sig, _raise) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def stop_groups(procs: Iterable[subprocess.Popen], grace_s: float = 10.0) -> None:
    """Stop the process groups of ``procs`` (each started with ``start_new_session=True``).

    SIGTERM to every group still running, in the given order, then wait for each; a group that
    outlives ``grace_s`` gets SIGKILL. Processes that left their group are for :func:`stop_marked`.
    """
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
