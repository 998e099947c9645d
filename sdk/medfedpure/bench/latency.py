"""Defender latency per stage and end to end, per backend, early-exit and purified paths separately.

Paths: the gate's decision is what separates them, so each path is measured with the bundle's gate
forced one way — ``early_exit``: τ = +∞ (nothing flagged: MAE + gate + classifier), ``purified``:
τ = −∞ (everything flagged at t* = t_max: MAE + gate + K-step purifier + classifier). The work per
stage does not depend on the data (static shapes; K network calls whatever t*), so this measures
exactly the cost of each path. Inputs are synthetic uint8 scans larger than the bundle's size
(:func:`synthetic_scans`), so ``load`` and ``preprocess`` include validation and the resize.

The backends are called in turn, one call each per iteration, so that they share the machine's
load and the ratios between them hold on a shared, noisy machine. A backend spec is
``backend[:precision][@device][/seq][/eager]``: ``/seq`` turns the Defender's speculative overlap off
(the stages strictly one after another), ``/eager`` turns CUDA graphs off (torch).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["BACKENDS", "PATHS", "STAGES", "BackendSpec", "baseline_for", "force_path", "measure",
           "parse_spec", "percentiles", "synthetic_scans"]

STAGES = ("load", "preprocess", "mae", "gate", "purify", "classify", "total")
PATHS = ("early_exit", "purified")
BACKENDS = ("onnxruntime", "torch", "tensorrt")


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """One parsed ``--backends`` entry.

    Attributes:
        spec: the text as given. backend: ``onnxruntime`` / ``torch`` / ``tensorrt``.
        device: ``cpu`` / ``cuda``. options: engine options (``precision``, ``cuda_graphs``).
        sequential: the Defender's overlap off.
    """

    spec: str
    backend: str
    device: str
    options: Mapping[str, Any]
    sequential: bool

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend spec {self.spec!r}: unknown backend {self.backend!r}; expected one of "
                             f"{', '.join(BACKENDS)}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"backend spec {self.spec!r}: unknown device {self.device!r}; expected cpu or cuda")
        if self.options.get("precision", "fp32") not in ("fp32", "fp16"):
            raise ValueError(f"backend spec {self.spec!r}: unknown precision {self.options['precision']!r}; "
                             "expected fp32 or fp16")


def parse_spec(spec: str, default_device: str = "cpu") -> BackendSpec:
    """``backend[:precision][@device][/seq][/eager]`` → :class:`BackendSpec` (ValueError when malformed)."""
    head, *flags = spec.strip().split("/")
    head, _, device = head.partition("@")
    backend, _, precision = head.partition(":")
    opts: dict[str, Any] = {"precision": precision} if precision else {}
    unknown = set(flags) - {"seq", "eager"}
    if unknown or not backend:
        raise ValueError(f"backend spec {spec!r}: expected backend[:precision][@device][/seq][/eager] "
                         f"with backend one of {', '.join(BACKENDS)}")
    if "eager" in flags:
        opts["cuda_graphs"] = False
    return BackendSpec(spec=spec.strip(), backend=backend, device=device or default_device, options=opts,
                       sequential="seq" in flags)


def baseline_for(name: str, names: Sequence[str]) -> str | None:
    """The row a ratio is measured against: torch eager FP32 on the same device, else on the CPU.

    Row names are ``"backend device precision[ graphs][ sequential]"``; torch eager FP32 is
    ``"torch DEVICE fp32"`` (no ``graphs``).
    """
    device = name.split()[1]
    for want in (f"torch {device} fp32", "torch cpu fp32"):
        if want in names:
            return want
    return None


def synthetic_scans(n: int, size: int = 256, seed: int = 0) -> list[np.ndarray]:
    """``n`` synthetic grey scans, uint8 [size, size]: a bright ellipse (the head) with a darker
    ring (skull), low-frequency texture and noise. Latency does not depend on the content, but the
    scans pass the loader's validation and exercise the resize to the bundle's size."""
    rng = np.random.Generator(np.random.Philox(key=seed))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) - 0.5
    out = []
    for _ in range(n):
        a, b = 0.33 + 0.08 * rng.random(), 0.38 + 0.08 * rng.random()
        r = (xx / a) ** 2 + (yy / b) ** 2
        head = (r < 1).astype(np.float32) * (0.55 + 0.3 * rng.random()) + ((r > 0.85) & (r < 1)) * 0.2
        tex = rng.standard_normal((size // 8 + 1, size // 8 + 1)).astype(np.float32)
        tex = np.kron(tex, np.ones((8, 8), np.float32))[:size, :size] * 0.05
        img = np.clip(head + tex * (r < 1) + 0.03 * rng.standard_normal((size, size)).astype(np.float32), 0, 1)
        out.append((img * 255).astype(np.uint8))
    return out


def force_path(defender: Any, path: str) -> None:
    """Force the Defender's gate to one path: nothing flagged (``early_exit``) or everything flagged at
    t* = t_max (``purified``)."""
    if path not in PATHS:
        raise ValueError(f"path={path!r}: expected one of {PATHS}")
    g = defender.engine.gate_spec
    if path == "early_exit":
        g = dataclasses.replace(g, tau=3.0e38, tau_high=3.1e38, policy="adaptive")
    else:
        g = dataclasses.replace(g, tau=-3.0e38, tau_high=-2.9e38, policy="adaptive")  # t* saturates at t_max
    defender.engine.gate_spec = g


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50 / p90 / p99 / mean / n of a list of milliseconds (numpy's linear percentiles, so p50 ≤ p90 ≤ p99)."""
    v = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)),
            "p99": float(np.percentile(v, 99)), "mean": float(v.mean()), "n": int(v.size)}


