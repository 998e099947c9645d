"""Defender latency per stage and end to end, per backend, early-exit and purified paths separately.

    .venv/bin/python benchmarks/latency.py [--bundle B] [--backends onnxruntime,onnxruntime/seq,torch] [--batches 1,4,8]
                                           [--iters 50] [--threads 2] [--out benchmarks/out/latency]

Paths: the gate's decision is what separates them, so each path is measured with the bundle's gate
forced one way — ``early_exit``: τ = +∞ (nothing flagged: MAE + gate + classifier), ``purified``:
τ = −∞ (everything flagged at t* = t_max: MAE + gate + K-step purifier + classifier). The work per
stage does not depend on the data (static shapes; K network calls whatever t*), so this measures
exactly the cost of each path. Inputs are 256×256 uint8 scans (so ``load`` and ``preprocess`` include
validation and the resize to the bundle's size). The backends are called in turn, one call each per
iteration, so that they share the machine's load. ``BACKEND/seq`` runs a backend with the Defender's
speculative overlap turned off (``Defender(overlap=False)``: the stages strictly one after another).

Output: a table (p50/p90/p99 ms per stage and total; ratio of each backend's p50 total against torch
eager FP32 on the same path and batch), ``latency.json`` and ``latency.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

STAGES = ("load", "preprocess", "mae", "gate", "purify", "classify", "total")


def _scans(n: int, seed: int = 0) -> list[np.ndarray]:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the fixtures' synthetic scans
    from tiny_bundle import tiny_scans

    return [(im[0] * 255).astype(np.uint8) for im in tiny_scans(n, seed, size=256)]


def _force(defender, path: str) -> None:
    import dataclasses

    g = defender.engine.gate_spec
    if path == "early_exit":
        g = dataclasses.replace(g, tau=3.0e38, tau_high=3.1e38, policy="adaptive")
    else:
        g = dataclasses.replace(g, tau=-3.0e38, tau_high=-2.9e38, policy="adaptive")  # t* saturates at t_max
    defender.engine.gate_spec = g


def parse_spec(spec: str, default_device: str) -> tuple[str, str, dict[str, object], bool]:
    """``backend[:precision][@device][/seq][/eager]`` → (backend, device, engine options, sequential).

    ``/seq`` turns the Defender's speculative overlap off; ``/eager`` turns CUDA graphs off (torch).
    """
    head, *flags = spec.strip().split("/")
    head, _, device = head.partition("@")
    backend, _, precision = head.partition(":")
    opts: dict[str, object] = {"precision": precision} if precision else {}
    unknown = set(flags) - {"seq", "eager"}
    if unknown or not backend:
        raise ValueError(f"backend spec {spec!r}: expected backend[:precision][@device][/seq][/eager]")
    if "eager" in flags:
        opts["cuda_graphs"] = False
    return backend, device or default_device, opts, "seq" in flags


def baseline_for(name: str, names: list[str]) -> str | None:
    """The row a speed-up is measured against: torch eager FP32 on the same device, else on the CPU."""
    device = name.split()[1]
    for want in (f"torch {device} fp32", "torch cpu fp32"):
        if want in names:
            return want
    return None


def measure(defenders: dict, path: str, batch: int, iters: int, warmup: int,
            gap_ms: float = 5.0) -> dict[str, dict[str, dict[str, float]]]:
    """Per-stage latency of each Defender on one path and batch, the Defenders called in turn.

    Interleaving (one call of each per iteration) puts every backend under the same machine load,
    so that the ratios between them hold on a shared, noisy machine. The order rotates every
    iteration and the calls are ``gap_ms`` apart, so that no backend always runs right after
    another one's still-spinning worker threads (torch's OpenMP pool spins for a while after a call);
    scans also reach a scanner workstation one by one, not back to back.
    """
    scans = _scans(batch)
    lat = {name: {k: [] for k in STAGES} for name in defenders}
    for d in defenders.values():
        _force(d, path)
    names = list(defenders)
    for i in range(warmup + iters):
        for name in names[i % len(names):] + names[:i % len(names)]:
            d = defenders[name]
            time.sleep(gap_ms / 1e3)
            rs = d.run_batch(scans, seeds=list(range(batch)))
            if not all(r.ok for r in rs):
                raise RuntimeError(f"{name} {path}: unverified results: {rs[0].reason}")
            want_flag = path == "purified"
            if any(r.flagged != want_flag for r in rs):
                raise RuntimeError(f"{name} {path}: the forced gate did not take")
            if i >= warmup:
                for k in STAGES:
                    lat[name][k].append(rs[0].latency_ms.get(k, 0.0))
    return {name: {k: {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)),
                       "p99": float(np.percentile(v, 99)), "mean": float(np.mean(v))} for k, v in st.items()}
            for name, st in lat.items()}


def _machine() -> dict[str, object]:
    info: dict[str, object] = {"platform": platform.platform(), "python": platform.python_version(),
                               "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    import onnxruntime

    info["onnxruntime"] = onnxruntime.__version__
    info["loadavg"] = os.getloadavg()
    return info


def _plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = ("early_exit", "purified")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, path in zip(axes, paths, strict=True):
        names = [k for k in res if path in res[k]]
        batches = sorted({int(b) for k in names for b in res[k][path]})
        w = 0.8 / max(len(names), 1)
        for j, name in enumerate(names):
            p50 = [res[name][path][str(b)]["total"]["p50"] for b in batches]
            p99 = [res[name][path][str(b)]["total"]["p99"] for b in batches]
            xs = np.arange(len(batches)) + j * w
            ax.bar(xs, p50, w, label=f"{name} p50")
            ax.errorbar(xs, p50, yerr=[np.zeros(len(p50)), np.array(p99) - np.array(p50)], fmt="none", c="k",
                        capsize=3)
        ax.set_xticks(np.arange(len(batches)) + w * (len(names) - 1) / 2, [f"batch {b}" for b in batches])
        ax.set_ylabel("end-to-end ms per call (p50, whisker p99)")
        ax.set_title(path.replace("_", "-"))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def agreement(bundle: str, data: str, site: str, split: str, threads: int, limit: int) -> dict[str, object]:
    """Top-1 agreement on a data split: torch vs onnxruntime Defenders (same seeds), and FP16 vs FP32 purifier.

    The purifier comparison forces t* (t_min and t_max) on every scan, purifies with the FP32 and the
    FP16 denoiser graph from identical keyed noise, and classifies both with the FP32 classifier.
    """
    from medfedpure.data import load_split
    from medfedpure.runtime.defender import Defender, purification_noise

    d_ort = Defender.load(bundle, "onnxruntime", "cpu", threads=threads)
    d_t = Defender.load(bundle, "torch", "cpu", threads=threads)
    xs, ys = [], []
    for k in str(site).split(","):
        for sp in split.split(","):
            xk, yk = load_split(data, int(k), sp, size=d_ort.image_size)
            xs.append(xk)
            ys.append(yk)
    x, y = np.ascontiguousarray(np.concatenate(xs)[:limit], np.float32), np.concatenate(ys)[:limit]
    seeds = list(range(len(x)))
    ro, rt = [], []
    for lo in range(0, len(x), 8):
        ro += d_ort.run_array(x[lo:lo + 8], seeds=seeds[lo:lo + 8])
        rt += d_t.run_array(x[lo:lo + 8], seeds=seeds[lo:lo + 8])
    lab_o = np.array([r.label for r in ro])
    lab_t = np.array([r.label for r in rt])
    classes = np.array(d_ort.classes)
    out: dict[str, object] = {
        "n": int(len(x)), "split": split, "site": site,
        "torch_vs_onnxruntime_top1": float((lab_o == lab_t).mean()),
        "flag_agreement": float(np.mean([a.flagged == b.flagged for a, b in zip(ro, rt, strict=True)])),
        "accuracy_onnxruntime": float((lab_o == classes[y]).mean()),
        "accuracy_torch": float((lab_t == classes[y]).mean()),
        "flag_rate": float(np.mean([r.flagged for r in ro])),
        "predicted_tumor_rate": float((lab_o == "tumor").mean()),
        # top-1 agreement is weak evidence when a classifier predicts mostly one class: also the probabilities
        "torch_vs_onnxruntime_max_abs_dp": float(max(abs(a.probabilities["tumor"] - b.probabilities["tumor"])
                                                     for a, b in zip(ro, rt, strict=True))),
    }
    e32 = d_ort.engine
    try:
        e16 = Defender.load(bundle, "onnxruntime", "cpu", precision="fp16", threads=threads).engine
    except Exception as e:  # noqa: BLE001
        out["fp16"] = f"not measured: {e}"
        return out
    noise = np.stack([purification_noise(s, d_ort.image_size) for s in seeds])
    g = d_ort.bundle.spec.gate
    for t in sorted({g.t_min, g.t_max} - {0}):
        agree, dp = [], []
        for lo in range(0, len(x), 8):
            xb, nb = x[lo:lo + 8], noise[lo:lo + 8]
            ts = np.full(len(xb), t, np.int64)
            pa = e32.classify(e32.purify(xb, ts, nb))
            pb = e32.classify(e16.purify(xb, ts, nb))
            agree.append(pa.argmax(1) == pb.argmax(1))
            dp.append(np.abs(pa - pb).max(axis=1))
        out[f"fp16_vs_fp32_purifier_top1_t{t}"] = float(np.concatenate(agree).mean())
        out[f"fp16_vs_fp32_purifier_max_abs_dp_t{t}"] = float(np.concatenate(dp).max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default=None, help="bundle folder (default: the embedded one)")
    ap.add_argument("--backends", default="onnxruntime,torch",
                    help="comma list of backend[:precision][@device][/seq][/eager], e.g. onnxruntime, "
                         "onnxruntime/seq, torch@cpu, torch:fp16@cuda, torch:fp32@cuda/eager, tensorrt@cuda")
    ap.add_argument("--device", default="cpu", help="device of the backends whose spec names none")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--paths", default="early_exit,purified")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gap-ms", type=float, default=5.0, help="idle time before each call (scans arrive one by one)")
    ap.add_argument("--out", default="benchmarks/out/latency")
    ap.add_argument("--agreement-data", default=None,
                    help="data root: instead of latency, measure torch-vs-onnxruntime and FP16-vs-FP32 agreement")
    ap.add_argument("--site", default="0", help="site(s) for --agreement-data, comma-separated")
    ap.add_argument("--split", default="test", help="split(s) for --agreement-data, comma-separated")
    ap.add_argument("--limit", type=int, default=400)
    args = ap.parse_args()
    if args.agreement_data:
        from medfedpure.runtime.bundle import default_bundle_path

        res = agreement(args.bundle or str(default_bundle_path()), args.agreement_data, args.site, args.split,
                        args.threads, args.limit)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "agreement.json").write_text(json.dumps(res, indent=2))
        print(json.dumps(res, indent=2))
        return

    from medfedpure.runtime.bundle import default_bundle_path
    from medfedpure.runtime.defender import Defender
    from rich.console import Console
    from rich.table import Table

    bundle = args.bundle or str(default_bundle_path())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    paths = args.paths.split(",")
    res: dict[str, dict] = {}
    describe: dict[str, dict] = {}
    defenders: dict = {}
    for spec in args.backends.split(","):
        try:
            backend, device, opts, seq = parse_spec(spec, args.device)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        try:
            d = Defender.load(bundle, backend, device, overlap=False if seq else None, threads=args.threads, **opts)
        except Exception as e:  # noqa: BLE001 - report what could not run and go on
            print(f"skip {spec}: {e}")
            continue
        info = {**d.engine.describe(), "overlap": d.overlap}
        name = (f"{info['backend']} {info['device']} {info['precision']}" + (" graphs" if info.get("cuda_graphs") else "")
                + (" sequential" if seq else ""))
        describe[name] = info
        defenders[name] = d
        res[name] = {path: {} for path in paths}
    for path in paths:
        for b in batches:
            t0 = time.perf_counter()
            m = measure(defenders, path, b, args.iters, args.warmup, args.gap_ms)
            for name in defenders:
                res[name][path][str(b)] = m[name]
            print(f"{path:10s} batch {b}: " + ", ".join(f"{n} p50 {m[n]['total']['p50']:.2f} ms" for n in m)
                  + f" ({time.perf_counter() - t0:.0f} s)")
    base = {name: baseline_for(name, list(res)) for name in res}
    console = Console(width=max(160, Console().width))
    for path in paths:
        t = Table(title=f"{path} — ms per call (p50 / p99); speed-up = torch eager FP32 p50 (same device) ÷ this p50")
        t.add_column("backend")
        t.add_column("batch")
        for s in STAGES:
            t.add_column(s)
        t.add_column("speed-up")
        for name in res:
            for b in batches:
                r = res[name][path][str(b)]
                ratio = (res[base[name]][path][str(b)]["total"]["p50"] / r["total"]["p50"]) if base[name] else float("nan")
                t.add_row(name, str(b), *[f"{r[s]['p50']:.2f}/{r[s]['p99']:.2f}" for s in STAGES], f"{ratio:.2f}×")
        console.print(t)
    report = {"bundle": bundle, "machine": _machine(), "threads": args.threads, "iters": args.iters, "gap_ms": args.gap_ms,
              "warmup": args.warmup, "engines": describe, "baseline": base, "results": res}
    report["speedup_vs_torch_eager_fp32_p50"] = {
        name: {path: {str(b): res[base[name]][path][str(b)]["total"]["p50"] / res[name][path][str(b)]["total"]["p50"]
                      for b in batches} for path in paths} for name in res if base[name]}
    (out / "latency.json").write_text(json.dumps(report, indent=2))
    _plot(res, out / "latency.png")
    print(f"wrote {out / 'latency.json'} and {out / 'latency.png'}")


if __name__ == "__main__":
    main()
