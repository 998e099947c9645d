"""Single-channel ViT masked autoencoder: the attack detector's reconstructor (docs/design.md).

After He et al., "Masked Autoencoders Are Scalable Vision Learners" (CVPR 2022), and the layout of
facebookresearch/mae ``models_mae.py``, with two changes: patchify handles one channel, and the
random masking takes an explicit ``torch.Generator`` (never global RNG state).

Two modes:

- **training** — ``MaskedAutoencoder.forward(x, generator=g)``: a random ``mask_ratio`` of the
  patches is hidden per sample, the loss is the MSE on the hidden patches (optionally plus a
  weighted term on the visible ones); targets are pixels or normalised pixels (``norm_pix``).
- **scoring** — ``MAEScorer(mae).forward(x)``: K fixed mask sets whose *visible* parts partition
  the patches (``scoring_masks``), so every patch is hidden by K−1 sets and the score is
  deterministic. Returns the K full reconstructions ``[B, K, S, S]``. Static shapes and index
  buffers only: export-clean (ONNX, dynamo exporter, opset 20).

Symbols: S image side, P patch side, Np = (S/P)² patches (row-major), Nv visible patches per sample,
D encoder width, Dd decoder width.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

__all__ = [
    "MAEConfig",
    "MaskedAutoencoder",
    "MAEScorer",
    "MAEOutput",
    "scoring_masks",
    "patchify",
    "unpatchify",
    "normalize_patches",
]


@dataclass(frozen=True)
class MAEConfig:
    """Architecture and objective of the masked autoencoder.

    Attributes:
        image_size: side S of the square input; a multiple of ``patch``.
        patch: patch side P (8 at 128 px gives 256 patches: fine enough to reconstruct anatomy).
        embed_dim / depth / num_heads: the encoder transformer (runs on visible patches only).
        decoder_dim / decoder_depth / decoder_heads: the light decoder (runs on all patches).
        mlp_ratio: hidden width of each transformer MLP relative to its input width.
        mask_ratio: fraction of patches hidden in training (0.75, as in the MAE paper and as each
            scoring set hides with K = 4).
        norm_pix: predict each patch normalised by its own mean and std (the MAE paper's target).
        visible_loss_weight: weight of the reconstruction loss on *visible* patches (0: paper's
            masked-only loss). A positive weight teaches the decoder to copy what it sees.
        score_sets: K, the number of fixed scoring mask sets.

    The defaults are the ``small`` preset (84 k parameters). It is sized for the latency budget of
    the unflagged path (benchmarks/RESULTS.md, "Runtime: CPU"): the gate's statistic uses the
    reconstruction only to find the tissue half of the patches, which this size does about as well
    as a much larger MAE (docs/history.md, "Latency-sized small widths").
    """

    image_size: int = 128
    patch: int = 8
    embed_dim: int = 64
    depth: int = 2
    num_heads: int = 4
    decoder_dim: int = 32
    decoder_depth: int = 1
    decoder_heads: int = 2
    mlp_ratio: float = 2.0
    mask_ratio: float = 0.75
    norm_pix: bool = False
    visible_loss_weight: float = 0.0
    score_sets: int = 4

    def __post_init__(self) -> None:
        if self.patch < 1 or self.image_size < self.patch or self.image_size % self.patch:
            raise ValueError(
                f"image_size={self.image_size}, patch={self.patch}: image_size must be a positive "
                "multiple of patch"
            )
        for name in ("embed_dim", "depth", "num_heads", "decoder_dim", "decoder_depth", "decoder_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(
                f"decoder_dim={self.decoder_dim} is not divisible by decoder_heads={self.decoder_heads}"
            )
        if self.embed_dim % 4 or self.decoder_dim % 4:
            raise ValueError("embed_dim and decoder_dim must be multiples of 4 (2-D sin-cos positions)")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio={self.mlp_ratio}: must be > 0")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={self.mask_ratio}: must be in (0, 1)")
        if self.visible_loss_weight < 0:
            raise ValueError(f"visible_loss_weight={self.visible_loss_weight}: must be >= 0")
        if self.score_sets < 2 or self.num_patches % self.score_sets:
            raise ValueError(
                f"score_sets={self.score_sets}: must be >= 2 and divide the {self.num_patches} patches "
                "(the scoring sets' visible parts partition the patches in equal parts)"
            )
        n_keep = int(round(self.num_patches * (1.0 - self.mask_ratio)))
        if not 1 <= n_keep < self.num_patches:
            raise ValueError(f"mask_ratio={self.mask_ratio} leaves {n_keep} visible patches: need 1..Np-1")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @classmethod
    def preset(cls, name: str, image_size: int | None = None) -> MAEConfig:
        """``tiny`` (tests: 32 px, patch 8) or ``small`` (the default bundle: 128 px, patch 8)."""
        if name == "tiny":
            return cls(
                image_size=image_size or 32, patch=8, embed_dim=32, depth=1, num_heads=2,
                decoder_dim=16, decoder_depth=1, decoder_heads=2,
            )
        if name == "small":
            return cls(image_size=image_size or 128)
        raise ValueError(f"unknown preset {name!r}: use 'tiny' or 'small'")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MAEConfig:
        return cls(**d)


class MAEOutput(NamedTuple):
    """Training forward's result: ``loss`` scalar, ``pred`` ``[B,Np,P²]``, ``mask`` ``[B,Np]`` (1 = hidden)."""

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor


# ---------------------------------------------------------------------------------------------
# patches and masks
# ---------------------------------------------------------------------------------------------
def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, 1, S, S] -> [B, Np, P²]``, patches in row-major order, pixels row-major in a patch."""
    b, _, s, _ = x.shape
    g = s // patch
    x = x.reshape(b, g, patch, g, patch)
    return x.permute(0, 1, 3, 2, 4).reshape(b, g * g, patch * patch)


def unpatchify(p: torch.Tensor, patch: int) -> torch.Tensor:
    """``[..., Np, P²] -> [..., S, S]`` (inverse of ``patchify`` without the channel axis)."""
    lead = p.shape[:-2]
    g = math.isqrt(p.shape[-2])
    p = p.reshape(*lead, g, g, patch, patch)
    n = len(lead)
    perm = (*range(n), n, n + 2, n + 1, n + 3)
    return p.permute(perm).reshape(*lead, g * patch, g * patch)


def normalize_patches(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The MAE paper's normalised-pixel target: each patch minus its mean over sqrt(var + eps).

    Variance is the biased (population) variance, as in the gate (docs/design.md, "Gate semantics").
    """
    mean = p.mean(dim=-1, keepdim=True)
    var = p.var(dim=-1, keepdim=True, unbiased=False)
    return (p - mean) / torch.sqrt(var + eps)


