"""DDPM noise schedule, forward noising, the DDIM sampler and diffusion purification.

Conventions (one place, so every caller agrees):

- Scans live in [0, 1] (``medfedpure.preprocess``). The diffusion works on ``y = 2·x − 1`` in
  [−1, 1], the range the DDPM/DDIM papers assume; :func:`purify` converts both ways.
- Time is the DDPM step index ``t`` in ``[0, T]`` with ``T = num_timesteps`` (1000); ``t = 0`` is the
  clean image (``ᾱ_0 = 1``). Times may be fractional: ``ᾱ`` is interpolated linearly between the
  integer steps, so a K-step sampler can start from any ``t*``.
- Networks are x0-predictors: ``model(x_t [B,1,S,S], t [B] float32) -> x0_hat [B,1,S,S]`` in [−1, 1]
  space (``medfedpure.models.unet.UNet`` wraps its network in an EDM preconditioner to get there).

Variable names and the papers' symbols (Ho et al. 2020 "DDPM"; Song et al. 2021 "DDIM";
Karras et al. 2022 "EDM"):

=====================  ==========================  =========================================
name here              symbol                      meaning
=====================  ==========================  =========================================
``betas[t]``           β_t                         per-step noise variance, t = 1..T
``alphas_cumprod[t]``  ᾱ_t (DDIM: α_t)             ∏_{s≤t} (1 − β_s); ᾱ_0 = 1
``sqrt_ab``            √ᾱ_t                        signal scale of x_t
``sqrt_1m_ab``         √(1 − ᾱ_t)                  noise scale of x_t
``sigma``              σ_t = √((1 − ᾱ_t)/ᾱ_t)      EDM noise level of x̂_t = x_t / √ᾱ_t
``x0_hat``             x̂_0 = f_θ(x_t, t)           the network's estimate of the clean image
``eps_hat``            ε_θ(x_t, t)                 noise implied by x̂_0 (DDIM eq. 9)
=====================  ==========================  =========================================
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "PURIFY_DEFAULTS",
    "PurifySchedule",
    "DiffusionSchedule",
    "make_alphas_cumprod",
    "interp_alphas_cumprod",
    "ddim_sample",
    "forward_noise",
    "purify",
    "make_purification_augment",
    "to_model_space",
    "to_image_space",
]

Denoiser = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class PurifySchedule:
    """The purification schedule: the t* range and the student's sampling steps.

    A flagged scan is noised to ``t* ∈ [t_min, t_max]`` (DDPM step index of T = ``num_timesteps``)
    and denoised in ``steps`` DDIM steps (K). The same three names are used from training (recorded
    in the student checkpoint) through calibration to the bundle manifest's gate section.

    Attributes:
        t_min: t* of a scan scoring at the threshold τ (0 ≤ t_min ≤ t_max).
        t_max: t* reached at ``tau_high`` and above (t_max ≤ T).
        steps: K, the distilled student's sampling steps (1, 2 or 4).
        num_timesteps: T of the diffusion schedule the range refers to (1000).
    """

    t_min: int = 60
    t_max: int = 200
    steps: int = 1
    num_timesteps: int = 1000

    def __post_init__(self) -> None:
        for name in ("t_min", "t_max", "steps", "num_timesteps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name}={v!r}: must be an int")
        if not 0 <= self.t_min <= self.t_max <= self.num_timesteps:
            raise ValueError(f"t_min={self.t_min}, t_max={self.t_max}: need 0 <= t_min <= t_max <= "
                             f"T = {self.num_timesteps}")
        if self.steps not in PURIFY_STEPS:
            raise ValueError(f"steps={self.steps}: the student samples in K = 1, 2 or 4 steps")

    def to_dict(self) -> dict[str, int]:
        """``{"t_min", "t_max", "steps"}``: the keys of the calibration and the manifest's gate."""
        return {"t_min": self.t_min, "t_max": self.t_max, "steps": self.steps}


PURIFY_STEPS = (1, 2, 4)
# The one source of the purification schedule's defaults (calibration, federated and bundle build).
PURIFY_DEFAULTS = PurifySchedule()


