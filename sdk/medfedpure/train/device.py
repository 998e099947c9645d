"""Where training and evaluation run: ``cpu``, ``cuda`` or ``auto`` resolved once, before any work.

The one resolver of ``--device`` for ``medfedpure train classifier``, ``fed sim`` (its classifier phase) and
``medfedpure eval`` (which re-exports it from :mod:`medfedpure.eval.device`): ``auto`` is CUDA when torch sees
a device; asking for ``cuda`` where there is none is a :class:`DeviceError` naming the fix.
"""

from __future__ import annotations

import torch

__all__ = ["DEVICES", "DeviceError", "module_device", "resolve_device"]

#: what ``--device`` accepts
DEVICES = ("cpu", "cuda", "auto")


class DeviceError(ValueError):
    """The device asked for cannot be used here; the message names the fix."""


def resolve_device(device: str, *, cuda_available: bool | None = None) -> str:
    """``cpu`` / ``cuda`` / ``auto`` → the device the work runs on (``cpu`` or ``cuda``).

    ``cuda_available`` overrides ``torch.cuda.is_available()`` (tests). ``auto`` is CUDA when available.

    Raises:
        DeviceError: an unknown name, or ``cuda`` where torch sees no CUDA device.
    """
    if device not in DEVICES:
        raise DeviceError(f"--device {device!r}: expected one of {', '.join(DEVICES)}")
    has_cuda = torch.cuda.is_available() if cuda_available is None else bool(cuda_available)
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    if device == "cuda" and not has_cuda:
        raise DeviceError(f"--device cuda: torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() "
                          "is False); run on a machine with an NVIDIA GPU and a CUDA build of torch, or use "
                          "--device cpu (or auto)")
    return device


def module_device(module: torch.nn.Module | object) -> torch.device:
    """The device of ``module``'s first parameter or buffer (CPU for anything without either)."""
    if isinstance(module, torch.nn.Module):
        for t in module.parameters():
            return t.device
        for t in module.buffers():
            return t.device
    return torch.device("cpu")
