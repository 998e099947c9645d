"""What one site does in one round of one phase, over the ``medfedpure.train`` loops.

Every function here is plain PyTorch + numpy and knows nothing about Flower (the quickstart-pytorch
``task.py`` pattern): ``phases.py`` names them in its registry, ``client_app.py`` calls them through
it. Per phase there is one local training function with the signature :data:`LocalTrain` and one
evaluation function with the signature :data:`LocalEvaluate`; both return scalar metrics for the
server.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfedpure.data import load_split
from medfedpure.models.diffusion import to_model_space
from medfedpure.models.weights import load_model
from medfedpure.train.calibrate import CalibrationConfig, calibrate_gate
from medfedpure.train.classifier import ClassifierTrainConfig, evaluate_classifier, train_classifier
from medfedpure.train.denoiser import load_denoiser_cached, purification_point
from medfedpure.train.detector import (
    ClassifierLoadError,
    DetectorTrainConfig,
    attacked,
    detector_scores,
    evade,
    evaluate_detector,
    fit_detector,
    load_classifier,
)
from medfedpure.train.distill import DistillConfig, distill_student
from medfedpure.train.loop import cosine_lr
from medfedpure.train.mae import MAETrainConfig, evaluate_mae, train_mae
from medfedpure.train.purifier import DenoiserTrainConfig, train_denoiser

PRESETS = ("tiny", "small")

# Seeds of a site: its model's local parts start from seed + LOCAL_INIT_STRIDE·(site + 1); its
# training jobs are seeded with seed + SITE_STRIDE·site (the local-only baseline's seed too), plus
# ROUND_STRIDE·round for the phases whose rounds are complete short runs.
LOCAL_INIT_STRIDE = 1000
SITE_STRIDE = 104_729
ROUND_STRIDE = 7919

OptimizerState = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SiteData:
    """One site's splits: ``x_*`` float32 ``[N,1,S,S]`` in [0,1], ``y_*`` int64 ``[N]`` (0 no_tumor, 1 tumor)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@functools.lru_cache(maxsize=8)
def load_site(data_dir: str, site: int, size: int, max_train: int = 0) -> SiteData:
    """Load site ``site``'s train/val/test splits at ``size`` px (cached per process).

    ``max_train > 0`` keeps the first ``max_train`` training scans (tiny test runs); the split
    order is the recorded, seeded order of ``splits.json``.
    """
    parts = {s: load_split(data_dir, site, s, size) for s in ("train", "val", "test")}
    xtr, ytr = parts["train"]
    if max_train > 0:
        xtr, ytr = xtr[:max_train], ytr[:max_train]
    for name, (x, y) in parts.items():
        if len(x) == 0:
            raise ValueError(f"site {site} of {data_dir} has an empty {name} split: re-split the data set")
        if len(x) != len(y):
            raise ValueError(f"site {site} {name}: {len(x)} scans but {len(y)} labels")
    return SiteData(xtr, ytr, parts["val"][0], parts["val"][1], parts["test"][0], parts["test"][1])


