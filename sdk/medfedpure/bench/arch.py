"""Architecture timing at another image size: the bundle's network configs, freshly initialised.

A bundle is exported at one size (its ``image_size``); its ONNX graphs and weights do not run at
another. What a larger deployment size would cost is still a question about the architectures,
not the weights: this builds the bundle's three networks (``provenance.model_configs``: MoE
classifier, MAE, UNet) with ``image_size`` replaced, with random weights, and times the stages the
Defender runs — MAE scoring under the bundle's K mask sets, the gate (torch ops), the K-step
purifier from t_max, the classifier — on a torch device. Rows made here are labelled
:data:`ARCH_LABEL`: they are never the bundle's answers or the bundle's weights.

torch is imported inside the functions: the rest of the benchmark runs without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from medfedpure.bench.latency import percentiles

__all__ = ["ARCH_LABEL", "ArchUnavailable", "time_architecture"]

ARCH_LABEL = "architecture timing, not the bundle's weights"
ARCH_STAGES = ("mae", "gate", "purify", "classify", "total")


class ArchUnavailable(RuntimeError):
    """The architecture timing cannot run here (no torch, no model configs in the bundle, no device)."""


def _models(configs: Mapping[str, Any], size: int, k: int) -> tuple[Any, Any, Any]:
    from medfedpure.models.mae import MAEScorer
    from medfedpure.models.registry import lookup

    built = {}
    for role, kind in (("classifier", "moe"), ("mae", "mae"), ("denoiser", "unet")):
        if role not in configs:
            raise ArchUnavailable(f"the bundle's provenance.model_configs lacks {role!r}: no architecture to time")
        entry = lookup(kind)
        cfg = entry.config_from_dict({**dict(configs[role]), "image_size": int(size)})
        built[role] = entry.build(cfg).eval()
    return built["classifier"], MAEScorer(built["mae"], k=k).eval(), built["denoiser"]


def time_architecture(bundle: Any, size: int, *, device: str, precision: str, batch: int, iters: int,
                      warmup: int, threads: int = 0, seed: int = 0,
                      tick: Callable[[], None] | None = None) -> dict[str, dict[str, float]]:
    """Per-stage milliseconds of the bundle's architectures at ``size`` px (random weights).

    Args:
        bundle: a :class:`~medfedpure.runtime.bundle.VerifiedBundle` (configs, gate, K, schedule).
        device: ``cpu`` or ``cuda``. precision: ``fp32`` or ``fp16`` (autocast on CUDA).
        batch, iters, warmup: the input [batch, 1, size, size] and the timed / untimed calls.

    Returns:
        stage (``mae``, ``gate``, ``purify``, ``classify``, ``total``) → :func:`percentiles`.

    Raises:
        ArchUnavailable: torch absent, CUDA asked for and absent, or configs missing.
    """
    try:
        import torch
    except ImportError as e:
        raise ArchUnavailable("architecture timing needs torch: pip install 'medfedpure[torch]'") from e
    if device == "cuda" and not torch.cuda.is_available():
        raise ArchUnavailable("device cuda: torch sees no CUDA device")
    from medfedpure.gate.dispatch import run_gate
    from medfedpure.models.diffusion import DiffusionSchedule, purify

    spec = bundle.spec
    configs = spec.provenance.get("model_configs") or {}
    if threads and device == "cpu":
        torch.set_num_threads(threads)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        classifier, scorer, unet = (m.to(device) for m in _models(configs, size, spec.mae.k))
    finally:
        torch.random.set_rng_state(state)
    schedule = DiffusionSchedule(spec.purifier.schedule, spec.purifier.num_timesteps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, 1, size, size), generator=gen).to(device)
    noise = torch.randn((batch, 1, size, size), generator=gen).to(device)
    t_star = torch.full((batch,), int(spec.gate.t_max), dtype=torch.int64, device=device)
    cast = torch.autocast("cuda", dtype=torch.float16, enabled=device == "cuda" and precision == "fp16")

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    lat: dict[str, list[float]] = {k: [] for k in ARCH_STAGES}
    with torch.inference_mode(), cast:
        for i in range(warmup + iters):
            marks = [time.perf_counter()]
            recon = scorer(x)
            sync()
            marks.append(time.perf_counter())
            run_gate(spec.gate, x[:, 0].float(), recon.float(), scorer.visible)
            sync()
            marks.append(time.perf_counter())
            xp = purify(unet, x, t_star, spec.purifier.steps, noise=noise, schedule=schedule)
            sync()
            marks.append(time.perf_counter())
            classifier(xp)
            sync()
            marks.append(time.perf_counter())
            if i >= warmup:
                for k, (a, b) in zip(ARCH_STAGES[:-1], zip(marks, marks[1:], strict=False), strict=True):
                    lat[k].append((b - a) * 1e3)
                lat["total"].append((marks[-1] - marks[0]) * 1e3)
            if tick is not None:
                tick()
    return {k: percentiles(v) for k, v in lat.items() if v} if iters else {}

