"""`prepare.source: synthetic_parts`: generated images with their ground-truth part masks (truth.png) in the
shards. Determinism, every stored image and mask equal to the generator's, splits, the index, the free-space
estimate, load_split_truth's geometry (aligned with load_split), config errors, the strict truth reader, and
the training readers (load_split, the pretrain loader) unchanged by the extra member."""

from __future__ import annotations

import functools
import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_params
from pipeline.config import ConfigError, PrepareConfig, load_stage_config
from pipeline.config.prepare import SYNTHETIC_MIN_SIZE
from pipeline.data import prepare as prepare_module
from pipeline.data import synthetic_parts as sp
from pipeline.data.images import load_split, load_split_truth, to_square, truth_to_square
from pipeline.data.prepare import prepare_dataset
from pipeline.data.shards import (
    ShardFormatError,
    decode_image,
    decode_truth,
    iter_raw_samples,
    read_index,
    shard_entries,
    shard_paths,
    write_shards,
)
from pipeline.data.sources import Record
from pipeline.io import ensure_free_space, json_bytes
from pipeline.mae.data import make_loader


def cfg_for(**kw) -> PrepareConfig:
    base = dict(source="synthetic_parts", train_limit=40, val_limit=16, holdout_size=14, shard_size=16, num_workers=0,
                seed=3)  # fmt: skip
    return PrepareConfig(**{**base, **kw})


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def raw_split(out: Path, split: str) -> list[dict]:
    entries = shard_entries(out, split)
    return list(iter_raw_samples([e.path for e in entries], [e.num_samples for e in entries]))


def index_of(key: str) -> tuple[str, int]:
    """The generator's split and index of a stored key (``train_00000017``)."""
    stream, number = key.rsplit("_", 1)
    return stream, int(number)


@pytest.fixture
def prepared(tmp_path) -> Path:
    prepare_dataset(cfg_for(), tmp_path / "out")
    return tmp_path / "out"


def test_two_runs_are_byte_identical_and_the_worker_count_changes_no_data(tmp_path):
    prepare_dataset(cfg_for(), tmp_path / "a")
    prepare_dataset(cfg_for(), tmp_path / "b")
    a, b = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    assert a == b and "holdout/holdout-000000.tar" in a
    # more than 256 images in a split: encoded by a pool of 2 processes
    prepare_dataset(cfg_for(train_limit=260, num_workers=2), tmp_path / "pool")
    prepare_dataset(cfg_for(train_limit=260, num_workers=0), tmp_path / "one")
    pool, one = tree_digest(tmp_path / "pool"), tree_digest(tmp_path / "one")
    assert pool.pop("config.json") != one.pop("config.json")  # it records num_workers
    assert pool == one


def test_every_stored_image_and_mask_is_the_generators(prepared):
    cfg = cfg_for()
    for split in ("train", "holdout", "val"):
        for raw in raw_split(prepared, split):
            stream, i = index_of(raw["__key__"])
            assert stream == ("val" if split == "val" else "train")  # the hold-out comes from the train stream
            want = sp.render(cfg.seed, stream, i, cfg.synthetic_size, label=i % len(sp.CLASSES))
            assert {k for k in raw if not k.startswith("__")} == {"cls", "json", "png", "truth.png"}
            np.testing.assert_array_equal(np.asarray(decode_image(raw["png"])), want.image)
            truth = Image.open(io.BytesIO(raw["truth.png"]))
            assert (truth.format, truth.mode) == ("PNG", "L")
            np.testing.assert_array_equal(decode_truth(raw["truth.png"], "t"), want.mask)
            assert int(raw["cls"]) == want.label
            assert raw["json"] == f'{{"orig_size": [32, 32], "source": "synthetic_parts/{stream}/{i}"}}'.encode()


