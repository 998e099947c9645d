"""FGSM / PGD: bounds, determinism, loss increase, and agreement with torchattacks (an independent code base)."""

from __future__ import annotations

import pytest
import torch
from medfedpure.eval.attacks import attack_loss, fgsm, pgd_l2, pgd_linf
from medfedpure.models.moe import MoEClassifier, MoEConfig


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)  # parameter init only
    m = MoEClassifier(MoEConfig.preset("tiny")).eval()
    x = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    return m, x, y


class _LogitsOf(torch.nn.Module):
    """torchattacks expects logits: log-probabilities are logits of the same softmax."""

    def __init__(self, m: MoEClassifier) -> None:
        super().__init__()
        self.m = m
        # torchattacks restores the wrapper's own train/eval mode around the attack, and
        # .train() would propagate into the classifier's BatchNorm: build it in eval mode.
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m.log_probs(x)


def test_fgsm_matches_torchattacks(setup):
    ta = pytest.importorskip("torchattacks")
    m, x, y = setup
    ours = fgsm(m, x, y, 8 / 255)
    theirs = ta.FGSM(_LogitsOf(m), eps=8 / 255)(x, y)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_pgd_linf_matches_torchattacks_without_random_start(setup):
    ta = pytest.importorskip("torchattacks")
    m, x, y = setup
    ours = pgd_linf(m, x, y, 8 / 255, steps=5, alpha=2 / 255, random_start=False)
    theirs = ta.PGD(_LogitsOf(m), eps=8 / 255, alpha=2 / 255, steps=5, random_start=False)(x, y)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_pgd_l2_matches_torchattacks_without_random_start(setup):
    ta = pytest.importorskip("torchattacks")
    m, x, y = setup
    ours = pgd_l2(m, x, y, 0.5, steps=5, alpha=0.1, random_start=False)
    theirs = ta.PGDL2(_LogitsOf(m), eps=0.5, alpha=0.1, steps=5, random_start=False)(x, y)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_linf_bounds_and_determinism(setup):
    m, x, y = setup
    x_before = x.clone()
    a = pgd_linf(m, x, y, 4 / 255, steps=3, generator=torch.Generator().manual_seed(7))
    b = pgd_linf(m, x, y, 4 / 255, steps=3, generator=torch.Generator().manual_seed(7))
    c = pgd_linf(m, x, y, 4 / 255, steps=3, generator=torch.Generator().manual_seed(8))
    assert torch.equal(x, x_before)  # caller's data untouched
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a - x).abs().max() <= 4 / 255 + 1e-6
    assert a.min() >= 0 and a.max() <= 1


def test_l2_bounds(setup):
    m, x, y = setup
    a = pgd_l2(m, x, y, 0.3, steps=3, generator=torch.Generator().manual_seed(7))
    assert ((a - x).flatten(1).norm(dim=1) <= 0.3 + 1e-5).all()
    assert a.min() >= 0 and a.max() <= 1


def test_attacks_increase_the_loss(setup):
    m, x, y = setup
    clean = float(attack_loss(m, x, y))
    for adv in (fgsm(m, x, y, 8 / 255),
                pgd_linf(m, x, y, 8 / 255, steps=5, generator=torch.Generator().manual_seed(0)),
                pgd_l2(m, x, y, 1.0, steps=5, generator=torch.Generator().manual_seed(0))):
        assert float(attack_loss(m, adv, y)) > clean
    strong = pgd_linf(m, x, y, 8 / 255, steps=10, generator=torch.Generator().manual_seed(0))
    assert float(attack_loss(m, strong, y)) >= float(attack_loss(m, fgsm(m, x, y, 8 / 255), y)) - 1e-4


def test_probability_models_without_log_probs(setup):
    m, x, y = setup
    probs_only = lambda t: m(t)  # noqa: E731 — a bare callable returning probabilities
    torch.testing.assert_close(fgsm(probs_only, x, y, 2 / 255), fgsm(m, x, y, 2 / 255), atol=1e-6, rtol=0)


def test_errors(setup):
    m, x, y = setup
    with pytest.raises(ValueError, match="generator"):
        pgd_linf(m, x, y, 8 / 255)
    with pytest.raises(ValueError, match="outside"):
        fgsm(m, x * 2, y, 8 / 255)
    with pytest.raises(ValueError, match="y has shape"):
        fgsm(m, x, y[:2], 8 / 255)
    with pytest.raises(ValueError, match="steps"):
        pgd_l2(m, x, y, 0.5, steps=0, generator=torch.Generator())
