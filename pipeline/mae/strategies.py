"""Every masking strategy behind one call: what the loader adds to a batch for it, and the batch's masking.

``pretrain.masking`` picks one of four strategies (docs/method.md, "Masking strategies"): ``semantic`` (SemMAE,
with its curriculum), ``random`` (MAE), ``block`` (BEiT's blockwise masking) and ``attention`` (AttMask, by the
teacher's CLS attention stored in the part shards). Training and the figures both mask through
:func:`make_masking`, so a figure shows exactly the masks a run trains with.
"""

from __future__ import annotations

from typing import Optional

import torch

from pipeline.config.pretrain import PretrainConfig
from pipeline.mae.masking import (
    Masking,
    attention_masking,
    block_flags_batch,
    block_masking,
    noise_size,
    random_masking,
    semantic_masking,
)

__all__ = ["loader_guide", "make_masking"]


def loader_guide(cfg: PretrainConfig) -> tuple[Optional[str], Optional[tuple[float, int, float]]]:
    """What the loader adds to each batch for ``cfg.masking``: the cropped attention maps (attention), the
    BEiT block flags of each sample's noise (block: BEiT's loop is sequential per image, so it runs in the
    loader workers, as in BEiT), or nothing."""
    if cfg.masking == "attention":
        return "attention", None
    if cfg.masking == "block":
        return "block", (cfg.mask_ratio, cfg.block_min_patches, cfg.block_min_aspect)
    return None, None


def make_masking(cfg: PretrainConfig, parts: torch.Tensor, alpha: float, num_parts: int,
                 generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None,
                 guide: Optional[torch.Tensor] = None) -> Masking:  # fmt: skip
    """The masking of a batch with part maps ``parts [B, G, G]`` (used by semantic masking) by ``cfg.masking``;
    its randomness is the loader's per-sample ``noise`` when given, else drawn from ``generator``. ``guide``
    is the loader's extra element (see :func:`loader_guide`): the attention maps ``[B, L]`` (required by
    attention masking) or the block flags ``[B, L]`` (block masking computes them from the noise when absent)."""
    ids = parts.flatten(1).long()
    b, length = ids.shape
    if cfg.masking == "random":
        return random_masking(b, length, cfg.mask_ratio, generator, ids.device, noise=noise)
    if cfg.masking == "semantic":
        return semantic_masking(ids, cfg.mask_ratio, alpha, num_parts, generator, noise=noise)
    if noise is None:
        noise = torch.rand(b, noise_size(length, num_parts), generator=generator, device=ids.device)
    if cfg.masking == "block":
        if guide is None:
            guide = block_flags_batch(noise, cfg.grid, cfg.mask_ratio, cfg.block_min_patches, cfg.block_min_aspect)
        return block_masking(guide.to(ids.device), cfg.mask_ratio, noise)
    if guide is None:
        raise ValueError("attention masking needs the attention maps of the batch (the loader's guide='attention')")
    return attention_masking(guide.to(ids.device).flatten(1).float(), cfg.mask_ratio, cfg.attention_mode,
                             cfg.hint_share, noise)  # fmt: skip
