"""Where ``medfedpure eval`` runs: the device of the attacks and of the judged Defender.

The evaluation has two halves (docs/evaluation.md): the attacks differentiate the bundle's torch
reference (gate → t* → purifier → classifier, :mod:`medfedpure.eval.pipeline`), and every adversarial
scan is judged by the real Defender. ``--device`` places both:

- :func:`resolve_device`: ``cpu``, ``cuda`` or ``auto`` (CUDA when torch sees a device) → ``cpu`` or
  ``cuda``; asking for ``cuda`` where there is none is a :class:`DeviceError`, raised before any work;
- :func:`defender_device`: the judged Defender's engine device for a backend — the torch and TensorRT
  backends follow the evaluation device; onnxruntime moves to CUDA only when its CUDA execution provider
  is installed (otherwise it stays on the CPU: the attacks still run on the GPU);
- :func:`attack_generator`: the ``torch.Generator`` of an attack's random draws (random starts, EOT
  purifier noise, APGD's wrapper), on the evaluation device and seeded as before. On CPU the draws are
  bit-for-bit those of a CPU-only run; on CUDA they come from CUDA's Philox stream, so a seed replays a
  run on the same kind of device, not across devices. The Defender's keyed purification noise is
  numpy Philox and identical everywhere.
- :func:`host`: a tensor as a host numpy array (what the Defender and the numpy metrics take).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from medfedpure.train.device import DEVICES, DeviceError, resolve_device

__all__ = ["EVAL_DEVICES", "DeviceError", "attack_generator", "defender_device", "device_info", "host",
           "onnxruntime_has_cuda", "resolve_device"]

#: what ``medfedpure eval --device`` accepts (the training side's resolver: one semantics)
EVAL_DEVICES = DEVICES


def onnxruntime_has_cuda() -> bool:
    """Whether onnxruntime offers its CUDA execution provider (onnxruntime-gpu installed)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def defender_device(backend: str, device: str, *, ort_cuda: bool | None = None) -> str:
    """The judged Defender's engine device when the evaluation runs on ``device`` (``cpu``/``cuda``).

    ``torch`` and ``tensorrt`` follow ``device``; ``onnxruntime`` (and ``auto``, which is onnxruntime)
    uses CUDA only when its CUDA provider is present (``ort_cuda`` overrides the probe), else the CPU.
    """
    if device not in ("cpu", "cuda"):
        raise DeviceError(f"device={device!r}: resolve it first (resolve_device) to 'cpu' or 'cuda'")
    if device == "cpu":
        return "cpu"
    if backend in ("onnxruntime", "auto"):
        return "cuda" if (onnxruntime_has_cuda() if ort_cuda is None else ort_cuda) else "cpu"
    return "cuda"


def attack_generator(seed: int, device: str | torch.device) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed`` (on CPU exactly ``torch.Generator()``'s)."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def host(t: torch.Tensor) -> np.ndarray:
    """``t`` as a numpy array on the host (detached; a CPU tensor shares its memory, as ``.numpy()``)."""
    return t.detach().cpu().numpy()


def device_info(device: str, defender: Any = None) -> dict[str, Any]:
    """What the report records under ``machine``: the evaluation device, the GPU's name and memory when
    on CUDA, and the judged Defender's engine (backend, device, precision)."""
    out: dict[str, Any] = {"device": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        out.update({"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                    "cuda": torch.version.cuda})
    if defender is not None:
        desc = defender.engine.describe()
        out["defender"] = {k: desc.get(k) for k in ("backend", "device", "precision")}
    return out
