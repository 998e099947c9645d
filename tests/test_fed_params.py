"""What travels to the server and what stays at the site; site state in context.state and on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fed_helpers import flower_message, tiny_fed_data
from flwr.app import ArrayRecord, Context, MessageType, RecordDict
from medfedpure.fed import client_app, params
from medfedpure.fed.config import FedConfig
from medfedpure.fed.phases import build_model
from medfedpure.models.moe import MoEClassifier, MoEConfig


def _moe(seed: int = 0) -> MoEClassifier:
    model, _ = build_model("classifier", "tiny", seed=seed)
    return model


def test_moe_split_only_global_expert_travels() -> None:
    m = _moe()
    travel = params.travelling_names(m, "moe")
    local = params.local_names(m, "moe")
    sd = m.state_dict()
    assert set(travel) | set(local) == set(sd) and not set(travel) & set(local)
    assert travel == sorted(m.param_groups()["global"])
    assert all(k.startswith("global_expert.") for k in travel)
    assert not any(".norm" in k for k in travel)  # BatchNorm affine + statistics stay local (FedBN)
    assert any(k.startswith("local_expert.") for k in local) and any(k.startswith("gate.") for k in local)
    assert "global_expert.stages.0.norm1.running_mean" in local
    assert "global_expert.stages.0.norm1.weight" in local
    n_travel = sum(sd[k].numel() for k in travel)
    assert 0 < n_travel < sum(v.numel() for v in sd.values())


def test_fedbn_and_all_splits() -> None:
    m = _moe()
    sd = m.state_dict()
    fedbn = set(params.travelling_names(m, "fedbn"))
    assert not any(".norm" in k for k in fedbn)
    assert "local_expert.stages.0.conv1.weight" in fedbn and "gate.0.weight" in fedbn
    everything = set(params.travelling_names(m, "all"))
    assert everything == {k for k, v in sd.items() if v.is_floating_point()}
    assert not any(k.endswith("num_batches_tracked") for k in everything)  # integer counters never travel
    assert params.travelling_names(m, "none") == []
    with pytest.raises(ValueError, match="unknown split"):
        params.travelling_names(m, "fedprox")
    with pytest.raises(ValueError, match="global_state_dict"):
        params.travelling_names(torch.nn.Linear(2, 2), "moe")


def test_set_travelling_replaces_global_keeps_local() -> None:
    a, b = _moe(seed=1), _moe(seed=2)
    b_local_before = params.get_local(b, "moe")
    params.set_travelling(b, params.get_travelling(a, "moe"), "moe")
    sa, sb = a.state_dict(), b.state_dict()
    for k in params.travelling_names(a, "moe"):
        assert torch.equal(sa[k], sb[k])
    for k, v in b_local_before.items():
        assert torch.equal(sb[k], v)
    assert not torch.equal(sa["local_expert.head.weight"], sb["local_expert.head.weight"])
    bad = params.get_travelling(a, "all")
    with pytest.raises(ValueError, match="same model config"):
        params.set_travelling(b, bad, "moe")


def test_local_state_roundtrip_and_mismatch(tmp_path: Path) -> None:
    m = _moe(seed=3)
    local = params.get_local(m, "moe")
    path = tmp_path / "site_0" / "classifier_local.safetensors"
    params.save_local(path, local, {"run-token": "t1", "split": "moe"})
    tensors, meta = params.load_local(path)
    assert meta == {"run-token": "t1", "split": "moe"}
    assert set(tensors) == set(local) and all(torch.equal(tensors[k], local[k]) for k in local)
    fresh = _moe(seed=4)
    params.set_local(fresh, tensors, "moe")
    assert torch.equal(fresh.state_dict()["gate.0.weight"], local["gate.0.weight"])
    other = MoEClassifier(MoEConfig.preset("tiny", image_size=32).__class__(image_size=32, global_widths=(4, 8),
                                                                               local_widths=(4, 8), gate_hidden=4))
    with pytest.raises(ValueError, match="another model config"):
        params.set_local(other, tensors, "moe")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_fed_data(tmp_path_factory, "fed_data", sites=2)


def _run_config(data_dir: Path, run_dir: Path, **kw: object) -> dict:
    """The run's constants as the ClientApp reads them (``context.run_config``)."""
    return FedConfig(data_dir=str(data_dir), out_dir=str(run_dir), num_sites=2, **kw).to_run_config()


def _context(run_config: dict, site: int) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": site}, state=RecordDict(), run_config=run_config)


def test_message_carries_only_per_round_values() -> None:
    from medfedpure.fed.server_app import round_config

    assert dict(round_config("classifier", "moe", "tok")) == {"phase": "classifier", "split": "moe", "run-token": "tok",
                                                              "round-offset": 0}
    assert dict(round_config("mae", "all", "tok", 7))["round-offset"] == 7  # a resumed phase's rounds done