def test_splits_are_disjoint_balanced_and_the_index_names_the_parts(prepared):
    cfg = cfg_for()
    keys = {split: [r["__key__"] for r in raw_split(prepared, split)] for split in ("train", "holdout", "val")}
    assert [len(keys[s]) for s in ("train", "holdout", "val")] == [40, 14, 16]
    # the train pool is exactly train_limit + holdout_size images of the generator's train stream, split in two
    assert not set(keys["train"]) & set(keys["holdout"])
    assert sorted(keys["train"] + keys["holdout"]) == [f"train_{i:08d}" for i in range(40 + 14)]
    assert sorted(keys["val"]) == [f"val_{i:08d}" for i in range(16)]
    assert keys["train"] != sorted(keys["train"])  # shuffled into shard order
    index = read_index(prepared)
    assert index["part_names"] == list(sp.PART_NAMES) and index["classes"] == list(sp.CLASSES)
    assert index["source"] == "synthetic_parts"
    for split, n in (("train", 40), ("holdout", 14), ("val", 16)):
        counts = index["splits"][split]["class_counts"]
        assert sum(counts) == n and max(counts) - min(counts) <= 1, (split, counts)
    assert [s["num_samples"] for s in index["splits"]["train"]["shards"]] == [16, 16, 8]
    # another seed: other holdout members, other images
    prepare_dataset(cfg_for(seed=4), prepared.parent / "seed4")
    assert {r["__key__"] for r in raw_split(prepared.parent / "seed4", "holdout")} != set(keys["holdout"])


def disk_usage(root: Path) -> int:
    """What ``du -s --block-size=1`` reports (as tests/test_resources.py measures it)."""
    return sum(os.lstat(p).st_blocks * 512 for p in (root, *root.rglob("*")))


def noise_source(train: int, val: int, size: int, seed: int):
    """The synthetic source's records with random pixels and random part ids: PNG's worst case (incompressible)."""
    rng = np.random.default_rng(seed)
    splits = {split: [Record(key=f"{split}_{i:08d}", label=i % len(sp.CLASSES), source_id=f"noise/{split}/{i}",
                             pixels=rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
                             mask=rng.integers(0, 256, (size, size), dtype=np.uint8)) for i in range(n)]
              for split, n in (("train", train), ("val", val))}  # fmt: skip
    return splits, list(sp.CLASSES)


@pytest.mark.parametrize("noise", [False, True], ids=["generated", "incompressible"])
def test_the_space_prepare_asks_for_bounds_what_it_writes_truth_included(tmp_path, monkeypatch, noise):
    if noise:
        monkeypatch.setattr(prepare_module, "load_synthetic_parts", noise_source)
    required = []

    def check(path, needed, what, files=0):
        required.append(ensure_free_space(path, needed, what, files))
        return required[-1]

    monkeypatch.setattr(prepare_module, "ensure_free_space", check)
    prepare_dataset(cfg_for(train_limit=60, val_limit=30, holdout_size=12, shard_size=50), tmp_path / "out")
    used = disk_usage(tmp_path / "out")
    assert len(required) == 1 and used <= required[0], (required, used)
    if noise:  # the bound is tight on the worst case
        assert required[0] <= 1.5 * used, (required, used)
    assert sum(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file()) <= required[0]


def test_a_resize_shrinks_the_mask_with_nearest_to_the_images_size(tmp_path):
    cfg = cfg_for(synthetic_size=48, resize=40, train_limit=12, holdout_size=6, val_limit=6)
    prepare_dataset(cfg, tmp_path / "out")
    for raw in raw_split(tmp_path / "out", "train"):
        stream, i = index_of(raw["__key__"])
        want = sp.render(3, stream, i, 48, label=i % len(sp.CLASSES))
        assert decode_image(raw["png"]).size == (40, 40)
        expected = np.asarray(Image.fromarray(want.mask).resize((40, 40), Image.Resampling.NEAREST))
        np.testing.assert_array_equal(decode_truth(raw["truth.png"], "t"), expected)


def test_load_split_truth_is_in_load_splits_order_and_the_identity_at_the_stored_size(prepared):
    images, labels, keys = load_split(prepared, "val", 32)
    masks, truth_keys = load_split_truth(prepared, "val", 32)
    assert truth_keys == keys and masks.dtype == torch.uint8 and masks.shape == (16, 32, 32)
    for k, key in enumerate(keys):
        stream, i = index_of(key)
        want = sp.render(3, stream, i, 32, label=i % len(sp.CLASSES))
        np.testing.assert_array_equal(masks[k].numpy(), want.mask)
        np.testing.assert_array_equal(images[k].numpy(), want.image.transpose(2, 0, 1))


