"""The teacher's attention maps, from export_parts to the pretrain loader's guide element.

- export: each sample's ``attn.npy`` is the shipped (trained) teacher's last-block CLS attention, mean over
  heads, as timm itself computes it (captured from its unfused attention, not pipeline's cls_attention),
  resized to the export grid; the trained teacher's maps are far from uniform (max/min ~15 per image), so a
  wrong head, a wrong query row or a transposed map is many float16 steps off;
- loader: the attention element is cropped and flipped exactly like the part map, takes no random draw
  (crops, flips and noise equal a run without it), and the block element is block_flags of the sample's
  own noise row, the same through worker processes and with decode: device;
- old shard sets (no ``attention`` index entry, no ``attn.npy``) and malformed maps are refused, naming
  what to rerun."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import make_part_shards, shipped_teacher_dir, write_idx
from pipeline.config import ExportPartsConfig, ExtractConfig, PartsConfig, PrepareConfig
from pipeline.data.shards import (
    ShardFormatError,
    iter_raw_samples,
    iter_samples,
    read_index,
    shard_entries,
    shard_paths,
    write_shards,
    write_tar,
)
from pipeline.io import json_bytes
from pipeline.mae.data import fixed_images, make_loader, require_attention
from pipeline.mae.masking import noise_size
from pipeline.features import load_features
from pipeline.parts.build import PARTS_CHECKPOINT, build_parts, load_part_learner
from pipeline.parts.export import PARTS_FORMAT, export_parts
from pipeline.teacher.build import load_teacher
from test_export_parts import head_attention, split_images

G, P = 4, 4  # loader tests: grid, patch size
S = G * P
N = G * G  # part id = r * G + c: every cell its own part
BLOCK = (0.75, 2, 0.3)  # mask_ratio, min_patches, min_aspect


# --- export ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """prepare (fake Fashion-MNIST) -> the shipped teacher -> extract -> train_parts (attention heads) ->
    export_parts at the teacher's grid 8, upsampled to 16 and downsampled to 4 and 2 (at 2x bilinear and
    area agree, at 4x they differ)."""
    tmp = tmp_path_factory.mktemp("attn")
    root = tmp / "fmnist"
    root.mkdir()
    rng = np.random.default_rng(7)
    for stem, n in (("train", 60), ("t10k", 30)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 6:22, 9:19] //= 4  # a dark object on noise: attention with some structure
        write_idx(root / f"{stem}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{stem}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    prepared = tmp / "prepared"
    prepare_cfg = PrepareConfig(root=str(root), train_limit=24, val_limit=20, holdout_size=20, shard_size=16,
                                num_workers=0)  # fmt: skip
    from pipeline.data.prepare import prepare_dataset

    prepare_dataset(prepare_cfg, prepared)
    teacher = shipped_teacher_dir(tmp / "teacher")
    from pipeline.features import extract_features

    extract_features(ExtractConfig(batch_size=32), prepared, teacher, tmp / "features")
    build_parts(PartsConfig(method="attention_heads"), prepared, teacher, tmp / "features", tmp / "parts",
                references=False)  # fmt: skip
    out = {}
    for grid in (8, 16, 4, 2):
        out[grid] = tmp / f"export{grid}"
        export_parts(ExportPartsConfig(grid=grid, batch_size=8), prepared, teacher, tmp / "parts", out[grid])
    return prepared, teacher, out, tmp / "features"


def expected_attention(teacher: Path, x: torch.Tensor, grid: int) -> np.ndarray:
    """timm's own last-block CLS attention, mean over heads, resized to ``grid``: ``float32 [B, grid, grid]``
    (bilinear up; down, the mean of each block of cells, here in numpy)."""
    vit = load_teacher(teacher)[0]
    attn = head_attention(vit, x).mean(1)  # [B, L]
    g = int(attn.shape[1] ** 0.5)
    maps = attn.view(-1, g, g).double().numpy()
    if grid > g:
        return F.interpolate(torch.from_numpy(maps)[:, None], size=(grid, grid), mode="bilinear",
                             align_corners=False)[:, 0].float().numpy()  # fmt: skip
    k = g // grid
    return maps.reshape(-1, grid, k, grid, k).mean((2, 4)).astype(np.float32)


@pytest.mark.parametrize("grid", [8, 16, 4, 2])
def test_exported_attention_is_the_teachers_head_mean_cls_attention(exported, grid):
    prepared, teacher, out, _ = exported
    index = read_index(out[grid], PARTS_FORMAT)
    assert index["attention"] == {"source": "teacher last-block CLS attention, mean over heads", "dtype": "float16",
                                  "grid": [grid, grid]}  # fmt: skip
    require_attention(index, out[grid])  # accepted
    for split in ("train", "val"):
        keys, x = split_images(prepared, split, size=32)
        decoded = {s["__key__"]: s for s in iter_samples(shard_paths(out[grid], split, PARTS_FORMAT))}
        assert sorted(decoded) == sorted(keys)
        got = np.stack([decoded[k]["attention"] for k in keys])
        assert got.dtype == np.float16 and got.shape == (len(keys), grid, grid)
        want = expected_attention(teacher, x, grid)
        # float16 rounding (a relative step of 2^-11) and float32 differences between batchings: ~1 step
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float16).astype(np.float32), rtol=2e-3,
                                   atol=1e-6)  # fmt: skip
        # softmax weights: on the teacher grid the patches' share of the CLS query is (0, 1), resizing keeps the mean
        share = got.astype(np.float64).mean((1, 2)) * 64
        assert ((share > 0.3) & (share < 1.0)).all(), share
    if grid == 8:  # the maps are far from uniform, so the comparison above separates heads, rows and transposes
        assert (got.max((1, 2)) / got.min((1, 2))).min() > 3


def test_the_attention_is_the_real_teachers_with_a_random_teacher_part_learner(exported, tmp_path):
    """method random_teacher reads a random ViT's tokens for the parts; the attention stays the teacher's."""
    prepared, teacher, _, features = exported
    cfg = PartsConfig(method="random_teacher", num_parts=3, epochs=1, batch_size=16, decoder_channels=8, style_dim=8)
    build_parts(cfg, prepared, teacher, features, tmp_path / "parts", references=False)
    export_parts(ExportPartsConfig(grid=8, batch_size=8), prepared, teacher, tmp_path / "parts", tmp_path / "e")
    keys, x = split_images(prepared, "val", size=32)
    decoded = {s["__key__"]: s["attention"] for s in iter_samples(shard_paths(tmp_path / "e", "val", PARTS_FORMAT))}
    np.testing.assert_allclose(np.stack([decoded[k] for k in keys]).astype(np.float32),
                               expected_attention(teacher, x, 8).astype(np.float16).astype(np.float32), rtol=2e-3,
                               atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("method", ["kmeans", "learned"])
def test_one_teacher_pass_gives_the_parts_and_the_attention(exported, tmp_path, method):
    """Methods reading the real teacher's tokens take the attention from the same forward pass (a hook on the
    last attention module): still timm's last-block attention, and the maps those of the tokens alone."""
    prepared, teacher, _, features = exported
    cfg = PartsConfig(method=method, num_parts=3, epochs=1, batch_size=16, decoder_channels=8, style_dim=8)
    build_parts(cfg, prepared, teacher, features, tmp_path / "parts", references=False)
    export_parts(ExportPartsConfig(grid=8, batch_size=8), prepared, teacher, tmp_path / "parts", tmp_path / "e")
    keys, x = split_images(prepared, "val", size=32)
    decoded = {s["__key__"]: s for s in iter_samples(shard_paths(tmp_path / "e", "val", PARTS_FORMAT))}
    np.testing.assert_allclose(np.stack([decoded[k]["attention"] for k in keys]).astype(np.float32),
                               expected_attention(teacher, x, 8).astype(np.float16).astype(np.float32), rtol=2e-3,
                               atol=1e-6)  # fmt: skip
    learner, _ = load_part_learner(tmp_path / "parts" / PARTS_CHECKPOINT)
    feats = load_features(features, "val")
    want = learner.part_logits(torch.from_numpy(feats["cls"]).float(), torch.from_numpy(feats["patches"]).float())
    got = np.stack([decoded[k]["parts"] for k in feats["key"]])
    np.testing.assert_array_equal(got, want.argmax(1).numpy())


