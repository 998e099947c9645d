"""Distillation of the DDIM teacher into a few-step student (K ∈ {1, 2, 4}).

Method: **trajectory-endpoint distillation** — knowledge distillation of the probability-flow ODE
(Luhman & Luhman 2021) with the consistency-model target (Song et al. 2023, "consistency
distillation", eq. 7, whose fixed point is the map from any point of an ODE trajectory to its
origin), computed exactly by the teacher instead of bootstrapped:

1. For N training crops y0, draw t_s ~ U[t_min, t_max] and ε, set x_{t_s} = √ᾱ y0 + √(1−ᾱ) ε.
2. Run the teacher's deterministic DDIM (``teacher_steps`` ≥ 20 steps, DDIM eq. 12, η = 0) from
   t_s to 0 and keep the states at the student's step times τ = t_s · j/K (j = K..1) for every
   K in ``student_steps``, and the endpoint ŷ0 = DDIM_teacher(x_{t_s}).
3. Train the student (initialised from the teacher) so that D_student(x_τ, τ) ≈ ŷ0 at every kept
   state, with the EDM weight λ(σ_τ) = 1/c_out(σ_τ)².

Sampling the student with K DDIM steps on the grid t_s·j/K then re-estimates the same endpoint at
each step, so one student serves K = 1, 2 and 4 (K = 1 is pure one-step distillation).

Why this and not progressive or consistency distillation: the purifier only starts from
t* ≤ t_max ≈ 200 of 1000, so a teacher trajectory is short and the full 20-step teacher solve is
affordable per training example; caching it once makes the targets exact (no bootstrapping error
from a half-trained target network as in consistency training, and no 5 rounds of halving as in
progressive distillation, whose errors compound), and the whole job fits the CPU budget: the
teacher runs N × teacher_steps forward passes once, the student then trains on cached tensors.
What it gives up: the student is fitted only on teacher-trajectory states, not on its own
multi-step states (its K = 2, 4 chains drift slightly off the teacher's trajectory) — we measure
student-vs-teacher PSNR to check that this is small.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfedpure.models.diffusion import DiffusionSchedule, ddim_sample, to_model_space
from medfedpure.train.device import channels_last
from medfedpure.train.loop import cosine_lr, epoch_generator, fit
from medfedpure.train.purifier import as_images, check_crop_fits, psnr, random_crops
from medfedpure.train.validate import freeze_tuples, require_at_least, require_non_negative, require_positive

__all__ = ["DistillConfig", "distill_student", "make_trajectory_cache", "evaluate_student"]


@dataclass(frozen=True)
class DistillConfig:
    """Options of one distillation job.

    Attributes:
        epochs / steps_per_epoch / lr / batch_size / seed / warmup_steps / patience: as usual.
        teacher_steps: DDIM steps of the teacher solve (≥ 20 for the real job; a multiple of
            every K in ``student_steps`` so the student's step times lie on the teacher's grid).
        student_steps: the K the student is distilled for (its states enter the training set).
        t_min, t_max: range of purification start times t_s (of T).
        num_trajectories: cached teacher trajectories (each gives one state per student step time).
        crop_size: crop side for the cached trajectories (0: whole scans).
        flip: random left-right flips of the crops.
        val_scans: full-size validation scans.  val_times: their start times t_s.
        val_steps: K of the monitored metric (PSNR student-K vs teacher, on [0, 1] scans).
    """

    epochs: int = 8
    steps_per_epoch: int = 50
    lr: float = 5e-4
    batch_size: int = 16
    seed: int = 0
    warmup_steps: int = 20
    patience: int = 4
    teacher_steps: int = 20
    student_steps: tuple[int, ...] = (1, 2, 4)
    t_min: float = 10.0
    t_max: float = 250.0
    num_trajectories: int = 640
    crop_size: int = 64
    flip: bool = True
    val_scans: int = 12
    val_times: tuple[float, ...] = (60.0, 150.0)
    val_steps: int = 2

    def __post_init__(self) -> None:
        freeze_tuples(self, ("student_steps", "val_times"))
        require_at_least(self, ("epochs", "steps_per_epoch", "batch_size", "patience", "num_trajectories",
                                "val_scans"))
        require_positive(self, ("lr",))
        require_non_negative(self, ("warmup_steps",))
        if not self.student_steps or any(k not in (1, 2, 4) for k in self.student_steps):
            raise ValueError(f"student_steps={self.student_steps}: choose from 1, 2, 4")
        if self.val_steps not in (1, 2, 4):
            raise ValueError(f"val_steps={self.val_steps}: choose 1, 2 or 4")
        if self.teacher_steps < 2 or any(self.teacher_steps % k for k in self.student_steps):
            raise ValueError(
                f"teacher_steps={self.teacher_steps}: must be >= 2 and a multiple of every K in "
                f"{self.student_steps} (e.g. 20 or 24)"
            )
        if not 0 < self.t_min <= self.t_max:
            raise ValueError(f"t range [{self.t_min}, {self.t_max}]: need 0 < t_min <= t_max")
        if self.crop_size < 0 or (self.crop_size and self.crop_size % 8):
            raise ValueError(f"crop_size={self.crop_size}: use 0 (whole scans) or a multiple of 8")
        if not self.val_times or any(t <= 0 for t in self.val_times):
            raise ValueError(f"val_times={self.val_times}: need positive times")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DistillConfig:
        """``tiny`` (tests: seconds on 32 px) or ``small`` (default bundle, ~10 min on 1 core)."""
        presets: dict[str, dict[str, Any]] = {
            "tiny": dict(epochs=2, steps_per_epoch=5, batch_size=8, warmup_steps=2, teacher_steps=8,
                         num_trajectories=16, crop_size=0, val_scans=4, val_times=(40.0,)),
            "small": dict(),
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}: use one of {sorted(presets)}")
        return cls(**{**presets[name], **{k: v for k, v in overrides.items() if v is not None}})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fractions(self) -> list[float]:
        """Student step times as fractions j/K of t_s, over every K in ``student_steps`` (sorted, unique)."""
        return sorted({j / k for k in self.student_steps for j in range(1, k + 1)}, reverse=True)


@torch.no_grad()
def make_trajectory_cache(teacher: torch.nn.Module, schedule: DiffusionSchedule, y0: torch.Tensor,
                          t_s: torch.Tensor, noise: torch.Tensor, teacher_steps: int,
                          fractions: list[float], *, batch: int = 32,
                          progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher DDIM solves from x_{t_s}; returns the states at ``fractions`` of t_s and the endpoints.

    Args:
        y0 [N,1,s,s] in [−1, 1]; t_s [N]; noise like y0; fractions j/K ∈ (0, 1] on the teacher grid.

    Returns:
        states [N, P, 1, s, s], times [N, P] (= t_s · fraction), endpoints [N, 1, s, s].
    """
    idx = [round((1 - f) * teacher_steps) for f in fractions]  # trajectory index of t_s·f
    if any(abs((1 - f) * teacher_steps - i) > 1e-6 for f, i in zip(fractions, idx, strict=True)):
        raise ValueError(f"fractions {fractions} are not on a {teacher_steps}-step grid")
    states, ends = [], []
    it = range(0, len(y0), batch)
    if progress:
        from medfedpure.progress import progress as progress_bar

        it = progress_bar(it, desc="teacher trajectories", unit="batch")
    for i in it:
        x_t = schedule.q_sample(y0[i:i + batch], t_s[i:i + batch], noise[i:i + batch])
        end, traj = ddim_sample(teacher, x_t, t_s[i:i + batch], teacher_steps, schedule=schedule,
                                return_trajectory=True)
        states.append(torch.stack([traj[j] for j in idx], dim=1))
        ends.append(end)
    times = t_s[:, None] * torch.tensor(fractions, dtype=torch.float32)[None]
    return torch.cat(states), times, torch.cat(ends)