def make_alphas_cumprod(schedule: str = "cosine", num_timesteps: int = 1000) -> Tensor:
    """ᾱ_t for t = 0..T as a float64 tensor of length T + 1 (ᾱ_0 = 1).

    ``linear``: β_t from 1e-4 to 0.02 (Ho et al. 2020, §4). ``cosine``: ᾱ(t) = f(t)/f(0) with
    f(t) = cos²((t/T + s)/(1 + s) · π/2), s = 0.008, β clipped at 0.999 (Nichol & Dhariwal 2021,
    eq. 17). The cosine schedule adds noise slowly at small t, which is the only range the
    purifier uses, so it gets finer control of t* there.
    """
    return _alphas_cumprod_cached(schedule, num_timesteps).clone()


@functools.lru_cache(maxsize=8)
def _alphas_cumprod_cached(schedule: str, num_timesteps: int) -> Tensor:
    if num_timesteps < 10:
        raise ValueError(f"num_timesteps={num_timesteps}: use at least 10 (1000 is standard)")
    steps = torch.arange(1, num_timesteps + 1, dtype=torch.float64)
    if schedule == "linear":
        scale = 1000.0 / num_timesteps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    elif schedule == "cosine":
        s = 0.008

        def f(t: Tensor) -> Tensor:
            return torch.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2

        ab = f(steps) / f(torch.zeros(1, dtype=torch.float64))
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        betas = (1 - ab / ab_prev).clamp(max=0.999)
    else:
        raise ValueError(f"schedule={schedule!r}: expected 'linear' or 'cosine'")
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


def interp_alphas_cumprod(table: Tensor, t: Tensor) -> Tensor:
    """ᾱ at fractional times ``t`` [B] (clamped to [0, T]) by linear interpolation in ``table``.

    Export-clean: floor, gather and lerp only (no data-dependent branches, no ``.item()``).
    :func:`medfedpure.runtime.sampler.interp_alpha_bar` is its numpy mirror (same float64 maths).
    """
    num_timesteps = table.shape[0] - 1
    table = table.to(t.device)  # the schedule's table lives on the CPU; t may be a CUDA tensor
    t = t.to(table.dtype).clamp(0, num_timesteps)
    lo = torch.floor(t).clamp(max=num_timesteps - 1)
    frac = t - lo
    lo_i = lo.to(torch.int64)
    return table[lo_i] * (1 - frac) + table[lo_i + 1] * frac


