"""Torch backend: the reference maths, on CPU or CUDA.

On CUDA the intermediate tensors stay on the device (the Defender reads back only flags, scores
and final probabilities), the gate runs the fused CUDA kernel (``medfedpure.gate.patch_gate`` on
CUDA tensors), the networks run under FP16 autocast (which keeps softmax, normalisation and
reductions in FP32), and with ``cuda_graphs=True`` each network is captured once per batch size
into a CUDA graph and replayed (static input/output buffers; one launch per network call).

Weights come from the bundle's safetensors artefacts as verified bytes: the models are rebuilt
from the config JSON in the safetensors metadata (``medfedpure.train.checkpoint`` format), never
from a pickle and never from a path.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes

from medfedpure.runtime.bundle import VerifiedBundle
from medfedpure.runtime.engines.base import Engine, EngineError


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (8-byte little-endian header length + JSON)."""
    if len(data) < 8:
        raise EngineError("safetensors blob is shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > 100_000_000:
        raise EngineError("safetensors header length exceeds the blob")
    return dict(json.loads(data[8:8 + n].decode("utf-8")).get("__metadata__") or {})


def model_from_bytes(data: bytes) -> tuple[torch.nn.Module, Any, dict[str, str]]:
    """Rebuild a ``save_model`` checkpoint from bytes → ``(model in eval mode, cfg, metadata)``."""
    from medfedpure.train import checkpoint as ckpt

    meta = safetensors_metadata(data)
    if "kind" not in meta or "config" not in meta:
        raise EngineError("safetensors artefact lacks 'kind'/'config' metadata: not written by save_model")
    ckpt._builtin_registry()  # the checkpoint module's kind → (config, model) registry
    if meta["kind"] not in ckpt._REGISTRY:
        raise EngineError(f"unknown model kind {meta['kind']!r}")
    from_dict, build = ckpt._REGISTRY[meta["kind"]]
    cfg = from_dict(json.loads(meta["config"]))
    model = build(cfg)
    missing, unexpected = model.load_state_dict(load_safetensors_bytes(data), strict=False)
    if missing or unexpected:
        raise EngineError(f"weights do not match a {meta['kind']} model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    return model.eval(), cfg, meta


class _GraphedCall:
    """``fn(*inputs)`` captured into one CUDA graph per input batch size, then replayed."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = tuple(tuple(t.shape) for t in inputs)
        if key not in self.graphs:
            static_in = [t.clone() for t in inputs]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture (allocator, cuDNN plans)
                for _ in range(2):
                    self.fn(*static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.fn(*static_in)
            self.graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self.graphs[key]
        for s, t in zip(static_in, inputs, strict=True):
            s.copy_(t)
        graph.replay()
        return static_out.clone()


class TorchEngine(Engine):
    """The three networks as torch modules (from the bundle's safetensors).

    Args:
        bundle: a verified bundle with ``*.torch`` safetensors artefacts.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        precision: ``"auto"`` (FP16 autocast on CUDA, FP32 on CPU), ``"fp32"`` or ``"fp16"`` (CUDA only).
        cuda_graphs: capture the networks into CUDA graphs (CUDA only; default on with CUDA).
        threads: torch intra-op threads on CPU (0: leave torch's setting).
    """

    name = "torch"

    def __init__(self, bundle: VerifiedBundle, *, device: str = "auto", precision: str = "auto",
                 cuda_graphs: bool | None = None, threads: int = 0) -> None:
        pur = bundle.purifier
        super().__init__(bundle.gate, np.asarray(bundle.mae["visible"], dtype=bool),
                         np.asarray(pur["alphas_cumprod"], dtype=np.float64), int(pur["steps"]))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device={device!r}: expected 'auto', 'cpu' or 'cuda'")
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineError("device='cuda' but torch sees no CUDA device")
        if precision == "auto":
            precision = "fp16" if device == "cuda" else "fp32"
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"precision={precision!r}: expected 'auto', 'fp32' or 'fp16'")
        if precision == "fp16" and device != "cuda":
            raise EngineError("the torch backend runs FP16 only on CUDA; use precision='fp32' on CPU")
        if threads:
            torch.set_num_threads(int(threads))
        self.device, self.precision = device, precision
        self.torch_device = torch.device(device)
        from medfedpure.models.diffusion import DiffusionSchedule
        from medfedpure.models.mae import MAEScorer

        mods: dict[str, torch.nn.Module] = {}
        for role in ("classifier", "mae", "denoiser"):
            art = bundle.find(role, "safetensors", "fp32")
            if art is None:
                raise EngineError(f"bundle {bundle.short_id} has no torch weights for {role!r}")
            mods[role] = model_from_bytes(bundle.read_bytes(art.name))[0]
        mods["mae"] = MAEScorer(mods["mae"], k=int(self.visible.shape[0])).eval()
        if not np.array_equal(mods["mae"].visible.numpy(), self.visible):
            raise EngineError("the MAE's scoring masks differ from the manifest's: re-export the bundle")
        self.models = {k: m.to(self.torch_device) for k, m in mods.items()}
        self.schedule = DiffusionSchedule(pur["schedule"], int(pur["num_timesteps"]))
        if not np.allclose(self.schedule.alphas_cumprod.numpy(), self.alphas_cumprod, rtol=0, atol=1e-12):
            raise EngineError("the manifest's alphas_cumprod differ from the schedule it names")
        use_graphs = (device == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        if use_graphs and device != "cuda":
            raise EngineError("cuda_graphs=True needs device='cuda'")
        self.cuda_graphs = use_graphs
        self._calls = {k: self._wrap(m) for k, m in self.models.items()}

    def _wrap(self, module: torch.nn.Module) -> Callable[..., torch.Tensor]:
        half = self.precision == "fp16"
        # CUDA graphs need autocast's weight-cast cache off (the cached casts would be freed
        # outside the graph's memory pool; torch.cuda.graph documentation).
        cache = not self.cuda_graphs

        def call(*xs: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=half,
                                                        cache_enabled=cache):
                return module(*xs).float()

        return _GraphedCall(call) if self.cuda_graphs else call

    # array plumbing ------------------------------------------------------------------------
    def to_native(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.torch_device)

    def to_numpy(self, a: Any) -> np.ndarray:
        if isinstance(a, torch.Tensor):
            a = a.detach()
            return (a.float() if a.is_floating_point() else a).cpu().numpy()
        return np.asarray(a)

    def take(self, a: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
        return a[torch.as_tensor(idx, dtype=torch.long, device=a.device)]

    def put(self, a: torch.Tensor, idx: np.ndarray, rows: torch.Tensor) -> torch.Tensor:
        out = a.clone()
        out[torch.as_tensor(idx, dtype=torch.long, device=a.device)] = rows.to(out.dtype)
        return out

    def finite_rows(self, a: torch.Tensor) -> np.ndarray:
        return self.to_numpy(torch.isfinite(a.reshape(a.shape[0], -1)).all(dim=1))

    # stages --------------------------------------------------------------------------------
    def mae(self, x: torch.Tensor) -> torch.Tensor:
        return self._calls["mae"](x)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._calls["denoiser"](x_t, t.to(torch.float32))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self._calls["classifier"](x)

    def purify(self, x: torch.Tensor, t_star: torch.Tensor, noise: np.ndarray) -> torch.Tensor:
        """``models.diffusion.purify`` with the noise given (from the keyed RNG) instead of drawn."""
        from medfedpure.models.diffusion import ddim_sample, to_image_space, to_model_space

        t = t_star.to(torch.float32)
        with torch.inference_mode():
            x_t = self.schedule.q_sample(to_model_space(x), t, self.to_native(noise.astype(np.float32)))
            y0 = ddim_sample(self.denoise, x_t, t, self.steps, schedule=self.schedule)
            keep = (t_star == 0).reshape(-1, 1, 1, 1)
            return torch.where(keep, x, to_image_space(y0))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "cuda_graphs": self.cuda_graphs}
