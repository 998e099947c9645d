"""A training step's forward and backward passes in the ordinary and the channels-last memory layout, per model the
training code converts on the CPU (``medfedpure.train.device.channels_last``): the classifier at width 1 and 2 (its
passes also to the input, as PGD needs), the attack detector, the purifier's teacher and student UNets. The two
layouts alternate in one run and the best of three rounds counts, so the ratio holds on a noisy machine:

    python benchmarks/layout_speed.py --out benchmarks/results/layout_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from medfedpure.fed.phases import build_model


def _step(name: str, model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    y = torch.arange(len(x)) % 2
    t = torch.full((len(x),), 100)

    def run() -> None:
        if name.startswith("classifier"):
            xx = x.clone().requires_grad_(True)
            F.nll_loss(model.log_probs(xx), y).backward()
        elif name == "detector":
            F.binary_cross_entropy_with_logits(model.score(x), y.float()).backward()
        else:  # a UNet: x̂₀ from x_t at one noise level
            model(x, t).square().mean().backward()

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5, help="steps per timed round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.rand(args.batch, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    rows = []
    for name, phase, width in (("classifier w1", "classifier", 1), ("classifier w2", "classifier", 2),
                               ("detector", "detector", 1), ("teacher", "teacher", 1), ("student", "student", 1)):
        models = {"ordinary": build_model(phase, "small", seed=0, width=width)[0].train(),
                  "channels_last": build_model(phase, "small", seed=0, width=width)[0].train()
                  .to(memory_format=torch.channels_last)}
        steps = {k: _step(name, m, x) for k, m in models.items()}
        best = {k: float("inf") for k in models}
        for _ in range(3):
            for k, run in steps.items():
                t0 = time.perf_counter()
                for _ in range(args.reps):
                    run()
                best[k] = min(best[k], (time.perf_counter() - t0) / args.reps)
        rows.append({"model": name, "ordinary_ms": 1e3 * best["ordinary"],
                     "channels_last_ms": 1e3 * best["channels_last"], "ratio": best["ordinary"] / best["channels_last"]})
        r = rows[-1]
        print(f"{name:<15} ordinary {r['ordinary_ms']:8.1f} ms   channels-last {r['channels_last_ms']:8.1f} ms   "
              f"{r['ratio']:.2f} ×", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"batch": args.batch, "threads": args.threads, "cpus": os.cpu_count(),
                                        "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
