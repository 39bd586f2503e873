"""Corrupt data: every kind of damage fails naming the shard and the sample key; with ``on_corrupt: skip``
the pretrain loader skips it, counts it in the metrics, and a limit on the skipped share fails the stage."""

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import make_part_shards
from pipeline.config import PretrainConfig
from pipeline.data.shards import ShardFormatError, iter_raw_samples, shard_entries, shard_paths, write_tar
from pipeline.mae.data import decode_part_sample, make_loader
from pipeline.mae.train import TrainingError, pretrain

PARTS = "semmae-parts/1"
KEY = "train00005"  # in train-000000.tar (24 samples per shard, written in order)


def npy(a: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=allow_pickle)
    return buf.getvalue()


DAMAGE = {  # what a damaged sample looks like -> what the error must say
    "missing_key": (lambda s: s.pop("cls"), "missing entry 'cls'"),
    "missing_parts": (lambda s: s.pop("parts.npy"), "no parts.npy"),
    "undecodable_image": (lambda s: s.update(png=s["png"][:40]), "undecodable image"),
    "parts_wrong_shape": (lambda s: s.update({"parts.npy": npy(np.zeros((3, 3), np.uint8))}), "parts.npy is 3x3"),
    "parts_not_square": (lambda s: s.update({"parts.npy": npy(np.zeros((4, 2), np.uint8))}), "square uint8 map"),
    "parts_id_too_high": (lambda s: s.update({"parts.npy": npy(np.full((4, 4), 4, np.uint8))}), "part id 4 >= num_parts=4"),
    "parts_pickled": (lambda s: s.update({"parts.npy": npy(np.array([{"a": 1}] * 16, dtype=object).reshape(4, 4), True)}),
                      "malformed parts.npy"),
}  # fmt: skip


