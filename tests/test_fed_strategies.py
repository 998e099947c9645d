"""Update validation, strategy selection and robustness to a poisoned site (no Flower runtime)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity
from medfedpure.fed.strategies import STRATEGIES, make_strategy
from medfedpure.fed.validation import UpdateValidationConfig, check_update


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """configure_train builds instruction Messages, which read the process's task identity."""
    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class _Grid:
    """The two Grid methods a strategy calls in configure_train."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))


def _global(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"w": rng.normal(size=(8, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}


def _reply(node: int, site: int, arrays: dict[str, np.ndarray], n: int = 10) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": n, "site": site, "train_loss": 0.5}),
        }
    )
    meta = Metadata(
        run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="m",
        group_id="", created_at=0.0, ttl=60.0, message_type=MessageType.TRAIN,
    )
    return Message(content=content, metadata=meta)


def _configure(strategy, sent: dict[str, np.ndarray], n: int) -> None:
    arrays = ArrayRecord({k: Array(v) for k, v in sent.items()})
    list(strategy.configure_train(1, arrays, ConfigRecord(), _Grid(n)))


def test_check_update_accepts_small_and_rejects_bad() -> None:
    rng = np.random.default_rng(0)
    sent = _global(rng)
    cfg = UpdateValidationConfig(max_update_norm=1.0, max_relative_norm=0.5)
    ok = {k: v + 0.01 for k, v in sent.items()}
    res = check_update(sent, ok, cfg)
    assert res.ok and res.reason == ""
    assert res.update_norm == pytest.approx(0.01 * math.sqrt(36), rel=1e-4)

    nan = {k: v.copy() for k, v in sent.items()}
    nan["w"][2, 3] = np.nan
    res = check_update(sent, nan, cfg)
    assert not res.ok and "non-finite" in res.reason and "'w'" in res.reason

    inf = {k: v.copy() for k, v in sent.items()}
    inf["b"][0] = np.inf
    assert "non-finite" in check_update(sent, inf, cfg).reason

    shape = dict(sent, w=np.zeros((4, 8), np.float32))
    res = check_update(sent, shape, cfg)
    assert not res.ok and "shape (4, 8), expected (8, 4)" in res.reason

    names = {"w": sent["w"], "c": sent["b"]}
    assert "names differ" in check_update(sent, names, cfg).reason

    big = {k: v + 1.0 for k, v in sent.items()}  # ‖Δ‖ = 6 > 1
    res = check_update(sent, big, cfg)
    assert not res.ok and "max_update_norm" in res.reason and res.update_norm == pytest.approx(6.0)

    rel_cfg = UpdateValidationConfig(max_relative_norm=0.1)
    scaled = {k: v * 1.5 for k, v in sent.items()}  # relative norm 0.5 > 0.1
    res = check_update(sent, scaled, rel_cfg)
    assert not res.ok and "relative" in res.reason and res.relative_norm == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize("bad", [{"max_update_norm": 0.0}, {"max_relative_norm": -1.0}, {"max_update_norm": math.nan}])
def test_validation_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        UpdateValidationConfig(**bad)


def test_make_strategy_names_and_min_nodes() -> None:
    for name in STRATEGIES:
        s = make_strategy(name, 4)
        assert s.min_train_nodes == s.min_available_nodes == s.min_evaluate_nodes == 4
    assert make_strategy("krum", 7).num_malicious_nodes == 2
    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'"):
        make_strategy("fedsgd", 4)


def test_bad_updates_dropped_round_goes_on() -> None:
    """NaN, wrong shape and oversized updates are dropped; the two good ones are averaged."""
    rng = np.random.default_rng(1)
    sent = _global(rng)
    s = make_strategy("fedavg", 5, validation=UpdateValidationConfig(max_update_norm=5.0), phase="classifier")
    _configure(s, sent, 5)
    good1 = {k: v + 0.1 for k, v in sent.items()}
    good2 = {k: v + 0.3 for k, v in sent.items()}
    nan = {k: v.copy() for k, v in sent.items()}
    nan["w"][0, 0] = np.nan
    wrong = dict(sent, b=np.zeros((5,), np.float32))
    huge = {k: v + 100.0 for k, v in sent.items()}
    replies = [_reply(1, 0, good1), _reply(2, 1, nan), _reply(3, 2, wrong), _reply(4, 3, huge), _reply(5, 4, good2)]
    arrays, metrics = s.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    np.testing.assert_allclose(arrays["w"].numpy(), sent["w"] + 0.2, atol=1e-6)
    np.testing.assert_allclose(arrays["b"].numpy(), sent["b"] + 0.2, atol=1e-6)
    assert sorted(r["site"] for r in s.rejected) == [1, 2, 3]
    reasons = {r["site"]: r["reason"] for r in s.rejected}
    assert "non-finite" in reasons[1] and "shape" in reasons[2] and "max_update_norm" in reasons[3]
    assert sorted(h["site"] for h in s.history if h["kind"] == "train") == [0, 4]


def test_all_updates_bad_keeps_global() -> None:
    rng = np.random.default_rng(2)
    sent = _global(rng)
    s = make_strategy("fedavg", 2)
    _configure(s, sent, 2)
    nan = {k: np.full_like(v, np.nan) for k, v in sent.items()}
    assert s.aggregate_train(1, [_reply(1, 0, nan), _reply(2, 1, nan)]) == (None, None)
    assert len(s.rejected) == 2


@pytest.mark.parametrize("robust", ["fedmedian", "krum", "fedtrimmedavg"])
def test_poisoned_site_robust_vs_fedavg(robust: str) -> None:
    """Site 3 sends the honest mean update sign-flipped ×10; robust rules stay near the honest mean.

    Honest updates: Δ_i = μ + 0.05·ε_i, μ with unit-variance entries (d = 36). Poisoned: −10·mean(Δ_honest).
    FedAvg over 4 equal sites lands at (3·Δ̄ − 10·Δ̄)/4 = −1.75·Δ̄: error 2.75‖Δ̄‖ from the honest mean.
    """
    rng = np.random.default_rng(3)
    sent = _global(rng)
    mu = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in sent.items()}
    honest = [{k: sent[k] + mu[k] + 0.05 * rng.normal(size=v.shape).astype(np.float32) for k, v in sent.items()} for _ in range(3)]
    honest_mean = {k: np.mean([h[k] for h in honest], axis=0) for k in sent}
    poisoned = {k: sent[k] - 10.0 * (honest_mean[k] - sent[k]) for k in sent}
    no_bound = UpdateValidationConfig(max_relative_norm=math.inf)

    def run(name: str) -> float:
        s = make_strategy(name, 4, validation=no_bound)
        _configure(s, sent, 4)
        replies = [_reply(i + 1, i, h) for i, h in enumerate(honest)] + [_reply(4, 3, poisoned)]
        arrays, _ = s.aggregate_train(1, replies)
        assert arrays is not None and not s.rejected
        err = sum(float(np.sum((arrays[k].numpy() - honest_mean[k]) ** 2)) for k in sent)
        return math.sqrt(err)

    mean_norm = math.sqrt(sum(float(np.sum((honest_mean[k] - sent[k]) ** 2)) for k in sent))
    fedavg_err = run("fedavg")
    robust_err = run(robust)
    assert fedavg_err == pytest.approx(2.75 * mean_norm, rel=1e-4)
    assert fedavg_err > 10.0
    # The honest spread is 0.05 per coordinate: a robust rule stays within a few times that.
    assert robust_err < 0.05 * math.sqrt(36) * 2
    assert robust_err < fedavg_err / 50


def test_relative_bound_drops_the_poisoned_site_under_fedavg() -> None:
    """With the default relative bound, the ×10 sign-flipped update is dropped before FedAvg."""
    rng = np.random.default_rng(4)
    sent = _global(rng)
    step = {k: 0.05 * rng.normal(size=v.shape).astype(np.float32) for k, v in sent.items()}
    honest = [{k: sent[k] + step[k] for k in sent} for _ in range(3)]
    poisoned = {k: sent[k] - 10.0 * step[k] * 60 for k in sent}
    s = make_strategy("fedavg", 4, validation=UpdateValidationConfig(max_relative_norm=1.0))
    _configure(s, sent, 4)
    arrays, _ = s.aggregate_train(1, [_reply(i + 1, i, h) for i, h in enumerate(honest)] + [_reply(4, 3, poisoned)])
    assert [r["site"] for r in s.rejected] == [3]
    np.testing.assert_allclose(arrays["w"].numpy(), honest[0]["w"], atol=1e-6)
