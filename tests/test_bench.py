"""``medfedpure bench``: the report's keys and numbers, skipped backends, refusals, and a torch-free run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from medfedpure.bench.latency import STAGES, baseline_for, parse_spec, percentiles, synthetic_scans
from medfedpure.bench.run import BenchConfig, run_bench, teacher_steps
from tiny_bundle import cached_tiny_bundle
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny() -> Path:
    return cached_tiny_bundle()


@pytest.fixture(scope="module")
def quick(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    """``medfedpure bench --quick`` on the tiny bundle (onnxruntime + torch on the CPU, and a CUDA spec)."""
    from medfedpure.cli import app

    out = tmp_path_factory.mktemp("bench")
    r = CliRunner().invoke(app, ["bench", "--quick", "--bundle", str(tiny), "--backends",
                                 "onnxruntime,torch,torch:fp16@cuda", "--iters", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return json.loads((out / "bench.json").read_text()), out, r.output


def test_quick_report_keys_and_order_of_percentiles(quick: tuple[dict, Path, str], tiny: Path) -> None:
    rep, out, _ = quick
    for k in ("bundle", "environment", "config", "backends", "skipped", "results", "baseline",
              "ratio_vs_torch_eager_fp32", "throughput_scans_per_s", "teacher_reference", "plot", "wall_s"):
        assert k in rep, k
    names = set(rep["results"])
    assert names == {"onnxruntime cpu fp32", "torch cpu fp32"}
    for name in names:
        for path in ("early_exit", "purified"):
            assert set(rep["results"][name][path]) == {"1", "8"}
            for r in rep["results"][name][path].values():
                assert set(r) == set(STAGES)
                for st in r.values():
                    assert 0 <= st["p50"] <= st["p90"] <= st["p99"] and st["n"] == 3
                assert r["total"]["p50"] > 0
        assert rep["results"][name]["early_exit"]["8"]["purify"]["p50"] == 0.0  # nothing purified on that path
        assert rep["results"][name]["purified"]["8"]["purify"]["p50"] > 0
    env = rep["environment"]
    assert env["bundle_id"] == rep["bundle"]["id"] and env["threads"]["requested"] == 2
    assert env["python"] and env["numpy"] and env["onnxruntime"] and env["cpu_count"] >= 1


def test_quick_ratios_throughput_and_plot(quick: tuple[dict, Path, str]) -> None:
    rep, out, _ = quick
    res = rep["results"]
    assert rep["baseline"] == {"onnxruntime cpu fp32": "torch cpu fp32", "torch cpu fp32": "torch cpu fp32"}
    ratio = rep["ratio_vs_torch_eager_fp32"]
    assert ratio["torch cpu fp32"]["purified"]["8"] == 1.0
    want = res["torch cpu fp32"]["early_exit"]["1"]["total"]["p50"] / res["onnxruntime cpu fp32"]["early_exit"]["1"][
        "total"]["p50"]
    assert ratio["onnxruntime cpu fp32"]["early_exit"]["1"] == pytest.approx(want)
    for name, per_path in rep["throughput_scans_per_s"].items():
        for path, v in per_path.items():
            assert v > 0 and v == pytest.approx(8 / (res[name][path]["8"]["total"]["p50"] / 1e3))
    assert rep["plot"] == str(out / "bench.png")
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_teacher_row_and_skipped_cuda(quick: tuple[dict, Path, str]) -> None:
    rep, _, output = quick
    ref = rep["teacher_reference"]
    assert ref["steps"] >= 1 and ref["student_steps"] == rep["bundle"]["steps"]
    assert "teacher's weights are not in the bundle" in ref["label"] and str(ref["steps"]) in ref["label"]
    for r in ref["rows"].values():
        assert r["purify"]["p50"] > 0 and r["total"]["p50"] > 0
    import torch

    if not torch.cuda.is_available():
        assert "torch:fp16@cuda" in rep["skipped"] and "CUDA" in rep["skipped"]["torch:fp16@cuda"]
        assert "skipped" in output
    assert "early-exit path" in output and "purified path" in output


def test_architecture_timing_at_another_size(tiny: Path) -> None:
    rep = run_bench(BenchConfig(bundle=str(tiny), backends=("torch",), batches=(2,), sizes=(48,), iters=2,
                                warmup=0, teacher=False), show_progress=False)
    arch = rep["architecture"]
    assert arch["label"] == "architecture timing, not the bundle's weights"
    r = arch["sizes"]["48"]["torch cpu fp32"]["2"]
    assert set(r) == {"mae", "gate", "purify", "classify", "total"}
    assert r["total"]["p50"] >= r["purify"]["p50"] > 0
    assert rep["results"] == {"torch cpu fp32": {"early_exit": {}, "purified": {}}}  # the bundle's size left out


@pytest.mark.parametrize("spec", ["cuda", "onnxruntime:int8", "torch@tpu", "onnxruntime/fast", "onnx"])
def test_unknown_backend_is_a_usage_error(tiny: Path, tmp_path: Path, spec: str) -> None:
    from medfedpure.cli import app

    r = CliRunner().invoke(app, ["bench", "--quick", "--bundle", str(tiny), "--backends", f"onnxruntime,{spec}",
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "error:" in r.output and ("backend" in r.output)
    assert not (tmp_path / "o" / "bench.json").exists()  # refused before measuring anything


def test_bad_lists_and_a_bundle_that_fails_verification(tiny: Path, tmp_path: Path) -> None:
    from medfedpure.cli import app

    r = CliRunner().invoke(app, ["bench", "--batches", "1,x", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "comma list of integers" in r.output
    r = CliRunner().invoke(app, ["bench", "--bundle", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "does not exist" in r.output
    with pytest.raises(ValueError, match="batches"):
        BenchConfig(batches=(0,))
    with pytest.raises(ValueError, match="no backend could run"):
        run_bench(BenchConfig(bundle=str(tiny), backends=("tensorrt@cuda",)), show_progress=False)


def test_spec_parsing_and_baseline() -> None:
    s = parse_spec("torch:fp16@cuda/eager/seq")
    assert (s.backend, s.device, dict(s.options), s.sequential) == ("torch", "cuda", {"precision": "fp16",
                                                                                      "cuda_graphs": False}, True)
    names = ["torch cuda fp16 graphs", "torch cuda fp32", "torch cpu fp32", "onnxruntime cpu fp32"]
    assert baseline_for("torch cuda fp16 graphs", names) == "torch cuda fp32"
    assert baseline_for("onnxruntime cpu fp32", names) == "torch cpu fp32"
    assert baseline_for("onnxruntime cpu fp32", ["onnxruntime cpu fp32"]) is None
    p = percentiles([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (p["p50"], p["n"]) == (3.0, 5) and p["p50"] <= p["p90"] <= p["p99"] <= 5.0


def test_teacher_steps_from_provenance() -> None:
    assert teacher_steps({"metrics": {"phases": {"student": {"teacher_steps": 40}}}}) == (
        40, "the bundle's provenance (teacher_steps)")
    n, why = teacher_steps({"run": "r"})
    assert n == 20 and "not recorded" in why


def test_synthetic_scans_are_valid_and_deterministic() -> None:
    from medfedpure.scan import load_scan

    a, b = synthetic_scans(3, 64, seed=1), synthetic_scans(3, 64, seed=1)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert a[0].dtype.name == "uint8" and a[0].shape == (64, 64) and 0 < a[0].mean() < 255
    load_scan(a[0])  # passes the loader's validation


def test_bench_runs_without_torch(tiny: Path, tmp_path: Path) -> None:
    """The core install has no torch: bench --quick --backends onnxruntime runs with torch blocked and says so."""
    code = f"""
import sys, json
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked")
import importlib.util
real = importlib.util.find_spec
importlib.util.find_spec = lambda n, *a: None if n == "torch" else real(n, *a)
sys.meta_path.insert(0, Block())
from medfedpure.cli import app
try:
    app(["bench", "--quick", "--iters", "2", "--bundle", {str(tiny)!r}, "--out", {str(tmp_path)!r}])
except SystemExit as e:
    assert e.code in (0, None), e.code
rep = json.load(open({str(tmp_path / "bench.json")!r}))
assert "torch" not in sys.modules
assert set(rep["results"]) == {{"onnxruntime cpu fp32"}}
assert "torch is not installed" in rep["ratio_note"] and rep["ratio_vs_torch_eager_fp32"] == {{}}
assert "torch is not installed" in rep["skipped"]["torch"]
print("bench without torch")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "bench without torch" in out.stdout