def scoring_masks(num_patches: int, k: int = 4) -> np.ndarray:
    """K fixed mask sets whose visible parts partition the patches: bool ``[K, Np]``, True = visible.

    Patch ``(i, j)`` of the ``g × g`` grid is visible in set ``(i mod r)·c + (j mod c)`` where
    ``r · c = K`` is the most square factorisation of K — for K = 4 a 2×2 lattice, so every hidden
    patch has visible neighbours on all sides (the most context per reconstruction). Each set hides
    ``1 − 1/K`` of the patches (75 % for K = 4, as in training).

    Raises ``ValueError`` if ``num_patches`` is not a square or the sets would be unequal.
    """
    g = math.isqrt(num_patches)
    if g * g != num_patches:
        raise ValueError(f"num_patches={num_patches} is not a square grid: expected (S/patch)**2")
    if k < 2 or k > num_patches:
        raise ValueError(f"k={k}: need 2 <= k <= num_patches={num_patches}")
    r = max(d for d in range(1, math.isqrt(k) + 1) if k % d == 0)
    c = k // r
    i, j = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    assign = ((i % r) * c + (j % c)).reshape(-1)
    visible = assign[None, :] == np.arange(k)[:, None]
    counts = visible.sum(axis=1)
    if (counts != counts[0]).any():
        raise ValueError(
            f"k={k} on a {g}x{g} patch grid gives unequal visible sets {counts.tolist()}: "
            f"choose k whose factors {r}x{c} divide the grid side {g}"
        )
    return visible


