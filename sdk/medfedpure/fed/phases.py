"""The phase registry: everything the server and the sites need to know about one federated phase.

The server runs the phases in the order of :data:`PHASES`; server and client look a phase up here
instead of branching on its name.

============ ===== ============ ============== ===========================================================
phase        kind  model        travels        local work per round
============ ===== ============ ============== ===========================================================
classifier   moe   MoEClassifier global expert ``train_classifier``, continuing the site's run (stateful)
mae          mae   MAE          everything     ``train_mae``
teacher      unet  UNet         everything     ``train_denoiser`` (x0-prediction on the DDPM schedule)
student      unet  UNet         everything     ``distill_student`` from the site's copy of the final teacher
detector     det.  AttackDetect everything     ``fit_detector`` on the site's scans and their PGD copies against
                                               its own final classifier (opt-in: not in :data:`DEFAULT_PHASES`)
============ ===== ============ ============== ===========================================================

The classifier's split is the run's choice (``FedConfig.classifier_split``: "moe", "fedbn" or
"all"); the others always send everything. Models are built under ``torch.random.fork_rng`` with
an explicit seed, so initialisation is reproducible and leaves the global RNG untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from medfedpure.fed import tasks
from medfedpure.fed.params import SPLITS
from medfedpure.fed.tasks import PRESETS
from medfedpure.models.detector import AttackDetector, DetectorConfig
from medfedpure.models.mae import MAEConfig, MaskedAutoencoder
from medfedpure.models.moe import MoEClassifier, MoEConfig
from medfedpure.models.unet import UNet, UNetConfig

if TYPE_CHECKING:
    from medfedpure.fed.config import FedConfig

__all__ = ["DEFAULT_PHASES", "PHASES", "PRESETS", "Phase", "build_model", "image_size", "lookup"]

KINDS = ("moe", "mae", "unet", "detector")


def _no_metadata(cfg: FedConfig) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Phase:
    """One phase of the federation.

    Attributes:
        name: the phase's name (message config ``phase``, checkpoint role, file names).
        kind: checkpoint kind of its model (``models.registry``): "moe", "mae", "unet" or "detector".
        model_config: ``(preset, size, width, stem) -> config``; ``size > 0`` overrides the preset's image
            side; ``width`` and ``stem`` shape the classifier (``FedConfig.classifier_width`` and
            ``classifier_stem``), and the other phases ignore them.
        model: ``config -> nn.Module``.
        travels: the split policy (``params.SPLITS``) of what goes to the server: "moe" (the global
            expert only) or "all".
        train: one round of local work (``tasks.LocalTrain``): ``(model, data, job, optimizer
            state) -> (metrics, optimizer state or None)``.
        evaluate: ``(model, data, seed, site_dir) -> metrics`` on the site's validation and test splits
            (``site_dir``: the site's folder, where the detector finds the classifier it guards).
        stateful: the site keeps its optimizer state across rounds and round r continues one
            federation-wide warm-up + cosine schedule; otherwise every round is a short complete run
            under the server's envelope over rounds (``tasks.round_lr_scale``).
        split_option: the ``FedConfig`` field that overrides ``travels`` (None: fixed).
        init_from: the server starts this phase from the final model of that earlier phase (the
            student starts from the teacher, as distillation requires); None: a seeded fresh model.
        personalised: the model has a site-local part, so the server keeps only what travels
            (``RUN/<name>_global.safetensors``) and each site its full model (``SITE/<name>.safetensors``);
            otherwise the server saves ``RUN/<name>.safetensors`` and each site its copy under
            ``SITE/global/``.
        metadata: ``FedConfig -> dict``, extra checkpoint metadata of the phase's models (the
            student records the purification schedule that the gate calibration reads).
    """

    name: str
    kind: str
    model_config: Callable[[str, int, int, int], Any]
    model: Callable[[Any], torch.nn.Module]
    travels: str
    train: tasks.LocalTrain
    evaluate: tasks.LocalEvaluate
    stateful: bool = False
    split_option: str | None = None
    init_from: str | None = None
    personalised: bool = False
    metadata: Callable[[FedConfig], dict[str, Any]] = field(default=_no_metadata)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"phase {self.name!r}: kind={self.kind!r}, use one of {', '.join(KINDS)}")
        if self.travels not in SPLITS or self.travels == "none":
            raise ValueError(f"phase {self.name!r}: travels={self.travels!r}, use moe, fedbn or all")

    def split(self, cfg: FedConfig) -> str:
        """The split policy of this phase in the run ``cfg``."""
        return str(getattr(cfg, self.split_option)) if self.split_option else self.travels

    def config(self, preset: str, size: int = 0, width: int = 1, stem: int = 0) -> Any:
        """The architecture config at ``preset`` (``size > 0`` overrides the image side; ``width`` multiplies
        the classifier's channel counts, ``FedConfig.classifier_width``, and ``stem`` adds that many
        full-resolution layers before each expert's stages, ``FedConfig.classifier_stem``; both leave the
        other phases alone)."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}: use 'tiny' or 'small'")
        if size < 0:
            raise ValueError(f"size={size}: 0 (the preset's) or a positive image side")
        return self.model_config(preset, size, width, stem)

    def build(self, preset: str, seed: int, size: int = 0, width: int = 1,
              stem: int = 0) -> tuple[torch.nn.Module, Any]:
        """A fresh model initialised from ``seed`` (global RNG untouched) → ``(model, config)``."""
        cfg = self.config(preset, size, width, stem)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.model(cfg)
        return model, cfg

    @property
    def server_file(self) -> str:
        """The phase's result in the run folder, relative to RUN."""
        return f"{self.name}_global.safetensors" if self.personalised else f"{self.name}.safetensors"

    @property
    def site_file(self) -> Path:
        """The site's final model of this phase, relative to its site folder."""
        return Path(f"{self.name}.safetensors") if self.personalised else Path("global") / f"{self.name}.safetensors"


