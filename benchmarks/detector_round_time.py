"""Where a site's round of the detector federation spends its time: crafting the attacked training set (round 1
only), the local epochs, and the round's evaluation (PGD-10 at 4 and 8/255 on the test scans, crafted in round 1
and read back afterwards). Runs the federation's own site functions (``fed.tasks.train_detector_round``,
``fed.tasks.evaluate_detector_site``) on one site's scans against a given classifier, in a scratch site folder:

    python benchmarks/detector_round_time.py --data runs/w2r50/data --site 2 \
        --classifier sdk/medfedpure/bundles/default/torch/classifier.safetensors --out benchmarks/results/detector_round_time.json

Round 1 crafts the training set and trains, then evaluates twice: the first evaluation crafts the test attacks, the
second reads them back (its figures must equal the first's, or the script stops); round 2 trains on the kept set
and evaluates once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from medfedpure.fed import tasks
from medfedpure.fed.phases import PHASES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a synthetic data root (medfedpure data synth)")
    ap.add_argument("--site", type=int, default=0)
    ap.add_argument("--classifier", type=Path, required=True, help="the site's classifier (.safetensors)")
    ap.add_argument("--preset", default="small", choices=("tiny", "small"))
    ap.add_argument("--epochs", type=int, default=2, help="local epochs per round (the build's default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a simulated site trains on 1)")
    ap.add_argument("--ordinary-layout", action="store_true",
                    help="switch off the channels-last layout the detector trains and the attacks run in on the CPU "
                         "(the baseline of a comparison)")
    ap.add_argument("--out", type=Path, default=None, help="write the timings as JSON here")
    args = ap.parse_args()
    if args.ordinary_layout:
        os.environ["MEDFEDPURE_CHANNELS_LAST"] = "0"
    if not args.classifier.is_file():
        ap.error(f"--classifier {args.classifier} does not exist")
    torch.set_num_threads(args.threads)
    data = tasks.load_site(str(args.data), args.site, 128)
    scratch = Path(tempfile.mkdtemp(prefix="detector_round_time_"))
    try:
        site_dir = scratch / f"site_{args.site}"
        site_dir.mkdir()
        shutil.copyfile(args.classifier, site_dir / "classifier.safetensors")
        det = PHASES["detector"].build(args.preset, seed=0)[0]
        rows = []
        for rnd in (1, 2):
            job = tasks.LocalJob(args.preset, epochs=args.epochs, seed=rnd, site_dir=site_dir)
            t0 = time.perf_counter()
            tasks.train_detector_round(det, data, job)
            row = {"round": rnd, "train_s": time.perf_counter() - t0, "evaluate_s": []}
            for _ in range(2 if rnd == 1 else 1):  # round 1: crafting the test attacks, then reading them back
                t0 = time.perf_counter()
                ev = tasks.evaluate_detector_site(det, data, seed=0, site_dir=site_dir)
                row["evaluate_s"].append(time.perf_counter() - t0)
                if "auroc" in row and row["auroc"] != (ev["test_auroc_4"], ev["test_auroc_8"], ev["val_tau"]):
                    raise SystemExit(f"the kept test attacks gave other figures: {row['auroc']} then {ev}")
                row["auroc"] = (ev["test_auroc_4"], ev["test_auroc_8"], ev["val_tau"])
            rows.append(row)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    craft_s = rows[0]["train_s"] - rows[1]["train_s"]
    print(f"site {args.site}: {len(data.x_train)} train / {len(data.x_test)} test scans, {args.threads} thread(s), "
          f"{args.epochs} local epochs, classifier {args.classifier}")
    print(f"{'round':>5} {'train s':>8} {'evaluate s':>16} {'AUROC 4':>8} {'AUROC 8':>8}")
    for r in rows:
        evs = " then ".join(f"{v:.1f}" for v in r["evaluate_s"])
        print(f"{r['round']:>5} {r['train_s']:>8.1f} {evs:>16} {r['auroc'][0]:>8.4f} {r['auroc'][1]:>8.4f}")
    print(f"crafting the training set ≈ {craft_s:.1f} s (round 1's training − round 2's); the test attacks ≈ "
          f"{rows[0]['evaluate_s'][0] - rows[0]['evaluate_s'][1]:.1f} s (round 1's first evaluation − its second, "
          "which read them back and gave the same figures)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"site": args.site, "threads": args.threads, "epochs": args.epochs,
                                        "layout": "ordinary" if args.ordinary_layout else "channels-last",
                                        "classifier": str(args.classifier), "rounds": rows,
                                        "craft_train_s": craft_s}, indent=1))


if __name__ == "__main__":
    main()
