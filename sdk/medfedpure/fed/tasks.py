"""Task adapters: what one site does in one phase of the federation, over ``medfedpure.train`` loops.

Phases, in the order the server runs them (``PHASES``):

============ ============ ======== =========================================================
phase        model        kind     local work per round
============ ============ ======== =========================================================
classifier   MoEClassifier moe     ``train_classifier`` (MoE loss, augmentation)
mae          MaskedAutoencoder mae ``train_mae``
teacher      UNet         unet     ``train_denoiser`` (x0-prediction on the DDPM schedule)
student      UNet         unet     ``distill_student`` from the site's copy of the final teacher
============ ============ ======== =========================================================

Every function here is plain PyTorch + numpy and knows nothing about Flower (the quickstart-pytorch
``task.py`` pattern); ``client_app.py`` calls it. Models are built under ``torch.random.fork_rng``
with an explicit seed, so initialisation is reproducible and leaves the global RNG untouched.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

PHASES = ("classifier", "mae", "teacher", "student")
KINDS = {"classifier": "moe", "mae": "mae", "teacher": "unet", "student": "unet"}
PRESETS = ("tiny", "small")


@dataclass(frozen=True)
class SiteData:
    """One site's splits: ``x_*`` float32 ``[N,1,S,S]`` in [0,1], ``y_*`` int64 ``[N]`` (0 no_tumor, 1 tumor)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@functools.lru_cache(maxsize=8)
def load_site(data_dir: str, site: int, size: int, max_train: int = 0) -> SiteData:
    """Load site ``site``'s train/val/test splits at ``size`` px (cached per process).

    ``max_train > 0`` keeps the first ``max_train`` training scans (tiny test runs); the split
    order is the recorded, seeded order of ``splits.json``.
    """
    from medfedpure.data import load_split

    parts = {s: load_split(data_dir, site, s, size) for s in ("train", "val", "test")}
    xtr, ytr = parts["train"]
    if max_train > 0:
        xtr, ytr = xtr[:max_train], ytr[:max_train]
    for name, (x, y) in parts.items():
        if len(x) == 0:
            raise ValueError(f"site {site} of {data_dir} has an empty {name} split: re-split the data set")
        if len(x) != len(y):
            raise ValueError(f"site {site} {name}: {len(x)} scans but {len(y)} labels")
    return SiteData(xtr, ytr, parts["val"][0], parts["val"][1], parts["test"][0], parts["test"][1])


def model_config(phase: str, preset: str, size: int = 0) -> Any:
    """The architecture config of ``phase`` at ``preset`` (``size > 0`` overrides the image side)."""
    _check(phase, preset)
    if size < 0:
        raise ValueError(f"size={size}: 0 (the preset's) or a positive image side")
    if phase == "classifier":
        from medfedpure.models.moe import MoEConfig

        return MoEConfig.preset(preset, image_size=size or None)
    if phase == "mae":
        from medfedpure.models.mae import MAEConfig

        return MAEConfig.preset(preset, image_size=size or None)
    from medfedpure.models.unet import UNetConfig

    # The student has the teacher's architecture: distillation starts it from the teacher's weights
    # (the server's initial student is the final federated teacher).
    return UNetConfig.preset(preset, **({"image_size": size} if size else {}))


def image_size(preset: str, size: int = 0) -> int:
    """Side in pixels of every model at ``preset`` (the classifier's; all presets agree), or ``size``."""
    return int(size) if size else int(model_config("classifier", preset).image_size)