def _unet_config(preset: str, size: int, width: int = 1, stem: int = 0) -> UNetConfig:
    return UNetConfig.preset(preset, **({"image_size": size} if size else {}))


def _student_metadata(cfg: FedConfig) -> dict[str, Any]:
    return cfg.purify_schedule.to_dict()


PHASES: dict[str, Phase] = {
    p.name: p
    for p in (
        Phase("classifier", "moe", lambda preset, size, width, stem: MoEConfig.preset(
                  preset, image_size=size or None, width=width, stem=stem),
              MoEClassifier, "moe", tasks.train_classifier_round, tasks.evaluate_classifier_site,
              stateful=True, split_option="classifier_split", personalised=True),
        Phase("mae", "mae", lambda preset, size, width, stem: MAEConfig.preset(
                  preset, image_size=size or None),
              MaskedAutoencoder, "all", tasks.train_mae_round, tasks.evaluate_mae_site),
        Phase("teacher", "unet", _unet_config, UNet, "all", tasks.train_teacher_round, tasks.evaluate_denoiser_site),
        # The student has the teacher's architecture: distillation starts it from the teacher's weights.
        Phase("student", "unet", _unet_config, UNet, "all", tasks.train_student_round, tasks.evaluate_denoiser_site,
              init_from="teacher", metadata=_student_metadata),
        # The attack detector of a learned gate: after the classifier phase (it attacks each site's final one).
        Phase("detector", "detector", lambda preset, size, width, stem: DetectorConfig.preset(
                  preset, **({"image_size": size} if size else {})),
              AttackDetector, "all", tasks.train_detector_round, tasks.evaluate_detector_site),
    )
}

#: The phases a run trains unless told otherwise (the detector is opt-in: ``--phases …,detector``).
DEFAULT_PHASES: tuple[str, ...] = ("classifier", "mae", "teacher", "student")


def lookup(name: str) -> Phase:
    """The registered phase ``name``; ``ValueError`` naming the known phases otherwise."""
    try:
        return PHASES[name]
    except KeyError:
        raise ValueError(f"unknown phase {name!r}: one of {', '.join(PHASES)}") from None


def build_model(name: str, preset: str, seed: int, size: int = 0, width: int = 1,
                stem: int = 0) -> tuple[torch.nn.Module, Any]:
    """A fresh model of phase ``name`` at ``preset`` initialised from ``seed`` → ``(model, config)``."""
    return lookup(name).build(preset, seed, size, width, stem)


def image_size(preset: str, size: int = 0) -> int:
    """Side in pixels of every model at ``preset`` (the classifier's; all presets agree), or ``size``."""
    return int(size) if size else int(PHASES["classifier"].config(preset).image_size)
