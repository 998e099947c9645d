"""Test fixture: a tiny, randomly initialised bundle (32 px; exports in seconds).

The networks are untrained (their outputs are meaningless as diagnoses) but the bundle is a real
one: exported by the production path (:func:`medfedpure.export.pipeline.build_bundle`), verified,
and calibrated so that about half of its validation scans are flagged (τ = median score), which
exercises both the early-exit and the purified paths. It is signed with the tests' key
(:mod:`signing_keys`), which ``tests/conftest.py`` makes trusted.

:func:`cached_tiny_bundle` builds it once per code version into the system temp folder (the key
hashes the source of every module that shapes the bundle: the package, the exporter and this
file), under a file lock so parallel pytest workers share one build. Tests import it as
``tiny_bundle`` (``tests/conftest.py`` puts ``tests/`` on ``sys.path``); it is not shipped in the wheel.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from medfedpure.runtime.bundle import VerifiedBundle, verify_bundle
from signing_keys import TEST_KEY

TINY_SIZE = 32


def tiny_scans(n: int, seed: int, size: int = TINY_SIZE) -> np.ndarray:
    """``n`` smooth random "scans" float32 [n, 1, S, S] in [0, 1] (a bright disc plus texture)."""
    rng = np.random.Generator(np.random.Philox(key=seed))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) - 0.5
    out = np.empty((n, 1, size, size), dtype=np.float32)
    for i in range(n):
        r = 0.3 + 0.1 * rng.random()
        disc = (xx**2 + yy**2 < r**2).astype(np.float32) * (0.5 + 0.4 * rng.random())
        tex = rng.standard_normal((size // 4, size // 4)).astype(np.float32)
        tex = np.kron(tex, np.ones((4, 4), np.float32)) * 0.05
        out[i, 0] = np.clip(disc + tex + 0.05 * rng.standard_normal((size, size)).astype(np.float32), 0, 1)
    return out


def build_tiny_bundle(out: str | Path, *, seed: int = 0, policy: str = "adaptive", steps: int = 2,
                      preset: str = "tiny", overwrite: bool = False) -> VerifiedBundle:
    """Build the tiny bundle at ``out`` (random weights from ``seed``; τ at the median val score).

    ``preset="small"`` builds the default bundle's architectures (128 px) with random weights —
    for latency measurements, which do not depend on the weights.
    """
    from medfedpure.export.pipeline import build_bundle
    from medfedpure.gate import patch_gate_reference
    from medfedpure.models.mae import MAEConfig, MAEScorer, MaskedAutoencoder
    from medfedpure.models.moe import MoEClassifier, MoEConfig
    from medfedpure.models.unet import UNet, UNetConfig

    # Model constructors draw their initial weights from torch's global generator: fork it so
    # building a bundle neither depends on nor disturbs the caller's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ccfg, mcfg, ucfg = MoEConfig.preset(preset), MAEConfig.preset(preset), UNetConfig.preset(preset)
        classifier, mae, student = MoEClassifier(ccfg).eval(), MaskedAutoencoder(mcfg).eval(), UNet(ucfg).eval()
    x_val = tiny_scans(16, seed + 1, size=ccfg.image_size)
    scorer = MAEScorer(mae).eval()
    with torch.no_grad():
        recon = scorer(torch.from_numpy(x_val)).numpy()
    vis = scorer.visible.numpy()
    score = patch_gate_reference(x_val[:, 0], recon, vis, patch=mcfg.patch, tau=1.0, tau_high=2.0, t_min=0,
                                 t_max=0).score
    tau = float(np.median(score))
    calibration = {"stat": "mean", "topk": 0, "norm_pix": bool(mcfg.norm_pix), "patch": mcfg.patch, "tau": tau,
                   "tau_high": float(score.max()) + 1e-3, "t_min": 40, "t_max": 200, "policy": policy,
                   "steps": steps, "target_false_flag_rate": 0.5, "num_val_scans": int(x_val.shape[0]),
                   "val_false_flag_rate": float((score >= np.float32(tau)).mean())}
    vb, _ = build_bundle(out, classifier=classifier, classifier_cfg=ccfg, mae=mae, mae_cfg=mcfg, student=student,
                         student_cfg=ucfg, calibration=calibration, x_val=x_val,
                         provenance={"run": f"{preset}-random", "site": 0, "seed": seed,
                                     "note": f"untrained {preset} models (tests / latency only)"},
                         overwrite=overwrite)
    from medfedpure.export.signing import sign_bundle

    return sign_bundle(vb.root, TEST_KEY)


def _code_key(**params: object) -> str:
    import medfedpure
    import medfedpure.export

    pkg = Path(medfedpure.__file__).resolve().parent
    exporter = Path(medfedpure.export.__file__).resolve().parent
    # every source file of the package, of the exporter and this fixture: a cached bundle never
    # outlives the code (the exporter is a folder of its own in an editable install)
    files = sorted({*pkg.rglob("*.py"), *exporter.rglob("*.py"), Path(__file__).resolve()})
    h = hashlib.sha256(repr(sorted(params.items())).encode())
    h.update(torch.__version__.encode())
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:20]


def cached_tiny_bundle(*, seed: int = 0, policy: str = "adaptive", steps: int = 2) -> Path:
    """Path of the tiny bundle for the current code, built on first use (shared by processes)."""
    base = Path(tempfile.gettempdir()) / f"medfedpure-tiny-bundles-{os.getuid()}"
    base.mkdir(parents=True, exist_ok=True)
    key = _code_key(seed=seed, policy=policy, steps=steps)
    final = base / key
    with open(base / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            try:
                verify_bundle(final, trusted_keys=[TEST_KEY.public_key()])
                return final
            except Exception:  # noqa: BLE001 - a damaged cache is rebuilt
                shutil.rmtree(final)
        tmp = base / f"{key}.building"
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_bundle(tmp, seed=seed, policy=policy, steps=steps)
        os.replace(tmp, final)
    return final


def tiny_eval_data(root: Path) -> Path:
    """A two-site synthetic data set at 32 px (24 scans per site, split), the evaluation tests' data."""
    from medfedpure.data.splits import make_splits
    from medfedpure.data.synth import SynthConfig, generate_synthetic

    generate_synthetic(root, SynthConfig(sites=2, per_site=24, size=32, seed=5), workers=1, progress=False)
    make_splits(root, seed=0)
    return root


def tiny_attack_setup(bundle: Path, n: int, seed: int):
    """(Defender on onnxruntime, frozen torch reference engine, scans x [n,1,S,S], the reference's own
    labels y [n]) for attacking the tiny bundle's pipeline on CPU."""
    import torch
    from medfedpure import Defender
    from medfedpure.runtime.engines.torch_engine import TorchEngine

    d = Defender.load(bundle, backend="onnxruntime", device="cpu", threads=1)
    ref = TorchEngine(d.bundle, device="cpu")
    for m in ref.models.values():
        m.requires_grad_(False)
    x = torch.from_numpy(tiny_scans(n, seed))
    with torch.no_grad():
        y = ref.models["classifier"](x).argmax(1)
    return d, ref, x, y
