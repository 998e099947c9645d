"""Benchmarks of a bundle on this machine: ``medfedpure bench``.

Runs bundles only (like the service): it imports the runtime, the gate and the models, never
training, federation, evaluation, export or the bundle build; torch is optional and imported only
inside the functions that use it. :func:`run_bench` measures, :func:`medfedpure.bench.report.tables`
and :func:`medfedpure.bench.report.plot` present.
"""

from __future__ import annotations

from medfedpure.bench.latency import BackendSpec, parse_spec, synthetic_scans
from medfedpure.bench.run import BenchConfig, run_bench

__all__ = ["BackendSpec", "BenchConfig", "parse_spec", "run_bench", "synthetic_scans"]
