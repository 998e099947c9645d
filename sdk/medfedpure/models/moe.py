"""Personalized mixture-of-experts classifier (docs/design.md).

``p(x) = g(x) · softmax(global(x)) + (1 − g(x)) · softmax(local(x))``

- the **global expert** is the part shared across sites by federated averaging;
- the **local expert** (a narrower CNN) and the per-sample **gate** ``g(x) ∈ (0, 1)`` stay at the site;
- all normalisation layers stay at the site too (FedBN, Li et al. 2021: site-specific scanner
  statistics live in the BatchNorm statistics and affine parameters, so they are not averaged).

Dispatch is dense (both experts always run) so shapes are static and the module exports to ONNX
unchanged. ``forward`` returns class probabilities, not logits; ``log_probs`` gives the numerically
safe log of the same mixture for training and attacks.

Example::

    cfg = MoEConfig.preset("small")
    model = MoEClassifier(cfg)
    probs = model(torch.rand(4, 1, 128, 128))   # [4, 2], rows sum to 1
    shared = model.global_state_dict()          # what the federated server averages
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

__all__ = ["MoEConfig", "MoEClassifier", "CNNExpert"]


@dataclass(frozen=True)
class MoEConfig:
    """Architecture of the MoE classifier.

    Attributes:
        image_size: side S of the square input ``[B, 1, S, S]``; a multiple of ``2 ** len(widths)``.
        num_classes: number of classes (2: ``("no_tumor", "tumor")``).
        global_widths: channels of the global expert's stages; each stage halves the resolution.
        local_widths: channels of the local expert's stages (narrower: it only personalises).
        gate_hidden: hidden units of the gate MLP (input: both experts' pooled features).
        dropout: dropout before each expert's linear head (0, the default, disables it). Dropout
            draws from torch's global generator (``nn.Dropout`` takes none), so a non-zero value
            makes training depend on global RNG state and breaks exact resumption.
        stem: full-resolution Conv3×3 → BN → ReLU layers (each expert's first width in channels)
            before the first stride-2 stage; 0, the default, has none. A tumour 2–3 px across is
            seen at full resolution only by the first stage's single strided convolution without one.

    The defaults are the ``small`` preset (203 k parameters), sized for the runtime's latency budget;
    wider experts trained slower without being more accurate on the synthetic set, and half these
    widths were less accurate (benchmarks/RESULTS.md, "Models"; the trials in docs/history.md).
    """

    image_size: int = 128
    num_classes: int = 2
    global_widths: tuple[int, ...] = (12, 24, 48, 96)
    local_widths: tuple[int, ...] = (8, 16, 24, 32)
    gate_hidden: int = 32
    dropout: float = 0.0
    stem: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "global_widths", tuple(int(w) for w in self.global_widths))
        object.__setattr__(self, "local_widths", tuple(int(w) for w in self.local_widths))
        if self.num_classes < 2:
            raise ValueError(f"num_classes={self.num_classes}: need at least 2 classes")
        for name in ("global_widths", "local_widths"):
            widths = getattr(self, name)
            if not widths or any(w < 1 for w in widths):
                raise ValueError(f"{name}={widths}: need one or more positive channel counts")
        depth = max(len(self.global_widths), len(self.local_widths))
        if self.image_size < 2**depth or self.image_size % (2**depth):
            raise ValueError(
                f"image_size={self.image_size}: must be a positive multiple of 2**{depth} "
                f"(the number of stride-2 stages); resize the scans or use fewer stages"
            )
        if self.gate_hidden < 1:
            raise ValueError(f"gate_hidden={self.gate_hidden}: must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout}: must be in [0, 1)")
        if isinstance(self.stem, bool) or not isinstance(self.stem, int) or self.stem < 0:
            raise ValueError(f"stem={self.stem!r}: a whole number >= 0 of full-resolution layers")

    @classmethod
    def preset(cls, name: str, image_size: int | None = None, width: int = 1, stem: int = 0) -> MoEConfig:
        """``tiny`` (tests: 32 px, a few thousand parameters) or ``small`` (the default bundle); ``width``
        multiplies every expert's channel counts (2: about 4× the parameters and the compute); ``stem``
        adds that many full-resolution layers before each expert's stages."""
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width={width!r}: a whole multiple >= 1 of the preset's channel counts")
        if name == "tiny":
            base = cls(image_size=image_size or 32, global_widths=(4, 8), local_widths=(4, 4), gate_hidden=4)
        elif name == "small":
            base = cls(image_size=image_size or 128)
        else:
            raise ValueError(f"unknown preset {name!r}: use 'tiny' or 'small'")
        changes: dict = {"stem": stem} if stem else {}
        if width != 1:
            changes.update(global_widths=tuple(width * w for w in base.global_widths),
                           local_widths=tuple(width * w for w in base.local_widths))
        return replace(base, **changes) if changes else base

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MoEConfig:
        return cls(**d)  # a manifest written before ``stem`` existed has none: the default 0 is right


class _Stage(nn.Module):
    """Conv3x3(stride 2) → BN → ReLU → Conv3x3 → BN → ReLU: ``[B,Cin,H,W] -> [B,Cout,H/2,W/2]``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(x)))


class _Full(nn.Module):
    """Conv3x3(stride 1) → BN → ReLU at full resolution: ``[B,Cin,H,W] -> [B,Cout,H,W]``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class CNNExpert(nn.Module):
    """A plain CNN expert: optional full-resolution stem, stride-2 stages, global average *and* max
    pool, linear head.

    The max pool matters: a tumour is a small bright region, and an average over the whole
    8×8 feature map dilutes it (with average pooling alone, training stalled at chance on the
    synthetic data).

    ``forward(x [B,1,S,S]) -> (logits [B,C], features [B, 2·widths[-1]])``.
    """

    def __init__(self, widths: tuple[int, ...], num_classes: int, dropout: float, stem: int = 0) -> None:
        super().__init__()
        # Identity holds no tensors, so a stem-less expert keeps the state_dict keys it always had
        self.stem = nn.Sequential(*[_Full(1 if i == 0 else widths[0], widths[0]) for i in range(stem)]) \
            if stem else nn.Identity()
        chans = (widths[0] if stem else 1, *widths)
        self.stages = nn.Sequential(*[_Stage(chans[i], chans[i + 1]) for i in range(len(widths))])
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(2 * widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.stages(self.stem(x))
        feats = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return self.head(self.drop(feats)), feats


class MoEClassifier(nn.Module):
    """Personalized MoE: a global expert, a local expert and a per-sample gate (docs/design.md).

    Input ``x``: float32 ``[B, 1, S, S]`` in [0, 1]. Inputs are centred (``x − 0.5``) inside the
    model, so callers pass preprocessed scans unchanged.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.global_expert = CNNExpert(cfg.global_widths, cfg.num_classes, cfg.dropout, cfg.stem)
        self.local_expert = CNNExpert(cfg.local_widths, cfg.num_classes, cfg.dropout, cfg.stem)
        self.gate = nn.Sequential(
            nn.Linear(2 * (cfg.global_widths[-1] + cfg.local_widths[-1]), cfg.gate_hidden),
            nn.ReLU(),
            nn.Linear(cfg.gate_hidden, 1),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # Start with an even mixture: g = sigmoid(0) = 0.5.
        nn.init.zeros_(self.gate[-1].weight)

    def _mixture(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (global log-probs [B,C], local log-probs [B,C], gate logit [B,1])."""
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"input has shape {tuple(x.shape)}: expected [B, 1, S, S]")
        x = x - 0.5
        g_logits, g_feats = self.global_expert(x)
        l_logits, l_feats = self.local_expert(x)
        gate_logit = self.gate(torch.cat([g_feats, l_feats], dim=1))
        return torch.log_softmax(g_logits, dim=1), torch.log_softmax(l_logits, dim=1), gate_logit

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` ``[B, C]``, computed stably as a log-sum-exp over the two experts."""
        g_lp, l_lp, gate_logit = self._mixture(x)
        log_g = nn.functional.logsigmoid(gate_logit)
        log_1mg = nn.functional.logsigmoid(-gate_logit)
        return torch.logaddexp(log_g + g_lp, log_1mg + l_lp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[B, C]`` (rows sum to 1) for ``x`` ``[B, 1, S, S]`` in [0, 1]."""
        g_lp, l_lp, gate_logit = self._mixture(x)
        g = torch.sigmoid(gate_logit)
        return g * g_lp.exp() + (1.0 - g) * l_lp.exp()

    def gate_value(self, x: torch.Tensor) -> torch.Tensor:
        """The gate ``g(x)`` ``[B]`` in (0, 1): the weight on the global expert."""
        return torch.sigmoid(self._mixture(x)[2]).squeeze(1)

    # --- federated parameter selection -------------------------------------------------------
    def param_groups(self) -> dict[str, list[str]]:
        """Names (as in ``state_dict``) of the federated (``global``) and site-only (``local``) tensors.

        ``global``: the global expert's convolution and linear weights. ``local``: everything else —
        the local expert, the gate, and every normalisation layer's affine parameters and running
        statistics (FedBN). Every ``state_dict`` key is in exactly one group.
        """
        norm_prefixes = {
            name + "." for name, m in self.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        }
        groups: dict[str, list[str]] = {"global": [], "local": []}
        for key in self.state_dict():
            is_norm = any(key.startswith(p) for p in norm_prefixes)
            if key.startswith("global_expert.") and not is_norm:
                groups["global"].append(key)
            else:
                groups["local"].append(key)
        return groups

    def global_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached copies of the ``global`` group's tensors (what the server aggregates)."""
        sd = self.state_dict()
        return {k: sd[k].detach().clone() for k in self.param_groups()["global"]}

    def load_global_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load exactly the ``global`` group; raises ``ValueError`` on missing/extra keys or bad shapes."""
        own = self.state_dict()
        expected = set(self.param_groups()["global"])
        got = set(sd)
        if got != expected:
            missing, extra = sorted(expected - got), sorted(got - expected)
            raise ValueError(
                f"global state dict mismatch: missing {missing[:5]}, unexpected {extra[:5]}; "
                "pass the output of global_state_dict() of a model with the same MoEConfig"
            )
        for k, v in sd.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"{k}: shape {tuple(v.shape)} != model's {tuple(own[k].shape)}")
        with torch.no_grad():
            for k, v in sd.items():
                own[k].copy_(v)
