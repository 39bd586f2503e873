"""`prepare` on an ImageFolder tree the test writes itself: mixed sizes, JPEG + PNG, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_imagefolder
from pipeline.config import PrepareConfig
from pipeline.data.prepare import prepare_dataset
from pipeline.data.shards import decode_image, iter_samples, read_index, shard_paths
from pipeline.data.sources import DataSourceError


def cfg_for(root: Path, **kw) -> PrepareConfig:
    base = dict(source="imagefolder", root=str(root), train_limit=None, val_limit=None, holdout_size=3, shard_size=8,
                num_workers=0)  # fmt: skip
    return PrepareConfig(**{**base, **kw})


def samples(out: Path, split: str) -> list[dict]:
    return list(iter_samples(shard_paths(out, split)))


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    train = make_imagefolder(root / "train", {"zebra": 7, "cat": 6, "dog": 5}, seed=1)
    val = make_imagefolder(root / "val", {"cat": 3, "dog": 2}, seed=2)
    return root, train, val


def test_val_folder_labels_passthrough_and_round_trip(folder, tmp_path):
    root, train_files, val_files = folder
    metrics = prepare_dataset(cfg_for(root, val_dir="val"), tmp_path / "out")
    index = read_index(tmp_path / "out")
    assert index["classes"] == ["cat", "dog", "zebra"]  # class index = sorted folder names
    assert metrics["train"]["num_samples"] == 15 and metrics["val"]["num_samples"] == 5
    assert metrics["holdout"]["num_samples"] == 3 and index["splits"]["holdout"]["class_counts"] == [1, 1, 1]
    assert index["splits"]["val"]["class_counts"] == [3, 2, 0]
    for splits, files in ((("train", "holdout"), train_files), (("val",), val_files)):  # the hold-out: from train_dir
        got = [s for split in splits for s in samples(tmp_path / "out", split)]
        assert sorted(s["json"]["source"] for s in got) == sorted(files)
        for s in got:
            src = files[s["json"]["source"]]
            assert "." not in s["__key__"]
            assert s["cls"] == index["classes"].index(src.parent.name)
            with Image.open(src) as im:
                assert s["json"]["orig_size"] == list(im.size)
                if src.suffix == ".JPEG":
                    assert s["ext"] == "jpg" and s["image"] == src.read_bytes()  # passed through unchanged
                else:
                    assert s["ext"] == "png"
                    mode = "L" if im.mode == "L" else "RGB"
                    np.testing.assert_array_equal(
                        np.asarray(decode_image(s["image"], mode=mode)), np.asarray(im.convert(mode))
                    )


def test_held_out_fraction_partitions_each_class_deterministically(folder, tmp_path):
    root, train_files, _ = folder
    prepare_dataset(cfg_for(root, val_fraction=0.3), tmp_path / "a")
    prepare_dataset(cfg_for(root, val_fraction=0.3), tmp_path / "b")
    train, held, val = ({s["json"]["source"] for s in samples(tmp_path / "a", split)} for split in ("train", "holdout", "val"))
    assert train.isdisjoint(val) and held.isdisjoint(train | val) and train | held | val == set(train_files)
    assert read_index(tmp_path / "a")["splits"]["val"]["class_counts"] == [2, 2, 2]  # round(0.3 * 6|5|7)
    assert (tmp_path / "a" / "val" / "val-000000.tar").read_bytes() == (tmp_path / "b" / "val" / "val-000000.tar").read_bytes()


def test_resize_reencodes_jpeg_with_shorter_side(folder, tmp_path):
    root, train_files, _ = folder
    prepare_dataset(cfg_for(root, val_dir="val", resize=16), tmp_path / "out")
    for s in samples(tmp_path / "out", "train"):
        img = decode_image(s["image"])
        assert min(img.size) == 16
        src = train_files[s["json"]["source"]]
        assert s["ext"] == ("jpg" if src.suffix == ".JPEG" else "png")
        if s["ext"] == "jpg":
            assert s["image"] != src.read_bytes()


def test_empty_class_folder_is_an_error(folder, tmp_path):
    root, _, _ = folder
    (root / "train" / "empty").mkdir()
    (root / "train" / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(DataSourceError, match=r"class folder .*train/empty holds no JPEG/PNG images"):
        prepare_dataset(cfg_for(root, val_dir="val"), tmp_path / "out")


def test_no_class_folders_or_missing_root(tmp_path):
    (tmp_path / "flat" / "train").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "train" / "a.png")
    with pytest.raises(DataSourceError, match="has no class sub-folders"):
        prepare_dataset(cfg_for(tmp_path / "flat"), tmp_path / "out")
    with pytest.raises(DataSourceError, match=r"imagefolder root .*missing not found"):
        prepare_dataset(cfg_for(tmp_path / "missing"), tmp_path / "out")
    with pytest.raises(DataSourceError, match=r"val directory .*flat/valid not found"):
        prepare_dataset(cfg_for(tmp_path / "flat", train_dir=".", val_dir="valid"), tmp_path / "out")


def test_val_class_unknown_to_train_is_an_error(folder, tmp_path):
    root, _, _ = folder
    make_imagefolder(root / "val", {"horse": 1})
    with pytest.raises(DataSourceError, match=r"class folders not in .*\['horse'\]"):
        prepare_dataset(cfg_for(root, val_dir="val"), tmp_path / "out")


def test_corrupt_image_fails_naming_the_file_and_keeps_previous_output(folder, tmp_path):
    root, train_files, _ = folder
    out = tmp_path / "out"
    prepare_dataset(cfg_for(root, val_dir="val"), out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = root / "train" / "dog" / "broken.jpg"
    bad.write_bytes(next(p for p in train_files.values() if p.suffix == ".JPEG").read_bytes()[:100])
    with pytest.raises(DataSourceError, match=r"broken\.jpg: cannot decode image .*on_corrupt: skip"):
        prepare_dataset(cfg_for(root, val_dir="val"), out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "out"]  # no temporary leftovers


def test_skip_policy_counts_skipped_images_and_enforces_the_limit(folder, tmp_path):
    root, _, _ = folder
    (root / "train" / "cat" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    metrics = prepare_dataset(cfg_for(root, val_dir="val", on_corrupt="skip", max_skip_fraction=0.5), tmp_path / "a")
    skipped = read_index(tmp_path / "a")["skipped"]
    [split] = [s for s in skipped if skipped[s]]  # train or holdout: wherever the seeded hold-out put it
    assert skipped[split] == ["cat/garbage.png"] and metrics[split]["skipped"] == 1
    assert metrics["train"]["num_samples"] + metrics["holdout"]["num_samples"] == 18
    n = metrics[split]["num_samples"] + 1
    with pytest.raises(DataSourceError, match=rf"{split}: skipped 1 of {n} images, more than prepare.max_skip_fraction=0.01"):
        prepare_dataset(cfg_for(root, val_dir="val", on_corrupt="skip", max_skip_fraction=0.01), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def png_16bit(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit PNG of ``pixels`` (uint16 [H, W] gray or [H, W, 3] RGB), written chunk by chunk: Pillow
    cannot write 16-bit RGB."""
    import struct
    import zlib

    h, w = pixels.shape[:2]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 0 if pixels.ndim == 2 else 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16bit_pngs_keep_their_high_byte(tmp_path):
    """A 16-bit grayscale PNG (10-bit data, 0..65472, as a scientific camera writes it) must not come out
    all white: every stored pixel is value >> 8, as Pillow reads 16-bit RGB PNGs (checked too)."""
    rng = np.random.default_rng(0)
    sources = {}
    for c in ("a", "b"):
        (tmp_path / "16" / "train" / c).mkdir(parents=True)
        for i in range(3):
            gray = (rng.integers(0, 1024, (20 + i, 30), dtype=np.uint16) << 6)  # 0..65472
            Image.fromarray(gray).save(tmp_path / "16" / "train" / c / f"g{i}.png")  # Pillow's own 16-bit writer
            rgb = rng.integers(0, 65536, (24, 18 + i, 3), dtype=np.uint16)
            png_16bit(tmp_path / "16" / "train" / c / f"rgb{i}.png", rgb)
            sources |= {f"{c}/g{i}.png": gray, f"{c}/rgb{i}.png": rgb}
    with Image.open(tmp_path / "16" / "train" / "a" / "g0.png") as im:
        assert im.mode.startswith("I") and np.asarray(im).max() > 255  # really 16 bits on disk
    metrics = prepare_dataset(cfg_for(tmp_path / "16", holdout_size=2), tmp_path / "out")
    got = [s for split in ("train", "holdout", "val") for s in samples(tmp_path / "out", split)]
    assert len(got) == len(sources) == sum(metrics[split]["num_samples"] for split in ("train", "holdout", "val"))
    for s in got:
        want = (sources[s["json"]["source"]] >> 8).astype(np.uint8)
        stored = decode_image(s["image"], mode="")
        assert s["ext"] == "png" and stored.mode == ("L" if want.ndim == 2 else "RGB")
        np.testing.assert_array_equal(np.asarray(stored), want)


@pytest.mark.parametrize("pixels, kind", [(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), "floating-point"),
                                          (np.arange(64, dtype=np.int32).reshape(8, 8) * 1000, "32-bit integer")])
def test_float_and_32bit_images_are_refused_naming_them(tmp_path, pixels, kind):
    """No 8-bit meaning is known for them (Pillow's convert would clip them at 255, silently)."""
    from pipeline.data.prepare import _encoded
    from pipeline.data.sources import Record

    rec = Record(key="train_00000000", label=0, source_id="scans.idx#0", pixels=pixels)
    with pytest.raises(DataSourceError, match=rf"scans\.idx#0: cannot decode image \({kind} pixels \(Pillow mode "
                                              r"[IF]\) of unknown range: store the image as 8- or 16-bit PNG"):  # fmt: skip
        list(_encoded([rec], cfg_for(tmp_path), "train", []))
    skipped: list[str] = []
    assert list(_encoded([rec], cfg_for(tmp_path, on_corrupt="skip"), "train", skipped)) == [] and skipped == ["scans.idx#0"]
