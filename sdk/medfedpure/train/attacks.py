"""Gradient attacks against a classifier: FGSM, PGD ℓ∞ and PGD ℓ2 — the one implementation that
adversarial training (``train.classifier``) and the evaluation (``medfedpure.eval``, rung 1 of
docs/evaluation.md) both use, with its steps (``ball_start``, ``ascent_step``, ``project``) shared by
the training-only attacks (TRADES, PGD through the purifier), and the two pieces of the gate-evasion
attacks (``band_limited``, ``evasion_step``) that the evaluation's rung 3 and the detector's hardening
(``train.detector``) share.

Functions, not stateful objects: ``attack(model, x, y, eps, ..., generator=g) -> x_adv``. The model
is any callable ``[B,1,S,S] -> [B,C]``; the loss is the cross-entropy of the true label computed
from the model's log-probabilities:

- if the model has a ``log_probs`` method (``MoEClassifier`` does) it is used, so the gradient is
  exact even where a probability underflows (no gradient masking from ``log(0)``);
- otherwise ``output="probs"`` (the default: our models return probabilities) takes the log of the
  clamped probabilities, and ``output="logits"`` a log-softmax.

Inputs and outputs are in the model's input space, float32 in [0, 1]; ε is stated in that space
(e.g. ``8 / 255``). The model's train/eval mode is left as the caller set it (use eval).
The caller's tensors are never modified.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["NORMS", "fgsm", "pgd", "pgd_linf", "pgd_l2", "attack_loss", "ball_start", "ascent_step", "project",
           "band_limited", "evasion_step"]

NORMS = ("linf", "l2")
_TINY = 1e-12

Model = Callable[[torch.Tensor], torch.Tensor]


def _check(x: torch.Tensor, y: torch.Tensor, eps: float) -> None:
    if x.dim() != 4:
        raise ValueError(f"x has shape {tuple(x.shape)}: expected [B, C, H, W]")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y has shape {tuple(y.shape)}: expected [{x.shape[0]}] class indices")
    if not eps >= 0:
        raise ValueError(f"eps={eps}: must be >= 0 (state it in input space, e.g. 8/255)")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError("x has values outside [0, 1]: attack the preprocessed scans")


def attack_loss(model: Model, x: torch.Tensor, y: torch.Tensor, output: str = "probs") -> torch.Tensor:
    """Summed cross-entropy of labels ``y`` ``[B]`` under ``model(x)``; summed so that each
    sample's gradient does not depend on the batch size."""
    log_probs_fn = getattr(model, "log_probs", None)
    if callable(log_probs_fn):
        lp = log_probs_fn(x)
    elif output == "probs":
        lp = torch.log(model(x).clamp_min(1e-30))
    elif output == "logits":
        lp = F.log_softmax(model(x), dim=1)
    else:
        raise ValueError(f"output={output!r}: use 'probs' or 'logits'")
    return F.nll_loss(lp, y, reduction="sum")


def _grad(model: Model, x: torch.Tensor, y: torch.Tensor, output: str) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    loss = attack_loss(model, x, y, output)
    (g,) = torch.autograd.grad(loss, x)
    return g


def fgsm(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float, *, output: str = "probs") -> torch.Tensor:
    r"""FGSM (Goodfellow et al., "Explaining and Harnessing Adversarial Examples", ICLR 2015).

    Distance: ℓ∞.  ``x_adv = clip(x + ε · sign(∇ₓ L(x, y)), 0, 1)``.

    Args:
        model: callable ``[B,C,H,W] -> [B,K]`` (probabilities unless ``output="logits"``).
        x: ``[B,C,H,W]`` float in [0, 1].   y: ``[B]`` int64 true labels.
        eps: maximum perturbation (ℓ∞) in input space.

    Returns: ``x_adv`` ``[B,C,H,W]`` in [0, 1], detached.

    Example::

        x_adv = fgsm(model, x, y, eps=8 / 255)
    """
    _check(x, y, eps)
    g = _grad(model, x, y, output)
    return (x + eps * g.sign()).clamp(0.0, 1.0).detach()


def pgd_linf(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int = 10,
             alpha: float | None = None, random_start: bool = True,
             generator: torch.Generator | None = None, output: str = "probs") -> torch.Tensor:
    r"""PGD with ℓ∞ bound (Madry et al., "Towards Deep Learning Models Resistant to Adversarial
    Attacks", ICLR 2018).

    Distance: ℓ∞.  ``x_{i+1} = Π_{B∞(x, ε) ∩ [0,1]}(x_i + α · sign(∇ L(x_i, y)))``, starting from
    ``x + U(−ε, ε)`` when ``random_start``.

    Args:
        model: callable ``[B,C,H,W] -> [B,K]``.
        x: ``[B,C,H,W]`` float in [0, 1].   y: ``[B]`` int64 true labels.
        eps: ℓ∞ radius in input space.   steps: iterations (≥ 1).
        alpha: step size; default ``2.5 · ε / steps`` (Madry et al.), so the ball can be crossed.
        random_start: uniform start in the ε-ball, drawn from ``generator`` (required then).
        generator: ``torch.Generator`` on ``x``'s device (or CPU): the only randomness used.

    Returns: ``x_adv`` ``[B,C,H,W]`` in [0, 1] with ``‖x_adv − x‖∞ ≤ ε``, detached.

    Example::

        g = torch.Generator().manual_seed(0)
        x_adv = pgd_linf(model, x, y, eps=8 / 255, steps=10, generator=g)
    """
    return pgd(model, x, y, eps, norm="linf", steps=steps, alpha=alpha, random_start=random_start,
               generator=generator, output=output)


