"""``medfedpure bench``: the latency and throughput of a bundle on this machine, in one report.

:func:`run_bench` loads the bundle once per backend, measures the early-exit and purified paths
per backend × batch (interleaved: :func:`medfedpure.bench.latency.measure`), and adds

- the ratio of each backend's p50 to torch eager FP32's on the same device, path and batch, measured
  in the same run (absent, and said so, when torch is not installed);
- throughput in scans/s at batch 8 (batch ÷ p50 of a call);
- a reference row for the many-step teacher sampler: the purified path with the sampler run at the
  teacher's step count (from the bundle's provenance) — what distillation buys. The bundle ships
  only the distilled student, so the row times the student's network at the teacher's step count
  and says so;
- with ``sizes`` other than the bundle's: the bundle's architectures at that size with fresh
  weights (:mod:`medfedpure.bench.arch`), labelled as such;
- the environment (:func:`medfedpure.bench.env.environment`).

GPU backends (torch FP16 + CUDA graphs + the CUDA gate, torch FP32 eager as its baseline,
onnxruntime's CUDA provider) are in the default list; where CUDA is absent they are reported as
skipped with the reason, as is any backend that cannot start here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medfedpure.bench.env import cuda_available, environment, torch_available
from medfedpure.bench.latency import PATHS, BackendSpec, baseline_for, measure, measure_steps, parse_spec

__all__ = ["CPU_BACKENDS", "DEFAULT_TEACHER_STEPS", "GPU_BACKENDS", "THROUGHPUT_BATCH", "BenchConfig",
           "row_name", "run_bench", "teacher_steps"]

CPU_BACKENDS = ("onnxruntime", "torch")
GPU_BACKENDS = ("torch:fp16@cuda", "torch:fp32@cuda/eager", "onnxruntime@cuda")
THROUGHPUT_BATCH = 8
#: the distillation's default teacher step count, used when the bundle does not record its own
DEFAULT_TEACHER_STEPS = 20
TEACHER_LABEL = ("student network at the teacher's step count ({n} steps): the teacher's weights are not in "
                 "the bundle")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to measure.

    Attributes:
        bundle: bundle folder (None: the embedded default bundle).
        backends: backend specs (``backend[:precision][@device][/seq][/eager]``); None: the CPU
            backends plus the GPU ones (skipped where there is no CUDA).
        batches: batch sizes per call. sizes: image sizes; the bundle's own size runs the bundle,
            any other the architectures with fresh weights (empty: the bundle's size only).
        iters, warmup: timed and untimed calls per backend, path and batch.
        threads: inference threads per backend (0: the runtime's default).
        gap_ms: idle time before each call. teacher: measure the teacher-sampler reference row.
        allow_unsigned: accept a bundle that no trusted key signed.
        trusted_keys: public keys (PEM paths) trusted besides the shipped ones and ``MEDFEDPURE_TRUSTED_KEYS``.
        expected_id: pin the bundle id (its full sha256 or a prefix of at least 16 hex digits); a
            different bundle is refused before anything is timed.
    """

    bundle: str | None = None
    backends: tuple[str, ...] | None = None
    batches: tuple[int, ...] = (1, 4, 8)
    sizes: tuple[int, ...] = ()
    paths: tuple[str, ...] = PATHS
    iters: int = 30
    warmup: int = 3
    threads: int = 2
    gap_ms: float = 5.0
    teacher: bool = True
    teacher_iters: int = 5
    allow_unsigned: bool = False
    trusted_keys: tuple[str, ...] = ()
    expected_id: str | None = None

    def __post_init__(self) -> None:
        if not self.batches or any(b < 1 for b in self.batches):
            raise ValueError(f"batches={self.batches}: expected one or more sizes >= 1")
        if any(s < 8 for s in self.sizes):
            raise ValueError(f"sizes={self.sizes}: expected image sizes >= 8 px")
        if not self.paths or set(self.paths) - set(PATHS):
            raise ValueError(f"paths={self.paths}: expected some of {PATHS}")
        if self.iters < 1 or self.warmup < 0 or self.teacher_iters < 1:
            raise ValueError(f"iters={self.iters}, warmup={self.warmup}, teacher_iters={self.teacher_iters}: "
                             "expected iters >= 1, warmup >= 0, teacher_iters >= 1")
        if self.threads < 0 or self.gap_ms < 0:
            raise ValueError(f"threads={self.threads}, gap_ms={self.gap_ms}: expected values >= 0")
        if self.backends is not None and not self.backends:
            raise ValueError("backends=(): name at least one backend, or None for the defaults")

    @classmethod
    def quick(cls, **kw: Any) -> BenchConfig:
        """A short run (under a minute on two cores for the default bundle): batches 1 and 8, few iterations."""
        return cls(**{"batches": (1, THROUGHPUT_BATCH), "iters": 5, "warmup": 1, "teacher_iters": 2, **kw})

    def specs(self) -> list[BackendSpec]:
        """The parsed backend specs (ValueError on an unknown backend, device or precision)."""
        names = self.backends if self.backends is not None else CPU_BACKENDS + GPU_BACKENDS
        return [parse_spec(s) for s in names]


