"""Strategy selection: Flower's FedAvg / FedMedian / FedTrimmedAvg / Krum behind update validation.

Each strategy here is the unchanged ``flwr.serverapp.strategy`` class with one mixin in front,
:class:`ValidatingMixin`, which

- remembers the arrays sent in ``configure_train`` (the reference for shape and norm checks);
- in ``aggregate_train`` drops every reply that fails :func:`validation.check_update` (logged with
  node, site and reason; the round goes on with the rest) before Flower's own consistency check
  and aggregation run;
- records per-site metrics of every train and evaluate reply (``history``), so the server can
  write per-round, per-site metrics JSON (Flower itself only keeps the weighted average).

Robustness notes. FedMedian (coordinate-wise median, Yin et al. 2018) and Krum (Blanchard et al.
2017) tolerate a minority of arbitrary updates; FedTrimmedAvg drops the ``beta`` fraction at each
end per coordinate — ``int(beta · n)`` updates per side, so with 4 sites beta must be ≥ 0.25 to trim
anything (default 0.25). With 4 sites, Krum's classical condition n ≥ 2f + 3 allows f = 0 only, but its
score (sum of squared distances to the n − f − 2 nearest updates) still isolates one far-away
update; ``krum_f`` defaults to ``max(0, (n − 3) // 2)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum

from medfedpure.fed.validation import (
    UpdateValidationConfig,
    check_num_examples,
    check_update,
    median_norm_rejections,
)

LOG = logging.getLogger("medfedpure.fed")

STRATEGIES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum")
WEIGHT_KEY = "num-examples"


def _reply_arrays(msg: Message) -> dict[str, np.ndarray] | None:
    records = list(msg.content.array_records.values())
    if len(records) != 1:
        return None
    return {k: v.numpy() for k, v in records[0].items()}


def _weight(msg: Message) -> object:
    """The reply's raw ``num-examples`` (None when no metric record carries it)."""
    for rec in msg.content.metric_records.values():
        if WEIGHT_KEY in rec:
            return rec[WEIGHT_KEY]
    return None


def _reply_metrics(msg: Message) -> dict[str, float]:
    out: dict[str, float] = {}
    for rec in msg.content.metric_records.values():
        for k, v in rec.items():
            if isinstance(v, (int, float)):
                out[k] = float(v)
    return out


def in_site_order(replies: Iterable[Message]) -> list[Message]:
    """The replies sorted by the site they report (then node id; error replies, which carry no site,
    last), not by arrival: sites that train side by side finish in any order, and a floating-point
    sum over the replies must not depend on it."""
    def key(msg: Message) -> tuple[int, int, int]:
        site = -1 if msg.has_error() else int(_reply_metrics(msg).get("site", -1))
        return (site < 0, site, int(msg.metadata.src_node_id))
    return sorted(replies, key=key)


