"""Classifier width trials on one site (the numbers behind the `small` MoE widths, benchmarks/RESULTS.md).

Usage: classifier_widths.py A|B EPOCHS LR [ADV_EPS_255 ADV_FRAC OUT.safetensors]
  A = global 8…64 / local 8…32 (103 k params), B = global 12…96 / local 8…32 (203 k, the `small` preset).
Prints one JSON line: test/val accuracy, best epoch, wall time, the per-epoch (epoch, val acc, s) curve.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from common import load
from medfedpure.models.moe import MoEClassifier, MoEConfig
from medfedpure.train.checkpoint import save_model
from medfedpure.train.classifier import ClassifierTrainConfig, evaluate_classifier, train_classifier

torch.set_num_threads(1)
torch.manual_seed(0)
tag, epochs, lr = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
eps = float(sys.argv[4]) / 255 if len(sys.argv) > 4 else 0.0
frac = float(sys.argv[5]) if len(sys.argv) > 5 else 0.5
arch = {"A": dict(global_widths=(8, 16, 32, 64), local_widths=(8, 16, 16, 32)),
        "B": dict(global_widths=(12, 24, 48, 96), local_widths=(8, 16, 24, 32))}[tag]
tr, va, te = load(0, "train"), load(0, "val"), load(0, "test")
cfg = MoEConfig(image_size=128, **arch)
m = MoEClassifier(cfg)
# adv_start_epoch=0 and no adversarial epochs unless ADV_EPS_255 is given (the preset's are overridden).
tc = ClassifierTrainConfig.preset("small", epochs=epochs, lr=lr, adv_eps=eps, adv_frac=frac, adv_start_epoch=0)
t0 = time.perf_counter()
h = train_classifier(m, tr, va, tc, progress=False)
res = {"test": evaluate_classifier(m, *te), "val": h["val"], "best": h["best_epoch"], "wall": time.perf_counter() - t0,
       "curve": [(e["epoch"], round(e["val_accuracy"], 3), round(e["epoch_s"], 1)) for e in h["history"]]}
if len(sys.argv) > 6:
    save_model(sys.argv[6], m, cfg, "moe", extra={"train_config": tc.to_dict()})
print(json.dumps(res))
