"""`train_parts` on a prepared set with ground-truth part masks (prepare.source: synthetic_parts): the part
IoU of the method, of every reference and of the patch-grid oracle, and the channel-grouping learner through
train_parts -> export_parts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ExportPartsConfig, ExtractConfig, PartsConfig, PrepareConfig
from pipeline.data.prepare import prepare_dataset
from pipeline.data.shards import iter_samples, shard_paths
from pipeline.data.synthetic_parts import CLASSES, PART_NAMES, render
from pipeline.features import extract_features, load_features
from pipeline.parts.build import PARTS_CHECKPOINT, build_parts, load_part_learner
from pipeline.parts.export import PARTS_FORMAT, export_parts
from pipeline.parts.iou import part_iou
from pipeline.parts.metrics import shuffle_within_images
from pipeline.parts.train import part_ids
from test_export_parts import make_teacher

PARTS = dict(num_parts=4, epochs=1, batch_size=16, decoder_channels=8, style_dim=8, temperature=0.1,
             tokens="channel_grouping")  # fmt: skip
SEED = 3


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """prepare (synthetic_parts, 32 px) -> a tiny random teacher (8 x 8 patches) -> extract -> train_parts (channel grouping)."""
    tmp = tmp_path_factory.mktemp("synthetic")
    prepared = tmp / "prepared"
    prepare_dataset(PrepareConfig(source="synthetic_parts", synthetic_size=32, seed=SEED, train_limit=48,
                                  val_limit=30, holdout_size=12, shard_size=20, num_workers=0), prepared)  # fmt: skip
    teacher = make_teacher(tmp / "teacher", 0, img_size=32)
    extract_features(ExtractConfig(batch_size=8), prepared, teacher, tmp / "features")
    metrics = build_parts(PartsConfig(**PARTS), prepared, teacher, tmp / "features", tmp / "parts",
                          figure_path=tmp / "fig.png")  # fmt: skip
    return prepared, teacher, tmp / "features", tmp / "parts", metrics


def test_every_segmentation_gets_its_part_iou_and_the_oracle_bounds_them(synthetic):
    *_, metrics = synthetic
    names = ("parts", "parts_mlp", "kmeans", "attention_heads", "random_teacher", "patch_grid_oracle")
    for name in names:
        score = metrics[name]["part_iou"]
        assert set(score) == {"miou", "per_image_miou", "miou_global", "per_class", "per_part", "miou_shuffled"}, name
        assert set(score["per_class"]) == set(CLASSES), name  # 30 balanced images: 5 of every class
        assert set(score["per_part"]) <= set(PART_NAMES[1:])
        assert 0 <= score["miou"] <= 1 and 0 <= score["miou_global"] <= 1
    oracle = metrics["patch_grid_oracle"]["part_iou"]["miou"]
    assert 0.3 < oracle < 1  # 4-px patches lose thin parts (masts, arms, legs) and every part's edges
    assert all(metrics[name]["part_iou"]["miou"] < oracle for name in names[:-1])
    # shuffled inside each image, the oracle's patches lose most of what they were worth
    assert metrics["patch_grid_oracle"]["part_iou"]["miou_shuffled"] < 0.6 * oracle
    assert metrics["parts"]["coherence"] >= 0 and "part_iou" not in metrics["train"]
    # the other token form is another learner (the same form with the same seed would repeat the method's maps)
    assert metrics["parts_mlp"]["part_iou"] != metrics["parts"]["part_iou"]


def test_the_methods_part_iou_is_that_of_its_ids_against_the_generators_masks(synthetic):
    """Recomputed outside the stage: ids from the saved learner on the feature shards, spread over their
    4 x 4 pixels with np.kron, against masks drawn again by the generator for each key, matched per class."""
    _, _, features, parts, metrics = synthetic
    va = load_features(features, "val")
    model, meta = load_part_learner(parts / PARTS_CHECKPOINT)
    assert meta["tokens"] == "channel_grouping" and model.tokens == "channel_grouping"
    ids = part_ids(model, torch.from_numpy(va["cls"]), torch.from_numpy(va["patches"])).numpy()
    pixels = np.kron(ids, np.ones((4, 4), dtype=np.uint8))
    index = [int(k.split("_")[1]) for k in va["key"]]
    drawn = [render(SEED, "val", i, 32, label=i % len(CLASSES)) for i in index]  # prepare's balanced labels
    truth, labels = np.stack([d.mask for d in drawn]), np.array([d.label for d in drawn])
    per_class = {CLASSES[c]: part_iou(pixels[labels == c], truth[labels == c], num_ids=4,
                                      num_parts=len(PART_NAMES) - 1).miou for c in range(len(CLASSES))}  # fmt: skip
    score = metrics["parts"]["part_iou"]
    assert score["per_class"] == pytest.approx(per_class, abs=1e-6)
    assert score["miou"] == pytest.approx(np.mean(list(per_class.values())), abs=1e-6)
    glob = part_iou(pixels, truth, num_ids=4, num_parts=len(PART_NAMES) - 1).miou
    assert score["miou_global"] == pytest.approx(glob, abs=1e-6)
    # its chance level: the same ids, positions permuted inside each image with the stage's seed (parts.seed 0)
    shuffled = np.kron(shuffle_within_images(torch.from_numpy(ids).long(), 0).numpy(), np.ones((4, 4), dtype=np.int64))
    chance = [part_iou(shuffled[labels == c], truth[labels == c], num_ids=4, num_parts=len(PART_NAMES) - 1).miou
              for c in range(len(CLASSES))]  # fmt: skip
    assert score["miou_shuffled"] == pytest.approx(np.mean(chance), abs=1e-6)


def test_the_figure_shows_the_ground_truth_column(synthetic):
    prepared, *_ = synthetic
    with Image.open(prepared.parent / "fig.png") as fig:
        width = fig.size[0]
    # image + method + attention heads + k-means + random teacher + other tokens + ground truth, 96 px each
    assert width >= 7 * 96


def test_channel_grouping_parts_export_through_the_stage(synthetic, tmp_path):
    prepared, teacher, features, parts, _ = synthetic
    export_parts(ExportPartsConfig(grid=None, batch_size=8), prepared, teacher, parts, tmp_path / "out")
    va = load_features(features, "val")
    model, _ = load_part_learner(parts / PARTS_CHECKPOINT)
    expected = part_ids(model, torch.from_numpy(va["cls"]), torch.from_numpy(va["patches"])).numpy()
    exported = list(iter_samples(shard_paths(tmp_path / "out", "val", PARTS_FORMAT)))
    np.testing.assert_array_equal(np.stack([s["parts"] for s in exported]), expected)
    assert [s["__key__"] for s in exported] == va["key"].tolist()
