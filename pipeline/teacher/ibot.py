"""The iBOT objective (Zhou et al., ICLR 2022): self-distillation on [CLS] and on masked patch tokens.

A student ViT and an EMA teacher ViT share one projection head design (MLP -> L2-normalised
bottleneck -> weight-normalised prototypes). Per step:

- two global views and ``n_local`` local crops of each image; the student's global views have
  block-wise masked patches replaced by a learned mask token, the teacher sees them unmasked;
- [CLS] loss: cross-entropy between the teacher's centred, sharpened distribution of one global
  view and the student's distribution of every other view (global and local);
- patch loss (MIM): for each global view, cross-entropy between teacher and student patch
  distributions at the masked positions;
- the centres are EMAs of the teacher outputs; the teacher is an EMA of the student.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from pipeline import distributed as D

__all__ = ["IBOTHead", "IBOTNetwork", "IBOTLoss", "cosine_schedule", "ema_update"]


class IBOTHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised linear prototypes (``out_dim``)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 512, bottleneck_dim: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )  # fmt: skip
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad = False  # norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return self.last_layer(x)


class IBOTNetwork(nn.Module):
    """A timm ViT backbone with a mask token and an iBOT head (shared by [CLS] and patch tokens)."""

    def __init__(self, backbone: VisionTransformer, head: IBOTHead):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.embed_dim))

    def tokens(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm tokens ``[B, 1 + L, D]``; patches where ``masks [B, L]`` is True get the mask token."""
        vit = self.backbone
        x = vit.patch_embed(images)  # [B, L, D], or [B, H, W, D] with dynamic_img_size
        if masks is not None:
            m = masks.view(*x.shape[:-1], 1)
            x = torch.where(m, self.mask_token.to(x.dtype).view(*([1] * (x.ndim - 1)), -1), x)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
        return vit.norm(vit.blocks(x))

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Head outputs for [CLS] ``[B, K]`` and for the patch tokens ``[B, L, K]``."""
        t = self.tokens(images, masks)
        out = self.head(t)
        prefix = self.backbone.num_prefix_tokens
        return out[:, 0], out[:, prefix:]

    def forward_cls(self, images: torch.Tensor) -> torch.Tensor:
        """Head output for [CLS] only (local crops)."""
        return self.head(self.tokens(images)[:, 0])


def make_teacher(student: IBOTNetwork) -> IBOTNetwork:
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1 - momentum)


def cosine_schedule(start: float, end: float, step: int, total: int, warmup: int = 0, warmup_start: float = 0.0) -> float:
    """Linear warm-up from ``warmup_start`` to ``start`` over ``warmup`` steps, then half-cosine to ``end``."""
    if step < warmup:
        return warmup_start + (start - warmup_start) * step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


class IBOTLoss(nn.Module):
    """[CLS] and masked-patch self-distillation losses with teacher centring and sharpening."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 patch_weight: float = 1.0):  # fmt: skip
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.patch_weight = patch_weight
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center_patch", torch.zeros(1, 1, out_dim))

    def forward(
        self,
        student_cls: list[torch.Tensor],  # n_views x [B, K]: 2 global then local
        student_patch: list[torch.Tensor],  # 2 x [B, L, K] (global views, masked input)
        teacher_cls: list[torch.Tensor],  # 2 x [B, K]
        teacher_patch: list[torch.Tensor],  # 2 x [B, L, K]
        masks: list[torch.Tensor],  # 2 x [B, L] bool
        teacher_temp: float,
    ) -> dict[str, torch.Tensor]:
        t_cls = [F.softmax((t - self.center) / teacher_temp, dim=-1) for t in teacher_cls]
        t_patch = [F.softmax((t - self.center_patch) / teacher_temp, dim=-1) for t in teacher_patch]
        s_cls = [F.log_softmax(s / self.student_temp, dim=-1) for s in student_cls]
        cls_terms = [(-t * s).sum(-1).mean() for iq, t in enumerate(t_cls) for v, s in enumerate(s_cls) if v != iq]
        loss_cls = torch.stack(cls_terms).mean()
        patch_terms = []
        for t, s, m in zip(t_patch, student_patch, masks):
            ce = (-t * F.log_softmax(s / self.student_temp, dim=-1)).sum(-1)  # [B, L]
            m = m.to(ce.dtype)
            per_image = (ce * m).sum(-1) / m.sum(-1).clamp(min=1.0)
            has_mask = (m.sum(-1) > 0).to(ce.dtype)
            patch_terms.append((per_image * has_mask).sum() / has_mask.sum().clamp(min=1.0))
        loss_patch = torch.stack(patch_terms).mean()
        self._update_centers(teacher_cls, teacher_patch)
        with torch.no_grad():
            probs = torch.cat(t_cls)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
            mean_p = probs.mean(0)
            batch_entropy = -(mean_p * mean_p.clamp_min(1e-12).log()).sum()
        return {
            "loss": loss_cls + self.patch_weight * loss_patch,
            "loss_cls": loss_cls.detach(),
            "loss_patch": loss_patch.detach(),
            # collapse monitors: per-sample entropy -> 0 and batch entropy -> 0 means one-hot collapse;
            # per-sample entropy -> log K means uniform collapse
            "teacher_entropy": entropy,
            "teacher_batch_entropy": batch_entropy,
        }

    @torch.no_grad()
    def _update_centers(self, teacher_cls: list[torch.Tensor], teacher_patch: list[torch.Tensor]) -> None:
        m = self.center_momentum
        cls_mean = torch.cat(teacher_cls).mean(0, keepdim=True)
        patch_mean = torch.cat(teacher_patch).mean(dim=(0, 1), keepdim=True)
        cls_mean = D.mean_over_ranks(cls_mean)  # itself in a single process
        patch_mean = D.mean_over_ranks(patch_mean)
        self.center.mul_(m).add_(cls_mean, alpha=1 - m)
        self.center_patch.mul_(m).add_(patch_mean, alpha=1 - m)
