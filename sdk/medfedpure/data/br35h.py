"""Br35H (users bring it): read, deduplicate, partition into sites, write the medfedpure layout.

Br35H ("Brain Tumor Detection 2020") has ``yes/`` (tumour) and ``no/`` (no tumour) folders of
JPG slices of varying size and an unlabelled ``pred/`` folder, which is skipped. Some copies hold
the same image more than once: files are deduplicated by the sha256 of their bytes (the first by
sorted path is kept); an image found in both ``yes/`` and ``no/`` is dropped altogether, because
its label is contradictory. The reader does not decode images — the loader does, through
``medfedpure.scan``.

Partitioning (:func:`partition_labels`), both seeded:

- IID: each class is shuffled and dealt round-robin to the sites from a random starting site, so
  site sizes differ by at most one per class and every site has the global label mix;
- Dirichlet label skew (Hsu et al. 2019, "Measuring the effects of non-identical data
  distribution"): for each class c, proportions p_c ~ Dir(α·1_N) over the N sites and the class
  is cut accordingly; small α → sites dominated by one class. Draws are repeated (up to 1000
  times, from the same generator) until every site holds at least ``min_per_site`` scans.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfedpure.data.layout import (
    CLASSES,
    IMAGE_EXTENSIONS,
    LABEL_DIRS,
    DataFolderError,
    fingerprint,
    prepare_out,
    sha256_file,
    site_counts,
    write_json,
)

_TAG_PARTITION = 0xB35


@dataclass(frozen=True)
class Br35HItem:
    """One unique labelled image: absolute ``path``, ``label`` (0 no / 1 yes), ``sha256`` of its bytes."""

    path: Path
    label: int
    sha256: str


@dataclass(frozen=True)
class Br35HIndex:
    """The deduplicated images (sorted by label dir then name) and what was removed.

    ``duplicates``: files dropped because an identical file (same label) was kept;
    ``conflicts``: distinct contents found under both yes/ and no/ (all copies dropped);
    ``skipped``: files ignored (``pred/``, non-image files).
    """

    items: tuple[Br35HItem, ...]
    duplicates: tuple[Path, ...]
    conflicts: tuple[str, ...]
    skipped: int

    @property
    def labels(self) -> np.ndarray:
        return np.array([it.label for it in self.items], dtype=np.int64)


def _class_dirs(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in root.iterdir():
        if p.is_dir() and p.name.lower() in LABEL_DIRS:
            if p.name.lower() in found:
                raise DataFolderError(f"{root} has both {found[p.name.lower()].name}/ and {p.name}/: keep one")
            found[p.name.lower()] = p
    return found


def read_br35h(root: str | Path) -> Br35HIndex:
    """Index a Br35H copy: ``root/yes``, ``root/no`` (case-insensitive; ``pred/`` and others skipped).

    Raises:
        DataFolderError: root missing, or without both yes/ and no/, or with no images in one of them.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataFolderError(f"Br35H folder {root} does not exist: pass the folder that holds yes/ and no/")
    dirs = _class_dirs(root)
    missing = [d for d in LABEL_DIRS if d not in dirs]
    if missing:
        raise DataFolderError(f"{root} lacks {', '.join(m + '/' for m in missing)}: expected Br35H's yes/ and no/ folders")
    skipped = sum(1 for p in root.rglob("*") if p.is_file() and p.parent.name.lower() not in LABEL_DIRS)
    by_hash: dict[str, list[tuple[Path, int]]] = {}
    for name in sorted(LABEL_DIRS):
        label = LABEL_DIRS[name]
        files = sorted(p for p in dirs[name].iterdir() if p.is_file())
        imgs = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        skipped += len(files) - len(imgs)
        if not imgs:
            raise DataFolderError(f"{dirs[name]} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        for p in imgs:
            by_hash.setdefault(sha256_file(p), []).append((p, label))
    items, dups, conflicts = [], [], []
    for digest, copies in by_hash.items():
        labels = {lab for _, lab in copies}
        if len(labels) > 1:
            conflicts.append(digest)
            continue
        copies.sort()
        items.append(Br35HItem(path=copies[0][0], label=copies[0][1], sha256=digest))
        dups += [p for p, _ in copies[1:]]
    items.sort(key=lambda it: (it.label, it.path.name, str(it.path)))
    return Br35HIndex(items=tuple(items), duplicates=tuple(sorted(dups)), conflicts=tuple(sorted(conflicts)),
                      skipped=skipped)


def partition_labels(labels: np.ndarray, num_sites: int, *, seed: int, alpha: float | None = None,
                     min_per_site: int = 10) -> list[np.ndarray]:
    """Assign items to sites.

    Args:
        labels: int [N] class labels (0 / 1).
        num_sites: N_s ≥ 1.
        seed: the partition is a function of (labels, num_sites, seed, alpha).
        alpha: None → IID (stratified round-robin); > 0 → Dirichlet(α) label skew.
        min_per_site: every site must get at least this many items.
    Returns:
        ``num_sites`` sorted int64 index arrays, disjoint, covering all items.
    Raises:
        ValueError: bad arguments, or no Dirichlet draw satisfied ``min_per_site``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels has shape {labels.shape}: expected [N]")
    if num_sites < 1:
        raise ValueError(f"num_sites={num_sites}: expected at least 1")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"alpha={alpha}: the Dirichlet concentration must be > 0 (or None for IID)")
    if len(labels) < num_sites * min_per_site:
        raise ValueError(f"{len(labels)} items cannot give {num_sites} sites {min_per_site} items each: "
                         "use fewer sites")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG_PARTITION, num_sites]))
    classes = np.unique(labels)
    for _attempt in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_sites)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            if alpha is None:
                start = int(rng.integers(num_sites))
                for j, i in enumerate(idx):
                    parts[(start + j) % num_sites].append(int(i))
            else:
                p = rng.dirichlet(np.full(num_sites, alpha))
                cuts = (np.cumsum(p)[:-1] * len(idx)).round().astype(int)
                for s, chunk in enumerate(np.split(idx, cuts)):
                    parts[s] += chunk.tolist()
        if min(len(p) for p in parts) >= min_per_site:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"no Dirichlet(alpha={alpha}) partition in 1000 draws gave every one of {num_sites} sites "
                     f"{min_per_site} items: raise alpha or use fewer sites")


def write_br35h_sites(index: Br35HIndex, out: str | Path, num_sites: int, *, seed: int = 0,
                      alpha: float | None = None, source: str | Path | None = None,
                      min_per_site: int = 10, overwrite: bool = False) -> dict:
    """Copy the partitioned images to ``out/site_k/{yes,no}/`` (self-contained: no links back to
    the source) and write ``out/dataset.json`` (kind "br35h", seed, alpha, counts, dedup report,
    fingerprint). File names keep the original name; a clash inside one folder gets the hash prefix.
    Returns the dataset.json content.
    """
    out = Path(out)
    parts = partition_labels(index.labels, num_sites, seed=seed, alpha=alpha, min_per_site=min_per_site)
    prepare_out(out, overwrite)
    inv = {v: k for k, v in LABEL_DIRS.items()}
    for s, idx in enumerate(parts):
        for d in LABEL_DIRS:
            (out / f"site_{s}" / d).mkdir(parents=True, exist_ok=True)
        for i in idx:
            it = index.items[int(i)]
            dest = out / f"site_{s}" / inv[it.label] / it.path.name
            if dest.exists():
                dest = dest.with_name(f"{it.sha256[:12]}_{it.path.name}")
            shutil.copyfile(it.path, dest)
    from medfedpure import __version__

    meta = {
        "format": "medfedpure-data",
        "format_version": 1,
        "kind": "br35h",
        "note": "derived from a user-supplied copy of Br35H (yes/ = tumor, no/ = no_tumor; pred/ skipped)",
        "source": str(Path(source).resolve()) if source is not None else None,
        "classes": list(CLASSES),
        "label_dirs": LABEL_DIRS,
        "num_sites": num_sites,
        "seed": seed,
        "partition": {"scheme": "iid" if alpha is None else "dirichlet", "alpha": alpha,
                      "min_per_site": min_per_site},
        "dedup": {"unique": len(index.items), "duplicates_removed": len(index.duplicates),
                  "label_conflicts_removed": len(index.conflicts), "skipped_files": index.skipped},
        "medfedpure_version": __version__,
        "counts": site_counts(out),
        "fingerprint": fingerprint(out),
    }
    write_json(out / "dataset.json", meta)
    return meta
