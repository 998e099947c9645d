"""benchmarks/adaptive_eval.py (rung 2): the full-pipeline attack stays in its ball, is reproducible,
and the unbounded sanity check of EVALUATION.md breaks the defence on the tiny bundle."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from medfedpure import Defender
from medfedpure.engines.torch_engine import TorchEngine
from medfedpure.export.tiny import cached_tiny_bundle, tiny_scans

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
torch.set_num_threads(1)
_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "adaptive_eval.py"


@pytest.fixture(scope="module")
def ae():
    spec = importlib.util.spec_from_file_location("adaptive_eval", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def setup():
    d = Defender.load(cached_tiny_bundle(), backend="onnxruntime", device="cpu", threads=1)
    ref = TorchEngine(d.bundle, device="cpu")
    for m in ref.models.values():
        m.requires_grad_(False)
    x = torch.from_numpy(tiny_scans(6, 5))
    with torch.no_grad():
        y = ref.models["classifier"](x).argmax(1)  # the labels the tiny model gives: clean accuracy 1
    return d, ref, x, y


def test_pipeline_pgd_stays_in_the_ball_and_is_reproducible(ae, setup) -> None:
    d, ref, x, y = setup
    eps = 4 / 255
    a, st = ae.pipeline_pgd(d, ref, x, y, eps, steps=3, eot=2, seed=1, progress=False)
    b, _ = ae.pipeline_pgd(d, ref, x, y, eps, steps=3, eot=2, seed=1, progress=False)
    assert a.shape == x.shape and torch.equal(a, b)
    assert float((a - x).abs().max()) <= eps + 1e-6 and float(a.min()) >= 0 and float(a.max()) <= 1
    assert 0.0 <= st["flagged_at_last_step"] <= 1.0
    assert float((a - x).abs().max()) > eps / 2  # it moved


def test_unbounded_attack_breaks_the_defence(ae, setup) -> None:
    """EVALUATION.md's sanity check: with ε = 1 the defended accuracy falls to ~0."""
    d, ref, x, y = setup
    clean = ae.defended(d, x.numpy(), y.numpy(), repeats=2, seed=0)
    assert clean["defended_acc_mean"] > 0.5
    xa, _ = ae.pipeline_pgd(d, ref, x, y, 1.0, steps=10, eot=1, seed=0, progress=False)
    r = ae.defended(d, xa.numpy(), y.numpy(), repeats=2, seed=0)
    assert r["defended_acc_mean"] <= 0.2, r
    assert 0 <= r["defended_acc_worst_of_repeats"] <= r["defended_acc_mean"] + 1e-9
