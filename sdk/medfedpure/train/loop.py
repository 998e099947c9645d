"""The epoch loop shared by the training jobs: validation each epoch, early stopping, resumption.

Each job supplies ``train_epoch(epoch) -> dict`` and ``validate() -> dict``; this module keeps the
best weights (in memory, and on disk when a checkpoint folder is given), stops after ``patience``
epochs without improvement, and — with ``checkpoint_dir`` — writes after every epoch:

- ``{name}.last.safetensors``  the model (safetensors, config in metadata)
- ``{name}.optim.safetensors`` the optimizer's per-parameter state (:func:`optimizer_state`)
- ``{name}.state.json``        epoch, best metric/epoch, patience counter, history
- ``{name}.best.safetensors``  the best model so far

``resume=True`` restarts from those files. Per-epoch randomness comes from generators seeded by
``(seed, epoch)``, so a resumed run continues exactly as an uninterrupted one would.

Optimizer state, the one codec for it: :func:`optimizer_state` / :func:`load_optimizer_state` move
an optimizer's per-parameter tensors (AdamW: ``exp_avg``, ``exp_avg_sq``, ``step``) out of and into
a freshly built optimizer, as a flat ``dict[str, Tensor]`` keyed ``"{param_index}.{name}"``
(safetensors-ready, no pickle). Resumption saves it beside the model; federated rounds carry it from
round to round. Hyper-parameters are not part of it: the job rebuilds its optimizer from its config
and sets the learning rate every step (:func:`cosine_lr`). Together with a schedule position (global
epoch offset and total, see ``train.classifier.train_classifier``), successive short calls continue
one long run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from medfedpure.models.weights import WeightsError as CheckpointError
from medfedpure.models.weights import load_model, load_tensors, save_model, save_tensors

__all__ = ["fit", "epoch_generator", "cosine_lr", "optimizer_state", "load_optimizer_state"]


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for one epoch's randomness, a pure function of (seed, epoch, stream)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + epoch * 7919 + stream * 104_729) % (2**63))


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to 1 % of ``base`` at ``total``.

    The one cosine envelope of the project: the training jobs call it per optimizer step, and the
    federation scales its rounds' learning rates with it (``base = 1``, no warm-up, one step a round).
    """
    if step < warmup:
        return base * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def optimizer_state(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as detached copies, keyed ``"{param_index}.{name}"``.

    Hyper-parameters (``param_groups``) are not included: the caller rebuilds the optimizer from its
    config and the loop sets the learning rate every step. Raises ``ValueError`` if the optimizer
    keeps non-tensor per-parameter state (it could not travel as safetensors).
    """
    tensors: dict[str, torch.Tensor] = {}
    for idx, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"optimizer state {idx}.{name} is a {type(v).__name__}, not a tensor: "
                                 "this optimizer's state cannot be carried as safetensors")
            tensors[f"{idx}.{name}"] = v.detach().clone()
    return tensors


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Load :func:`optimizer_state` output into a freshly built ``opt`` over the same parameters.

    The tensors are copied (the caller's dict is not modified nor aliased). Raises ``ValueError``
    when a key names a parameter index the optimizer does not have, or a moment's shape differs
    from its parameter's (state saved for another model).
    """
    sd = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        idx_s, _, name = key.partition(".")
        if not idx_s.isdigit() or not name:
            raise ValueError(f"optimizer state key {key!r}: expected '<param_index>.<name>'")
        idx = int(idx_s)
        if idx >= len(params):
            raise ValueError(f"optimizer state for parameter {idx}, but the optimizer has {len(params)}: "
                             "the state was saved for another model")
        if v.dim() > 0 and tuple(v.shape) != tuple(params[idx].shape):
            raise ValueError(f"optimizer state {key} has shape {tuple(v.shape)}, parameter {idx} has "
                             f"{tuple(params[idx].shape)}: the state was saved for another model")
        state.setdefault(idx, {})[name] = v.detach().clone()
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def _is_better(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def fit(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    train_epoch: Callable[[int], dict[str, float]],
    validate: Callable[[], dict[str, float]],
    epochs: int,
    patience: int,
    monitor: str,
    mode: str,
    model_cfg: Any,
    kind: str,
    name: str,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    min_delta: float = 0.0,
) -> dict[str, Any]:
    """Run epochs with validation and early stopping; leaves ``model`` holding the best weights.

    Returns ``{"history": [per-epoch dicts], "best_epoch", "best": {monitor: value},
    "stopped_early", "epochs_run", "wall_s"}``.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode={mode!r}: use 'max' or 'min'")
    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    state: dict[str, Any] = {"epoch": 0, "best": None, "best_epoch": -1, "bad_epochs": 0, "history": [],
                             "wall_s": 0.0}
    best_sd: dict[str, torch.Tensor] | None = None
    if resume:
        if ckdir is None:
            raise ValueError("resume=True needs checkpoint_dir")
        state_path = ckdir / f"{name}.state.json"
        if not state_path.is_file():
            raise CheckpointError(f"cannot resume: {state_path} does not exist (start without --resume)")
        state = json.loads(state_path.read_text())
        last, _, _ = load_model(ckdir / f"{name}.last.safetensors")
        model.load_state_dict(last.state_dict())
        state.pop("optim", None)  # optimizer scalars written by older versions: the config rebuilds them
        load_optimizer_state(optimizer, load_tensors(ckdir / f"{name}.optim.safetensors"))
        if (ckdir / f"{name}.best.safetensors").is_file():
            best_sd = load_model(ckdir / f"{name}.best.safetensors")[0].state_dict()

    bar = None
    if progress:
        from medfedpure.progress import progress as progress_bar

        bar = progress_bar(total=epochs, initial=state["epoch"], desc=name, unit="epoch")
    stopped_early = False
    t_start = time.perf_counter() - state["wall_s"]
    while state["epoch"] < epochs:
        epoch = state["epoch"]
        if state["bad_epochs"] >= patience:
            stopped_early = True
            break
        t0 = time.perf_counter()
        model.train()
        tr = train_epoch(epoch)
        model.eval()
        with torch.no_grad():
            va = validate()
        row = {"epoch": epoch, **{f"train_{k}": float(v) for k, v in tr.items()},
               **{f"val_{k}": float(v) for k, v in va.items()}, "epoch_s": time.perf_counter() - t0}
        state["history"].append(row)
        value = float(va[monitor])
        if _is_better(value, state["best"], mode, min_delta):
            state.update(best=value, best_epoch=epoch, bad_epochs=0)
            best_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if ckdir is not None:
                save_model(ckdir / f"{name}.best.safetensors", model, model_cfg, kind,
                           extra={"epoch": epoch, monitor: value})
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        state["wall_s"] = time.perf_counter() - t_start
        if ckdir is not None:
            save_model(ckdir / f"{name}.last.safetensors", model, model_cfg, kind, extra={"epoch": epoch})
            save_tensors(ckdir / f"{name}.optim.safetensors", optimizer_state(optimizer))
            (ckdir / f"{name}.state.json").write_text(json.dumps(state, indent=1))
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k.startswith(("train_loss", "val_"))})
    if bar is not None:
        bar.close()
    if state["bad_epochs"] >= patience and state["epoch"] < epochs:
        stopped_early = True
    if best_sd is not None:
        model.load_state_dict(best_sd)
    model.eval()
    return {"history": state["history"], "best_epoch": state["best_epoch"], "best": {monitor: state["best"]},
            "stopped_early": stopped_early, "epochs_run": state["epoch"],
            "wall_s": time.perf_counter() - t_start}
