"""DDPM schedule, forward noising, DDIM with an oracle, purification semantics."""

from __future__ import annotations

import math

import pytest
import torch
from medfedpure.models.diffusion import (
    DiffusionSchedule,
    ddim_sample,
    forward_noise,
    make_alphas_cumprod,
    make_purification_augment,
    purify,
    to_model_space,
)
from medfedpure.models.unet import UNet, UNetConfig

SCH = DiffusionSchedule()


def _images(n: int = 4, s: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, s, s, generator=torch.Generator().manual_seed(seed))


def test_schedule_values():
    ab = make_alphas_cumprod("cosine", 1000)
    assert ab.shape == (1001,) and ab[0] == 1.0
    assert bool((ab[1:] < ab[:-1]).all())
    # Nichol & Dhariwal eq. 17 at t = 100: cos²((0.1 + s)/(1 + s)·π/2) / cos²(s/(1 + s)·π/2)
    s = 0.008
    f = lambda t: math.cos((t / 1000 + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    assert abs(float(ab[100]) - f(100) / f(0)) < 1e-9
    lin = make_alphas_cumprod("linear", 1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert abs(float(lin[1000]) - float(torch.prod(1 - betas))) < 1e-12
    # fractional t interpolates linearly between integer steps
    mid = SCH.alpha_bar(torch.tensor([100.5]))
    assert abs(float(mid) - float(ab[100] + ab[101]) / 2) < 1e-6


def test_bad_schedule_raises():
    with pytest.raises(ValueError, match="schedule"):
        DiffusionSchedule("sigmoid")
    with pytest.raises(ValueError, match="num_timesteps"):
        DiffusionSchedule("cosine", 3)


def test_q_sample_statistics():
    g = torch.Generator().manual_seed(0)
    n = 20000
    x0 = torch.full((n, 1, 1, 1), 0.6)
    t = torch.full((n,), 150)
    xt = SCH.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    ab = float(SCH.alpha_bar(torch.tensor([150.0])))
    assert abs(float(xt.mean()) - math.sqrt(ab) * 0.6) < 0.01
    assert abs(float(xt.std()) - math.sqrt(1 - ab)) < 0.01
    assert torch.equal(SCH.q_sample(x0[:2], torch.zeros(2), torch.randn(2, 1, 1, 1, generator=g)), x0[:2])


def test_q_sample_shape_errors():
    x0 = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="one time per image"):
        SCH.q_sample(x0, torch.zeros(3), torch.zeros_like(x0))
    with pytest.raises(ValueError, match="noise has shape"):
        SCH.q_sample(x0, torch.zeros(2), torch.zeros(2, 1, 4, 5))


def test_ddim_with_oracle_recovers_x0_and_keeps_eps():
    y0 = to_model_space(_images())
    eps = torch.randn(y0.shape, generator=torch.Generator().manual_seed(1))
    t0 = torch.tensor([30.0, 120.0, 250.0, 999.0])
    x_t = SCH.q_sample(y0, t0, eps)
    oracle = lambda x, t: y0  # noqa: E731  (returns the true x0)
    out, traj = ddim_sample(oracle, x_t, t0, 10, schedule=SCH, return_trajectory=True)
    torch.testing.assert_close(out, y0, atol=1e-5, rtol=0)
    # DDIM (η = 0) with the true x0 moves along x_t' = √ᾱ' x0 + √(1−ᾱ') ε with the same ε (eq. 12)
    t_mid = t0 * 6 / 10
    torch.testing.assert_close(traj[4], SCH.q_sample(y0, t_mid, eps), atol=1e-5, rtol=0)
    assert len(traj) == 11


def test_ddim_needs_schedule_or_model_schedule():
    with pytest.raises(ValueError, match="schedule"):
        ddim_sample(lambda x, t: x, torch.zeros(1, 1, 4, 4), torch.ones(1), 2)
    with pytest.raises(ValueError, match="steps"):
        ddim_sample(lambda x, t: x, torch.zeros(1, 1, 4, 4), torch.ones(1), 0, schedule=SCH)


@pytest.fixture(scope="module")
def model() -> UNet:
    torch.manual_seed(0)  # weight init only
    return UNet(UNetConfig.preset("tiny", image_size=16, channel_mults=(1, 2))).eval()


def test_purify_t0_is_identity_and_shapes(model):
    x = _images()
    with torch.no_grad():
        out = purify(model, x, torch.zeros(4, dtype=torch.int64), 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, x)
    with torch.no_grad():
        out = purify(model, x, torch.full((4,), 100), 2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert not torch.equal(out, x)


def test_purify_deterministic_under_seed(model):
    x = _images()
    t = torch.tensor([10, 50, 100, 200])
    with torch.no_grad():
        a = purify(model, x, t, 2, generator=torch.Generator().manual_seed(7))
        b = purify(model, x, t, 2, generator=torch.Generator().manual_seed(7))
        c = purify(model, x, t, 2, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_purify_per_sample_t_star(model):
    # A batch with mixed t* equals each scan purified alone with the same noise draw.
    x = _images()
    t = torch.tensor([0, 40, 0, 160])
    with torch.no_grad():
        batch = purify(model, x, t, 2, generator=torch.Generator().manual_seed(3))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
        for i in range(4):
            x_t = SCH.q_sample(to_model_space(x[i:i + 1]), t[i:i + 1].float(), noise[i:i + 1])
            one = ((ddim_sample(model, x_t, t[i:i + 1].float(), 2) + 1) / 2).clamp(0, 1)
            if t[i] == 0:
                one = x[i:i + 1]
            torch.testing.assert_close(batch[i:i + 1], one, atol=1e-6, rtol=0)
    assert torch.equal(batch[0], x[0]) and torch.equal(batch[2], x[2])


def test_purify_bad_inputs(model):
    x = _images()
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="one t\\* per scan"):
        purify(model, x, torch.zeros(3), 2, generator=g)
    with pytest.raises(ValueError, match="t_star must lie"):
        purify(model, x, torch.full((4,), 1001), 2, generator=g)
    with pytest.raises(ValueError, match="expected \\[B, C, S, S\\]"):
        purify(model, x[0], torch.zeros(1), 2, generator=g)


def test_purify_noise_input_equals_generator_draw(model):
    """k-diffusion style: the noise may be given; then it is exactly the generator's draw."""
    x = _images()
    t = torch.tensor([0, 30, 90, 200])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        drawn = purify(model, x, t, 2, generator=torch.Generator().manual_seed(4))
        given = purify(model, x, t, 2, noise=noise)
        x_t = forward_noise(x, t, noise, SCH)
    assert torch.equal(drawn, given)
    torch.testing.assert_close(x_t, SCH.q_sample(to_model_space(x), t.float(), noise), atol=0, rtol=0)
    with pytest.raises(ValueError, match="both noise= and generator="):
        purify(model, x, t, 2, noise=noise, generator=torch.Generator())
    with pytest.raises(ValueError, match="noise has shape"):
        purify(model, x, t, 2, noise=noise[:2])
    assert purify(model, x[:0], t[:0], 2, noise=noise[:0]).shape == (0, 1, 16, 16)


def test_purify_is_differentiable(model):
    x = _images(2).requires_grad_(True)
    out = purify(model, x, torch.tensor([50, 100]), 2, generator=torch.Generator().manual_seed(0))
    out.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_purification_augment(model):
    x = _images(8)
    x_copy = x.clone()
    aug = make_purification_augment(model, SCH, (20, 120), 1, p=0.5)
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    assert torch.equal(x, x_copy)  # input untouched
    assert torch.equal(a, b) and a.shape == x.shape
    same = [(torch.equal(a[i], x[i])) for i in range(8)]
    assert 0 < sum(same) < 8  # some scans purified, some kept (p = 0.5, this seed)
    assert model.training is False
    with pytest.raises(ValueError, match="t_range"):
        make_purification_augment(model, SCH, (50, 20), 1)
    with pytest.raises(ValueError, match="probability"):
        make_purification_augment(model, SCH, (10, 20), 1, p=2.0)
