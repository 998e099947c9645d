"""Optimizer state and schedule position carried across federated rounds (no restart per round).

A round used to build a fresh AdamW and run a whole cosine schedule; now a site's rounds continue
one run: these tests pin the pieces — state round trip through safetensors, the learning rate at
an offset equal to the continuous run's, and k one-epoch calls equal to one k-epoch call bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fed_helpers import flower_message, tiny_fed_data
from flwr.app import Context, RecordDict
from medfedpure.fed import client_app, params, tasks
from medfedpure.fed.config import FedConfig
from medfedpure.fed.phases import PHASES, build_model
from medfedpure.models.moe import MoEClassifier, MoEConfig
from medfedpure.models.weights import load_model
from medfedpure.train.classifier import ClassifierTrainConfig, train_classifier
from medfedpure.train.loop import cosine_lr, load_optimizer_state, optimizer_state


def _data(n: int = 16, s: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.int64)
    x = (0.3 + 0.1 * rng.random((n, 1, s, s)) + 0.4 * y[:, None, None, None] * (rng.random((n, 1, s, s)) > 0.7))
    return np.clip(x, 0, 1).astype(np.float32), y


def _model(seed: int = 0) -> MoEClassifier:
    model, _ = build_model("classifier", "tiny", seed=seed, size=16)
    return model


def _cfg(epochs: int) -> ClassifierTrainConfig:
    # tiny preset: batch 8 → 2 steps per epoch on 16 scans; one warm-up epoch.
    return ClassifierTrainConfig.preset("tiny", epochs=epochs, patience=10, warmup_epochs=1)


def test_optimizer_state_safetensors_round_trip(tmp_path: Path) -> None:
    x, y = _data()
    model = _model()
    out = train_classifier(model, (x, y), (x[:6], y[:6]), _cfg(1), progress=False, return_optimizer_state=True)
    st = out["optimizer_state"]
    n_params = len(list(model.parameters()))
    assert len(st) == 3 * n_params  # exp_avg, exp_avg_sq, step per parameter
    assert all(float(st[f"{i}.step"]) == 2.0 for i in range(n_params))  # 2 steps ran
    params.save_local(tmp_path / "opt.safetensors", st, {"run-token": "t", "round": 1})
    back, meta = params.load_local(tmp_path / "opt.safetensors")
    assert meta == {"run-token": "t", "round": 1}
    assert set(back) == set(st) and all(torch.equal(back[k], st[k]) and back[k].dtype == st[k].dtype for k in st)
    # through context.state's ArrayRecord too (0-dim step tensors included)
    rec = params.from_arrayrecord(params.to_arrayrecord(st))
    assert all(torch.equal(rec[k], st[k]) and rec[k].shape == st[k].shape for k in st)
    # loaded into a fresh AdamW it is the same state, and a copy (caller's tensors not aliased)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    load_optimizer_state(opt, back)
    again = optimizer_state(opt)
    assert all(torch.equal(again[k], st[k]) for k in st)
    again["0.exp_avg"].add_(1.0)
    assert torch.equal(back["0.exp_avg"], st["0.exp_avg"])


def test_optimizer_state_for_another_model_is_rejected() -> None:
    x, y = _data()
    st = train_classifier(_model(), (x, y), (x[:6], y[:6]), _cfg(1), progress=False,
                          return_optimizer_state=True)["optimizer_state"]
    other = MoEClassifier(MoEConfig(image_size=16, global_widths=(4, 8), local_widths=(4, 8), gate_hidden=4))
    with pytest.raises(ValueError, match="another model"):
        load_optimizer_state(torch.optim.AdamW(other.parameters()), st)
    with pytest.raises(ValueError, match="param_index"):
        load_optimizer_state(torch.optim.AdamW(_model().parameters()), {"exp_avg": st["0.exp_avg"]})


def test_bad_schedule_position_raises() -> None:
    x, y = _data()
    with pytest.raises(ValueError, match="schedule_offset"):
        train_classifier(_model(), (x, y), (x, y), _cfg(1), progress=False, schedule_offset=-1)
    with pytest.raises(ValueError, match="schedule_total"):
        train_classifier(_model(), (x, y), (x, y), _cfg(2), progress=False, schedule_offset=1, schedule_total=2)


def _record_lrs(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    lrs: list[float] = []
    step = torch.optim.AdamW.step

    def recording_step(self, *a, **k):  # type: ignore[no-untyped-def]
        lrs.append(float(self.param_groups[0]["lr"]))
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    return lrs


def test_schedule_continues_across_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The LR in call r (offset r−1 of 3 epochs) equals the continuous 3-epoch run's LR at that epoch."""
    x, y = _data()
    lrs = _record_lrs(monkeypatch)
    train_classifier(_model(), (x, y), (x[:6], y[:6]), _cfg(3), progress=False)
    continuous = list(lrs)
    lrs.clear()
    m, st = _model(), None
    for r in range(3):
        st = train_classifier(m, (x, y), (x[:6], y[:6]), _cfg(1), progress=False, optimizer_state=st, return_optimizer_state=True,
                              schedule_offset=r, schedule_total=3)["optimizer_state"]
    assert lrs == continuous and len(lrs) == 6
    base = 3e-3  # tiny preset's peak; 2 warm-up steps, then cosine over 4 steps to 1 %
    expected = [base * (i + 1) / 2 for i in range(2)] + [
        base * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * j / 4))) for j in range(4)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    np.testing.assert_allclose(lrs, [3e-3 / 2, 3e-3, 3e-3, 0.0025649, 0.001515, 0.00046495], rtol=1e-4)
    assert lrs == [cosine_lr(i, 6, base, 2) for i in range(6)]
    # the old per-call restart: each one-epoch call runs its own warm-up (a different schedule)
    lrs.clear()
    m = _model()
    for _ in range(2):
        train_classifier(m, (x, y), (x[:6], y[:6]), _cfg(1), progress=False)
    assert lrs[2:4] == lrs[0:2] and lrs[2] != continuous[2]


