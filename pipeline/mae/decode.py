"""Image decoding and RandomResizedCrop on the training device (``pretrain.common.decode: device``).

The CPU path (``decode: cpu``) decodes and crops every image in the loader workers with PIL; on an
ImageNet-sized JPEG that is ~1.1 ms of decode plus ~1.2 ms of bicubic resizing per image per core,
fewer images per second than one GPU trains a ViT-B/16 on. With ``decode: device`` the workers only
read the shards, parse each JPEG's header for its size, draw the crop, flip and masking noise (from
the same per-stream generator, in the same order, as the CPU path) and crop the part map; the
images travel as their JPEG bytes and are decoded in one batch by ``torchvision.io.decode_jpeg`` on
the training device (nvJPEG on CUDA, libjpeg-turbo on CPU), then cropped, resized (bicubic,
antialiased) and flipped there. Non-JPEG images (PNG) are decoded in the workers and only cropped
on the device. The part maps are identical to the CPU path's; the pixels differ from PIL's by
resampling details (the crop box is rounded to whole pixels, as torchvision's RandomResizedCrop does).
"""

from __future__ import annotations

import io
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["EncodedImages", "header_size", "decode_crop", "merge"]


class EncodedImages(NamedTuple):
    """A batch of images still to decode, packed so that a loader worker hands it over as a few
    tensors (one shared-memory block, not one per image): ``blob`` uint8 holds, per image, its JPEG
    bytes or its decoded pixels (``shapes`` [b, 3] = (3, H, W) for those, 0 for JPEGs) between
    ``offsets`` [b + 1]; ``boxes`` [b, 4] float64 (top, left, height, width in the image's pixels),
    ``flips`` [b] bool, and where each sample comes from ("sample <key> in <shard>", for error messages)."""

    blob: torch.Tensor
    offsets: torch.Tensor
    shapes: torch.Tensor
    boxes: torch.Tensor
    flips: torch.Tensor
    sources: list[str]

    def __len__(self) -> int:  # the batch size, like a tensor's len
        return len(self.sources)

    @staticmethod
    def pack(items: Sequence[tuple[bytes | np.ndarray, Sequence[float], bool, str]]) -> "EncodedImages":
        """From ``(JPEG bytes or uint8 [3, H, W] pixels, box, flip, source)`` per image."""
        chunks, shapes = [], []
        for data, _, _, _ in items:
            if isinstance(data, np.ndarray):
                chunks.append(data.reshape(-1))
                shapes.append(data.shape)
            else:
                chunks.append(np.frombuffer(data, dtype=np.uint8))
                shapes.append((0, 0, 0))
        offsets = np.cumsum([0, *(len(c) for c in chunks)])
        return EncodedImages(torch.from_numpy(np.concatenate(chunks)), torch.from_numpy(offsets),
                             torch.tensor(shapes, dtype=torch.int64), torch.tensor([i[1] for i in items], dtype=torch.float64),
                             torch.tensor([i[2] for i in items]), [i[3] for i in items])  # fmt: skip


def header_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` of an encoded image from its header only (PIL opens lazily)."""
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def merge(batches: Sequence[EncodedImages]) -> EncodedImages:
    starts = np.cumsum([0, *(len(b.blob) for b in batches[:-1])])
    return EncodedImages(torch.cat([b.blob for b in batches]),
                         torch.cat([batches[0].offsets[:1]] + [b.offsets[1:] + int(s) for b, s in zip(batches, starts)]),
                         torch.cat([b.shapes for b in batches]), torch.cat([b.boxes for b in batches]),
                         torch.cat([b.flips for b in batches]), [k for b in batches for k in b.sources])  # fmt: skip


def decode_crop(batch: EncodedImages, size: int, device: torch.device) -> torch.Tensor:
    """Decode (JPEGs in one call on ``device``), crop each image to its box, resize it to ``size`` x
    ``size`` (bicubic, antialiased), flip it; returns ``uint8 [b, 3, size, size]`` on ``device``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    offsets, shapes = batch.offsets.tolist(), batch.shapes.tolist()
    parts = [batch.blob[offsets[i] : offsets[i + 1]] for i in range(len(batch))]
    jpeg_idx = [i for i, shape in enumerate(shapes) if shape[0] == 0]
    images: list = [None] * len(batch)
    if jpeg_idx:
        try:
            decoded = decode_jpeg([parts[i] for i in jpeg_idx], mode=ImageReadMode.RGB, device=device)
        except RuntimeError as exc:  # find the culprit(s) one by one on the CPU, to name them
            from pipeline.data.shards import ShardFormatError

            bad = []
            for i in jpeg_idx:
                try:
                    decode_jpeg(parts[i], mode=ImageReadMode.RGB)
                except RuntimeError:
                    bad.append(batch.sources[i])
            raise ShardFormatError(f"{'; '.join(bad) or batch.sources[jpeg_idx[0]]}: undecodable JPEG on {device} ({exc}). "
                                   "Its header parsed in the loader, so pretrain on_corrupt: skip cannot skip it with "
                                   "decode: device; use decode: cpu to skip it, or repair the shard") from None
        for i, img in zip(jpeg_idx, decoded):
            images[i] = img
    for i, img in enumerate(images):
        if img is None:
            images[i] = parts[i].view(*shapes[i]).to(device, non_blocking=True)
    boxes = batch.boxes.tolist()
    flips = batch.flips.tolist()
    out = torch.empty(len(batch), 3, size, size, dtype=torch.uint8, device=device)
    for i, (img, (top, left, h, w), flip) in enumerate(zip(images, boxes, flips)):
        t0, l0 = int(round(top)), int(round(left))
        t1, l1 = max(t0 + 1, int(round(top + h))), max(l0 + 1, int(round(left + w)))
        crop = img[None, :, t0:t1, l0:l1].float()
        res = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        if flip:
            res = res.flip(-1)
        out[i] = res[0].round_().clamp_(0, 255).to(torch.uint8)
    return out


def pixels_chw(img: Image.Image) -> np.ndarray:
    """A decoded PIL image as ``uint8 [3, H, W]`` (RGB)."""
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1))
