"""Site registration: each site declares its training-set size once; the server caps later counts at it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from flwr.app import Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from medfedpure.fed.config import FedConfig
from medfedpure.fed.server_app import _register
from medfedpure.fed.validation import UpdateValidationConfig


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def _answer(node: int, site: int, count: object) -> Message:
    meta = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="m", group_id="",
                    created_at=0.0, ttl=60.0, message_type=MessageType.QUERY)
    return Message(content=RecordDict({"metrics": MetricRecord({"site": site, "num-examples": count})}),  # type: ignore[dict-item]
                   metadata=meta)


class _Grid:
    """Answers the registration query with canned declarations (node id → (site, count))."""

    def __init__(self, answers: dict[int, tuple[int, object]], connect_after: int = 0, silent: tuple[int, ...] = ()) -> None:
        self.answers = answers
        self.sent: list[Message] = []
        self.polls = 0
        self.connect_after = connect_after  # get_node_ids() is empty for this many calls
        self.silent = silent  # nodes that never answer

    def get_node_ids(self) -> list[int]:
        self.polls += 1
        return list(self.answers) if self.polls > self.connect_after else []

    def send_and_receive(self, msgs: list[Message], timeout: float) -> list[Message]:
        self.sent = list(msgs)
        return [_answer(n, *self.answers[n]) for n in (m.metadata.dst_node_id for m in msgs) if n not in self.silent]


def test_register_keeps_valid_declarations_and_rejects_bad_ones(tmp_path: Path) -> None:
    cfg = FedConfig(data_dir=str(tmp_path), out_dir=str(tmp_path / "run"), num_sites=4)
    grid = _Grid({11: (0, 140), 12: (1, math.inf), 13: (2, 10**9), 14: (3, 70.5)})
    reg = _register(grid, cfg, UpdateValidationConfig(max_examples=1000))  # type: ignore[arg-type]
    assert all(m.metadata.message_type == MessageType.QUERY and m.content["config"]["phase"] == "register"
               for m in grid.sent)
    assert reg["declared_by_node"] == {"11": 140} and reg["declared_by_site"] == {"0": 140}
    reasons = {r["site"]: r["reason"] for r in reg["rejected"]}
    assert "not finite" in reasons[1] and "max_examples 1000" in reasons[2] and "not an integer" in reasons[3]


def test_register_waits_for_late_nodes_and_records_silent_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes that connect late are still asked; a node that never answers is recorded as not registered."""
    from medfedpure.fed import server_app

    monkeypatch.setattr(server_app, "REGISTER_POLL_S", 0.0)
    cfg = FedConfig(data_dir=str(tmp_path), out_dir=str(tmp_path / "run"), num_sites=3)
    grid = _Grid({11: (0, 50), 12: (1, 60), 13: (2, 70)}, connect_after=3, silent=(13,))
    reg = _register(grid, cfg, UpdateValidationConfig())  # type: ignore[arg-type]
    assert grid.polls == 4 and len(grid.sent) == 3
    assert reg["declared_by_site"] == {"0": 50, "1": 60}
    assert reg["rejected"] == [{"node": 13, "site": -1, "reason": "no reply to the registration query"}]


def test_fedconfig_carries_the_bounds_through_the_run_config(tmp_path: Path) -> None:
    cfg = FedConfig(data_dir=str(tmp_path), out_dir=str(tmp_path), max_median_ratio=math.inf, max_examples=500)
    back = FedConfig.from_run_config(cfg.to_run_config())
    assert back == cfg and back.validation == UpdateValidationConfig(math.inf, 1.0, math.inf, 500)
    assert math.isfinite(FedConfig(data_dir="d", out_dir="o").validation.max_median_ratio)
    with pytest.raises(ValueError, match="max_median_ratio"):
        FedConfig(data_dir="d", out_dir="o", max_median_ratio=0.5)
    with pytest.raises(ValueError, match="max_examples"):
        FedConfig(data_dir="d", out_dir="o", max_examples=-1)