@dataclass(frozen=True)
class DiffusionSchedule:
    """The DDPM forward process: ``x_t = √ᾱ_t · x_0 + √(1−ᾱ_t) · ε`` (DDPM eq. 4).

    Attributes:
        schedule: ``"cosine"`` (default) or ``"linear"`` β schedule.
        num_timesteps: T, the number of forward steps (1000).
    """

    schedule: str = "cosine"
    num_timesteps: int = 1000

    def __post_init__(self) -> None:
        # Validates both fields (raises ValueError naming the bad one).
        make_alphas_cumprod(self.schedule, self.num_timesteps)

    @property
    def alphas_cumprod(self) -> Tensor:
        """ᾱ_t, t = 0..T, float64 [T + 1]."""
        return make_alphas_cumprod(self.schedule, self.num_timesteps)

    def alpha_bar(self, t: Tensor) -> Tensor:
        """ᾱ at (fractional) times ``t`` [B], float32."""
        return interp_alphas_cumprod(self.alphas_cumprod, t).float()

    def sigma(self, t: Tensor) -> Tensor:
        """EDM noise level σ_t = √((1 − ᾱ_t)/ᾱ_t) of x̂_t = x_t/√ᾱ_t, float32 [B]."""
        ab = self.alpha_bar(t)
        return ((1 - ab) / ab).sqrt()

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Forward noising q(x_t | x_0) (DDPM eq. 4): ``√ᾱ_t · x0 + √(1 − ᾱ_t) · noise``.

        Args:
            x0: [B, C, S, S] clean images in diffusion space ([−1, 1]).
            t: [B] times in [0, T] (int or float).
            noise: [B, C, S, S] standard normal noise (the caller draws it with its generator).
        """
        if t.shape != (x0.shape[0],):
            raise ValueError(f"t has shape {tuple(t.shape)}: expected one time per image, ({x0.shape[0]},)")
        if noise.shape != x0.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}: expected x0's shape {tuple(x0.shape)}")
        ab = _bcast(self.alpha_bar(t).to(x0), x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def _schedule_of(model: object, schedule: DiffusionSchedule | None) -> DiffusionSchedule:
    if schedule is not None:
        return schedule
    found = getattr(model, "schedule", None)
    if not isinstance(found, DiffusionSchedule):
        raise ValueError("model has no .schedule: pass schedule=DiffusionSchedule(...) explicitly")
    return found


def to_model_space(x: Tensor) -> Tensor:
    """[0, 1] scan → [−1, 1] diffusion space."""
    return x * 2 - 1


def to_image_space(y: Tensor) -> Tensor:
    """[−1, 1] diffusion space → [0, 1] scan (clamped)."""
    return ((y + 1) / 2).clamp(0, 1)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def ddim_sample(
    model: Denoiser,
    x_t: Tensor,
    t_start: Tensor,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    schedule: DiffusionSchedule | None = None,
    return_trajectory: bool = False,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Deterministic DDIM (η = 0) from ``t_start`` down to 0 in ``steps`` uniform steps.

    Song et al. 2021, eq. 12 with σ_t = 0:
        x_{t'} = √ᾱ_{t'} · x̂_0 + √(1 − ᾱ_{t'}) · ε̂,   ε̂ = (x_t − √ᾱ_t x̂_0) / √(1 − ᾱ_t).
    Written in EDM's scaled variable x̂ = x/√ᾱ this is the Euler step of the probability-flow ODE
    (Karras et al. 2022, §3): x̂_{t'} = x̂_0 + (σ_{t'}/σ_t)(x̂_t − x̂_0), which stays finite when
    σ_t = 0 (then x̂_{t'} = x̂_0 = x̂_t for any preconditioned model), so per-sample ``t_start``
    with zeros needs no branch. Step times are t_i = t_start · (steps − i)/steps, i = 0..steps,
    per sample (fractional times allowed). The distilled student uses this same grid with
    steps = K.

    Differentiable (no ``no_grad`` inside): full-pipeline attacks back-propagate through it.

    Args:
        model: x0-predictor ``(x_t [B,C,S,S], t [B] float32) -> x0_hat``.
        x_t: [B, C, S, S] noisy images at ``t_start`` (VP-scaled, diffusion space).
        t_start: [B] start times in [0, T].
        steps: number of network evaluations (≥ 1).
        schedule: the schedule the model was trained with (default: ``model.schedule``).
        generator: unused (η = 0 is deterministic); accepted so every sampler has one signature.
        return_trajectory: also return the states x_{t_i}, i = 0..steps (length steps + 1).

    Returns:
        x_0 estimate [B, C, S, S] (diffusion space), and the trajectory if asked.
    """
    del generator  # DDIM with η = 0 draws nothing.
    if steps < 1:
        raise ValueError(f"steps={steps}: need at least one sampling step")
    if t_start.shape != (x_t.shape[0],):
        raise ValueError(f"t_start has shape {tuple(t_start.shape)}: expected ({x_t.shape[0]},)")
    schedule = _schedule_of(model, schedule)
    t_start = t_start.to(torch.float32)
    x = x_t
    traj = [x]
    for i in range(steps):
        t_cur = t_start * (steps - i) / steps
        t_next = t_start * (steps - i - 1) / steps
        ab_cur = _bcast(schedule.alpha_bar(t_cur).to(x), x)
        ab_next = _bcast(schedule.alpha_bar(t_next).to(x), x)
        x0_hat = model(x, t_cur)
        sig_cur = ((1 - ab_cur) / ab_cur).sqrt()
        sig_next = ((1 - ab_next) / ab_next).sqrt()
        ratio = sig_next / sig_cur.clamp_min(1e-12)  # σ_next ≤ σ_cur, so ratio ∈ [0, 1]
        x_hat = x / ab_cur.sqrt()
        x = ab_next.sqrt() * (x0_hat + ratio * (x_hat - x0_hat))
        traj.append(x)
    return (x, traj) if return_trajectory else x


def forward_noise(x: Tensor, t: Tensor, noise: Tensor, schedule: DiffusionSchedule) -> Tensor:
    """Noise scans to their times: ``x_t = √ᾱ_t · (2x − 1) + √(1 − ᾱ_t) · noise`` (DDPM eq. 4).

    The forward half of purification, in one place for every caller (the purifier, export
    verification, attacks).

    Args:
        x: [B, C, S, S] scans in [0, 1].
        t: [B] times in [0, T] (int or float; fractional times interpolate ᾱ).
        noise: [B, C, S, S] standard normal noise.
        schedule: the diffusion schedule.

    Returns:
        [B, C, S, S] x_t in diffusion space ([−1, 1] scaled by √ᾱ_t, plus noise).
    """
    return schedule.q_sample(to_model_space(x), t.to(torch.float32), noise.to(x))


