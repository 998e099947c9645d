"""``medfedpure demo``: the embedded bundle on a few synthetic scans, clean and PGD-attacked.

What it shows, per scan: the true label; the Defender's decision on the clean scan and on the
same scan after an ℓ∞ PGD attack against the *undefended* classifier (the shipped torch weights);
the gate's flag, score and t*; the latency. A figure per scan (input, attacked, MAE per-patch
error map of the attacked scan, purified image) goes to the output folder, with a JSON summary.

The scans are rendered in-process by the synthetic generator (``medfedpure.data.synth``) with a
seed far from the training seeds, so they are unseen. This is a demonstration on synthetic data,
not a robustness evaluation (that is :mod:`medfedpure.eval`, following docs/evaluation.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfedpure.runtime.defender import Defender, Result

DEMO_SEED = 90_210


@dataclass(frozen=True)
class DemoConfig:
    """Demo settings: ``n`` scans (2–32), PGD radius ``eps`` in [0,1] units, ``steps`` PGD steps."""

    n: int = 4
    eps: float = 8 / 255
    steps: int = 10
    seed: int = DEMO_SEED

    def __post_init__(self) -> None:
        if not 2 <= self.n <= 32:
            raise ValueError(f"n={self.n}: expected 2..32 scans")
        if not 0 < self.eps <= 0.25:
            raise ValueError(f"eps={self.eps}: expected (0, 0.25]")
        if not 1 <= self.steps <= 200:
            raise ValueError(f"steps={self.steps}: expected 1..200")


def synthetic_scans(n: int, size: int, seed: int, site: int = 0,
                    dataset: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` fresh synthetic scans (balanced labels) as uint8 [n, S, S] PNG-range images, labels [n].

    With ``dataset`` (the bundle's provenance of a synthetic training set: seed, num_sites,
    generator_version, config) the scans come from the bundle site's own simulated scanner — the
    gate is calibrated per site, so that is the scanner it is meant for — at scan indices far past
    the training set's (``1_000_000 + seed·1000 + i``), so they are unseen. Without it, a fresh
    scanner profile drawn from ``seed`` is used.
    """
    from medfedpure.data.anatomy import load_anatomy
    from medfedpure.data.synth import SynthConfig, make_site_profiles, render_scan

    if dataset and dataset.get("kind") == "synthetic" and "seed" in dataset:
        dcfg = dict(dataset.get("config") or {})
        num_sites = int(dataset.get("num_sites", dcfg.get("sites", site + 1)))
        cfg = SynthConfig(sites=num_sites, per_site=int(dcfg.get("per_site", max(n, 2))), size=size,
                          seed=int(dataset["seed"]),
                          tumor_fraction=float(dcfg.get("tumor_fraction", 0.5)),
                          subtle_fraction=float(dcfg.get("subtle_fraction", 0.2)),
                          z_range_mm=tuple(dcfg.get("z_range_mm", (-4.0, 56.0))),
                          version=int(dataset.get("generator_version", 1)))
        first = 1_000_000 + 1000 * seed
    else:
        cfg = SynthConfig(sites=max(site + 1, 1), per_site=max(n, 2), size=size, seed=seed)
        first = 0
    profile = make_site_profiles(cfg.sites, cfg.seed)[site]
    anat = load_anatomy()
    labels = np.array([i % 2 for i in range(n)], dtype=np.int64)
    imgs = np.stack([render_scan(anat, profile, cfg, site, first + i, int(labels[i])).png for i in range(n)])
    return imgs, labels


def attack(defender: Defender, x: np.ndarray, y: np.ndarray, cfg: DemoConfig) -> np.ndarray:
    """PGD ℓ∞ against the bundle's classifier (its torch weights), x [B,1,S,S] in [0,1] → x_adv."""
    import torch

    from medfedpure.runtime.engines.torch_engine import model_from_bytes
    from medfedpure.train.attacks import pgd_linf

    art = defender.bundle.find("classifier", "safetensors", "fp32")
    if art is None:
        raise ValueError("the bundle has no torch classifier weights to attack")
    model = model_from_bytes(defender.bundle.read_bytes(art.name))[0]
    g = torch.Generator().manual_seed(cfg.seed)
    x_adv = pgd_linf(model, torch.from_numpy(x), torch.from_numpy(y), cfg.eps, steps=cfg.steps, generator=g)
    return x_adv.numpy().astype(np.float32)