@dataclass(frozen=True)
class LocalJob:
    """One site's local training in one round.

    preset: the training preset ("tiny" or "small").   epochs: local epochs this round (>= 1).
    seed: seeds the round's generators (a stateful phase: the site's seed for the whole federation).
    lr_scale: multiplies the preset's learning rate, in (0, 1] (the envelope over rounds,
        :func:`round_lr_scale`; stateless phases only).
    site_dir: the site's folder (the student reads ``SITE/global/teacher.safetensors`` from it).
    schedule: ``(offset, total)`` in epochs, stateful phases only: this round's epochs are global
        epochs ``offset … offset + epochs − 1`` of one warm-up + cosine schedule of ``total`` epochs;
        ``None``: the round is a complete short run of its own.
    classifier_overrides: ``ClassifierTrainConfig`` fields the classifier's round sets on top of the
        preset (the run's adversarial-training recipe, ``FedConfig.classifier_overrides``), as
        sorted ``(name, value)`` pairs (a mapping is accepted); other phases ignore it.
    denoiser: the frozen denoiser of denoised-smoothing fine-tuning (a bundle folder, a run folder
        or a unet ``.safetensors`` file; ``FedConfig.denoiser``), read by the classifier's round when
        its overrides set ``smoothing_sigmas``; "" (none) otherwise.
    denoise_t_max: the diffusion times the teacher (``t_hi``) and the student (``t_max``) train on reach
        this (``FedConfig.denoise_t_max``); 0: the presets' (250).
    harden: the detector's round also trains against the site's evasion of the round's model
        (``FedConfig.detector_harden_rounds``); other phases ignore it.
    detector_l2: an ℓ2 radius (scan units) added to the detector's attacked set (0: ℓ∞ only;
        ``FedConfig.detector_l2``).
    device: where the classifier's round trains (``FedConfig.device``: cpu, cuda or auto); other phases
        train on the CPU.
    """

    preset: str
    epochs: int
    seed: int
    lr_scale: float = 1.0
    site_dir: Path | None = None
    schedule: tuple[int, int] | None = None
    classifier_overrides: tuple[tuple[str, Any], ...] = ()
    denoiser: str = ""
    denoise_t_max: int = 0
    harden: bool = False
    detector_l2: float = 0.0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}: use 'tiny' or 'small'")
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs}: at least one local epoch per round")
        if not 0 < self.lr_scale <= 1:
            raise ValueError(f"lr_scale={self.lr_scale}: must be in (0, 1]")
        if self.schedule is not None:
            offset, total = (int(v) for v in self.schedule)
            if offset < 0 or total < offset + self.epochs:
                raise ValueError(f"schedule={self.schedule}: need 0 <= offset and offset + epochs <= total")
            object.__setattr__(self, "schedule", (offset, total))
        over = self.classifier_overrides
        items = over.items() if isinstance(over, dict) else over
        object.__setattr__(self, "classifier_overrides", tuple(sorted((str(k), v) for k, v in items)))
        object.__setattr__(self, "denoiser", str(self.denoiser or ""))
        if isinstance(self.denoise_t_max, bool) or not isinstance(self.denoise_t_max, int) or self.denoise_t_max < 0:
            raise ValueError(f"denoise_t_max={self.denoise_t_max!r}: 0 (the presets') or a diffusion time > 0")

    def stateless(self, cls: Any, **fields: Any) -> Any:
        """``cls.preset(preset)`` as one short complete run: this round's epochs and seed, no warm-up
        (the server's model is already warm after round 1), early stopping that cannot trigger, and
        the learning rate scaled by ``lr_scale``. ``fields`` names the config's warm-up field."""
        cfg = cls.preset(self.preset, epochs=self.epochs, seed=self.seed, patience=self.epochs + 1, **fields)
        return replace(cfg, lr=cfg.lr * self.lr_scale)


LocalTrain = Callable[[torch.nn.Module, SiteData, LocalJob, "OptimizerState | None"],
                      "tuple[dict[str, float], OptimizerState | None]"]
LocalEvaluate = Callable[[torch.nn.Module, SiteData, int, "Path | None"], "dict[str, float]"]


def round_lr_scale(server_round: int, num_rounds: int) -> float:
    """The learning-rate envelope over rounds: ``train.loop.cosine_lr`` with base 1 and no warm-up.

    1 in round 1, ``0.01 + 0.99·½(1 + cos(π·(r−1)/R))`` in round r of R (1 when R <= 1).
    """
    if num_rounds <= 1:
        return 1.0
    return cosine_lr(max(server_round, 1) - 1, num_rounds, 1.0, 0)


def _last(out: dict[str, Any], key: str) -> float:
    for row in reversed(out.get("history") or []):
        if key in row:
            return float(row[key])
    return float("nan")


def _round_metrics(out: dict[str, Any]) -> dict[str, float]:
    """A training loop's result → ``train_loss`` and its final validation metrics (``val_*``)."""
    val = out.get("val", {}) if isinstance(out, dict) else {}
    return {"train_loss": _last(out, "train_loss"), **{f"val_{k}": float(v) for k, v in val.items()}}


