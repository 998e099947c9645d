"""The attack detector: a small CNN trained on clean and attacked scans that scores every gate patch.

The MAE's patch error cannot see the perturbations of an adversarially trained classifier on a scanner
that keeps almost all of k-space (benchmarks/RESULTS.md, "Gate and detector"); a network trained to tell
clean from attacked scans can. Its output has the gate's shape — one logit per ``patch`` × ``patch``
patch, row-major, like the MAE's per-patch error — so that the gate reduces it the way it reduces an
error map (the mean of the ``topk`` largest) and decides with the same rule.

Architecture: a stride-1 3×3 convolution, then one stride-2 3×3 convolution per halving down to the patch
grid (log2(patch) of them), each followed by BatchNorm and ReLU, then a 1×1 convolution to one logit per
grid cell. The default (``small``: 16-32-64-64 channels, patch 8) has ~62 k parameters; its receptive
field spans 17 px, the patch and 4–5 px around it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor, nn

__all__ = ["DetectorConfig", "AttackDetector"]


@dataclass(frozen=True)
class DetectorConfig:
    """Architecture of the attack detector.

    Attributes:
        image_size: side S of the square input; a multiple of ``patch``.
        patch: side of the gate's patches (a power of two ≥ 2): the output grid is S / patch per side.
        channels: one entry for the stride-1 layer, then one per stride-2 layer (1 + log2(patch) entries).
        topk: the score is the mean of the ``topk`` largest patch logits (1 ≤ topk ≤ number of patches).
    """

    image_size: int = 128
    patch: int = 8
    channels: tuple[int, ...] = (16, 32, 64, 64)
    topk: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.channels, list):  # JSON round trip gives lists
            object.__setattr__(self, "channels", tuple(self.channels))
        for name in ("image_size", "patch", "topk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name}={v!r}: expected an int")
        if self.patch < 2 or self.patch & (self.patch - 1):
            raise ValueError(f"patch={self.patch}: expected a power of two >= 2")
        if self.image_size < self.patch or self.image_size % self.patch:
            raise ValueError(f"image_size={self.image_size}: must be a positive multiple of patch={self.patch}")
        levels = int(math.log2(self.patch))
        if len(self.channels) != 1 + levels or any(isinstance(c, bool) or not isinstance(c, int) or c < 1
                                                   for c in self.channels):
            raise ValueError(f"channels={self.channels}: expected {1 + levels} positive ints for patch={self.patch} "
                             f"(one stride-1 layer, then {levels} stride-2 layers)")
        if not 1 <= self.topk <= self.num_patches:
            raise ValueError(f"topk={self.topk}: expected 1..{self.num_patches} (the number of patches)")

    @property
    def grid(self) -> int:
        """Patches per side: S / patch."""
        return self.image_size // self.patch

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DetectorConfig:
        """``tiny`` (tests: 32 px, 4 × 4 patches) or ``small`` (128 px, the defaults)."""
        presets: dict[str, dict[str, Any]] = {
            "tiny": dict(image_size=32, patch=8, channels=(4, 8, 8, 8), topk=4),
            "small": {},
        }
        if name not in presets:
            raise ValueError(f"unknown detector preset {name!r}: expected one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DetectorConfig:
        """Inverse of :meth:`to_dict` (JSON lists become tuples; unknown keys raise TypeError)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class AttackDetector(nn.Module):
    """``forward(x)``: x [B, 1, S, S] in [0, 1] → per-patch logits [B, Np] (row-major, Np = (S/patch)²).
    :meth:`score`: the mean of the ``topk`` largest, [B] — high means "looks attacked"."""

    def __init__(self, cfg: DetectorConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or DetectorConfig()
        layers: list[nn.Module] = []
        cin = 1
        for i, cout in enumerate(cfg.channels):
            layers += [nn.Conv2d(cin, cout, 3, 1 if i == 0 else 2, 1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(cin, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.cfg.image_size
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] != s or x.shape[3] != s:
            raise ValueError(f"detector input of shape {tuple(x.shape)}: expected [B, 1, {s}, {s}]")
        return self.head(self.features(x)).flatten(1)

    def score(self, x: Tensor) -> Tensor:
        """The mean of the ``topk`` largest patch logits, [B]."""
        return reduce_topk(self(x), self.cfg.topk)


def reduce_topk(patch_logits: Tensor, k: int) -> Tensor:
    """[B, Np] → [B]: the mean of each row's ``k`` largest values (the gate's ``topk`` reduction)."""
    return patch_logits.topk(k, dim=1).values.mean(1)
