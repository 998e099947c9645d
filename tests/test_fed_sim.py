"""Federated runs end to end: the simulation runtime and the deployment runtime (SuperLink + SuperNodes)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from fed_helpers import tiny_fed_data
from medfedpure.fed import procs
from medfedpure.fed.config import FedConfig
from medfedpure.fed.deploy import write_app

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


RAY_FLOWER = ("raylet", "gcs_server", "ray::", "flower-", "flwr-")
FLOWER = ("flower-", "flwr-")  # the deployment runtime starts no Ray: another test's simulation is no leftover of it


def _marker(pid: int) -> bytes | None:
    """The run marker in ``pid``'s environment (None when it carries none or cannot be read)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    marks = [e for e in env if e.startswith(procs.MARKER.encode() + b"=")]
    return marks[0] if marks else None


def _parent(pid: int, table: dict[int, procs.ProcInfo] | None = None) -> int:
    info = (procs.process_table() if table is None else table).get(pid)
    return info.ppid if info is not None else 0


def _other_run(pid: int, token: str) -> bool:
    """True when ``pid`` belongs to another federated run: it, or a process it descends from, carries a
    different run marker (Ray's agents are the raylet's children, and their environment does not always
    read back with the marker)."""
    mine = f"{procs.MARKER}={token}".encode()
    table = procs.process_table()
    for _ in range(64):
        mark = _marker(pid)
        if mark is not None:
            return mark != mine
        pid = _parent(pid, table)
        if pid <= 1:
            return False
    return False


def _new_flower_ray_pids(before: set[int], token: str, words: tuple[str, ...] = RAY_FLOWER) -> set[int]:
    """Ray / Flower processes that appeared since ``before`` and are still there ten seconds later, other federated
    runs excepted. (Another test's run on the other xdist worker starts and ends processes meanwhile: one listed by
    ``ps`` that exits before its environment is read looks unmarked, and Ray's agents take seconds to go once their
    raylet has; a leftover of this run stays.)"""

    def new() -> set[int]:
        return {p for p in _flower_ray_pids(words) - before if not _other_run(p, token)}

    found = new()
    for _ in range(5):
        if not found:
            break
        time.sleep(2.0)
        found &= new()
    return found


def _describe(pids: set[int]) -> str:
    """Each pid's command line, parent, state, environment size and run marker, for an assertion message."""
    out = []
    for pid in sorted(pids):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:80]
            env = Path(f"/proc/{pid}/environ").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            mark = [e.decode() for e in env.split(b"\0") if e.startswith(procs.MARKER.encode() + b"=")]
        except OSError as exc:
            out.append(f"{pid}: ({exc})")
            continue
        out.append(f"{pid}: {args} parent={_parent(pid)} state={state} environ={len(env)} B marker={mark}")
    return "; ".join(out)


def _flower_ray_pids(words: tuple[str, ...] = RAY_FLOWER) -> set[int]:
    """This user's live ray / flower processes (by command line)."""
    out = subprocess.run(["ps", "-u", str(os.getuid()), "-o", "pid=,stat=,args="],
                         capture_output=True, text=True).stdout
    pids = set()
    for line in out.splitlines():
        pid, stat, args = line.strip().split(None, 2)
        if "Z" not in stat and any(w in args for w in words):
            pids.add(int(pid))
    return pids


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_fed_data(tmp_path_factory, "fed_sim_data", sites=2)