def flat_ids(image: np.ndarray, label: int) -> np.ndarray:
    """The part id each pixel of a ``flat=True`` image ``[3, H, W]`` shows (-1: a colour of no region, i.e. a
    resampling blend): a flat colour names a canvas code, the code a part id of the class."""
    ids = np.full(image.shape[1:], -1, dtype=np.int64)
    parts = sp.CLASS_PARTS[sp.CLASSES[label]]
    for code, colour in enumerate(sp.FLAT_COLOURS):
        slot = code - sp._PART_CODE
        part = parts[slot] if 0 <= slot < len(parts) else 0
        ids[(image == colour[:, None, None]).all(0)] = part
    return ids


@pytest.mark.parametrize(("size", "crop_pct", "resize"), [(48, 1.0, None), (32, 0.875, 40), (56, 1.0, None)])
def test_masks_stay_on_their_images_through_resize_and_crop(tmp_path, monkeypatch, size, crop_pct, resize):
    """Flat-coloured images (each region its own colour): wherever load_split's pixel shows a region's colour,
    load_split_truth's mask holds that region's part id, through prepare's resize and the crop. Bicubic blends of
    two flat colours can land exactly on a third (red + yellow = the orange of an unused code, red + cyan = the
    grey background), so 0.1% of the pixels may disagree; a mask one pixel off disagrees on 0.8-4.7% of them."""
    monkeypatch.setattr(sp, "generate", functools.partial(sp.generate, flat=True))
    prepare_dataset(cfg_for(synthetic_size=48, resize=resize, train_limit=12, holdout_size=6, val_limit=12),
                    tmp_path / "out")  # fmt: skip
    images, labels, keys = load_split(tmp_path / "out", "val", size, crop_pct=crop_pct)
    masks, truth_keys = load_split_truth(tmp_path / "out", "val", size, crop_pct=crop_pct)
    assert truth_keys == keys and masks.shape == (12, size, size)
    checked = wrong = 0
    for image, label, mask in zip(images.numpy(), labels.tolist(), masks.numpy()):
        ids = flat_ids(image, label)
        shown = ids >= 0
        checked, wrong = checked + int(shown.sum()), wrong + int((mask[shown] != ids[shown]).sum())
    assert checked > 0.4 * masks.numel()  # many pixels show a region's colour: the check saw the images
    assert wrong <= 0.001 * checked, (wrong, checked)
    if (size, resize) == (48, None):  # the stored size: no resampling, every pixel agrees
        assert wrong == 0 and checked == masks.numel()


@pytest.mark.parametrize(("w", "h", "size", "crop_pct"), [(48, 40, 32, 0.875), (20, 24, 32, 1.0), (40, 64, 32, 1.0),
                                                          (33, 33, 32, 0.875), (32, 32, 32, 1.0)])  # fmt: skip