def _figure(path: Path, x: np.ndarray, x_adv: np.ndarray, r_adv: Result, patch: int, title: str,
            stat: str = "mean") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = x.shape[-1]
    g = s // patch
    err = np.zeros((s, s), np.float32) if r_adv.patch_error is None else \
        np.kron(r_adv.patch_error.reshape(g, g), np.ones((patch, patch), np.float32))
    pur = x_adv[0] if r_adv.purified is None else r_adv.purified[0]
    fig, ax = plt.subplots(1, 4, figsize=(12, 3.4))
    for a, img, name, kw in [
        (ax[0], x[0], "input", {"cmap": "gray", "vmin": 0, "vmax": 1}),
        (ax[1], x_adv[0], f"attacked (|δ|∞ = {np.abs(x_adv - x).max():.3f})", {"cmap": "gray", "vmin": 0, "vmax": 1}),
        (ax[2], err, f"gate per-patch statistic ({stat}; score {r_adv.score:.3g})" if r_adv.score is not None
         else f"gate per-patch statistic ({stat})",
         {"cmap": "magma"}),
        (ax[3], pur, f"purified (t* = {r_adv.t_star})", {"cmap": "gray", "vmin": 0, "vmax": 1}),
    ]:
        im = a.imshow(img, **kw)
        a.set_title(name, fontsize=9)
        a.axis("off")
        if a is ax[2]:
            fig.colorbar(im, ax=a, fraction=0.046)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(defender: Defender, out: str | Path, cfg: DemoConfig = DemoConfig()) -> list[dict[str, Any]]:
    """Run the demo; returns one row per scan (also written to ``out/demo.json``) and writes figures."""
    from medfedpure.scan import preprocess

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    provenance = defender.bundle.manifest.get("provenance", {})
    site = int(provenance.get("site", 0) or 0)
    imgs, y = synthetic_scans(cfg.n, defender.image_size, cfg.seed, site=site, dataset=provenance.get("dataset"))
    x = np.stack([preprocess(im, defender.image_size) for im in imgs]).astype(np.float32)
    x_adv = attack(defender, x, y, cfg)
    seeds = [cfg.seed + i for i in range(cfg.n)]
    # One scan per call, so each row's latency is that scan's own (a batch shares its stage times).
    clean = [defender.run_array(x[i:i + 1], seeds=[seeds[i]])[0] for i in range(cfg.n)]
    adv = [defender.run_array(x_adv[i:i + 1], seeds=[seeds[i]], return_purified=True, return_patch_error=True)[0]
           for i in range(cfg.n)]
    classes = defender.classes
    rows = []
    for i in range(cfg.n):
        for kind, r in (("clean", clean[i]), ("pgd", adv[i])):
            rows.append({"scan": i, "input": kind, "true": classes[int(y[i])], "label": r.label,
                         "correct": r.label == classes[int(y[i])], "flagged": r.flagged, "score": r.score,
                         "t_star": r.t_star, "status": r.status, "latency_ms": r.latency_ms["total"],
                         "seed": r.seed})
        fig = out / f"scan_{i:02d}.png"
        _figure(fig, x[i], x_adv[i], adv[i], defender.bundle.spec.mae.patch,
                f"scan {i}: true {classes[int(y[i])]} · clean → {clean[i].label} · PGD → {adv[i].label} "
                f"(flagged {adv[i].flagged})", stat=defender.bundle.spec.gate.stat)
    summary = {"bundle_id": defender.bundle.bundle_id, "backend": defender.engine.describe(),
               "config": {"n": cfg.n, "eps": cfg.eps, "steps": cfg.steps, "seed": cfg.seed},
               "note": "synthetic scans (not Br35H); PGD against the undefended classifier", "rows": rows}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    return rows