def train_classifier_round(model: torch.nn.Module, data: SiteData, job: LocalJob,
                           optimizer_state: OptimizerState | None = None) -> tuple[dict[str, float], OptimizerState]:
    """The classifier's round: ``train_classifier`` continuing the site's run (stateful).

    With ``job.schedule`` the round runs global epochs of one warm-up + cosine schedule (the
    preset's warm-up, as a local run has) and ``optimizer_state`` is the AdamW state the site
    returned last round (``None`` in round 1): a site's rounds continue one long local run, and for
    a site whose weights nobody replaces R one-epoch rounds equal one R-epoch run bit for bit. The
    moments of the travelling parameters are kept too although aggregation replaces those weights:
    the aggregated weights move little per round, so the site's moments stay a good preconditioner,
    and none of it leaves the site. Without ``job.schedule`` the round is a short complete run.

    ``job.classifier_overrides`` (the run's adversarial-training recipe) are set on the preset's
    config: the site attacks its own training scans, and with ``robust_val > 0`` the metrics add
    ``val_robust_accuracy`` (PGD at the training ε on the site's fixed validation subset, of the
    kept model). When they set ``smoothing_sigmas``, the round fine-tunes with denoised smoothing
    through ``job.denoiser`` (loaded once per process, ``train.denoiser.load_denoiser_cached``; it
    stays on the site); when they set ``adv_through_purifier``, the PGD batches are crafted through that
    denoiser's purification (t* the run's ``purifier_t``, else the denoiser's recorded t_min, else 60; K its
    recorded steps) and the round trains on the purified scans; without either the denoiser is never loaded. With ``job.site_dir`` the config the round trained with is written to
    ``SITE/classifier_train_config.json`` (overwritten each round).

    Returns ``(metrics, the AdamW state after the round)``.
    """
    over = dict(job.classifier_overrides)
    if job.schedule is None:
        cfg = job.stateless(ClassifierTrainConfig, warmup_epochs=0, **over)
        offset, total = 0, None
    else:
        offset, total = job.schedule
        cfg = ClassifierTrainConfig.preset(job.preset, epochs=job.epochs, seed=job.seed, patience=job.epochs + 1,
                                           **over)
        cfg = replace(cfg, lr=cfg.lr * job.lr_scale)
    denoiser = None
    if cfg.smoothing_sigmas or cfg.adv_through_purifier:
        if not job.denoiser:
            what = "smoothing_sigmas" if cfg.smoothing_sigmas else "adv_through_purifier"
            raise ValueError(f"{what} is set but the job has no denoiser: set the run's denoiser "
                             "(--denoiser BUNDLE|RUN)")
        denoiser, schedule = load_denoiser_cached(job.denoiser)
        if cfg.adv_through_purifier:  # t* (unless the run set one) and K from the denoiser's own schedule
            t_star, k = purification_point(schedule, over.get("purifier_t"))
            cfg = replace(cfg, purifier_t=t_star, purifier_steps=k)
    if job.site_dir is not None:
        job.site_dir.mkdir(parents=True, exist_ok=True)
        record = {"train": cfg.to_dict(), "overrides": over, "schedule": [offset, total]}
        if denoiser is not None:
            record["denoiser"] = job.denoiser
        (job.site_dir / "classifier_train_config.json").write_text(json.dumps(record, indent=1, sort_keys=True))
    out = train_classifier(model, (data.x_train, data.y_train), (data.x_val, data.y_val), cfg, progress=False,
                           optimizer_state=optimizer_state, schedule_offset=offset, schedule_total=total,
                           return_optimizer_state=True, denoiser=denoiser, device=job.device)
    metrics = {"train_loss": _last(out, "train_loss"), "val_loss": float(out["val"]["loss"]),
               "val_accuracy": float(out["val"]["accuracy"])}
    if "robust_val" in out:
        metrics["val_robust_accuracy"] = float(out["robust_val"]["accuracy"])
    return metrics, out["optimizer_state"]


