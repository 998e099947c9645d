"""Benchmark of the fused patch gate (docs/design.md, "Gate semantics"; results in
benchmarks/RESULTS.md, "Gate and detector").

CPU (default): the C++ kernel (bare binding, and through ``medfedpure.gate.patch_gate``) against the
same computation as a chain of torch ops (``patch_gate_torch(validate=False)``), for every stat
(mean, topk k = 16, hfratio m = Np/2) x patch (8, 16) x size x batch, K = 4 complementary mask sets
(each patch hidden by 3 of 4, an MAE at 75 % masking), torch and C++ on ``--threads`` threads. The
three calls alternate round-robin inside every repetition, so a noisy, shared machine slows them
alike; ``patch_gate(auto)`` is the call with its default ``num_threads=0`` (the thread count chosen
from the work size). Each configuration keeps the medians over ``--reps`` repetitions, and the whole sweep is
repeated ``--runs`` times (the table shows every run's ratio and the smallest). Every row is also
checked bit for bit against the numpy oracle.

GPU (``--device cuda``): the CUDA kernel (bare launch with preallocated outputs, and through
``patch_gate``), the torch-op chain and an empty kernel launch (the floor), each timed with CUDA
events around ``--inner`` back-to-back calls after warm-up, median over ``--reps`` (host launch
cost included, as a caller sees it); and the same calls captured in a CUDA graph and replayed
(the GPU work alone).

    python benchmarks/kernel.py --sizes 128 --batches 1 4 8 --threads 2   # CPU → results/kernel_cpu.json
    python benchmarks/kernel.py --device cuda --out $OUT/kernel_gpu.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from medfedpure import gate as ops
from medfedpure.gate import dispatch
from rich.console import Console
from rich.table import Table

console = Console(width=150)
HERE = Path(__file__).resolve().parent


def make_inputs(batch: int, size: int, sets: int, patch: int, dtype: str, seed: int):
    """x [B,S,S] in [0,1), recon = x + noise [B,K,S,S], complementary visible sets [K,Np]."""
    rng = np.random.default_rng(seed)
    x = rng.random((batch, size, size), dtype=np.float32)
    recon = x[:, None] + np.float32(0.1) * rng.standard_normal((batch, sets, size, size), dtype=np.float32)
    n = (size // patch) ** 2
    visible = np.zeros((sets, n), bool)
    for k, group in enumerate(np.array_split(rng.permutation(n), sets)):
        visible[k, group] = True  # set k shows group k: every patch is hidden by K-1 sets
    return x.astype(dtype), recon.astype(dtype), visible


def gate_kwargs(patch: int, stat: str, topk: int) -> dict:
    return dict(patch=patch, stat=stat, topk=topk, norm_pix=False, tau=0.01, tau_high=0.02, t_min=10, t_max=100)


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    except (OSError, subprocess.CalledProcessError):
        info["cpu_model"] = platform.processor()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda_runtime_ext"] = dispatch._C_cuda.runtime_version() if dispatch._C_cuda else None
    return info


def time_round_robin(methods: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, float]:
    """Median wall time in microseconds of each method, all methods once per repetition, the order
    cycling through every permutation: each method follows each other one equally often (a torch
    call's worker threads keep spinning for a while after it returns and slow whatever runs next)."""
    names = list(methods)
    orders = list(itertools.permutations(names))
    for _ in range(warmup):
        for n in names:
            methods[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in orders[r % len(orders)]:
            t0 = time.perf_counter()
            methods[n]()
            samples[n].append((time.perf_counter() - t0) * 1e6)
    return {n: statistics.median(v) for n, v in samples.items()}


def cpu_configs(args: argparse.Namespace) -> list[tuple[int, int, str, int, int]]:
    """(size, batch, stat, patch, topk) of the CPU table: every stat x patch x size x batch."""
    stats = [s for s in args.cpu_stats if not (args.no_hfratio and s == "hfratio")]
    topk = args.topk if args.topk >= 1 else 16
    return [(size, batch, stat, patch, topk if stat == "topk" else 0)
            for stat in stats for patch in args.cpu_patches for size in args.sizes for batch in args.batches]


def bench_cpu(args: argparse.Namespace) -> dict:
    """The C++ kernel (bare binding and ``patch_gate()``) against the torch-op chain, interleaved
    round-robin inside every repetition (a shared machine slows all three alike), the whole sweep
    repeated ``--runs`` times; each row keeps the medians and ratios of every run. The numpy oracle
    runs once per configuration for the bit-equality check (timed only with ``--time-reference``)."""
    torch.set_num_threads(args.threads)
    configs = cpu_configs(args)
    rows: list[dict] = []
    for size, batch, stat, patch, topk in configs:
        rows.append({"size": size, "batch": batch, "sets": args.sets, "patch": patch, "stat": stat, "topk": topk,
                     "runs": []})
    for run in range(args.runs):
        for row in rows:
            size, batch, stat, patch, topk = row["size"], row["batch"], row["stat"], row["patch"], row["topk"]
            x, recon, vis = make_inputs(batch, size, args.sets, patch, "float32", seed=batch * 1000 + size)
            kw = gate_kwargs(patch, stat, topk)
            xt, rt, vt = torch.from_numpy(x), torch.from_numpy(recon), torch.from_numpy(vis)
            code = ops.STATS[stat]

            def bare(x=x, recon=recon, vis=vis, kw=kw, code=code, threads=args.threads):
                return dispatch._C.patch_gate(x, recon, vis, patch=kw["patch"], stat=code, topk=kw["topk"],
                                              norm_pix=False, tau=kw["tau"], tau_high=kw["tau_high"], t_min=10,
                                              t_max=100, floor=False, num_threads=threads)

            methods = {
                "cpp_kernel": bare,
                "cpp_patch_gate": lambda x=x, recon=recon, vis=vis, kw=kw: ops.patch_gate(
                    x, recon, vis, num_threads=args.threads, **kw),
                "cpp_patch_gate_auto": lambda x=x, recon=recon, vis=vis, kw=kw: ops.patch_gate(x, recon, vis, **kw),
                "torch_chain": lambda xt=xt, rt=rt, vt=vt, kw=kw: ops.patch_gate_torch(xt, rt, vt, validate=False, **kw),
            }
            if args.time_reference:
                methods["numpy_reference"] = lambda x=x, recon=recon, vis=vis, kw=kw: ops.patch_gate_reference(
                    x, recon, vis, **kw)
            reps = args.reps if size * size * batch <= 224 * 224 * 8 else max(5, args.reps // 4)
            med = time_round_robin(methods, reps=reps, warmup=args.warmup)
            ref = ops.patch_gate_reference(x, recon, vis, return_patch_err=True, **kw)
            got = bare()
            via = ops.patch_gate(x, recon, vis, num_threads=args.threads, return_patch_err=True, **kw)
            tch = methods["torch_chain"]()
            bit_equal = all(np.array_equal(a, b) for a, b in zip(got, ref, strict=True)) and all(
                np.array_equal(a, b) for a, b in zip(via, ref, strict=True))
            row["runs"].append({
                "reps": reps, "load_avg_1m": os.getloadavg()[0], "us": med,
                "torch_over_cpp_kernel": med["torch_chain"] / med["cpp_kernel"],
                "torch_over_cpp_patch_gate": med["torch_chain"] / med["cpp_patch_gate"],
                "torch_over_cpp_patch_gate_auto": med["torch_chain"] / med["cpp_patch_gate_auto"],
                "cpp_equals_reference_bitwise": bool(bit_equal),
                "torch_max_rel_err": float(np.max(np.abs(tch.score.numpy() / ref.score - 1))),
            })
            console.log(f"run {run + 1}/{args.runs} {stat} P={patch} S={size} B={batch}: "
                        + ", ".join(f"{k} {v:.0f} us" for k, v in med.items()))
    for row in rows:
        for key in ("torch_over_cpp_patch_gate", "torch_over_cpp_patch_gate_auto"):
            ratios = [r[key] for r in row["runs"]]
            row[f"{key}_min"] = min(ratios)
            row[f"{key}_median"] = statistics.median(ratios)
        row["cpp_equals_reference_bitwise"] = all(r["cpp_equals_reference_bitwise"] for r in row["runs"])
    table = Table(title=f"patch gate on CPU ({args.threads} thread(s) for torch and C++; K={args.sets}; "
                        f"medians of {args.reps} interleaved reps; {args.runs} runs)")
    for col in ("stat", "P", "S", "B", "C++ kernel µs", "patch_gate() µs", "patch_gate(auto) µs", "torch chain µs",
                "torch / C++", "torch / patch_gate()", "min", "torch / patch_gate(auto)", "min", "bit-equal"):
        table.add_column(col, justify="right")

    def per_run(row: dict, key: str) -> str:
        return " / ".join(f"{r['us'][key]:.0f}" for r in row["runs"])

    for r in rows:
        table.add_row(r["stat"], str(r["patch"]), str(r["size"]), str(r["batch"]), per_run(r, "cpp_kernel"),
                      per_run(r, "cpp_patch_gate"), per_run(r, "cpp_patch_gate_auto"), per_run(r, "torch_chain"),
                      " / ".join(f"{x['torch_over_cpp_kernel']:.1f}×" for x in r["runs"]),
                      " / ".join(f"{x['torch_over_cpp_patch_gate']:.1f}×" for x in r["runs"]),
                      f"{r['torch_over_cpp_patch_gate_min']:.1f}×",
                      " / ".join(f"{x['torch_over_cpp_patch_gate_auto']:.1f}×" for x in r["runs"]),
                      f"{r['torch_over_cpp_patch_gate_auto_min']:.1f}×",
                      "yes" if r["cpp_equals_reference_bitwise"] else "NO")
    console.print(table)
    return {"device": "cpu", "threads": args.threads, "runs": args.runs, "simd": bool(dispatch._C.SIMD), "rows": rows}


def cuda_time(fn: Callable[[], object], inner: int, reps: int, warmup: int) -> float:
    """Median microseconds per call: CUDA events around `inner` back-to-back calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    per_call = []
    for _ in range(reps):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) * 1e3 / inner)
    return statistics.median(per_call)


def graph_time(launch: Callable[[int], object], inner: int, reps: int) -> float | None:
    """Median microseconds per call of the GPU work alone: `inner` calls captured in a CUDA graph
    (launch(stream) gets the capture stream), the graph replayed between CUDA events. None when
    capture fails."""
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            stream = torch.cuda.current_stream().cuda_stream
            for _ in range(inner):
                launch(stream)
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        per_call = []
        for _ in range(reps):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            per_call.append(start.elapsed_time(end) * 1e3 / inner)
        return statistics.median(per_call)
    except Exception as exc:  # noqa: BLE001 - report and carry on: the eager timings still stand
        console.log(f"CUDA graph capture failed: {exc!r}")
        return None


def bench_cuda(args: argparse.Namespace) -> dict:
    if not torch.cuda.is_available() or dispatch._C_cuda is None:
        raise SystemExit("--device cuda needs a CUDA GPU and the compiled medfedpure._C_cuda")
    dev = torch.device("cuda")
    rows = []
    for dtype in args.dtypes:
        for size in args.sizes:
            for batch in args.batches:
                x, recon, vis = make_inputs(batch, size, args.sets, args.patch, dtype, seed=batch * 1000 + size)
                kw = gate_kwargs(args.patch, args.stat, args.topk)
                xd, rd = torch.from_numpy(x).to(dev), torch.from_numpy(recon).to(dev)
                vd = torch.from_numpy(vis).to(dev)
                vis_u8 = torch.from_numpy(vis.astype(np.uint8)).to(dev)
                n = vis.shape[1]
                score = torch.empty(batch, device=dev)
                flag = torch.empty(batch, dtype=torch.bool, device=dev)
                t_star = torch.empty(batch, dtype=torch.int32, device=dev)
                err = torch.empty(batch, n, device=dev)
                counters = torch.zeros(batch, dtype=torch.int32, device=dev)
                work = torch.empty(batch, n, device=dev)  # hfratio's scratch (unused by the other stats)
                stream = torch.cuda.current_stream().cuda_stream
                dcode = 1 if dtype == "float16" else 0
                ptrs = (xd.data_ptr(), rd.data_ptr(), vis_u8.data_ptr())
                # positional, in the binding's order: what an engine would pass per launch
                call = (ptrs[0], dcode, ptrs[1], dcode, ptrs[2], batch, args.sets, size, kw["patch"],
                        ops.STATS[kw["stat"]], kw["topk"], False, kw["tau"], kw["tau_high"], 10, 100, False,
                        score.data_ptr(), flag.data_ptr(), t_star.data_ptr(), err.data_ptr(),
                        counters.data_ptr(), stream, work.data_ptr())

                def bare(call=call):
                    code = dispatch._C_cuda.patch_gate(*call)
                    assert code == 0, dispatch._C_cuda.error_string(code)

                methods = {
                    "empty_launch": lambda stream=stream: dispatch._C_cuda.empty_launch(stream),
                    "cuda_kernel": bare,
                    "cuda_patch_gate": lambda xd=xd, rd=rd, vis=vis, kw=kw: ops.patch_gate(xd, rd, vis, **kw),
                    "torch_chain": lambda xd=xd, rd=rd, vd=vd, kw=kw: ops.patch_gate_torch(xd, rd, vd, validate=False, **kw),
                }
                med = {k: cuda_time(f, args.inner, args.reps, args.warmup) for k, f in methods.items()}

                def bare_on(stream: int, call=call) -> None:
                    code = dispatch._C_cuda.patch_gate(*call[:-2], stream, call[-1])
                    assert code == 0, dispatch._C_cuda.error_string(code)

                graph = {
                    "empty_launch": graph_time(lambda st: dispatch._C_cuda.empty_launch(st), args.inner, args.reps),
                    "cuda_kernel": graph_time(bare_on, args.inner, args.reps),
                    "torch_chain": graph_time(lambda st, f=methods["torch_chain"]: f(), args.inner, args.reps),
                }
                bare()
                ref = ops.patch_gate_reference(x, recon, vis, **kw)
                same = bool(np.array_equal(score.cpu().numpy(), ref.score))
                rows.append({
                    "dtype": dtype, "size": size, "batch": batch, "sets": args.sets, "patch": args.patch,
                    "stat": args.stat, "us": med, "graph_us": graph,
                    "kernel_over_empty": med["cuda_kernel"] / med["empty_launch"],
                    "graph_kernel_over_empty": (graph["cuda_kernel"] / graph["empty_launch"]
                                                if graph["cuda_kernel"] and graph["empty_launch"] else None),
                    "torch_over_kernel": med["torch_chain"] / med["cuda_kernel"],
                    "torch_over_patch_gate": med["torch_chain"] / med["cuda_patch_gate"],
                    "cuda_equals_reference_bitwise": same,
                })
                console.log(f"{dtype} S={size} B={batch}: " + ", ".join(f"{k} {v:.2f} us" for k, v in med.items()))
    table = Table(title=f"patch gate on {torch.cuda.get_device_name()} (K={args.sets}, patch={args.patch}, stat={args.stat}; "
                        f"CUDA events, {args.inner} calls per sample)")
    for col in ("dtype", "S", "B", "empty µs", "kernel µs", "patch_gate() µs", "torch µs", "kernel / empty",
                "torch / kernel", "torch / patch_gate()", "graph: empty / kernel / torch µs", "bit-equal"):
        table.add_column(col, justify="right")

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    for r in rows:
        u, g = r["us"], r["graph_us"]
        table.add_row(r["dtype"], str(r["size"]), str(r["batch"]), f"{u['empty_launch']:.2f}", f"{u['cuda_kernel']:.2f}",
                      f"{u['cuda_patch_gate']:.2f}", f"{u['torch_chain']:.2f}", f"{r['kernel_over_empty']:.2f}×",
                      f"{r['torch_over_kernel']:.1f}×", f"{r['torch_over_patch_gate']:.1f}×",
                      f"{fmt(g['empty_launch'])} / {fmt(g['cuda_kernel'])} / {fmt(g['torch_chain'])}",
                      "yes" if r["cuda_equals_reference_bitwise"] else "NO")
    console.print(table)
    return {"device": "cuda", "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 32])
    p.add_argument("--sets", type=int, default=4, help="K mask sets")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--stat", choices=sorted(ops.STATS), default="mean")
    p.add_argument("--topk", type=int, default=0)
    p.add_argument("--dtypes", nargs="+", default=["float16", "float32"], help="GPU input dtypes")
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--inner", type=int, default=50, help="GPU: calls per CUDA-event sample")
    p.add_argument("--threads", type=int, default=1, help="CPU: torch and C++ threads")
    p.add_argument("--no-hfratio", action="store_true", help="CPU: leave out the stat='hfratio' rows")
    p.add_argument("--cpu-stats", nargs="+", choices=sorted(ops.STATS), default=["mean", "topk", "hfratio"],
                   help="CPU: the statistics of the table (topk uses --topk, or 16 when it is 0)")
    p.add_argument("--cpu-patches", type=int, nargs="+", default=[8, 16], help="CPU: patch sizes of the table")
    p.add_argument("--runs", type=int, default=3, help="CPU: repeat the whole interleaved sweep this many times")
    p.add_argument("--time-reference", action="store_true", help="CPU: time the numpy oracle too (slow)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.stat == "topk" and args.topk < 1:
        p.error("--stat topk needs --topk >= 1")
    load_start = os.getloadavg()[0]
    result = bench_cuda(args) if args.device == "cuda" else bench_cpu(args)
    result.update(load_avg_1m_start=load_start, machine=machine(), args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    out = args.out or HERE / "results" / f"kernel_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
