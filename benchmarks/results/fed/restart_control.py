"""Control for the federated comparison: site 0 alone, no averaging, trained as a federated round trains.

20 successive calls of ``fed.tasks.train_local(epochs=1)`` (each builds a fresh AdamW and runs its own
cosine schedule, with the server's round envelope ``round_lr_scale``), versus one continuous
20-epoch ``train_classifier`` run (the local-only row). Writes ``restart_control.json`` here.
Run: ``.venv/bin/python benchmarks/results/fed/restart_control.py`` (about 2-3 min on one core).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from medfedpure.fed import tasks
from medfedpure.train.classifier import evaluate_classifier

ROUNDS = 20

if __name__ == "__main__":
    torch.set_num_threads(1)
    res = {}
    for site in (0,):
        data = tasks.load_site("data/synth128", site, 64, 0)
        model, _ = tasks.build_model("classifier", "small", seed=0, size=64)
        t = time.time()
        for r in range(1, ROUNDS + 1):
            m = tasks.train_local("classifier", model, data, preset="small", epochs=1, seed=7919 * r + 104_729 * site,
                                  lr_scale=tasks.round_lr_scale(r, ROUNDS))
        acc = evaluate_classifier(model, data.x_test, data.y_test)["accuracy"]
        res[site] = {"test_accuracy": acc, "last_val": m["val_accuracy"], "wall_s": time.time() - t}
        print(site, res[site], flush=True)
    (Path(__file__).parent / "restart_control.json").write_text(json.dumps(res))