def row_name(info: Mapping[str, Any], spec: BackendSpec) -> str:
    """``"backend device precision[ graphs][ sequential]"`` from an engine's ``describe()``."""
    return (f"{info['backend']} {info['device']} {info['precision']}" + (" graphs" if info.get("cuda_graphs") else "")
            + (" sequential" if spec.sequential else ""))


def _find_key(obj: Any, key: str) -> Any:
    if isinstance(obj, Mapping):
        if key in obj:
            return obj[key]
        for v in obj.values():
            found = _find_key(v, key)
            if found is not None:
                return found
    return None


def teacher_steps(provenance: Mapping[str, Any]) -> tuple[int, str]:
    """The teacher's DDIM step count and where it came from: the first ``teacher_steps`` recorded
    anywhere in the bundle's provenance, else :data:`DEFAULT_TEACHER_STEPS` (said so)."""
    v = _find_key(provenance, "teacher_steps")
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
        return v, "the bundle's provenance (teacher_steps)"
    return DEFAULT_TEACHER_STEPS, ("not recorded in the bundle's provenance: the distillation's default "
                                   f"teacher step count ({DEFAULT_TEACHER_STEPS})")


def _skip_reason(spec: BackendSpec, cuda: Mapping[str, bool]) -> str | None:
    if spec.backend == "torch" and not torch_available():
        return "torch is not installed (pip install 'medfedpure[torch]')"
    if spec.device == "cuda":
        if spec.backend == "onnxruntime" and not cuda["onnxruntime"]:
            return "no CUDA: onnxruntime offers no CUDAExecutionProvider (install onnxruntime-gpu on a GPU machine)"
        if spec.backend != "onnxruntime" and not cuda["torch"]:
            return "no CUDA device visible to torch"
    return None


def _load(cfg: BenchConfig, bundle_path: str) -> tuple[dict[str, Any], dict[str, dict], dict[str, str],
                                                       dict[str, BackendSpec]]:
    from medfedpure.runtime.defender import Defender

    cuda = cuda_available()
    defenders: dict[str, Any] = {}
    describe: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    specs: dict[str, BackendSpec] = {}
    for spec in cfg.specs():
        why = _skip_reason(spec, cuda)
        if why is not None:
            skipped[spec.spec] = why
            continue
        try:
            d = Defender.load(bundle_path, spec.backend, spec.device, allow_unsigned=cfg.allow_unsigned,
                              trusted_keys=list(cfg.trusted_keys) or None, overlap=False if spec.sequential else None, threads=cfg.threads, **spec.options)
        except (ImportError, RuntimeError, ValueError) as e:  # EngineError is a RuntimeError
            skipped[spec.spec] = f"{type(e).__name__}: {e}"
            continue
        info = {**d.engine.describe(), "overlap": d.overlap}
        name = row_name(info, spec)
        if name in defenders:
            skipped[spec.spec] = f"same engine as {name!r}"
            d.close()
            continue
        defenders[name], describe[name], specs[name] = d, info, spec
    return defenders, describe, skipped, specs


