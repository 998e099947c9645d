"""Summaries of a data folder: counts per site, class and split; intensity and noise statistics; a
figure of example scans per site and class (what ``medfedpure data info`` prints and draws)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfedpure.data.layout import CLASSES, list_site_images, num_sites
from medfedpure.data.splits import SPLITS


def background_noise_sigma(img: np.ndarray, band: float = 0.12) -> float:
    """Noise std estimated from the image's air background, in the image's units.

    In a magnitude MR image the air is Rayleigh distributed with median σ·sqrt(2 ln 2), so
    σ = median / 1.1774 over the four corner squares of side ``band``·side (air on axial head
    slices; the median stays robust while the head covers less than half of them).

    Args:
        img: [H, W] grey, any real dtype.
    """
    a = np.asarray(img, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {a.shape}")
    h, w = a.shape
    bh, bw = max(1, int(h * band)), max(1, int(w * band))
    ring = np.concatenate([a[:bh, :bw].ravel(), a[:bh, -bw:].ravel(), a[-bh:, :bw].ravel(), a[-bh:, -bw:].ravel()])
    return float(np.median(ring) / np.sqrt(2.0 * np.log(2.0)))


@dataclass(frozen=True)
class SiteSummary:
    """One site: counts per class and split; mean/std of foreground intensity (8-bit units, head
    pixels above 10 % of the image's maximum) and of the background noise σ over its scans."""

    site: int
    counts: dict[str, dict[str, int]]  # class → {"total", "train", "val", "test"}
    fg_mean: float
    fg_std: float
    noise_mean: float
    noise_std: float


def _read_grey(path: Path) -> np.ndarray:
    from medfedpure.scan import load_scan

    px = np.asarray(load_scan(path).pixels, dtype=np.float32)
    if px.ndim == 3:  # ITU-R 601 luma, as preprocess does
        px = px[..., 0] * 0.299 + px[..., 1] * 0.587 + px[..., 2] * 0.114
    return px


def summarize(root: str | Path, *, max_per_site: int = 200) -> list[SiteSummary]:
    """Summaries of every site; statistics from up to ``max_per_site`` scans (evenly spaced by path)."""
    from medfedpure.data.splits import read_splits

    root = Path(root)
    try:
        splits = read_splits(root)["sites"]
    except ValueError:
        splits = {}
    out = []
    for site in range(num_sites(root)):
        files = list_site_images(root, site)
        where = {p: s for s in SPLITS for p in splits.get(f"site_{site}", {}).get(s, [])}
        counts = {}
        for c, name in enumerate(CLASSES):
            mine = [p for p, lab in files if lab == c]
            counts[name] = {"total": len(mine), **{s: sum(where.get(p) == s for p in mine) for s in SPLITS}}
        pick = files[:: max(1, len(files) // max_per_site)][:max_per_site] if files else []
        fg_means, noises = [], []
        for rel, _ in pick:
            img = _read_grey(root / rel)
            scale = 255.0 / max(float(img.max()), 1e-6)  # report in 8-bit units whatever the source
            img = img * scale
            fg = img[img > 0.1 * img.max()]
            fg_means.append(float(fg.mean()) if fg.size else 0.0)
            noises.append(background_noise_sigma(img))
        out.append(SiteSummary(
            site=site, counts=counts,
            fg_mean=float(np.mean(fg_means)) if fg_means else float("nan"),
            fg_std=float(np.std(fg_means)) if fg_means else float("nan"),
            noise_mean=float(np.mean(noises)) if noises else float("nan"),
            noise_std=float(np.std(noises)) if noises else float("nan"),
        ))
    return out


def draw_examples(root: str | Path, path: str | Path, *, per_class: int = 4, seed: int = 0) -> Path:
    """PNG grid: one row per site, ``per_class`` no_tumor then ``per_class`` tumor scans (seeded pick)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(root)
    n_sites = num_sites(root)
    cols = 2 * per_class
    fig, axes = plt.subplots(n_sites, cols, figsize=(1.6 * cols, 1.7 * n_sites + 0.4), squeeze=False)
    rng = np.random.default_rng(seed)
    for site in range(n_sites):
        files = list_site_images(root, site)
        for c in (0, 1):
            mine = [p for p, lab in files if lab == c]
            chosen = [mine[i] for i in sorted(rng.choice(len(mine), min(per_class, len(mine)), replace=False))] if mine else []
            for j in range(per_class):
                ax = axes[site, c * per_class + j]
                ax.set_xticks([])
                ax.set_yticks([])
                if j < len(chosen):
                    ax.imshow(_read_grey(root / chosen[j]), cmap="gray", interpolation="nearest")
                if j == 0:
                    ax.set_title(CLASSES[c], fontsize=8, loc="left")
            axes[site, 0].set_ylabel(f"site_{site}", fontsize=9)
    fig.suptitle(f"{root.name}: examples per site (rows) and class", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
