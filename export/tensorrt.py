"""TensorRT engine building from the bundle's ONNX graphs (optional extra ``medfedpure[tensorrt]``).

Written against TensorRT's documented Python API (10.x/11.x). TensorRT cannot be installed on
the machines this project is developed on, so this module imports ``tensorrt`` lazily and raises
:class:`TensorRTUnavailable` with the install hint when it is missing; its tests skip.

Precision: TensorRT 11 removed ``BuilderFlag.FP16`` — networks are *strongly typed*, so the
precision is the ONNX graph's: build from ``*.fp16.onnx`` (see :mod:`medfedpure.export.fp16`,
which keeps normalisation, softmax and reductions in FP32) for an FP16 engine. On TensorRT 10 we
also create the network strongly typed when the flag exists, so both versions build the same
engine from the same graph.

Each engine gets one optimisation profile over the dynamic batch (min 1, opt ``opt_batch``, max
``max_batch``; default 1/4/8) and shares a timing cache file between builds (tactic timings are
reused across the three networks and across rebuilds on the same GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


class TensorRTUnavailable(ImportError):
    """TensorRT (the ``tensorrt`` package with its libraries) is not installed."""


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError as e:
        raise TensorRTUnavailable(
            "TensorRT is not installed: pip install 'medfedpure[tensorrt]' on a machine with an NVIDIA "
            "GPU (its libraries download from NVIDIA's index)") from e
    return trt


@dataclass(frozen=True)
class ProfileSpec:
    """Batch range of the optimisation profile (1 ≤ min ≤ opt ≤ max)."""

    min_batch: int = 1
    opt_batch: int = 4
    max_batch: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"profile {self}: need 1 <= min_batch <= opt_batch <= max_batch")


def build_engine(
    onnx_bytes: bytes,
    *,
    profile: ProfileSpec = ProfileSpec(),
    timing_cache: str | os.PathLike[str] | None = None,
    workspace_bytes: int = 1 << 30,
) -> bytes:
    """Build a serialized TensorRT engine (plan) from an ONNX graph.

    Args:
        onnx_bytes: the ONNX model (FP32 or an FP16 graph with FP32 interfaces).
        profile: batch range for every input's dynamic batch dimension (other dims static).
        timing_cache: a file read before and written after the build (created if missing).
        workspace_bytes: builder workspace limit.

    Returns:
        The plan's bytes (valid for this GPU architecture and TensorRT version only).

    Raises:
        TensorRTUnavailable: no TensorRT. RuntimeError: the parser or builder failed (messages included).
    """
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache_blob = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    opt = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        dims = list(inp.shape)
        if dims[0] != -1 or any(d < 0 for d in dims[1:]):
            raise RuntimeError(f"input {inp.name} has shape {dims}: expected a dynamic batch and static rest")
        rest = dims[1:]
        opt.set_shape(inp.name, [profile.min_batch, *rest], [profile.opt_batch, *rest], [profile.max_batch, *rest])
    config.add_optimization_profile(opt)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT failed to build the engine (see the log above)")
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def gpu_arch() -> str:
    """``sm<major><minor>`` of CUDA device 0 (plans are per architecture)."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: TensorRT engines are built on the GPU they will run on")
    major, minor = torch.cuda.get_device_capability(0)
    return f"sm{major}{minor}"


def add_tensorrt_plans(
    bundle: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    precision: str = "fp16",
    profile: ProfileSpec = ProfileSpec(),
    timing_cache: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Any:
    """Write a copy of a verified bundle with TensorRT plans for this GPU (``tensorrt/sm<XY>/<role>.<prec>.plan``).

    The plans are built from the bundle's own ONNX graphs of ``precision`` (verified bytes), the
    manifest keeps every other section and gains the plans' sha256 (so the bundle id changes).
    Returns the new :class:`~medfedpure.runtime.bundle.VerifiedBundle`.
    """
    from medfedpure.export.bundle_writer import ArtefactSource, write_bundle
    from medfedpure.runtime.bundle import verify_bundle

    import_tensorrt()  # fail before reading anything when TensorRT is missing
    vb = verify_bundle(bundle, allow_unsigned=True)  # the output is signed (or not) by write_bundle
    arch = gpu_arch()
    arts = {a.name: ArtefactSource(path=a.path, role=a.role, format=a.format, precision=a.precision,
                                   data=vb.read_bytes(a.name)) for a in vb.artefacts.values()}
    for role in ("classifier", "mae", "denoiser"):
        src = vb.find(role, "onnx", precision)
        if src is None:
            raise ValueError(f"bundle has no {precision} ONNX graph for {role}")
        plan = build_engine(vb.read_bytes(src.name), profile=profile, timing_cache=timing_cache)
        arts[f"{role}.trt.{arch}.{precision}"] = ArtefactSource(
            path=f"tensorrt/{arch}/{role}.{precision}.plan", role=role, format="tensorrt", precision=precision,
            data=plan)
    prov = {**vb.spec.provenance, "tensorrt": {"arch": arch, "version": import_tensorrt().__version__,
                                               "profile": [profile.min_batch, profile.opt_batch, profile.max_batch]}}
    return write_bundle(out, arts, replace(vb.spec, provenance=prov), overwrite=overwrite)