def train_mae_round(model: torch.nn.Module, data: SiteData, job: LocalJob,
                    optimizer_state: OptimizerState | None = None) -> tuple[dict[str, float], None]:
    """The MAE's round: ``train_mae`` as a short complete run (stateless; ``optimizer_state`` unused)."""
    out = train_mae(model, data.x_train, data.x_val, job.stateless(MAETrainConfig, warmup_epochs=0), progress=False)
    return _round_metrics(out), None


def train_teacher_round(model: torch.nn.Module, data: SiteData, job: LocalJob,
                        optimizer_state: OptimizerState | None = None) -> tuple[dict[str, float], None]:
    """The teacher's round: ``train_denoiser`` (x0-prediction on the DDPM schedule), stateless."""
    cfg = job.stateless(DenoiserTrainConfig, warmup_steps=0,
                        **({"t_hi": float(job.denoise_t_max)} if job.denoise_t_max else {}))
    out = train_denoiser(model, model.schedule, data.x_train, data.x_val, cfg, progress=False)
    return _round_metrics(out), None


def train_student_round(model: torch.nn.Module, data: SiteData, job: LocalJob,
                        optimizer_state: OptimizerState | None = None) -> tuple[dict[str, float], None]:
    """The student's round: ``distill_student`` from this site's copy of the final federated teacher."""
    path = job.site_dir / "global" / "teacher.safetensors" if job.site_dir is not None else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"no teacher at {job.site_dir}/global/teacher.safetensors: run the 'teacher' phase before 'student'"
        )
    teacher, _, _ = load_model(path)
    cfg = job.stateless(DistillConfig, warmup_steps=0,
                        **({"t_max": float(job.denoise_t_max)} if job.denoise_t_max else {}))
    out = distill_student(teacher, model, teacher.schedule, data.x_train, data.x_val, cfg, progress=False,
                          init_from_teacher=False)
    return _round_metrics(out), None


def _site_classifier(site_dir: Path | None) -> tuple[torch.nn.Module, Path]:
    """The site's own final classifier (``SITE/classifier.safetensors``, written by the classifier phase), loaded by
    ``train.detector.load_classifier`` (eval mode, gradients off), and its path."""
    path = None if site_dir is None else site_dir / "classifier.safetensors"
    if path is None or not path.is_file():
        raise FileNotFoundError(f"no classifier at {path}: run the 'classifier' phase before 'detector' (the "
                                "detector guards the site's own classifier)")
    try:
        return load_classifier(path), path
    except ClassifierLoadError as exc:
        raise ValueError(f"{path} is not the site's classifier: {exc}") from exc


