"""The Flower ClientApp: one site = one node; a thin adapter over ``fed.phases`` (Message API).

What a handler knows comes from three places:

- the node config: ``partition-id`` (the site index, required), optionally ``data-dir`` and
  ``site-dir`` (deployment runtime: each SuperNode names its own);
- ``context.run_config``: the run's constants (``FedConfig.to_run_config()``: preset, seed, data
  and run folders, local epochs, rounds, poisoning, purification schedule, the path of the frozen
  denoiser of denoised-smoothing fine-tuning, …), the same for every message of the run;
- the message config: the per-round values, ``phase``, ``split``, ``run-token`` and Flower's
  ``server-round``.

Handlers (the phase's registry entry, ``phases.PHASES[phase]``, says what to do):

- ``train``: restore this site's local tensors (``context.state``; else ``SITE/<phase>_local.safetensors``
  after a restart, if that file carries this run's ``run-token``; else a fresh, seeded init), load
  the server's travelling tensors, run the phase's local training for ``local-epochs``, store the
  local tensors again (state + disk) and reply with the travelling tensors and metrics
  (``num-examples``, ``site``, losses). A stateful phase (the classifier) also keeps the site's
  AdamW state across rounds the same way (``context.state["<phase>.optim"]`` and
  ``SITE/<phase>_optim.safetensors``, same run-token rule), and round ``r`` of ``R`` trains global
  epochs ``(r−1)·E … r·E − 1`` of one warm-up + cosine schedule over ``R·E`` epochs: the site's
  rounds continue one long local run instead of restarting AdamW and the schedule every round.
- ``evaluate``: same restore, evaluate on val and test; in the last round also write the site's
  final model ``SITE/<Phase.site_file>``: ``SITE/classifier.safetensors`` (global + this site's
  local expert, gate and normalisation) or ``SITE/global/<phase>.safetensors`` (the federated MAE /
  teacher / student, the site's copy used for distillation and gate calibration — no data leaves
  the site).
- ``query`` with ``phase = "register"`` (once, before the first phase): reply with this site's
  training-set size, ``num-examples``; the server caps every later self-reported count at it.
- ``query`` with ``phase = "calibrate"``: calibrate this site's gate on its own clean validation
  scans and write ``SITE/calibration.json``.

Attack injection for robustness experiments: when the run config's ``poison-site`` equals this
site, the reply is ``w_sent + poison-scale · (w_trained − w_sent)`` (e.g. −10: sign-flipped ×10).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod

from medfedpure.fed import params, tasks
from medfedpure.fed.config import FedConfig
from medfedpure.fed.phases import Phase, image_size, lookup

LOG = logging.getLogger("medfedpure.fed")


class _Site:
    """Everything a handler needs to know about this site, this run and this message."""

    def __init__(self, msg: Message, context: Context) -> None:
        node = context.node_config
        if "partition-id" not in node:
            raise ValueError("node config has no 'partition-id': start the SuperNode with --node-config 'partition-id=K'")
        if not context.run_config:
            raise ValueError("the run config is empty: start the run from the app's pyproject.toml "
                             "(medfedpure fed deploy) or bind it with make_client_app(run_config)")
        self.context = context
        self.run = FedConfig.from_run_config(dict(context.run_config))
        msg_cfg = msg.content["config"]
        self.site = int(node["partition-id"])
        self.phase_name = str(msg_cfg["phase"])
        self.split = str(msg_cfg.get("split", "all"))
        # A resumed run's Flower rounds count from 1 again; the server sends the rounds done before.
        self.round = int(msg_cfg.get("server-round", 0)) + int(msg_cfg.get("round-offset", 0))
        self.run_token = str(msg_cfg.get("run-token", ""))
        self.data_dir = str(node.get("data-dir", self.run.data_dir))
        self.site_dir = Path(str(node["site-dir"])) if "site-dir" in node else Path(self.run.out_dir) / f"site_{self.site}"
        torch.set_num_threads(self.run.threads)

    @property
    def phase(self) -> Phase:
        return lookup(self.phase_name)

    def _meta(self, **extra: object) -> dict[str, object]:
        """Metadata of the site's saved state: restored only within the same run (and split)."""
        return {"phase": self.phase_name, "split": self.split, "round": self.round, "site": self.site,
                "run-token": self.run_token, **extra}

    def state_key(self, part: str) -> str:
        """``context.state`` key of this phase's saved ``part`` ("local" tensors or "optim" state)."""
        return f"{self.phase_name}.{part}"

    def state_path(self, part: str, previous: bool = False) -> Path:
        """File of this phase's saved ``part``: ``SITE/<phase>_<part>.safetensors`` (``previous``: the one
        written the round before, ``SITE/<phase>_<part>.prev.safetensors``)."""
        return self.site_dir / f"{self.phase_name}_{part}{'.prev' if previous else ''}.safetensors"

    def _restore(self, part: str, round_: int | None = None) -> dict[str, torch.Tensor] | None:
        """Saved tensors of this site: ``context.state`` → this run's file → ``None``.

        A file counts only when it carries this run's token and split (a SuperNode restarted mid-run,
        or a resumed run, continues; a new run starts afresh), and, with ``round_``, when it was written
        in that round: the current file or the one before it (a run stopped after a site stored round
        r + 1 but before the server checkpointed it resumes from round r).
        """
        key = self.state_key(part)
        if key in self.context.state:
            return params.from_arrayrecord(self.context.state[key])
        for path in (self.state_path(part), self.state_path(part, previous=True)):
            if not path.is_file():
                continue
            tensors, meta = params.load_local(path)
            if meta.get("run-token") == self.run_token and meta.get("split") == self.split \
                    and (round_ is None or int(meta.get("round", -1)) == round_):
                LOG.info("site %d: restoring %s %s state of round %s from %s", self.site, self.phase_name, part,
                         meta.get("round"), path)
                return tensors
        return None

    def _store(self, part: str, tensors: dict[str, torch.Tensor], **extra: object) -> None:
        self.context.state[self.state_key(part)] = params.to_arrayrecord(tensors)
        path = self.state_path(part)
        if path.is_file():
            meta = params.load_local_metadata(path)
            if meta.get("run-token") == self.run_token and int(meta.get("round", -1)) != self.round:
                path.replace(self.state_path(part, previous=True))  # keep the round before
        params.save_local(path, tensors, self._meta(**extra))

    @property
    def stateful(self) -> bool:
        """Whether this round carries optimizer state and a federation-wide schedule."""
        return self.phase.stateful and self.round >= 1 and self.run.rounds_of(self.phase.name) >= self.round

    def optimizer_state(self) -> dict[str, torch.Tensor] | None:
        """This site's optimizer state from last round (state → this run's disk file → ``None``)."""
        if self.round <= 1:
            return None
        state = self._restore("optim", self.round - 1)
        if state is None:
            LOG.warning("site %d round %d: no optimizer state from round %d, starting AdamW afresh",
                        self.site, self.round, self.round - 1)
        return state

    def store_optimizer_state(self, state: dict[str, torch.Tensor] | None) -> None:
        if state is not None:
            self._store("optim", state, kind="adamw-state")

    def data(self) -> tasks.SiteData:
        return tasks.load_site(self.data_dir, self.site, image_size(self.run.preset, self.run.image_size),
                               self.run.max_train)

    def model(self, training: bool) -> torch.nn.Module:
        """The phase's model with this site's local tensors restored (state → disk → fresh init): those of
        the round before (``training``) or of this round (evaluation)."""
        # Local parts start from a site-specific seed; the travelling part is overwritten by the server's.
        model, _ = self.phase.build(self.run.preset, seed=self.run.seed + tasks.LOCAL_INIT_STRIDE * (self.site + 1),
                                    size=self.run.image_size, width=self.run.classifier_width,
                                    stem=self.run.classifier_stem)
        if not params.local_names(model, self.split):
            return model
        local = self._restore("local", self.round - 1 if training else self.round)
        if local is not None:
            params.set_local(model, local, self.split)
        return model

    def store_local(self, model: torch.nn.Module) -> None:
        local = params.get_local(model, self.split)
        if local:
            self._store("local", local)

    def job(self) -> tasks.LocalJob:
        """This round's local training job (seed, schedule position or learning-rate envelope)."""
        run, epochs = self.run, self.run.local_epochs
        rounds = run.rounds_of(self.phase.name)
        over = run.classifier_overrides()
        if self.stateful:
            # One schedule over the whole federation; per-epoch generators keyed by the global epoch,
            # so the site's seed is fixed for the run (the local-only baseline's seed).
            return tasks.LocalJob(run.preset, epochs, seed=run.seed + tasks.SITE_STRIDE * self.site, site_dir=self.site_dir,
                                  schedule=((self.round - 1) * epochs, rounds * epochs), classifier_overrides=over,
                                  denoiser=run.denoiser, denoise_t_max=run.denoise_t_max, device=run.device)
        return tasks.LocalJob(run.preset, epochs, seed=run.seed + tasks.ROUND_STRIDE * self.round + tasks.SITE_STRIDE * self.site,
                              site_dir=self.site_dir, lr_scale=tasks.round_lr_scale(self.round, rounds),
                              classifier_overrides=over, denoiser=run.denoiser, denoise_t_max=run.denoise_t_max,
                              harden=self.round > rounds - run.detector_harden_rounds,
                              detector_l2=run.detector_l2, device=run.device)


