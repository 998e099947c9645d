"""Round checkpoints: a paused or interrupted federation resumes where it stopped and computes what the
uninterrupted run computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fed_helpers import flower_message, tiny_fed_data
from flwr.app import ArrayRecord, Context, RecordDict
from medfedpure.cli import app
from medfedpure.fed import checkpoint, client_app, params
from medfedpure.fed.config import FedConfig
from medfedpure.fed.phases import build_model
from medfedpure.models.weights import load_tensors
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_fed_data(tmp_path_factory, "fed_resume", sites=2)


def test_identity_ignores_how_a_run_computes_and_a_damaged_checkpoint_is_refused(tmp_path: Path) -> None:
    cfg = FedConfig(data_dir="d", out_dir=str(tmp_path), rounds=3)
    same = FedConfig(data_dir="d", out_dir=str(tmp_path), rounds=3, threads=2, round_timeout_s=60.0,
                     pause_after_s=5.0, pause_after_rounds=1)
    assert checkpoint.identity(cfg) == checkpoint.identity(same)
    assert checkpoint.identity(cfg) != checkpoint.identity(FedConfig(data_dir="d", out_dir=str(tmp_path), rounds=4))
    arrays = ArrayRecord({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)})
    ckpt = checkpoint.Checkpoint(identity=checkpoint.identity(cfg), run_token="tok", phase="classifier",
                                 rounds_done=2, records={"history": [{"round": 1}]}, wall_s=1.5, arrays=arrays)
    checkpoint.save(tmp_path, ckpt)
    back = checkpoint.load(tmp_path, same)
    assert back is not None
    assert (back.run_token, back.phase, back.rounds_done, back.wall_s) == ("tok", "classifier", 2, 1.5)
    assert back.records == {"history": [{"round": 1}]} and back.where() == "phase 'classifier' after round 2"
    got = back.arrays.to_torch_state_dict()
    assert list(got) == ["a", "b"] and all(torch.equal(got[k], arrays.to_torch_state_dict()[k]) for k in got)
    # another config's checkpoint is ignored (the run starts afresh), a damaged one is an error
    assert checkpoint.load(tmp_path, FedConfig(data_dir="d", out_dir=str(tmp_path), rounds=4)) is None
    tensors = load_tensors(tmp_path / "resume" / "global.safetensors")
    tensors["b"] = torch.zeros(2)
    from medfedpure.models.weights import save_tensors

    save_tensors(tmp_path / "resume" / "global.safetensors", tensors, {})
    with pytest.raises(ValueError, match="damaged"):
        checkpoint.load(tmp_path, cfg)
    checkpoint.clear(tmp_path)
    assert checkpoint.load(tmp_path, cfg) is None
    for bad in ({"pause_after_s": -1.0}, {"pause_after_s": float("inf")}, {"pause_after_rounds": -2}):
        with pytest.raises(ValueError, match="pause_after"):
            FedConfig(data_dir="d", out_dir="o", **bad)


def test_mae_rounds_count_per_phase_and_enter_the_identity_only_when_set() -> None:
    cfg = FedConfig(data_dir="d", out_dir="o", rounds=3, phases=("classifier", "mae", "teacher"))
    fewer = FedConfig(data_dir="d", out_dir="o", rounds=3, mae_rounds=1, phases=("classifier", "mae", "teacher"))
    assert [cfg.rounds_of(p) for p in cfg.phases] == [3, 3, 3] and cfg.total_rounds == 9
    assert [fewer.rounds_of(p) for p in fewer.phases] == [3, 1, 3] and fewer.total_rounds == 7
    assert [fewer.rounds_before(p) for p in fewer.phases] == [0, 3, 4]
    # A run checkpointed before the option existed keeps its identity (this config's hash then and now); set, it
    # is another run.
    assert checkpoint.identity(FedConfig(data_dir="d", out_dir="o", rounds=3)) == "b9f9a7b00d0a8b5c"
    assert checkpoint.identity(FedConfig(data_dir="d", out_dir="o", rounds=3, mae_rounds=3)) != "b9f9a7b00d0a8b5c"
    assert checkpoint.identity(cfg) != checkpoint.identity(fewer)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="mae_rounds"):
            FedConfig(data_dir="d", out_dir="o", mae_rounds=bad)


def test_pacer_never_pauses_before_a_round() -> None:
    pacer = checkpoint.Pacer(FedConfig(data_dir="d", out_dir="o", pause_after_s=1e-9, pause_after_rounds=0))
    assert pacer.due() == ""
    pacer.tick()
    assert "pause_after_s" in pacer.due()
    rounds = checkpoint.Pacer(FedConfig(data_dir="d", out_dir="o", pause_after_rounds=2))
    rounds.tick()
    assert rounds.due() == ""
    rounds.tick()
    assert "pause_after_rounds=2" in rounds.due()
    assert checkpoint.Pacer(FedConfig(data_dir="d", out_dir="o")).due() == ""


def test_site_resumes_from_the_round_before_when_it_ran_ahead_of_the_server(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A site stored round 2 but the server checkpointed round 1 only: the resumed round 2 (Flower's round 1
    with round-offset 1) trains from the site's round-1 state, kept as ``*.prev.safetensors``."""
    model, _ = build_model("classifier", "tiny", seed=0, size=32)
    sent = params.get_travelling(model, "moe")
    run_config = FedConfig(data_dir=str(tiny_data), out_dir=str(tmp_path), preset="tiny", local_epochs=1, rounds=3,
                           seed=0, max_train=8, num_sites=1).to_run_config()
    conf = {"phase": "classifier", "split": "moe", "run-token": "run-A"}
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config=run_config)
    client_app.train(flower_message({**conf, "server-round": 1}, sent, monkeypatch), ctx)
    after_1 = {part: params.from_arrayrecord(ctx.state[f"classifier.{part}"]) for part in ("local", "optim")}
    reply_2 = client_app.train(flower_message({**conf, "server-round": 2}, sent, monkeypatch), ctx)
    site_dir = tmp_path / "site_0"
    for part in ("local", "optim"):
        assert params.load_local(site_dir / f"classifier_{part}.safetensors")[1]["round"] == 2
        prev, meta = params.load_local(site_dir / f"classifier_{part}.prev.safetensors")
        assert meta["round"] == 1 and all(torch.equal(prev[k], after_1[part][k]) for k in prev)
    # a fresh process (empty context.state) resumes: Flower's round 1 with round-offset 1 is round 2
    fresh = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config=run_config)
    msg = flower_message({**conf, "server-round": 1, "round-offset": 1}, sent, monkeypatch)
    site = client_app._Site(msg, fresh)
    assert site.round == 2
    restored = site.optimizer_state()
    assert restored is not None and all(torch.equal(restored[k], after_1["optim"][k]) for k in restored)
    again = client_app.train(msg, fresh)
    a, b = reply_2.content["arrays"].to_torch_state_dict(), again.content["arrays"].to_torch_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same round 2, bit for bit
    # the rerun round 2 overwrote the current file and kept round 1 as the one before
    assert params.load_local(site_dir / "classifier_local.prev.safetensors")[1]["round"] == 1


