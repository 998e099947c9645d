"""Train the small classifier or MAE on one site with the library loops (research runs; same code
path as ``medfedpure train``), writing runs/dev/. Usage: train_dev.py classifier|mae SITE [epochs] [tag]; with INIT=ckpt [LR=lr] the classifier warm-starts."""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from common import ROOT, load, machine
from medfedpure.models.mae import MAEConfig, MaskedAutoencoder
from medfedpure.models.moe import MoEClassifier, MoEConfig
from medfedpure.train.checkpoint import load_model, save_model
from medfedpure.train.classifier import ClassifierTrainConfig, evaluate_classifier, train_classifier
from medfedpure.train.mae import MAETrainConfig, evaluate_mae, train_mae

torch.set_num_threads(1)
torch.manual_seed(0)
what, site = sys.argv[1], int(sys.argv[2])
epochs = int(sys.argv[3]) if len(sys.argv) > 3 else None
tag = sys.argv[4] if len(sys.argv) > 4 else ""
run = ROOT / "runs" / "dev"
tr, va, te = load(site, "train"), load(site, "val"), load(site, "test")
t0 = time.perf_counter()
if what == "classifier":
    cfg = MoEConfig.preset("small")
    tc = ClassifierTrainConfig.preset("small", epochs=epochs)
    m = MoEClassifier(cfg)
    if os.environ.get("INIT"):  # warm start (continuation with a fresh schedule)
        m.load_state_dict(load_model(os.environ["INIT"])[0].state_dict())
        tc = ClassifierTrainConfig.preset("small", epochs=epochs, lr=float(os.environ.get("LR", "1e-3")),
                                          warmup_epochs=0)
    h = train_classifier(m, tr, va, tc, checkpoint_dir=run / "train_state" / f"site_{site}{tag}")
    res = {"test": evaluate_classifier(m, *te), "val": h["val"], "best_epoch": h["best_epoch"],
           "epochs_run": h["epochs_run"]}
    path = run / f"site_{site}" / f"classifier{tag}.safetensors"
    save_model(path, m, cfg, "moe", extra={"train_config": tc.to_dict(), **res})
else:
    cfg = MAEConfig.preset("small")
    if tag == "_np":
        cfg = MAEConfig(**{**cfg.to_dict(), "norm_pix": True})
    tc = MAETrainConfig.preset("small", epochs=epochs)
    m = MaskedAutoencoder(cfg)
    h = train_mae(m, tr[0], va[0], tc, checkpoint_dir=run / "train_state" / f"mae{tag}")
    res = {"test": evaluate_mae(m, te[0]), "val": h["val"], "best_epoch": h["best_epoch"],
           "epochs_run": h["epochs_run"]}
    path = run / f"mae{tag}.safetensors"
    save_model(path, m, cfg, "mae", extra={"train_config": tc.to_dict(), **res})
res.update(wall_s=time.perf_counter() - t0, machine=machine(), threads=1, history=h["history"])
(run / f"{what}{tag}_site{site}_metrics.json").write_text(json.dumps(res, indent=1))
print(json.dumps({k: v for k, v in res.items() if k != "history"}))