def _sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding ``[grid², dim]`` (MAE ``get_2d_sincos_pos_embed``)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    out = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        arg = pos[:, None] * omega[None, :]
        out += [torch.sin(arg), torch.cos(arg)]
    return torch.cat(out, dim=1).float()


# ---------------------------------------------------------------------------------------------
# transformer
# ---------------------------------------------------------------------------------------------
class _Block(nn.Module):
    """Pre-norm transformer block: ``x + MHA(LN(x))``, ``x + MLP(LN(x))``. ``[B, N, D] -> [B, N, D]``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = max(1, int(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5, dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class MaskedAutoencoder(nn.Module):
    """ViT MAE on one-channel images ``[B, 1, S, S]`` in [0, 1]."""

    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        p2 = cfg.patch * cfg.patch
        self.patch_embed = nn.Linear(p2, cfg.embed_dim)
        self.register_buffer("pos_embed", _sincos_2d(cfg.embed_dim, cfg.grid)[None], persistent=False)
        self.blocks = nn.ModuleList([_Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim)
        self.decoder_embed = nn.Linear(cfg.embed_dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.register_buffer("dec_pos_embed", _sincos_2d(cfg.decoder_dim, cfg.grid)[None], persistent=False)
        self.decoder_blocks = nn.ModuleList(
            [_Block(cfg.decoder_dim, cfg.decoder_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(cfg.decoder_dim)
        self.decoder_pred = nn.Linear(cfg.decoder_dim, p2)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def num_keep(self) -> int:
        return int(round(self.cfg.num_patches * (1.0 - self.cfg.mask_ratio)))

    def _check(self, x: torch.Tensor) -> None:
        s = self.cfg.image_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, s, s):
            raise ValueError(f"input has shape {tuple(x.shape)}: expected [B, 1, {s}, {s}]")

    def encode(self, patches: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encode the visible patches. ``patches [B,Np,P²]``, ``ids_keep [B,Nv]`` → latent ``[B,Nv,D]``."""
        tokens = self.embed(patches)
        idx = ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        return self.encode_tokens(torch.gather(tokens, 1, idx))

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        """Patch embedding plus position: ``[B,Np,P²]`` → tokens ``[B,Np,D]``."""
        return self.patch_embed(patches) + self.pos_embed

    def encode_tokens(self, h: torch.Tensor) -> torch.Tensor:
        """The encoder blocks and norm on already embedded visible tokens ``[B,Nv,D]``."""
        for blk in self.blocks:
            h = blk(h)
        return self.norm(h)

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Decode all patches. ``latent [B,Nv,D]``, ``ids_restore [B,Np]`` → prediction ``[B,Np,P²]``.

        ``ids_restore`` maps each patch position to its place in ``[visible…, mask tokens…]``.
        """
        h = self.decoder_embed(latent)
        b, nv, dd = h.shape
        np_ = ids_restore.shape[1]
        h = torch.cat([h, self.mask_token.expand(b, np_ - nv, dd)], dim=1)
        h = torch.gather(h, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dd)) + self.dec_pos_embed
        for blk in self.decoder_blocks:
            h = blk(h)
        return self.decoder_pred(self.decoder_norm(h))

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction target ``[B, Np, P²]``: pixels, or normalised pixels with ``norm_pix``."""
        t = patchify(x, self.cfg.patch)
        return normalize_patches(t) if self.cfg.norm_pix else t

    def random_mask(self, batch: int, generator: torch.Generator, device: torch.device | None = None):
        """Per-sample random masking (argsort of uniform noise). Returns ``ids_keep [B,Nv]``,
        ``ids_restore [B,Np]``, ``mask [B,Np]`` float (1 = hidden)."""
        n = self.cfg.num_patches
        noise = torch.rand(batch, n, generator=generator, device=generator.device).to(device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, : self.num_keep]
        mask = torch.ones(batch, n, device=device)
        mask[:, : self.num_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return ids_keep, ids_restore, mask

    def loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE on hidden patches (+ ``visible_loss_weight`` × MSE on visible ones)."""
        per_patch = ((pred - self.target(x)) ** 2).mean(dim=-1)
        loss = (per_patch * mask).sum() / mask.sum()
        if self.cfg.visible_loss_weight > 0:
            vis = 1.0 - mask
            loss = loss + self.cfg.visible_loss_weight * (per_patch * vis).sum() / vis.sum().clamp_min(1.0)
        return loss

    def forward(self, x: torch.Tensor, *, generator: torch.Generator) -> MAEOutput:
        """Training forward with random masking drawn from ``generator``.

        Args:
            x: ``[B, 1, S, S]`` float32 in [0, 1].
            generator: the source of the random masks (on the same device as ``x`` or on CPU).
        """
        self._check(x)
        ids_keep, ids_restore, mask = self.random_mask(x.shape[0], generator, x.device)
        patches = patchify(x, self.cfg.patch)
        pred = self.decode(self.encode(patches, ids_keep), ids_restore)
        return MAEOutput(self.loss(x, pred, mask), pred, mask)


class MAEScorer(nn.Module):
    """Deterministic scoring mode: ``forward(x [B,1,S,S]) -> recon [B,K,S,S]``.

    ``recon[:, k]`` is the MAE's reconstruction of the whole image when only the patches with
    ``visible[k]`` were shown (pixel space, or normalised-patch space when ``cfg.norm_pix``).
    Buffers: ``visible [K, Np]`` bool (as the gate takes it), ``ids_keep [K, Nv]``,
    ``ids_restore [K, Np]`` int64. Shares parameters with the wrapped ``mae``.
    """

    def __init__(self, mae: MaskedAutoencoder, k: int | None = None) -> None:
        super().__init__()
        self.mae = mae
        k = mae.cfg.score_sets if k is None else k
        visible = scoring_masks(mae.cfg.num_patches, k)
        # ids_keep: visible patches of set k in row-major order; ids_restore puts them back.
        ids_shuffle = np.argsort(~visible, axis=1, kind="stable")
        nv = int(visible[0].sum())
        self.register_buffer("visible", torch.from_numpy(visible))
        self.register_buffer("ids_keep", torch.from_numpy(ids_shuffle[:, :nv].copy()).long())
        self.register_buffer("ids_restore", torch.from_numpy(np.argsort(ids_shuffle, axis=1)).long())

    @property
    def k(self) -> int:
        return int(self.visible.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.mae.cfg
        b, k = x.shape[0], self.ids_keep.shape[0]
        s = cfg.image_size
        patches = patchify(x.reshape(b, 1, s, s), cfg.patch)                  # [B, Np, P²]
        np_, p2 = patches.shape[1], patches.shape[2]
        # Embed the patches once, then take every set's visible tokens with one gather: the same
        # maths as encode() on K copies of the patches, with K× less patch embedding (and no
        # [B·K, Np, P²] copy); tested equal to that path.
        tokens = self.mae.embed(patches)                                      # [B, Np, D]
        nv = self.ids_keep.shape[1]
        visible = tokens[:, self.ids_keep.reshape(-1)].reshape(b * k, nv, tokens.shape[-1])
        ids_restore = self.ids_restore.unsqueeze(0).expand(b, -1, -1).reshape(b * k, -1)
        pred = self.mae.decode(self.mae.encode_tokens(visible), ids_restore)  # [B*K, Np, P²]
        return unpatchify(pred.reshape(b, k, np_, p2), cfg.patch)
