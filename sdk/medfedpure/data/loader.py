"""Load one site's split as model input, through the same :func:`medfedpure.scan.load_scan` +
:func:`medfedpure.scan.preprocess` path that inference uses (so training and deployment see
identically preprocessed scans).

Results are cached, keyed by the sha256 of (resolved root, site, split, size, the bytes of
every source file of the ``medfedpure.scan`` package, and every listed file's path, byte size and
modification time): a
rewritten file, a changed split or changed preprocessing code misses the cache.

- in memory, per process (LRU, 2 GiB at most); callers get a fresh copy each time;
- on disk as ``ROOT/.cache/split-<key>.npz`` (plain arrays, read with ``allow_pickle=False``),
  written atomically, so fresh processes (federated clients start one per round) skip decoding.
  Skipped silently when the folder is read-only.

The disk cache is about an order of magnitude faster than decoding the PNGs again, and the memory
cache another order faster than the disk cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from medfedpure.data.layout import CLASSES, LABEL_DIRS, DataFolderError, num_sites
from medfedpure.data.splits import SPLITS, read_splits

_CACHE: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
_CACHE_MAX_BYTES = 2 << 30


def split_files(root: str | Path, site: int, split: str) -> list[tuple[str, int]]:
    """(relative path, label) of one site's split, in the order of ``splits.json`` (sorted paths)."""
    root = Path(root)
    n = num_sites(root)
    if not isinstance(site, (int, np.integer)) or not 0 <= int(site) < n:
        raise DataFolderError(f"site={site!r}: {root} has sites 0..{n - 1}")
    if split not in SPLITS and split != "all":
        raise DataFolderError(f"split={split!r}: expected one of {SPLITS} or 'all'")
    entry = read_splits(root)["sites"].get(f"site_{int(site)}")
    if entry is None:
        raise DataFolderError(f"{root}/splits.json has no entry for site_{site}: rewrite it with make_splits")
    names = [p for s in SPLITS for p in entry[s]] if split == "all" else list(entry[split])
    out = []
    for rel in names:
        parts = Path(rel).parts
        if len(parts) != 3 or parts[1] not in LABEL_DIRS or parts[0] != f"site_{int(site)}":
            raise DataFolderError(f"{root}/splits.json lists {rel!r}: expected site_{site}/(yes|no)/FILE")
        out.append((rel, LABEL_DIRS[parts[1]]))
    return out


#: the lesion kinds of the synthetic generator's tumours (``scan_params.jsonl``), and the kind of a scan without one
LESION_KINDS = ("conspicuous", "small", "faint")
NO_LESION = "none"


def lesion_kinds(root: str | Path, site: int, split: str) -> list[str] | None:
    """Each scan's lesion kind, in :func:`split_files` order: ``"none"`` for a scan without a tumour, else
    one of :data:`LESION_KINDS` — from the synthetic generator's ``scan_params.jsonl``; None where the
    data has no such file (real scans carry no lesion kind).

    Raises:
        DataFolderError: the file exists but does not describe every scan of the split, or a scan's
            recorded label or lesion kind disagrees with its folder.
    """
    root = Path(root)
    path = root / "scan_params.jsonl"
    if not path.is_file():
        return None
    files = split_files(root, site, split)
    params: dict[str, dict] = {}
    try:
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                params[rec["file"]] = rec
    except (ValueError, KeyError, TypeError) as exc:
        raise DataFolderError(f"{path}: not one JSON record with a 'file' per line ({exc})") from None
    out = []
    for rel, label in files:
        rec = params.get(rel)
        if rec is None:
            raise DataFolderError(f"{path} has no record of {rel}: regenerate the data or remove the file")
        tumour = rec.get("tumour")
        kind = NO_LESION if tumour is None else tumour.get("kind") if isinstance(tumour, dict) else None
        if (kind == NO_LESION) != (label == 0) or (kind != NO_LESION and kind not in LESION_KINDS):
            raise DataFolderError(f"{path}: {rel} is recorded with tumour {tumour!r}, which disagrees with its "
                                  f"folder (label {label})")
        out.append(kind)
    return out


@functools.lru_cache(maxsize=1)
def _scan_code_hash() -> str:
    import medfedpure.scan

    h = hashlib.sha256()
    for f in sorted(Path(medfedpure.scan.__file__).parent.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _key(root: Path, site: int, split: str, size: int, files: list[tuple[str, int]]) -> str:
    h = hashlib.sha256(f"{root.resolve()}|{site}|{split}|{size}|{_scan_code_hash()}".encode())
    for rel, _ in files:
        try:
            st = (root / rel).stat()
        except FileNotFoundError:
            raise DataFolderError(f"{root / rel} is listed in splits.json but missing: regenerate the "
                                  "splits (make_splits) or restore the file") from None
        h.update(f"\n{rel}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def load_split(root: str | Path, site: int, split: str, size: int = 128,
               *, cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One site's split as arrays.

    Args:
        root: data folder (``dataset.json``, ``splits.json``, ``site_k/{yes,no}``).
        site: site index in [0, num_sites(root)).
        split: "train", "val", "test" (or "all").
        size: model input side S.
        cache: reuse the in-memory or on-disk copy when the files are unchanged (module docstring).
    Returns:
        x float32 [N, 1, S, S] in [0, 1] (``preprocess`` output), y int64 [N] (0 no_tumor, 1 tumor),
        in ``splits.json`` order.
    Raises:
        DataFolderError: bad site / split or a malformed folder. ScanError: an unreadable scan
        (the message names the file).
    """
    from medfedpure.scan import ScanError, load_scan, preprocess

    root = Path(root)
    files = split_files(root, site, split)
    key = _key(root, int(site), split, size, files)
    if cache and key in _CACHE:
        _CACHE.move_to_end(key)
        x, y = _CACHE[key]
        return x.copy(), y.copy()
    disk = root / ".cache" / f"split-{key[:32]}.npz"
    if cache and disk.is_file():
        try:
            with np.load(disk, allow_pickle=False) as z:
                x, y = z["x"], z["y"]
            if x.shape == (len(files), 1, size, size) and y.shape == (len(files),):
                _remember(key, x, y)
                return x.copy(), y.copy()
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache entry: rebuild it
    x = np.empty((len(files), 1, size, size), dtype=np.float32)
    y = np.empty(len(files), dtype=np.int64)
    for i, (rel, label) in enumerate(files):
        try:
            x[i] = preprocess(load_scan(root / rel), size)
        except ScanError as e:
            raise ScanError(f"{root / rel}: {e}") from e
        y[i] = label
    if cache:
        _remember(key, x.copy(), y.copy())
        try:
            disk.parent.mkdir(exist_ok=True)
            tmp = disk.with_name(f".{disk.name}.{os.getpid()}.tmp.npz")
            np.savez(tmp, x=x, y=y)
            os.replace(tmp, disk)
        except OSError:
            pass  # read-only data folder: memory cache only
    return x, y


def _remember(key: str, x: np.ndarray, y: np.ndarray) -> None:
    _CACHE[key] = (x, y)
    while sum(a.nbytes + b.nbytes for a, b in _CACHE.values()) > _CACHE_MAX_BYTES and len(_CACHE) > 1:
        _CACHE.popitem(last=False)


def clear_cache(root: str | Path | None = None) -> None:
    """Drop this process's cached splits, and with ``root`` also that folder's on-disk cache."""
    _CACHE.clear()
    if root is not None:
        for p in (Path(root) / ".cache").glob("split-*.npz"):
            p.unlink()


__all__ = ["CLASSES", "clear_cache", "load_split", "split_files"]
