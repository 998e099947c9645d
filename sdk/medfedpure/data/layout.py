"""The data folder layout shared by synthetic and Br35H-derived data sets.

```
ROOT/dataset.json                 kind ("synthetic" | "br35h"), seed, parameters, counts, fingerprint
ROOT/splits.json                  per site: train / val / test file lists (relative paths), seed
ROOT/site_k/yes/*.png|jpg|…       tumour (label 1)
ROOT/site_k/no/*.png|jpg|…        no tumour (label 0)
```

The fingerprint is the sha256 of the sorted lines "relative/path sha256(file bytes)": it names the
exact bytes of a data set (bundles record it as provenance).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

#: Class names in label order: index 0 = no tumour (Br35H ``no/``), 1 = tumour (``yes/``).
CLASSES = ("no_tumor", "tumor")
#: Folder name → label.
LABEL_DIRS = {"no": 0, "yes": 1}
#: Image file extensions the readers accept (case-insensitive).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")
_SITE_RE = re.compile(r"^site_(\d+)$")


class DataFolderError(ValueError):
    """A data folder is missing, malformed or inconsistent; the message names the problem and the fix."""


def site_dir(root: str | Path, site: int) -> Path:
    return Path(root) / f"site_{site}"


def num_sites(root: str | Path) -> int:
    """Number of sites in a data folder (``site_0`` … ``site_{N-1}``, contiguous).

    Raises:
        DataFolderError: no such folder, no sites, or a gap in the numbering.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataFolderError(f"data folder {root} does not exist: create it with `medfedpure data synth` "
                              "or `medfedpure data split`")
    ids = sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _SITE_RE.match(p.name)))
    if not ids:
        raise DataFolderError(f"{root} holds no site_k folders: is it a medfedpure data folder?")
    if ids != list(range(len(ids))):
        raise DataFolderError(f"{root}: site folders {ids} are not numbered 0..N-1")
    return len(ids)


def list_site_images(root: str | Path, site: int) -> list[tuple[str, int]]:
    """All images of one site as (path relative to root, POSIX separators; label), sorted by path."""
    root = Path(root)
    out: list[tuple[str, int]] = []
    for name, label in LABEL_DIRS.items():
        d = site_dir(root, site) / name
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                out.append((p.relative_to(root).as_posix(), label))
    out.sort()
    return out


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(root: str | Path) -> str:
    """sha256 over the sorted "relpath sha256" lines of every image of every site."""
    root = Path(root)
    lines = []
    for site in range(num_sites(root)):
        for rel, _ in list_site_images(root, site):
            lines.append(f"{rel} {sha256_file(root / rel)}")
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def site_counts(root: str | Path) -> list[dict[str, int]]:
    """Per site: {"no_tumor": n0, "tumor": n1}."""
    counts = []
    for site in range(num_sites(root)):
        labels = [lab for _, lab in list_site_images(root, site)]
        counts.append({CLASSES[c]: labels.count(c) for c in (0, 1)})
    return counts


def write_json(path: str | Path, obj: dict) -> None:
    """Write JSON atomically (temporary file + rename): readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_dataset_json(root: str | Path) -> dict:
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise DataFolderError(f"{path} is missing: is {root} a medfedpure data folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataFolderError(f"{path} is not valid JSON ({e}): regenerate the data folder") from e


def prepare_out(out: Path, overwrite: bool) -> None:
    """Make ``out`` an empty folder: refuse a non-empty one unless ``overwrite``, which removes only
    the ``site_*`` folders, the JSON files and the loader cache that medfedpure writes there."""
    if out.exists() and not out.is_dir():
        raise DataFolderError(f"output {out} exists and is not a folder: choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataFolderError(f"output folder {out} is not empty: choose a new folder or pass --overwrite")
        for p in out.iterdir():
            if p.is_dir() and p.name.startswith("site_"):
                shutil.rmtree(p)
            elif p.is_dir() and p.name == ".cache":
                shutil.rmtree(p)
            elif p.name in ("dataset.json", "splits.json", "scan_params.jsonl"):
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
