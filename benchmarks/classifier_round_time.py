"""Where a site's adversarial round of the classifier federation spends its time, part by part, on one thread:

    python benchmarks/classifier_round_time.py --data runs/data --site 1 --width 2 \
        --denoiser sdk/medfedpure/bundles/default --out benchmarks/results/classifier_round_time.json

A round of the build's recipe (``--adv pgd --adv-eps 8 --adv-steps 5 --robust-val 64 --select robust
--smoothing-sigmas 0.25,0.5``, two local epochs) is, per site: each epoch's training (clean loss on every scan,
PGD-5 on half of each batch, the denoiser's one-shot denoising on a quarter), each epoch's validation (clean
accuracy on the site's validation scans, PGD-10 on its 64 fixed ones), and the round's evaluation on the validation
and test splits. The script times each part on its own: one training epoch clean, one with the smoothing batches,
one with smoothing and PGD (the recipe's), the robust validation, the clean validation and the round's evaluation;
it prints a table and the round those parts add up to. Each training epoch starts from the same initial weights;
what is timed is compute, not learning. ``train_classifier`` trains in the channels-last layout on the CPU
(``MEDFEDPURE_CHANNELS_LAST=0``: the ordinary one); ``benchmarks/layout_speed.py`` compares the two step by step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch
from medfedpure.fed import tasks
from medfedpure.fed.phases import build_model
from medfedpure.train.classifier import (
    ClassifierTrainConfig,
    evaluate_classifier,
    robust_accuracy,
    robust_val_subset,
    train_classifier,
)
from medfedpure.train.denoiser import load_denoiser
from medfedpure.train.device import channels_last
from medfedpure.train.loop import epoch_generator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a synthetic data root (medfedpure data synth)")
    ap.add_argument("--site", type=int, default=0)
    ap.add_argument("--width", type=int, default=2, help="the classifier's width (--classifier-width)")
    ap.add_argument("--denoiser", required=True, help="a bundle or run holding the diffusion student")
    ap.add_argument("--adv-steps", type=int, default=5)
    ap.add_argument("--robust-val", type=int, default=64)
    ap.add_argument("--sigmas", default="0.25,0.5", help="the smoothing batches' σ values")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a simulated site trains on 1)")
    ap.add_argument("--out", type=Path, default=None, help="write the timings as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = tasks.load_site(str(args.data), args.site, 128)
    denoiser, _ = load_denoiser(args.denoiser)
    sigmas = tuple(float(s) for s in args.sigmas.split(","))
    init = build_model("classifier", "small", seed=0, width=args.width)[0]
    state = {k: v.clone() for k, v in init.state_dict().items()}
    train = (data.x_train, data.y_train)
    val = (data.x_val, data.y_val)
    base = ClassifierTrainConfig.preset("small", epochs=1, patience=2, adv="none", robust_val=0)

    def epoch(cfg: ClassifierTrainConfig) -> float:
        init.load_state_dict(state)
        t0 = time.perf_counter()
        train_classifier(init, train, val, cfg, progress=False, denoiser=denoiser if cfg.smoothing_sigmas else None)
        return time.perf_counter() - t0

    init.eval()
    t_val = _timed(lambda: evaluate_classifier(init, *(torch.from_numpy(a) for a in val)))
    parts = {
        "epoch_clean_s": epoch(base) - 2 * t_val,
        "epoch_smoothing_s": epoch(replace(base, smoothing_sigmas=sigmas)) - 2 * t_val,
        "epoch_recipe_s": epoch(replace(base, adv="pgd", adv_eps=8 / 255, adv_steps=args.adv_steps,
                                        adv_start_epoch=0, smoothing_sigmas=sigmas)) - 2 * t_val,
        "clean_validation_s": t_val,
    }
    xv, yv = (torch.from_numpy(a) for a in val)
    sub = robust_val_subset(len(xv), args.robust_val, 0)
    init.eval()
    with channels_last(init):  # as inside train_classifier, where it runs in a round
        parts["robust_validation_s"] = _timed(lambda: robust_accuracy(init, xv[sub], yv[sub], 8 / 255, 10, "linf",
                                                                      epoch_generator(0, 0, stream=8)))
    parts["round_evaluation_s"] = _timed(lambda: tasks.evaluate_classifier_site(init, data))
    # A round: two epochs, each validated (clean + robust); the kept model's clean validation once more; the round's
    # evaluation. Before the kept model's robust figure was read back from its epoch's row, one more robust
    # validation ran at the end.
    p = parts
    rnd = 2 * (p["epoch_recipe_s"] + p["clean_validation_s"] + p["robust_validation_s"]) + p["clean_validation_s"] \
        + p["round_evaluation_s"]
    result = {"site": args.site, "width": args.width, "threads": args.threads, "train_scans": len(data.x_train),
              "robust_val_scans": args.robust_val, "adv_steps": args.adv_steps, "sigmas": list(sigmas),
              "machine": _machine(), "torch": torch.__version__, "parts": parts,
              "round_s": rnd, "round_before_s": rnd + p["robust_validation_s"]}
    print(f"site {args.site}, width {args.width}, {len(data.x_train)} training scans, {args.threads} thread(s)")
    print(f"{'part':<44}{'seconds':>9}")
    names = {"epoch_clean_s": "training epoch, clean",
             "epoch_smoothing_s": "training epoch, + smoothing batches",
             "epoch_recipe_s": f"training epoch, + PGD-{args.adv_steps} (the recipe's)",
             "clean_validation_s": f"clean validation ({len(xv)} scans)",
             "robust_validation_s": f"robust validation (PGD-10, {args.robust_val} scans)",
             "round_evaluation_s": "round's evaluation (val + test)"}
    for k, label in names.items():
        print(f"{label:<44}{parts[k]:>9.1f}")
    print(f"{'a round (2 epochs), now':<44}{rnd:>9.1f}")
    print(f"{'a round, with the final robust validation':<44}{result['round_before_s']:>9.1f}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


def _machine() -> str:
    """The CPU's model name and core count (``/proc/cpuinfo`` where there is one)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def _timed(fn) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    with torch.enable_grad():
        fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