def damage_sample(shard: Path, key: str, damage) -> None:
    """Rewrite ``shard`` with sample ``key`` changed by ``damage`` (the index's size no longer matches)."""
    samples = []
    for raw in iter_raw_samples([str(shard)]):
        s = {k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"}
        if s["__key__"] == key:
            damage(s)
        samples.append(s)
    write_tar(shard, samples)


def epoch(shards, counts=None, on_corrupt="fail", batches=12, workers=0, decode="cpu"):
    """One epoch of the test loader: 4 shards x 24 samples, 2 streams of 4 samples per batch: 12 batches
    read every sample exactly once."""
    dl = make_loader(shards, 4, 16, 4, 8, batches, 0, 0, (0.2, 1.0), (0.75, 4 / 3), 0.5, 16, workers, 2, 40, decode,
                     counts, on_corrupt)  # fmt: skip
    items = list(dl)
    assert len(items) == batches and all(len(x) == 8 for x, *_ in items)
    return items, dl.skipped


@pytest.fixture
def shards(tmp_path):
    root = make_part_shards(tmp_path / "parts")
    entries = shard_entries(root, "train", PARTS)
    return root, [e.path for e in entries], [e.num_samples for e in entries]


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_sample_fails_naming_shard_and_key_or_is_skipped_and_counted(shards, kind):
    root, paths, counts = shards
    damage, message = DAMAGE[kind]
    damage_sample(Path(paths[0]), KEY, damage)
    with pytest.raises(ShardFormatError) as err:
        epoch(paths, counts)
    assert message in str(err.value) and f"sample {KEY!r} in {paths[0]}" in str(err.value)
    items, skipped = epoch(paths, counts, on_corrupt="skip")
    assert sum(n for n, _ in skipped) == 1 and KEY in skipped[0][1] and message in skipped[0][1]
    keys_seen = len(items) * 8
    assert keys_seen == 96  # the batch was filled from the next sample: the epoch is as long as ever


def test_the_error_survives_loader_worker_processes(shards):
    _, paths, counts = shards
    damage_sample(Path(paths[0]), KEY, DAMAGE["undecodable_image"][0])
    with pytest.raises(ShardFormatError, match=f"sample '{KEY}' in .*train-000000.tar: undecodable image"):
        epoch(paths, counts, workers=2)
    _, skipped = epoch(paths, counts, on_corrupt="skip", workers=2)
    assert [n for n, _ in skipped] == [1]


def test_a_jpeg_that_breaks_only_on_the_device_is_named(tmp_path):
    """decode: device parses only JPEG headers in the loader: a body that does not decode is found in the
    batched device decode, which then names the sample (here the CPU stands in for the GPU)."""
    import torch

    from pipeline.mae.decode import decode_crop

    root = make_part_shards(tmp_path / "jpg", fmt="jpg")
    entries = shard_entries(root, "train", PARTS)
    paths, counts = [e.path for e in entries], [e.num_samples for e in entries]

    def cut_scan(s):  # headers intact, the entropy-coded data after the start-of-scan marker cut in half
        sos = s["jpg"].index(b"\xff\xda")
        s["jpg"] = s["jpg"][: sos + (len(s["jpg"]) - sos) // 2]

    damage_sample(Path(paths[0]), KEY, cut_scan)
    with pytest.raises(ShardFormatError, match=f"sample '{KEY}' in .*train-000000.tar: undecodable"):
        epoch(paths, counts)  # decode: cpu finds it in the loader ...
    _, skipped = epoch(paths, counts, on_corrupt="skip")
    assert [n for n, _ in skipped] == [1]  # ... and can skip it
    items, _ = epoch(paths, counts, on_corrupt="skip", decode="device")
    with pytest.raises(ShardFormatError, match=f"sample '{KEY}' in .*train-000000.tar: undecodable JPEG on cpu .*decode: cpu"):
        for x, *_ in items:
            decode_crop(x, 16, torch.device("cpu"))


def intact_samples(shard: str) -> int:
    n = 0
    try:
        for raw in iter_raw_samples([shard]):
            try:
                decode_part_sample(raw, 4, 4)
                n += 1
            except ShardFormatError:
                pass
    except ShardFormatError:
        pass
    return n


@pytest.mark.parametrize("cut", [0.5, 0.02])
def test_a_truncated_shard_is_caught_by_its_size_and_its_count(shards, cut):
    """tarfile's stream reader ends a truncated tar early without an error: the index's size and count
    are what catch it (the size before any compute, the count when the shard streams from a URL)."""
    root, paths, counts = shards
    size = os.path.getsize(paths[0])
    os.truncate(paths[0], int(size * cut))
    with pytest.raises(ShardFormatError, match=rf"train-000000.tar is {int(size * cut)} bytes, index.json records {size}"):
        shard_paths(root, "train", PARTS)
    with pytest.raises(ShardFormatError, match=r"shard .*train-000000.tar: (ended after \d+ sample|unreadable after)"):
        list(iter_raw_samples([paths[0]], [counts[0]]))  # decoding would also stop at a half-written sample
    with pytest.raises(ShardFormatError, match=r"train-000000.tar"):
        epoch(paths, counts)
    _, skipped = epoch(paths, counts, on_corrupt="skip")
    lost = 24 - intact_samples(paths[0])  # every sample it no longer holds, each time the stream passes over it
    assert sum(n for n, _ in skipped) in (lost, 2 * lost) and lost > 0
    assert all("train-000000.tar" in why for _, why in skipped)


def test_a_stream_whose_shards_are_all_unreadable_fails_instead_of_spinning(shards):
    _, paths, counts = shards
    for p in paths:
        os.truncate(p, 0)
    with pytest.raises(ShardFormatError, match="no readable sample"):
        epoch(paths, counts, on_corrupt="skip")


def run(tmp_path: Path, root: Path, name: str, **kw) -> dict:
    cfg = PretrainConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
                         decoder_depth=1, decoder_num_heads=2, epochs=2, batch_size=16, steps_per_epoch=6,
                         warmup_epochs=0.5, shuffle_buffer=32, num_figure_images=3, loader_streams=4, **kw)  # fmt: skip
    return pretrain(cfg, root, tmp_path / name / "out", tmp_path / name / "resume")


def zero_image_in_place(shard: Path, key: str) -> None:
    """Bit rot: the image bytes of ``key`` overwritten with zeros, the shard's size unchanged."""
    with tarfile.open(shard) as tar:
        member = tar.getmember(f"{key}.png")
        offset, length = member.offset_data, member.size
    with open(shard, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * length)


def test_pretrain_stage_fails_or_skips_and_counts_and_enforces_the_limit(tmp_path, shards):
    """96 train images, 2 epochs x 6 steps x 16 = every image once per epoch: the rotten one is met twice."""
    root, paths, _ = shards
    zero_image_in_place(Path(paths[0]), KEY)
    with pytest.raises(ShardFormatError, match=rf"sample '{KEY}' in .*train-000000.tar: undecodable image"):
        run(tmp_path, root, "fail")
    assert not (tmp_path / "fail" / "out").exists()
    metrics = run(tmp_path, root, "skip", on_corrupt="skip", max_skip_fraction=0.05)
    assert metrics["skipped_samples"] == 2 and KEY in metrics["skipped_examples"][0]
    meta = json.loads((tmp_path / "skip" / "out" / "meta.json").read_text())
    assert meta["skipped_samples"] == 2
    with pytest.raises(TrainingError, match=r"skipped 1 corrupt sample\(s\) of 97 read .*max_skip_fraction=0.001"):
        run(tmp_path, root, "limit", on_corrupt="skip")  # the default limit: 1 of 97 is too many
    assert not (tmp_path / "limit" / "out").exists()


def test_a_truncated_train_shard_fails_pretrain_before_compute_unless_skipping(tmp_path, shards):
    root, paths, _ = shards
    os.truncate(paths[1], os.path.getsize(paths[1]) // 2)
    with pytest.raises(ShardFormatError, match="truncated or were replaced.*dvc checkout"):
        run(tmp_path, root, "fail")
    assert not (tmp_path / "fail" / "resume").exists()  # nothing was computed or written
    with pytest.raises(TrainingError, match="max_skip_fraction=0.05"):  # half a shard is ~12% of the data
        run(tmp_path, root, "skip", on_corrupt="skip", max_skip_fraction=0.05)
    metrics = run(tmp_path, root, "lenient", on_corrupt="skip", max_skip_fraction=0.5)
    assert metrics["skipped_samples"] >= 2 * 12


def test_feature_shards_are_checked_by_name_and_row_count(tmp_path):
    import pyarrow as pa

    from pipeline.features import FEATURES_FORMAT, FeatureError, load_features

    feats = tmp_path / "features"
    (feats / "train").mkdir(parents=True)
    table = pa.table({"key": ["a", "b"], "label": pa.array([0, 1], pa.int32())})
    with pa.OSFile(str(feats / "train" / "train-000000.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)

    def index(name, rows):
        (feats / "index.json").write_text(json.dumps({"format": FEATURES_FORMAT, "teacher": {"dim": 1},
                                                      "splits": {"train": {"files": [{"file": name, "num_rows": rows}]}}}))  # fmt: skip

    index("../../secret.arrow", 2)
    with pytest.raises(FeatureError, match=r"file name '../../secret.arrow' in split 'train' is not of the form"):
        load_features(feats, "train")
    index("train-000000.arrow", 3)
    with pytest.raises(FeatureError, match=r"train-000000.arrow holds 2 rows, index.json records 3"):
        load_features(feats, "train")
    path = feats / "train" / "train-000000.arrow"
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(FeatureError, match=r"train-000000.arrow is unreadable .*dvc checkout"):
        load_features(feats, "train")
