"""Where training and evaluation run: ``cpu``, ``cuda`` or ``auto`` resolved once, before any work.

The one resolver of ``--device`` for ``medfedpure train classifier``, ``fed sim`` (its classifier phase) and
``medfedpure eval`` (which re-exports it from :mod:`medfedpure.eval.device`): ``auto`` is CUDA when torch sees
a device; asking for ``cuda`` where there is none is a :class:`DeviceError` naming the fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["DEVICES", "DeviceError", "channels_last", "channels_last_enabled", "module_device", "resolve_device"]

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


@contextmanager
def channels_last(*modules: object) -> Iterator[None]:
    """Run the block with each CPU module's 4-D weights and buffers in channels-last memory layout, and put them back
    in the ordinary layout afterwards (also on an error).

    On the CPU oneDNN's convolutions run a training step's passes 1.17-1.39x faster so (the classifier, the attack
    detector and the purifier's UNets; benchmarks/layout_speed.py, benchmarks/RESULTS.md); every value is
    the same up to floating-point order. Modules on another device, and objects that are not modules, are left alone.
    ``MEDFEDPURE_CHANNELS_LAST=0`` in the environment switches it off (a CPU where the layout is slower, or the baseline
    of a comparison: the setting reaches a federation's site processes, which inherit the environment); ``1`` or unset
    leaves it on; any other value is a ``ValueError``.
    """
    if not channels_last_enabled():
        yield
        return
    cpu = [m for m in modules if isinstance(m, torch.nn.Module) and module_device(m).type == "cpu"]
    for m in cpu:
        m.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for m in cpu:
            m.to(memory_format=torch.contiguous_format)


def channels_last_enabled() -> bool:
    """Whether :func:`channels_last` converts (``MEDFEDPURE_CHANNELS_LAST``: unset or ``1`` yes, ``0`` no)."""
    value = os.environ.get("MEDFEDPURE_CHANNELS_LAST", "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"MEDFEDPURE_CHANNELS_LAST={value!r}: use 1 (the channels-last layout on the CPU, the "
                         "default) or 0 (the ordinary layout)")
    return value == "1"