def test_truth_to_square_has_to_squares_geometry_with_nearest(w, h, size, crop_pct):
    """Ramps: the image's red/green channel is 5 x the source column/row, the masks are the column/row ids. A
    bicubic resize keeps a ramp linear, so to_square's pixel shows (5 x) the source position it samples, and
    NEAREST's id is the source pixel holding that position: within 0.5 px (+ rounding) of it, away from the
    border. A one-pixel shift, or another crop box, is off by 1 or more. A two-valued mask keeps its values."""
    yy, xx = np.mgrid[0:h, 0:w]
    image = to_square(Image.fromarray(np.stack([xx * 5, yy * 5, 0 * xx], -1).astype(np.uint8)), size, crop_pct)
    cols, rows = (truth_to_square(m.astype(np.uint8), size, crop_pct).astype(float) for m in (xx, yy))
    assert cols.shape == rows.shape == (size, size)
    inner = (slice(3, -3), slice(3, -3))
    assert np.abs(image[0] / 5 - cols)[inner].max() <= 0.7
    assert np.abs(image[1] / 5 - rows)[inner].max() <= 0.7
    checker = np.where((xx // 3 + yy // 3) % 2 == 1, 18, 0).astype(np.uint8)
    assert set(np.unique(truth_to_square(checker, size, crop_pct)).tolist()) == {0, 18}
    if (w, h, crop_pct) == (size, size, 1.0):
        np.testing.assert_array_equal(truth_to_square(checker, size), checker)


def strip_truth(src: Path, dst: Path) -> Path:
    """A copy of a prepared shard set without the truth.png members and index.json's part_names, as a source
    without masks writes it."""
    index = read_index(src)
    index.pop("part_names")
    for split in ("train", "holdout", "val"):
        samples = ({k: v for k, v in raw.items() if k == "__key__" or not (k.startswith("__") or k == "truth.png")}
                   for raw in raw_split(src, split))  # fmt: skip
        index["splits"][split]["shards"] = write_shards(samples, dst / split, split, cfg_for().shard_size)
    (dst / "index.json").write_bytes(json_bytes(index))
    return dst


def test_load_split_reads_shards_with_truth_as_shards_without(prepared, tmp_path):
    plain = strip_truth(prepared, tmp_path / "plain")
    assert all(b"truth.png" not in Path(p).read_bytes() for p in shard_paths(plain, "train"))
    for split in ("train", "holdout", "val"):
        for size, crop_pct in ((32, 1.0), (24, 0.875)):
            a, b = (load_split(root, split, size, crop_pct=crop_pct) for root in (prepared, plain))
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    with pytest.raises(ShardFormatError, match=r"index\.json \(source 'synthetic_parts'\) records no part_names: "
                                               r"the shard set has no ground-truth part masks \(only prepare\.source: "
                                               r"synthetic_parts writes them\)"):  # fmt: skip
        load_split_truth(plain, "val", 32)


def test_a_sample_without_its_mask_is_named(prepared):
    path = Path(shard_paths(prepared, "val")[0])
    raw = raw_split(prepared, "val")
    del raw[2]["truth.png"]
    samples = [{k: v for k, v in r.items() if k == "__key__" or not k.startswith("__")} for r in raw]
    index = read_index(prepared)
    index["splits"]["val"]["shards"] = write_shards(samples, path.parent, "val", 1000)
    (prepared / "index.json").write_bytes(json_bytes(index))
    with pytest.raises(ShardFormatError, match=rf"sample '{raw[2]['__key__']}' in .*val-000000\.tar: no truth\.png: "
                                               "the shard set has no ground-truth part masks"):  # fmt: skip
        load_split_truth(prepared, "val", 32)


def part_shards_of(prepared: Path, out: Path, masks: dict[str, np.ndarray], grid: int = 4) -> Path:
    """An export_parts-format copy of the prepared train split: every raw member kept (truth.png, when there,
    included, as export_parts copies them) plus parts.npy, the ids of ``masks[key]`` at the patch centres."""
    samples = []
    for raw in raw_split(prepared, "train"):
        mask = masks[raw["__key__"]]
        step = mask.shape[0] // grid
        npy = io.BytesIO()
        np.save(npy, (mask[step // 2 :: step, step // 2 :: step] % 4).astype(np.uint8), allow_pickle=False)
        samples.append({k: v for k, v in raw.items() if k == "__key__" or not k.startswith("__")}
                       | {"parts.npy": npy.getvalue()})  # fmt: skip
    shards = write_shards(samples, out / "train", "train", 8)
    index = {"format": "semmae-parts/1", "grid": [grid, grid], "num_parts": 4,
             "splits": {"train": {"num_samples": len(samples), "shards": shards}}}  # fmt: skip
    (out / "index.json").write_bytes(json_bytes(index))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_the_pretrain_loader_reads_part_shards_with_truth_as_without(prepared, tmp_path, workers):
    masks = {r["__key__"]: decode_truth(r["truth.png"], "t") for r in raw_split(prepared, "train")}
    with_truth = part_shards_of(prepared, tmp_path / "with", masks)
    without = part_shards_of(strip_truth(prepared, tmp_path / "plain"), tmp_path / "without", masks)
    assert b".truth.png" in Path(shard_paths(with_truth, "train", "semmae-parts/1")[0]).read_bytes()

    def batches(root: Path) -> list[tuple[torch.Tensor, ...]]:
        entries = shard_entries(root, "train", "semmae-parts/1")
        dl = make_loader([e.path for e in entries], 4, 32, 4, 8, 4, 0, 0, (0.2, 1.0), (0.75, 4 / 3), 0.5, 16, workers,
                         2, 40, counts=[e.num_samples for e in entries])  # fmt: skip
        return [tuple(t.clone() for t in item) for item in dl]

    a, b = batches(with_truth), batches(without)
    assert len(a) == 4 and a[0][0].shape == (8, 3, 32, 32)
    assert all(all(torch.equal(u, v) for u, v in zip(i, j)) for i, j in zip(a, b))


def png_bytes(array: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, **{"format": "PNG", **save})
    return buf.getvalue()


def test_decode_truth_accepts_only_8_bit_grayscale_png():
    mask = np.arange(64, dtype=np.uint8).reshape(8, 8)
    np.testing.assert_array_equal(decode_truth(png_bytes(mask), "sample 'k' in s.tar"), mask)
    four_bit = png_bytes(mask % 16, bits=4)  # Pillow reads 4-bit grayscale as mode L, its values scaled up
    for data, what in ((png_bytes(np.stack([mask] * 3, -1)), r"PNG image of mode RGB"),
                       (png_bytes(mask, format="JPEG"), r"JPEG image of mode L"),
                       (png_bytes(mask.astype(np.uint16) * 300), r"PNG image of mode I;16"),
                       (png_bytes(mask > 5), r"PNG image of mode 1"),
                       (four_bit, r"PNG image of mode (L|P) \((L;4|P;4)")):  # fmt: skip
        with pytest.raises(ShardFormatError, match=rf"^sample 'k' in s\.tar: truth\.png is a {what}.*expected an 8-bit "
                                                   r"grayscale \(mode L\) PNG"):  # fmt: skip
            decode_truth(data, "sample 'k' in s.tar")
    with pytest.raises(ShardFormatError, match=r"^sample 'k' in s\.tar: undecodable truth\.png \(cannot identify"):
        decode_truth(b"not an image at all", "sample 'k' in s.tar")


@pytest.mark.parametrize(("prepare", "fragment"), [
    ({"train_limit": None}, "train_limit=null (every image) has no meaning for source synthetic_parts"),
    ({"val_limit": None}, "set prepare.val_limit to the number of images to generate"),
    ({"synthetic_size": 31}, "'prepare.synthetic_size' = 31 is invalid: Input should be greater than or equal to 32"),
    ({"synthetic_size": 513}, "'prepare.synthetic_size' = 513 is invalid: Input should be less than or equal to 512"),
])  # fmt: skip
def test_config_errors_name_the_key(tmp_path, prepare, fragment):
    path = write_params(tmp_path / "params.yaml", prepare={"source": "synthetic_parts", **prepare})
    with pytest.raises(ConfigError) as exc:
        load_stage_config(PrepareConfig, path, "prepare")
    assert str(path) in str(exc.value) and fragment in str(exc.value), str(exc.value)
    cfg = load_stage_config(PrepareConfig, write_params(tmp_path / "ok.yaml", prepare={"source": "synthetic_parts"}),
                            "prepare")  # fmt: skip
    assert (cfg.synthetic_size, cfg.train_limit, cfg.val_limit) == (32, 5000, 1000)
    assert PrepareConfig(train_limit=None).train_limit is None  # other sources keep null = every image


def test_the_config_floor_is_the_generators():
    assert SYNTHETIC_MIN_SIZE == sp.MIN_SIZE == PrepareConfig().synthetic_size
    PrepareConfig(source="synthetic_parts", synthetic_size=sp.MIN_SIZE)