def pgd_l2(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int = 10,
           alpha: float | None = None, random_start: bool = True,
           generator: torch.Generator | None = None, output: str = "probs") -> torch.Tensor:
    r"""PGD with ℓ2 bound (Madry et al., ICLR 2018), as ``torchattacks.PGDL2``.

    Distance: ℓ2 per sample.  ``x_{i+1} = Π(x_i + α · ∇L / ‖∇L‖₂)``, the projection scaling
    ``δ`` back onto the ε-sphere and clipping to [0, 1]. The random start draws a direction
    uniformly on the sphere and a radius ``ε · u`` (u ~ U(0,1)), as torchattacks does.

    Args:
        model: callable ``[B,C,H,W] -> [B,K]``.
        x: ``[B,C,H,W]`` float in [0, 1].   y: ``[B]`` int64 true labels.
        eps: ℓ2 radius in input space (e.g. 0.5 on 128×128 scans).  steps: iterations (≥ 1).
        alpha: step size; default ``2.5 · ε / steps``.
        random_start / generator: as in ``pgd_linf``.

    Returns: ``x_adv`` ``[B,C,H,W]`` in [0, 1] with ``‖x_adv − x‖₂ ≤ ε`` per sample, detached.

    Example::

        x_adv = pgd_l2(model, x, y, eps=0.5, steps=10, generator=torch.Generator().manual_seed(0))
    """
    return pgd(model, x, y, eps, norm="l2", steps=steps, alpha=alpha, random_start=random_start,
               generator=generator, output=output)


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """ℓ2 norm of each sample of ``t`` ``[B, …]``, shaped ``[B, 1, …, 1]`` for broadcasting."""
    return t.reshape(t.shape[0], -1).norm(dim=1).reshape(t.shape[0], *([1] * (t.dim() - 1)))


def _norm_name(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}: use one of {NORMS}")
    return norm


def project(xa: torch.Tensor, x0: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """``xa`` projected onto the ε-ball around ``x0`` (ℓ∞, or ℓ2 per sample: δ scaled back onto the
    sphere) intersected with [0, 1]."""
    if _norm_name(norm) == "linf":
        return torch.min(torch.max(xa, x0 - eps), x0 + eps).clamp(0.0, 1.0)
    delta = xa - x0
    return (x0 + delta * torch.clamp(eps / (_per_sample_norm(delta) + _TINY), max=1.0)).clamp(0.0, 1.0)


def ascent_step(g: torch.Tensor, alpha: float, norm: str) -> torch.Tensor:
    """The steepest-ascent step of length ``alpha`` in the norm: α·sign(g) (ℓ∞) or α·g/‖g‖₂ (ℓ2)."""
    if _norm_name(norm) == "linf":
        return alpha * g.sign()
    return alpha * g / (_per_sample_norm(g) + _TINY)


def ball_start(x0: torch.Tensor, eps: float, norm: str, generator: torch.Generator) -> torch.Tensor:
    """A start drawn from ``generator`` in the ε-ball around ``x0``, clipped to [0, 1]: U(−ε, ε) per pixel
    (ℓ∞), or a uniform direction at radius ε·u, u ~ U(0, 1) (ℓ2, as torchattacks)."""
    if _norm_name(norm) == "linf":
        u = torch.rand(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
        return (x0 + (2 * u - 1) * eps).clamp(0.0, 1.0)
    d = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
    r = torch.rand((x0.shape[0],) + (1,) * (x0.dim() - 1), generator=generator, device=generator.device,
                   dtype=x0.dtype).to(x0.device)
    return (x0 + d / (_per_sample_norm(d) + _TINY) * r * eps).clamp(0.0, 1.0)


def pgd(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "linf", steps: int = 10,
        alpha: float | None = None, random_start: bool = True, generator: torch.Generator | None = None,
        output: str = "probs") -> torch.Tensor:
    """PGD in the ``norm`` ball (``pgd_linf`` / ``pgd_l2``): ``x_{i+1} = project(x_i + ascent_step(∇L))``,
    step ``alpha`` (default 2.5·ε/steps), from ``ball_start`` when ``random_start`` (``generator`` required).
    Returns ``x_adv`` detached, inside the ball and [0, 1]."""
    _check(x, y, eps)
    _norm_name(norm)
    if steps < 1:
        raise ValueError(f"steps={steps}: must be >= 1")
    alpha = 2.5 * eps / steps if alpha is None else alpha
    x0 = x.detach()
    if random_start:
        if generator is None:
            raise ValueError("random_start=True needs an explicit generator (torch.Generator().manual_seed(s))")
        xa = ball_start(x0, eps, norm, generator)
    else:
        xa = x0.clone()
    for _ in range(steps):
        xa = project(xa + ascent_step(_grad(model, xa, y, output), alpha, norm), x0, eps, norm).detach()
    return xa


def band_limited(eta: torch.Tensor, factor: int) -> torch.Tensor:
    """δ = bilinear upsampling (× ``factor``) of the coarse perturbation η; ‖δ‖∞ ≤ ‖η‖∞ (convex weights)."""
    if factor == 1:
        return eta
    return F.interpolate(eta, scale_factor=float(factor), mode="bilinear", align_corners=False)


def evasion_step(eta: torch.Tensor, under: torch.Tensor, g_loss: torch.Tensor, g_score: torch.Tensor,
                 alpha: float, eps: float) -> torch.Tensor:
    """One sign step on η: lower the gate's score where it is still too high (keeping half the loss
    direction), raise the loss where the scan is already under the threshold; gradients per-scan normalised."""
    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / v.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)

    direction = torch.where(under[:, None, None, None], unit(g_loss), -unit(g_score) + 0.5 * unit(g_loss))
    return (eta + alpha * direction.sign()).clamp(-eps, eps)
