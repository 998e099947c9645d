"""Inference backends behind one small interface (:class:`~medfedpure.runtime.engines.base.Engine`).

- ``onnxruntime`` (:mod:`.onnxruntime`): CPU; the CUDA provider when present (checked in use).
- ``torch`` (:mod:`.torch_engine`): reference maths on CPU/CUDA; FP16, CUDA graphs and the CUDA
  gate kernel on GPU. Needs the ``torch`` extra.
- ``tensorrt`` (:mod:`.tensorrt`): optional extra, guarded import.

:func:`create_engine` picks one; backends are imported lazily so that a CPU deployment with only
onnxruntime never imports torch.
"""

from __future__ import annotations

from typing import Any

from medfedpure.runtime.bundle import VerifiedBundle
from medfedpure.runtime.engines.base import Engine, EngineError

BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt")
DEVICES = ("auto", "cpu", "cuda")

__all__ = ["BACKENDS", "DEVICES", "Engine", "EngineError", "create_engine"]


def create_engine(bundle: VerifiedBundle, backend: str = "auto", device: str = "auto", **options: Any) -> Engine:
    """Create a backend for a verified bundle.

    Args:
        backend: ``"auto"`` (onnxruntime — the deployment runtime; it picks its CUDA provider
            when one is installed), ``"onnxruntime"``, ``"torch"`` or ``"tensorrt"``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        options: backend options (``precision``, ``threads``, ``cuda_graphs`` for torch).

    Raises:
        ValueError: unknown backend. EngineError: the backend cannot run here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if backend in ("auto", "onnxruntime"):
        from medfedpure.runtime.engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(bundle, device=device, **options)
    if backend == "torch":
        try:
            from medfedpure.runtime.engines.torch_engine import TorchEngine
        except ImportError as e:
            raise EngineError("the torch backend needs torch: pip install 'medfedpure[torch]'") from e
        return TorchEngine(bundle, device=device, **options)
    from medfedpure.runtime.engines.tensorrt import TensorRTEngine

    return TensorRTEngine(bundle, device=device, **options)
