"""A small time-conditioned UNet, wrapped in an EDM preconditioner so that it predicts x0.

``UNet(cfg)(x_t [B,1,S,S], t [B] float32) -> x0_hat [B,1,S,S]``, all in the diffusion space
[−1, 1] of ``medfedpure.models.diffusion``.

Why x0-prediction through a preconditioner (Karras et al. 2022 "EDM", §5, Table 1): the purifier
only starts from small t (little noise). A network that outputs x0 directly must re-draw the whole
scan at every step and smooths small lesions away (what a first, naive purifier here did); an
eps-network gives x0 = (x_t − √(1−ᾱ)ε̂)/√ᾱ whose error is amplified where ᾱ → 0 (never used) but is
poorly scaled as σ → 0. EDM's wrapper interpolates between the two:

    x̂ = x_t / √ᾱ_t,   σ = √((1−ᾱ_t)/ᾱ_t)                      (VP → EDM scaling)
    D(x̂; σ) = c_skip(σ) · x̂ + c_out(σ) · F_θ(c_in(σ) · x̂; t)   (EDM eq. 7)
    c_skip = σ_d² / (σ² + σ_d²),  c_out = σ σ_d / √(σ² + σ_d²),  c_in = 1 / √(σ² + σ_d²)

At small σ, c_skip → 1 and c_out → 0: the scan passes through the skip path untouched and the
network only supplies a correction of size ~σ, so lesions survive; F_θ's training target has unit
variance at every σ. At t = 0 the model is exactly the identity. The network F_θ is a plain
DDPM-style UNet (Ho et al. 2020, App. B) with GroupNorm, SiLU, sinusoidal time embedding added in
every residual block, strided-conv downsampling and nearest-neighbour upsampling. No attention:
at the noise levels the purifier uses, denoising is local, and convolutions are cheap on CPU.

With ``unshuffle = r > 1`` the UNet works on the scan's r² polyphase sub-images at 1/r resolution
(pixel unshuffle in, pixel shuffle out), as FFDNet does (Zhang, Zuo & Zhang 2018, "FFDNet: Toward a
Fast and Flexible Solution for CNN-Based Image Denoising", IEEE TIP 27(9), §III-B). The rearrangement
is lossless (a permutation of pixels) and quadruples the receptive field per layer; with the same
channel widths it cuts the convolutions' work by r², which is what the flagged path's latency is made
of (docs/history.md, "The purifier on 2×2 polyphase sub-images").

Export-clean: static shapes, no ``.item()``, no data-dependent Python branches; ᾱ(t) comes from a
buffer by floor/gather/lerp, so ``(x_t, t)`` exports to ONNX (dynamo exporter, opset 20).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from medfedpure.models.diffusion import DiffusionSchedule, interp_alphas_cumprod, make_alphas_cumprod

__all__ = ["UNetConfig", "UNet", "timestep_embedding"]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture and noise schedule of the purifier's UNet (teacher and student alike).

    The ``small`` preset (the default bundle's) is these defaults with ``unshuffle = 2``: 375 k
    parameters, sized so that the flagged path (MAE + K denoiser calls + classifier) stays within
    its latency budget on 2 CPU cores (benchmarks/RESULTS.md, "Runtime: CPU"); a wider UNet at full
    resolution does not. ``unshuffle`` defaults to 1 so that configurations saved before it existed
    load unchanged.
    """

    image_size: int = 128  # S: side of the square input; must divide by unshuffle · 2**(levels − 1)
    in_channels: int = 1  # grey scans
    base_channels: int = 8  # channels at full resolution
    channel_mults: tuple[int, ...] = (1, 2, 4, 8)  # one entry per resolution level
    num_res_blocks: int = 1  # residual blocks per level (encoder; decoder has the same)
    groups: int = 4  # GroupNorm groups; must divide every level's channel count
    time_dim: int = 64  # width of the time embedding MLP
    dropout: float = 0.0  # dropout inside residual blocks
    sigma_data: float = 0.5  # EDM σ_data: std of the data in [−1, 1] space
    schedule: str = "cosine"  # DDPM β schedule the model is trained with
    num_timesteps: int = 1000  # T
    unshuffle: int = 1  # r: the UNet runs on the r² polyphase sub-images at S / r (FFDNet); 1 = off

    def __post_init__(self) -> None:
        if isinstance(self.channel_mults, list):  # JSON round trip gives lists
            object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        if self.in_channels < 1:
            raise ValueError(f"in_channels={self.in_channels}: must be >= 1")
        if self.base_channels < 1 or self.num_res_blocks < 1 or self.time_dim < 2 or self.time_dim % 2:
            raise ValueError(
                f"base_channels={self.base_channels}, num_res_blocks={self.num_res_blocks}, "
                f"time_dim={self.time_dim}: need base_channels >= 1, num_res_blocks >= 1, even time_dim >= 2"
            )
        if not self.channel_mults or any(m < 1 for m in self.channel_mults):
            raise ValueError(f"channel_mults={self.channel_mults}: need a non-empty tuple of positive ints")
        if len(self.channel_mults) > 5:
            raise ValueError(f"channel_mults={self.channel_mults}: at most 5 levels")
        if not isinstance(self.unshuffle, int) or self.unshuffle < 1:
            raise ValueError(f"unshuffle={self.unshuffle!r}: expected an int >= 1 (1 = full resolution)")
        factor = self.size_multiple
        if self.image_size < factor or self.image_size % factor:
            raise ValueError(
                f"image_size={self.image_size} must be a positive multiple of {factor} "
                f"for {len(self.channel_mults)} levels at unshuffle={self.unshuffle}; "
                "change image_size, channel_mults or unshuffle"
            )
        for m in self.channel_mults:
            if (self.base_channels * m) % self.groups:
                raise ValueError(
                    f"groups={self.groups} does not divide {self.base_channels * m} channels; "
                    "pick groups that divide base_channels"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout}: expected [0, 1)")
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data={self.sigma_data}: must be > 0")
        DiffusionSchedule(self.schedule, self.num_timesteps)  # validates both

    @property
    def size_multiple(self) -> int:
        """Every input side must be a multiple of this: ``unshuffle · 2**(levels − 1)``."""
        return self.unshuffle * 2 ** (len(self.channel_mults) - 1)

    @classmethod
    def preset(cls, name: str, **overrides: object) -> UNetConfig:
        """``tiny`` (tests: 32 px, ~30 k params) or ``small`` (default bundle: 128 px, ~0.37 M, unshuffle 2)."""
        presets: dict[str, dict[str, object]] = {
            "tiny": dict(image_size=32, base_channels=8, channel_mults=(1, 2, 4), groups=4, time_dim=32),
            "small": dict(unshuffle=2),
        }
        if name not in presets:
            raise ValueError(f"unknown UNet preset {name!r}: expected one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UNetConfig:
        """Inverse of :meth:`to_dict` (JSON lists become tuples; unknown keys raise TypeError)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (fractional) times ``t`` [B] → [B, dim] (Vaswani et al. 2017, §3.5)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GN → SiLU → conv → (+ time) → GN → SiLU → dropout → conv, plus a (1×1) skip."""

    def __init__(self, c_in: int, c_out: int, time_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(time_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity (Ho et al. 2020)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(emb)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class UNet(nn.Module):
    """EDM-preconditioned UNet x0-predictor. See the module docstring.

    forward(x_t [B, C, S, S] float32 in VP diffusion space, t [B] float32 in [0, T])
        -> x0_hat [B, C, S, S] (≈ [−1, 1]).
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.schedule = DiffusionSchedule(cfg.schedule, cfg.num_timesteps)
        # float32 table for export; persistent=False: rebuilt from the config, not stored.
        self.register_buffer(
            "alphas_cumprod", make_alphas_cumprod(cfg.schedule, cfg.num_timesteps).float(), persistent=False
        )
        chans = [cfg.base_channels * m for m in cfg.channel_mults]
        g, td, dp = cfg.groups, cfg.time_dim, cfg.dropout
        self.time_mlp = nn.Sequential(nn.Linear(td, td), nn.SiLU(), nn.Linear(td, td))
        c_io = cfg.in_channels * cfg.unshuffle**2  # channels the UNet body sees and returns
        self.stem = nn.Conv2d(c_io, chans[0], 3, padding=1)

        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        skip_chans: list[int] = []
        c = chans[0]
        for level, ch in enumerate(chans):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(c, ch, td, g, dp))
                c = ch
            self.down_blocks.append(blocks)
            skip_chans.append(c)
            last = level == len(chans) - 1
            self.downsamples.append(nn.Identity() if last else nn.Conv2d(c, c, 3, stride=2, padding=1))

        self.mid = ResBlock(c, c, td, g, dp)

        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level in reversed(range(len(chans))):
            ch = chans[level]
            blocks = nn.ModuleList()
            for j in range(cfg.num_res_blocks):
                blocks.append(ResBlock(c + (skip_chans[level] if j == 0 else 0), ch, td, g, dp))
                c = ch
            self.up_blocks.append(blocks)
            first = level == 0
            self.upsamples.append(nn.Identity() if first else nn.Conv2d(c, chans[level - 1], 3, padding=1))
            if not first:
                c = chans[level - 1]

        self.out_norm = nn.GroupNorm(g, c)
        self.out_conv = nn.Conv2d(c, c_io, 3, padding=1)

    def network(self, x_in: Tensor, t: Tensor) -> Tensor:
        """The raw UNet F_θ(c_in · x̂; t) [B, C, S, S] (EDM eq. 7's F)."""
        emb = self.time_mlp(timestep_embedding(t, self.cfg.time_dim))
        r = self.cfg.unshuffle
        h = self.stem(F.pixel_unshuffle(x_in, r) if r > 1 else x_in)
        skips: list[Tensor] = []
        for blocks, down in zip(self.down_blocks, self.downsamples, strict=True):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            h = down(h)
        h = self.mid(h, emb)
        for k, (blocks, up) in enumerate(zip(self.up_blocks, self.upsamples, strict=True)):
            h = torch.cat([h, skips[-1 - k]], dim=1)
            for block in blocks:
                h = block(h, emb)
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        out = self.out_conv(F.silu(self.out_norm(h)))
        return F.pixel_shuffle(out, r) if r > 1 else out

    def precondition(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(1/√ᾱ, c_skip, c_out, c_in), each [B, 1, 1, 1], at times ``t`` [B]."""
        ab = interp_alphas_cumprod(self.alphas_cumprod, t)
        sigma2 = (1 - ab) / ab
        sd2 = self.cfg.sigma_data**2
        c_skip = sd2 / (sigma2 + sd2)
        c_out = (sigma2 * sd2 / (sigma2 + sd2)).sqrt()
        c_in = (sigma2 + sd2).rsqrt()
        return tuple(v.reshape(-1, 1, 1, 1) for v in (ab.rsqrt(), c_skip, c_out, c_in))  # type: ignore[return-value]

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        inv_sqrt_ab, c_skip, c_out, c_in = self.precondition(t)
        x_hat = x_t * inv_sqrt_ab
        return c_skip * x_hat + c_out * self.network(c_in * x_hat, t)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