def train(msg: Message, context: Context) -> Message:
    """One round of local training; reply with the travelling tensors."""
    t0 = time.perf_counter()
    s = _Site(msg, context)
    model = s.model(training=True)
    sent: ArrayRecord = msg.content["arrays"]
    params.set_travelling(model, sent, s.split)
    data = s.data()
    carried = s.optimizer_state() if s.stateful else None
    metrics, opt_state = s.phase.train(model, data, s.job(), carried)
    if s.stateful:
        s.store_optimizer_state(opt_state)
    s.store_local(model)
    reply_arrays = params.get_travelling(model, s.split)
    if s.site == s.run.poison_site:
        scale = s.run.poison_scale
        reply_arrays = ArrayRecord(
            {
                k: torch.from_numpy(
                    np.asarray(sent[k].numpy() + scale * (v.numpy() - sent[k].numpy()), dtype=v.numpy().dtype)
                )
                for k, v in reply_arrays.items()
            }
        )
    record = MetricRecord(
        {"num-examples": len(data.x_train), "site": s.site, "train_s": time.perf_counter() - t0, **metrics}
    )
    return Message(RecordDict({"arrays": reply_arrays, "metrics": record}), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the server's model combined with this site's local part; save artefacts in the last round."""
    s = _Site(msg, context)
    model = s.model(training=False)
    params.set_travelling(model, msg.content["arrays"], s.split)
    data = s.data()
    metrics = s.phase.evaluate(model, data, s.run.seed, s.site_dir)
    if s.round == s.run.rounds_of(s.phase.name):
        _save_final(s, model)
    record = MetricRecord({"num-examples": len(data.x_val), "site": s.site, **metrics})
    return Message(RecordDict({"metrics": record}), reply_to=msg)


def _save_final(s: _Site, model: torch.nn.Module) -> None:
    from medfedpure.models.weights import save_model

    phase = s.phase
    extra: dict[str, object] = {"site": s.site, "rounds": s.run.rounds_of(phase.name), "split": s.split, "federated": True,
                                "role": phase.name, **phase.metadata(s.run)}
    mcfg = phase.config(s.run.preset, s.run.image_size, s.run.classifier_width, s.run.classifier_stem)
    save_model(s.site_dir / phase.site_file, model, mcfg, phase.kind, extra=extra)


def query(msg: Message, context: Context) -> Message:
    """``phase = "register"``: declare this site's training-set size; ``"calibrate"``: calibrate the gate."""
    phase = str(msg.content["config"].get("phase", ""))
    if phase not in ("register", "calibrate"):
        raise ValueError(f"unknown query phase {phase!r}: only 'register' and 'calibrate' are served")
    s = _Site(msg, context)
    if phase == "register":
        # The server caps every later ``num-examples`` of this node at the count declared here.
        return Message(RecordDict({"metrics": MetricRecord({"site": s.site, "num-examples": len(s.data().x_train)})}),
                       reply_to=msg)
    calib = tasks.calibrate_site(s.site_dir, s.data())
    (s.site_dir / "calibration.json").write_text(json.dumps(calib, indent=2, sort_keys=True))
    numeric = {k: float(v) for k, v in calib.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return Message(
        RecordDict({"metrics": MetricRecord({"site": s.site, **numeric}),
                    "calibration": ConfigRecord({"json": json.dumps(calib)})}),
        reply_to=msg,
    )


def bind_run_config(run_config: Mapping[str, Any]) -> Mod:
    """A mod that shows the handlers ``run_config`` as ``context.run_config`` (keys the runtime sets win).

    The simulation runtime of ``flwr.simulation.run_simulation`` hands in-process apps an empty run
    config; binding the run's ``FedConfig.to_run_config()`` gives the handlers what the deployment
    runtime reads from the app's ``pyproject.toml``. Flower forbids changing a context's run config,
    so the handlers get a view of the context that shares its node config and ``state``.
    """
    bound = dict(run_config)

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        view = Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                       state=context.state, run_config={**bound, **dict(context.run_config)})
        return call_next(msg, view)

    return mod


def make_client_app(run_config: Mapping[str, Any] | None = None) -> ClientApp:
    """The ClientApp with the train / evaluate / query handlers; ``run_config`` as :func:`bind_run_config`."""
    client = ClientApp(mods=[bind_run_config(run_config)] if run_config else None)
    client.train()(train)
    client.evaluate()(evaluate)
    client.query()(query)
    return client


# The deployment runtime's ClientApp: the run config comes from the app's pyproject.toml.
app = make_client_app()