def _cached_attack(path: Path, clf_path: Path, x: torch.Tensor, spec: object,
                   make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """An attacked copy of ``x`` against the site's classifier, kept in ``path`` under a key of the classifier's
    bytes, the scans and the attack (``spec``, JSON): the first round computes it (``make``), later rounds — often
    a fresh client process — read it back. The attack is seeded, so a reused copy is the one a recomputation
    would give."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import save_file

    h = hashlib.sha256(clf_path.read_bytes())
    h.update(x.numpy().tobytes())
    h.update(json.dumps(spec).encode())
    key = h.hexdigest()
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return f.get_tensor("adv")
    adv = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"adv": adv.contiguous()}, str(path), metadata={"key": key})
    return adv


def _attacked_train_set(site_dir: Path, clf: torch.nn.Module, clf_path: Path, x: torch.Tensor, y: torch.Tensor,
                        cfg: DetectorTrainConfig) -> torch.Tensor:
    """The detector's attacked copy of the site's training scans, against the site's classifier: computed once
    and kept in ``SITE/detector_attacked.safetensors`` (:func:`_cached_attack`). Seeded by ``cfg.seed``."""
    eps, norms = cfg.attacks(len(x))
    return _cached_attack(site_dir / "detector_attacked.safetensors", clf_path, x,
                          [eps.tolist(), norms.tolist(), cfg.attack_steps, cfg.seed],
                          lambda: attacked(clf, x, y, eps, steps=cfg.attack_steps, seed=cfg.seed, norm=norms))


#: The detector's federated rounds train at this fraction of ``DetectorTrainConfig.lr`` (the one-cycle peak of a
#: centralised run): a round's update must stay within the update validation's relative-norm bound.
DETECTOR_ROUND_LR_FRACTION = 0.25


def train_detector_round(model: torch.nn.Module, data: SiteData, job: LocalJob,
                         optimizer_state: OptimizerState | None = None) -> tuple[dict[str, float], None]:
    """The attack detector's round (stateless): BCE on the site's clean training scans against their PGD copies
    crafted on the site's own final classifier (``train.detector``; ℓ∞ radii of the preset, plus
    ``job.detector_l2``), Adam at :data:`DETECTOR_ROUND_LR_FRACTION` of the preset's from-scratch peak × the
    round's envelope — at the full peak three of four sites' round-2 updates were 1.1–2.4 × the weights' norm and
    the federation's update validation (``max_relative_norm`` 1) dropped them. With ``job.harden`` the site first
    runs the detector's evasion (PGD that fools its classifier and keeps the score under τ, τ at the target
    false-flag rate on its clean validation scans) on ``harden_scans`` training scans against the model it
    received, and trains on those too: federated adversarial training of the detector. Scans and classifier
    never leave the site. Metrics: ``train_loss``, and with hardening ``evasion_flagged_before`` (the share of
    the evasion the received model still flagged)."""
    cfg = DetectorTrainConfig.preset(job.preset, train_eps_l2=(job.detector_l2,) if job.detector_l2 else ())
    clf, clf_path = _site_classifier(job.site_dir)
    assert job.site_dir is not None
    x, y = torch.from_numpy(np.ascontiguousarray(data.x_train)), torch.from_numpy(np.ascontiguousarray(data.y_train))
    clean, adv = [x], [_attacked_train_set(job.site_dir, clf, clf_path, x, y, cfg)]
    metrics: dict[str, float] = {}
    if job.harden:
        x_cal = torch.from_numpy(np.ascontiguousarray(data.x_val))
        tau = float(np.quantile(detector_scores(model, x_cal), 1 - cfg.target_false_flag_rate))
        pick = np.random.default_rng(job.seed).permutation(len(x))
        pick = torch.from_numpy(np.sort(pick[:cfg.harden_scans] if cfg.harden_scans else pick))
        ev = evade(clf, model, x[pick], y[pick], cfg.harden_eps, tau, steps=cfg.harden_steps, seed=job.seed)
        metrics["evasion_flagged_before"] = float((detector_scores(model, ev) >= tau).mean())
        clean.append(x[pick])
        adv.append(ev)
    losses = fit_detector(model, torch.cat(clean), torch.cat(adv), epochs=job.epochs, seed=job.seed,
                          batch_size=cfg.batch_size, lr=cfg.lr * DETECTOR_ROUND_LR_FRACTION * job.lr_scale,
                          one_cycle=False, progress=False)
    return {"train_loss": float(losses[-1]), **metrics}, None


def evaluate_detector_site(model: torch.nn.Module, data: SiteData, seed: int = 0,
                           site_dir: Path | None = None) -> dict[str, float]:
    """``val_tau`` (the score's 95 % quantile on the clean validation scans), ``test_false_flag_rate`` at it, and
    ``test_auroc_4`` / ``test_auroc_8``: clean test scans against their PGD-10 ℓ∞ 4 and 8/255 copies on the site's
    own classifier (``train.detector.evaluate_detector``). The attacked test scans depend on the classifier and
    the seed only, not on the detector: the first round computes them, later rounds read them back from
    ``SITE/detector_eval_attacked_<norm><radius>.safetensors`` (:func:`_cached_attack`)."""
    clf, clf_path = _site_classifier(site_dir)
    assert site_dir is not None
    steps = 10

    def attack(x: torch.Tensor, y: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
        assert norm == "linf", norm  # the evaluation below asks for ℓ∞ radii only (no eps_l2)
        name = f"detector_eval_attacked_linf{eps * 255:g}.safetensors"
        return _cached_attack(site_dir / name, clf_path, x, [eps, norm, steps, seed + 1],
                              lambda: attacked(clf, x, y, eps, steps=steps, seed=seed + 1, norm=norm))

    r = evaluate_detector(model, clf, torch.from_numpy(np.ascontiguousarray(data.x_val)),
                          torch.from_numpy(np.ascontiguousarray(data.x_test)),
                          torch.from_numpy(np.ascontiguousarray(data.y_test)), [4 / 255, 8 / 255], seed=seed + 1,
                          steps=steps, attack=attack)
    return {"val_tau": float(r["tau"]), "test_false_flag_rate": float(r["false_flag_rate"]),
            "test_auroc_4": float(r["auroc"]["4/255"]), "test_auroc_8": float(r["auroc"]["8/255"])}


def _eval_splits(data: SiteData) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {"val": (data.x_val, data.y_val), "test": (data.x_test, data.y_test)}


@torch.no_grad()
def evaluate_classifier_site(model: torch.nn.Module, data: SiteData, seed: int = 0,
                             site_dir: Path | None = None) -> dict[str, float]:
    """``val_/test_accuracy`` and ``val_/test_loss`` of the personalised model (global + local part)."""
    model.eval()
    out: dict[str, float] = {}
    for split, (x, y) in _eval_splits(data).items():
        m = evaluate_classifier(model, x, y)
        out[f"{split}_accuracy"] = float(m["accuracy"])
        out[f"{split}_loss"] = float(m["loss"])
    return out


@torch.no_grad()
def evaluate_mae_site(model: torch.nn.Module, data: SiteData, seed: int = 0,
                      site_dir: Path | None = None) -> dict[str, float]:
    """``val_/test_masked_mse`` of the MAE."""
    model.eval()
    return {f"{split}_masked_mse": float(evaluate_mae(model, x)["masked_mse"])
            for split, (x, _) in _eval_splits(data).items()}


@torch.no_grad()
def evaluate_denoiser_site(model: torch.nn.Module, data: SiteData, seed: int = 0,
                           site_dir: Path | None = None) -> dict[str, float]:
    """``val_/test_denoise_mse``: the x0-prediction MSE of a teacher or student at fixed times {50, 150}.

    On the first 32 scans of each split (``[32,1,S,S]`` in model space), with noise drawn from
    ``seed`` (deterministic, the same for every site and round).
    """
    model.eval()
    schedule = model.schedule
    out: dict[str, float] = {}
    for split, (x, _) in _eval_splits(data).items():
        y0 = to_model_space(torch.as_tensor(x[:32], dtype=torch.float32))
        g = torch.Generator().manual_seed(seed + 4242)
        errs = []
        for tv in (50.0, 150.0):
            t = torch.full((len(y0),), tv)
            noise = torch.randn(y0.shape, generator=g)
            x0_hat = model(schedule.q_sample(y0, t, noise), t)
            errs.append(float(((x0_hat - y0) ** 2).mean()))
        out[f"{split}_denoise_mse"] = float(np.mean(errs))
    return out


def calibrate_site(site_dir: Path, data: SiteData) -> dict[str, Any]:
    """Calibrate this site's gate on its own clean validation scans (``train.calibrate``).

    Uses the site's copies of the federated MAE and student (``SITE/global/``); the purification
    range and step count come from the student checkpoint's metadata. Returns the
    ``calibration.json`` content.
    """
    g = site_dir / "global"
    missing = [n for n in ("mae", "student") if not (g / f"{n}.safetensors").is_file()]
    if missing:
        raise FileNotFoundError(f"site copies {missing} missing under {g}: run the mae and student phases first")
    mae, _, _ = load_model(g / "mae.safetensors")
    return calibrate_gate(mae, data.x_val, CalibrationConfig(), run=g)
