"""ONNX Runtime backend: CPU by default; the CUDA provider when it is installed and works.

Sessions are created from the bundle's *verified bytes* (never from a path), so onnxruntime
never parses a file that verification did not just hash. ONNX Runtime silently falls back to
CPU when a requested provider cannot start, so the provider really in use is read back with
``session.get_providers()`` and an explicit ``device="cuda"`` that did not take raises.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from medfedpure.runtime.bundle import VerifiedBundle
from medfedpure.runtime.engines.base import Engine, EngineError

_ROLES = ("mae", "denoiser", "classifier")


def _import_ort() -> Any:
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - a core dependency
        raise EngineError("onnxruntime is not installed: pip install onnxruntime") from e
    return ort


class OnnxRuntimeEngine(Engine):
    """The three graphs as ONNX Runtime sessions; numpy in, numpy out.

    Args:
        bundle: a verified bundle.
        device: ``"auto"`` (CUDA provider when available, else CPU), ``"cpu"`` or ``"cuda"``.
        precision: ``"auto"`` (FP16 graphs on CUDA when the bundle has them, FP32 on CPU — FP16
            is slower than FP32 on CPUs without native half arithmetic), ``"fp32"`` or ``"fp16"``.
        threads: intra-op threads per session (0: onnxruntime's default, one per core).
    """

    name = "onnxruntime"
    overlap_classify = True  # InferenceSession.run is thread-safe and releases the GIL

    def __init__(self, bundle: VerifiedBundle, *, device: str = "auto", precision: str = "auto",
                 threads: int = 0) -> None:
        spec = bundle.spec
        super().__init__(spec.gate, spec.mae.visible, spec.purifier.alphas_cumprod, spec.purifier.steps)
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={device!r}: expected 'auto', 'cpu' or 'cuda'")
        if precision not in ("auto", "fp32", "fp16"):
            raise ValueError(f"precision={precision!r}: expected 'auto', 'fp32' or 'fp16'")
        ort = _import_ort()
        available = ort.get_available_providers()
        want_cuda = device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in available)
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise EngineError(f"device='cuda' but onnxruntime offers only {available}: install onnxruntime-gpu")
        providers = (["CUDAExecutionProvider"] if want_cuda else []) + ["CPUExecutionProvider"]
        if precision == "auto":
            precision = "fp16" if want_cuda and bundle.find("classifier", "onnx", "fp16") else "fp32"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        # Three sessions run one after another on the same cores: an idle session's spinning
        # intra-op threads would steal those cores from the next one (on 2 cores the UNet ran far
        # slower inside the pipeline), so idle threads sleep instead of spinning.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions: dict[str, Any] = {}
        for role in _ROLES:
            art = bundle.find(role, "onnx", precision)
            if art is None:
                raise EngineError(f"bundle {bundle.short_id} has no {precision} ONNX graph for {role!r}")
            self.sessions[role] = ort.InferenceSession(bundle.read_bytes(art.name), so, providers=providers)
        in_use = {s.get_providers()[0] for s in self.sessions.values()}
        if device == "cuda" and in_use != {"CUDAExecutionProvider"}:
            raise EngineError(f"the CUDA provider did not start (sessions run on {sorted(in_use)})")
        # device="auto" whose CUDA provider fell back: keep the sessions, and report "cpu" below.
        self.providers = sorted(in_use)
        self.device = "cuda" if in_use == {"CUDAExecutionProvider"} else "cpu"
        self.precision = precision
        self._x_name = {r: self.sessions[r].get_inputs()[0].name for r in ("mae", "classifier")}

    def _run(self, role: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.sessions[role].run(None, feeds)[0]

    def mae(self, x: np.ndarray) -> np.ndarray:
        return self._run("mae", {self._x_name["mae"]: np.ascontiguousarray(x, dtype=np.float32)})

    def denoise(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        return self._run("denoiser", {"x_t": np.ascontiguousarray(x_t, dtype=np.float32),
                                      "t": np.ascontiguousarray(t, dtype=np.float32)})

    def classify(self, x: np.ndarray) -> np.ndarray:
        return self._run("classifier", {self._x_name["classifier"]: np.ascontiguousarray(x, dtype=np.float32)})

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "providers": self.providers}
