"""Helpers shared by the federation tests: a tiny synthetic data set, and a Flower message as a site receives it."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity


def tiny_fed_data(tmp_path_factory: pytest.TempPathFactory, name: str, sites: int) -> Path:
    """``sites`` synthetic sites of 20 scans at 32 px (seed 0) with their splits, in a temporary folder."""
    from medfedpure.data import SynthConfig, generate_synthetic, make_splits

    root = tmp_path_factory.mktemp(name) / "synth"
    generate_synthetic(root, SynthConfig(sites=sites, per_site=20, size=32, seed=0), workers=1, progress=False)
    make_splits(root, seed=0)
    return root


def flower_message(conf: dict, arrays: object, monkeypatch: pytest.MonkeyPatch,
                   kind: str = MessageType.TRAIN) -> Message:
    """A message to node 1 carrying ``arrays`` and the per-round ``conf`` (Flower's task identity pinned)."""
    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord(conf)}), dst_node_id=1, message_type=kind)
