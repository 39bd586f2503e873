"""The link from export_parts to the MAE loss: the part id at patch (i, j) of a sample's ``parts.npy`` is the id
semantic masking sees for the token at (i, j) after the real pretrain data path (shard loading, the joint
crop and flip), and the loss is taken over exactly the masked tokens' pixels.

The data make every slip visible: each part map is non-symmetric (a transposed or mirrored map is another
map), each image patch is painted with the (row, column) of the source patch it came from (so the token
order of an image can be read back from its pixels), and the masking is chosen so that its answer is known
(N = 4 parts of 4 patches each, ratio 0.75, alpha = 1: exactly three whole parts are masked)."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.images import normalize
from pipeline.data.shards import write_shards
from pipeline.mae.data import make_loader
from pipeline.mae.masking import noise_size
from pipeline.mae.model import MaskedAutoencoder
from pipeline.mae.train import _batch_inputs

G, P, N = 4, 4, 4  # grid, patch size, parts
S = G * P


def source_image(i: int) -> np.ndarray:
    """``uint8 [S, S, 3]``: patch (r, c) has red 30 + 60 r and green 30 + 60 c (where it came from), and one
    bright blue pixel whose place inside the patch depends on (r, c) and the sample (so no two patches of an
    image normalise to the same target)."""
    img = np.zeros((S, S, 3), np.uint8)
    for r in range(G):
        for c in range(G):
            img[r * P : (r + 1) * P, c * P : (c + 1) * P, :2] = (30 + 60 * r, 30 + 60 * c)
            spot = (r * G + c + i) % (P * P)
            img[r * P + spot // P, c * P + spot % P, 2] = 250
    return img


def part_map(rng: np.random.Generator) -> np.ndarray:
    """4 x 4 ids, each of the N parts on exactly 4 patches, and not symmetric under a transpose or a mirror."""
    while True:
        ids = rng.permutation(np.repeat(np.arange(N), G * G // N)).reshape(G, G).astype(np.uint8)
        if all(not np.array_equal(ids, t) for t in (ids.T, ids[:, ::-1], ids[::-1], ids[::-1, ::-1].T)):
            return ids


def write_part_shards(root: Path, n: int = 16) -> tuple[list[str], dict[int, np.ndarray]]:
    """export_parts-format train shards; the label of sample i is i, so a batch row finds its source."""
    rng = np.random.default_rng(0)
    samples, maps = [], {}
    for i in range(n):
        maps[i] = part_map(rng)
        png, npy = io.BytesIO(), io.BytesIO()
        Image.fromarray(source_image(i)).save(png, format="PNG")
        np.save(npy, maps[i], allow_pickle=False)
        samples.append({"__key__": f"train{i:05d}", "png": png.getvalue(), "cls": str(i).encode(),
                        "json": b"{}", "parts.npy": npy.getvalue()})  # fmt: skip
    shards = write_shards(samples, root, "train", 8)
    return [str(root / s["file"]) for s in shards], maps


def test_the_exported_part_map_reaches_the_masking_and_the_loss_token_by_token(tmp_path):
    shards, maps = write_part_shards(tmp_path / "train")
    # the pretrain loader with a full-square crop (so the image keeps its patch grid) and random flips
    loader = make_loader(shards, N, S, G, batch_size=16, batches=1, epoch=0, seed=0, scale=(1.0, 1.0),
                         ratio=(1.0, 1.0), hflip=0.5, shuffle_buffer=4, num_workers=0, num_streams=1,
                         noise_dim=noise_size(G * G, N), counts=[8, 8])  # fmt: skip
    batch = next(iter(loader))
    images, parts, labels, _ = batch
    cfg = SimpleNamespace(masking="semantic", mask_ratio=0.75, img_size=S)
    x, masking = _batch_inputs(SimpleNamespace(cfg=cfg, device=torch.device("cpu"), num_parts=N), batch, alpha=1.0)

    flipped = 0
    for b in range(len(labels)):
        img, source = images[b].numpy(), maps[int(labels[b])]
        # where each token (row-major t = G i + j) of the loaded image came from, read from its pixels
        rows = np.array([[(img[0, P * i + 1, P * j + 1] - 30) // 60 for j in range(G)] for i in range(G)])
        cols = np.array([[(img[1, P * i + 1, P * j + 1] - 30) // 60 for j in range(G)] for i in range(G)])
        assert (rows == np.arange(G)[:, None]).all()  # no crop: rows stay, columns may be mirrored
        mirrored = (cols == G - 1 - np.arange(G)).all()
        assert mirrored or (cols == np.arange(G)).all()
        flipped += mirrored
        truth = source[rows, cols]  # the exported id of the patch each token shows
        np.testing.assert_array_equal(parts[b].numpy(), truth)
        mask = masking.mask[b].view(G, G).numpy()
        masked_share = [mask[truth == k].mean() for k in range(N)]
        assert sorted(masked_share) == [0.0, 1.0, 1.0, 1.0], (b, masked_share)  # three whole parts, by true id
    assert 0 < flipped < len(labels)  # both orientations were exercised

    # the loss: per-patch normalised squared error over the masked tokens' own pixels, recomputed by slicing
    torch.manual_seed(0)
    model = MaskedAutoencoder(img_size=S, patch_size=P, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                              decoder_depth=1, decoder_num_heads=2)  # fmt: skip
    with torch.no_grad():
        loss, pred = model(x, masking)
    assert torch.equal(x, normalize(images.float() / 255))
    errors, count = 0.0, 0
    for b in range(len(x)):
        for t in range(G * G):
            if masking.mask[b, t] == 1:
                i, j = divmod(t, G)
                target = x[b, :, P * i : P * (i + 1), P * j : P * (j + 1)].permute(1, 2, 0).reshape(-1).double()
                target = (target - target.mean()) / (target.var() + 1e-6) ** 0.5
                errors += float(((pred[b, t].double() - target) ** 2).mean())
                count += 1
    assert count == len(x) * 12
    assert float(loss) == pytest.approx(errors / count, rel=1e-5)

