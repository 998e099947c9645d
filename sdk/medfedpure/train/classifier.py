"""Training loop of the MoE classifier (one site's data; the federated client calls it unchanged).

``train_classifier(model, (x, y), (x_val, y_val), cfg)`` trains with AdamW, a warm-up + cosine
schedule, cross-entropy on the mixture plus an auxiliary cross-entropy on each expert (so that both
experts stay good classifiers on their own and the gate has something to choose between), and
augmentation drawn from explicit generators:

- geometric: left-right flip (brains are roughly symmetric; tumours occur on both sides) and
  integer shifts of up to ``shift_px`` pixels (zero padding, as ``preprocess`` pads);
- intensity: gamma in ``[1/γ, γ]`` and a contrast scale in ``[1 − c, 1 + c]`` (scanner variation);
- Gaussian noise with σ ~ U(0, ``noise_std``) per scan (scanner noise, and a first step towards a
  classifier that is stable on purified scans);
- an optional caller hook ``augment(x, generator) -> x`` run last (e.g. purification-aware
  augmentation from the purifier), on ``[B,1,S,S]`` in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medfedpure.train.loop import cosine_lr, epoch_generator, fit, load_optimizer_state
from medfedpure.train.loop import optimizer_state as optimizer_state_of
from medfedpure.train.validate import require_at_least, require_non_negative, require_positive

__all__ = ["ClassifierTrainConfig", "train_classifier", "evaluate_classifier", "augment_batch", "fgsm_rs_batch"]

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """Options of one classifier training job.

    Attributes:
        epochs: maximum number of epochs.        lr: peak AdamW learning rate.
        batch_size: scans per step.              seed: seeds every generator of the job.
        weight_decay: AdamW weight decay.        warmup_epochs: linear warm-up length.
        patience: stop after this many epochs without a better validation accuracy.
        expert_loss_weight: weight of the per-expert auxiliary cross-entropy.
        label_smoothing: label smoothing of the cross-entropy terms.
        flip: random left-right flips.           shift_px: maximum integer shift (pixels).
        gamma: intensity gamma range [1/gamma, gamma] (1 disables).
        contrast: contrast scale range [1 − c, 1 + c] (0 disables).
        noise_std: maximum σ of the additive Gaussian noise (0 disables).
        aug_prob: probability that a scan gets the intensity and noise augmentation.
        adv_eps: ℓ∞ radius ([0, 1] scan units) of FGSM-with-random-start adversarial training
            (Wong et al. 2020, step 1.25·ε); 0, the default, disables it.
        adv_frac: fraction of each batch replaced by its adversarial version (the rest stays
            clean, which keeps clean accuracy).
        adv_start_epoch: first (global) epoch with adversarial batches. From scratch at 4/255 the
            small classifier never left chance on the synthetic set; started once the clean task is
            learnt, it trains (docs/history.md, "Classifier and detector").
    """

    epochs: int = 60
    lr: float = 3e-3
    batch_size: int = 16
    seed: int = 0
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    patience: int = 15
    expert_loss_weight: float = 0.5
    label_smoothing: float = 0.0
    flip: bool = True
    shift_px: int = 8
    gamma: float = 1.3
    contrast: float = 0.15
    noise_std: float = 0.03
    aug_prob: float = 0.8
    adv_eps: float = 0.0
    adv_frac: float = 0.5
    adv_start_epoch: int = 0

    def __post_init__(self) -> None:
        require_at_least(self, ("epochs", "batch_size", "patience"))
        require_positive(self, ("lr",))
        require_non_negative(self, ("weight_decay", "warmup_epochs", "shift_px", "expert_loss_weight",
                                    "adv_start_epoch"))
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing={self.label_smoothing}: must be in [0, 1)")
        if self.gamma < 1:
            raise ValueError(f"gamma={self.gamma}: must be >= 1 (1 disables the gamma augmentation)")
        if not 0 <= self.contrast < 1:
            raise ValueError(f"contrast={self.contrast}: must be in [0, 1)")
        if not 0 <= self.noise_std <= 0.5:
            raise ValueError(f"noise_std={self.noise_std}: must be in [0, 0.5]")
        if not 0 <= self.aug_prob <= 1:
            raise ValueError(f"aug_prob={self.aug_prob}: must be in [0, 1]")
        if not 0 <= self.adv_eps <= 0.1:
            raise ValueError(f"adv_eps={self.adv_eps}: must be in [0, 0.1] (scan units; 8/255 = 0.031)")
        if not 0 < self.adv_frac <= 1:
            raise ValueError(f"adv_frac={self.adv_frac}: must be in (0, 1]")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ClassifierTrainConfig:
        """``tiny`` (tests: 2 epochs) or ``small`` (the default bundle), with field overrides.

        ``small``: 60 epochs at lr 3e-3, the last 20 with FGSM-RS adversarial batches (ε = 4/255).
        The adversarial epochs cost about a point of clean accuracy and buy much higher robust
        accuracy (benchmarks/RESULTS.md, "Models"; the trials in docs/history.md).
        """
        if name == "tiny":
            base = cls(epochs=2, batch_size=8, patience=2, shift_px=2, lr=3e-3)
        elif name == "small":
            # FGSM-RS at 4/255 over the last 20 epochs: through the whole Defender it is clearly more
            # robust at 8/255 than 2/255 for about a point of clean accuracy (docs/history.md,
            # "The small config end to end on one site").
            base = cls(adv_eps=4 / 255, adv_start_epoch=40)
        else:
            raise ValueError(f"unknown preset {name!r}: use 'tiny' or 'small'")
        return cls(**{**asdict(base), **{k: v for k, v in overrides.items() if v is not None}})

    def to_dict(self) -> dict:
        return asdict(self)


def _as_tensors(data: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        x, y = data
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a pair (x [N,1,S,S] float32, y [N] int64)") from exc
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32)
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y, dtype=torch.int64)
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"{name} x has shape {tuple(x.shape)}: expected [N, 1, S, S]")
    if y.shape != (x.shape[0],):
        raise ValueError(f"{name} y has shape {tuple(y.shape)}: expected [{x.shape[0]}]")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return x, y


def augment_batch(x: torch.Tensor, cfg: ClassifierTrainConfig, generator: torch.Generator) -> torch.Tensor:
    """The built-in augmentation on ``x`` ``[B,1,S,S]`` in [0,1] → a new tensor in [0,1]."""
    b, _, s, _ = x.shape
    g = generator

    def u(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=g)

    out = x.clone()
    if cfg.flip:
        flip = u(b) < 0.5
        out[flip] = out[flip].flip(-1)
    if cfg.shift_px > 0:
        pad = cfg.shift_px
        padded = F.pad(out, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=g)
        out = torch.stack([padded[i, :, dy[i]:dy[i] + s, dx[i]:dx[i] + s] for i in range(b)])
    apply = (u(b) < cfg.aug_prob).float().view(b, 1, 1, 1)
    if cfg.gamma > 1:
        log_g = (2 * u(b) - 1) * np.log(cfg.gamma)
        gamma = torch.exp(log_g).view(b, 1, 1, 1)
        out = apply * out.clamp_min(0).pow(gamma) + (1 - apply) * out
    if cfg.contrast > 0:
        scale = (1 + (2 * u(b) - 1) * cfg.contrast).view(b, 1, 1, 1)
        out = apply * out * scale + (1 - apply) * out
    if cfg.noise_std > 0:
        sigma = (u(b) * cfg.noise_std).view(b, 1, 1, 1)
        out = out + apply * sigma * torch.randn(out.shape, generator=g)
    return out.clamp(0.0, 1.0)


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: ClassifierTrainConfig) -> torch.Tensor:
    mix = getattr(model, "_mixture", None)
    if mix is None:  # any probability model
        return F.nll_loss(torch.log(model(x).clamp_min(1e-12)), y)
    g_lp, l_lp, gate_logit = mix(x)
    log_mix = torch.logaddexp(F.logsigmoid(gate_logit) + g_lp, F.logsigmoid(-gate_logit) + l_lp)
    ls = cfg.label_smoothing

    def ce(lp: torch.Tensor) -> torch.Tensor:
        nll = F.nll_loss(lp, y)
        return nll if ls == 0 else (1 - ls) * nll - ls * lp.mean(dim=1).mean()

    loss = ce(log_mix)
    if cfg.expert_loss_weight > 0:
        loss = loss + cfg.expert_loss_weight * 0.5 * (ce(g_lp) + ce(l_lp))
    return loss


def fgsm_rs_batch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, frac: float,
                  generator: torch.Generator) -> torch.Tensor:
    """``x`` with its first ``round(frac·B)`` scans replaced by FGSM-RS adversarial versions.

    Random start δ ~ U[−ε, ε], one signed-gradient step of 1.25·ε on the mixture's cross-entropy,
    projection onto the ε-ball and [0, 1]. The gradient is taken in eval mode (running BatchNorm
    statistics, which the attack must not update); the model's mode is restored. A new tensor.
    """
    n = max(1, int(round(frac * x.shape[0])))
    xa = x[:n]
    delta = ((torch.rand(xa.shape, generator=generator) * 2 - 1) * eps).requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        p = model((xa + delta).clamp(0.0, 1.0))
        loss = F.nll_loss(torch.log(p.clamp_min(1e-12)), y[:n])
        (grad,) = torch.autograd.grad(loss, delta)
    finally:
        model.train(was_training)
    delta = (delta.detach() + 1.25 * eps * grad.sign()).clamp(-eps, eps)
    return torch.cat([(xa + delta).clamp(0.0, 1.0), x[n:]])


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, x: Any, y: Any, *, batch_size: int = 128) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` (eval mode) on ``x`` ``[N,1,S,S]``, ``y`` ``[N]``."""
    xt, yt = _as_tensors((x, y), "evaluation data")
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for i in range(0, len(xt), batch_size):
        p = model(xt[i:i + batch_size])
        yb = yt[i:i + batch_size]
        total_loss += float(F.nll_loss(torch.log(p.clamp_min(1e-12)), yb, reduction="sum"))
        correct += int((p.argmax(1) == yb).sum())
    model.train(was_training)
    return {"loss": total_loss / len(xt), "accuracy": correct / len(xt)}