def build_model(phase: str, preset: str, seed: int, size: int = 0) -> tuple[torch.nn.Module, Any]:
    """Fresh model of ``phase`` initialised from ``seed`` (global RNG untouched) → (model, cfg)."""
    cfg = model_config(phase, preset, size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if phase == "classifier":
            from medfedpure.models.moe import MoEClassifier

            model: torch.nn.Module = MoEClassifier(cfg)
        elif phase == "mae":
            from medfedpure.models.mae import MaskedAutoencoder

            model = MaskedAutoencoder(cfg)
        else:
            from medfedpure.models.unet import UNet

            model = UNet(cfg)
    return model, cfg


def _check(phase: str, preset: str) -> None:
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}: one of {', '.join(PHASES)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: use 'tiny' or 'small'")


def _last(history: dict[str, Any], key: str) -> float:
    rows = history.get("history") or []
    for row in reversed(rows):
        if key in row:
            return float(row[key])
    return float("nan")


def train_local(
    phase: str,
    model: torch.nn.Module,
    data: SiteData,
    *,
    preset: str,
    epochs: int,
    seed: int,
    site_dir: Path | None = None,
    lr_scale: float = 1.0,
) -> dict[str, float]:
    """Train ``model`` in place on the site's training split for ``epochs`` epochs (stateless round).

    One federated round is a short, complete run of the phase's own training loop: warm-up is
    disabled (the server's model is already warm after round 1) and early stopping cannot trigger
    (patience > epochs). The loop builds a fresh AdamW each round and runs its cosine schedule
    within the round — with one local epoch per round this trains much worse than one long local
    run (benchmarks/RESULTS.md, "Federated"); the client uses :func:`train_local_stateful` for the
    classifier instead. ``lr_scale`` multiplies the preset's learning rate: the server's cosine
    envelope over rounds (:func:`round_lr_scale`). Returns scalar metrics for the server
    (``train_loss`` and the loop's validation metrics, prefixed ``val_``).
    """
    return train_local_stateful(phase, model, data, preset=preset, epochs=epochs, seed=seed, site_dir=site_dir,
                                lr_scale=lr_scale)[0]


def train_local_stateful(
    phase: str,
    model: torch.nn.Module,
    data: SiteData,
    *,
    preset: str,
    epochs: int,
    seed: int,
    site_dir: Path | None = None,
    lr_scale: float = 1.0,
    optimizer_state: dict[str, torch.Tensor] | None = None,
    schedule: tuple[int, int] | None = None,
) -> tuple[dict[str, float], dict[str, torch.Tensor] | None]:
    """:func:`train_local` with the site's optimizer state and a federation-wide schedule.

    ``schedule = (offset, total)`` in epochs (classifier only): this round's epochs are global
    epochs ``offset … offset + epochs − 1`` of one warm-up + cosine schedule of ``total`` epochs
    (the preset's warm-up, as a local run has), and ``seed`` is then the site's seed for the whole
    federation (per-epoch generators are keyed by the global epoch). ``optimizer_state`` is the
    AdamW state this site returned last round (``None`` in round 1). With both, a site's rounds
    continue one long local run instead of restarting it: for a site whose weights nobody replaces,
    R one-epoch rounds equal one R-epoch run bit for bit (tests/test_fed_optim_state.py).

    The moments of the travelling (global) parameters are kept too, although FedAvg replaces those
    weights between rounds: a "stateful client" keeps its whole optimizer state locally (the
    aggregated weights move little per round, so the site's moment estimates stay a good
    preconditioner; resetting them every round is the restart that cost accuracy). Nothing of it
    leaves the site, and aggregation is unchanged.

    Returns ``(metrics, new optimizer state)``; the state is ``None`` for the other phases, which
    ignore ``optimizer_state`` and ``schedule`` (stateless rounds, as :func:`train_local`).
    """
    _check(phase, preset)
    if epochs < 1:
        raise ValueError(f"epochs={epochs}: at least one local epoch per round")
    if not 0 < lr_scale <= 1:
        raise ValueError(f"lr_scale={lr_scale}: must be in (0, 1]")
    if phase == "classifier":
        from medfedpure.train.classifier import ClassifierTrainConfig, train_classifier

        if schedule is None:
            cfg = ClassifierTrainConfig.preset(preset, epochs=epochs, seed=seed, warmup_epochs=0, patience=epochs + 1)
            offset, total = 0, None
        else:
            offset, total = int(schedule[0]), int(schedule[1])
            cfg = ClassifierTrainConfig.preset(preset, epochs=epochs, seed=seed, patience=epochs + 1)
        cfg = replace(cfg, lr=cfg.lr * lr_scale)
        out = train_classifier(model, (data.x_train, data.y_train), (data.x_val, data.y_val), cfg, progress=False,
                               optimizer_state=optimizer_state, schedule_offset=offset, schedule_total=total,
                               return_optimizer_state=True)
        return ({"train_loss": _last(out, "train_loss"), "val_loss": float(out["val"]["loss"]),
                 "val_accuracy": float(out["val"]["accuracy"])}, out["optimizer_state"])
    if phase == "mae":
        from medfedpure.train.mae import MAETrainConfig, train_mae

        cfg_m = MAETrainConfig.preset(preset, epochs=epochs, seed=seed, warmup_epochs=0, patience=epochs + 1)
        cfg_m = replace(cfg_m, lr=cfg_m.lr * lr_scale)
        out = train_mae(model, data.x_train, data.x_val, cfg_m, progress=False)
        return {"train_loss": _last(out, "train_loss"), **{f"val_{k}": float(v) for k, v in out["val"].items()}}, None
    if phase == "teacher":
        from medfedpure.train.purifier import DenoiserTrainConfig, train_denoiser

        cfg_d = DenoiserTrainConfig.preset(preset, epochs=epochs, seed=seed, warmup_steps=0, patience=epochs + 1)
        cfg_d = replace(cfg_d, lr=cfg_d.lr * lr_scale)
        out = train_denoiser(model, model.schedule, data.x_train, data.x_val, cfg_d, progress=False)
        return {"train_loss": _last(out, "train_loss"), **{f"val_{k}": float(v) for k, v in out["val"].items()}}, None
    # student: distil from this site's copy of the final federated teacher.
    from medfedpure.train.checkpoint import load_model
    from medfedpure.train.distill import DistillConfig, distill_student

    if site_dir is None or not (site_dir / "global" / "teacher.safetensors").is_file():
        raise FileNotFoundError(
            f"no teacher at {site_dir}/global/teacher.safetensors: run the 'teacher' phase before 'student'"
        )
    teacher, _, _ = load_model(site_dir / "global" / "teacher.safetensors")
    cfg_s = _preset_with(DistillConfig, preset, epochs=epochs, seed=seed, warmup_steps=0, patience=epochs + 1)
    cfg_s = replace(cfg_s, lr=cfg_s.lr * lr_scale)
    out = distill_student(
        teacher, model, teacher.schedule, data.x_train, data.x_val, cfg_s, progress=False, init_from_teacher=False
    )
    val = out.get("val", {}) if isinstance(out, dict) else {}
    return {"train_loss": _last(out, "train_loss"), **{f"val_{k}": float(v) for k, v in val.items()}}, None


def round_lr_scale(server_round: int, num_rounds: int) -> float:
    """Cosine envelope over rounds: 1 in round 1, 0.01 + 0.99·½(1 + cos(π·(r−1)/R)) in round r."""
    if num_rounds <= 1:
        return 1.0
    frac = (max(server_round, 1) - 1) / num_rounds
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * frac))