def test_the_free_space_asked_for_counts_both_map_members(exported, tmp_path, monkeypatch):
    """Beyond the prepared shards, the index files and a final record per shard, the space asked for covers
    every parts.npy and attn.npy member as tar stores it (a 512-byte header + the data padded to 512)."""
    import tarfile

    from pipeline.parts import export

    prepared, teacher, out, _ = exported
    asked = []
    monkeypatch.setattr(export, "ensure_free_space", lambda path, needed, what: asked.append(needed))
    export_parts(ExportPartsConfig(grid=16, batch_size=8), prepared, teacher, out[16].parent / "parts", tmp_path / "e")
    source = [Path(p) for split in ("train", "val") for p in shard_paths(prepared, split)]
    members = 0
    for path in (tmp_path / "e").rglob("*.tar"):
        with tarfile.open(path) as tar:
            members += sum(512 + -(-m.size // 512) * 512 for m in tar.getmembers() if m.name.endswith(".npy"))
    assert members > 0 and asked[0] - sum(p.stat().st_size for p in source) >= members + len(source) * 10240


def test_the_export_stays_deterministic_with_attention(exported, tmp_path):
    prepared, teacher, out, _ = exported
    parts = out[4].parent / "parts"
    export_parts(ExportPartsConfig(grid=4, batch_size=8), prepared, teacher, parts, tmp_path / "again")
    for path in sorted(out[4].rglob("*")):
        if path.is_file():
            assert (tmp_path / "again" / path.relative_to(out[4])).read_bytes() == path.read_bytes(), path


# --- loader ------------------------------------------------------------------------------------------------------


def source_image(i: int) -> np.ndarray:
    """``uint8 [S, S, 3]``: patch (r, c) has red 30 + 60 r and green 30 + 60 c, blue the sample."""
    img = np.zeros((S, S, 3), np.uint8)
    for r in range(G):
        for c in range(G):
            img[r * P : (r + 1) * P, c * P : (c + 1) * P] = (30 + 60 * r, 30 + 60 * c, 7 * i % 256)
    return img


CELLS = np.arange(N, dtype=np.uint8).reshape(G, G)  # part id of cell (r, c): r * G + c
ATTENTION = ((CELLS + 1) / 64).astype(np.float16)  # (id + 1) / 64: exact in float16, never equal to the id


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def write_guided_shards(root: Path, n_train: int = 32, n_val: int = 8) -> Path:
    """An export_parts-format shard set (the repo's writer) whose part and attention maps encode each cell's
    (row, column): ``parts = r G + c``, ``attention = (r G + c + 1) / 64``."""
    root.mkdir(parents=True)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        samples = []
        for i in range(n):
            png = io.BytesIO()
            Image.fromarray(source_image(i)).save(png, format="PNG")
            samples.append({"__key__": f"{split}{i:05d}", "png": png.getvalue(), "cls": str(i).encode(), "json": b"{}",
                            "parts.npy": npy(CELLS), "attn.npy": npy(ATTENTION)})  # fmt: skip
        shards = write_shards(samples, root / split, split, 8)
        splits[split] = {"num_samples": n, "shards": shards, "class_counts": {}}
    index = {"format": PARTS_FORMAT, "classes": [], "grid": [G, G], "num_parts": N, "method": "learned",
             "teacher_sha256": "0" * 64, "attention": {"source": "test", "dtype": "float16", "grid": [G, G]},
             "splits": splits}  # fmt: skip
    (root / "index.json").write_bytes(json_bytes(index))
    return root


@pytest.fixture
def guided(tmp_path) -> tuple[list[str], list[int]]:
    entries = shard_entries(write_guided_shards(tmp_path / "guided"), "train", PARTS_FORMAT)
    return [e.path for e in entries], [e.num_samples for e in entries]


def epoch(shards, counts, guide=None, workers=0, decode="cpu", scale=(0.25, 1.0), ratio=(0.75, 4 / 3), batches=4,
          on_corrupt="fail") -> list[tuple[torch.Tensor, ...]]:  # fmt: skip
    """One epoch of 4 micro-batches of 8 (2 streams) with random crops and flips."""
    dl = make_loader(shards, N, S, G, 8, batches, 0, 0, scale, ratio, 0.5, 8, workers, 2, noise_size(N, N), decode,
                     counts, on_corrupt, guide=guide, block=BLOCK if guide == "block" else None)  # fmt: skip
    return [tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in item) for item in dl]


def test_the_attention_element_is_cropped_and_flipped_with_the_part_map(guided):
    shards, counts = guided
    items = epoch(shards, counts, "attention")
    flipped = cropped = 0
    for images, parts, labels, noise, attention in items:
        assert len(images) == 8 and attention.dtype == torch.float32 and attention.shape == (8, N)
        # the part path (test_link checks it against the pixels) gives each output patch the cell (r, c) its
        # centre falls in; the attention map must give the same cell's value, flipped with the image
        np.testing.assert_array_equal((attention.view(8, G, G) * 64 - 1).numpy(), parts.numpy().astype(np.float32))
        cols = parts.numpy() % G
        flipped += int((cols[:, :, 0] > cols[:, :, -1]).all(1).sum())
        cropped += int((parts.numpy() != CELLS).any((1, 2)).sum())
    assert flipped > 4 and cropped > 20  # both orientations and real crops were exercised

    # a whole-square crop: each token's value is the cell its pixels come from (read from the image itself)
    for images, _, _, _, attention in epoch(shards, counts, "attention", scale=(1.0, 1.0), ratio=(1.0, 1.0)):
        for img, att in zip(images.numpy(), attention.view(-1, G, G).numpy()):
            rows = np.array([[(img[0, P * i + 1, P * j + 1] - 30) // 60 for j in range(G)] for i in range(G)])
            cols = np.array([[(img[1, P * i + 1, P * j + 1] - 30) // 60 for j in range(G)] for i in range(G)])
            np.testing.assert_array_equal(att, ATTENTION[rows, cols].astype(np.float32))


def test_the_guides_take_no_random_draw(guided):
    shards, counts = guided
    plain = epoch(shards, counts)
    assert all(len(item) == 4 for item in plain)
    for guide in ("attention", "block"):
        items = epoch(shards, counts, guide)
        for a, b in zip(plain, items):
            assert len(b) == 5
            for u, v in zip(a, b[:4]):  # images, parts, labels, noise
                assert torch.equal(u, v), guide


def test_the_block_element_is_block_flags_of_each_samples_noise_row(guided):
    from pipeline.mae.masking import block_flags

    shards, counts = guided
    items = epoch(shards, counts, "block")
    shares = []
    for _, _, _, noise, flags in items:
        assert flags.dtype == torch.bool and flags.shape == (8, N)
        for row, f in zip(noise.numpy(), flags.numpy()):
            np.testing.assert_array_equal(f, block_flags(row, G, *BLOCK))
        shares.append(flags.float().mean(1))
    shares = torch.cat(shares)
    assert len(set(map(tuple, torch.cat([f for *_, f in items]).int().tolist()))) > 16  # masks differ by sample
    assert 0.4 < float(shares.mean()) <= 0.75  # BEiT masks up to the ratio, in blocks
    # the same batches through two worker processes, and with the device decode path
    for other in (epoch(shards, counts, "block", workers=2), epoch(shards, counts, "block", decode="device")):
        for a, b in zip(items, other):
            assert torch.equal(a[4], b[4]) and torch.equal(a[3], b[3])


def test_the_attention_element_through_workers_and_device_decode(guided):
    shards, counts = guided
    items = epoch(shards, counts, "attention")
    for other in (epoch(shards, counts, "attention", workers=2), epoch(shards, counts, "attention", decode="device")):
        for a, b in zip(items, other):
            assert torch.equal(a[4], b[4]) and torch.equal(a[1], b[1])


def test_fixed_images_give_the_centred_attention_maps(tmp_path):
    root = write_guided_shards(tmp_path / "guided")
    val = shard_paths(root, "val", PARTS_FORMAT)
    images, parts, attention = fixed_images(val, 5, N, S, G, with_attention=True)
    assert attention.dtype == torch.float32 and attention.shape == (5, G, G)
    np.testing.assert_array_equal(attention.numpy(), np.broadcast_to(ATTENTION.astype(np.float32), (5, G, G)))
    assert len(fixed_images(val, 5, N, S, G)) == 2  # unasked: as before


# --- old and damaged shard sets ------------------------------------------------------------------------------------


def test_old_part_shards_are_refused_naming_the_stage_to_rerun(tmp_path):
    root = make_part_shards(tmp_path / "old")  # export_parts' output before attention maps: no entry, no attn.npy
    index = read_index(root, PARTS_FORMAT)
    with pytest.raises(ShardFormatError, match=rf"^{root}/index.json records no teacher attention maps .*rerun "
                                               r"export_parts \(dvc repro export_parts\)"):  # fmt: skip
        require_attention(index, root)
    with pytest.raises(ShardFormatError, match="do not match the part grid"):
        require_attention({**index, "attention": {"dtype": "float16", "grid": [8, 8]}}, root)
    entries = shard_entries(root, "train", PARTS_FORMAT)
    paths, counts = [e.path for e in entries], [e.num_samples for e in entries]
    dl = make_loader(paths, 4, 16, 4, 8, 2, 0, 0, (0.2, 1.0), (0.75, 4 / 3), 0.5, 16, 0, 2, 40, "cpu", counts,
                     guide="attention")  # fmt: skip
    with pytest.raises(ShardFormatError, match=r"sample 'train\d{5}' in .*train-0000\d\d\.tar: no attn\.npy.*dvc "
                                               r"repro export_parts"):  # fmt: skip
        next(iter(dl))
    assert len(next(iter(make_loader(paths, 4, 16, 4, 8, 1, 0, 0, (0.2, 1.0), (0.75, 4 / 3), 0.5, 16, 0, 2, 40,
                                     "cpu", counts)))) == 4  # fmt: skip  # without a guide they still serve
    with pytest.raises(ShardFormatError, match="no attn.npy"):
        fixed_images(shard_paths(root, "val", PARTS_FORMAT), 2, 4, 16, 4, with_attention=True)


def rewrite(shard: str, key: str, change) -> None:
    """Rewrite ``shard`` (the repo's writer) with sample ``key`` changed by ``change``."""
    samples = []
    for raw in iter_raw_samples([shard]):
        s = {k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"}
        if s["__key__"] == key:
            change(s)
        samples.append(s)
    write_tar(Path(shard), samples)


@pytest.mark.parametrize("change, message, undecodable", [
    (lambda s: s.pop("attn.npy"), r"no attn\.npy: these part shards were exported without attention maps", False),
    (lambda s: s.update({"attn.npy": npy(ATTENTION[:3, :3])}), r"attn\.npy is 3x3, its parts\.npy 4x4", False),
    (lambda s: s.update({"attn.npy": npy(ATTENTION[:, :2].copy())}), r"attn\.npy is 4x2, its parts\.npy 4x4", False),
    (lambda s: s.update({"attn.npy": npy(ATTENTION.astype(np.float32))}), r"malformed attn\.npy \(header .*'<f4'",
     True),
    (lambda s: s.update({"attn.npy": npy(np.full((4, 4), np.nan, np.float16))}), r"malformed attn\.npy \(16 non-finite",
     True),
])  # fmt: skip
def test_a_malformed_attention_map_fails_naming_the_sample_or_is_skipped(guided, change, message, undecodable):
    shards, counts = guided
    rewrite(shards[1], "train00009", change)
    with pytest.raises(ShardFormatError, match=rf"sample 'train00009' in {shards[1]}: {message}"):
        epoch(shards, counts, "attention")
    items = epoch(shards, counts, "attention", on_corrupt="skip")
    assert len(items) == 4 and all(len(x) == 8 for x, *_ in items)
    if undecodable:  # decoding refuses it whatever the guide: a damaged sample is corrupt for every strategy
        with pytest.raises(ShardFormatError, match=message):
            epoch(shards, counts)
    else:  # without the guide a missing or misshaped map is not used
        assert len(epoch(shards, counts)) == 4
