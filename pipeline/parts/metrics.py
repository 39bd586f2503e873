"""Statistics of part segmentations (argmax maps) and the reference segmentations they are judged by.

- shares: fraction of all patches given to each part (min/max expose dead or swallowing parts);
- coherence: mean fraction of 4-neighbour patch pairs with the same part id, next to the same
  number after shuffling positions inside each image (what chance gives for the same shares);
- references: parts from the teacher's last-layer CLS-to-patch attention heads (the paper's
  ablation), and k-means on the teacher's patch tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["part_shares", "coherence", "shuffled_coherence", "shuffle_within_images", "segmentation_stats", "kmeans", "attention_head_parts", "cls_attention",
           "tokens_and_cls_attention"]


def part_shares(ids: torch.Tensor, num_parts: int) -> torch.Tensor:
    """``ids [B, H, W]`` int -> share of all patches per part ``[N]``."""
    return torch.bincount(ids.flatten(), minlength=num_parts).float() / ids.numel()


def coherence(ids: torch.Tensor) -> float:
    """Mean fraction of horizontally and vertically adjacent patch pairs with the same id."""
    same_h = (ids[:, :, 1:] == ids[:, :, :-1]).float()
    same_v = (ids[:, 1:, :] == ids[:, :-1, :]).float()
    return float(torch.cat([same_h.flatten(), same_v.flatten()]).mean())


def shuffle_within_images(ids: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``ids [B, H, W]`` with the positions inside each image randomly permuted (seeded): every image keeps its
    part sizes and loses where the parts are, the chance level of a segmentation."""
    b, h, w = ids.shape
    g = torch.Generator().manual_seed(seed)
    perm = torch.argsort(torch.rand(b, h * w, generator=g), dim=1)
    return ids.flatten(1).gather(1, perm).view(b, h, w)


def shuffled_coherence(ids: torch.Tensor, seed: int = 0) -> float:
    """Coherence after a random permutation of the positions inside each image (same shares)."""
    return coherence(shuffle_within_images(ids, seed))


def segmentation_stats(ids: torch.Tensor, num_parts: int, seed: int = 0) -> dict[str, float]:
    shares = part_shares(ids, num_parts)
    coh, shuf = coherence(ids), shuffled_coherence(ids, seed)
    return {
        "min_share": float(shares.min()),
        "max_share": float(shares.max()),
        "coherence": coh,
        "coherence_shuffled": shuf,
        "coherence_gain": coh - shuf,
    }


def kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """Cosine k-means (k-means++ seeding) of ``x [M, C]``; returns the centroids ``[k, C]``."""
    x = F.normalize(x.float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    centers = [x[torch.randint(len(x), (1,), generator=g)].squeeze(0)]
    for _ in range(1, k):
        d = (1 - x @ torch.stack(centers).T).clamp_min(0).min(dim=1).values
        centers.append(x[torch.multinomial(d + 1e-12, 1, generator=g)].squeeze(0))
    c = torch.stack(centers)
    for _ in range(iters):
        assign = (x @ c.T).argmax(1)
        new = torch.zeros_like(c).index_add_(0, assign, x)
        empty = torch.bincount(assign, minlength=k) == 0
        new[empty] = c[empty]
        c = F.normalize(new, dim=1)
    return c


def attention_head_parts(attn: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``attn [B, heads, L]`` (CLS-to-patch attention per head) -> part id = argmax head ``[B, H, W]``."""
    return attn.argmax(dim=1).view(attn.shape[0], *grid)


def _cls_weights(attn, x: torch.Tensor, prefix: int) -> torch.Tensor:
    """CLS-to-patch softmax weights ``[B, heads, L]`` of timm ``Attention`` module ``attn`` given its input ``x``
    (the block's normalised tokens): timm's fused attention never forms the weights, so they are recomputed."""
    b, n, c = x.shape
    qkv = attn.qkv(x).view(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = (q[:, :, :1] @ k.transpose(-2, -1) * attn.scale).softmax(-1)  # [B, heads, 1, N]
    return weights[:, :, 0, prefix:]


@torch.no_grad()
def cls_attention(vit, images: torch.Tensor) -> torch.Tensor:
    """Last-block CLS-to-patch attention of a timm ViT per head: ``[B, heads, L]`` (softmax over tokens)."""
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    for blk in vit.blocks[:-1]:
        x = blk(x)
    last = vit.blocks[-1]
    return _cls_weights(last.attn, last.norm1(x), vit.num_prefix_tokens)


@torch.no_grad()
def tokens_and_cls_attention(vit, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``vit.forward_features(images)`` and :func:`cls_attention` from one forward pass: the last attention
    module's input is taken by a pre-hook on its way through."""
    seen: list[torch.Tensor] = []
    hook = vit.blocks[-1].attn.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        tokens = vit.forward_features(images)
    finally:
        hook.remove()
    return tokens, _cls_weights(vit.blocks[-1].attn, seen[0], vit.num_prefix_tokens)