def run_bench(cfg: BenchConfig, out: str | os.PathLike[str] | None = None, *,
              show_progress: bool = True) -> dict[str, Any]:
    """Measure, and write ``bench.json`` (and ``bench.png``) to ``out`` when given; returns the report.

    Raises:
        ValueError: an unknown backend spec (before anything is loaded), or no backend could run.
        BundleError: the bundle fails verification.
    """
    from medfedpure.progress import progress
    from medfedpure.runtime.bundle import default_bundle_path, verify_bundle

    specs = cfg.specs()  # an unknown backend fails here, before any load
    bundle_path = cfg.bundle or str(default_bundle_path())
    vb = verify_bundle(bundle_path, expected_id=cfg.expected_id, allow_unsigned=cfg.allow_unsigned,
                       trusted_keys=list(cfg.trusted_keys) or None)
    t_start = time.perf_counter()
    defenders, describe, skipped, spec_of = _load(cfg, bundle_path)
    if not defenders:
        raise ValueError("no backend could run here: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())
                         + f" (asked for {[s.spec for s in specs]})")
    size = vb.image_size
    sizes = cfg.sizes or (size,)
    other_sizes = [s for s in sizes if s != size]
    n_teacher = (cfg.warmup + cfg.teacher_iters) * len(defenders) if cfg.teacher else 0
    torch_rows = [n for n in defenders if describe[n]["backend"] == "torch"]
    total = ((len(cfg.paths) * len(cfg.batches) * (cfg.warmup + cfg.iters) * len(defenders) if size in sizes else 0)
             + n_teacher + len(other_sizes) * len(cfg.batches) * len(torch_rows) * (cfg.warmup + cfg.iters))
    results: dict[str, dict[str, dict[str, Any]]] = {n: {p: {} for p in cfg.paths} for n in defenders}
    report: dict[str, Any] = {
        "schema": "medfedpure.bench/1",
        "bundle": {"path": str(bundle_path), "id": vb.bundle_id, "image_size": size,
                   "steps": vb.spec.purifier.steps, "num_timesteps": vb.spec.purifier.num_timesteps},
        "environment": environment(threads=cfg.threads, bundle_id=vb.bundle_id),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
        "backends": describe, "skipped": skipped,
    }
    with progress(total=total, desc="bench", unit="call", enabled=show_progress) as bar:
        tick = bar.update
        if size in sizes:
            for path in cfg.paths:
                for b in cfg.batches:
                    bar.set_description(f"bench {path} batch {b}")
                    m = measure(defenders, path, b, cfg.iters, cfg.warmup, gap_ms=cfg.gap_ms, tick=tick)
                    for name in defenders:
                        results[name][path][str(b)] = m[name]
        if cfg.teacher:
            n_steps, source = teacher_steps(vb.spec.provenance)
            bar.set_description(f"bench teacher reference ({n_steps} steps)")
            report["teacher_reference"] = {
                "steps": n_steps, "steps_source": source, "student_steps": vb.spec.purifier.steps, "batch": 1,
                "path": "purified", "label": TEACHER_LABEL.format(n=n_steps),
                "rows": {name: measure_steps(d, n_steps, 1, cfg.teacher_iters, cfg.warmup, gap_ms=cfg.gap_ms,
                                             tick=tick) for name, d in defenders.items()}}
        if other_sizes:
            report["architecture"] = _architectures(cfg, vb, other_sizes, describe, torch_rows, tick)
    for d in defenders.values():
        d.close()
    if size in sizes:
        _summaries(report, results, cfg)
    report["results"] = results
    report["wall_s"] = time.perf_counter() - t_start
    if out is not None:
        from medfedpure.bench.report import plot

        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        report["plot"] = plot(report, folder / "bench.png")
        (folder / "bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def _summaries(report: dict[str, Any], results: Mapping[str, Any], cfg: BenchConfig) -> None:
    names = list(results)
    base = {n: baseline_for(n, names) for n in names}
    report["baseline"] = base
    if not torch_available():
        report["ratio_note"] = ("torch is not installed: no torch eager FP32 baseline in this run, so the numbers "
                                "are absolute (no ratios)")
    elif not any(base.values()):
        report["ratio_note"] = "no torch eager FP32 backend ran: absolute numbers only"
    report["ratio_vs_torch_eager_fp32"] = {
        n: {p: {b: results[base[n]][p][b]["total"]["p50"] / r["total"]["p50"] for b, r in results[n][p].items()}
            for p in cfg.paths} for n in names if base[n]}
    tb = str(THROUGHPUT_BATCH)
    report["throughput_batch"] = THROUGHPUT_BATCH
    report["throughput_scans_per_s"] = {
        n: {p: THROUGHPUT_BATCH / (results[n][p][tb]["total"]["p50"] / 1e3) for p in cfg.paths if tb in results[n][p]}
        for n in names}
    if THROUGHPUT_BATCH not in cfg.batches:
        report["throughput_note"] = f"batch {THROUGHPUT_BATCH} was not measured (--batches): no throughput"


def _architectures(cfg: BenchConfig, vb: Any, sizes: list[int], describe: Mapping[str, dict],
                   torch_rows: list[str], tick: Any) -> dict[str, Any]:
    from medfedpure.bench.arch import ARCH_LABEL, ArchUnavailable, time_architecture

    out: dict[str, Any] = {"label": ARCH_LABEL, "sizes": {}, "skipped": {}}
    if not torch_rows:
        out["skipped"]["all"] = "no torch backend ran here (torch absent or skipped): no architecture timing"
        return out
    for s in sizes:
        rows: dict[str, Any] = {}
        for name in torch_rows:
            info = describe[name]
            try:
                rows[name] = {str(b): time_architecture(vb, s, device=info["device"], precision=info["precision"],
                                                        batch=b, iters=cfg.iters, warmup=cfg.warmup,
                                                        threads=cfg.threads, tick=tick) for b in cfg.batches}
            except ArchUnavailable as e:
                out["skipped"][f"{name} {s}"] = str(e)
        out["sizes"][str(s)] = rows
    return out
