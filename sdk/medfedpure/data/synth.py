"""Synthetic Br35H-layout brain-MRI slices: real anatomy, per-site scanners, tumours with mass effect.

It is not Br35H and is never reported as Br35H: ``dataset.json`` says ``"kind": "synthetic"``.

One scan, step by step (:func:`render_scan`):

1. **Geometry.** Output pixel (row i, col j) → centred millimetres (u, v) with the scan's field of
   view (``fov_mm / size`` mm per pixel) → optional mass effect (radial pull towards the tumour
   centre, so the anatomy around a lesion is pushed outwards) → random in-plane rotation,
   anisotropic head scale, left-right flip and translation → MNI world (x, y) plus a smooth
   elastic displacement (random 5×5 grid of offsets upsampled bicubically) → z from the slice
   level plus a small oblique tilt (pitch, roll). Everything is sampled trilinearly from the
   templates (:mod:`.anatomy`) directly at the output resolution.
2. **Tissues.** Inside the brain: grey matter, white matter and CSF (brain − GM − WM: ventricles,
   sulci) fractions. Outside it, at distances from the closed brain envelope that vary smoothly
   around the head: subarachnoid CSF, inner table (cortical bone, dark), diploë (marrow),
   outer table, subcutaneous scalp fat (bright on T1), skin/galea, then air.
3. **Tumour** (``tumor`` class). An irregular lesion (radius modulated by low harmonics of the
   angle) with a necrotic core, an enhancing rim and a surrounding oedema that spreads
   preferentially along white matter, blended with a per-lesion *conspicuity*; a minority of
   lesions are small (3–6 mm radius) or faint (conspicuity 0.3–0.55), the rest as conspicuous as
   the Br35H tumours.
4. **Contrast.** Each tissue's intensity interpolates between a T1-like and a T2-like value with
   the site's ``t2_weight`` (T1-like sites also mix in the template's own T1 intensity).
5. **Scanner.** Multiplicative bias field exp(b·f), f a smooth random field; complex Gaussian
   noise, then k-space truncation to the site's acquisition fraction (lower resolution with Gibbs
   ringing, noise correlated accordingly), then the magnitude — so the noise is Rician and the
   background Rayleigh; finally a window to 8 bits with the site's display gamma.

Per-site profiles (:func:`make_site_profiles`) spread contrast, noise, resolution, bias and field
of view over the sites by stratified permutations of their ranges, so that the sites are
measurably non-IID; each scan jitters around its site's values.

Randomness: every scan draws from ``numpy.random.default_rng(SeedSequence([seed, TAG, site,
index]))`` spawned into independent streams for geometry, tumour and acquisition, so a scan is
fully determined by (seed, site, index), generation can run in any order or in parallel, and the
``tumor`` and ``no_tumor`` renderings of the same (seed, site, index) share anatomy and noise.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medfedpure.data.anatomy import ANATOMY_SOURCE, Anatomy, load_anatomy, sample
from medfedpure.progress import progress as progress_bar

GENERATOR_VERSION = 2
#: Versions render_scan reproduces byte for byte. 1: stronger scalp-thickness wobble, smoother
#: tumour texture; 2: the default.
GENERATOR_VERSIONS = (1, 2)
_TAG_SCAN = 0x5CA1
_TAG_SITE = 0x517E
_TAG_LABELS = 0x1ABE

#: Tissue intensities (T1-like, T2-like) before the scanner, brain WM ≈ 0.8 on T1.
TISSUE_CONTRAST: dict[str, tuple[float, float]] = {
    "wm": (0.80, 0.30),
    "gm": (0.52, 0.50),
    "csf": (0.10, 0.95),
    "bone": (0.03, 0.03),
    "marrow": (0.55, 0.35),
    "fat": (0.98, 0.75),
    "skin": (0.40, 0.28),
    "core": (0.12, 0.95),  # necrotic core: T1 dark, T2 bright
    "rim": (1.00, 0.55),  # enhancing rim (post-contrast T1), intermediate on T2
    "oedema": (0.42, 0.85),  # vasogenic oedema: T1 hypo-, T2 hyperintense
}


@dataclass(frozen=True)
class SiteProfile:
    """One site's scanner. Per-scan values jitter around these.

    Fields (ranges enforced by :func:`make_site_profiles`'s construction):
        t2_weight: 0 = T1-like contrast, 1 = T2-like.
        noise_sigma: std of the complex Gaussian noise, in units of the image (WM ≈ 0.8 on T1).
        noise_spread: per-scan log-normal spread of noise_sigma.
        kspace_fraction: fraction of k-space acquired along each axis (1 = full resolution).
        bias_strength: amplitude b of the bias field exp(b·f), f ~ smooth field of unit std.
        fov_mm: field of view (mm across the image); per-scan jitter ±4 %.
        gamma: display gamma applied to the 8-bit window.
    """

    t2_weight: float
    noise_sigma: float
    noise_spread: float
    kspace_fraction: float
    bias_strength: float
    fov_mm: float
    gamma: float

    def __post_init__(self) -> None:
        checks = {
            "t2_weight": (0.0, 1.0), "noise_sigma": (0.0, 0.5), "noise_spread": (0.0, 1.0),
            "kspace_fraction": (0.2, 1.0), "bias_strength": (0.0, 1.0), "fov_mm": (150.0, 400.0),
            "gamma": (0.3, 3.0),
        }
        for name, (lo, hi) in checks.items():
            v = getattr(self, name)
            if not (lo <= v <= hi):
                raise ValueError(f"SiteProfile.{name}={v} outside [{lo}, {hi}]")


@dataclass(frozen=True)
class SynthConfig:
    """What to generate.

    Fields:
        sites: number of sites (1–64).
        per_site: scans per site (≥ 2); ``round(per_site * tumor_fraction)`` of them are tumours.
        size: output side S in pixels (32–1024).
        seed: root seed (≥ 0).
        tumor_fraction: share of the ``tumor`` class per site (Br35H is balanced: 0.5).
        subtle_fraction: share of tumours that are small or faint.
        z_range_mm: axial levels (MNI z, mm) the slices are drawn from.
        version: generator version (:data:`GENERATOR_VERSIONS`); older versions stay reproducible.
    """

    sites: int = 4
    per_site: int = 600
    size: int = 128
    seed: int = 0
    tumor_fraction: float = 0.5
    subtle_fraction: float = 0.2
    z_range_mm: tuple[float, float] = (-4.0, 56.0)
    version: int = GENERATOR_VERSION

    def __post_init__(self) -> None:
        if not 1 <= self.sites <= 64:
            raise ValueError(f"sites={self.sites}: expected 1 to 64")
        if self.per_site < 2:
            raise ValueError(f"per_site={self.per_site}: expected at least 2 (one scan per class)")
        if not 32 <= self.size <= 1024:
            raise ValueError(f"size={self.size}: expected 32 to 1024 pixels")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed}: expected a non-negative integer")
        if not 0.0 < self.tumor_fraction < 1.0:
            raise ValueError(f"tumor_fraction={self.tumor_fraction}: expected in (0, 1)")
        if not 0.0 <= self.subtle_fraction <= 1.0:
            raise ValueError(f"subtle_fraction={self.subtle_fraction}: expected in [0, 1]")
        if self.version not in GENERATOR_VERSIONS:
            raise ValueError(f"version={self.version}: this medfedpure renders generator versions {GENERATOR_VERSIONS}")
        lo, hi = self.z_range_mm
        if not -20.0 <= lo <= hi <= 70.0:
            raise ValueError(f"z_range_mm={self.z_range_mm}: expected -20 <= lo <= hi <= 70")


def make_site_profiles(num_sites: int, seed: int) -> list[SiteProfile]:
    """Site scanners, deterministic in (num_sites, seed).

    Contrast alternates T1-like (even sites) / T2-like (odd sites); noise, resolution, bias and
    field of view are each spread over their range by an independent random permutation of
    strata, so any two sites differ in several properties.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG_SITE, num_sites]))

    def strata(lo: float, hi: float) -> np.ndarray:
        q = (rng.permutation(num_sites) + rng.uniform(0.15, 0.85, num_sites)) / num_sites
        return lo + (hi - lo) * q

    noise = strata(0.012, 0.07)
    kfrac = strata(0.5, 1.0)
    bias = strata(0.05, 0.45)
    fov = strata(185.0, 235.0)
    profiles = []
    for k in range(num_sites):
        t2 = rng.uniform(0.0, 0.2) if k % 2 == 0 else rng.uniform(0.75, 1.0)
        profiles.append(SiteProfile(
            t2_weight=round(float(t2), 4), noise_sigma=round(float(noise[k]), 5),
            noise_spread=0.2, kspace_fraction=round(float(kfrac[k]), 4),
            bias_strength=round(float(bias[k]), 4), fov_mm=round(float(fov[k]), 2),
            gamma=round(float(rng.uniform(0.8, 1.2)), 4),
        ))
    return profiles


