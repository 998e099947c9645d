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
    no_bound = UpdateValidationConfig(max_relative_norm=math.inf, max_median_ratio=math.inf)

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
    """With the relative bound alone, a ×600 sign-flipped update is dropped before FedAvg."""
    rng = np.random.default_rng(4)
    sent = _global(rng)
    step = {k: 0.05 * rng.normal(size=v.shape).astype(np.float32) for k, v in sent.items()}
    honest = [{k: sent[k] + step[k] for k in sent} for _ in range(3)]
    poisoned = {k: sent[k] - 10.0 * step[k] * 60 for k in sent}
    s = make_strategy("fedavg", 4, validation=UpdateValidationConfig(max_relative_norm=1.0, max_median_ratio=math.inf))
    _configure(s, sent, 4)
    arrays, _ = s.aggregate_train(1, [_reply(i + 1, i, h) for i, h in enumerate(honest)] + [_reply(4, 3, poisoned)])
    assert [r["site"] for r in s.rejected] == [3] and "max_relative_norm" in s.rejected[0]["reason"]
    np.testing.assert_allclose(arrays["w"].numpy(), honest[0]["w"], atol=1e-6)


def _poison_round(rng: np.random.Generator, scale: float, spread: float = 0.2):
    """Three honest updates of similar size (relative spread ``spread``) and one scaled by ``scale``."""
    sent = _global(rng)
    step = {k: 0.01 * rng.normal(size=v.shape).astype(np.float32) for k, v in sent.items()}
    honest = [{k: sent[k] + (1 + spread * (i - 1)) * step[k] for k in sent} for i in range(3)]
    poisoned = {k: sent[k] + scale * step[k] for k in sent}
    return sent, step, honest, poisoned


def test_default_bound_is_finite_and_drops_sign_flipped_x20_under_fedavg() -> None:
    """A sign-flipped ×20 update is only 0.04 of ‖w‖: the old default (relative bound 1.0) let it through.

    Under the default config it is > 3 × the round's median update norm and dropped; FedAvg then
    averages the three honest updates exactly. With the median bound disabled (the old behaviour)
    FedAvg lands at (3·Δ̄ − 20·Δ)/4, pointing backwards.
    """
    rng = np.random.default_rng(5)
    sent, step, honest, poisoned = _poison_round(rng, -20.0)
    assert math.isfinite(UpdateValidationConfig().max_median_ratio)
    replies = [_reply(i + 1, i, h) for i, h in enumerate(honest)] + [_reply(4, 3, poisoned)]
    honest_mean = {k: np.mean([h[k] for h in honest], axis=0) for k in sent}

    old = make_strategy("fedavg", 4, validation=UpdateValidationConfig(max_median_ratio=math.inf))
    _configure(old, sent, 4)
    arrays, _ = old.aggregate_train(1, replies)
    assert not old.rejected
    moved = arrays["w"].numpy() - sent["w"]
    assert float(np.sum(moved * step["w"])) < 0  # the aggregate step points against the honest step
    np.testing.assert_allclose(moved, (3 * step["w"] - 20 * step["w"]) / 4, atol=1e-5)

    s = make_strategy("fedavg", 4)  # default validation
    _configure(s, sent, 4)
    arrays, _ = s.aggregate_train(1, replies)
    assert [r["site"] for r in s.rejected] == [3]
    assert "max_median_ratio 3 × the round's median" in s.rejected[0]["reason"]
    for k in sent:
        np.testing.assert_allclose(arrays[k].numpy(), honest_mean[k], atol=1e-6)


@pytest.mark.parametrize(("scale", "ratio", "dropped"), [(-2.5, 3.0, []), (-3.5, 3.0, [3]), (-3.5, 5.0, []),
                                                         (2.9, 3.0, []), (40.0, 3.0, [3])])
def test_median_bound_threshold_is_ratio_times_median(scale: float, ratio: float, dropped: list[int]) -> None:
    """Honest norms 0.8, 1.0, 1.2 × ‖step‖ and one of |scale| × ‖step‖: median 1.0 or 1.1 × ‖step‖."""
    rng = np.random.default_rng(6)
    sent, _, honest, poisoned = _poison_round(rng, scale)
    s = make_strategy("fedmedian", 4, validation=UpdateValidationConfig(max_median_ratio=ratio))
    _configure(s, sent, 4)
    s.aggregate_train(1, [_reply(i + 1, i, h) for i, h in enumerate(honest)] + [_reply(4, 3, poisoned)])
    assert [r["site"] for r in s.rejected] == dropped
    assert len([h for h in s.history if h["kind"] == "train"]) == 4 - len(dropped)


def test_median_bound_needs_three_updates() -> None:
    """With two updates the median is their mean: the bound cannot tell which one is honest."""
    from medfedpure.fed.validation import median_norm_rejections

    cfg = UpdateValidationConfig()
    assert median_norm_rejections({0: 1.0, 1: 100.0}, cfg) == {}
    assert list(median_norm_rejections({0: 1.0, 1: 1.1, 2: 100.0}, cfg)) == [2]
    assert median_norm_rejections({0: 0.0, 1: 0.0, 2: 5.0}, cfg) == {}  # zero median: no scale to compare
    assert median_norm_rejections({0: 1.0, 1: 1.1, 2: 100.0}, UpdateValidationConfig(max_median_ratio=math.inf)) == {}


@pytest.mark.parametrize("bad", [{"max_median_ratio": 0.5}, {"max_median_ratio": math.nan},
                                 {"max_examples": -1}, {"max_examples": 2.5}, {"max_examples": True}])
