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

Adversarial training (``ClassifierTrainConfig.adv``, active when ``adv_eps > 0``):

- ``fgsm-rs``: FGSM with a random start on a fraction of each batch (Wong et al., "Fast is better
  than free", ICLR 2020); cheap, but prone to catastrophic overfitting at larger ε;
- ``nfgsm``: N-FGSM (de Jorge et al., "Make Some Noise: Reliable and Efficient Single-Step Adversarial
  Training", NeurIPS 2022): a uniform start of ``nfgsm_noise``·ε (2ε by default), one signed step of ε
  and no projection back onto the ε-ball; as cheap as FGSM-RS, and the stronger noise and unclipped step
  are what keep it from catastrophic overfitting at larger ε (none in 160 epochs at 8/255 here, but it
  needed four times PGD-5's epochs for PGD-5's robustness: benchmarks/RESULTS.md);
- ``pgd``: PGD-k adversarial training (Madry et al., ICLR 2018), ℓ∞ or ℓ2, on a fraction of each batch;
- ``trades``: the TRADES objective (Zhang et al., ICML 2019), CE on the clean batch plus
  β · KL(p(x) ‖ p(x')) with x' the PGD maximiser of that KL in the ε-ball.

The attacks are computed in eval mode (running BatchNorm statistics) and never update the model.
Robust validation (``robust_val > 0``): each epoch, PGD at the training ε and norm on a fixed subset
of the validation split; with ``select="robust"`` it picks the kept epoch.

Through the purifier (``adv_through_purifier``, ``pgd`` only): the attack is crafted against what the
deployed classifier sees — the classifier after purification at ``purifier_t`` (noise to t*, K steps of
the frozen student), its gradient averaged over ``purifier_eot`` purifier-noise draws (EOT) — and the
classifier trains on the purified adversarial scans (one fresh noise draw). Each attack step then
costs ``purifier_eot`` × K denoiser forward and backward passes.

Denoised-smoothing fine-tuning (``smoothing_sigmas``): a fraction of each batch is noised at a σ drawn
from the list, one-shot denoised by a frozen diffusion denoiser at the diffusion time of noise level
2σ (``runtime.certify.sigma_to_t``, exactly as certification does) and classified with the CE loss, so
the classifier learns what the certified base classifier sees (Carlini et al., ICLR 2023).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medfedpure.models.diffusion import purify
from medfedpure.runtime.certify import sigma_to_t
from medfedpure.runtime.sampler import interp_alpha_bar
from medfedpure.train.attacks import NORMS, ascent_step, pgd, project
from medfedpure.train.device import channels_last, module_device, resolve_device
from medfedpure.train.loop import cosine_lr, epoch_generator, fit, load_optimizer_state
from medfedpure.train.loop import optimizer_state as optimizer_state_of
from medfedpure.train.validate import freeze_tuples, require_at_least, require_non_negative, require_positive

__all__ = ["ClassifierTrainConfig", "train_classifier", "evaluate_classifier", "augment_batch", "fgsm_rs_batch",
           "pgd_batch", "nfgsm_batch", "trades_adversary", "trades_loss", "robust_accuracy", "denoised_smoothing_batch",
           "PurifiedClassifier", "pgd_through_purifier_batch", "robust_val_subset", "ADV_METHODS", "ADV_NORMS"]

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
#: ``denoiser(x_t [B,1,S,S], t [B] float32) -> x̂₀ [B,1,S,S]`` in diffusion space ([−1, 1])
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

ADV_METHODS = ("none", "fgsm-rs", "nfgsm", "pgd", "trades")
ADV_NORMS = NORMS  # the attack norms of train.attacks
#: largest accepted radius per norm, in [0, 1] scan units (ℓ2 over the whole S×S scan)
_MAX_EPS = {"linf": 0.1, "l2": 8.0}


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
        adv: adversarial-training method, one of ``ADV_METHODS`` (``fgsm-rs``, the default, is the
            presets' recipe; ``none`` disables adversarial training whatever ``adv_eps``).
        adv_steps: attack iterations of ``pgd`` and ``trades`` (step 2.5·ε/steps).
        adv_norm: ``linf`` or ``l2`` (``fgsm-rs`` and ``nfgsm`` are ℓ∞ only); ``adv_eps`` is the radius in
            that norm.
        nfgsm_noise: ``nfgsm``'s start, uniform in [−k·ε, k·ε] (k = 2, the method's default at 8/255).
        trades_beta: weight β of the TRADES KL term (0 reduces the loss to the clean CE).
        robust_val: scans of the fixed validation subset attacked each epoch (PGD at the training ε
            and norm); 0 disables the robust validation.
        robust_val_steps: PGD iterations of the robust validation.
        select: ``clean`` (validation accuracy, the presets) or ``robust`` (robust validation
            accuracy, ties broken by clean accuracy; needs ``robust_val > 0`` and adversarial training).
        smoothing_sigmas: σ values (scan units) of denoised-smoothing fine-tuning; empty disables it.
            ``train_classifier`` then needs a ``denoiser``.
        smoothing_frac: fraction of each batch (its last scans) noised and denoised.
        adv_through_purifier: craft the ``pgd`` attack through purification at ``purifier_t`` and
            train on the purified adversarial scans; ``train_classifier`` then needs a ``denoiser``.
        purifier_t: t* of that purification (DDPM step of T; the bundle's gate ``t_min`` is the
            weakest purification a flagged scan gets).
        purifier_steps: K, the student's sampling steps.
        purifier_eot: purifier-noise draws averaged per attack gradient (EOT).
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
    adv: str = "fgsm-rs"
    adv_steps: int = 7
    adv_norm: str = "linf"
    nfgsm_noise: float = 2.0
    trades_beta: float = 6.0
    robust_val: int = 0
    robust_val_steps: int = 10
    select: str = "clean"
    smoothing_sigmas: tuple[float, ...] = ()
    smoothing_frac: float = 0.25
    adv_through_purifier: bool = False
    purifier_t: float = 60.0
    purifier_steps: int = 1
    purifier_eot: int = 2

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
        if self.adv not in ADV_METHODS:
            raise ValueError(f"adv={self.adv!r}: use one of {ADV_METHODS}")
        if self.adv_norm not in ADV_NORMS:
            raise ValueError(f"adv_norm={self.adv_norm!r}: use one of {ADV_NORMS}")
        if self.adv in ("fgsm-rs", "nfgsm") and self.adv_norm != "linf":
            raise ValueError(f"adv={self.adv!r} is an ℓ∞ attack: use adv_norm='linf', or adv='pgd' for ℓ2")
        top = _MAX_EPS[self.adv_norm]
        if not 0 <= self.adv_eps <= top:
            hint = "scan units; 8/255 = 0.031" if self.adv_norm == "linf" else "ℓ2 over the scan, e.g. 0.5"
            raise ValueError(f"adv_eps={self.adv_eps}: must be in [0, {top}] ({hint})")
        if not 0 < self.adv_frac <= 1:
            raise ValueError(f"adv_frac={self.adv_frac}: must be in (0, 1]")
        require_at_least(self, ("adv_steps", "robust_val_steps"))
        require_non_negative(self, ("trades_beta", "robust_val", "nfgsm_noise"))
        if self.select not in ("clean", "robust"):
            raise ValueError(f"select={self.select!r}: use 'clean' or 'robust'")
        if self.select == "robust" and (self.robust_val == 0 or not self.adversarial):
            raise ValueError("select='robust' needs robust_val > 0 and adversarial training (adv != 'none', "
                             "adv_eps > 0): there is no robust validation accuracy to select on")
        freeze_tuples(self, ("smoothing_sigmas",))
        object.__setattr__(self, "smoothing_sigmas", tuple(float(s) for s in self.smoothing_sigmas))
        if any(not (0 < s <= 1) for s in self.smoothing_sigmas):
            raise ValueError(f"smoothing_sigmas={self.smoothing_sigmas}: each σ must be in (0, 1] (scan units)")
        if not 0 < self.smoothing_frac <= 1:
            raise ValueError(f"smoothing_frac={self.smoothing_frac}: must be in (0, 1]")
        require_at_least(self, ("purifier_steps", "purifier_eot"))
        if not self.purifier_t > 0:
            raise ValueError(f"purifier_t={self.purifier_t}: must be > 0 (a DDPM step of the purifier)")
        if self.adv_through_purifier and self.adv != "pgd":
            raise ValueError(f"adv_through_purifier with adv={self.adv!r}: only adv='pgd' is crafted through the "
                             "purifier")
        if (self.smoothing_sigmas and self.adversarial and self.adv != "trades"
                and self.adv_frac + self.smoothing_frac > 1):
            raise ValueError(f"adv_frac + smoothing_frac = {self.adv_frac + self.smoothing_frac} > 1: the "
                             "adversarial scans (first of the batch) and the denoised ones (last) would overlap")

    @property
    def adversarial(self) -> bool:
        """Whether batches get an adversarial treatment (from ``adv_start_epoch`` on)."""
        return self.adv != "none" and self.adv_eps > 0

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

    def u(*shape: int) -> torch.Tensor:  # drawn on the generator's device (CPU), used on x's
        return torch.rand(shape, generator=g).to(x.device)

    out = x.clone()
    if cfg.flip:
        flip = u(b) < 0.5
        out[flip] = out[flip].flip(-1)
    if cfg.shift_px > 0:
        pad = cfg.shift_px
        padded = F.pad(out, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=g).tolist()
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=g).tolist()
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
        out = out + apply * sigma * torch.randn(out.shape, generator=g).to(x.device)
    return out.clamp(0.0, 1.0)


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: ClassifierTrainConfig) -> torch.Tensor:
    """The training cross-entropy of ``model`` on ``(x [B,1,S,S], y [B])`` (a scalar)."""
    return _loss_and_log_probs(model, x, y, cfg)[0]


def _loss_and_log_probs(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                        cfg: ClassifierTrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The training cross-entropy and the mixture's log-probabilities ``[B, C]`` of one forward pass."""
    mix = getattr(model, "_mixture", None)
    if mix is None:  # any probability model
        lp = torch.log(model(x).clamp_min(1e-12))
        return F.nll_loss(lp, y), lp
    g_lp, l_lp, gate_logit = mix(x)
    log_mix = torch.logaddexp(F.logsigmoid(gate_logit) + g_lp, F.logsigmoid(-gate_logit) + l_lp)
    ls = cfg.label_smoothing

    def ce(lp: torch.Tensor) -> torch.Tensor:
        nll = F.nll_loss(lp, y)
        return nll if ls == 0 else (1 - ls) * nll - ls * lp.mean(dim=1).mean()

    loss = ce(log_mix)
    if cfg.expert_loss_weight > 0:
        loss = loss + cfg.expert_loss_weight * 0.5 * (ce(g_lp) + ce(l_lp))
    return loss, log_mix


def _log_probs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``log p(x)`` ``[B, C]``: the model's exact ``log_probs`` when it has one (no ``log(0)`` masking)."""
    fn = getattr(model, "log_probs", None)
    if callable(fn):
        return fn(x)
    return torch.log(model(x).clamp_min(1e-30))


def _pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, norm: str,
         generator: torch.Generator) -> torch.Tensor:
    """PGD (``train.attacks.pgd``: summed cross-entropy, random start, step 2.5·ε/steps) with the model in
    eval mode, its mode restored after."""
    was_training = model.training
    model.eval()
    try:
        return pgd(model, x, y, eps, norm=norm, steps=steps, generator=generator)
    finally:
        model.train(was_training)


def pgd_batch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, frac: float,
              generator: torch.Generator, norm: str = "linf") -> torch.Tensor:
    """``x`` ``[B,1,S,S]`` with its first ``round(frac·B)`` scans replaced by PGD adversarial versions.

    PGD-``steps`` in the ``norm`` ball of radius ``eps`` (Madry et al. 2018): random start, step
    2.5·ε/steps on the mixture's cross-entropy, projection onto the ball and [0, 1] after each step.
    Gradients are taken in eval mode (the model's mode is restored; BatchNorm statistics untouched).
    Returns a new tensor; the rest of the batch is ``x`` unchanged.
    """
    n = max(1, int(round(frac * x.shape[0])))
    xa = _pgd(model, x[:n], y[:n], eps, steps, norm, generator)
    return torch.cat([xa, x[n:]])


class PurifiedClassifier(torch.nn.Module):
    """``log p(purify(x))`` averaged over ``eot`` purifier-noise draws: what the deployed classifier sees.

    ``log_probs(x [B,1,S,S]) -> [B, C]`` = log of the mean over draws of the classifier's
    probabilities on ``purify(denoiser, x, t*, steps)``, differentiable in ``x`` (the full gradient
    through the K-step student). The noise comes from ``generator``, fresh for every call.
    """

    def __init__(self, classifier: torch.nn.Module, denoiser: Any, t_star: float, steps: int, eot: int,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.classifier, self.denoiser = classifier, denoiser
        self.t_star, self.steps, self.eot, self.generator = float(t_star), int(steps), int(eot), generator

    def purified(self, x: torch.Tensor) -> torch.Tensor:
        """One purification of ``x`` at t* with fresh noise from the generator."""
        noise = torch.randn(x.shape, generator=self.generator).to(x.device)
        return purify(self.denoiser, x, torch.full((x.shape[0],), self.t_star, device=x.device), self.steps,
                      noise=noise)

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        lps = torch.stack([_log_probs(self.classifier, self.purified(x)) for _ in range(self.eot)])
        return torch.logsumexp(lps, dim=0) - float(np.log(self.eot))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_probs(x).exp()


def pgd_through_purifier_batch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                               cfg: ClassifierTrainConfig, denoiser: Any,
                               generator: torch.Generator) -> torch.Tensor:
    """``x`` with its first ``round(adv_frac·B)`` scans replaced by the purification of PGD adversarial
    scans crafted through the purifier (EOT); the rest purified too, with their own fresh noise.

    Every scan of the returned ``[B,1,S,S]`` batch is what the deployed classifier would see at
    ``cfg.purifier_t``. The model's mode is restored; the denoiser is frozen.
    """
    was_training = model.training
    model.eval()
    try:
        pc = PurifiedClassifier(model, denoiser, cfg.purifier_t, cfg.purifier_steps, cfg.purifier_eot, generator)
        pc.eval()  # the attack restores pc's mode: keep it (and so the denoiser's) eval
        xb = pgd_batch(pc, x, y, cfg.adv_eps, cfg.adv_steps, cfg.adv_frac, generator, cfg.adv_norm)
        with torch.no_grad():
            return pc.purified(xb)
    finally:
        model.train(was_training)


def trades_adversary(model: torch.nn.Module, x: torch.Tensor, eps: float, steps: int,
                     generator: torch.Generator, norm: str = "linf") -> torch.Tensor:
    """The TRADES inner maximiser: x' in the ε-ball of ``x`` ``[B,1,S,S]`` maximising KL(p(x) ‖ p(x')).

    Start x + 0.001·N(0, I) (Zhang et al. 2019), then ``steps`` ascent steps of 2.5·ε/steps with
    projection; label-free. Eval mode, the model's mode restored. A new tensor, detached.
    """
    alpha = 2.5 * eps / steps
    x0 = x.detach()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p_clean = _log_probs(model, x0).exp()
        xa = project(x0 + 0.001 * torch.randn(x0.shape, generator=generator).to(x0.device), x0, eps, norm)
        for _ in range(steps):
            xg = xa.detach().requires_grad_(True)
            kl = F.kl_div(_log_probs(model, xg), p_clean, reduction="sum")
            (g,) = torch.autograd.grad(kl, xg)
            xa = project(xa + ascent_step(g, alpha, norm), x0, eps, norm).detach()
    finally:
        model.train(was_training)
    return xa


def trades_loss(model: torch.nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                cfg: ClassifierTrainConfig, beta: float) -> torch.Tensor:
    """TRADES: the training cross-entropy on ``x`` + β · KL(p(x) ‖ p(x_adv)) (batch mean).

    ``x``, ``x_adv``: ``[B,1,S,S]``; ``y``: ``[B]``. Both forward passes run in the model's current
    mode; with β = 0 this is exactly ``_loss(model, x, y, cfg)``.
    """
    loss, lp_clean = _loss_and_log_probs(model, x, y, cfg)
    if beta == 0:
        return loss
    kl = F.kl_div(_log_probs(model, x_adv), lp_clean.exp(), reduction="batchmean")
    return loss + beta * kl


def robust_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                    norm: str, generator: torch.Generator, *, batch_size: int = 64) -> float:
    """Accuracy of ``model`` on PGD-``steps`` adversarial versions of ``x`` ``[N,1,S,S]`` (eval mode)."""
    correct = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        xa = _pgd(model, xb, yb, eps, steps, norm, generator)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            correct += int((_log_probs(model, xa).argmax(1) == yb).sum())
        model.train(was_training)
    return correct / max(len(x), 1)