def site_labels(cfg: SynthConfig, site: int) -> np.ndarray:
    """Labels (0 = no_tumor, 1 = tumor) of a site's scans by index: int64 [per_site], a seeded shuffle."""
    n_yes = int(round(cfg.per_site * cfg.tumor_fraction))
    n_yes = min(max(n_yes, 1), cfg.per_site - 1)
    labels = np.array([1] * n_yes + [0] * (cfg.per_site - n_yes), dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, _TAG_LABELS, site]))
    return rng.permutation(labels)


def scan_rngs(seed: int, site: int, index: int) -> tuple[np.random.Generator, ...]:
    """Independent (geometry, tumour, acquisition) generators for one scan."""
    ss = np.random.SeedSequence([seed, _TAG_SCAN, site, index])
    return tuple(np.random.default_rng(s) for s in ss.spawn(3))


@dataclass
class Rendered:
    """One rendered scan: ``image`` float32 [S, S] ≥ 0 (before the 8-bit window), ``png`` uint8 [S, S],
    ``tumor_mask`` bool [S, S] (lesion plus oedema; all False for no_tumor), ``params`` (JSON-able)."""

    image: np.ndarray
    png: np.ndarray
    tumor_mask: np.ndarray
    params: dict = field(default_factory=dict)


@functools.lru_cache(maxsize=32)
def _cubic_upsampler(grid: int, size: int) -> np.ndarray:
    """[size, grid] weights of Keys' cubic convolution (a = -0.5) from a grid lattice to size points
    spanning it end to end; rows sum to 1 (edge nodes clamped)."""
    pos = np.linspace(0.0, grid - 1.0, size)
    w = np.zeros((size, grid))
    base = np.floor(pos).astype(int)
    for off in (-1, 0, 1, 2):
        node = base + off
        t = np.abs(pos - node)
        k = np.where(t <= 1, 1.5 * t**3 - 2.5 * t**2 + 1,
                     np.where(t < 2, -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2, 0.0))
        np.add.at(w, (np.arange(size), np.clip(node, 0, grid - 1)), k)
    return w.astype(np.float32)


