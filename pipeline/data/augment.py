"""Batched image augmentation on tensors: random resized crops + flips and brightness/contrast jitter (the teacher's
multi-crop views, the linear probe's training crops), and the block-wise patch masks of the iBOT objective.

Crops are done for a whole batch at once with one ``grid_sample`` (random resized crop + flip as a
per-image affine map), so the same code runs on CPU and GPU without a Python loop over images.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["random_resized_crop", "jitter", "block_masks"]


def random_resized_crop(
    images: torch.Tensor, size: int, scale: tuple[float, float], generator: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
) -> torch.Tensor:  # fmt: skip
    """Random resized crops (+ horizontal flips) of ``images [B, C, H, W]`` -> ``[B, C, size, size]``.

    Each image gets a box of area fraction ``U(scale)`` and aspect ``exp(U(log ratio))`` at a uniform
    position, resampled bilinearly; flipped with probability 1/2.
    """
    b = images.shape[0]
    dev = images.device
    u = torch.rand(b, 4, generator=generator, device=generator.device).to(dev)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    w = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)  # box width / image width
    h = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
    cx = (1 - w) * (2 * u[:, 2] - 1)  # centre in normalised [-1, 1] coordinates, box inside the image
    cy = (1 - h) * (2 * u[:, 3] - 1)
    sign = torch.ones(b, device=dev)
    if flip:
        sign = torch.where(torch.rand(b, generator=generator, device=generator.device).to(dev) < 0.5, -sign, sign)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, [b, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def jitter(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Per-image brightness and contrast jitter of ``images [B, C, H, W]`` in [0, 1]."""
    b = images.shape[0]
    u = torch.rand(b, 2, 1, 1, 1, generator=generator, device=generator.device).to(images.device)
    brightness = 1 + strength * (2 * u[:, 0] - 1)
    contrast = 1 + strength * (2 * u[:, 1] - 1)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return ((images - mean) * contrast + mean * brightness).clamp(0, 1)


def block_masks(
    batch: int, grid: tuple[int, int], ratio: tuple[float, float], rng: np.random.Generator,
    min_block: int = 4, aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> torch.Tensor:  # fmt: skip
    """iBOT's block-wise masks: ``[B, H*W]`` bool, True = masked; each image masks ``U(ratio)`` of patches.

    Rectangles of random area and aspect are added until the target count is reached (blocks may
    overlap; the last block is trimmed so the count is met exactly when possible).
    """
    gh, gw = grid
    n = gh * gw
    out = np.zeros((batch, gh, gw), dtype=bool)
    for i in range(batch):
        target = int(round(rng.uniform(*ratio) * n))
        mask = out[i]
        for _ in range(100):
            left = target - int(mask.sum())
            if left <= 0:
                break
            area = rng.uniform(min(min_block, left), max(min_block, left))
            ar = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
            h = max(1, min(gh, int(round(math.sqrt(area * ar)))))
            w = max(1, min(gw, int(round(math.sqrt(area / ar)))))
            top, lft = rng.integers(0, gh - h + 1), rng.integers(0, gw - w + 1)
            block = np.zeros_like(mask)
            block[top : top + h, lft : lft + w] = True
            new = np.flatnonzero(block & ~mask)
            mask.flat[new[:left]] = True
    return torch.from_numpy(out.reshape(batch, n))