def test_client_refuses_an_empty_run_config(monkeypatch: pytest.MonkeyPatch) -> None:
    msg = flower_message({"phase": "classifier", "split": "moe"}, ArrayRecord(), monkeypatch)
    with pytest.raises(ValueError, match="run config is empty"):
        client_app._Site(msg, _context({}, 0))


def test_bound_run_config_fills_an_empty_context_and_runtime_keys_win() -> None:
    mod = client_app.bind_run_config({"rounds": 3, "seed": 1})
    ctx = _context({"seed": 5}, 0)
    seen = mod(None, ctx, lambda msg, context: context)  # type: ignore[arg-type]
    assert dict(seen.run_config) == {"rounds": 3, "seed": 5} and dict(ctx.run_config) == {"seed": 5}
    assert seen.state is ctx.state and seen.node_config == ctx.node_config  # site state persists


@pytest.mark.slow
def test_client_train_sends_only_global_and_persists_local(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server_model = _moe(seed=0)
    sent = params.get_travelling(server_model, "moe")
    conf = {"phase": "classifier", "split": "moe", "server-round": 1, "run-token": "run-A"}
    run_config = _run_config(tiny_data, tmp_path, preset="tiny", local_epochs=1, rounds=2, seed=0, max_train=8)
    ctx = _context(run_config, 1)
    reply = client_app.train(flower_message(conf, sent, monkeypatch), ctx)

    arrays = reply.content["arrays"]
    assert sorted(arrays.keys()) == params.travelling_names(server_model, "moe")
    delta = sum(float(np.sum((arrays[k].numpy() - sent[k].numpy()) ** 2)) for k in sent)
    assert delta > 0  # it trained
    metrics = reply.content["metrics"]
    assert metrics["site"] == 1 and metrics["num-examples"] == 8 and np.isfinite(metrics["train_loss"])

    # The local part is in context.state and on disk, tagged with the run.
    state_local = params.from_arrayrecord(ctx.state["classifier.local"])
    assert set(state_local) == set(params.local_names(server_model, "moe"))
    disk, meta = params.load_local(tmp_path / "site_1" / "classifier_local.safetensors")
    assert meta["run-token"] == "run-A" and meta["round"] == 1
    assert all(torch.equal(disk[k], state_local[k]) for k in disk)
    fresh_local = params.get_local(build_model("classifier", "tiny", seed=0 + 1000 * 2)[0], "moe")
    assert not torch.equal(disk["gate.0.weight"], fresh_local["gate.0.weight"])  # the gate trained locally

    # A restarted site (empty context.state) resumes from disk within the same run ...
    restarted = _context(run_config, 1)
    msg = flower_message({**conf, "server-round": 2}, sent, monkeypatch)
    model = client_app._Site(msg, restarted).model(training=True)
    assert all(torch.equal(model.state_dict()[k], disk[k]) for k in disk)
    # ... but a new run starts afresh instead of inheriting another run's local expert.
    msg = flower_message({**conf, "run-token": "run-B"}, sent, monkeypatch)
    model = client_app._Site(msg, restarted).model(training=True)
    assert torch.equal(model.state_dict()["gate.0.weight"], fresh_local["gate.0.weight"])


@pytest.mark.slow
def test_client_poisoned_reply_is_scaled_update(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With poison-site = this site, the reply is w + s·Δ: checked against an honest site-0 run."""
    sent = params.get_travelling(_moe(seed=0), "moe")
    conf = {"phase": "classifier", "split": "moe", "server-round": 1, "run-token": "x"}
    run = {"preset": "tiny", "local_epochs": 1, "rounds": 1, "seed": 0, "max_train": 8}
    honest = client_app.train(flower_message(conf, sent, monkeypatch),
                              _context(_run_config(tiny_data, tmp_path, **run), 0)).content["arrays"]
    # A separate run folder: the second call must not resume from the first call's local state.
    poison = _run_config(tiny_data, tmp_path / "second", poison_site=0, poison_scale=-10.0, **run)
    poisoned = client_app.train(flower_message(conf, sent, monkeypatch), _context(poison, 0)).content["arrays"]
    for k in sent:
        d_h = honest[k].numpy() - sent[k].numpy()
        d_p = poisoned[k].numpy() - sent[k].numpy()
        np.testing.assert_allclose(d_p, -10.0 * d_h, rtol=1e-4, atol=1e-6)


def test_client_registers_its_training_set_size(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The register query answers the site's training-set size: the cap on its later num-examples."""
    run_config = _run_config(tiny_data, tmp_path, preset="tiny", max_train=8)
    ctx = _context(run_config, 1)
    msg = flower_message({"phase": "register"}, ArrayRecord(), monkeypatch, MessageType.QUERY)
    reply = client_app.query(msg, ctx)
    assert dict(reply.content["metrics"]) == {"site": 1, "num-examples": 8}
    bad = flower_message({"phase": "enrol"}, ArrayRecord(), monkeypatch, MessageType.QUERY)
    with pytest.raises(ValueError, match="'register' and 'calibrate'"):
        client_app.query(bad, ctx)
