"""Agreement between backends on a data split: torch vs onnxruntime Defenders, FP16 vs FP32 purifier.

Not a latency measurement: the check that the faster backends give the same answers, reported
beside the latency numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["agreement"]


def agreement(bundle: str, data: str, site: str, split: str, threads: int, limit: int) -> dict[str, Any]:
    """Top-1 agreement on a data split: torch vs onnxruntime Defenders (same seeds), and FP16 vs FP32 purifier.

    The purifier comparison forces t* (t_min and t_max) on every scan, purifies with the FP32 and the
    FP16 denoiser graph from identical keyed noise, and classifies both with the FP32 classifier.
    ``site`` and ``split`` are comma lists; at most ``limit`` scans are used.
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
    out: dict[str, Any] = {
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
    except Exception as e:  # noqa: BLE001 - an absent FP16 graph is a reported gap, not a failure
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
