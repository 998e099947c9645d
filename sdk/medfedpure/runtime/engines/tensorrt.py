"""TensorRT backend (optional extra ``medfedpure[tensorrt]``; guarded import).

Runs the bundle's TensorRT plans for the current GPU architecture (artefacts with format
``tensorrt`` under ``tensorrt/sm<XY>/``). Device memory is managed through torch CUDA tensors
(``set_tensor_address`` + ``execute_async_v3`` on torch's current stream), so intermediate
tensors stay on the device exactly as in the torch backend, and the gate runs the CUDA kernel.
Written against TensorRT's documented API; TensorRT is not installable where this project is
developed, so this backend is untested here (its tests skip).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medfedpure.runtime.bundle import VerifiedBundle
from medfedpure.runtime.engines.base import Engine, EngineError


def _import() -> tuple[Any, Any]:
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
        import torch
    except ImportError as e:
        raise EngineError("the tensorrt backend needs TensorRT and torch with CUDA: "
                          "pip install 'medfedpure[tensorrt,torch]'") from e
    if not torch.cuda.is_available():
        raise EngineError("the tensorrt backend needs a CUDA GPU")
    return trt, torch


class TensorRTEngine(Engine):
    """The three networks as TensorRT execution contexts (batch 1–8 profiles)."""

    name = "tensorrt"

    def __init__(self, bundle: VerifiedBundle, *, device: str = "auto", precision: str = "auto",
                 threads: int = 0) -> None:
        del threads
        spec = bundle.spec
        super().__init__(spec.gate, spec.mae.visible, spec.purifier.alphas_cumprod, spec.purifier.steps)
        if device not in ("auto", "cuda"):
            raise EngineError("the tensorrt backend runs on CUDA only")
        if self.gate_model == "detector":
            raise EngineError("the tensorrt backend has no plan for the attack detector of a 'learned' gate: use the "
                              "onnxruntime or torch backend")
        trt, torch = _import()
        self._torch = torch
        major, minor = torch.cuda.get_device_capability(0)
        arch = f"sm{major}{minor}"
        precision = "fp16" if precision == "auto" else precision
        self.device, self.precision = "cuda", precision
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.contexts: dict[str, tuple[Any, Any]] = {}
        for role in ("mae", "denoiser", "classifier"):
            art = next((a for a in bundle.artefacts.values() if a.role == role and a.format == "tensorrt"
                        and a.precision == precision and f"/{arch}/" in f"/{a.path}"), None)
            if art is None:
                raise EngineError(f"bundle {bundle.short_id} has no {precision} TensorRT plan for {role!r} on "
                                  f"{arch}: build them with `medfedpure export --tensorrt` on this GPU")
            engine = runtime.deserialize_cuda_engine(bundle.read_bytes(art.name))
            if engine is None:
                raise EngineError(f"TensorRT could not load {art.path} (built with another TensorRT version?)")
            self.contexts[role] = (engine, engine.create_execution_context())

    def to_native(self, a: np.ndarray) -> Any:
        return self._torch.from_numpy(np.ascontiguousarray(a)).cuda()

    def to_numpy(self, a: Any) -> np.ndarray:
        if isinstance(a, self._torch.Tensor):
            a = a.detach()
            return (a.float() if a.is_floating_point() else a).cpu().numpy()
        return np.asarray(a)

    def take(self, a: Any, idx: np.ndarray) -> Any:
        return a[self._torch.as_tensor(idx, dtype=self._torch.long, device=a.device)]

    def put(self, a: Any, idx: np.ndarray, rows: Any) -> Any:
        out = a.clone()
        out[self._torch.as_tensor(idx, dtype=self._torch.long, device=a.device)] = rows
        return out

    def finite_rows(self, a: Any) -> np.ndarray:
        return self.to_numpy(self._torch.isfinite(a.reshape(a.shape[0], -1)).all(dim=1))

    def _execute(self, role: str, inputs: dict[str, Any]) -> Any:
        torch = self._torch
        engine, ctx = self.contexts[role]
        out = None
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if name in inputs:
                t = inputs[name].contiguous().float()
                inputs[name] = t
                ctx.set_input_shape(name, tuple(t.shape))
                ctx.set_tensor_address(name, t.data_ptr())
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if name not in inputs:
                out = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=torch.float32, device="cuda")
                ctx.set_tensor_address(name, out.data_ptr())
        if not ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise EngineError(f"TensorRT execution of {role} failed")
        return out

    def mae(self, x: Any) -> Any:
        return self._execute("mae", {"x": x})

    def denoise(self, x_t: Any, t: Any) -> Any:
        if isinstance(t, np.ndarray):
            t = self.to_native(t.astype(np.float32))
        return self._execute("denoiser", {"x_t": self.to_native(x_t) if isinstance(x_t, np.ndarray) else x_t,
                                          "t": t})

    def classify(self, x: Any) -> Any:
        return self._execute("classifier", {"x": x})