def measure(defenders: Mapping[str, Any], path: str, batch: int, iters: int, warmup: int, *,
            gap_ms: float = 5.0, scan_size: int = 256,
            tick: Callable[[], None] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Per-stage latency of each Defender on one path and batch, the Defenders called in turn.

    Interleaving (one call of each per iteration) puts every backend under the same machine load.
    The order rotates every iteration and the calls are ``gap_ms`` apart, so that no backend always
    runs right after another one's still-spinning worker threads (torch's OpenMP pool spins for a
    while after a call); scans also reach a scanner workstation one by one, not back to back.

    Returns:
        name → stage (``STAGES``) → :func:`percentiles` of the per-call milliseconds.

    Raises:
        RuntimeError: a call returned unverified results, or the forced gate did not take.
    """
    scans = synthetic_scans(batch, scan_size)
    lat: dict[str, dict[str, list[float]]] = {name: {k: [] for k in STAGES} for name in defenders}
    for d in defenders.values():
        force_path(d, path)
    names = list(defenders)
    want_flag = path == "purified"
    for i in range(warmup + iters):
        for name in names[i % len(names):] + names[:i % len(names)]:
            time.sleep(gap_ms / 1e3)
            rs = defenders[name].run_batch(scans, seeds=list(range(batch)))
            if not all(r.ok for r in rs):
                raise RuntimeError(f"{name} {path}: unverified results: {rs[0].reason}")
            if any(r.flagged != want_flag for r in rs):
                raise RuntimeError(f"{name} {path}: the forced gate did not take")
            if i >= warmup:
                for k in STAGES:
                    lat[name][k].append(rs[0].latency_ms.get(k, 0.0))
            if tick is not None:
                tick()
    return {name: {k: percentiles(v) for k, v in st.items()} for name, st in lat.items()}


def measure_steps(defender: Any, steps: int, batch: int, iters: int, warmup: int, *, gap_ms: float = 5.0,
                  scan_size: int = 256, tick: Callable[[], None] | None = None) -> dict[str, dict[str, float]]:
    """The purified path of one Defender with its sampler run for ``steps`` DDIM steps instead of the
    bundle's K (the same network, the same keyed noise): what the purify stage costs at another step
    count. The engine's step count is restored afterwards."""
    if steps < 1:
        raise ValueError(f"steps={steps}: need at least one sampling step")
    engine = defender.engine
    saved = engine.steps
    engine.steps = int(steps)
    try:
        return measure({"x": defender}, "purified", batch, iters, warmup, gap_ms=gap_ms, scan_size=scan_size,
                       tick=tick)["x"]
    finally:
        engine.steps = saved