def denoised_smoothing_batch(x: torch.Tensor, denoiser: Denoiser, alphas_cumprod: np.ndarray,
                             sigmas: tuple[float, ...], frac: float, generator: torch.Generator) -> torch.Tensor:
    """``x`` ``[B,1,S,S]`` with its last ``round(frac·B)`` scans noised and one-shot denoised.

    Each chosen scan draws σ uniformly from ``sigmas`` and ε ~ N(0, I), then, as certification's base
    classifier does (``runtime.certify``): t = ``sigma_to_t(ᾱ, σ)`` (noise level 2σ in y = 2x − 1),
    x_t = √ᾱ_t · (2(x + σε) − 1), x̂₀ = ``denoiser(x_t, t)`` (no gradient: the denoiser is frozen),
    and the scan becomes clip((x̂₀ + 1)/2, 0, 1). A new tensor; the first scans are ``x`` unchanged.
    """
    b = x.shape[0]
    m = max(1, int(round(frac * b)))
    table = np.asarray(alphas_cumprod, dtype=np.float64)
    pick = torch.randint(0, len(sigmas), (m,), generator=generator)
    sig = torch.tensor([sigmas[int(i)] for i in pick], dtype=torch.float32)
    t = torch.tensor([sigma_to_t(table, float(s)) for s in sig], dtype=torch.float32)
    ab = torch.from_numpy(interp_alpha_bar(table, t.numpy())).view(m, 1, 1, 1).to(x.device)
    eps = torch.randn((m,) + tuple(x.shape[1:]), generator=generator).to(x.device)
    noisy = x[b - m:] + sig.view(m, 1, 1, 1).to(x.device) * eps
    x_t = ab.sqrt() * (noisy * 2 - 1)
    with torch.no_grad():
        x0 = denoiser(x_t, t.to(x.device))
    return torch.cat([x[:b - m], ((x0.detach() + 1) / 2).clamp(0.0, 1.0)])


