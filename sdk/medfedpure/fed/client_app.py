"""The Flower ClientApp: one site = one node; a thin adapter over ``fed.tasks`` (Message API).

Identity and data come from the node config — ``partition-id`` (the site index, required),
optionally ``data-dir`` and ``site-dir`` (deployment runtime: each SuperNode names its own) — with
the server's message config (``data-dir``, ``run-dir``) as the fallback used by the simulation
runtime, whose node config holds only ``partition-id`` / ``num-partitions``.

Handlers (the server's message config names the ``phase``):

- ``train``: restore this site's local tensors (``context.state``; else ``SITE/<phase>_local.safetensors``
  after a restart, if that file carries this run's ``run-token``; else a fresh, seeded init), load the server's travelling tensors, run the
  phase's training loop for ``local-epochs``, store the local tensors again (state + disk) and
  reply with the travelling tensors and metrics (``num-examples``, ``site``, losses).
  Classifier phase: the site's AdamW state is kept across rounds the same way
  (``context.state["classifier.optim"]`` and ``SITE/classifier_optim.safetensors``, same run-token
  rule), and round ``r`` of ``R`` trains global epochs ``(r−1)·E … r·E − 1`` of one warm-up + cosine
  schedule over ``R·E`` epochs (``tasks.train_local_stateful``): the site's rounds continue one
  long local run instead of restarting AdamW and the schedule every round.
- ``evaluate``: same restore, evaluate on val and test; in the last round also write the site's
  final artefacts: ``SITE/classifier.safetensors`` (global + this site's local expert, gate and
  normalisation) or ``SITE/global/<phase>.safetensors`` (the federated MAE / teacher / student, the
  site's copy used for distillation and gate calibration — no data leaves the site).
- ``query`` with ``phase = "calibrate"``: calibrate this site's gate on its own clean validation
  scans and write ``SITE/calibration.json``.

Attack injection for robustness experiments: when message config ``poison-site`` equals this site,
the reply is ``w_sent + poison-scale · (w_trained − w_sent)`` (e.g. −10: sign-flipped ×10).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medfedpure.fed import params, tasks

LOG = logging.getLogger("medfedpure.fed")

app = ClientApp()


class _Site:
    """Everything a handler needs to know about this site and this message."""

    def __init__(self, msg: Message, context: Context) -> None:
        cfg = msg.content["config"]
        node = context.node_config
        if "partition-id" not in node:
            raise ValueError("node config has no 'partition-id': start the SuperNode with --node-config 'partition-id=K'")
        self.site = int(node["partition-id"])
        self.phase = str(cfg["phase"])
        self.preset = str(cfg["preset"])
        self.size = int(cfg.get("image-size", 0))
        self.split = str(cfg.get("split", "all"))
        self.data_dir = str(node.get("data-dir", cfg["data-dir"]))
        run_dir = Path(str(cfg["run-dir"]))
        self.site_dir = Path(str(node["site-dir"])) if "site-dir" in node else run_dir / f"site_{self.site}"
        self.round = int(cfg.get("server-round", 0))
        self.run_token = str(cfg.get("run-token", ""))
        self.num_rounds = int(cfg.get("num-rounds", 0))
        self.local_epochs = int(cfg.get("local-epochs", 1))
        self.seed = int(cfg.get("seed", 0))
        self.max_train = int(cfg.get("max-train", 0))
        self.poison_site = int(cfg.get("poison-site", -1))
        self.poison_scale = float(cfg.get("poison-scale", -10.0))
        self.schedule = {k.replace("-", "_"): int(cfg[k]) for k in ("student-steps", "t-min", "t-max") if k in cfg}
        torch.set_num_threads(int(cfg.get("threads", 1)))

    @property
    def local_path(self) -> Path:
        return self.site_dir / f"{self.phase}_local.safetensors"

    @property
    def state_key(self) -> str:
        return f"{self.phase}.local"

    @property
    def optim_path(self) -> Path:
        return self.site_dir / f"{self.phase}_optim.safetensors"

    @property
    def optim_key(self) -> str:
        return f"{self.phase}.optim"

    @property
    def stateful(self) -> bool:
        """Whether this phase carries optimizer state and a federation-wide schedule (classifier)."""
        return self.phase == "classifier" and self.round >= 1 and self.num_rounds >= self.round

    def optimizer_state(self, context: Context) -> dict[str, torch.Tensor] | None:
        """This site's optimizer state from last round (state → this run's disk file → ``None``)."""
        if self.round <= 1:
            return None
        if self.optim_key in context.state:
            return params.from_arrayrecord(context.state[self.optim_key])
        if self.optim_path.is_file():
            tensors, meta = params.load_local(self.optim_path)
            if meta.get("run-token") == self.run_token and meta.get("split") == self.split \
                    and int(meta.get("round", -1)) == self.round - 1:
                LOG.info("site %d: restoring %s optimizer state from %s", self.site, self.phase, self.optim_path)
                return tensors
        LOG.warning("site %d round %d: no optimizer state from round %d, starting AdamW afresh",
                    self.site, self.round, self.round - 1)
        return None

    def store_optimizer_state(self, state: dict[str, torch.Tensor] | None, context: Context) -> None:
        if state is None:
            return
        context.state[self.optim_key] = params.to_arrayrecord(state)
        params.save_local(
            self.optim_path, state,
            {"phase": self.phase, "split": self.split, "round": self.round, "site": self.site,
             "run-token": self.run_token, "kind": "adamw-state"},
        )

    def data(self) -> tasks.SiteData:
        return tasks.load_site(self.data_dir, self.site, tasks.image_size(self.preset, self.size), self.max_train)

    def model(self, context: Context) -> torch.nn.Module:
        """The phase's model with this site's local tensors restored (state → disk → fresh init)."""
        # Local parts start from a site-specific seed; the travelling part is overwritten by the server's.
        model, _ = tasks.build_model(
            self.phase, self.preset, seed=self.seed + 1000 * (self.site + 1), size=self.size
        )
        if not params.local_names(model, self.split):
            return model
        if self.state_key in context.state:
            params.set_local(model, params.from_arrayrecord(context.state[self.state_key]), self.split)
        elif self.local_path.is_file():
            tensors, meta = params.load_local(self.local_path)
            # Only this run's file: a SuperNode restarted mid-run resumes; a new run starts afresh.
            if meta.get("run-token") == self.run_token and meta.get("split") == self.split:
                LOG.info("site %d: restoring %s local tensors from %s", self.site, self.phase, self.local_path)
                params.set_local(model, tensors, self.split)
        return model

    def store_local(self, model: torch.nn.Module, context: Context) -> None:
        local = params.get_local(model, self.split)
        if not local:
            return
        context.state[self.state_key] = params.to_arrayrecord(local)
        params.save_local(
            self.local_path, local,
            {"phase": self.phase, "split": self.split, "round": self.round, "site": self.site, "run-token": self.run_token},
        )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training; reply with the travelling tensors."""
    t0 = time.perf_counter()
    s = _Site(msg, context)
    model = s.model(context)
    sent: ArrayRecord = msg.content["arrays"]
    params.set_travelling(model, sent, s.split)
    data = s.data()
    if s.stateful:
        # One schedule over the whole federation; per-epoch generators keyed by the global epoch,
        # so the site's seed is fixed for the run (the local-only baseline's seed).
        metrics, opt_state = tasks.train_local_stateful(
            s.phase, model, data, preset=s.preset, epochs=s.local_epochs, seed=s.seed + 104_729 * s.site,
            site_dir=s.site_dir, optimizer_state=s.optimizer_state(context),
            schedule=((s.round - 1) * s.local_epochs, s.num_rounds * s.local_epochs),
        )
        s.store_optimizer_state(opt_state, context)
    else:
        metrics = tasks.train_local(
            s.phase, model, data, preset=s.preset, epochs=s.local_epochs,
            seed=s.seed + 7919 * s.round + 104_729 * s.site, site_dir=s.site_dir,
            lr_scale=tasks.round_lr_scale(s.round, s.num_rounds),
        )
    s.store_local(model, context)
    reply_arrays = params.get_travelling(model, s.split)
    if s.site == s.poison_site:
        reply_arrays = ArrayRecord(
            {
                k: torch.from_numpy(
                    np.asarray(sent[k].numpy() + s.poison_scale * (v.numpy() - sent[k].numpy()), dtype=v.numpy().dtype)
                )
                for k, v in reply_arrays.items()
            }
        )
    record = MetricRecord(
        {"num-examples": len(data.x_train), "site": s.site, "train_s": time.perf_counter() - t0, **metrics}
    )
    return Message(RecordDict({"arrays": reply_arrays, "metrics": record}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the server's model combined with this site's local part; save artefacts in the last round."""
    s = _Site(msg, context)
    model = s.model(context)
    params.set_travelling(model, msg.content["arrays"], s.split)
    data = s.data()
    metrics = tasks.evaluate_local(s.phase, model, data, seed=s.seed)
    if s.num_rounds and s.round == s.num_rounds:
        _save_final(s, model)
    record = MetricRecord({"num-examples": len(data.x_val), "site": s.site, **metrics})
    return Message(RecordDict({"metrics": record}), reply_to=msg)


def _save_final(s: _Site, model: torch.nn.Module) -> None:
    from medfedpure.train.checkpoint import save_model

    cfg = tasks.model_config(s.phase, s.preset, s.size)
    extra: dict[str, object] = {"site": s.site, "rounds": s.num_rounds, "split": s.split, "federated": True,
                                "role": s.phase}
    if s.phase == "student" and s.schedule:
        extra.update(steps=s.schedule["student_steps"], t_min=s.schedule["t_min"], t_max=s.schedule["t_max"])
    if s.phase == "classifier":
        save_model(s.site_dir / "classifier.safetensors", model, cfg, tasks.KINDS[s.phase], extra=extra)
    else:
        save_model(s.site_dir / "global" / f"{s.phase}.safetensors", model, cfg, tasks.KINDS[s.phase], extra=extra)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """``phase = "calibrate"``: calibrate this site's gate on its clean validation scans."""
    cfg = msg.content["config"]
    if str(cfg.get("phase", "")) != "calibrate":
        raise ValueError(f"unknown query phase {cfg.get('phase')!r}: only 'calibrate' is served")
    node = context.node_config
    site = int(node["partition-id"])
    run_dir = Path(str(cfg["run-dir"]))
    site_dir = Path(str(node["site-dir"])) if "site-dir" in node else run_dir / f"site_{site}"
    data_dir = str(node.get("data-dir", cfg["data-dir"]))
    preset = str(cfg["preset"])
    torch.set_num_threads(int(cfg.get("threads", 1)))
    data = tasks.load_site(
        data_dir, site, tasks.image_size(preset, int(cfg.get("image-size", 0))), int(cfg.get("max-train", 0))
    )
    calib = tasks.calibrate_site(site_dir, data, preset=preset, seed=int(cfg.get("seed", 0)))
    (site_dir / "calibration.json").write_text(json.dumps(calib, indent=2, sort_keys=True))
    numeric = {k: float(v) for k, v in calib.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return Message(
        RecordDict({"metrics": MetricRecord({"site": site, **numeric}), "calibration": ConfigRecord({"json": json.dumps(calib)})}),
        reply_to=msg,
    )
