"""Why onnxruntime is < 2× torch eager on the purified path: the probes behind RESULTS.md ("Why the
purified path stays below 2×"). Each probe prints medians of interleaved calls (batch 1, 128 px).

    .venv/bin/python benchmarks/research/ort_purifier_probe.py profile      # ORT op-type profile of the bundle's UNet
    .venv/bin/python benchmarks/research/ort_purifier_probe.py variants     # UNet with / without GroupNorm, wider: ORT vs torch
    .venv/bin/python benchmarks/research/ort_purifier_probe.py int8         # static INT8 convolutions vs FP32 (ORT)
    .venv/bin/python benchmarks/research/ort_purifier_probe.py options      # optimisation level, batch fixed to 1
    .venv/bin/python benchmarks/research/ort_purifier_probe.py unshuffle    # UNet on polyphase sub-images (r = 1, 2, 4)

``--threads`` (default 2) sets ORT's intra-op threads and torch's threads alike.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
BUNDLE = Path(__file__).resolve().parents[2] / "sdk" / "medfedpure" / "bundles" / "default"


def session(model: str | bytes, threads: int, level: str = "ORT_ENABLE_ALL", batch1: bool = False,
            profile: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the Defender's engine
    if batch1:
        so.add_free_dimension_override_by_name("batch", 1)
    so.enable_profiling = profile
    if profile:  # the profile JSON goes to a temporary folder, not the working directory
        so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort_profile")
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def feeds(sess: ort.InferenceSession) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {i.name: (rng.random((1, 1, 128, 128), dtype=np.float32) * 2 - 1 if len(i.shape) == 4
                     else np.array([100.0], np.float32)) for i in sess.get_inputs()}


def interleaved(calls: dict[str, callable], iters: int = 60, warmup: int = 10) -> dict[str, float]:
    t = {k: [] for k in calls}
    for _ in range(iters + warmup):
        for k, f in calls.items():
            time.sleep(0.003)
            a = time.perf_counter()
            f()
            t[k].append(time.perf_counter() - a)
    return {k: round(float(np.median(v[warmup:])) * 1e3, 2) for k, v in t.items()}


def probe_profile(threads: int) -> None:
    s = session(str(BUNDLE / "denoiser.onnx"), threads, profile=True)
    f = feeds(s)
    n = 60
    for _ in range(n):
        s.run(None, f)
    events = json.loads(Path(s.end_profiling()).read_text())
    agg: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            agg[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    total = sum(agg.values())
    for op, d in sorted(agg.items(), key=lambda kv: -kv[1])[:12]:
        print(f"{op:24s} {d / n / 1e3:7.3f} ms/call {100 * d / total:5.1f} %  {count[op] // n} nodes")
    print(f"kernel time {total / n / 1e3:.2f} ms/call")


def ort_vs_torch(m, threads: int, iters: int = 60) -> dict[str, float]:
    """Median ms of the exported UNet ``m`` in onnxruntime and of ``m`` in torch eager, interleaved."""
    import torch
    from medfedpure.export.onnx_export import export_denoiser

    s = session(export_denoiser(m, 128).SerializeToString(), threads)
    f = feeds(s)
    xt, tt = torch.from_numpy(f["x_t"]), torch.from_numpy(f["t"])

    def run_torch() -> None:
        with torch.inference_mode():
            m(xt, tt)

    return interleaved({"ort": lambda: s.run(None, f), "torch": run_torch}, iters=iters)


def probe_variants(threads: int) -> None:
    import torch
    import torch.nn as nn
    from medfedpure.models.unet import UNet, UNetConfig

    torch.set_num_threads(threads)
    for name, base, norm in (("as bundled (GroupNorm, base 8)", 8, True), ("no GroupNorm", 8, False),
                             ("base 16", 16, True)):
        torch.manual_seed(0)
        m = UNet(UNetConfig(image_size=128, base_channels=base, channel_mults=(1, 2, 4, 8), num_res_blocks=1,
                            groups=4, time_dim=64)).eval()
        if not norm:
            for mod in list(m.modules()):
                for k, c in list(mod.named_children()):
                    if isinstance(c, nn.GroupNorm):
                        setattr(mod, k, nn.Identity())
        r = ort_vs_torch(m, threads)
        print(f"{name:32s} ORT {r['ort']:6.2f} ms  torch {r['torch']:6.2f} ms  ratio {r['torch'] / r['ort']:.2f}")


def probe_unshuffle(threads: int) -> None:
    """The UNet body on the r² polyphase sub-images at 128 / r px (``UNetConfig.unshuffle``), random weights."""
    import torch
    from medfedpure.models.unet import UNet, UNetConfig

    torch.set_num_threads(threads)
    variants = (("r = 1, base 8, (1, 2, 4, 8): the previous bundle", dict(unshuffle=1)),
                ("r = 2, base 8, (1, 2, 4, 8): `small`", dict(unshuffle=2)),
                ("r = 2, base 8, (1, 2, 4)", dict(unshuffle=2, channel_mults=(1, 2, 4))),
                ("r = 2, base 16, (1, 2, 4)", dict(unshuffle=2, base_channels=16, channel_mults=(1, 2, 4))),
                ("r = 4, base 16, (1, 2, 4)", dict(unshuffle=4, base_channels=16, channel_mults=(1, 2, 4))))
    for name, kw in variants:
        torch.manual_seed(0)
        m = UNet(UNetConfig(**kw)).eval()
        with torch.no_grad():  # non-zero residual branches (a fresh UNet's are zero)
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        r = ort_vs_torch(m, threads, iters=40)
        print(f"{name:50s} {m.num_parameters() / 1e3:5.0f} k  ORT {r['ort']:6.2f} ms  torch {r['torch']:6.2f} ms"
              f"  ratio {r['torch'] / r['ort']:.2f}", flush=True)


def probe_int8(threads: int) -> None:
    from medfedpure.export.tiny import tiny_scans
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    tmp = Path(tempfile.mkdtemp())
    quant_pre_process(str(BUNDLE / "denoiser.onnx"), str(tmp / "pre.onnx"), skip_symbolic_shape=True)
    x0 = tiny_scans(16, 5, size=128) * 2 - 1
    rng = np.random.default_rng(0)
    items = []
    for i in range(16):  # noised scans at purification strengths (cosine schedule)
        t = float(rng.uniform(40, 220))
        ab = np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
        xt = np.sqrt(ab) * x0[i:i + 1] + np.sqrt(1 - ab) * rng.standard_normal((1, 1, 128, 128))
        items.append({"x_t": xt.astype(np.float32), "t": np.array([t], np.float32)})

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(items)

        def get_next(self):
            return next(self.it, None)

    sessions = {"fp32": session(str(BUNDLE / "denoiser.onnx"), threads)}
    for fmt in (QuantFormat.QDQ, QuantFormat.QOperator):
        out = tmp / f"{fmt.name}.onnx"
        quantize_static(str(tmp / "pre.onnx"), str(out), Reader(), quant_format=fmt, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"])
        sessions[fmt.name] = session(str(out), threads)
    ref = sessions["fp32"].run(None, items[3])[0]
    for k, s in sessions.items():
        if k != "fp32":
            print(f"{k}: max |Δ| vs FP32 {np.abs(s.run(None, items[3])[0] - ref).max():.4f}")
    print(interleaved({k: (lambda s=s: s.run(None, items[3])) for k, s in sessions.items()}))


def probe_options(threads: int) -> None:
    for name in ("mae", "denoiser", "classifier"):
        p = str(BUNDLE / f"{name}.onnx")
        ss = {"ALL": session(p, threads), "EXTENDED": session(p, threads, "ORT_ENABLE_EXTENDED"),
              "ALL, batch fixed 1": session(p, threads, batch1=True)}
        f = feeds(ss["ALL"])
        print(name, interleaved({k: (lambda s=s, f=f: s.run(None, f)) for k, s in ss.items()}, iters=80))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("probe", choices=["profile", "variants", "int8", "options", "unshuffle"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    globals()[f"probe_{args.probe}"](args.threads)


if __name__ == "__main__":
    main()