def purify(
    model: Denoiser,
    x: Tensor,
    t_star: Tensor,
    steps: int,
    *,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    schedule: DiffusionSchedule | None = None,
) -> Tensor:
    """Diffusion purification (Nie et al. 2022 "DiffPure", eq. 3–4, with a DDIM reverse process).

    Each scan is noised to its own ``t_star`` (:func:`forward_noise`), then denoised by ``steps``
    DDIM steps of ``model`` (the distilled student with its K, or the teacher). Scans with
    ``t_star == 0`` are returned unchanged (bit-exact). Differentiable in ``x``.

    The noise is an input, as in k-diffusion's samplers: the runtime passes the keyed noise it
    drew for each scan, so every backend purifies with identical noise. With ``noise=None`` it is
    drawn here from ``generator`` (always, even when every t* is 0, so the generator advances the
    same way whatever the gate decided). :func:`medfedpure.runtime.sampler.purify_numpy` is the
    numpy mirror of this function for the torch-free runtime; a test pins their agreement.

    Args:
        model: x0-predictor ``(x_t [B,C,S,S], t [B] float32) -> x0_hat`` (``UNet``, eval mode).
        x: [B, 1, S, S] scans in [0, 1].
        t_star: [B] integer (or float) start times in [0, T].
        steps: sampling steps K (≥ 1).
        noise: [B, 1, S, S] standard normal noise; None: drawn from ``generator``.
        generator: RNG for the noise when ``noise`` is None (same seed → identical output);
            giving both is an error.
        schedule: the model's schedule (default: ``model.schedule``).

    Returns:
        [B, 1, S, S] purified scans in [0, 1].
    """
    schedule = _schedule_of(model, schedule)
    if x.dim() != 4:
        raise ValueError(f"x has shape {tuple(x.shape)}: expected [B, C, S, S]")
    if t_star.shape != (x.shape[0],):
        raise ValueError(f"t_star has shape {tuple(t_star.shape)}: expected one t* per scan, ({x.shape[0]},)")
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    elif generator is not None:
        raise ValueError("purify got both noise= and generator=: pass the noise, or a generator to draw it")
    elif tuple(noise.shape) != tuple(x.shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}: expected x's shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        return x.clone()
    lo, hi = torch.stack([t_star.min(), t_star.max()]).tolist()  # one host sync for both checks
    if lo < 0 or hi > schedule.num_timesteps:
        raise ValueError(f"t_star must lie in [0, {schedule.num_timesteps}]; got values in [{lo}, {hi}]")
    if hi == 0:
        return x.clone()  # nothing to purify
    t = t_star.to(torch.float32)
    y0 = ddim_sample(model, forward_noise(x, t, noise, schedule), t, steps, schedule=schedule)
    keep = _bcast(t_star == 0, x)
    return torch.where(keep, x, to_image_space(y0))


def make_purification_augment(
    model: nn.Module,
    schedule: DiffusionSchedule,
    t_range: tuple[int, int],
    steps: int,
    *,
    p: float = 0.5,
) -> Callable[[Tensor, torch.Generator], Tensor]:
    """Purification-aware augmentation for classifier training: ``aug(x, generator) -> x``.

    With probability ``p`` per scan, replaces the scan by ``purify(model, x, t*, steps)`` with
    t* drawn uniformly from ``t_range`` (inclusive); all draws come from ``generator``. Runs
    without gradients and never modifies ``x``. ``x``: [B, 1, S, S] in [0, 1].
    """
    lo, hi = t_range
    if not 0 <= lo <= hi <= schedule.num_timesteps:
        raise ValueError(f"t_range={t_range}: need 0 <= lo <= hi <= {schedule.num_timesteps}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p={p}: expected a probability in [0, 1]")
    if steps < 1:
        raise ValueError(f"steps={steps}: need at least one sampling step")

    def augment(x: Tensor, generator: torch.Generator) -> Tensor:
        b = x.shape[0]
        t_star = torch.randint(lo, hi + 1, (b,), generator=generator, device=x.device)
        use = torch.rand(b, generator=generator, device=x.device) < p
        t_star = torch.where(use, t_star, torch.zeros_like(t_star))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = purify(model, x, t_star, steps, schedule=schedule, generator=generator)
        model.train(was_training)
        return out

    return augment
