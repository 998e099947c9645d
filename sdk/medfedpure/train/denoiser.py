"""The frozen diffusion denoiser of denoised-smoothing fine-tuning and of attacks through purification.

One loader for every caller (``medfedpure train classifier --denoiser``, each federated site's
classifier rounds, the bundle build's classifier federation): a bundle folder (verified first; its
``denoiser.torch`` entry), a run folder (its ``student.safetensors``) or a ``.safetensors`` file of a
unet. The result is the model in eval mode with gradients off, and the purification schedule as far
as the source records it.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

__all__ = ["DenoiserLoadError", "load_denoiser", "load_denoiser_cached", "purification_point"]


def purification_point(schedule: dict[str, Any], t_star: float | None = None) -> tuple[float, int]:
    """``(t*, K)`` of training through the purifier: ``t_star`` when given (not None or 0), else the denoiser's
    recorded t_min (``load_denoiser``'s ``schedule``), else 60; K its recorded steps, else 1."""
    return float(t_star or schedule.get("t_min") or 60), int(schedule.get("steps") or 1)


class DenoiserLoadError(ValueError):
    """The denoiser source is not a bundle, a run folder with a student, or a unet checkpoint."""


def load_denoiser(path: str | os.PathLike[str]) -> tuple[Any, dict[str, Any]]:
    """``(unet, schedule)`` from a bundle folder, a run folder or a ``.safetensors`` file.

    ``schedule`` holds ``t_min`` (the bundle's gate t_min, else the student's recorded one, else
    None) and ``steps`` (K, the sampling steps, else None). The unet maps ``(x_t [B,1,S,S], t [B])``
    to x̂₀ ``[B,1,S,S]`` in diffusion space and carries its ``.schedule``; it is returned in eval mode
    with ``requires_grad`` off (a frozen denoiser).

    Raises:
        DenoiserLoadError: the source cannot be read or verified, or holds no diffusion unet; the
            message names the source and what to give instead.
    """
    from medfedpure.models.weights import WeightsError, load_model, model_from_bytes
    from medfedpure.runtime.bundle import BundleError, verify_bundle

    path = Path(path)
    try:
        if path.is_dir() and (path / "manifest.json").is_file():
            vb = verify_bundle(path, allow_unsigned=True)
            model = model_from_bytes(vb.read_bytes("denoiser.torch"))[0]
            schedule = {"t_min": vb.spec.gate.t_min, "steps": vb.spec.purifier.steps}
        else:
            model, _, meta = load_model(path / "student.safetensors" if path.is_dir() else path)
            schedule = {k: meta.get(k) for k in ("t_min", "steps")}
    except (BundleError, WeightsError, OSError, KeyError, ValueError) as exc:
        raise DenoiserLoadError(f"denoiser {path}: {exc} (give a bundle folder, a run folder holding "
                                "student.safetensors, or a .safetensors file of a unet)") from exc
    if not hasattr(model, "schedule"):
        raise DenoiserLoadError(f"denoiser {path}: not a diffusion unet (no schedule); give the diffusion "
                                "student's bundle, run folder or .safetensors file")
    model.eval().requires_grad_(False)
    return model, schedule


@functools.lru_cache(maxsize=2)
def load_denoiser_cached(path: str) -> tuple[Any, dict[str, Any]]:
    """:func:`load_denoiser`, once per process and ``path``: a federated site's classifier rounds all
    share the one frozen model (it never changes during a run, and it never leaves the site)."""
    return load_denoiser(path)
