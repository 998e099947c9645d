"""``medfedpure fed status``: where a federated run stands, read from its folder."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from medfedpure.cli import app
from medfedpure.fed import checkpoint
from medfedpure.fed.config import FedConfig
from medfedpure.fed.status import RunStatusError, run_status, work_status
from typer.testing import CliRunner


def _rows(rnd: int, acc: float) -> list[dict]:
    return [{"phase": "classifier", "round": rnd, "kind": kind, "site": site, "node": 9, "train_s": 30.0 + site,
             **({"val_robust_accuracy": acc / 2} if kind == "train" else {"val_accuracy": acc, "test_accuracy": acc + site / 100})}
            for kind in ("train", "evaluate") for site in (0, 1)]


def _run(tmp_path: Path) -> tuple[Path, FedConfig]:
    run = tmp_path / "run"
    cfg = FedConfig(data_dir="d", out_dir=str(run), rounds=10, num_sites=2, phases=("classifier", "mae"))
    cfg.save(run / "config.json")
    return run, cfg


def test_a_run_in_progress_paused_and_finished(tmp_path: Path) -> None:
    run, cfg = _run(tmp_path)
    st = run_status(run)
    assert st["where"] == "no round finished yet" and [p["state"] for p in st["phases"]] == ["to do", "to do"]
    ckpt = checkpoint.Checkpoint(identity=checkpoint.identity(cfg), run_token="t", phase="classifier", rounds_done=4,
                                 records={"history": _rows(3, 0.6) + _rows(4, 0.7)}, wall_s=400.0,
                                 segments=[{"started_at": "x", "resumed_from": None}])
    checkpoint.save(run, ckpt)
    st = run_status(run)
    cls, mae = st["phases"]
    assert st["where"].startswith("checkpointed phase 'classifier' after round 4") and not st["finished"]
    assert (cls["state"], cls["rounds_done"], cls["last_round"], cls["seconds_per_round"]) == ("in progress", 4, 4, 100.0)
    assert cls["estimate_left_s"] == 600.0 and mae["state"] == "to do"
    assert cls["sites"] == {0: {"val_accuracy": 0.7, "test_accuracy": 0.7, "val_robust_accuracy": 0.35, "train_s": 30.0},
                            1: {"val_accuracy": 0.7, "test_accuracy": 0.71, "val_robust_accuracy": 0.35, "train_s": 31.0}}
    assert cls["pace"] == "mean so far"
    # a run that records each round's wall time is paced by its last three rounds (adversarial rounds are slower)
    timed = replace(ckpt, records={**ckpt.records, "round_s": {"1": 40.0, "2": 90.0, "3": 120.0, "4": 150.0}})
    checkpoint.save(run, timed)
    cls = run_status(run)["phases"][0]
    assert (cls["seconds_per_round"], cls["estimate_left_s"], cls["pace"]) == (120.0, 720.0, "last 3 round(s)")
    checkpoint.write_paused(run, ckpt, "3600 s run in this segment (pause_after_s=3600)")
    assert run_status(run)["where"] == ("paused phase 'classifier' after round 4: 3600 s run in this segment "
                                        "(pause_after_s=3600)")
    # finished: metrics.json with the run's wall time, no checkpoint
    checkpoint.clear(run)
    (run / "paused.json").unlink()
    phases = {name: {"wall_s": 50.0, "per_site": _rows(10, 0.9)} for name in ("classifier", "mae")}
    (run / "metrics.json").write_text(json.dumps({"phases": phases, "wall_s": 100.0, "segments": [{}, {}]}))
    st = run_status(run)
    assert st["finished"] and st["where"] == "finished" and len(st["segments"]) == 2
    assert [(p["state"], p["rounds_done"], p["wall_s"], p["last_round"]) for p in st["phases"]] == [
        ("done", 10, 50.0, 10), ("done", 10, 50.0, 10)]


def test_command_prints_tables_and_json_and_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    run, cfg = _run(tmp_path)
    checkpoint.save(run, checkpoint.Checkpoint(identity=checkpoint.identity(cfg), run_token="t", phase="classifier",
                                               rounds_done=4, records={"history": _rows(4, 0.7)}, wall_s=400.0))
    res = CliRunner().invoke(app, ["fed", "status", str(run)])
    assert res.exit_code == 0, res.output
    assert "4 / 10" in res.output and "100 s" in res.output and "10 min" in res.output and "0.7100" in res.output
    res = CliRunner().invoke(app, ["fed", "status", str(run), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["phases"][0]["rounds_done"] == 4
    res = CliRunner().invoke(app, ["fed", "status", str(tmp_path)])
    assert res.exit_code == 2 and "not a federated run folder" in res.output
    work = tmp_path / "work"  # a bundle build's work folder: every federation, in the order they started
    (work / "fed_detector").mkdir(parents=True)  # not a federation yet: no config.json
    (work / "bundle_metrics.json").write_text("{}")
    with pytest.raises(RunStatusError, match="work folder with federations"):
        work_status(work)
    res = CliRunner().invoke(app, ["fed", "status", str(work)])
    assert res.exit_code == 2 and "not a federated run folder" in res.output
    for name in ("fed_cls_mae", "fed_purifier", "fed_detector"):
        replace(cfg, out_dir=str(work / name)).save(work / name / "config.json")
    with pytest.raises(RunStatusError, match="bundle build's work folder"):
        run_status(work)
    checkpoint.save(work / "fed_cls_mae", checkpoint.Checkpoint(
        identity=checkpoint.identity(cfg), run_token="t", phase="classifier", rounds_done=2,
        records={"history": _rows(2, 0.6)}, wall_s=200.0, segments=[{"started_at": "2026-12-07T21:22:35+0000"}]))
    (work / "fed_purifier" / "metrics.json").write_text(json.dumps({
        "phases": {n: {"wall_s": 50.0, "per_site": _rows(10, 0.9)} for n in ("classifier", "mae")}, "wall_s": 100.0,
        "segments": [{"started_at": "2026-12-07T21:04:13+0000"}]}))
    st = work_status(work)
    assert [Path(f["run"]).name for f in st["federations"]] == ["fed_purifier", "fed_cls_mae", "fed_detector"]
    assert [f["where"].split(" ")[0] for f in st["federations"]] == ["finished", "checkpointed", "no"]
    res = CliRunner().invoke(app, ["fed", "status", str(work)])
    assert res.exit_code == 0, res.output
    at = [res.output.index(f"fed_{n}: ") for n in ("purifier", "cls_mae", "detector")]
    assert at == sorted(at) and "2 / 10" in res.output and "10 / 10" in res.output
    res = CliRunner().invoke(app, ["fed", "status", str(work), "--json"])
    assert res.exit_code == 0 and [f["phases"][0]["rounds_done"] for f in json.loads(res.output)["federations"]] == [
        10, 2, 0]
    (run / "resume" / "state.json").write_text("{not json")
    with pytest.raises(RunStatusError, match="not readable JSON"):
        run_status(run)


def test_pause_request_is_written_shown_and_refused_where_nothing_can_pause(tmp_path: Path) -> None:
    run, cfg = _run(tmp_path)
    checkpoint.save(run, checkpoint.Checkpoint(identity=checkpoint.identity(cfg), run_token="t", phase="classifier",
                                               rounds_done=4, records={"history": _rows(4, 0.7)}, wall_s=400.0))
    res = CliRunner().invoke(app, ["fed", "pause", str(run)])
    assert res.exit_code == 0, res.output
    assert "pause requested; it stops after the round in progress (last checkpoint: phase 'classifier' after round 4)" \
        in res.output
    req = json.loads((run / checkpoint.PAUSE_REQUEST_FILE).read_text())
    assert set(req) == {"requested_at", "by"} and req["requested_at"]
    st = run_status(run)
    assert st["pause_requested"] == req and f"pause requested at {req['requested_at']}" in st["where"]
    # the pacer of the running server takes it after the round it is in (never before a first round) ...
    pacer = checkpoint.Pacer(cfg)
    assert pacer.due() == ""
    pacer.tick()
    assert pacer.due().startswith("pause requested") and req["requested_at"] in pacer.due()
    # ... unless the run cannot pause (the deployment runtime turns requests off)
    deployed = checkpoint.Pacer(replace(cfg, pause_on_request=False))
    deployed.tick()
    assert deployed.due() == ""
    checkpoint.clear_request(run)
    assert checkpoint.Pacer(cfg).due() == "" and run_status(run)["pause_requested"] is None

    # refused: a paused run, a finished run, a deployment run, a folder that is no run
    checkpoint.write_paused(run, checkpoint.load(run, cfg), "requested")
    res = CliRunner().invoke(app, ["fed", "pause", str(run)])
    assert res.exit_code == 2 and "is paused already" in res.output
    (run / checkpoint.PAUSED_FILE).unlink()
    replace(cfg, pause_on_request=False).save(run / "config.json")
    res = CliRunner().invoke(app, ["fed", "pause", str(run)])
    assert res.exit_code == 2 and "deployment runtime, which cannot pause" in res.output
    cfg.save(run / "config.json")
    checkpoint.clear(run)
    (run / "metrics.json").write_text(json.dumps({"phases": {}, "wall_s": 1.0}))
    res = CliRunner().invoke(app, ["fed", "pause", str(run)])
    assert res.exit_code == 2 and "has finished" in res.output
    res = CliRunner().invoke(app, ["fed", "pause", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and not (tmp_path / "nothing" / checkpoint.PAUSE_REQUEST_FILE).exists()
    assert not (run / checkpoint.PAUSE_REQUEST_FILE).exists()


def test_pause_on_a_build_work_folder_asks_its_unfinished_federation(tmp_path: Path) -> None:
    work = tmp_path / "work"
    for name, finished in (("fed_purifier", True), ("fed_cls_mae", False)):
        cfg = FedConfig(data_dir="d", out_dir=str(work / name), rounds=5, num_sites=2)
        cfg.save(work / name / "config.json")
        if finished:
            (work / name / "metrics.json").write_text(json.dumps({"phases": {}, "wall_s": 9.0}))
    res = CliRunner().invoke(app, ["fed", "pause", str(work)])
    assert res.exit_code == 0, res.output
    assert (work / "fed_cls_mae" / checkpoint.PAUSE_REQUEST_FILE).is_file()
    assert not (work / "fed_purifier" / checkpoint.PAUSE_REQUEST_FILE).exists()
    assert "fed_cls_mae: pause requested" in res.output and "fed_purifier" not in res.output
    (work / "fed_cls_mae" / "metrics.json").write_text(json.dumps({"phases": {}, "wall_s": 9.0}))
    res = CliRunner().invoke(app, ["fed", "pause", str(work)])
    assert res.exit_code == 2 and "every federation in" in res.output and "nothing to pause" in res.output