def train_classifier(
    model: torch.nn.Module,
    train: Any,
    val: Any,
    cfg: ClassifierTrainConfig,
    *,
    progress: bool = True,
    augment: Augment | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    name: str = "classifier",
    optimizer_state: dict[str, torch.Tensor] | None = None,
    schedule_offset: int = 0,
    schedule_total: int | None = None,
    return_optimizer_state: bool = False,
) -> dict[str, Any]:
    """Train ``model`` on ``train = (x, y)``, select the epoch with the best ``val`` accuracy.

    Args:
        model: a ``MoEClassifier`` (or any module mapping ``[B,1,S,S]`` to probabilities).
        train, val: ``(x [N,1,S,S] float32 in [0,1], y [N] int64)``, numpy or torch.
        cfg: ``ClassifierTrainConfig``.
        augment: optional hook ``(x [B,1,S,S], generator) -> x`` applied after the built-in ones.
        checkpoint_dir / resume / name: per-epoch checkpoints for resumption (``train.loop.fit``).
        optimizer_state: AdamW state from a previous call's ``out["optimizer_state"]`` (same model
            layout), loaded into the fresh AdamW; ``None`` starts with empty moments.
        schedule_offset: epochs of the whole schedule already run by earlier calls; this call's
            epoch ``e`` is global epoch ``schedule_offset + e`` for the warm-up + cosine learning
            rate and for the per-epoch generator (batch order, augmentation).
        schedule_total: length in epochs of the whole schedule (default ``cfg.epochs``); must be
            ``>= schedule_offset + cfg.epochs``.
        return_optimizer_state: add ``"optimizer_state"`` to the result (off by default, so the
            result stays JSON-serialisable for callers that dump it).

    With the defaults this is one self-contained run. Calls with ``epochs=k``, offsets ``0, k, 2k, …``,
    one ``schedule_total`` and the returned optimizer state carried from call to call reproduce one
    continuous run (bit for bit when each call's best epoch is its last, e.g. ``k = 1``; tested).

    Model selection: the epoch with the best validation ``accuracy − 1e-3 · loss``.

    Returns: the history dict of ``fit`` plus ``"val": evaluate_classifier(best model, val)`` and,
    with ``return_optimizer_state``, ``"optimizer_state"``: ``dict[str, Tensor]`` keyed
    ``"{param_index}.{exp_avg|exp_avg_sq|step}"``, the AdamW state after the last step (of the last
    epoch, even when an earlier epoch's weights are kept as the best). The model ends in eval mode holding the best weights.
    """
    xt, yt = _as_tensors(train, "train")
    xv, yv = _as_tensors(val, "val")
    total_epochs = cfg.epochs if schedule_total is None else int(schedule_total)
    if schedule_offset < 0:
        raise ValueError(f"schedule_offset={schedule_offset}: must be >= 0 (epochs already run)")
    if total_epochs < schedule_offset + cfg.epochs:
        raise ValueError(f"schedule_total={total_epochs} < schedule_offset + epochs = {schedule_offset + cfg.epochs}: "
                         "the whole schedule must cover this call")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if optimizer_state is not None:
        load_optimizer_state(opt, optimizer_state)
    steps_per_epoch = (len(xt) + cfg.batch_size - 1) // cfg.batch_size
    total = steps_per_epoch * total_epochs
    warmup = steps_per_epoch * cfg.warmup_epochs
    model_cfg = getattr(model, "cfg", None)

    def train_epoch(local_epoch: int) -> dict[str, float]:
        epoch = schedule_offset + local_epoch  # position in the whole schedule
        last_epoch[0] = epoch
        g = epoch_generator(cfg.seed, epoch)
        perm = torch.randperm(len(xt), generator=g)
        tot, n = 0.0, 0
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            if len(idx) < 2 and i > 0:  # BatchNorm needs more than one sample
                continue
            xb = augment_batch(xt[idx], cfg, g)
            if augment is not None:
                xb = augment(xb, g)
            if cfg.adv_eps > 0 and epoch >= cfg.adv_start_epoch:
                xb = fgsm_rs_batch(model, xb, yt[idx], cfg.adv_eps, cfg.adv_frac, g)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(epoch * steps_per_epoch + i, total, cfg.lr, warmup)
            loss = _loss(model, xb, yt[idx], cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
            n += len(idx)
        return {"loss": tot / max(n, 1)}

    last_epoch = [schedule_offset - 1]
    # Early stopping must not end the run before its adversarial epochs: the first of them becomes
    # the best at once (pre-adversarial epochs are never selected), so patience counts from there.
    patience = cfg.patience
    if cfg.adv_eps > 0:
        patience = max(patience, cfg.adv_start_epoch - schedule_offset + 1)

    def validate() -> dict[str, float]:
        m = evaluate_classifier(model, xv, yv)
        # Accuracy saturates on small validation sets: break ties by the loss. With adversarial
        # training, epochs before it starts are never selected (their clean accuracy can be higher,
        # but they are the non-robust model).
        pre_adv = cfg.adv_eps > 0 and last_epoch[0] < cfg.adv_start_epoch
        return {**m, "selection": m["accuracy"] - 1e-3 * m["loss"] - (2.0 if pre_adv else 0.0)}

    out = fit(model, opt, train_epoch=train_epoch, validate=validate, epochs=cfg.epochs,
              patience=patience, monitor="selection", mode="max", model_cfg=model_cfg, kind="moe",
              name=name, checkpoint_dir=checkpoint_dir, resume=resume, progress=progress)
    out["val"] = evaluate_classifier(model, xv, yv)
    if return_optimizer_state:
        out["optimizer_state"] = optimizer_state_of(opt)
    return out
