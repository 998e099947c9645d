"""The bundle build's options: one frozen dataclass, written to ``WORK/config.json``.

Importing this module does not import torch (the command line reads the defaults at start-up);
the purification schedule's class is imported when a config is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medfedpure.models.diffusion import PurifySchedule

__all__ = ["BundleBuildConfig", "PRESETS", "PURIFIER_PHASES", "DEFAULT_MAX_BUNDLE_BYTES", "CALIBRATE_ON"]

PRESETS = ("tiny", "small")
# What the purifier federation trains: the teacher then its distilled student, or the teacher only
# (then the teacher itself samples in K steps: "student is teacher", recorded in the run's metrics).
PURIFIER_PHASES = (("teacher", "student"), ("teacher",))
DEFAULT_MAX_BUNDLE_BYTES = 25 * 1024 * 1024
#: the scans the gate's τ is set on: every site's validation scans, or the bundle's site's
CALIBRATE_ON = ("site", "pooled")


def _default_schedule() -> PurifySchedule:
    from medfedpure.models.diffusion import PURIFY_DEFAULTS

    return PURIFY_DEFAULTS


@dataclass(frozen=True)
class BundleBuildConfig:
    """Everything that decides the bundle: data, two federations, calibration, export, install.

    Attributes:
        sites / per_site / size / seed: the synthetic data set (``medfedpure data synth``): sites,
            scans per site (half with a tumour), image side in pixels, root seed (also the
            federations' seed).
        site: the site whose personalised classifier and calibrated gate make the bundle (why site 1:
            benchmarks/RESULTS.md, "Gate and detector").
        preset: model and training preset of the federations, ``"tiny"`` (tests) or ``"small"``.
        rounds / local_epochs / max_train: the classifier + MAE federation (rounds per phase, local
            epochs per round, training scans per site, 0: all).
        mae_rounds: the MAE's rounds in that federation when fewer (or more) than the classifier's
            (``FedConfig.mae_rounds``; 0: ``rounds``).
        classifier_width: multiplies the classifier's channel counts (``FedConfig.classifier_width``;
            1: the preset's).
        classifier_stem: full-resolution layers before each classifier expert's stages
            (``FedConfig.classifier_stem``; 0: none, the classifier's state_dict layout of older bundles).
        purifier_rounds / purifier_local_epochs / purifier_max_train: the purifier federation's own
            budget (teacher, then the distilled student).
        purifier_phases: ``("teacher", "student")``, or ``("teacher",)`` to skip distillation.
        schedule: the purification schedule (t_min, t_max, steps) recorded in the student and
            calibrated into the gate; default ``medfedpure.models.diffusion.PURIFY_DEFAULTS``.
        denoise_t_max: the purifier federation trains its teacher and student on diffusion times up
            to this (``FedConfig.denoise_t_max``; 0: the presets', 250) — what certification at
            σ ≥ 0.25 asks the shipped student for (t 290 at σ 0.25, 496 at σ 0.5).
        threads: torch CPU threads of calibration and export.
        device: where each site's classifier rounds train in the classifier + MAE federation
            (``FedConfig.device``: ``cpu``, ``cuda`` or ``auto``). Like ``threads``, not a step input: a build
            resumes across devices (the draws are the CPU run's; the result differs by floating-point order).
        timeout_s: each federation is stopped (all its processes) after this many seconds.
        pause_after_s: the build pauses at the first federated round boundary after this many seconds
            (0: never): the running federation checkpoints and the build stops with ``FederationPaused``;
            the same command continues it (a build always resumes its federations' round checkpoints).
            Not a step input.
        max_bundle_bytes: the build fails when the bundle is larger.
        dest: where the verified bundle is installed ("": the package's embedded default bundle).
        adv / adv_eps / adv_steps / adv_norm / adv_start_epoch / trades_beta / robust_val / select:
            each site's adversarial classifier training in the classifier + MAE federation
            (``medfedpure.fed.config.FedConfig``'s fields of those names, with its defaults: the
            preset's recipe).
        adv_through_purifier / purifier_t / purifier_eot: each site crafts its ``pgd`` batches through the
            purification the deployed classifier sees — the purifier federation's student at t* ``purifier_t``
            (0: the schedule's t_min), EOT over ``purifier_eot`` noise draws — and trains on the purified scans
            (``FedConfig``'s fields of those names); like smoothing, the classifier federation then comes
            after the purifier federation.
        smoothing_sigmas / smoothing_frac: each site's denoised-smoothing fine-tuning in the
            classifier + MAE federation (``FedConfig``'s fields of those names; ``()``: off). The
            denoiser is the purifier federation's student (its teacher when ``purifier_phases`` is
            ``("teacher",)``): the weights the bundle ships, so the classifier federation then comes
            after the purifier federation and reruns when it does.
        detector_rounds / detector_local_epochs / detector_harden_rounds / detector_l2: a third federation
            trains the attack detector (``fed`` phase ``detector``: each site attacks its own final
            classifier; ``FedConfig.detector_harden_rounds`` and ``detector_l2``), and the bundle's gate is the
            ``learned`` one on it, calibrated on the site's validation scans. ``detector_rounds`` 0 (the
            default): no detector, the bundle keeps the MAE-side statistic.
        calibrate_on: the clean scans τ is set on, for either gate: ``"site"`` (the default), the bundle's
            site's validation scans; or ``"pooled"``, the validation scans of every site — for a bundle that will
            meet scanners nobody calibrated it for: one τ for all of them, until a site recalibrates it on its own
            scans (``medfedpure calibrate --bundle``). Measured worth it with the ``learned`` gate only (the
            ``hfratio`` scale is the scanner's: benchmarks/RESULTS.md, "Gate and detector").
        calibration_target_ffr: the false-flag rate τ is set for on those scans (default 0.05, as
            ``medfedpure calibrate --target-ffr``).
        calibration_confidence: 0 (the default) flags the target share of those scans; a level c in (0, 1)
            sets τ so that the rate on new clean scans like them is at most the target with probability c (as
            ``medfedpure calibrate --bundle --confidence``; the build fails when there are too few scans for it).
    """

    sites: int = 2
    per_site: int = 600
    size: int = 128
    site: int = 1
    preset: str = "small"
    seed: int = 0
    rounds: int = 30
    local_epochs: int = 2
    max_train: int = 0
    mae_rounds: int = 0
    purifier_rounds: int = 10
    purifier_local_epochs: int = 2
    purifier_max_train: int = 0
    purifier_phases: tuple[str, ...] = ("teacher", "student")
    schedule: PurifySchedule = field(default_factory=_default_schedule)
    denoise_t_max: int = 0
    classifier_width: int = 1
    classifier_stem: int = 0
    threads: int = 2
    device: str = "cpu"
    timeout_s: float = 5400.0
    pause_after_s: float = 0.0
    max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES
    dest: str = ""
    # literals (this module must not import torch): a test pins them to medfedpure.fed.config.ADV_DEFAULTS
    adv: str = "fgsm-rs"
    adv_eps: float = -1.0
    adv_steps: int = 7
    adv_norm: str = "linf"
    adv_start_epoch: int = -1
    trades_beta: float = 6.0
    robust_val: int = 0
    select: str = "clean"
    adv_through_purifier: bool = False
    purifier_t: float = 0.0
    purifier_eot: int = 2
    smoothing_sigmas: tuple[float, ...] = ()
    smoothing_frac: float = 0.25
    detector_rounds: int = 0
    detector_local_epochs: int = 2
    detector_harden_rounds: int = 0
    detector_l2: float = 0.0
    calibrate_on: str = "site"
    calibration_target_ffr: float = 0.05
    calibration_confidence: float = 0.0

    def __post_init__(self) -> None:
        from medfedpure.models.diffusion import PurifySchedule

        if isinstance(self.schedule, dict):
            object.__setattr__(self, "schedule", PurifySchedule(**self.schedule))
        if not isinstance(self.schedule, PurifySchedule):
            raise ValueError(f"schedule={self.schedule!r}: expected a PurifySchedule or a dict of t_min, t_max, steps")
        phases = self.purifier_phases
        if isinstance(phases, str):
            phases = tuple(p for p in phases.split(",") if p)
        object.__setattr__(self, "purifier_phases", tuple(phases))
        from medfedpure.fed.config import check_denoise_t_max, parse_sigmas

        object.__setattr__(self, "smoothing_sigmas", parse_sigmas(self.smoothing_sigmas))
        if self.purifier_phases not in PURIFIER_PHASES:
            raise ValueError(f"purifier_phases={self.purifier_phases}: use 'teacher,student' or 'teacher' "
                             "(the teacher alone then samples as the K-step purifier)")
        if not 1 <= self.sites <= 64:
            raise ValueError(f"sites={self.sites}: use 1 to 64 sites")
        if self.per_site < 10:
            raise ValueError(f"per_site={self.per_site}: use at least 10 scans per site (the validation split "
                             "must hold scans for calibration and export)")
        if not 32 <= self.size <= 1024:
            raise ValueError(f"size={self.size}: use 32 to 1024 pixels")
        if not 0 <= self.site < self.sites:
            raise ValueError(f"site={self.site}: the bundle's site must be one of 0..{self.sites - 1}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r}: use one of {PRESETS}")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed}: use a non-negative integer")
        for name in ("rounds", "local_epochs", "purifier_rounds", "purifier_local_epochs", "threads",
                     "classifier_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("max_train", "purifier_max_train"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0 (0: every training scan)")
        if self.mae_rounds < 0:
            raise ValueError(f"mae_rounds={self.mae_rounds}: must be >= 0 (0: as many as rounds)")
        if self.detector_rounds < 0 or self.detector_local_epochs < 1:
            raise ValueError(f"detector_rounds={self.detector_rounds}, detector_local_epochs="
                             f"{self.detector_local_epochs}: rounds >= 0 (0: no detector), local epochs >= 1")
        if not 0 <= self.detector_harden_rounds <= self.detector_rounds:
            raise ValueError(f"detector_harden_rounds={self.detector_harden_rounds}: from 0 to detector_rounds "
                             f"({self.detector_rounds})")
        if self.calibrate_on not in CALIBRATE_ON:
            raise ValueError(f"calibrate_on={self.calibrate_on!r}: use one of {CALIBRATE_ON}")
        if not 0 < self.calibration_target_ffr < 1:
            raise ValueError(f"calibration_target_ffr={self.calibration_target_ffr}: a false-flag rate in (0, 1), "
                             "e.g. 0.05")
        if not 0 <= self.calibration_confidence < 1:
            raise ValueError(f"calibration_confidence={self.calibration_confidence}: 0 (off) or a level in (0, 1), "
                             "e.g. 0.9")
        if not self.detector_l2 >= 0:
            raise ValueError(f"detector_l2={self.detector_l2}: 0 (linf only) or a positive l2 radius")
        if self.classifier_stem < 0:
            raise ValueError(f"classifier_stem={self.classifier_stem}: must be >= 0 (0: no full-resolution "
                             "layers)")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s={self.timeout_s}: must be > 0 seconds")
        if not (math.isfinite(self.pause_after_s) and self.pause_after_s >= 0):
            raise ValueError(f"pause_after_s={self.pause_after_s}: 0 (never pause) or a positive number of seconds")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device={self.device!r}: one of cpu, cuda, auto")
        check_denoise_t_max(self.denoise_t_max, self.schedule.t_max)
        if self.max_bundle_bytes < 1:
            raise ValueError(f"max_bundle_bytes={self.max_bundle_bytes}: must be >= 1")
        _ = self.classifier_overrides()  # validates the adversarial-training and smoothing fields

    def adv_options(self) -> dict[str, Any]:
        """The adversarial-training fields, for the classifier federation's ``FedConfig``."""
        from medfedpure.fed.config import ADV_FIELDS

        return {name: getattr(self, name) for name in ADV_FIELDS}

    def smoothing_options(self) -> dict[str, Any]:
        """The denoised-smoothing fields, for the classifier federation's ``FedConfig``."""
        from medfedpure.fed.config import SMOOTHING_FIELDS

        return {name: getattr(self, name) for name in SMOOTHING_FIELDS}

    def through_options(self) -> dict[str, Any]:
        """The through-the-purifier fields, for the classifier federation's ``FedConfig``."""
        from medfedpure.fed.config import THROUGH_FIELDS

        return {name: getattr(self, name) for name in THROUGH_FIELDS}

    @property
    def smoothing(self) -> bool:
        """Whether the classifier federation fine-tunes with denoised smoothing (through the purifier's student)."""
        return bool(self.smoothing_sigmas)

    @property
    def uses_student(self) -> bool:
        """Whether the classifier federation needs the purifier federation's student (smoothing or through it)."""
        return self.smoothing or self.adv_through_purifier

    def classifier_overrides(self) -> dict[str, Any]:
        """What each site's ``ClassifierTrainConfig`` overrides ({} at the defaults; ``ValueError`` if bad)."""
        from medfedpure.fed.config import adv_overrides, smoothing_overrides, through_overrides

        adv = adv_overrides(self.preset, self.rounds * self.local_epochs, **self.adv_options())
        return {**adv, **through_overrides(self.preset, adv, **self.through_options()),
                **smoothing_overrides(self.preset, adv, **self.smoothing_options())}

    @property
    def dest_path(self) -> Path:
        """The install folder: ``dest``, or the embedded default bundle's folder when empty."""
        if self.dest:
            return Path(self.dest)
        from medfedpure.runtime.bundle import default_bundle_path

        return default_bundle_path()

    def changed(self, *names: str) -> dict[str, Any]:
        """The options among ``names`` whose value is not the field's default (a step's recorded inputs: options
        added later enter them only when set, so a build at the defaults keeps its resumable steps)."""
        defaults = {f.name: f.default for f in fields(self)}
        return {n: getattr(self, n) for n in names if getattr(self, n) != defaults[n]}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready options (the schedule as ``{"t_min", "t_max", "steps"}``)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["schedule"] = self.schedule.to_dict()
        d["purifier_phases"] = list(self.purifier_phases)
        d["smoothing_sigmas"] = list(self.smoothing_sigmas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BundleBuildConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (they would be silently ignored)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown bundle build options {unknown}: known options are {sorted(names)}")
        return cls(**d)