def _eval_mode_grad(model: torch.nn.Module, x_in: torch.Tensor, y: torch.Tensor, wrt: torch.Tensor) -> torch.Tensor:
    """The gradient of the mixture's cross-entropy at ``x_in`` with respect to ``wrt`` (``x_in`` or the leaf it
    was computed from), taken in eval mode (running BatchNorm statistics, which an attack must not update);
    the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        p = model(x_in)
        loss = F.nll_loss(torch.log(p.clamp_min(1e-12)), y)
        (grad,) = torch.autograd.grad(loss, wrt)
    finally:
        model.train(was_training)
    return grad


def fgsm_rs_batch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, frac: float,
                  generator: torch.Generator) -> torch.Tensor:
    """``x`` with its first ``round(frac·B)`` scans replaced by FGSM-RS adversarial versions.

    Random start δ ~ U[−ε, ε], one signed-gradient step of 1.25·ε on the mixture's cross-entropy,
    projection onto the ε-ball and [0, 1]. The gradient is taken in eval mode (running BatchNorm
    statistics, which the attack must not update); the model's mode is restored. A new tensor.
    """
    n = max(1, int(round(frac * x.shape[0])))
    xa = x[:n]
    delta = ((torch.rand(xa.shape, generator=generator).to(x.device) * 2 - 1) * eps).requires_grad_(True)
    grad = _eval_mode_grad(model, (xa + delta).clamp(0.0, 1.0), y[:n], delta)
    delta = (delta.detach() + 1.25 * eps * grad.sign()).clamp(-eps, eps)
    return torch.cat([(xa + delta).clamp(0.0, 1.0), x[n:]])


def robust_val_subset(num_val: int, num: int, seed: int) -> torch.Tensor:
    """Indices of the validation scans the robust validation attacks every epoch: a fixed draw of ``num`` of
    ``num_val``, a pure function of ``seed`` (the same every epoch and across resumptions)."""
    return torch.randperm(num_val, generator=epoch_generator(seed, 0, stream=7))[:num]


def nfgsm_batch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, frac: float,
                generator: torch.Generator, noise: float = 2.0) -> torch.Tensor:
    """``x`` with its first ``round(frac·B)`` scans replaced by N-FGSM adversarial versions.

    Start η ~ U[−k·ε, k·ε] (k = ``noise``), one signed-gradient step of ε on the mixture's cross-entropy at
    x + η, and **no** projection onto the ε-ball: the training scan is x + η + ε·sign(∇), clipped to
    [0, 1] only (up to (k + 1)·ε from x; de Jorge et al. 2022). The gradient is taken in eval mode
    (running BatchNorm statistics); the model's mode is restored. A new tensor.
    """
    n = max(1, int(round(frac * x.shape[0])))
    xa = x[:n]
    eta = (torch.rand(xa.shape, generator=generator).to(x.device) * 2 - 1) * (noise * eps)
    x_start = (xa + eta).clamp(0.0, 1.0).requires_grad_(True)
    grad = _eval_mode_grad(model, x_start, y[:n], x_start)
    return torch.cat([(x_start.detach() + eps * grad.sign()).clamp(0.0, 1.0), x[n:]])


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, x: Any, y: Any, *, batch_size: int = 128) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` (eval mode) on ``x`` ``[N,1,S,S]``, ``y`` ``[N]``."""
    xt, yt = _as_tensors((x, y), "evaluation data")
    dev = module_device(model)
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for i in range(0, len(xt), batch_size):
        p = model(xt[i:i + batch_size].to(dev))
        yb = yt[i:i + batch_size].to(dev)
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
    denoiser: Denoiser | None = None,
    denoiser_alphas_cumprod: Any = None,
    device: str = "cpu",
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
        denoiser: the frozen diffusion denoiser ``(x_t, t) -> x̂₀`` of denoised-smoothing
            fine-tuning; required when ``cfg.smoothing_sigmas`` is set, unused otherwise.
        denoiser_alphas_cumprod: its ᾱ table ``[T + 1]`` (default: ``denoiser.schedule``'s).
        device: ``cpu``, ``cuda`` or ``auto`` (:func:`medfedpure.train.device.resolve_device`; a missing GPU
            is a ``DeviceError`` before any work). The model (and the denoiser) train there and are moved
            back to the device they came on when the call ends, also on an error; the data stay the
            caller's. Every random draw (batch order, augmentation, attack starts, smoothing noise) comes
            from the same CPU generators on every device, so a CUDA run sees the CPU run's draws and
            differs from it only by floating-point order.

    With the defaults this is one self-contained run. Calls with ``epochs=k``, offsets ``0, k, 2k, …``,
    one ``schedule_total`` and the returned optimizer state carried from call to call reproduce one
    continuous run (bit for bit when each call's best epoch is its last, e.g. ``k = 1``; tested).

    Model selection: the epoch with the best validation ``accuracy − 1e-3 · loss`` (``select="clean"``)
    or the best robust validation accuracy ``+ 1e-3 · accuracy`` (``select="robust"``); with
    adversarial training, epochs before ``adv_start_epoch`` are never kept. With ``robust_val > 0``
    each epoch's row of the history carries ``val_robust_accuracy``, and the result ``"robust_val"``
    (the kept model's robust validation accuracy, ε, norm, steps, subset size).

    Returns: the history dict of ``fit`` plus ``"val": evaluate_classifier(best model, val)`` and,
    with ``return_optimizer_state``, ``"optimizer_state"``: ``dict[str, Tensor]`` keyed
    ``"{param_index}.{exp_avg|exp_avg_sq|step}"``, the AdamW state after the last step (of the last
    epoch, even when an earlier epoch's weights are kept as the best; on the CPU whatever the device). The model
    ends in eval mode holding the best weights.
    """
    dev = torch.device(resolve_device(device))
    xt, yt = _as_tensors(train, "train")
    xv, yv = _as_tensors(val, "val")
    homes = [(m, module_device(m)) for m in (model, denoiser) if isinstance(m, torch.nn.Module)]
    try:
        for m, _ in homes:
            m.to(dev)
        with channels_last(model):  # on the CPU: oneDNN's faster convolutions; the model leaves as it came
            out = _train_on_device(model, (xt.to(dev), yt.to(dev)), (xv, yv), cfg, dev, progress=progress,
                                   augment=augment, checkpoint_dir=checkpoint_dir, resume=resume, name=name,
                                   optimizer_state=optimizer_state, schedule_offset=schedule_offset,
                                   schedule_total=schedule_total, return_optimizer_state=return_optimizer_state,
                                   denoiser=denoiser, denoiser_alphas_cumprod=denoiser_alphas_cumprod)
    finally:
        for m, home in homes:
            m.to(home)
    if "optimizer_state" in out:
        out["optimizer_state"] = {k: v.cpu().contiguous() for k, v in out["optimizer_state"].items()}
    return out


def _train_on_device(model: torch.nn.Module, train: tuple[torch.Tensor, torch.Tensor],
                     val: tuple[torch.Tensor, torch.Tensor], cfg: ClassifierTrainConfig, dev: torch.device, *,
                     progress: bool, augment: Augment | None, checkpoint_dir: str | Path | None, resume: bool,
                     name: str, optimizer_state: dict[str, torch.Tensor] | None, schedule_offset: int,
                     schedule_total: int | None, return_optimizer_state: bool, denoiser: Denoiser | None,
                     denoiser_alphas_cumprod: Any) -> dict[str, Any]:
    """:func:`train_classifier`'s run, the model (and denoiser) on ``dev``, ``train`` there, ``val`` anywhere."""
    xt, yt = train
    xv, yv = val
    table: np.ndarray | None = None
    if cfg.adv_through_purifier:
        if denoiser is None or getattr(denoiser, "schedule", None) is None:
            raise ValueError("cfg.adv_through_purifier needs denoiser= (the bundle's or a run's diffusion student, "
                             "with its .schedule)")
        if isinstance(denoiser, torch.nn.Module):
            denoiser.eval().requires_grad_(False)
    if cfg.smoothing_sigmas:
        if denoiser is None:
            raise ValueError("cfg.smoothing_sigmas is set but no denoiser was given: pass denoiser= (the bundle's "
                             "or a run's diffusion student), or clear smoothing_sigmas")
        if denoiser_alphas_cumprod is None:
            sched = getattr(denoiser, "schedule", None)
            if sched is None:
                raise ValueError("the denoiser has no .schedule: pass denoiser_alphas_cumprod= (its ᾱ table)")
            denoiser_alphas_cumprod = sched.alphas_cumprod
        table = np.asarray(denoiser_alphas_cumprod, dtype=np.float64)
        for sigma in cfg.smoothing_sigmas:
            sigma_to_t(table, sigma)  # raises early for a σ beyond the schedule
        if isinstance(denoiser, torch.nn.Module):
            denoiser.eval().requires_grad_(False)
    if cfg.robust_val > 0:
        # a fixed subset, the same every epoch (and across resumptions): comparable robust accuracies
        sub = robust_val_subset(len(xv), cfg.robust_val, cfg.seed)
        xv_rob, yv_rob = xv[sub].to(dev), yv[sub].to(dev)
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
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size].to(dev)
            if len(idx) < 2 and i > 0:  # BatchNorm needs more than one sample
                continue
            xb = augment_batch(xt[idx], cfg, g)
            if augment is not None:
                xb = augment(xb, g)
            if table is not None:
                xb = denoised_smoothing_batch(xb, denoiser, table, cfg.smoothing_sigmas,  # type: ignore[arg-type]
                                              cfg.smoothing_frac, g)
            x_adv = None
            if cfg.adversarial and epoch >= cfg.adv_start_epoch:
                if cfg.adv == "fgsm-rs":
                    xb = fgsm_rs_batch(model, xb, yt[idx], cfg.adv_eps, cfg.adv_frac, g)
                elif cfg.adv == "nfgsm":
                    xb = nfgsm_batch(model, xb, yt[idx], cfg.adv_eps, cfg.adv_frac, g, cfg.nfgsm_noise)
                elif cfg.adv == "pgd" and cfg.adv_through_purifier:
                    xb = pgd_through_purifier_batch(model, xb, yt[idx], cfg, denoiser, g)
                elif cfg.adv == "pgd":
                    xb = pgd_batch(model, xb, yt[idx], cfg.adv_eps, cfg.adv_steps, cfg.adv_frac, g, cfg.adv_norm)
                else:
                    x_adv = trades_adversary(model, xb, cfg.adv_eps, cfg.adv_steps, g, cfg.adv_norm)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(epoch * steps_per_epoch + i, total, cfg.lr, warmup)
            if x_adv is None:
                loss = _loss(model, xb, yt[idx], cfg)
            else:
                loss = trades_loss(model, xb, x_adv, yt[idx], cfg, cfg.trades_beta)
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
    if cfg.adversarial:
        patience = max(patience, cfg.adv_start_epoch - schedule_offset + 1)

    def robust_val() -> float:
        with torch.enable_grad():  # fit validates under no_grad; the attack needs gradients
            return robust_accuracy(model, xv_rob, yv_rob, cfg.adv_eps, cfg.robust_val_steps, cfg.adv_norm,
                                   epoch_generator(cfg.seed, 0, stream=8))

    def validate() -> dict[str, float]:
        m = evaluate_classifier(model, xv, yv)
        # Accuracy saturates on small validation sets: break ties by the loss. With adversarial
        # training, epochs before it starts are never selected (their clean accuracy can be higher,
        # but they are the non-robust model).
        pre_adv = cfg.adversarial and last_epoch[0] < cfg.adv_start_epoch
        if cfg.robust_val > 0:
            m["robust_accuracy"] = robust_val() if cfg.adv_eps > 0 else m["accuracy"]
        if cfg.select == "robust":
            score = m["robust_accuracy"] + 1e-3 * m["accuracy"] - 1e-6 * m["loss"]
        else:
            score = m["accuracy"] - 1e-3 * m["loss"]
        return {**m, "selection": score - (2.0 if pre_adv else 0.0)}

    out = fit(model, opt, train_epoch=train_epoch, validate=validate, epochs=cfg.epochs,
              patience=patience, monitor="selection", mode="max", model_cfg=model_cfg, kind="moe",
              name=name, checkpoint_dir=checkpoint_dir, resume=resume, progress=progress)
    out["val"] = evaluate_classifier(model, xv, yv)
    if cfg.robust_val > 0:
        # fit left the model holding its kept epoch's weights, whose robust accuracy that epoch's validation
        # measured with the same fixed subset and attack seed: read it back rather than attack again (a
        # whole PGD run on the subset, about 7 % of an adversarial round)
        kept = [r for r in out["history"] if r["epoch"] == out["best_epoch"] and "val_robust_accuracy" in r]
        if kept:
            robust = kept[-1]["val_robust_accuracy"]
        else:
            robust = robust_val() if cfg.adv_eps > 0 else out["val"]["accuracy"]
        out["robust_val"] = {"accuracy": robust,
                             "eps": cfg.adv_eps, "norm": cfg.adv_norm, "steps": cfg.robust_val_steps,
                             "num_scans": len(xv_rob)}
    if return_optimizer_state:
        out["optimizer_state"] = optimizer_state_of(opt)
    return out
