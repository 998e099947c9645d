"""Attacks and the differentiable defended pipeline used to attack it (docs/evaluation.md)."""

from __future__ import annotations

from medfedpure.eval.attacks.pgd import attack_loss, fgsm, pgd_l2, pgd_linf

__all__ = ["fgsm", "pgd_linf", "pgd_l2", "attack_loss"]