@torch.no_grad()
def evaluate_student(student: torch.nn.Module, schedule: DiffusionSchedule, x_t: torch.Tensor,
                     t_s: torch.Tensor, teacher_end: torch.Tensor, steps: int) -> float:
    """Mean PSNR (dB, on [0, 1] images) of the student's K-step DDIM result vs the teacher's."""
    out = []
    for i in range(0, len(x_t), 16):
        s = ddim_sample(student, x_t[i:i + 16], t_s[i:i + 16], steps, schedule=schedule)
        out.append(psnr((s.clamp(-1, 1) + 1) / 2, (teacher_end[i:i + 16].clamp(-1, 1) + 1) / 2))
    return float(torch.cat(out).mean())


def distill_student(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    schedule: DiffusionSchedule,
    x_train: Any,
    x_val: Any,
    cfg: DistillConfig,
    *,
    progress: bool = True,
    init_from_teacher: bool = True,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    name: str = "student",
) -> dict[str, Any]:
    """Distil ``teacher`` into ``student`` (same architecture; see the module docstring).

    Args:
        teacher, student: ``UNet`` x0-predictors with the same schedule; the teacher is frozen.
        x_train, x_val: scans [N, 1, S, S] float32 in [0, 1] (not modified).
        cfg: ``DistillConfig``.
        init_from_teacher: start the student from the teacher's weights (needs equal configs).

    Returns:
        ``fit``'s dict; history rows have ``train_loss``, ``val_psnr_k{K}`` for K ∈ {1, val_steps}
        (student K-step vs teacher ``teacher_steps``-step, dB) and ``val_psnr`` (the monitored K);
        plus ``"init_val"`` (the same metrics before training: the teacher itself run with K steps),
        ``"cache_s"`` (teacher solve time) and ``"val"`` (final metrics).
    """
    xt = as_images(x_train, "x_train")
    xv = as_images(x_val, "x_val")[: cfg.val_scans]
    for m in (teacher, student):
        check_crop_fits(m, cfg.crop_size, xt.shape[-1])
    if init_from_teacher:
        if getattr(teacher, "cfg", None) != getattr(student, "cfg", None):
            raise ValueError("init_from_teacher=True needs teacher and student with the same UNetConfig")
        student.load_state_dict(teacher.state_dict())
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    T = schedule.num_timesteps
    if cfg.t_max > T:
        raise ValueError(f"t_max={cfg.t_max} exceeds the schedule's T={T}")

    # 1–2: the teacher's trajectories on random crops (the only place the teacher runs).
    import time

    g = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randint(0, len(xt), (cfg.num_trajectories,), generator=g)
    y0 = to_model_space(random_crops(xt, idx, cfg.crop_size, cfg.flip, g))
    t_s = cfg.t_min + (cfg.t_max - cfg.t_min) * torch.rand(cfg.num_trajectories, generator=g)
    noise = torch.randn(y0.shape, generator=g)
    fractions = cfg.fractions()
    t0 = time.perf_counter()
    states, times, ends = make_trajectory_cache(teacher, schedule, y0, t_s, noise, cfg.teacher_steps,
                                                fractions, progress=progress)
    cache_s = time.perf_counter() - t0
    n, p = times.shape

    # Validation: full-size scans, fixed noise, teacher endpoints computed once.
    gv = torch.Generator().manual_seed(cfg.seed + 7_777)
    yv = to_model_space(xv).repeat(len(cfg.val_times), 1, 1, 1)
    tv = torch.tensor(cfg.val_times, dtype=torch.float32).repeat_interleave(len(xv))
    xv_t = schedule.q_sample(yv, tv, torch.randn(yv.shape, generator=gv))
    with torch.no_grad():
        v_end = torch.cat([ddim_sample(teacher, xv_t[i:i + 16], tv[i:i + 16], cfg.teacher_steps,
                                       schedule=schedule) for i in range(0, len(xv_t), 16)])

    def validate(ks: tuple[int, ...] = tuple(sorted({1, cfg.val_steps}))) -> dict[str, float]:
        out = {f"psnr_k{k}": evaluate_student(student, schedule, xv_t, tv, v_end, k) for k in ks}
        out["psnr"] = out[f"psnr_k{cfg.val_steps}"]
        return out

    student.eval()
    init_val = validate((1, 2, 4))

    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    total = cfg.epochs * cfg.steps_per_epoch
    sd2 = float(getattr(getattr(student, "cfg", None), "sigma_data", 0.5)) ** 2

    def train_epoch(epoch: int) -> dict[str, float]:
        ge = epoch_generator(cfg.seed, epoch, stream=1)
        tot = 0.0
        for i in range(cfg.steps_per_epoch):
            flat = torch.randint(0, n * p, (cfg.batch_size,), generator=ge)
            a, b = flat // p, flat % p
            x_in, tau, target = states[a, b], times[a, b], ends[a]
            sigma2 = schedule.sigma(tau) ** 2
            weight = (sigma2 + sd2) / (sigma2 * sd2).clamp_min(1e-8)  # EDM λ = 1/c_out²
            for group in opt.param_groups:
                group["lr"] = cosine_lr(epoch * cfg.steps_per_epoch + i, total, cfg.lr, cfg.warmup_steps)
            err = (student(x_in, tau) - target).square().mean(dim=(1, 2, 3))
            loss = (weight * err).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            tot += float(loss.detach())
        return {"loss": tot / cfg.steps_per_epoch}

    with channels_last(student, teacher):  # on the CPU: oneDNN's faster convolutions; both leave as they came
        res = fit(student, opt, train_epoch=train_epoch, validate=validate, epochs=cfg.epochs,
                  patience=cfg.patience, monitor="psnr", mode="max", model_cfg=getattr(student, "cfg", None),
                  kind="unet", name=name, checkpoint_dir=checkpoint_dir, resume=resume, progress=progress)
    res["init_val"] = init_val
    res["cache_s"] = cache_s
    res["val"] = validate((1, 2, 4))
    res["teacher_steps"] = cfg.teacher_steps
    res["student_steps"] = list(cfg.student_steps)
    res["mean_val_psnr_gain"] = float(np.mean([res["val"][f"psnr_k{k}"] - init_val[f"psnr_k{k}"]
                                               for k in (1, 2, 4)]))
    return res
