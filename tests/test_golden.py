"""The embedded default bundle answers exactly as recorded (tests/golden/default_bundle_results.json).

The record was made with ``python tests/golden/capture.py``; a refactor of the runtime, the gate or
the bundle format must leave every answer unchanged: labels, flags and t* exactly, the gate's score
exactly (the C++ gate is bit-identical to the oracle), probabilities to float32 rounding.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
import capture  # noqa: E402

RECORD = json.loads(capture.RECORD.read_text())


@pytest.fixture(scope="module")
def inputs():
    imgs, x = capture.golden_inputs(capture.dataset_of_default_bundle())
    assert capture.digest(imgs) == RECORD["inputs"]["scans_sha256"], "the synthetic generator changed, not the runtime"
    assert capture.digest(x) == RECORD["inputs"]["x_sha256"]
    return imgs, x


@pytest.mark.parametrize("backend", sorted(capture.RUNS))
def test_default_bundle_answers_as_recorded(backend, inputs):
    imgs, x = inputs
    got = capture.answers(backend, x, imgs)
    want = RECORD["results"][backend]
    assert len(got) == len(want) == 2 * capture.NUM_SCANS + 2
    assert any(w["flagged"] for w in want) and not all(w["flagged"] for w in want)  # both paths are pinned
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        for k in ("label", "flagged", "t_star", "status", "seed", "score"):
            assert g[k] == w[k], f"scan {i} ({backend}): {k} is {g[k]!r}, recorded {w[k]!r}"
        assert g["probabilities"].keys() == w["probabilities"].keys()
        for c, p in w["probabilities"].items():
            assert g["probabilities"][c] == pytest.approx(p, abs=2e-6), f"scan {i} ({backend}): p({c})"
