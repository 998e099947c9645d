"""ONNX Runtime backend: CPU by default; the CUDA provider when it is installed and works.

Sessions are created from the bundle's *verified bytes* (never from a path), so onnxruntime
never parses a file that verification did not just hash. ONNX Runtime silently falls back to
CPU when a requested provider cannot start, so the provider really in use is read back with
``session.get_providers()`` and an explicit ``device="cuda"`` that did not take raises.

External data: a graph whose tensors live in a separate file gets that file from the bundle's
verified bytes through ``SessionOptions.add_external_initializers_from_files_in_memory`` — every
file it references must be a listed ``onnx_data`` artefact (verification refuses anything else), so
ONNX Runtime never resolves an external-data path against the working directory.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from medfedpure.runtime.bundle import VerifiedBundle
from medfedpure.runtime.engines.base import Engine, EngineError, current_interrupt
from medfedpure.runtime.onnx_graph import OnnxParseError, summarize

_ROLES = ("mae", "denoiser", "classifier")


def _import_ort() -> Any:
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - a core dependency
        raise EngineError("onnxruntime is not installed: pip install onnxruntime") from e
    return ort


def _session_options(ort: Any, threads: int) -> Any:
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
    return so


def _attach_external_data(so: Any, bundle: VerifiedBundle, graph_path: str, data: bytes) -> list[bytes]:
    """Give ONNX Runtime every external-data file the graph names, from the bundle's verified bytes.

    Returns the buffers handed to ONNX Runtime: the caller keeps them alive until the session has
    been created (ONNX Runtime copies from them only then).

    Raises:
        EngineError: the graph cannot be read, or names a file that is not a listed ``onnx_data``
            artefact (verification refuses such a bundle; this is the second line of defence).
    """
    try:
        refs = summarize(data).external
    except OnnxParseError as e:
        raise EngineError(f"{graph_path} is not a well-formed ONNX model ({e})") from e
    if not refs:
        return []
    by_path = {a.path: a for a in bundle.artefacts.values() if a.format == "onnx_data"}
    names: list[str] = []
    buffers: list[bytes] = []
    for loc in sorted({r.location for r in refs}, key=str):
        art = by_path.get(loc) if isinstance(loc, str) else None
        if art is None:
            raise EngineError(f"{graph_path} reads external data from {loc!r}, which is not an onnx_data artefact "
                              f"of bundle {bundle.short_id}: refusing to let onnxruntime open it")
        names.append(loc)
        buffers.append(bundle.read_bytes(art.name))
    if not hasattr(so, "add_external_initializers_from_files_in_memory"):
        raise EngineError(f"{graph_path} keeps tensors in external data, which this onnxruntime cannot take from "
                          "memory: upgrade onnxruntime, or re-export the graph with its data embedded")
    so.add_external_initializers_from_files_in_memory(names, buffers, [len(b) for b in buffers])
    return buffers


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
        self.num_classes = len(spec.classes)
        self.sessions: dict[str, Any] = {}
        for role in (*_ROLES, *(("detector",) if self.gate_model == "detector" else ())):
            art = bundle.find(role, "onnx", precision)
            if art is None:
                raise EngineError(f"bundle {bundle.short_id} has no {precision} ONNX graph for {role!r}")
            data = bundle.read_bytes(art.name)
            so = _session_options(ort, threads)
            external = _attach_external_data(so, bundle, art.path, data)
            self.sessions[role] = ort.InferenceSession(data, so, providers=providers)
            del external  # alive until the session has copied the tensors
        in_use = {s.get_providers()[0] for s in self.sessions.values()}
        if device == "cuda" and in_use != {"CUDAExecutionProvider"}:
            raise EngineError(f"the CUDA provider did not start (sessions run on {sorted(in_use)})")
        # device="auto" whose CUDA provider fell back: keep the sessions, and report "cpu" below.
        self.providers = sorted(in_use)
        self.device = "cuda" if in_use == {"CUDAExecutionProvider"} else "cpu"
        self.precision = precision
        self._x_name = {r: self.sessions[r].get_inputs()[0].name for r in ("mae", "classifier")}
        self._run_options = ort.RunOptions

    def _run(self, role: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """One session run; under a stage :class:`~medfedpure.runtime.engines.base.Interrupt` (a call
        with a time budget) the run gets its own ``RunOptions`` whose ``terminate`` flag the interrupt
        sets, so a run still going at the deadline stops (and raises) instead of holding the cores."""
        interrupt = current_interrupt()
        if interrupt is None:
            return self.sessions[role].run(None, feeds)[0]
        opts = self._run_options()

        def stop() -> None:
            opts.terminate = True

        interrupt.add_hook(stop)  # already set: the run refuses to start
        try:
            return self.sessions[role].run(None, feeds, opts)[0]
        finally:
            interrupt.remove_hook(stop)

    def mae(self, x: np.ndarray) -> np.ndarray:
        return self._run("mae", {self._x_name["mae"]: np.ascontiguousarray(x, dtype=np.float32)})

    def detect(self, x: np.ndarray) -> np.ndarray:
        if "detector" not in self.sessions:
            return super().detect(x)
        return self._run("detector", {"x": np.ascontiguousarray(x, dtype=np.float32)})

    def denoise(self, x_t: np.ndarray, t: np.ndarray) -> np.ndarray:
        return self._run("denoiser", {"x_t": np.ascontiguousarray(x_t, dtype=np.float32),
                                      "t": np.ascontiguousarray(t, dtype=np.float32)})

    def classify(self, x: np.ndarray) -> np.ndarray:
        p = self._run("classifier", {self._x_name["classifier"]: np.ascontiguousarray(x, dtype=np.float32)})
        if p.ndim != 2 or p.shape[1] != self.num_classes:  # fail closed: never pair probabilities with wrong names
            raise EngineError(f"the classifier returned shape {list(p.shape)}; the bundle has {self.num_classes} "
                              "classes, so its output must be [batch, classes]")
        return p

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "providers": self.providers}