def test_one_epoch_calls_with_carried_state_equal_one_run_bit_for_bit(tmp_path: Path) -> None:
    x, y = _data()
    a = _model()
    full = train_classifier(a, (x, y), (x[:6], y[:6]), _cfg(2), progress=False, checkpoint_dir=tmp_path,
                            return_optimizer_state=True)
    last = load_model(tmp_path / "classifier.last.safetensors")[0].state_dict()  # the last epoch's weights
    b, st, losses = _model(), None, []
    for r in range(2):
        out = train_classifier(b, (x, y), (x[:6], y[:6]), _cfg(1), progress=False, optimizer_state=st, return_optimizer_state=True,
                               schedule_offset=r, schedule_total=2)
        st = out["optimizer_state"]
        losses.append(out["history"][0]["train_loss"])
    assert losses == [row["train_loss"] for row in full["history"]]
    sd = b.state_dict()
    assert set(sd) == set(last) and all(torch.equal(sd[k], last[k]) for k in sd)
    assert all(torch.equal(st[k], full["optimizer_state"][k]) for k in st)
    # Without the carried state (fresh AdamW in call 2) the trajectory differs.
    c = _model()
    train_classifier(c, (x, y), (x[:6], y[:6]), _cfg(1), progress=False, schedule_total=2)
    train_classifier(c, (x, y), (x[:6], y[:6]), _cfg(1), progress=False, schedule_offset=1, schedule_total=2)
    assert not all(torch.equal(c.state_dict()[k], last[k]) for k in last)


def test_site_rounds_equal_local_run() -> None:
    """The classifier phase's rounds (carried state, one schedule) = the local-only R-epoch run (no averaging)."""
    x, y = _data(24)  # 16 train scans: 2 steps per epoch
    data = tasks.SiteData(x[:16], y[:16], x[16:], y[16:], x[16:], y[16:])
    ref = _model()
    train_classifier(ref, (data.x_train, data.y_train), (data.x_val, data.y_val),
                     ClassifierTrainConfig.preset("tiny", epochs=2, seed=5, patience=3), progress=False)
    m, st = _model(), None
    for r in range(1, 3):
        _, st = PHASES["classifier"].train(m, data, tasks.LocalJob("tiny", 1, seed=5, schedule=(r - 1, 2)), st)
    # local-only selects its best epoch; compare where that is the last one, else the test is moot
    assert all(torch.equal(m.state_dict()[k], v) for k, v in ref.state_dict().items()) or \
        pytest.fail("site rounds diverged from the continuous local run")
    x32, _ = _data(12, s=32)
    data32 = tasks.SiteData(x32[:8], y[:8], x32[8:], y[8:12], x32[8:], y[8:12])
    metrics, none_state = PHASES["mae"].train(build_model("mae", "tiny", seed=0)[0], data32,
                                              tasks.LocalJob("tiny", 1, seed=0), None)
    assert none_state is None and np.isfinite(metrics["train_loss"])
    assert PHASES["classifier"].stateful and not any(PHASES[p].stateful for p in ("mae", "teacher", "student"))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_fed_data(tmp_path_factory, "fed_optim", sites=1)


def test_client_keeps_optimizer_state_across_rounds_and_restarts(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = params.get_travelling(_model(), "moe")
    conf = {"phase": "classifier", "split": "moe", "server-round": 1, "run-token": "run-A"}

    def run_config(rounds: int) -> dict:
        return FedConfig(data_dir=str(tiny_data), out_dir=str(tmp_path), preset="tiny", local_epochs=1, rounds=rounds,
                         seed=0, max_train=8, num_sites=1).to_run_config()

    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config=run_config(3))
    path = tmp_path / "site_0" / "classifier_optim.safetensors"
    for r in (1, 2):
        client_app.train(flower_message({**conf, "server-round": r}, sent, monkeypatch), ctx)
        st = params.from_arrayrecord(ctx.state["classifier.optim"])
        disk, meta = params.load_local(path)
        assert meta["round"] == r and meta["run-token"] == "run-A"
        assert all(torch.equal(disk[k], st[k]) for k in st)
        assert float(st["0.step"]) == r * 1  # max-train 8, batch 8: one step per epoch, carried
    # a restarted SuperNode (empty context.state) picks the state up from disk in round 3 ...
    fresh = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config=run_config(3))
    site = client_app._Site(flower_message({**conf, "server-round": 3}, sent, monkeypatch), fresh)
    restored = site.optimizer_state()
    assert restored is not None and all(torch.equal(restored[k], disk[k]) for k in disk)
    # ... but not another run's file, nor a stale one (not from the previous round), nor in round 1
    four = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config=run_config(4))
    for other in ({"run-token": "run-B", "server-round": 3}, {"server-round": 4}, {"server-round": 1}):
        site = client_app._Site(flower_message({**conf, **other}, sent, monkeypatch), four)
        assert site.optimizer_state() is None
