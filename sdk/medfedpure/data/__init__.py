"""Data: synthetic Br35H-layout generator, Br35H reader, site partitioning, splits, loader.

Folder layout and names: ``docs/interfaces.md`` ("Data"). The public entry points:

- :func:`load_split` (root, site, split, size) → x float32 [N,1,S,S] in [0,1], y int64 [N];
  :func:`num_sites`; :data:`CLASSES` = ("no_tumor", "tumor").
- :func:`generate_synthetic` / :class:`SynthConfig` (``medfedpure data synth``).
- :func:`read_br35h`, :func:`partition_labels`, :func:`write_br35h_sites` (``medfedpure data split``).
- :func:`make_splits`, :func:`read_splits`; :func:`lesion_kinds` (synthetic data: each scan's lesion kind).

Heavy parts (the anatomy templates) load lazily on first use.
"""

from __future__ import annotations

from medfedpure.data.br35h import Br35HIndex, partition_labels, read_br35h, write_br35h_sites
from medfedpure.data.layout import CLASSES, LABEL_DIRS, DataFolderError, fingerprint, num_sites
from medfedpure.data.loader import LESION_KINDS, clear_cache, lesion_kinds, load_split, split_files
from medfedpure.data.splits import SPLITS, make_splits, read_splits
from medfedpure.data.synth import SiteProfile, SynthConfig, generate_synthetic, make_site_profiles

__all__ = [
    "CLASSES",
    "Br35HIndex",
    "LABEL_DIRS",
    "LESION_KINDS",
    "SPLITS",
    "DataFolderError",
    "SiteProfile",
    "SynthConfig",
    "clear_cache",
    "fingerprint",
    "generate_synthetic",
    "lesion_kinds",
    "load_split",
    "make_site_profiles",
    "make_splits",
    "num_sites",
    "partition_labels",
    "read_br35h",
    "read_splits",
    "split_files",
    "write_br35h_sites",
]
