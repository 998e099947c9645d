"""Purification-aware fine-tuning of the site classifier (research driver).

    .venv/bin/python benchmarks/research/purifier_clf_aug.py --run runs/dev --site 0 \
        [--epochs 4] [--lr 5e-4] [--t-range 20,150] [--steps 1] [--p 0.5] [--tag _puraug]

Starts from RUN/site_K/classifier.safetensors and fine-tunes it with
``train.classifier.train_classifier(..., augment=make_purification_augment(student, ...))``: each
training scan is, with probability p, replaced by its purified copy at t* ~ U(t_range) (student,
K steps, keyed generator). Writes RUN/site_K/classifier{tag}.safetensors (the original is kept)
and RUN/site_K/classifier{tag}.json (history, wall time).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from medfedpure.data import load_split
from medfedpure.models.diffusion import make_purification_augment
from medfedpure.train.checkpoint import load_model, save_model
from medfedpure.train.classifier import ClassifierTrainConfig, evaluate_classifier, train_classifier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/dev")
    ap.add_argument("--data", default="data/synth128")
    ap.add_argument("--site", type=int, default=0)
    ap.add_argument("--student", default="student.safetensors")
    ap.add_argument("--classifier", default=None)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--t-range", default="20,150")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--p", type=float, default=0.5)
    ap.add_argument("--tag", default="_puraug")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    src = Path(args.classifier) if args.classifier else run / f"site_{args.site}" / "classifier.safetensors"
    clf, mcfg, meta = load_model(src)
    student, _, _ = load_model(run / args.student)
    lo, hi = (int(v) for v in args.t_range.split(","))
    aug = make_purification_augment(student, student.schedule, (lo, hi), args.steps, p=args.p)
    train = load_split(args.data, args.site, "train", 128)
    val = load_split(args.data, args.site, "val", 128)
    test = load_split(args.data, args.site, "test", 128)
    before = evaluate_classifier(clf, *test)
    tcfg = ClassifierTrainConfig.preset("small", epochs=args.epochs, lr=args.lr, warmup_epochs=0,
                                        patience=args.epochs)
    clf.train()
    t0 = time.perf_counter()
    hist = train_classifier(clf, train, val, tcfg, augment=aug, progress=True)
    wall = time.perf_counter() - t0
    after = evaluate_classifier(clf, *test)
    out = run / f"site_{args.site}" / f"classifier{args.tag}.safetensors"
    save_model(out, clf, mcfg, "moe", extra={"site": args.site, "finetuned_from": str(src),
                                              "purification_augment": vars(args), "test": after})
    (out.with_suffix(".json")).write_text(json.dumps(
        {"wall_s": wall, "test_before": before, "test_after": after, "args": vars(args),
         "history": hist["history"], "train_config": tcfg.to_dict()}, indent=1))
    print(f"fine-tuned {wall:.0f} s: test acc {before['accuracy']:.4f} -> {after['accuracy']:.4f}; wrote {out}")


if __name__ == "__main__":
    main()
