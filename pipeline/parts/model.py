"""SemMAE's semantic part learner (Stage 1): part tokens, correlation maps, AdaIN decoder, losses.

From the frozen teacher's final-norm CLS token ``c [B, C]`` and patch tokens ``F [B, L, C]``:

1. part tokens, one of two forms (``tokens``):
   - ``mlp``: ``P = reshape(MLP(c), N x C) + Q`` (``Q``: a learned per-part bias);
   - ``channel_grouping`` (the paper's): ``P_i = d_i(c) * c``, the CLS feature re-weighted channel by
     channel by part i's grouping ``d_i(c) = sigmoid(W_2 tanh(W_1 c))_i`` in (0, 1)^C (two fully-connected
     layers with tanh then sigmoid, as in MA-CNN's channel grouping layers), so a part's correlation with a
     patch token is a weighted sum over the channels its group selects;
2. maps ``S = P F^T / sqrt(C)`` (divided by a temperature, 1 = the paper's form) -> softmax over
   the N parts (a soft partition) -> ``[B, N, H, W]``;
3. a fixed depthwise Gaussian blur;
4. a StyleGAN-style decoder reconstructs the image from the blurred maps, taking style from ``c``
   through AdaIN in every upsampling block;
5. loss = L1 reconstruction + ``diversity_weight`` x overlap + ``usage_weight`` x under-use.
The part segmentation is the argmax over the (un-blurred) maps.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PartLearner", "AdaIN", "diversity_loss", "usage_loss", "gaussian_kernel", "TOKEN_FORMS"]

TOKEN_FORMS = ("mlp", "channel_grouping")


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """Normalised 2-D Gaussian ``[size, size]``."""
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    k = torch.outer(g, g)
    return k / k.sum()


class AdaIN(nn.Module):
    """Instance-normalise ``x`` and modulate it with ``(1 + gamma, beta) = Linear(style)``."""

    def __init__(self, channels: int, style_dim: int):
        super().__init__()
        self.norm = nn.InstanceNorm2d(channels, affine=False)
        self.affine = nn.Linear(style_dim, 2 * channels)
        nn.init.zeros_(self.affine.weight)
        nn.init.zeros_(self.affine.bias)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.affine(style).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        return self.norm(x) * (1 + gamma) + beta


class _UpBlock(nn.Module):
    """x2 nearest upsampling -> conv3x3 -> AdaIN(style) -> LeakyReLU."""

    def __init__(self, c_in: int, c_out: int, style_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.adain = AdaIN(c_out, style_dim)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return F.leaky_relu(self.adain(self.conv(x), style), 0.2)


class ChannelGrouping(nn.Module):
    """N per-part channel groupings of the CLS token: ``d(c) = sigmoid(W_2 tanh(W_1 c))`` -> ``[B, N, C]`` in (0, 1),
    and the part tokens ``P = d(c) * c``."""

    def __init__(self, dim: int, num_parts: int):
        super().__init__()
        self.num_parts = num_parts
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, num_parts * dim)

    def grouping(self, cls: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(torch.tanh(self.fc1(cls)))).view(cls.shape[0], self.num_parts, -1)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.grouping(cls) * cls.unsqueeze(1)


class PartLearner(nn.Module):
    """Part tokens from the CLS token, part maps by correlation, and the AdaIN reconstruction decoder."""

    def __init__(
        self, dim: int, grid: tuple[int, int], num_parts: int = 6, image_size: int = 32,
        decoder_channels: int = 64, style_dim: int = 64, blur_size: int = 3, blur_sigma: float = 1.0,
        out_channels: int = 3, temperature: float = 1.0, tokens: str = "mlp",
    ):  # fmt: skip
        super().__init__()
        ups = math.log2(image_size / grid[0])
        if grid[0] != grid[1] or ups != int(ups) or ups < 0:
            raise ValueError(f"image_size={image_size} must be the square grid {grid} times a power of two")
        if tokens not in TOKEN_FORMS:
            raise ValueError(f"tokens={tokens!r}: use one of {TOKEN_FORMS}")
        self.dim, self.grid, self.num_parts, self.temperature = dim, tuple(grid), num_parts, temperature
        self.tokens = tokens
        if tokens == "mlp":
            self.part_mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, num_parts * dim))
            self.part_bias = nn.Parameter(torch.randn(num_parts, dim) * 0.02)  # Q
        else:
            self.grouping = ChannelGrouping(dim, num_parts)
        self.register_buffer("blur", gaussian_kernel(blur_size, blur_sigma).expand(num_parts, 1, -1, -1).clone())
        self.style = nn.Sequential(nn.Linear(dim, style_dim), nn.GELU())
        self.stem = nn.Conv2d(num_parts, decoder_channels, 3, padding=1)
        self.stem_adain = AdaIN(decoder_channels, style_dim)
        self.ups = nn.ModuleList(_UpBlock(decoder_channels, decoder_channels, style_dim) for _ in range(int(ups)))
        self.to_rgb = nn.Conv2d(decoder_channels, out_channels, 1)

    def part_logits(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """``S = P F^T / (sqrt(C) * temperature)``: ``cls [B, C]``, ``patches [B, L, C]`` -> ``[B, N, H, W]``."""
        b = cls.shape[0]
        if self.tokens == "mlp":
            parts = self.part_mlp(cls).view(b, self.num_parts, self.dim) + self.part_bias  # P [B, N, C]
        else:
            parts = self.grouping(cls)  # P_i = d_i(c) * c  [B, N, C]
        logits = parts @ patches.transpose(1, 2) / (math.sqrt(self.dim) * self.temperature)  # [B, N, L]
        return logits.view(b, self.num_parts, *self.grid)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        """Soft maps ``[B, N, H, W]`` (softmax over parts) and the reconstruction ``[B, 3, S, S]``."""
        maps = self.part_logits(cls.float(), patches.float()).softmax(dim=1)
        blurred = F.conv2d(maps, self.blur, padding=self.blur.shape[-1] // 2, groups=self.num_parts)
        style = self.style(cls.float())
        x = F.leaky_relu(self.stem_adain(self.stem(blurred), style), 0.2)
        for up in self.ups:
            x = up(x, style)
        return {"maps": maps, "recon": self.to_rgb(x)}


def diversity_loss(maps: torch.Tensor) -> torch.Tensor:
    """Overlap of each map with the strongest other map: ``mean_px sum_k A_k * max_{j!=k} A_j``.

    0 for disjoint (one-hot) maps; ``1/N`` for N identical uniform maps.
    """
    top2 = maps.topk(2, dim=1).values  # [B, 2, H, W]
    is_max = maps == top2[:, :1]
    others_max = torch.where(is_max, top2[:, 1:2], top2[:, :1])  # max over j != k
    return (maps * others_max).sum(1).mean()


def usage_loss(maps: torch.Tensor, min_share: float) -> torch.Tensor:
    """Penalise parts whose batch-mean share of the image falls below ``min_share`` (keeps parts alive)."""
    share = maps.mean(dim=(0, 2, 3))  # [N]
    return F.relu(min_share - share).sum()
