"""Torch backend: the reference maths, on CPU or CUDA.

On CUDA the intermediate tensors stay on the device (the Defender reads back only flags, scores
and final probabilities), the gate runs the fused CUDA kernel (``medfedpure.gate.patch_gate`` on
CUDA tensors), the networks run under FP16 autocast (which keeps softmax, normalisation and
reductions in FP32), and with ``cuda_graphs=True`` each network is captured once per batch size
into a CUDA graph and replayed (static input/output buffers; one launch per network call).

Weights come from the bundle's safetensors artefacts as verified bytes: the models are rebuilt
from the config JSON in the safetensors metadata (:mod:`medfedpure.models.weights`, kinds from
:mod:`medfedpure.models.registry`), never from a pickle and never from a path. Purification is
:func:`medfedpure.models.diffusion.purify` itself, fed the Defender's keyed noise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from medfedpure.models import weights
from medfedpure.models.diffusion import DiffusionSchedule, purify
from medfedpure.models.mae import MAEScorer
from medfedpure.runtime.bundle import VerifiedBundle
from medfedpure.runtime.engines.base import Engine, EngineError


def model_from_bytes(data: bytes) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Rebuild a saved model from verified bytes → ``(model in eval mode, cfg, metadata)``.

    :func:`medfedpure.models.weights.model_from_bytes`, with its errors as :class:`EngineError`.
    """
    try:
        return weights.model_from_bytes(data)
    except weights.WeightsError as e:
        raise EngineError(f"cannot rebuild a model from the bundle's weights: {e}") from e


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
        spec = bundle.spec
        pur = spec.purifier
        super().__init__(spec.gate, spec.mae.visible, pur.alphas_cumprod, pur.steps)
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
        mods: dict[str, torch.nn.Module] = {}
        for role in ("classifier", "mae", "denoiser", *(("detector",) if self.gate_model == "detector" else ())):
            art = bundle.find(role, "safetensors", "fp32")
            if art is None:
                raise EngineError(f"bundle {bundle.short_id} has no torch weights for {role!r}")
            mods[role] = model_from_bytes(bundle.read_bytes(art.name))[0]
        mods["mae"] = MAEScorer(mods["mae"], k=int(self.visible.shape[0])).eval()
        if not np.array_equal(mods["mae"].visible.numpy(), self.visible):
            raise EngineError("the MAE's scoring masks differ from the manifest's: re-export the bundle")
        self.models = {k: m.to(self.torch_device) for k, m in mods.items()}
        self.schedule = DiffusionSchedule(pur.schedule, pur.num_timesteps)
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

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        if "detector" not in self._calls:
            return super().detect(x)
        return self._calls["detector"](x)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._calls["denoiser"](x_t, t.to(torch.float32))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self._calls["classifier"](x)

    def purify(self, x: torch.Tensor, t_star: torch.Tensor, noise: np.ndarray) -> torch.Tensor:
        """:func:`medfedpure.models.diffusion.purify` on the engine's networks, with the keyed noise.

        ``x`` [B,1,S,S] and ``t_star`` [B] on the engine's device; ``noise`` [B,1,S,S] float32.
        """
        with torch.inference_mode():
            return purify(self.denoise, x, t_star, self.steps, noise=self.to_native(noise.astype(np.float32)),
                          schedule=self.schedule)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "cuda_graphs": self.cuda_graphs}