def _preset_with(cls: Any, preset: str, **overrides: Any) -> Any:
    """``cls.preset(preset, **overrides)``, silently dropping overrides the config has no field for."""
    fields = set(getattr(cls, "__dataclass_fields__", {}))
    return cls.preset(preset, **{k: v for k, v in overrides.items() if k in fields})


@torch.no_grad()
def evaluate_local(phase: str, model: torch.nn.Module, data: SiteData, *, seed: int = 0) -> dict[str, float]:
    """Evaluate ``model`` on the site's validation and test splits → scalar metrics.

    classifier: ``val_/test_accuracy``, ``val_/test_loss`` (the personalised model: the server's
    global part with this site's local part). mae: ``val_/test_masked_mse``. teacher/student:
    ``val_/test_denoise_mse`` — the x0-prediction MSE at fixed times {50, 150} with noise drawn from
    ``seed`` (deterministic, the same for every site and round).
    """
    model.eval()
    out: dict[str, float] = {}
    if phase == "classifier":
        from medfedpure.train.classifier import evaluate_classifier

        for split, (x, y) in {"val": (data.x_val, data.y_val), "test": (data.x_test, data.y_test)}.items():
            m = evaluate_classifier(model, x, y)
            out[f"{split}_accuracy"] = float(m["accuracy"])
            out[f"{split}_loss"] = float(m["loss"])
        return out
    if phase == "mae":
        from medfedpure.train.mae import evaluate_mae

        for split, x in {"val": data.x_val, "test": data.x_test}.items():
            out[f"{split}_masked_mse"] = float(evaluate_mae(model, x)["masked_mse"])
        return out
    from medfedpure.models.diffusion import to_model_space

    schedule = model.schedule
    for split, x in {"val": data.x_val, "test": data.x_test}.items():
        y0 = to_model_space(torch.as_tensor(x[:32], dtype=torch.float32))
        g = torch.Generator().manual_seed(seed + 4242)
        errs = []
        for tv in (50.0, 150.0):
            t = torch.full((len(y0),), tv)
            noise = torch.randn(y0.shape, generator=g)
            x0_hat = model(schedule.q_sample(y0, t, noise), t)
            errs.append(float(((x0_hat - y0) ** 2).mean()))
        out[f"{split}_denoise_mse"] = float(np.mean(errs))
    return out



def calibrate_site(site_dir: Path, data: SiteData, *, preset: str, seed: int = 0) -> dict[str, Any]:
    """Calibrate this site's gate on its own clean validation scans (``train.calibrate``).

    Uses the site's copies of the federated MAE and student (``SITE/global/``); the purification
    range and step count come from the student checkpoint's metadata. Returns the
    ``calibration.json`` content.
    """
    from medfedpure.train.calibrate import CalibrationConfig, calibrate_gate
    from medfedpure.train.checkpoint import load_model

    g = site_dir / "global"
    missing = [n for n in ("mae", "student") if not (g / f"{n}.safetensors").is_file()]
    if missing:
        raise FileNotFoundError(f"site copies {missing} missing under {g}: run the mae and student phases first")
    mae, _, _ = load_model(g / "mae.safetensors")
    return calibrate_gate(mae, data.x_val, CalibrationConfig(), run=g)
