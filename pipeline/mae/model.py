"""The masked autoencoder: a timm ``VisionTransformer`` encoder on visible patches, a light decoder.

The encoder *is* a headless timm ``VisionTransformer`` (fused-attention ``Block``s), kept as
``self.encoder``; its ``state_dict()`` therefore loads into ``timm.create_model(<arch>, ...)`` of the
same shape with no key remapping. Position embeddings are fixed 2-D sin-cos (a zero vector for the
CLS token), in the encoder and the decoder, as in MAE.

Phases, as in MAE: ``patchify``, ``forward_encoder`` (visible patches only, given a :class:`Masking`),
``forward_decoder`` (visible latents + mask tokens, un-shuffled with ``ids_restore``) and
``forward_loss`` (per-patch MSE on normalised pixels, averaged over masked patches only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import timm
import torch
import torch.nn as nn
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer

from pipeline.data.images import IMAGENET_MEAN, IMAGENET_STD
from pipeline.mae.masking import Masking

if TYPE_CHECKING:
    from pipeline.config.pretrain import PretrainConfig

__all__ = ["MaskedAutoencoder", "sincos_pos_embed", "build_mae"]


def sincos_pos_embed(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding ``[1, 1 + grid*grid, dim]``; the first (CLS) row is zero."""
    pos = build_sincos2d_pos_embed([grid, grid], dim=dim)
    return torch.cat([torch.zeros(1, dim), pos], 0).unsqueeze(0)


class MaskedAutoencoder(nn.Module):
    def __init__(
        self, arch: str = "vit_tiny_patch16_224", img_size: int = 32, patch_size: int = 4, embed_dim: int = 192,
        depth: int = 6, num_heads: int = 3, decoder_embed_dim: int = 128, decoder_depth: int = 2,
        decoder_num_heads: int = 4, mlp_ratio: float = 4.0, norm_pix_loss: bool = True, loss_target: str = "input",
    ) -> None:  # fmt: skip
        super().__init__()
        encoder = timm.create_model(arch, pretrained=False, num_classes=0, img_size=img_size, patch_size=patch_size,
                                    embed_dim=embed_dim, depth=depth, num_heads=num_heads)  # fmt: skip
        if not isinstance(encoder, VisionTransformer) or encoder.cls_token is None or encoder.num_prefix_tokens != 1:
            raise ValueError(f"{arch!r} is not a plain timm VisionTransformer with one CLS token")
        self.encoder: VisionTransformer = encoder
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.num_patches = self.grid * self.grid
        self.norm_pix_loss = norm_pix_loss
        if loss_target not in ("input", "pixels"):
            raise ValueError(f"loss_target must be 'input' or 'pixels', not {loss_target!r}")
        self.loss_target = loss_target
        # the input's normalisation (pipeline.data.images.normalize), undone for loss_target == "pixels"
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(self.grid, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.Sequential(
            *[Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)
              for _ in range(decoder_depth)]  # fmt: skip
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * 3)
        self._init_weights()

    def _init_weights(self) -> None:
        """MAE's initialisation: xavier-uniform linears (patch embedding as a linear), N(0, 0.02) tokens."""
        enc = self.encoder
        with torch.no_grad():
            enc.pos_embed.copy_(sincos_pos_embed(self.grid, enc.embed_dim))
        enc.pos_embed.requires_grad_(False)
        w = enc.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(enc.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B, L, p*p*3]`` (row-major patches, pixels in (p, p, C) order)."""
        b, c, h, w = imgs.shape
        p = self.patch_size
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, p*p*3]`` -> ``[B, 3, H, W]``."""
        p, g = self.patch_size, self.grid
        x = x.reshape(x.shape[0], g, g, p, p, 3)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], 3, g * p, g * p)

    def forward_encoder(self, imgs: torch.Tensor, masking: Masking) -> torch.Tensor:
        """Latents ``[B, 1 + len_keep, D]`` of the CLS token and the visible patches (after the final norm)."""
        enc = self.encoder
        x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]  # [B, L, D]
        ids_keep = masking.ids_shuffle[:, : masking.len_keep]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = enc.blocks(torch.cat([cls, x], 1))
        return enc.norm(x)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predicted pixels ``[B, L, p*p*3]`` for every patch, from visible latents ``[B, 1 + keep, D]``."""
        x = self.decoder_embed(latent)
        b, length = ids_restore.shape
        masked = self.mask_token.expand(b, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], masked], 1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # un-shuffle
        x = torch.cat([x[:, :1], x_], 1) + self.decoder_pos_embed
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x)[:, 1:]

    def target_images(self, imgs: torch.Tensor) -> torch.Tensor:
        """What the decoder learns to predict, as images: the normalised input itself (``loss_target``
        "input", MAE's code) or its [0, 1] pixels ("pixels")."""
        if self.loss_target == "input":
            return imgs
        return imgs.float() * self.pixel_std + self.pixel_mean

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over masked patches of the per-patch MSE (targets normalised per patch when ``norm_pix_loss``)."""
        target = self.patchify(self.target_images(imgs))
        if self.norm_pix_loss:
            mean = target.mean(-1, keepdim=True)
            var = target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(-1)  # [B, L]
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, masking: Masking) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, pred [B, L, p*p*3])`` for normalised images ``[B, 3, H, W]`` and a masking."""
        pred = self.forward_decoder(self.forward_encoder(imgs, masking), masking.ids_restore)
        return self.forward_loss(imgs, pred, masking.mask), pred

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights in timm ``VisionTransformer`` names (loads with ``strict=True``)."""
        return self.encoder.state_dict()

    def reconstruct(self, imgs: torch.Tensor, pred: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predicted images in the input's (normalised) space, de-normalised with each target patch's own
        statistics when ``norm_pix_loss``; where ``mask`` is 0 the visible input patch is pasted back."""
        target = self.patchify(self.target_images(imgs))
        pred = pred.float()
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred * (var + 1e-6) ** 0.5 + mean
        if mask is not None:
            pred = torch.where(mask.unsqueeze(-1).bool(), pred, target)
        out = self.unpatchify(pred)
        return out if self.loss_target == "input" else (out - self.pixel_mean) / self.pixel_std


def build_mae(cfg: "PretrainConfig") -> MaskedAutoencoder:
    """The MAE of a pretrain config, initialised from its seed (what pretraining starts from)."""
    torch.manual_seed(cfg.seed)
    return MaskedAutoencoder(cfg.arch, cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads,
                             cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads,
                             norm_pix_loss=cfg.norm_pix_loss, loss_target=cfg.loss_target)  # fmt: skip
