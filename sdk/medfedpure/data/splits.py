"""Deterministic, stratified train / val / test splits per site, recorded in ``ROOT/splits.json``.

For each site and each class separately, the class's files (sorted by path) are shuffled by a
generator seeded from (seed, site, class); the first ``round(n·val)`` go to ``val``, the next
``round(n·test)`` to ``test``, the rest to ``train``. Lists are stored sorted. So a split depends
only on the seed, the fractions and the set of file names — not on listing order or on other sites.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medfedpure.data.layout import DataFolderError, list_site_images, num_sites, write_json

SPLITS = ("train", "val", "test")
_TAG_SPLIT = 0x5B117


def split_site(files: list[tuple[str, int]], site: int, seed: int,
               fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> dict[str, list[str]]:
    """Split one site's (relpath, label) list; see the module docstring. Returns split → sorted relpaths."""
    _check_fractions(fractions)
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for label in (0, 1):
        paths = sorted(p for p, lab in files if lab == label)
        rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG_SPLIT, site, label]))
        order = [paths[i] for i in rng.permutation(len(paths))]
        n = len(order)
        n_val = int(round(n * fractions[1]))
        n_test = int(round(n * fractions[2]))
        out["val"] += order[:n_val]
        out["test"] += order[n_val:n_val + n_test]
        out["train"] += order[n_val + n_test:]
    return {s: sorted(v) for s, v in out.items()}


def make_splits(root: str | Path, seed: int = 0,
                fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> dict:
    """Split every site of a data folder and write ``ROOT/splits.json``; returns its content.

    Format: ``{"seed": int, "fractions": {"train", "val", "test"}, "stratified_by": "label",
    "sites": {"site_k": {"train": [relpath, …], "val": […], "test": […]}}}``.
    """
    _check_fractions(fractions)
    if seed < 0:
        raise ValueError(f"seed={seed}: expected a non-negative integer")
    root = Path(root)
    sites = {}
    for site in range(num_sites(root)):
        files = list_site_images(root, site)
        if not files:
            raise DataFolderError(f"{root}/site_{site} holds no images in yes/ or no/")
        sites[f"site_{site}"] = split_site(files, site, seed, fractions)
    obj = {
        "seed": seed,
        "fractions": dict(zip(SPLITS, fractions, strict=True)),
        "stratified_by": "label",
        "sites": sites,
    }
    write_json(root / "splits.json", obj)
    return obj


def read_splits(root: str | Path) -> dict:
    """``ROOT/splits.json`` (see :func:`make_splits`); DataFolderError when missing or malformed."""
    path = Path(root) / "splits.json"
    if not path.is_file():
        raise DataFolderError(f"{path} is missing: run `medfedpure data split` or `medfedpure data synth`, "
                              "or medfedpure.data.make_splits(root)")
    try:
        obj = json.loads(path.read_text())
        obj["sites"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataFolderError(f"{path} is malformed ({e!r}): rewrite it with medfedpure.data.make_splits") from e
    return obj


def _check_fractions(fractions: tuple[float, float, float]) -> None:
    if len(fractions) != 3 or any(not 0.0 <= f <= 1.0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions {fractions}: expected three values in [0, 1] (train, val, test) summing to 1")
    if fractions[0] <= 0.0:
        raise ValueError(f"split fractions {fractions}: the train fraction must be positive")