def test_config_validation_and_run_config_roundtrip(tmp_path: Path) -> None:
    cfg = FedConfig(data_dir="d", out_dir="o", rounds=2, strategy="krum", phases="classifier,mae",
                    max_update_norm=math.inf, num_sites=3)
    assert cfg.phases == ("classifier", "mae")
    back = FedConfig.from_run_config(cfg.to_run_config())
    assert back == cfg
    for bad, match in (({"strategy": "fedsgd"}, "strategy"), ({"phases": ("mae", "classifier")}, "order"),
                       ({"preset": "large"}, "preset"), ({"rounds": 0}, "rounds"), ({"classifier_split": "none"}, "split"),
                       ({"poison_site": 5}, "poison_site"), ({"image_size": 50}, "image_size")):
        with pytest.raises(ValueError, match=match):
            FedConfig(data_dir="d", out_dir="o", **bad)
    with pytest.raises(ValueError, match="student_steps=3"):
        FedConfig(data_dir="d", out_dir="o", student_steps=3)
    with pytest.raises(ValueError, match="purify range"):
        FedConfig(data_dir="d", out_dir="o", purify_t_min=300, purify_t_max=200)
    with pytest.raises(ValueError, match="unknown run config key 'round'"):
        FedConfig.from_run_config({"round": 3, "data-dir": "d", "out-dir": "o"})
    # The generated Flower App carries the same config.
    app = write_app(cfg, tmp_path / "app")
    toml = tomllib.loads((app / "pyproject.toml").read_text())
    comps = toml["tool"]["flwr"]["app"]["components"]
    assert comps == {"serverapp": "medfedpure_fedapp.server:app", "clientapp": "medfedpure_fedapp.client:app"}
    assert FedConfig.from_run_config(toml["tool"]["flwr"]["app"]["config"]) == cfg


@pytest.mark.slow
def test_simulation_end_to_end(tiny_data: Path, tmp_path: Path) -> None:
    """All phases + calibration on 2 tiny sites, 2 rounds (the MAE 1): run folder, finite metrics, no process left."""
    from medfedpure.fed.sim import run_sim
    from medfedpure.models.weights import load_model

    before = _flower_ray_pids()
    out = tmp_path / "run"
    # K = 2 is not the default: it reaches the student's metadata only through the run config.
    cfg = FedConfig(data_dir=str(tiny_data), out_dir=str(out), rounds=2, mae_rounds=1, num_sites=2, max_train=8,
                    student_steps=2)
    m = run_sim(cfg, progress=False, timeout_s=600)

    for name in ("config.json", "metrics.json", "fed_metrics.png", "mae.safetensors", "teacher.safetensors",
                 "student.safetensors", "classifier_global.safetensors"):
        assert (out / name).is_file(), name
    for k in range(2):
        assert (out / f"site_{k}" / "classifier.safetensors").is_file()
        calib = json.loads((out / f"site_{k}" / "calibration.json").read_text())
        assert math.isfinite(calib["tau"]) and calib["tau_high"] > calib["tau"] and calib["schedule_source"] == "student checkpoint"
    assert set(m["phases"]) == {"classifier", "mae", "teacher", "student"} and set(m["calibration"]) == {"0", "1"}
    for phase, p in m["phases"].items():
        rows = p["per_site"]
        rounds = (1,) if phase == "mae" else (1, 2)
        assert p["rounds"] == len(rounds) and sorted(int(r) for r in p["round_s"]) == list(rounds), phase
        assert {(r["round"], r["kind"], r["site"]) for r in rows} == {
            (r, k, s) for r in rounds for k in ("train", "evaluate") for s in (0, 1)}, phase
        assert not p["rejected"] and not p["errors"]
        for r in rows:
            vals = [v for k, v in r.items() if isinstance(v, float)]
            assert vals and all(math.isfinite(v) for v in vals), (phase, r)
    acc = [r["test_accuracy"] for r in m["phases"]["classifier"]["per_site"] if r["kind"] == "evaluate"]
    assert all(0.0 <= a <= 1.0 for a in acc)

    # Per-site classifiers share the global expert exactly and differ in their local parts.
    m0, _, meta0 = load_model(out / "site_0" / "classifier.safetensors")
    m1, _, _ = load_model(out / "site_1" / "classifier.safetensors")
    g0, g1 = m0.global_state_dict(), m1.global_state_dict()
    assert all(np.array_equal(g0[k].numpy(), g1[k].numpy()) for k in g0)
    assert not np.array_equal(m0.state_dict()["gate.0.weight"].numpy(), m1.state_dict()["gate.0.weight"].numpy())
    assert meta0["site"] == 0 and meta0["federated"] is True
    student_meta = load_model(out / "student.safetensors")[2]
    assert (student_meta["steps"], student_meta["t_min"], student_meta["t_max"]) == (2, 60, 200)

    assert m["leftover_pids"] == [] and procs.marked_pids(m["proc_token"]) == []
    left = _new_flower_ray_pids(before, m["proc_token"])
    assert left == set(), _describe(left)


