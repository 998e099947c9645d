"""FGSM / PGD: bounds, determinism, loss increase, and agreement with torchattacks (an independent code base);
the pipeline attacks: the differentiable pipeline equals the Defender, EOT, ℓ∞ / ℓ2 balls, losses raised."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from medfedpure.models.moe import MoEClassifier, MoEConfig
from medfedpure.train.attacks import attack_loss, fgsm, pgd_l2, pgd_linf


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


# the attacks on the whole defended pipeline (medfedpure.eval.pipeline / adaptive) -------------------------

@pytest.fixture(scope="module")
def pipe():
    import os

    from tiny_bundle import cached_tiny_bundle, tiny_attack_setup

    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    torch.set_num_threads(1)
    return tiny_attack_setup(cached_tiny_bundle(), 6, 5)


def test_margin_objective_by_hand():
    from medfedpure.eval.pipeline import attack_objective

    p = torch.tensor([[0.9, 0.1], [0.25, 0.75]])
    y = torch.tensor([0, 0])
    torch.testing.assert_close(attack_objective(p, y, "margin"),
                               torch.log(torch.tensor([0.1, 0.75])) - torch.log(torch.tensor([0.9, 0.25])))
    torch.testing.assert_close(attack_objective(p, y, "ce"), -torch.log(torch.tensor([0.9, 0.25])))
    with pytest.raises(ValueError, match="loss"):
        attack_objective(p, y, "dlr")


def test_differentiable_pipeline_equals_the_deployed_defender(pipe):
    """Same keys → the torch reference reproduces the Defender: gate score, flag, t*, purified image, probabilities,
    on clean and on adversarial scans."""
    from medfedpure.eval.adaptive import pipeline_pgd
    from medfedpure.eval.pipeline import keyed_forward

    d, ref, x, y = pipe
    xa, _ = pipeline_pgd(d, ref, x, y, 8 / 255, steps=2, eot=1, seed=0, progress=False)
    for xs in (x.numpy(), xa.numpy()):
        seeds = [11 + i for i in range(len(xs))]
        dep = d.run_array(xs, seeds=seeds, return_purified=True)
        got = keyed_forward(d, ref, xs, seeds)
        assert 0 < (got["t_star"] > 0).sum() < len(xs)  # both paths
        np.testing.assert_array_equal(got["t_star"], [r.t_star for r in dep])
        np.testing.assert_array_equal(got["flag"], [r.flagged for r in dep])
        np.testing.assert_allclose(got["score"], [r.score for r in dep], rtol=1e-6)
        np.testing.assert_allclose(got["purified"], np.stack([r.purified for r in dep]), atol=1e-4)
        np.testing.assert_allclose(got["probs"], [[r.probabilities[c] for c in d.bundle.classes] for r in dep],
                                   atol=1e-4)
    # another key, another purification of the flagged scans: the comparison above is not vacuous
    same = keyed_forward(d, ref, x.numpy(), [11 + i for i in range(len(x))])
    other = keyed_forward(d, ref, x.numpy(), [999 + i for i in range(len(x))])
    flagged = other["t_star"] > 0
    assert not np.allclose(other["purified"][flagged], same["purified"][flagged], atol=1e-3)


def test_eot_gradient_is_the_mean_of_per_draw_gradients(pipe):
    from medfedpure.eval.pipeline import attack_objective, eot_gradient, gate_t_star, pipeline_probs

    d, ref, x, y = pipe
    ts = torch.from_numpy(gate_t_star(d, x.numpy()))
    grad, loss = eot_gradient(ref, x, y, ts, eot=3, generator=torch.Generator().manual_seed(4), loss="margin")
    g = torch.Generator().manual_seed(4)
    per_draw, losses = [], []
    for _ in range(3):
        xv = x.clone().requires_grad_(True)
        lo = attack_objective(pipeline_probs(ref, xv, ts, generator=g), y, "margin")
        per_draw.append(torch.autograd.grad(lo.sum(), xv)[0])
        losses.append(lo.detach())
    torch.testing.assert_close(grad, torch.stack(per_draw).mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss, torch.stack(losses).mean(0), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(per_draw[0], per_draw[1])  # the draws differ: the mean is not one draw
    with pytest.raises(ValueError, match="eot"):
        eot_gradient(ref, x, y, ts, eot=0, generator=g)


@pytest.mark.parametrize("loss", ["ce", "margin"])
@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_pipeline_pgd_raises_its_loss_and_holds_its_ball(pipe, loss, norm, eps):
    from medfedpure.eval.adaptive import pipeline_pgd
    from medfedpure.eval.pipeline import attack_objective, gate_t_star, pipeline_probs

    d, ref, x, y = pipe
    xa, _ = pipeline_pgd(d, ref, x, y, eps, steps=4, eot=2, seed=0, loss=loss, norm=norm, progress=False)
    delta = (xa - x).flatten(1)
    bound = delta.abs().max(dim=1).values if norm == "linf" else delta.norm(dim=1)
    assert (bound <= eps + 1e-5).all() and float(xa.min()) >= 0 and float(xa.max()) <= 1

    def mean_loss(xs: torch.Tensor) -> float:  # the same 8 noise draws for both
        ts = torch.from_numpy(gate_t_star(d, xs.numpy()))
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return float(sum(attack_objective(pipeline_probs(ref, xs, ts, generator=g), y, loss).mean()
                             for _ in range(8)) / 8)

    assert mean_loss(xa) > mean_loss(x) + 1e-3


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_apgd_pipeline_holds_its_ball_and_raises_the_loss(pipe, norm, eps):
    pytest.importorskip("torchattacks")
    from medfedpure.eval.adaptive import PipelineModule, apgd_pipeline

    d, ref, x, y = pipe
    xa = apgd_pipeline(d, ref, x, y, eps, steps=4, eot=2, seed=0, norm=norm)
    delta = (xa - x).flatten(1)
    bound = delta.abs().max(dim=1).values if norm == "linf" else delta.norm(dim=1)
    assert (bound <= eps + 1e-4).all() and float(xa.min()) >= 0 and float(xa.max()) <= 1
    mod = PipelineModule(d, ref, seed=5)
    with torch.no_grad():
        before = float(sum(torch.nn.functional.nll_loss(mod(x), y) for _ in range(6)))
        after = float(sum(torch.nn.functional.nll_loss(mod(xa), y) for _ in range(6)))
    assert after > before


def test_projection_and_steps():
    from medfedpure.eval.pipeline import ascent_step, project

    x = torch.full((2, 1, 4, 4), 0.5)
    far = x + torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    p = project(far, x, 0.1, "linf")
    assert float((p - x).abs().max()) <= 0.1 + 1e-7
    p2 = project(far, x, 0.3, "l2")
    assert ((p2 - x).flatten(1).norm(dim=1) <= 0.3 + 1e-6).all() and p2.min() >= 0 and p2.max() <= 1
    g = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close((ascent_step(x, g, 0.2, "l2") - x).flatten(1).norm(dim=1), torch.full((2,), 0.2))
    with pytest.raises(ValueError, match="norm"):
        project(far, x, 0.1, "l1")
