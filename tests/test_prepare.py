"""`prepare` on Fashion-MNIST idx files: determinism, counts, balance, the hold-out split, round trip, bad input."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import write_idx
from pipeline.config import PrepareConfig
from pipeline.data.prepare import balanced_subset, prepare_dataset
from pipeline.data.shards import decode_image, iter_samples, read_index, shard_paths
from pipeline.data.sources import DataSourceError


def cfg_for(root: Path, **kw) -> PrepareConfig:
    base = dict(root=str(root), train_limit=100, val_limit=40, holdout_size=50, shard_size=30, num_workers=0)
    return PrepareConfig(**{**base, **kw})


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def test_two_runs_are_byte_identical_whatever_the_worker_count(fake_fmnist, tmp_path):
    root, _ = fake_fmnist
    prepare_dataset(cfg_for(root, num_workers=0), tmp_path / "a")
    prepare_dataset(cfg_for(root, num_workers=2, train_limit=None), tmp_path / "c")  # > 256 images: a pool
    prepare_dataset(cfg_for(root, num_workers=0, train_limit=None), tmp_path / "d")
    prepare_dataset(cfg_for(root, num_workers=0), tmp_path / "b")
    a, b = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    assert a == b and "train/train-000000.tar" in a and "holdout/holdout-000000.tar" in a and "index.json" in a
    c, d = tree_digest(tmp_path / "c"), tree_digest(tmp_path / "d")
    assert c.pop("config.json") != d.pop("config.json")  # it records num_workers; the data does not depend on it
    assert c == d
    with tarfile.open(tmp_path / "a" / "train" / "train-000000.tar") as tar:
        assert {m.mtime for m in tar.getmembers()} == {0}


def test_a_different_seed_changes_subset_and_order(fake_fmnist, tmp_path):
    root, _ = fake_fmnist
    prepare_dataset(cfg_for(root), tmp_path / "a")
    prepare_dataset(cfg_for(root, seed=1), tmp_path / "b")
    keys = [[s["__key__"] for s in iter_samples(shard_paths(tmp_path / d, "train"))] for d in "ab"]
    assert keys[0] != keys[1]


def test_counts_shards_and_class_balance(fake_fmnist, tmp_path):
    root, _ = fake_fmnist
    metrics = prepare_dataset(cfg_for(root, train_limit=95), tmp_path / "out")
    index = read_index(tmp_path / "out")
    train = index["splits"]["train"]
    assert metrics["train"] == {"num_samples": 95, "num_shards": 4, "skipped": 0}
    assert [s["num_samples"] for s in train["shards"]] == [30, 30, 30, 5]
    assert sorted(train["class_counts"]) == [9] * 5 + [10] * 5  # remainder spread, one each
    samples = list(iter_samples(shard_paths(tmp_path / "out", "train")))
    assert len(samples) == 95 and len({s["__key__"] for s in samples}) == 95
    assert np.bincount([s["cls"] for s in samples], minlength=10).tolist() == train["class_counts"]
    for shard in train["shards"]:
        data = (tmp_path / "out" / "train" / shard["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    assert index["splits"]["val"]["class_counts"] == [4] * 10
    assert index["classes"][0] == "T-shirt/top" and len(index["classes"]) == 10
    assert json.loads((tmp_path / "out" / "config.json").read_text())["prepare"]["train_limit"] == 95


def test_decoded_images_equal_the_source_pixels(fake_fmnist, tmp_path):
    root, arrays = fake_fmnist
    prepare_dataset(cfg_for(root, train_limit=None, val_limit=None), tmp_path / "out")
    for source, splits in (("train", ("train", "holdout")), ("val", ("val",))):
        images, labels = arrays[source]
        seen = set()
        for split in splits:  # the hold-out is part of the training source
            for s in iter_samples(shard_paths(tmp_path / "out", split)):
                i = int(s["__key__"].rsplit("_", 1)[1])
                assert s["ext"] == "png" and "." not in s["__key__"]
                np.testing.assert_array_equal(np.asarray(decode_image(s["image"], mode="L")), images[i])
                assert s["cls"] == labels[i] and s["json"]["orig_size"] == [28, 28]
                assert i not in seen
                seen.add(i)
        assert seen == set(range(len(images)))


def split_samples(out: Path, split: str) -> list[dict]:
    return list(iter_samples(shard_paths(out, split)))


def test_holdout_is_stratified_disjoint_from_train_and_leaves_train_limit_alone(fake_fmnist, tmp_path):
    root, _ = fake_fmnist
    metrics = prepare_dataset(cfg_for(root, holdout_size=50, train_limit=100), tmp_path / "out")
    index = read_index(tmp_path / "out")
    assert index["splits"]["holdout"]["class_counts"] == [5] * 10  # class-balanced
    assert metrics["holdout"] == {"num_samples": 50, "num_shards": 2, "skipped": 0}
    assert metrics["train"]["num_samples"] == 100 and metrics["val"]["num_samples"] == 40
    held, train = split_samples(tmp_path / "out", "holdout"), split_samples(tmp_path / "out", "train")
    assert len(held) == 50 and len(train) == 100
    assert not {s["__key__"] for s in held} & {s["__key__"] for s in train}
    assert not {s["json"]["source"] for s in held} & {s["json"]["source"] for s in train}
    # its own seed stream: the hold-out does not move when train_limit changes
    prepare_dataset(cfg_for(root, holdout_size=50, train_limit=None), tmp_path / "all")
    assert [s["__key__"] for s in split_samples(tmp_path / "all", "holdout")] == [s["__key__"] for s in held]
    everything = split_samples(tmp_path / "all", "train")
    assert len(everything) == 250 and not {s["__key__"] for s in held} & {s["__key__"] for s in everything}
    prepare_dataset(cfg_for(root, holdout_size=50, seed=1), tmp_path / "seed1")
    assert {s["__key__"] for s in split_samples(tmp_path / "seed1", "holdout")} != {s["__key__"] for s in held}


def test_holdout_larger_than_the_training_source_allows_fails_before_any_output(fake_fmnist, tmp_path):
    root, _ = fake_fmnist  # 300 training images in 10 classes: at most 290 can be held out
    with pytest.raises(DataSourceError, match=r"prepare\.holdout_size=291.*300 images in 10 classes.*at most 290"):
        prepare_dataset(cfg_for(root, holdout_size=291), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    prepare_dataset(cfg_for(root, holdout_size=290, train_limit=None, val_limit=10), tmp_path / "out")
    assert read_index(tmp_path / "out")["splits"]["train"]["class_counts"] == [1] * 10  # one left per class


def test_balanced_subset_reserve_leaves_items_of_every_class():
    labels = np.array([0] * 2 + [1] * 50 + [2] * 50)
    idx = balanced_subset(labels, 30, 3, np.random.default_rng(0), reserve=1)
    assert np.bincount(labels[idx], minlength=3).tolist() == [1, 15, 14]
    idx = balanced_subset(labels, 99, 3, np.random.default_rng(0), reserve=1)
    assert np.bincount(labels[idx], minlength=3).tolist() == [1, 49, 49]
    with pytest.raises(ValueError, match="exceeds the 99 items"):
        balanced_subset(labels, 100, 3, np.random.default_rng(0), reserve=1)


def test_resize_shrinks_the_shorter_side_and_never_enlarges(fake_fmnist, tmp_path):
    root, _ = fake_fmnist
    prepare_dataset(cfg_for(root, resize=20, train_limit=10, val_limit=10), tmp_path / "out")
    s = next(iter_samples(shard_paths(tmp_path / "out", "train")))
    assert decode_image(s["image"]).size == (20, 20) and s["json"]["orig_size"] == [28, 28]
    prepare_dataset(cfg_for(root, resize=32, train_limit=10, val_limit=10), tmp_path / "big")
    s = next(iter_samples(shard_paths(tmp_path / "big", "train")))
    assert decode_image(s["image"]).size == (28, 28)  # smaller than the resize: kept as it is


def test_balanced_subset_gives_unused_share_of_small_classes_to_others():
    labels = np.array([0] * 2 + [1] * 50 + [2] * 50)
    idx = balanced_subset(labels, 30, 3, np.random.default_rng(0))
    assert np.bincount(labels[idx], minlength=3).tolist() == [2, 14, 14]
    assert len(set(idx.tolist())) == 30
    assert balanced_subset(labels, None, 3, np.random.default_rng(0)).tolist() == list(range(102))


def test_missing_directory_says_how_to_get_the_data(tmp_path):
    with pytest.raises(DataSourceError, match=r"(?s)nowhere.*not found.*apt-get install dataset-fashion-mnist"):
        prepare_dataset(cfg_for(tmp_path / "nowhere"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_file_is_named(fake_fmnist, tmp_path):
    root, _ = fake_fmnist
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataSourceError, match=r"t10k-labels-idx1-ubyte\.gz not found.*dataset-fashion-mnist"):
        prepare_dataset(cfg_for(root), tmp_path / "out")


def test_label_image_count_mismatch(fake_fmnist, tmp_path):
    root, arrays = fake_fmnist
    write_idx(root / "train-labels-idx1-ubyte.gz", arrays["train"][1][:-1])
    with pytest.raises(DataSourceError, match=r"300 images but .*train-labels-idx1-ubyte\.gz holds 299 labels"):
        prepare_dataset(cfg_for(root), tmp_path / "out")


@pytest.mark.parametrize("damage", ["truncated_gzip", "wrong_magic", "short_payload"])
def test_corrupt_idx_files_are_named(fake_fmnist, tmp_path, damage):
    root, arrays = fake_fmnist
    path = root / "train-images-idx3-ubyte.gz"
    if damage == "truncated_gzip":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "wrong_magic":
        write_idx(path, arrays["train"][0][:, 0, :])  # 2-d: magic 0x802
    else:
        write_idx(path, arrays["train"][0])
        import gzip

        raw = gzip.decompress(path.read_bytes())[:-10]
        path.write_bytes(gzip.compress(raw))
    with pytest.raises(DataSourceError, match="train-images-idx3-ubyte.gz"):
        prepare_dataset(cfg_for(root), tmp_path / "out")