class ValidatingMixin:
    """Put in front of a Flower Message-API strategy: validates train replies, records metrics.

    Attributes set by :func:`make_strategy`: ``validation`` (UpdateValidationConfig), ``phase``
    (a label written into ``history``, e.g. "classifier"), ``declared_examples`` (node id → the
    example count the node registered with; None: no registration, only the configured cap; a node
    missing from it has every update dropped). ``history`` is a list of dicts
    ``{"phase", "round", "kind": "train"|"evaluate", "site", "node", <metrics>}``; ``rejected`` a list
    of ``{"phase", "round", "site", "node", "reason"}``; ``errors`` the replies that carried an error
    (a site's exception) instead of content. ``round_offset``: rounds of the phase run before this
    ``start`` (a resumed run): Flower counts a resumed run's rounds from 1, the records count them in
    the phase.
    """

    validation: UpdateValidationConfig
    phase: str
    declared_examples: Mapping[int, int] | None

    def _init_validation(self, validation: UpdateValidationConfig, phase: str,
                         declared_examples: Mapping[int, int] | None = None) -> None:
        self.validation = validation
        self.phase = phase
        self.declared_examples = None if declared_examples is None else dict(declared_examples)
        self.history: list[dict[str, Any]] = []
        self.rejected: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.on_evaluated: Callable[[int], None] | None = None  # called after each round's evaluation
        self._sent: dict[str, np.ndarray] = {}
        self.round_offset = 0
        # Flower's weighted averages by round of the phase (its Result numbers a resumed segment from 1).
        self.aggregated: dict[str, dict[int, dict[str, Any]]] = {"train": {}, "evaluate": {}}
        self.round_s: dict[int, float] = {}  # each round's wall time (train + evaluate), set by the server

    def restore_records(self, records: Mapping[str, Any], round_offset: int) -> None:
        """Continue a phase checkpointed after ``round_offset`` rounds with the records it had then."""
        self.history = list(records.get("history", []))
        self.rejected = list(records.get("rejected", []))
        self.errors = list(records.get("errors", []))
        self.aggregated = {kind: {int(r): dict(m) for r, m in records.get("aggregated", {}).get(kind, {}).items()}
                           for kind in ("train", "evaluate")}
        self.round_s = {int(r): float(v) for r, v in records.get("round_s", {}).items()}
        self.round_offset = int(round_offset)

    def records(self) -> dict[str, Any]:
        """The per-site records so far (what :meth:`restore_records` takes back)."""
        return {"history": self.history, "rejected": self.rejected, "errors": self.errors,
                "aggregated": self.aggregated, "round_s": self.round_s}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = {k: v.numpy() for k, v in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def _record_error(self, server_round: int, kind: str, msg: Message) -> None:
        reason = str(msg.error.reason)
        LOG.warning("round %d: %s failed on node %d: %s", server_round, kind, msg.metadata.src_node_id, reason[-500:])
        self.errors.append(
            {"phase": self.phase, "round": server_round + self.round_offset, "kind": kind,
             "node": int(msg.metadata.src_node_id), "reason": reason[-2000:]}
        )

    def filter_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Return the replies that pass validation (error replies pass through: Flower logs them).

        Per reply: arrays (:func:`check_update`) and example count (:func:`check_num_examples`,
        against the node's registered count when the server registered the sites); then across
        the kept replies the bound relative to the round's median update norm
        (:func:`median_norm_rejections`).
        """
        kept: list[Message] = []
        passed: list[tuple[Message, dict[str, float], int, int]] = []
        for msg in in_site_order(replies):
            if msg.has_error():
                self._record_error(server_round, "train", msg)
                kept.append(msg)
                continue
            metrics = _reply_metrics(msg)
            site = int(metrics.get("site", -1))
            node = int(msg.metadata.src_node_id)
            arrays = _reply_arrays(msg)
            if arrays is None:
                reason = f"expected exactly one ArrayRecord, got {len(msg.content.array_records)}"
            elif self.declared_examples is not None and node not in self.declared_examples:
                reason = "the node did not register a valid example count; its updates are not weighed"
            else:
                declared = None if self.declared_examples is None else self.declared_examples[node]
                reason = check_num_examples(_weight(msg), self.validation, declared)
                if not reason:
                    check = check_update(self._sent, arrays, self.validation)
                    reason = check.reason
                    metrics["update_norm"] = check.update_norm
                    metrics["update_rel_norm"] = check.relative_norm
            if reason:
                self._reject(server_round, site, node, reason)
                continue
            passed.append((msg, metrics, site, node))
        too_far = median_norm_rejections({i: p[1]["update_norm"] for i, p in enumerate(passed)}, self.validation)
        for i, (msg, metrics, site, node) in enumerate(passed):
            if i in too_far:
                self._reject(server_round, site, node, too_far[i])
                continue
            self.history.append(
                {**metrics, "phase": self.phase, "round": server_round + self.round_offset, "kind": "train",
                 "site": site, "node": node}
            )
            kept.append(msg)
        return kept

    def _reject(self, server_round: int, site: int, node: int, reason: str) -> None:
        LOG.warning("round %d: dropped update from node %d (site %d): %s", server_round, node, site, reason)
        self.rejected.append({"phase": self.phase, "round": server_round + self.round_offset, "site": site,
                              "node": node, "reason": reason})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept = self.filter_replies(server_round, list(replies))
        if not any(not m.has_error() for m in kept):
            LOG.warning("round %d: no valid update; the global model is unchanged", server_round)
            return None, None
        arrays, metrics = super().aggregate_train(server_round, kept)  # type: ignore[misc]
        if metrics is not None:
            self.aggregated["train"][server_round + self.round_offset] = dict(metrics)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = in_site_order(replies)
        for msg in replies:
            if msg.has_error():
                self._record_error(server_round, "evaluate", msg)
                continue
            metrics = _reply_metrics(msg)
            self.history.append(
                {
                    **metrics,
                    "phase": self.phase,
                    "round": server_round + self.round_offset,
                    "kind": "evaluate",
                    "site": int(metrics.get("site", -1)),
                    "node": int(msg.metadata.src_node_id),
                }
            )
        result = super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]
        if result is not None:
            self.aggregated["evaluate"][server_round + self.round_offset] = dict(result)
        if self.on_evaluated is not None:
            self.on_evaluated(server_round + self.round_offset)
        return result


class ValidatedFedAvg(ValidatingMixin, FedAvg):
    """FedAvg (McMahan et al. 2017) with update validation."""


class ValidatedFedMedian(ValidatingMixin, FedMedian):
    """Coordinate-wise median (Yin et al. 2018) with update validation."""


class ValidatedFedTrimmedAvg(ValidatingMixin, FedTrimmedAvg):
    """Coordinate-wise trimmed mean (Yin et al. 2018) with update validation."""


class ValidatedKrum(ValidatingMixin, Krum):
    """Krum (Blanchard et al. 2017) with update validation."""


def make_strategy(
    name: str,
    num_sites: int,
    *,
    validation: UpdateValidationConfig | None = None,
    phase: str = "",
    trim_beta: float = 0.25,
    krum_f: int | None = None,
    evaluate: bool = True,
    declared_examples: Mapping[int, int] | None = None,
) -> ValidatingMixin:
    """Build strategy ``name`` (one of :data:`STRATEGIES`) for exactly ``num_sites`` sites.

    ``min_train_nodes = min_evaluate_nodes = min_available_nodes = num_sites`` so that no round
    starts before every site is connected. ``evaluate=False`` skips federated evaluation.
    ``declared_examples``: node id → registered example count (:class:`ValidatingMixin`).
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}: choose one of {', '.join(STRATEGIES)}")
    if num_sites < 1:
        raise ValueError(f"num_sites={num_sites}: need at least 1 site")
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0 if evaluate else 0.0,
        "min_train_nodes": num_sites,
        "min_evaluate_nodes": num_sites if evaluate else 0,
        "min_available_nodes": num_sites,
        "weighted_by_key": WEIGHT_KEY,
    }
    strategy: ValidatingMixin
    if name == "fedavg":
        strategy = ValidatedFedAvg(**common)
    elif name == "fedmedian":
        strategy = ValidatedFedMedian(**common)
    elif name == "fedtrimmedavg":
        strategy = ValidatedFedTrimmedAvg(beta=trim_beta, **common)
    else:
        f = max(0, (num_sites - 3) // 2) if krum_f is None else krum_f
        if f < 0 or f >= num_sites:
            raise ValueError(f"krum_f={f}: must be in [0, num_sites)")
        strategy = ValidatedKrum(num_malicious_nodes=f, **common)
    strategy._init_validation(validation or UpdateValidationConfig(), phase, declared_examples)
    return strategy