def _tensors(run: Path) -> dict[str, torch.Tensor]:
    out = {f"global.{k}": v for k, v in load_tensors(run / "classifier_global.safetensors").items()}
    out.update({f"mae.{k}": v for k, v in load_tensors(run / "mae.safetensors").items()})
    for k in (0, 1):
        out.update({f"site{k}.{n}": v for n, v in load_tensors(run / f"site_{k}" / "classifier.safetensors").items()})
    return out


def _records(metrics: dict) -> dict:
    return {(ph, r["round"], r["kind"], r["site"]): {k: v for k, v in r.items() if k not in ("node", "train_s")}
            for ph, p in metrics["phases"].items() for r in p["per_site"]}


@pytest.mark.slow
def test_paused_and_resumed_run_equals_the_uninterrupted_run(tiny_data: Path, tmp_path: Path) -> None:
    from medfedpure.fed.sim import FederationPaused, run_sim

    def cfg(out: Path, **kw: object) -> FedConfig:
        return FedConfig(data_dir=str(tiny_data), out_dir=str(out), rounds=3, num_sites=2, max_train=8,
                         phases=("classifier", "mae"), calibrate=False, **kw)

    whole = run_sim(cfg(tmp_path / "whole"), progress=False, timeout_s=600)
    assert not (tmp_path / "whole" / "resume").exists() and len(whole["segments"]) == 1

    run = tmp_path / "sliced"
    # 1: the command line pauses after the first round (every segment runs at least one round) ...
    res = CliRunner().invoke(app, ["fed", "sim", "--data", str(tiny_data), "--out", str(run), "--config", "tiny",
                                   "--rounds", "3", "--sites", "2", "--max-train", "8", "--phases", "classifier,mae",
                                   "--no-calibrate", "--pause-after", "0.001", "--timeout", "600"])
    assert res.exit_code == 75, res.output
    assert "paused phase 'classifier' after round 1" in res.output and "--resume" in res.output
    state = json.loads((run / "resume" / "state.json").read_text())
    assert (state["phase"], state["rounds_done"]) == ("classifier", 1)
    # 2: ... resumed, it runs classifier rounds 2-3 and pauses between the phases ...
    with pytest.raises(FederationPaused, match="between phases"):
        run_sim(cfg(run, pause_after_rounds=2), progress=False, timeout_s=600, resume=True)
    assert json.loads((run / "resume" / "state.json").read_text())["phase"] == ""
    # 3: ... and the MAE's three rounds finish the run, which removes its checkpoint.
    sliced = run_sim(cfg(run), progress=False, timeout_s=600, resume=True)
    assert not (run / "resume").exists() and not (run / "paused.json").exists()
    assert [s["resumed_from"] for s in sliced["segments"]] == [
        None, "phase 'classifier' after round 1", "between phases (finished: classifier)"]
    assert sliced["run_token"] != whole["run_token"]

    a, b = _tensors(tmp_path / "whole"), _tensors(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])][:5]
    ra, rb = _records(whole), _records(sliced)
    assert ra.keys() == rb.keys() and len(ra) == 2 * 3 * 2 * 2  # phases × rounds × kinds × sites
    assert ra == rb
    for ph in ("classifier", "mae"):
        for kind in ("train_aggregated", "evaluate_aggregated"):
            got = {k: {n: v for n, v in m.items() if n != "train_s"} for k, m in sliced["phases"][ph][kind].items()}
            want = {k: {n: v for n, v in m.items() if n != "train_s"} for k, m in whole["phases"][ph][kind].items()}
            assert set(got) == {"1", "2", "3"} and got == want, (ph, kind)
        assert set(sliced["phases"][ph]["round_s"]) == {"1", "2", "3"}  # each round's wall time, over the segments
        assert all(v > 0 for v in sliced["phases"][ph]["round_s"].values())

    # a run started without resume clears whatever checkpoint is there; with resume it keeps it
    from medfedpure.fed.sim import prepare_run_folder

    checkpoint.save(run, checkpoint.Checkpoint(identity=checkpoint.identity(cfg(run)), run_token="t"))
    prepare_run_folder(cfg(run), resume=True)
    assert checkpoint.load(run, cfg(run)) is not None
    prepare_run_folder(cfg(run))
    assert not (run / "resume").exists()