def _smooth_field(rng: np.random.Generator, grid: int, size: int) -> np.ndarray:
    """A smooth random field float32 [size, size] of roughly unit std: a grid×grid normal lattice
    upsampled by separable cubic convolution (cheap stand-in for a Gaussian random field)."""
    coarse = rng.standard_normal((grid, grid)).astype(np.float32)
    up = _cubic_upsampler(grid, size)
    return up @ coarse @ up.T


def _mix(name: str, t2w: float) -> float:
    t1, t2 = TISSUE_CONTRAST[name]
    return (1.0 - t2w) * t1 + t2w * t2


def _smoothstep(edge: np.ndarray | float, x: np.ndarray, width: float) -> np.ndarray:
    """1 where x < edge, 0 where x > edge, linear over ``width`` (anti-aliased region boundaries)."""
    return np.clip(0.5 + (edge - x) / width, 0.0, 1.0).astype(np.float32)


def _harmonic_radius(theta: np.ndarray, rng: np.random.Generator, amp: float) -> np.ndarray:
    """1 + Σ_k a_k cos(kθ + φ_k), k = 2..4, a_k ≤ amp/k: an irregular, star-shaped outline."""
    r = np.ones_like(theta, dtype=np.float32)
    for k in (2, 3, 4):
        r += (amp / k) * rng.uniform(0.3, 1.0) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return r


