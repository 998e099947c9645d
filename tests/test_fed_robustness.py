"""``compare.run_robustness``: which runs it starts and how it reports them (the runner replaced)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from medfedpure.fed import compare
from medfedpure.fed.config import FedConfig


def test_run_robustness_runs_clean_and_poisoned_per_strategy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[FedConfig] = []

    def fake_sim(cfg: FedConfig, progress: bool, timeout_s: float) -> dict:
        runs.append(cfg)
        acc = 0.9 if cfg.poison_site < 0 else (0.5 if cfg.strategy == "fedavg" else 0.89)
        per = [{"kind": "evaluate", "round": cfg.rounds, "site": s, "test_accuracy": acc} for s in range(cfg.num_sites)]
        rejected = [{"site": 3, "reason": "x"}] if cfg.poison_site >= 0 and cfg.strategy == "krum" else []
        return {"phases": {"classifier": {"per_site": per, "rejected": rejected}}, "sim_wall_s": 10.0}

    monkeypatch.setattr(compare, "run_sim", fake_sim)
    base = FedConfig(data_dir=str(tmp_path), out_dir=str(tmp_path), rounds=2)
    res = compare.run_robustness(base, tmp_path / "out", strategies=("fedavg", "krum"), poison_scale=-20.0,
                                 progress=False)
    assert [(c.strategy, c.poison_site, c.poison_scale, c.phases, c.calibrate) for c in runs] == [
        ("fedavg", -1, -20.0, ("classifier",), False), ("fedavg", 3, -20.0, ("classifier",), False),
        ("krum", -1, -20.0, ("classifier",), False), ("krum", 3, -20.0, ("classifier",), False)]
    assert res["strategies"]["fedavg"]["drop"] == pytest.approx(0.4)
    assert res["strategies"]["krum"]["drop"] == pytest.approx(0.01)
    assert res["strategies"]["krum"]["poisoned"]["rejected_sites"] == [3]
    table = (tmp_path / "out" / "robustness.md").read_text()
    assert "| fedavg | 0.900 (0.90 / 0.90 / 0.90 / 0.90) | 0.500" in table and "+40.0" in table and "+1.0" in table
    assert json.loads((tmp_path / "out" / "robustness.json").read_text())["poison_site"] == 3
    with pytest.raises(ValueError, match="poison_site=7"):
        compare.run_robustness(base, tmp_path / "o2", poison_site=7, progress=False)
