"""Shared helpers of the detection research scripts (issue 3): cached splits, AUROC, timing.

Splits come from ``medfedpure.data.load_split`` when it exists, else from ``ROOT/splits.json``
through ``load_scan`` + ``preprocess`` (the same function the loader uses); arrays are cached
as .npy under ``runs/dev/cache`` so that every script reads the same scans.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
# MEDFEDPURE_DATA picks another generated data set (its arrays are cached in their own folder).
DATA = Path(os.environ.get("MEDFEDPURE_DATA", ROOT / "data" / "synth128")).resolve()
CACHE = ROOT / "runs" / "dev" / ("cache" if DATA.name == "synth128" else f"cache_{DATA.name}")


def load(site: int, split: str, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    CACHE.mkdir(parents=True, exist_ok=True)
    fx, fy = CACHE / f"s{site}_{split}_{size}_x.npy", CACHE / f"s{site}_{split}_{size}_y.npy"
    if fx.is_file():
        return np.load(fx), np.load(fy)
    try:
        from medfedpure.data import load_split

        x, y = load_split(DATA, site, split, size)
    except ImportError:
        from medfedpure import load_scan, preprocess
        from medfedpure.data.splits import read_splits

        files = read_splits(DATA)["sites"][f"site_{site}"][split]
        x = np.stack([preprocess(load_scan(DATA / f), size) for f in files]).astype(np.float32)
        y = np.array([1 if "/yes/" in f"/{f}" else 0 for f in files], dtype=np.int64)
    np.save(fx, x)
    np.save(fy, y)
    return x, y


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(score_pos > score_neg) + ½ P(tie): the Mann–Whitney form of the ROC area."""
    neg, pos = np.asarray(neg, np.float64), np.asarray(pos, np.float64)
    allv = np.concatenate([neg, pos])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sv = allv[order]
    i = 0
    while i < len(sv):  # average ranks of ties
        j = i
        while j + 1 < len(sv) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1
        i = j + 1
    rp = ranks[len(neg):].sum()
    return float((rp - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def machine() -> str:
    import os

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), CPU only"
