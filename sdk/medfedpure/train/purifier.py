"""Training loop of the diffusion teacher: an EDM-preconditioned x0-denoiser on t ∈ [t_lo, t_hi].

``train_denoiser(model, schedule, x_train, x_val, cfg)`` minimises the EDM loss (Karras et al.
2022, eq. 8) in the VP parameterisation of ``medfedpure.models.diffusion``:

    L = E_{x0, t, ε} λ(σ_t) ‖D_θ(x_t, t) − y0‖²,   y0 = 2·x0 − 1,   x_t = √ᾱ_t y0 + √(1−ᾱ_t) ε,
    λ(σ) = 1 / c_out(σ)²   (so the raw network's target has unit variance at every σ).

Choices made for the purifier and for 2 CPU cores:

- **t range.** The purifier only starts from t* ≤ t_max and DDIM then visits only t ≤ t*, so t is
  drawn uniformly from [t_lo, t_hi] with t_hi a little above the largest t* (default 250 of 1000
  on the cosine schedule, σ ≈ 0.43 in [−1, 1] units; t* ≤ 200 ⇔ σ ≤ 0.34); a fraction
  ``p_full_range`` of draws covers [t_lo, T] so that the model degrades gracefully outside.
- **Random crops.** The UNet is convolutional and at these noise levels denoising is local, so
  training on ``crop_size`` crops (64 of 128 px) costs several times less per scan; the network sees both
  brain and background crops, and GroupNorm statistics of full scans lie inside that range. The
  validation metric runs on full-size scans, so any mismatch would show there.
- **Left-right flips** (brains are roughly symmetric).
- Fixed ``steps_per_epoch`` (epochs are a unit of compute, not of data), warm-up + cosine LR, and
  early stopping on the validation loss at fixed (t, ε) pairs — deterministic given ``cfg.seed``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfedpure.models.diffusion import DiffusionSchedule, to_model_space
from medfedpure.train.device import channels_last
from medfedpure.train.loop import cosine_lr, epoch_generator, fit
from medfedpure.train.validate import freeze_tuples, require_at_least, require_non_negative, require_positive

__all__ = ["DenoiserTrainConfig", "train_denoiser", "denoiser_loss", "as_images", "random_crops",
           "psnr"]


@dataclass(frozen=True)
class DenoiserTrainConfig:
    """Options of one teacher (denoiser) training job.

    Attributes:
        epochs: maximum number of epochs.          steps_per_epoch: optimizer steps per epoch.
        lr: peak AdamW learning rate.               batch_size: crops per step.
        seed: seeds every generator of the job.     weight_decay: AdamW weight decay.
        warmup_steps: linear LR warm-up length.     patience: early stopping (epochs).
        t_lo, t_hi: training range of t (of T).     p_full_range: share of t drawn from [t_lo, T].
        crop_size: training crop side (0: whole scans).
        flip: random left-right flips.
        val_scans: validation scans used (full size; 0: all).
        val_times: the fixed t of the validation loss.
    """

    epochs: int = 8
    steps_per_epoch: int = 80
    lr: float = 2e-3
    batch_size: int = 16
    seed: int = 0
    weight_decay: float = 0.0
    warmup_steps: int = 50
    patience: int = 4
    t_lo: float = 1.0
    t_hi: float = 250.0
    p_full_range: float = 0.05
    crop_size: int = 64
    flip: bool = True
    val_scans: int = 16
    val_times: tuple[float, ...] = (25.0, 75.0, 150.0)

    def __post_init__(self) -> None:
        freeze_tuples(self, ("val_times",))
        require_at_least(self, ("epochs", "steps_per_epoch", "batch_size", "patience"))
        require_positive(self, ("lr",))
        require_non_negative(self, ("weight_decay", "warmup_steps"))
        if not 0 <= self.t_lo < self.t_hi:
            raise ValueError(f"t range [{self.t_lo}, {self.t_hi}]: need 0 <= t_lo < t_hi")
        if not 0 <= self.p_full_range <= 1:
            raise ValueError(f"p_full_range={self.p_full_range}: must be in [0, 1]")
        if self.crop_size < 0 or (self.crop_size and self.crop_size % 8):
            raise ValueError(f"crop_size={self.crop_size}: use 0 (whole scans) or a multiple of 8")
        if self.val_scans < 0:
            raise ValueError(f"val_scans={self.val_scans}: must be >= 0")
        if not self.val_times or any(t <= 0 for t in self.val_times):
            raise ValueError(f"val_times={self.val_times}: need positive times")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DenoiserTrainConfig:
        """``tiny`` (tests: a few seconds on 32 px) or ``small`` (default bundle; 16 epochs, ~2 min on 1 core)."""
        presets: dict[str, dict[str, Any]] = {
            "tiny": dict(epochs=2, steps_per_epoch=5, batch_size=8, warmup_steps=2, crop_size=0,
                         val_scans=8, val_times=(20.0, 100.0)),
            # 16 epochs: the small UNet on 2×2 polyphase sub-images costs half as much per epoch as the
            # full-resolution one did with 8, and 8 left it less robust under PGD-8/255 (docs/history.md).
            "small": dict(epochs=16),
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}: use one of {sorted(presets)}")
        return cls(**{**presets[name], **{k: v for k, v in overrides.items() if v is not None}})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def as_images(x: Any, name: str) -> torch.Tensor:
    """``x`` (numpy or torch) → float32 tensor [N, 1, S, S] in [0, 1] (a copy: the caller's data is kept)."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32).clone()
    if t.dim() != 4 or t.shape[1] != 1:
        raise ValueError(f"{name} has shape {tuple(t.shape)}: expected [N, 1, S, S] scans")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if bool((t < 0).any()) or bool((t > 1).any()):
        raise ValueError(f"{name} has values outside [0, 1]: pass preprocessed scans")
    return t


def check_crop_fits(model: torch.nn.Module, crop: int, image_size: int) -> None:
    """Refuse a training crop the UNet cannot take (its side must divide by ``cfg.size_multiple``)."""
    cfg = getattr(model, "cfg", None)
    m = getattr(cfg, "size_multiple", 1)
    side = image_size if crop == 0 or crop >= image_size else crop
    if side % m:
        raise ValueError(f"crop_size={crop} gives {side}-px training inputs, but this UNet needs sides that are "
                         f"multiples of {m} (unshuffle={cfg.unshuffle}, {len(cfg.channel_mults)} levels): "
                         f"use a crop_size that is a multiple of {m}, or 0 for whole scans")


def random_crops(x: torch.Tensor, idx: torch.Tensor, crop: int, flip: bool, g: torch.Generator) -> torch.Tensor:
    """Crops ``x[idx]`` [B, C, crop, crop] at random offsets (crop 0 or ≥ S: whole scans), random flips."""
    s = x.shape[-1]
    if crop == 0 or crop >= s:
        out = x[idx].clone()
    else:
        oy = torch.randint(0, s - crop + 1, (len(idx),), generator=g)
        ox = torch.randint(0, s - crop + 1, (len(idx),), generator=g)
        out = torch.stack([x[i, :, y:y + crop, z:z + crop] for i, y, z in
                           zip(idx.tolist(), oy.tolist(), ox.tolist(), strict=True)])
    if flip:
        f = torch.rand(len(idx), generator=g) < 0.5
        out[f] = out[f].flip(-1)
    return out


def denoiser_loss(model: torch.nn.Module, y0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                  schedule: DiffusionSchedule) -> torch.Tensor:
    """EDM-weighted x0 loss (eq. 8) on a batch ``y0`` [B,1,s,s] in [−1, 1], ``t`` [B], ``noise``."""
    x_t = schedule.q_sample(y0, t, noise)
    sigma2 = schedule.sigma(t).to(y0) ** 2
    sd2 = float(getattr(getattr(model, "cfg", None), "sigma_data", 0.5)) ** 2
    weight = (sigma2 + sd2) / (sigma2 * sd2).clamp_min(1e-8)  # 1 / c_out²
    err = (model(x_t, t) - y0).square().mean(dim=(1, 2, 3))
    return (weight * err).mean()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR (dB) between ``a`` and ``b`` [B, ...] with the given data range."""
    mse = (a - b).square().flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(data_range**2 / mse)


def _sample_t(n: int, cfg: DenoiserTrainConfig, T: int, g: torch.Generator) -> torch.Tensor:
    hi = torch.where(torch.rand(n, generator=g) < cfg.p_full_range, torch.tensor(float(T)),
                     torch.tensor(float(cfg.t_hi)))
    return cfg.t_lo + (hi - cfg.t_lo) * torch.rand(n, generator=g)


def train_denoiser(
    model: torch.nn.Module,
    schedule: DiffusionSchedule,
    x_train: Any,
    x_val: Any,
    cfg: DenoiserTrainConfig,
    *,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    name: str = "teacher",
) -> dict[str, Any]:
    """Train the teacher ``model`` (a ``UNet``) as an x0-denoiser; keep the best-validation weights.

    Args:
        model: x0-predictor ``(x_t, t) -> x0_hat`` (``medfedpure.models.unet.UNet``).
        schedule: its DDPM schedule.
        x_train, x_val: scans [N, 1, S, S] float32 in [0, 1] (numpy or torch; not modified).
        cfg: ``DenoiserTrainConfig``.
        checkpoint_dir / resume / name: per-epoch checkpoints and resumption (``train.loop.fit``).

    Returns:
        ``fit``'s dict (``history`` with ``train_loss``, ``val_loss`` and ``val_psnr_t{t}`` — PSNR in
        dB of the one-step x0 estimate on [0, 1] scans — per epoch, ``best_epoch``, ``wall_s``…)
        plus ``"val"``: the final validation metrics. The model ends in eval mode.
    """
    xt = as_images(x_train, "x_train")
    xv = as_images(x_val, "x_val")
    check_crop_fits(model, cfg.crop_size, xt.shape[-1])
    if cfg.val_scans:
        xv = xv[: cfg.val_scans]
    T = schedule.num_timesteps
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * cfg.steps_per_epoch

    # Fixed validation noise and times: the metric is a deterministic function of the weights.
    gv = torch.Generator().manual_seed(cfg.seed + 7_777)
    yv = to_model_space(xv)
    val_noise = [torch.randn(yv.shape, generator=gv) for _ in cfg.val_times]

    def train_epoch(epoch: int) -> dict[str, float]:
        g = epoch_generator(cfg.seed, epoch)
        tot = 0.0
        for i in range(cfg.steps_per_epoch):
            idx = torch.randint(0, len(xt), (cfg.batch_size,), generator=g)
            y0 = to_model_space(random_crops(xt, idx, cfg.crop_size, cfg.flip, g))
            t = _sample_t(len(idx), cfg, T, g)
            noise = torch.randn(y0.shape, generator=g)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(epoch * cfg.steps_per_epoch + i, total, cfg.lr, cfg.warmup_steps)
            loss = denoiser_loss(model, y0, t, noise, schedule)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            tot += float(loss.detach())
        return {"loss": tot / cfg.steps_per_epoch}

    def validate() -> dict[str, float]:
        out: dict[str, float] = {}
        losses = []
        for tv, nv in zip(cfg.val_times, val_noise, strict=True):
            tt = torch.full((len(yv),), float(tv))
            loss_sum, psnr_sum = 0.0, 0.0
            for j in range(0, len(yv), 16):
                y0, n0, tb = yv[j:j + 16], nv[j:j + 16], tt[j:j + 16]
                loss_sum += float(denoiser_loss(model, y0, tb, n0, schedule)) * len(y0)
                x0_hat = model(schedule.q_sample(y0, tb, n0), tb)
                psnr_sum += float(psnr((x0_hat.clamp(-1, 1) + 1) / 2, (y0 + 1) / 2).sum())
            losses.append(loss_sum / len(yv))
            out[f"psnr_t{int(tv)}"] = psnr_sum / len(yv)
        out["loss"] = float(np.mean(losses))
        return out

    with channels_last(model):  # on the CPU: oneDNN's faster convolutions; the model leaves as it came
        res = fit(model, opt, train_epoch=train_epoch, validate=validate, epochs=cfg.epochs,
                  patience=cfg.patience, monitor="loss", mode="min", model_cfg=getattr(model, "cfg", None),
                  kind="unet", name=name, checkpoint_dir=checkpoint_dir, resume=resume, progress=progress)
    with torch.no_grad():
        res["val"] = validate()
    return res