def render_scan(anat: Anatomy, profile: SiteProfile, cfg: SynthConfig, site: int, index: int,
                label: int) -> Rendered:
    """Render scan ``index`` of ``site`` with the given label (0 no_tumor, 1 tumor); see the module docstring."""
    S = cfg.size
    g_rng, t_rng, a_rng = scan_rngs(cfg.seed, site, index)

    # -- 1. geometry (drawn whether or not there is a tumour: yes/no renderings share it) ----------
    fov = profile.fov_mm * g_rng.uniform(0.96, 1.04)
    mm = fov / S
    z0 = g_rng.uniform(*cfg.z_range_mm)
    theta = math.radians(g_rng.normal(0.0, 6.0))
    scale = g_rng.normal(1.0, 0.05, 2).clip(0.88, 1.12)  # head size / shape
    flip = bool(g_rng.random() < 0.5)
    centre = np.array([g_rng.normal(0.0, 2.0), g_rng.normal(-17.0, 3.0)])  # brain centre in MNI (x, y)
    shift = g_rng.normal(0.0, 0.03 * fov, 2)  # head position in the field of view (mm)
    pitch, roll = (math.radians(a) for a in g_rng.normal(0.0, [5.0, 2.0]))
    elastic = np.stack([_smooth_field(g_rng, 5, S), _smooth_field(g_rng, 5, S)]) * g_rng.uniform(1.5, 3.5)
    layer_mm = {  # thickness of each layer outside the brain envelope, mm
        "csf": g_rng.uniform(1.0, 2.5), "inner": g_rng.uniform(1.2, 2.2), "marrow": g_rng.uniform(1.5, 4.0),
        "outer": g_rng.uniform(1.0, 1.8), "fat": g_rng.uniform(3.0, 7.0), "skin": g_rng.uniform(1.5, 3.0),
    }
    # scalp/skull thickness varies around the head
    layer_wobble = _smooth_field(g_rng, 6, S) * 0.18 if cfg.version == 1 else _smooth_field(g_rng, 4, S) * 0.07

    coords = (np.arange(S, dtype=np.float32) - (S - 1) / 2.0) * mm
    vv, uu = np.meshgrid(coords, coords, indexing="ij")  # v: rows (down = posterior), u: columns
    uu = uu - shift[0]
    vv = vv - shift[1]

    def to_world(u: np.ndarray, v: np.ndarray, el: np.ndarray | None) -> tuple[np.ndarray, ...]:
        u2 = -u if flip else u
        c, s_ = math.cos(theta), math.sin(theta)
        x = centre[0] + (c * u2 - s_ * v) / scale[0]
        y = centre[1] - (s_ * u2 + c * v) / scale[1]
        if el is not None:
            x = x + el[0]
            y = y + el[1]
        z = z0 + math.tan(pitch) * (y - centre[1]) + math.tan(roll) * (x - centre[0])
        return x, y, z

    # -- 3a. tumour placement (needs the anatomy without mass effect, on a coarse grid) ----------
    tumour: dict | None = None
    if label == 1:
        subtle = t_rng.random() < cfg.subtle_fraction
        kind = "faint" if subtle and t_rng.random() < 0.5 else ("small" if subtle else "conspicuous")
        radius = t_rng.uniform(3.0, 6.0) if kind == "small" else t_rng.uniform(8.0, 22.0)
        conspicuity = t_rng.uniform(0.3, 0.55) if kind == "faint" else t_rng.uniform(0.85, 1.0)
        step = max(1, S // 32)
        sub = (slice(None, None, step), slice(None, None, step))
        coarse = sample(anat, *to_world(uu[sub], vv[sub], elastic[(slice(None),) + sub]))
        depth = coarse[..., 5] * float(np.mean(scale))
        need = min(radius * 0.8 + 2.0, float(depth.max()) * 0.8)
        cand = np.argwhere(depth >= need)
        if len(cand) == 0:  # degenerate (tiny brain section): deepest point
            cand = np.argwhere(depth >= depth.max())
        ci, cj = cand[t_rng.integers(len(cand))] * step
        radius = min(radius, max(3.0, float(depth.max()) * 1.1))
        tumour = {
            "kind": kind, "radius_mm": float(radius), "conspicuity": float(conspicuity),
            "centre_px": [int(ci), int(cj)],
            "core_fraction": float(t_rng.choice([0.0, t_rng.uniform(0.35, 0.7)], p=[0.3, 0.7])),
            "oedema_factor": float(t_rng.uniform(1.2, 2.2)),
            "mass_effect": float(t_rng.uniform(0.25, 0.55)),
        }

    # -- 1b. mass effect: output point p samples the anatomy at c + (p - c)(1 - a·exp(-ρ²/2σ²)) ----
    if tumour is not None:
        cu, cv = uu[tumour["centre_px"][0], tumour["centre_px"][1]], vv[tumour["centre_px"][0], tumour["centre_px"][1]]
        du, dv = uu - cu, vv - cv
        rho2 = du * du + dv * dv
        sigma = 1.6 * tumour["radius_mm"]
        # monotone in ρ for a < 1, so the displaced anatomy never folds over
        pull = 1.0 - tumour["mass_effect"] * np.exp(-rho2 / (2.0 * sigma * sigma))
        su, sv = cu + du * pull, cv + dv * pull
    else:
        su, sv = uu, vv
    vol = sample(anat, *to_world(su, sv, elastic))
    t1, gm, wm, brain, head_dist = (vol[..., k] for k in range(5))

    # -- 2 & 4. tissues and contrast ---------------------------------------------------------------
    t2w = float(np.clip(profile.t2_weight + a_rng.normal(0.0, 0.03), 0.0, 1.0))
    csf_in = np.clip(brain - gm - wm, 0.0, 1.0)
    tissue_int = _mix("gm", t2w) * gm + _mix("wm", t2w) * wm + _mix("csf", t2w) * csf_in
    beta = 0.5 * (1.0 - t2w)  # T1-like sites borrow the template's own T1 detail
    img = (1.0 - beta) * tissue_int + beta * t1 * brain * 0.95

    d = head_dist * (1.0 + layer_wobble)
    edges = np.cumsum([layer_mm[k] for k in ("csf", "inner", "marrow", "outer", "fat", "skin")])
    w = 0.7 * mm
    outside = np.zeros_like(img)
    prev = np.zeros_like(img)
    for name, edge in zip(("csf", "bone", "marrow", "bone", "fat", "skin"), edges, strict=True):
        cum = _smoothstep(float(edge), d, w)
        outside += _mix(name, t2w) * (cum - prev)
        prev = cum
    img += (1.0 - brain) * outside
    head = prev  # inside the skin surface

    # -- 3b. tumour tissues ---------------------------------------------------------------------------
    tumor_mask = np.zeros((S, S), dtype=bool)
    if tumour is not None:
        ci, cj = tumour["centre_px"]
        du, dv = uu - uu[ci, cj], vv - vv[ci, cj]
        rho = np.sqrt(du * du + dv * dv)
        ang = np.arctan2(dv, du)
        R = tumour["radius_mm"]
        r_lesion = R * _harmonic_radius(ang, t_rng, 0.3)
        r_oedema = R * tumour["oedema_factor"] * _harmonic_radius(ang, t_rng, 0.35)
        lesion = _smoothstep(r_lesion, rho, w)
        # the core has its own outline, so the rim's thickness varies around the lesion
        r_core = R * tumour["core_fraction"] * _harmonic_radius(ang, t_rng, 0.3)
        core = np.minimum(_smoothstep(r_core, rho, w), lesion) if tumour["core_fraction"] > 0 else 0.0
        rim = lesion - core
        oedema = _smoothstep(r_oedema, rho, 2.5 * w) * (1.0 - lesion) * np.clip(0.25 + wm + 0.3 * gm, 0.0, 1.0)
        if cfg.version == 1:
            texture = 1.0 + 0.12 * _smooth_field(t_rng, 8, S)
        else:
            texture = 1.0 + 0.10 * _smooth_field(t_rng, 8, S) + 0.06 * _smooth_field(t_rng, 24, S)
        c = tumour["conspicuity"]
        inside = np.clip(brain + lesion, 0.0, 1.0)  # the lesion occupies its own space (mass effect)
        for part, wgt in (("oedema", oedema), ("rim", rim), ("core", core)):
            a = c * wgt * inside
            img = img * (1.0 - a) + _mix(part, t2w) * texture * a
        tumor_mask = (lesion + oedema) > 0.5

    # -- 5. scanner ----------------------------------------------------------------------------------
    bias = np.exp(profile.bias_strength * _smooth_field(a_rng, 3, S))
    img = img * bias
    sigma_n = profile.noise_sigma * float(np.exp(a_rng.normal(0.0, profile.noise_spread)))
    noise = a_rng.standard_normal((2, S, S)).astype(np.float32) * sigma_n
    k = np.fft.fft2(img + noise[0] + 1j * noise[1])
    frac = float(np.clip(profile.kspace_fraction * a_rng.uniform(0.95, 1.05), 0.2, 1.0))
    f = np.abs(np.fft.fftfreq(S))
    keep = (f <= 0.5 * frac + 1e-9).astype(np.float32)
    k *= keep[:, None] * keep[None, :]
    img = np.abs(np.fft.ifft2(k)).astype(np.float32)

    # 8-bit window: the bright end at a high percentile of the head, display gamma
    top = float(np.percentile(img[head > 0.5], 99.5)) if np.any(head > 0.5) else float(img.max())
    top *= a_rng.uniform(0.95, 1.15)
    gamma = profile.gamma * a_rng.uniform(0.95, 1.05)
    png = np.round(255.0 * np.clip(img / max(top, 1e-6), 0.0, 1.0) ** gamma).astype(np.uint8)

    params = {
        "site": site, "index": index, "label": int(label), "z_mm": round(float(z0), 2),
        "fov_mm": round(float(fov), 2), "noise_sigma": round(sigma_n, 5), "t2_weight": round(t2w, 4),
        "kspace_fraction": round(frac, 4), "flip": flip, "tumour": tumour,
    }
    return Rendered(image=img, png=png, tumor_mask=tumor_mask, params=params)


def config_dict(cfg: SynthConfig, profiles: list[SiteProfile]) -> dict:
    """The JSON-able record of everything that determines the data set."""
    return {
        "config": asdict(cfg),
        "site_profiles": [asdict(p) for p in profiles],
        "tissue_contrast": {k: list(v) for k, v in TISSUE_CONTRAST.items()},
        "generator_version": cfg.version,
        "anatomy": ANATOMY_SOURCE,
    }


# -- writing a data folder ------------------------------------------------------------------------

_WORKER: dict = {}


def scan_relpath(site: int, index: int, label: int) -> str:
    """Where scan (site, index) lives, relative to the data folder."""
    return f"site_{site}/{'yes' if label == 1 else 'no'}/synth_{site}_{index:05d}.png"


def _worker_init(cfg: SynthConfig, profiles: list[SiteProfile], out: str) -> None:
    _WORKER.update(cfg=cfg, profiles=profiles, out=out, anat=load_anatomy(),
                   labels={s: site_labels(cfg, s) for s in range(cfg.sites)})


def _render_chunk(task: tuple[int, int, int]) -> list[dict]:
    from PIL import Image

    site, start, stop = task
    cfg, profiles, out = _WORKER["cfg"], _WORKER["profiles"], _WORKER["out"]
    records = []
    for index in range(start, stop):
        label = int(_WORKER["labels"][site][index])
        r = render_scan(_WORKER["anat"], profiles[site], cfg, site, index, label)
        rel = scan_relpath(site, index, label)
        Image.fromarray(r.png).save(os.path.join(out, rel), format="PNG", compress_level=6)
        records.append({"file": rel, **r.params})
    return records


def generate_synthetic(out: str | Path, cfg: SynthConfig, *, workers: int | None = None,
                       progress: bool = True, overwrite: bool = False) -> dict:
    """Write a synthetic data set: ``out/site_k/{yes,no}/*.png`` (uint8 grey, cfg.size²),
    ``out/dataset.json`` (seed, config, site profiles, counts, fingerprint) and
    ``out/scan_params.jsonl`` (one line per scan: file, label, slice level, noise, tumour).

    Args:
        out: data folder; must be absent or empty unless ``overwrite`` (which removes only the
            ``site_*`` folders and the JSON files this function and the splitter write).
        workers: processes (default: CPU count, at most 8). Output bytes do not depend on it. More than one are
            started by ``forkserver`` (``spawn`` where there is none), which import the caller's main module:
            call from a script under ``if __name__ == "__main__":``.
        progress: show progress on stderr (:func:`medfedpure.progress.progress`).
    Returns:
        The dataset.json content.
    """
    import multiprocessing as mp

    from medfedpure.data.layout import CLASSES, LABEL_DIRS, fingerprint, prepare_out, site_counts, write_json

    out = Path(out)
    prepare_out(out, overwrite)
    profiles = make_site_profiles(cfg.sites, cfg.seed)
    for s in range(cfg.sites):
        for d in LABEL_DIRS:
            (out / f"site_{s}" / d).mkdir(parents=True, exist_ok=True)
    chunk = 25
    tasks = [(s, i, min(i + chunk, cfg.per_site)) for s in range(cfg.sites) for i in range(0, cfg.per_site, chunk)]
    total = cfg.sites * cfg.per_site
    workers = max(1, min(workers or os.cpu_count() or 1, 8, len(tasks)))
    records: list[dict] = []
    bar = progress_bar(total=total, desc="synth", unit="scan", enabled=progress)
    try:
        if workers == 1:
            _worker_init(cfg, profiles, str(out))
            for t in tasks:
                recs = _render_chunk(t)
                records += recs
                bar.update(len(recs))
        else:
            # Never plain fork: the caller may have threads (torch's pools, a test runner's), and a child forked
            # while one of them holds a lock waits on it for ever (seen: workers stuck in numpy under pytest-xdist).
            # forkserver forks from a clean single-threaded server; each worker loads the anatomy once (~2 s).
            method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
            ctx = mp.get_context(method)
            with ctx.Pool(workers, initializer=_worker_init, initargs=(cfg, profiles, str(out))) as pool:
                for recs in pool.imap_unordered(_render_chunk, tasks):
                    records += recs
                    bar.update(len(recs))
    finally:
        bar.close()
        _WORKER.clear()
    records.sort(key=lambda r: (r["site"], r["index"]))
    with open(out / "scan_params.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    from medfedpure import __version__

    meta = {
        "format": "medfedpure-data",
        "format_version": 1,
        "kind": "synthetic",
        "note": "synthetic scans in the Br35H folder layout; not Br35H, never report results on it as Br35H",
        "classes": list(CLASSES),
        "label_dirs": LABEL_DIRS,
        "num_sites": cfg.sites,
        "size": cfg.size,
        "seed": cfg.seed,
        "generator": "medfedpure.data.synth",
        "medfedpure_version": __version__,
        **config_dict(cfg, profiles),
        "counts": site_counts(out),
        "fingerprint": fingerprint(out),
    }
    write_json(out / "dataset.json", meta)
    return meta