@pytest.mark.slow
def test_a_running_simulation_pauses_when_asked_and_resumes(tiny_data: Path, tmp_path: Path) -> None:
    """`fed pause` while the run is going: it stops after the round it is in, consumes the request, and the
    resumed run finishes the rounds left."""
    import threading
    import time

    from medfedpure.fed.sim import FederationPaused, run_sim

    run, rounds = tmp_path / "run", 12
    cfg = FedConfig(data_dir=str(tiny_data), out_dir=str(run), rounds=rounds, num_sites=2, max_train=8,
                    phases=("classifier",), calibrate=False)
    outcome: dict[str, object] = {}

    def go() -> None:
        try:
            outcome["metrics"] = run_sim(cfg, progress=False, timeout_s=600)
        except FederationPaused as exc:
            outcome["paused"] = exc

    worker = threading.Thread(target=go)
    worker.start()
    deadline = time.monotonic() + 300
    while not (run / "resume" / "state.json").is_file() and worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)  # the first round's checkpoint: the run is going
    res = CliRunner().invoke(app, ["fed", "pause", str(run)])
    assert res.exit_code == 0, res.output
    worker.join(timeout=600)
    assert "paused" in outcome, outcome
    assert "pause requested" in str(outcome["paused"])
    state = json.loads((run / "resume" / "state.json").read_text())
    assert state["phase"] == "classifier" and 1 <= state["rounds_done"] < rounds
    assert not (run / checkpoint.PAUSE_REQUEST_FILE).exists()  # answered
    assert "pause requested" in json.loads((run / "paused.json").read_text())["reason"]
    done = run_sim(cfg, progress=False, timeout_s=600, resume=True)
    assert len(done["segments"]) == 2 and set(done["phases"]["classifier"]["round_s"]) == {
        str(r) for r in range(1, rounds + 1)}
    assert not (run / "resume").exists() and not (run / "paused.json").exists()