def test_validation_config_rejects_bad_median_ratio_and_cap(bad: dict) -> None:
    with pytest.raises(ValueError, match="max_median_ratio|max_examples"):
        UpdateValidationConfig(**bad)


def _reply_n(node: int, site: int, arrays: dict[str, np.ndarray], n: object) -> Message:
    msg = _reply(node, site, arrays)
    msg.content["metrics"] = MetricRecord({"num-examples": n, "site": site})  # type: ignore[dict-item]
    return msg


@pytest.mark.parametrize(("count", "reason"), [
    (math.inf, "not finite"), (math.nan, "not finite"), (0, "not positive"), (-5, "not positive"),
    (10.5, "not an integer"), (1e9, "declared at registration"), (21, "declared at registration"),
])
def test_bad_example_count_dropped_before_fedavg(count: float, reason: str) -> None:
    """Site 3 reports a bad count with an honest-looking update: dropped, the others averaged unweighted."""
    rng = np.random.default_rng(7)
    sent = _global(rng)
    ups = [{k: v + 0.01 * (i + 1) for k, v in sent.items()} for i in range(4)]
    s = make_strategy("fedavg", 4, declared_examples={1: 20, 2: 20, 3: 20, 4: 20})
    _configure(s, sent, 4)
    replies = [_reply_n(i + 1, i, ups[i], 20) for i in range(3)] + [_reply_n(4, 3, ups[3], count)]
    arrays, _ = s.aggregate_train(1, replies)
    assert [r["site"] for r in s.rejected] == [3] and reason in s.rejected[0]["reason"]
    for k in sent:
        np.testing.assert_allclose(arrays[k].numpy(), sent[k] + 0.02, atol=1e-6)
        assert np.isfinite(arrays[k].numpy()).all()


def test_example_count_within_declared_and_cap_is_weighed() -> None:
    """Counts ≤ the declared size are kept and weigh the average; the FedConfig cap applies on its own too."""
    from medfedpure.fed.validation import check_num_examples

    rng = np.random.default_rng(8)
    sent = _global(rng)
    s = make_strategy("fedavg", 3, declared_examples={1: 30, 2: 10, 3: 10})
    _configure(s, sent, 3)
    ups = [{k: v + d for k, v in sent.items()} for d in (0.1, 0.3, 0.2)]
    arrays, _ = s.aggregate_train(1, [_reply_n(1, 0, ups[0], 30), _reply_n(2, 1, ups[1], 10.0),
                                      _reply_n(3, 2, ups[2], 10)])
    assert not s.rejected
    np.testing.assert_allclose(arrays["b"].numpy(), sent["b"] + (30 * 0.1 + 10 * 0.3 + 10 * 0.2) / 50, atol=1e-6)

    capped = UpdateValidationConfig(max_examples=100)
    assert check_num_examples(100, capped) == "" and "max_examples 100" in check_num_examples(101, capped)
    assert check_num_examples(10**6, UpdateValidationConfig()) == ""  # no cap, no declaration: any finite count
    assert "not a number" in check_num_examples(None, capped)
    assert "not a number" in check_num_examples("12", capped)


def test_unregistered_node_is_dropped() -> None:
    rng = np.random.default_rng(9)
    sent = _global(rng)
    s = make_strategy("fedavg", 3, declared_examples={1: 10, 2: 10})
    _configure(s, sent, 3)
    ups = [{k: v + 0.01 for k, v in sent.items()} for _ in range(3)]
    s.aggregate_train(1, [_reply_n(i + 1, i, ups[i], 10) for i in range(3)])
    assert [r["site"] for r in s.rejected] == [2] and "did not register" in s.rejected[0]["reason"]


def test_replies_are_aggregated_in_site_order_whatever_their_arrival() -> None:
    """Sites that train side by side reply in any order; the aggregate must be bit-identical, and the
    per-site history is recorded in site order."""
    rng = np.random.default_rng(7)
    sent = _global(rng)
    updates = [{k: v + rng.normal(scale=0.05, size=v.shape).astype(np.float32) for k, v in sent.items()}
               for _ in range(4)]
    replies = [_reply(10 + i, i, u, n=7 + 3 * i) for i, u in enumerate(updates)]
    results = []
    for order in ([0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0]):
        s = make_strategy("fedavg", 4, phase="classifier")
        _configure(s, sent, 4)
        arrays, _ = s.aggregate_train(1, [replies[i] for i in order])
        assert arrays is not None
        assert [h["site"] for h in s.history if h["kind"] == "train"] == [0, 1, 2, 3]
        results.append({k: arrays[k].numpy() for k in sent})
    for other in results[1:]:
        for k in sent:
            assert np.array_equal(other[k], results[0][k]), k


def test_in_site_order_puts_error_replies_last() -> None:
    from medfedpure.fed.strategies import in_site_order

    a = {"w": np.zeros((2,), np.float32)}
    replies = [_reply(5, 2, a), _reply(9, 0, a), _reply(1, 1, a), _reply(2, 0, a)]
    assert [(int(m.metadata.src_node_id)) for m in in_site_order(replies)] == [2, 9, 1, 5]


@pytest.mark.parametrize(("sites", "threads", "cpus", "want"),
                         [(4, 1, 2, 2), (4, 1, 16, 4), (1, 1, 8, 1), (4, 2, 2, 1), (4, 4, 2, 1), (3, 2, 8, 3)])
def test_parallel_clients_fits_the_cpus(sites: int, threads: int, cpus: int, want: int) -> None:
    from medfedpure.fed.sim import parallel_clients

    assert parallel_clients(sites, threads, cpus) == want
