"""Record what the embedded default bundle answers for fixed scans and seeds.

The record (``default_bundle_results.json`` beside this file) pins the default bundle's behaviour:
``tests/test_golden.py`` re-runs the same scans with the same seeds and requires the same labels,
flags, t*, scores and probabilities. Re-record only when the bundle's models or gate are meant to
change (``python tests/golden/capture.py``), and say so in the commit.

Inputs: synthetic scans from the bundle site's own scanner profile (``medfedpure.demo.synthetic_scans``),
clean and with seeded uniform ℓ∞ noise of 8/255 (broadband, so the gate flags them and the purified
path runs too). Their sha256 is recorded, so a change of the generator is told apart from a change
of the runtime.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RECORD = HERE / "default_bundle_results.json"
NUM_SCANS = 8
SEEDS = (11, 12, 13, 14, 15, 16, 17, 18)
NOISE_SEED = 2026
EPS = 8 / 255
#: (backend, gate policy) runs; None keeps the bundle's policy
RUNS = {"onnxruntime": ("onnxruntime", None), "torch": ("torch", None), "onnxruntime+floor": ("onnxruntime", "floor")}


def golden_inputs(dataset: dict) -> tuple[np.ndarray, np.ndarray]:
    """(scans uint8 [n, S, S], x float32 [2n, 1, S, S]: clean then noisy)."""
    from medfedpure.demo import synthetic_scans

    imgs, _ = synthetic_scans(NUM_SCANS, 128, seed=3, site=int(dataset.get("site", 0)), dataset=dataset)
    clean = (imgs.astype(np.float32) / np.float32(255))[:, None]
    rng = np.random.default_rng(NOISE_SEED)
    noisy = np.clip(clean + rng.uniform(-EPS, EPS, clean.shape).astype(np.float32), 0, 1).astype(np.float32)
    return imgs, np.concatenate([clean, noisy])


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def answers(run: str, x: np.ndarray, imgs: np.ndarray) -> list[dict]:
    from medfedpure import Defender

    keep = ("label", "probabilities", "flagged", "score", "t_star", "status", "seed")
    backend, policy = RUNS[run]
    with Defender.default(backend=backend, policy=policy) as d:
        arr = d.run_array(x, seeds=list(SEEDS) * 2)
        full = [d.run(imgs[i], seed=SEEDS[i]) for i in range(2)]  # through load_scan + preprocess
    return [{k: getattr(r, k) for k in keep} for r in (*arr, *full)]


def dataset_of_default_bundle() -> dict:
    from medfedpure import Defender

    with Defender.default() as d:
        prov = d.bundle.manifest["provenance"]
    return {**prov["dataset"], "site": int(prov.get("site", 0))}


def main() -> None:
    dataset = dataset_of_default_bundle()
    imgs, x = golden_inputs(dataset)
    record = {
        "inputs": {"scans_sha256": digest(imgs), "x_sha256": digest(x), "num_scans": NUM_SCANS,
                   "seeds": list(SEEDS), "noise_seed": NOISE_SEED, "eps": EPS},
        "results": {run: answers(run, x, imgs) for run in RUNS},
    }
    RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    for b, rs in record["results"].items():
        print(b, [(r["label"], r["flagged"], r["t_star"]) for r in rs])


if __name__ == "__main__":
    main()
