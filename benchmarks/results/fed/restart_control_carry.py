"""Control after the fix: site 0 alone, no averaging, trained as a federated round now trains.

20 successive ``fed.tasks.train_local_stateful(epochs=1)`` calls carrying the AdamW state and the
schedule position (``schedule=(r−1, 20)``, the site seed of the local-only run), versus the old
stateless rounds (``restart_control.py``: 0.633) and one continuous 20-epoch run (local-only: 0.822,
which keeps its best epoch by validation; the rounds keep the last). Writes
``restart_control_carry.json`` here. Run: ``.venv/bin/python benchmarks/results/fed/restart_control_carry.py``.
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
        state = None
        for r in range(1, ROUNDS + 1):
            m, state = tasks.train_local_stateful("classifier", model, data, preset="small", epochs=1,
                                                  seed=104_729 * site, optimizer_state=state,
                                                  schedule=(r - 1, ROUNDS))
        acc = evaluate_classifier(model, data.x_test, data.y_test)["accuracy"]
        res[site] = {"test_accuracy": acc, "last_val": m["val_accuracy"], "wall_s": time.time() - t}
        print(site, res[site], flush=True)
    (Path(__file__).parent / "restart_control_carry.json").write_text(json.dumps(res))
