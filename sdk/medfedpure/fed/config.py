"""The federated run's configuration: one frozen dataclass, flowing CLI → run folder → Flower run config.

Its fields are the run's constants, and they reach the ServerApp and every ClientApp as Flower's
``context.run_config`` on both runtimes (``to_run_config`` / ``from_run_config``: flat keys with
dashes, as Flower's run config requires): the deployment runtime reads them from the generated
app's ``[tool.flwr.app.config]`` (overridable with ``flwr run --run-config``), the simulation
runtime binds the same mapping to its in-process apps. Messages carry only per-round values
(phase, round, split, run token).

The classifier's adversarial-training fields (``adv`` … ``select``, :data:`ADV_FIELDS`) and its
denoised-smoothing fields (``smoothing_sigmas``, ``smoothing_frac``, :data:`SMOOTHING_FIELDS`) reach
each site's ``ClassifierTrainConfig`` through :meth:`FedConfig.classifier_overrides`: at their
defaults the overrides are empty and every site trains the preset's recipe, exactly as before they
existed. The smoothing denoiser itself travels as a path (``denoiser``): each site loads it once per
process, its weights are never sent.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from medfedpure.fed.params import SPLITS
from medfedpure.fed.phases import DEFAULT_PHASES, PHASES, PRESETS
from medfedpure.fed.strategies import STRATEGIES
from medfedpure.fed.validation import DEFAULT_MEDIAN_RATIO, UpdateValidationConfig
from medfedpure.models.diffusion import PURIFY_DEFAULTS, PurifySchedule
from medfedpure.train.classifier import ADV_METHODS, ADV_NORMS, ClassifierTrainConfig
from medfedpure.train.device import DEVICES

#: The ``FedConfig`` fields passed to each site's ``ClassifierTrainConfig`` (same names there).
ADV_FIELDS = ("adv", "adv_eps", "adv_steps", "adv_norm", "adv_start_epoch", "trades_beta", "robust_val", "select")
_CLS = ClassifierTrainConfig()
#: The defaults of :data:`ADV_FIELDS`: ``ClassifierTrainConfig``'s, except ``adv_eps`` and
#: ``adv_start_epoch`` whose ``-1`` means "the preset's" (the presets differ in both).
ADV_DEFAULTS: dict[str, Any] = {"adv": _CLS.adv, "adv_eps": -1.0, "adv_steps": _CLS.adv_steps,
                                "adv_norm": _CLS.adv_norm, "adv_start_epoch": -1, "trades_beta": _CLS.trades_beta,
                                "robust_val": _CLS.robust_val, "select": _CLS.select}
#: The ``FedConfig`` fields of denoised-smoothing fine-tuning (same names in ``ClassifierTrainConfig``).
SMOOTHING_FIELDS = ("smoothing_sigmas", "smoothing_frac")
#: Their defaults: ``ClassifierTrainConfig``'s (no sigmas: smoothing off).
SMOOTHING_DEFAULTS: dict[str, Any] = {"smoothing_sigmas": (), "smoothing_frac": _CLS.smoothing_frac}
#: The ``FedConfig`` fields of adversarial training through the purifier (same names in ``ClassifierTrainConfig``).
THROUGH_FIELDS = ("adv_through_purifier", "purifier_t", "purifier_eot")
#: Their defaults: off; ``purifier_t`` 0 means the denoiser's own t_min (recorded in its schedule), else 60.
THROUGH_DEFAULTS: dict[str, Any] = {"adv_through_purifier": False, "purifier_t": 0.0,
                                    "purifier_eot": _CLS.purifier_eot}


def parse_sigmas(value: Any) -> tuple[float, ...]:
    """``"0.12,0.25"``, a sequence of numbers, or ``""`` / ``None`` → a tuple of floats (``ValueError``
    naming the bad entry). Ranges are checked by ``ClassifierTrainConfig``."""
    if value is None:
        return ()
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    out = []
    for v in items:
        if isinstance(v, str) and not v:
            continue
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise ValueError(f"smoothing_sigmas: {v!r} is not a number; give comma-separated sigmas in scan "
                             "units, e.g. 0.12,0.25,0.5") from None
    return tuple(out)


def smoothing_overrides(preset: str, adv: dict[str, Any] | None = None, **values: Any) -> dict[str, Any]:
    """The ``ClassifierTrainConfig`` overrides of the denoised-smoothing ``values`` (``SMOOTHING_FIELDS``).

    Only the values that differ from :data:`SMOOTHING_DEFAULTS` are returned ({} at the defaults).
    They are validated together with the adversarial overrides ``adv`` (``adv_overrides``' result)
    against ``preset``: a σ outside (0, 1], a fraction outside (0, 1], ``smoothing_frac`` without
    sigmas, and ``adv_frac + smoothing_frac > 1`` are ``ValueError``s naming the fix.
    """
    unknown = sorted(set(values) - set(SMOOTHING_FIELDS))
    if unknown:
        raise ValueError(f"unknown denoised-smoothing options {unknown}: use {', '.join(SMOOTHING_FIELDS)}")
    vals = {**SMOOTHING_DEFAULTS, **values}
    vals["smoothing_sigmas"] = parse_sigmas(vals["smoothing_sigmas"])
    vals["smoothing_frac"] = float(vals["smoothing_frac"])
    out = {k: v for k, v in vals.items() if v != SMOOTHING_DEFAULTS[k]}
    if out and not vals["smoothing_sigmas"]:
        raise ValueError(f"smoothing_frac={vals['smoothing_frac']} without smoothing_sigmas does nothing: give "
                         "the sigmas (--smoothing-sigmas, e.g. 0.12,0.25,0.5) or drop --smoothing-frac")
    if out:
        try:
            ClassifierTrainConfig.preset(preset, **{**(adv or {}), **out})
        except ValueError as exc:
            raise ValueError(f"classifier denoised-smoothing training: {exc}") from exc
    return out


def through_overrides(preset: str, adv: dict[str, Any] | None = None, **values: Any) -> dict[str, Any]:
    """The ``ClassifierTrainConfig`` overrides of training through the purifier (``THROUGH_FIELDS``).

    Only the values that differ from :data:`THROUGH_DEFAULTS` are returned ({} at the defaults); a
    ``purifier_t`` of 0 is left out (the site resolves it from its denoiser's schedule). Validated with the
    adversarial overrides ``adv``: through the purifier needs ``adv='pgd'``, and ``purifier_t`` /
    ``purifier_eot`` without ``adv_through_purifier`` do nothing (``ValueError``s naming the fix).
    """
    unknown = sorted(set(values) - set(THROUGH_FIELDS))
    if unknown:
        raise ValueError(f"unknown through-the-purifier options {unknown}: use {', '.join(THROUGH_FIELDS)}")
    vals = {**THROUGH_DEFAULTS, **values}
    vals["adv_through_purifier"] = bool(vals["adv_through_purifier"])
    vals["purifier_t"], vals["purifier_eot"] = float(vals["purifier_t"]), int(vals["purifier_eot"])
    out = {k: v for k, v in vals.items() if v != THROUGH_DEFAULTS[k]}
    if out and not vals["adv_through_purifier"]:
        raise ValueError(f"{', '.join(sorted(out))} without adv_through_purifier does nothing: add "
                         "--adv-through-purifier or drop them")
    if vals["purifier_t"] < 0:
        raise ValueError(f"purifier_t={vals['purifier_t']}: 0 (the denoiser's t_min) or a DDPM step > 0")
    if out:
        try:
            ClassifierTrainConfig.preset(preset, **{**(adv or {}), **out})
        except ValueError as exc:
            raise ValueError(f"classifier adversarial training through the purifier: {exc}") from exc
    return out


def adv_overrides(preset: str, total_epochs: int, **values: Any) -> dict[str, Any]:
    """The ``ClassifierTrainConfig`` overrides of the adversarial-training ``values`` (``ADV_FIELDS``).

    Only the values that differ from :data:`ADV_DEFAULTS` are returned, so the defaults give ``{}``
    (the preset's recipe, unchanged). The result is validated against ``preset`` (``ValueError``
    naming the bad value), and, when adversarial training was asked for, against the federation's
    ``total_epochs`` (rounds × local epochs): a start epoch the schedule never reaches is an error.
    """
    unknown = sorted(set(values) - set(ADV_FIELDS))
    if unknown:
        raise ValueError(f"unknown adversarial-training options {unknown}: use {', '.join(ADV_FIELDS)}")
    vals = {**ADV_DEFAULTS, **values}
    if vals["adv"] not in ADV_METHODS:
        raise ValueError(f"adv={vals['adv']!r}: use one of {', '.join(ADV_METHODS)}")
    if vals["adv_norm"] not in ADV_NORMS:
        raise ValueError(f"adv_norm={vals['adv_norm']!r}: use one of {', '.join(ADV_NORMS)}")
    for name in ("adv_eps", "adv_start_epoch"):
        if vals[name] < 0 and vals[name] != -1:
            raise ValueError(f"{name}={vals[name]}: -1 (the preset's) or >= 0")
    out = {k: v for k, v in vals.items() if v != ADV_DEFAULTS[k]}
    if out.get("adv", "none") != "none" and out.get("adv_eps", ClassifierTrainConfig.preset(preset).adv_eps) == 0:
        raise ValueError(f"adv={out['adv']!r} with adv_eps=0 (the {preset!r} preset's radius): set adv_eps "
                         "(--adv-eps, in 1/255 units, e.g. 8), or adv='none'")
    try:
        cfg = ClassifierTrainConfig.preset(preset, **out)
    except ValueError as exc:
        raise ValueError(f"classifier adversarial training: {exc}") from exc
    if out and cfg.adversarial and cfg.adv_start_epoch >= total_epochs:
        raise ValueError(f"adversarial training starts at global epoch {cfg.adv_start_epoch} but the classifier "
                         f"federation runs rounds × local epochs = {total_epochs} epochs: lower adv_start_epoch "
                         "(--adv-start-epoch) or run more rounds")
    return out


def check_denoise_t_max(denoise_t_max: int, purify_t_max: int) -> None:
    """``denoise_t_max`` (``FedConfig`` and ``BundleBuildConfig``): 0 (the presets' range, t ≤ 250) or a
    diffusion time in [``purify_t_max``, 1000] — the student must cover every t* it purifies at.

    Raises:
        ValueError: naming the value and the allowed range.
    """
    if denoise_t_max and not purify_t_max <= denoise_t_max <= 1000:
        raise ValueError(f"denoise_t_max={denoise_t_max}: 0 (the presets', 250) or a diffusion time in "
                         f"[purify_t_max = {purify_t_max}, 1000]: the student must cover every t* it purifies at")


@dataclass(frozen=True)
class FedConfig:
    """Options of one federated run.

    data_dir: the data set root (``dataset.json``, ``splits.json``, ``site_k/``).
    out_dir: the run folder RUN (layout in docs/interfaces.md "Run folder").
    rounds: federated rounds per phase.   local_epochs: local epochs per round.
    mae_rounds: the MAE phase's rounds when it should differ from ``rounds`` (0: ``rounds``); the MAE needs
        fewer than an adversarially trained classifier (in the width-2 candidate build its 60 rounds were 11 % of
        the classifier + MAE federation's time).
    preset: "tiny" (tests, 32 px) or "small" (the default bundle, 128 px).
    image_size: override the preset's image side (0: the preset's; a multiple of 16, e.g. 64).
    classifier_width: multiplies the classifier's channel counts (1: the preset's; 2: about 4× the
        parameters and the training time). Adversarial training needs capacity: on one site, the
        ``small`` classifier at width 2 kept more of its clean and robust accuracy (benchmarks/RESULTS.md).
    classifier_stem: full-resolution Conv-BN-ReLU layers before each expert's stride-2 stages
        (``MoEConfig.stem``; 0, the default, has none and keeps the classifier's state_dict layout).
        A tumour 2–3 px across is otherwise seen at full resolution only by one strided convolution; on
        one site, one layer gave width 2's clean gain at 1 % more parameters, but half its robust gain,
        and about doubled the training time at 128 px on CPU (benchmarks/RESULTS.md).
    strategy: aggregation rule for every phase (fedavg | fedmedian | fedtrimmedavg | krum).
    num_sites: sites (= nodes); every round waits for all of them.
    phases: which phases to run, in order (subset of classifier, mae, teacher, student, detector; default
        the first four — the attack detector of a learned gate is opt-in).
    detector_harden_rounds: the detector phase's last this many rounds also train against each site's
        evasion of the round's detector (0: none; at most ``rounds``).
    detector_l2: an ℓ2 radius (scan units, e.g. 0.5) added to the detector's PGD training attacks (0: ℓ∞
        radii 2, 4, 8/255 only).
    calibrate: finish with each site calibrating its own gate (needs mae + student).
    classifier_split: what travels for the classifier: "moe" (global expert only; the
        personalised MoE), "all" (FedAvg of one model), "fedbn" (all but normalisation layers).
    max_update_norm / max_relative_norm: update validation bounds (validation.py).
    max_median_ratio: drop an update longer than this × the round's median update norm (≥ 1;
        inf disables; default ``validation.DEFAULT_MEDIAN_RATIO``).
    max_examples: cap on a site's self-reported example count (0: only the count each site
        declared when it registered at the start of the run).
    trim_beta: FedTrimmedAvg's trimmed fraction per side.  krum_f: Krum's assumed number of
        malicious sites (-1: max(0, (n-3)//2)).
    max_train: keep at most this many training scans per site (0: all; for quick runs).
    poison_site / poison_scale: robustness experiments only — site ``poison_site`` (-1: none)
        sends ``w + poison_scale · Δ`` instead of ``w + Δ``.
    student_steps / purify_t_min / purify_t_max: the student's sampling steps K and the t* range
        recorded in the student checkpoints (the gate calibration reads them); defaults
        ``models.diffusion.PURIFY_DEFAULTS``.
    denoise_t_max: the teacher and the student train on diffusion times up to this (of T = 1000;
        0: the presets', 250). Certification by denoised smoothing at σ asks the student for the time
        whose noise level is 2σ (``runtime.certify.sigma_to_t``: 290 at σ 0.25, 496 at σ 0.5 on the
        cosine schedule), beyond 250; at least ``purify_t_max`` when given.
    adv_through_purifier / purifier_t / purifier_eot: each site crafts its ``pgd`` batches through the
        purification the deployed classifier sees (the frozen ``denoiser`` at t* ``purifier_t``, 0: the
        denoiser's t_min; EOT over ``purifier_eot`` noise draws) and trains on the purified scans
        (``ClassifierTrainConfig``'s fields of those names; needs ``adv='pgd'`` and a denoiser).
    smoothing_sigmas / smoothing_frac / denoiser: each site's denoised-smoothing fine-tuning of its
        classifier (``ClassifierTrainConfig``'s ``smoothing_sigmas``, σ in scan units, and
        ``smoothing_frac``): that fraction of every batch is noised at a σ of the list and one-shot
        denoised by the frozen ``denoiser`` (a bundle folder, a run folder holding
        ``student.safetensors``, or a unet ``.safetensors`` file, read by every site, loaded once
        per client process and never sent). Sigmas need a denoiser and a denoiser needs sigmas;
        ``()`` (the default) trains without smoothing.
    adv / adv_eps / adv_steps / adv_norm / adv_start_epoch / trades_beta / robust_val / select:
        each site's local classifier training (``ClassifierTrainConfig``'s fields of those names;
        ``adv_eps`` in scan units, -1: the preset's radius; ``adv_start_epoch`` a global epoch of the
        federation's schedule, -1: the preset's). Every site attacks its own training scans; what
        travels is unchanged (``classifier_split``). With ``robust_val > 0`` every train reply
        carries ``val_robust_accuracy``. The defaults give the preset's recipe.
    seed: seeds model initialisation and every local training job.
    threads: torch threads per client process.
    device: where each site's classifier rounds train: ``cpu`` (the default), ``cuda`` or ``auto``
        (``train.device.resolve_device``); the simulation then gives every site an equal share of one GPU.
        The other phases train on the CPU. Not part of what a run computes: the draws are the CPU run's.
    round_timeout_s: how long the server waits for a round's replies.
    pause_after_s / pause_after_rounds: stop at the first round boundary after this many seconds /
        rounds of this run segment (0: never), checkpointed; a run started with ``resume`` continues
        there (``fed.checkpoint``). Like ``threads``, not part of what the run computes.
    pause_on_request: stop at the next round boundary when ``RUN/pause_request.json`` appears
        (``medfedpure fed pause RUN``), checkpointed like a paced pause. The deployment runtime turns it
        off (its runs always start afresh). Not part of what the run computes.
    """

    data_dir: str
    out_dir: str
    rounds: int = 3
    local_epochs: int = 1
    mae_rounds: int = 0
    preset: str = "tiny"
    image_size: int = 0
    classifier_width: int = 1
    classifier_stem: int = 0
    strategy: str = "fedavg"
    num_sites: int = 4
    phases: tuple[str, ...] = DEFAULT_PHASES
    calibrate: bool = True
    classifier_split: str = "moe"
    max_update_norm: float = math.inf
    max_relative_norm: float = 1.0
    max_median_ratio: float = DEFAULT_MEDIAN_RATIO
    max_examples: int = 0
    trim_beta: float = 0.25
    krum_f: int = -1
    max_train: int = 0
    poison_site: int = -1
    poison_scale: float = -10.0
    student_steps: int = PURIFY_DEFAULTS.steps
    purify_t_min: int = PURIFY_DEFAULTS.t_min
    purify_t_max: int = PURIFY_DEFAULTS.t_max
    denoise_t_max: int = 0
    adv: str = ADV_DEFAULTS["adv"]
    adv_eps: float = ADV_DEFAULTS["adv_eps"]
    adv_steps: int = ADV_DEFAULTS["adv_steps"]
    adv_norm: str = ADV_DEFAULTS["adv_norm"]
    adv_start_epoch: int = ADV_DEFAULTS["adv_start_epoch"]
    trades_beta: float = ADV_DEFAULTS["trades_beta"]
    robust_val: int = ADV_DEFAULTS["robust_val"]
    select: str = ADV_DEFAULTS["select"]
    adv_through_purifier: bool = THROUGH_DEFAULTS["adv_through_purifier"]
    purifier_t: float = THROUGH_DEFAULTS["purifier_t"]
    purifier_eot: int = THROUGH_DEFAULTS["purifier_eot"]
    smoothing_sigmas: tuple[float, ...] = SMOOTHING_DEFAULTS["smoothing_sigmas"]
    smoothing_frac: float = SMOOTHING_DEFAULTS["smoothing_frac"]
    denoiser: str = ""
    detector_harden_rounds: int = 0
    detector_l2: float = 0.0
    seed: int = 0
    threads: int = 1
    device: str = "cpu"
    round_timeout_s: float = 3600.0
    pause_after_s: float = 0.0
    pause_after_rounds: int = 0
    pause_on_request: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.phases, str):
            object.__setattr__(self, "phases", tuple(p for p in self.phases.split(",") if p))
        object.__setattr__(self, "phases", tuple(self.phases))
        object.__setattr__(self, "smoothing_sigmas", parse_sigmas(self.smoothing_sigmas))
        object.__setattr__(self, "denoiser", str(self.denoiser or ""))
        if self.rounds < 1 or self.local_epochs < 1:
            raise ValueError(f"rounds={self.rounds}, local_epochs={self.local_epochs}: both must be >= 1")
        if isinstance(self.mae_rounds, bool) or not isinstance(self.mae_rounds, int) or self.mae_rounds < 0:
            raise ValueError(f"mae_rounds={self.mae_rounds!r}: 0 (as many as rounds) or a positive number of rounds")
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r}: use 'tiny' or 'small'")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if self.num_sites < 1:
            raise ValueError(f"num_sites={self.num_sites}: need at least one site")
        bad = [p for p in self.phases if p not in PHASES]
        if bad or not self.phases:
            raise ValueError(f"phases={self.phases}: choose a non-empty subset of {', '.join(PHASES)}")
        order = [list(PHASES).index(p) for p in self.phases]
        if order != sorted(order) or len(set(order)) != len(order):
            raise ValueError(f"phases={self.phases}: list each phase once, in the order {', '.join(PHASES)}")
        if self.classifier_split not in SPLITS or self.classifier_split == "none":
            raise ValueError(f"classifier_split={self.classifier_split!r}: use moe, all or fedbn")
        if not (self.max_update_norm > 0 and self.max_relative_norm > 0):
            raise ValueError("max_update_norm and max_relative_norm must be > 0 (inf disables)")
        if not self.max_median_ratio >= 1.0:
            raise ValueError(f"max_median_ratio={self.max_median_ratio}: must be >= 1 (inf disables)")
        if self.max_examples < 0:
            raise ValueError(f"max_examples={self.max_examples}: must be >= 0 (0: no configured cap)")
        if not 0.0 <= self.trim_beta < 0.5:
            raise ValueError(f"trim_beta={self.trim_beta}: must be in [0, 0.5)")
        if self.krum_f < -1 or self.krum_f >= self.num_sites:
            raise ValueError(f"krum_f={self.krum_f}: -1 (auto) or in [0, num_sites)")
        if isinstance(self.classifier_width, bool) or not isinstance(self.classifier_width, int) \
                or self.classifier_width < 1:
            raise ValueError(f"classifier_width={self.classifier_width!r}: a whole multiple >= 1 of the preset's "
                             "channel counts")
        if isinstance(self.classifier_stem, bool) or not isinstance(self.classifier_stem, int) \
                or self.classifier_stem < 0:
            raise ValueError(f"classifier_stem={self.classifier_stem!r}: a whole number >= 0 of "
                             "full-resolution layers")
        if self.image_size < 0 or self.image_size % 16:
            raise ValueError(f"image_size={self.image_size}: 0 (the preset's) or a positive multiple of 16")
        if self.max_train < 0 or self.threads < 1 or self.round_timeout_s <= 0:
            raise ValueError("max_train must be >= 0, threads >= 1, round_timeout_s > 0")
        if not (math.isfinite(self.pause_after_s) and self.pause_after_s >= 0) \
                or isinstance(self.pause_after_rounds, bool) or not isinstance(self.pause_after_rounds, int) \
                or self.pause_after_rounds < 0:
            raise ValueError(f"pause_after_s={self.pause_after_s!r}, pause_after_rounds={self.pause_after_rounds!r}: "
                             "0 (never pause) or a positive number of seconds / a whole number of rounds")
        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r}: one of {', '.join(DEVICES)}")
        try:
            _ = self.purify_schedule  # validates student_steps and the t* range
        except ValueError as exc:
            raise ValueError(f"student_steps={self.student_steps}, purify range [{self.purify_t_min}, "
                             f"{self.purify_t_max}]: {exc}") from exc
        check_denoise_t_max(self.denoise_t_max, self.purify_t_max)
        if isinstance(self.detector_harden_rounds, bool) or not 0 <= self.detector_harden_rounds <= self.rounds:
            raise ValueError(f"detector_harden_rounds={self.detector_harden_rounds!r}: from 0 to rounds ({self.rounds})")
        if not (self.detector_l2 >= 0 and math.isfinite(self.detector_l2)):
            raise ValueError(f"detector_l2={self.detector_l2!r}: 0 (ℓ∞ only) or a positive ℓ2 radius in scan units")
        if self.poison_site >= self.num_sites:
            raise ValueError(f"poison_site={self.poison_site}: -1 (none) or a site index < num_sites")
        _ = self.classifier_overrides()  # validates the adversarial-training and smoothing fields
        if self.smoothing_sigmas and not self.denoiser:
            raise ValueError(f"smoothing_sigmas={self.smoothing_sigmas} needs a denoiser: give --denoiser "
                             "BUNDLE|RUN (a bundle folder or a run folder holding student.safetensors) or "
                             "drop --smoothing-sigmas")
        if self.adv_through_purifier and not self.denoiser:
            raise ValueError("adv_through_purifier needs a denoiser: give --denoiser BUNDLE|RUN (the purifier the "
                             "attack is crafted through) or drop --adv-through-purifier")
        if self.denoiser and not (self.smoothing_sigmas or self.adv_through_purifier):
            raise ValueError(f"denoiser={self.denoiser!r} without smoothing_sigmas or adv_through_purifier is never "
                             "used: give --smoothing-sigmas (e.g. 0.12,0.25,0.5) or --adv-through-purifier, or drop "
                             "--denoiser")

    def rounds_of(self, phase: str) -> int:
        """The rounds of ``phase`` (``mae_rounds`` for the MAE when set, else ``rounds``)."""
        return self.mae_rounds if phase == "mae" and self.mae_rounds else self.rounds

    def rounds_before(self, phase: str) -> int:
        """The rounds of the run's phases before ``phase`` (where its rounds start in the run's count)."""
        return sum(self.rounds_of(p) for p in self.phases[:self.phases.index(phase)])

    @property
    def total_rounds(self) -> int:
        """The rounds of every phase of the run together."""
        return sum(self.rounds_of(p) for p in self.phases)

    def classifier_overrides(self) -> dict[str, Any]:
        """``ClassifierTrainConfig`` fields each site's classifier training overrides ({} at the defaults)."""
        adv = adv_overrides(self.preset, self.rounds * self.local_epochs,
                            **{name: getattr(self, name) for name in ADV_FIELDS})
        return {**adv, **through_overrides(self.preset, adv, **{name: getattr(self, name) for name in THROUGH_FIELDS}),
                **smoothing_overrides(self.preset, adv,
                                      **{name: getattr(self, name) for name in SMOOTHING_FIELDS})}

    @property
    def validation(self) -> UpdateValidationConfig:
        """The update validation bounds of this run (``validation.py``)."""
        return UpdateValidationConfig(self.max_update_norm, self.max_relative_norm, self.max_median_ratio,
                                      self.max_examples)

    @property
    def purify_schedule(self) -> PurifySchedule:
        """The purification schedule recorded in the federated student (``ValueError`` if invalid)."""
        return PurifySchedule(t_min=self.purify_t_min, t_max=self.purify_t_max, steps=self.student_steps)

    # --- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["phases"] = list(self.phases)
        d["smoothing_sigmas"] = list(self.smoothing_sigmas)
        return d

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"fed": self.to_dict()}, indent=2, sort_keys=True, default=str))

    @classmethod
    def load(cls, path: Path) -> FedConfig:
        return cls(**json.loads(Path(path).read_text())["fed"])

    def to_run_config(self) -> dict[str, str | int | float | bool]:
        """Flat Flower run config (``[tool.flwr.app.config]``): keys with dashes, infinities as strings."""
        out: dict[str, str | int | float | bool] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("phases", "smoothing_sigmas"):
                v = ",".join(str(x) for x in v)
            elif isinstance(v, float) and not math.isfinite(v):
                v = str(v)
            out[f.name.replace("_", "-")] = v
        return out

    @classmethod
    def from_run_config(cls, rc: dict[str, Any]) -> FedConfig:
        """Inverse of :meth:`to_run_config` (unknown keys are an error: they would be silently ignored)."""
        names = {f.name: f for f in fields(cls)}
        kw: dict[str, Any] = {}
        for key, v in rc.items():
            name = key.replace("-", "_")
            if name not in names:
                raise ValueError(f"unknown run config key {key!r}: known keys are {sorted(k.replace('_', '-') for k in names)}")
            ftype = str(names[name].type)
            if ftype == "float" and isinstance(v, str):
                v = float(v)
            elif ftype == "float":
                v = float(v)
            elif ftype == "int":
                v = int(v)
            kw[name] = v
        return cls(**kw)