@pytest.mark.slow
def test_deployment_runtime_two_sites_one_round(tiny_data: Path, tmp_path: Path) -> None:
    """SuperLink + 2 SuperNodes on 127.0.0.1, `flwr run`, 1 round of the classifier; everything stopped."""
    from medfedpure.fed.deploy import run_deployment

    before = _flower_ray_pids(FLOWER)
    out = tmp_path / "dep"
    cfg = FedConfig(data_dir=str(tiny_data), out_dir=str(out), rounds=1, num_sites=2, max_train=8,
                    phases=("classifier",), calibrate=False)
    m = run_deployment(cfg, timeout_s=400)
    p = m["phases"]["classifier"]
    assert sorted((r["kind"], r["site"]) for r in p["per_site"]) == [("evaluate", 0), ("evaluate", 1),
                                                                      ("train", 0), ("train", 1)]
    assert not p["rejected"] and not p["errors"]
    for k in range(2):
        assert (out / f"site_{k}" / "classifier.safetensors").is_file()
        assert (out / f"site_{k}" / "classifier_local.safetensors").is_file()
    assert (out / "classifier_global.safetensors").is_file() and not (out / "server_error.txt").exists()
    assert m["deploy_wall_s"] > 0 and m["leftover_pids"] == [] and procs.marked_pids(m["proc_token"]) == []
    left = _new_flower_ray_pids(before, m["proc_token"], FLOWER)
    assert left == set(), _describe(left)


def test_sigterm_runs_cleanup_and_stops_marked_processes(tmp_path: Path) -> None:
    """A run killed with SIGTERM still stops every process carrying its marker (the `trap`)."""
    import signal
    import sys
    import time

    token = procs.new_token()
    script = tmp_path / "runner.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "from pathlib import Path\n"
        "from medfedpure.fed import procs\n"
        f"token = {token!r}\n"
        "env = procs.run_env(token, Path(sys.argv[1]))\n"
        "with procs.exit_on_signals():\n"
        "    try:\n"
        "        subprocess.Popen(['sleep', '120'], env=env, start_new_session=True)\n"
        "        print('ready', flush=True)\n"
        "        time.sleep(120)\n"
        "    finally:\n"
        "        print('left', procs.stop_marked(token), flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / ".flwr")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 10
    while not procs.marked_pids(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(procs.marked_pids(token)) == 1  # the detached `sleep`
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    assert out.strip() == "left []"
    assert procs.marked_pids(token) == []


def test_run_processes_stop_a_descendant_whose_environment_lost_the_marker(tmp_path: Path) -> None:
    """A marked process's child started with an empty environment (as a process whose environment reads
    back without the marker) is missed by the marker and stopped by ``RunProcesses`` all the same; a process
    outside the run is left alone."""
    import sys
    import time

    token = procs.new_token()
    env = procs.run_env(token, tmp_path / ".flwr")
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys; subprocess.Popen(['env', '-i', 'sleep', '120']); "
         "print('ready', flush=True); sys.stdin.read()"],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    outsider = subprocess.Popen(["sleep", "120"])
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
        run = procs.RunProcesses(token)
        deadline = time.monotonic() + 10
        child = None
        # until the child runs `sleep`: before `env -i` has exec'd it, the child still carries the parent's environment
        while child is None and time.monotonic() < deadline:
            run.poll()
            for pid in set(run.alive()) - {parent.pid}:
                try:
                    if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == b"sleep":
                        child = pid
                except OSError:
                    pass
            time.sleep(0.05)
        assert child is not None and set(run.alive()) == {parent.pid, child}
        assert procs.marked_pids(token) == [parent.pid]
        assert _marker(child) is None and _parent(child) == parent.pid
        # The parent goes first (its child is re-parented and keeps running): only the tracker still knows the child.
        parent.kill()
        parent.wait(timeout=10)
        assert procs.marked_pids(token) == [] and run.alive() == [child]
        assert run.stop(grace_s=5.0) == []
        assert not Path(f"/proc/{child}").exists() or Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        assert outsider.poll() is None  # not the run's
    finally:
        parent.kill()
        outsider.kill()
        outsider.wait()
