"""The machine a benchmark ran on, recorded beside its numbers.

Everything is read without importing torch when torch is absent, and without failing when a
probe is unavailable (no ``/proc/cpuinfo``, no ``nvidia-smi``): a missing value is ``None``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
from typing import Any

__all__ = ["cuda_available", "environment", "torch_available"]


def torch_available() -> bool:
    """Whether torch can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def cuda_available() -> dict[str, bool]:
    """``{"torch": torch sees a CUDA device, "onnxruntime": onnxruntime offers its CUDA provider}``."""
    out = {"torch": False, "onnxruntime": False}
    if torch_available():
        import torch

        out["torch"] = bool(torch.cuda.is_available())
    try:
        import onnxruntime

        out["onnxruntime"] = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        pass
    return out


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        return platform.processor() or None


def _nvidia_smi() -> dict[str, str] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    name, driver, mem = ([*(s.strip() for s in out.splitlines()[0].split(",")), None, None])[:3]
    return {"name": name, "driver": driver, "memory": mem}


def environment(*, threads: int, bundle_id: str | None = None) -> dict[str, Any]:
    """CPU model and cores, GPU model / driver / CUDA when present, python, numpy / onnxruntime /
    torch versions, thread settings, load average and the bundle id."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    env: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(), "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(), "cpus_usable": affinity,
        "numpy": _version("numpy"), "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "torch": _version("torch") if torch_available() else None, "medfedpure": _version("medfedpure"),
        "threads": {"requested": threads, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS")},
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "bundle_id": bundle_id, "gpu": None,
    }
    if env["torch"] is not None:
        import torch

        env["threads"]["torch_intra_op"] = torch.get_num_threads()
        if torch.cuda.is_available():
            env["gpu"] = {"name": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
                          "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    smi = _nvidia_smi()
    if smi is not None:
        env["gpu"] = {**(env["gpu"] or {}), **{k: v for k, v in smi.items() if k != "name" or not env["gpu"]}}
    return env
