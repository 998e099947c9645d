"""Adversarial fine-tuning trial on site 0 (benchmarks/RESULTS.md, "Purifier"): a 60-epoch clean run of
the `small` MoE widths (lr 2e-3), then 20 epochs of FGSM-RS fine-tuning (lr 1e-3, 50 % adversarial
batches) at ε = 2/255 and 4/255 from it. Writes OUTDIR/B_{base,adv2,adv4}.safetensors; evaluate with
purifier_eval.py --classifier OUTDIR/B_adv2.safetensors --steps 1 --skip-psnr --tstars 0,150,200.
Usage: classifier_adv_ft.py OUTDIR
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from common import load
from medfedpure.models.moe import MoEClassifier, MoEConfig
from medfedpure.train.checkpoint import load_model, save_model
from medfedpure.train.classifier import ClassifierTrainConfig, evaluate_classifier, train_classifier

torch.set_num_threads(1)
torch.manual_seed(0)
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
tr, va, te = load(0, "train"), load(0, "val"), load(0, "test")
cfg = MoEConfig(image_size=128, global_widths=(12, 24, 48, 96), local_widths=(8, 16, 24, 32))
m = MoEClassifier(cfg)
t0 = time.perf_counter()
h = train_classifier(m, tr, va, ClassifierTrainConfig.preset("small", lr=2e-3, adv_eps=0.0), progress=False)
print("base", json.dumps({"test": evaluate_classifier(m, *te), "best": h["best_epoch"], "wall": time.perf_counter() - t0}),
      flush=True)
save_model(out / "B_base.safetensors", m, cfg, "moe")
for eps in (2, 4):
    m2 = load_model(out / "B_base.safetensors")[0]
    t0 = time.perf_counter()
    tc = ClassifierTrainConfig.preset("small", epochs=20, lr=1e-3, warmup_epochs=0, adv_eps=eps / 255, adv_frac=0.5,
                                      adv_start_epoch=0)
    h = train_classifier(m2, tr, va, tc, progress=False)
    print(f"adv{eps}", json.dumps({"test": evaluate_classifier(m2, *te), "best": h["best_epoch"],
                                   "wall": time.perf_counter() - t0}), flush=True)
    save_model(out / f"B_adv{eps}.safetensors", m2, cfg, "moe", extra={"train_config": tc.to_dict()})
