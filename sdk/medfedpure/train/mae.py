"""Training loop of the MAE detector (one site's data; the federated client calls it unchanged).

Random masking per sample from an explicit generator (``mask_ratio`` of ``MAEConfig``), AdamW with
warm-up + cosine decay, light augmentation (flip, shift) that does not change the noise statistics
the gate relies on. Validation is the gate's own quantity: the mean squared error on hidden
patches under the K fixed scoring masks (``MAEScorer``), in the target space of the model (pixels,
or normalised pixels with ``norm_pix``); lower is better.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medfedpure.models.mae import MAEScorer, MaskedAutoencoder, patchify
from medfedpure.train.loop import cosine_lr, epoch_generator, fit
from medfedpure.train.validate import require_at_least, require_non_negative, require_positive

__all__ = ["MAETrainConfig", "train_mae", "evaluate_mae"]


@dataclass(frozen=True)
class MAETrainConfig:
    """Options of one MAE training job.

    Attributes:
        epochs / lr / batch_size / seed / weight_decay / warmup_epochs: optimisation.
        patience: stop after this many epochs without a lower validation error.
        flip: random left-right flips.   shift_px: maximum integer shift in pixels.
        masks_per_scan: random masks drawn per scan per step (more supervision per forward of
            the data pipeline; each repeat is an independent mask).
    """

    epochs: int = 40
    lr: float = 1.5e-3
    batch_size: int = 32
    seed: int = 0
    weight_decay: float = 0.05
    warmup_epochs: int = 3
    patience: int = 10
    flip: bool = True
    shift_px: int = 4
    masks_per_scan: int = 1

    def __post_init__(self) -> None:
        require_at_least(self, ("epochs", "batch_size", "patience", "masks_per_scan"))
        require_positive(self, ("lr",))
        require_non_negative(self, ("weight_decay", "warmup_epochs", "shift_px"))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MAETrainConfig:
        """``tiny`` (tests) or ``small`` (the default bundle), with field overrides."""
        if name == "tiny":
            base = cls(epochs=2, batch_size=8, warmup_epochs=0, patience=2, shift_px=2, lr=2e-3)
        elif name == "small":
            base = cls()
        else:
            raise ValueError(f"unknown preset {name!r}: use 'tiny' or 'small'")
        return cls(**{**asdict(base), **{k: v for k, v in overrides.items() if v is not None}})

    def to_dict(self) -> dict:
        return asdict(self)


def _as_images(x: Any, name: str, size: int) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32)
    if x.dim() != 4 or tuple(x.shape[1:]) != (1, size, size):
        raise ValueError(f"{name} has shape {tuple(x.shape)}: expected [N, 1, {size}, {size}]")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return x


@torch.no_grad()
def evaluate_mae(mae: MaskedAutoencoder, x: Any, *, batch_size: int = 32) -> dict[str, float]:
    """Scoring-mode error on ``x`` ``[N,1,S,S]``: ``{"masked_mse", "psnr"}``.

    ``masked_mse`` is the mean over scans, hidden (patch, set) pairs and pixels of
    ``(recon − target)²`` — the gate's patch error (docs/design.md, "Gate semantics") averaged;
    ``psnr`` is ``−10 log10`` of it (meaningful in pixel space, i.e. without ``norm_pix``).
    """
    xt = _as_images(x, "x", mae.cfg.image_size)
    scorer = MAEScorer(mae).eval()
    hidden = (~scorer.visible).float()                                  # [K, Np]
    p2 = mae.cfg.patch ** 2
    per_scan = []
    for i in range(0, len(xt), batch_size):
        xb = xt[i:i + batch_size]
        recon = scorer(xb)                                              # [B, K, S, S]
        b, k = recon.shape[:2]
        pred = patchify(recon.reshape(b * k, 1, *recon.shape[2:]), mae.cfg.patch).reshape(b, k, -1, p2)
        err = ((pred - mae.target(xb).unsqueeze(1)) ** 2).mean(-1)      # [B, K, Np]
        per_scan.append((err * hidden).sum(dim=(1, 2)) / hidden.sum())
    mse = float(torch.cat(per_scan).mean())
    return {"masked_mse": mse, "psnr": float(-10 * np.log10(max(mse, 1e-12)))}


def _augment(x: torch.Tensor, cfg: MAETrainConfig, g: torch.Generator) -> torch.Tensor:
    b, _, s, _ = x.shape
    out = x.clone()
    if cfg.flip:
        flip = torch.rand(b, generator=g) < 0.5
        out[flip] = out[flip].flip(-1)
    if cfg.shift_px > 0:
        pad = cfg.shift_px
        padded = F.pad(out, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=g)
        out = torch.stack([padded[i, :, dy[i]:dy[i] + s, dx[i]:dx[i] + s] for i in range(b)])
    return out


def train_mae(
    model: MaskedAutoencoder,
    x_train: Any,
    x_val: Any,
    cfg: MAETrainConfig,
    *,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    name: str = "mae",
) -> dict[str, Any]:
    """Train the MAE on ``x_train`` ``[N,1,S,S]`` in [0,1]; keep the epoch with the lowest
    validation ``masked_mse`` on ``x_val``. Returns ``fit``'s history plus ``"val"`` metrics."""
    size = model.cfg.image_size
    xt = _as_images(x_train, "x_train", size)
    xv = _as_images(x_val, "x_val", size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    steps_per_epoch = (len(xt) + cfg.batch_size - 1) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    warmup = steps_per_epoch * cfg.warmup_epochs

    def train_epoch(epoch: int) -> dict[str, float]:
        g = epoch_generator(cfg.seed, epoch)
        gm = epoch_generator(cfg.seed, epoch, stream=1)
        perm = torch.randperm(len(xt), generator=g)
        tot, n = 0.0, 0
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            xb = _augment(xt[idx], cfg, g)
            if cfg.masks_per_scan > 1:
                xb = xb.repeat(cfg.masks_per_scan, 1, 1, 1)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(epoch * steps_per_epoch + i, total, cfg.lr, warmup)
            loss = model(xb, generator=gm).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            tot += float(loss.detach()) * len(idx)
            n += len(idx)
        return {"loss": tot / n}

    def validate() -> dict[str, float]:
        return evaluate_mae(model, xv)

    out = fit(model, opt, train_epoch=train_epoch, validate=validate, epochs=cfg.epochs,
              patience=cfg.patience, monitor="masked_mse", mode="min", model_cfg=model.cfg, kind="mae",
              name=name, checkpoint_dir=checkpoint_dir, resume=resume, progress=progress)
    out["val"] = evaluate_mae(model, xv)
    return out
