"""Classifier training variants on site 0 (issue 3: ≥ 97 % clean together with robustness).

Trains the `small` MoE with `ClassifierTrainConfig.preset("small", **OVERRIDES)` and reports test
clean accuracy and undefended PGD-10 accuracy at 4/255 and 8/255 (the defended numbers come from
benchmarks/defended_eval.py on a bundle exported with the winner).
Usage: [MEDFEDPURE_DATA=data/other] classifier_variants.py NAME '{"epochs": 90, "adv_start_epoch": 60}'
Writes runs/cls_variants/NAME.safetensors and benchmarks/results/classifier/variant_NAME.json.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from common import DATA, ROOT, load
from medfedpure.attacks.pgd import pgd_linf
from medfedpure.models.moe import MoEClassifier, MoEConfig
from medfedpure.train.checkpoint import save_model
from medfedpure.train.classifier import ClassifierTrainConfig, evaluate_classifier, train_classifier

torch.set_num_threads(1)
name, overrides = sys.argv[1], json.loads(sys.argv[2])
for k in ("adv_eps",):  # given in 1/255 units on the command line, like `train classifier --adv-eps`
    if k in overrides:
        overrides[k] = overrides[k] / 255
tr, va, te = load(0, "train"), load(0, "val"), load(0, "test")
cfg = MoEConfig.preset("small")
torch.manual_seed(overrides.get("seed", 0))
model = MoEClassifier(cfg)
tc = ClassifierTrainConfig.preset("small", **overrides)
t0 = time.perf_counter()
hist = train_classifier(model, tr, va, tc, progress=False)
wall = time.perf_counter() - t0
save_model(ROOT / "runs" / "cls_variants" / f"{name}.safetensors", model, cfg, "moe")
x, y = torch.as_tensor(te[0]), torch.as_tensor(te[1])
res = {"name": name, "data": str(DATA.relative_to(ROOT)), "overrides": sys.argv[2], "train_config": tc.to_dict(), "wall_s": round(wall, 1),
       "best_epoch": hist["best_epoch"], "epochs_run": hist["epochs_run"], "val": hist["val"],
       "test_clean": evaluate_classifier(model, x, y)["accuracy"], "n_test": len(y)}
for eps in (4, 8):
    xa = pgd_linf(model, x, y, eps / 255, steps=10, generator=torch.Generator().manual_seed(0))
    res[f"test_pgd{eps}_undefended"] = evaluate_classifier(model, xa, y)["accuracy"]
out = ROOT / "benchmarks" / "results" / "classifier" / f"variant_{name}.json"
out.write_text(json.dumps(res, indent=1))
print(json.dumps(res))
