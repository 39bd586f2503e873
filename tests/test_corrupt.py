"""Corrupt data: every kind of damage fails naming the shard and the sample key; with ``on_corrupt: skip``
the pretrain loader skips it, counts it in the metrics, and a limit on the skipped share fails the stage."""

import io
import json
import os
import shutil
import subprocess
import sys
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


@pytest.mark.slow
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


# Damaged files a stage loads: each fails naming the file and what to do, exit 2, no traceback, nothing
# written; a pickle that would run code is refused without running it. Stage runs are in-process (Typer's
# runner: the real command, its exit status and stderr) on tiny outputs built once.


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


def _bad_file(path: Path, kind: str) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("extract:\n  limit: 100\n")  # a YAML snippet saved under the wrong name
    else:
        torch.save({"state_dict": {}, "meta": {"method": "learned"}, "extra": _Payload()}, path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import tiny_stages

    return tiny_stages.every_output(tmp_path_factory.mktemp("built"))


def semmae(cwd: Path, monkeypatch, *args: str):
    from typer.testing import CliRunner

    from stages.cli import app

    monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, list(args))


def copy_of(built: dict, name: str, tmp_path: Path) -> Path:
    shutil.copytree(built[name], tmp_path / name)
    return tmp_path / name


# stage -> (the directory the damaged file sits in, its name, the stage's arguments after the damage)
def _teacher(built, tmp_path):
    bad = tmp_path / "given" / "checkpoint_teacher.pth"
    from conftest import write_params
    from tiny_stages import TINY_VIT

    write_params(tmp_path / "params.yaml", teacher={**TINY_VIT, "checkpoint": str(bad)})
    return bad, ["teacher", "--prepared", str(built["prepared"]), "--out", "out", "--metrics", "m.json",
                 "--curves", "c.tsv", "--resume", "resume"]  # fmt: skip


def _extract(built, tmp_path):
    teacher = copy_of(built, "teacher", tmp_path)
    return teacher / "checkpoint_teacher.pth", ["extract", "--prepared", str(built["prepared"]), "--teacher",
                                                str(teacher), "--out", "out", "--metrics", "m.json"]  # fmt: skip


def _export_parts(built, tmp_path):
    parts = copy_of(built, "parts", tmp_path)
    return parts / "part_learner.pth", ["export_parts", "--prepared", str(built["prepared"]), "--teacher",
                                        str(built["teacher"]), "--parts", str(parts), "--out", "out", "--metrics",
                                        "m.json"]  # fmt: skip


def _linprobe(built, tmp_path):
    pretrained = copy_of(built, "pretrained", tmp_path)
    return pretrained / "encoder.pth", ["linprobe", "--prepared", str(built["prepared"]), "--pretrained",
                                        str(pretrained), "--out", "out", "--metrics", "m.json", "--curves", "c.tsv",
                                        "--resume", "resume"]  # fmt: skip


def _finetune(built, tmp_path):
    from conftest import write_params

    write_params(tmp_path / "params.yaml", finetune={"batch_size": 16})  # the 60 train images hold a batch
    pretrained = copy_of(built, "pretrained", tmp_path)
    return pretrained / "encoder.pth", ["finetune", "--prepared", str(built["prepared"]), "--pretrained",
                                        str(pretrained), "--out", "out", "--metrics", "m.json", "--curves", "c.tsv",
                                        "--resume", "resume"]  # fmt: skip


LOADED = {"teacher": _teacher, "extract": _extract, "export_parts": _export_parts, "linprobe": _linprobe,
          "finetune": _finetune}  # fmt: skip


@pytest.mark.parametrize("kind", ["zero_bytes", "text", "hostile_pickle"])
@pytest.mark.parametrize("stage", sorted(LOADED))
def test_a_damaged_checkpoint_fails_the_stage_naming_the_file_and_what_to_do(built, tmp_path, monkeypatch, stage, kind):
    """Before: a zero-byte part_learner.pth printed only "Aborted.", a hostile one a raw UnpicklingError
    traceback, a text teacher checkpoint `KeyError: 101`."""
    from conftest import write_params

    write_params(tmp_path / "params.yaml")  # every section's defaults (teacher: replaced by _teacher)
    bad, args = LOADED[stage](built, tmp_path)
    _bad_file(bad, kind)
    (tmp_path / "c.tsv").write_text("step\tloss\n1\t0.5\n")  # a previous run's curves
    res = semmae(tmp_path, monkeypatch, *args)
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output[-3000:]
    error = res.stderr.strip()
    assert error.startswith(f"semmae {stage}: error: checkpoint {bad} ") and len(error.splitlines()) == 1, error
    assert {"zero_bytes": "is empty (0 bytes)", "text": "is not a", "hostile_pickle": "refused"}[kind] in error
    assert "dvc checkout" in error and "rerun" in error  # what to do
    assert not (tmp_path / "pwned-by-checkpoint").exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()
    assert (tmp_path / "c.tsv").read_text() == "step\tloss\n1\t0.5\n"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_a_zero_byte_part_learner_is_named_by_the_real_command(built, tmp_path):
    """The same through a real `semmae` process (click turned the EOFError into a bare "Aborted.")."""
    from conftest import write_params

    write_params(tmp_path / "params.yaml")
    bad, args = _export_parts(built, tmp_path)
    _bad_file(bad, "zero_bytes")
    res = subprocess.run([str(Path(sys.executable).parent / "semmae"), *args], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr and "Aborted" not in res.stderr
    assert f"semmae export_parts: error: checkpoint {bad} is empty (0 bytes): restore it (dvc checkout" in res.stderr


@pytest.mark.parametrize("kind", ["zero_bytes", "text", "hostile_pickle"])
def test_a_damaged_resume_state_is_skipped_with_a_warning_and_never_run(tmp_path, monkeypatch, caplog, kind):
    """Resume states are the stage's own scratch files: a damaged one is not an error, the run starts over
    (or from prev.pth) after a warning that names it."""
    import logging

    from pipeline.resume import ResumeStore

    monkeypatch.chdir(tmp_path)
    store = ResumeStore(tmp_path / "resume", "fp")
    _bad_file(store.last, kind)
    with caplog.at_level(logging.INFO, logger="pipeline.resume"):
        assert store.load() is None
    assert str(store.last) in caplog.text and not (tmp_path / "pwned-by-checkpoint").exists()


def test_a_pretrain_run_stopped_by_a_truncated_shard_leaves_the_previous_curves(tmp_path, monkeypatch, shards):
    """Before: the failed run replaced the previous run's curves with a header-only file."""
    from conftest import write_params

    root, paths, _ = shards
    os.truncate(paths[1], os.path.getsize(paths[1]) // 2)
    write_params(tmp_path / "params.yaml", pretrain={"seeds": [0], "variants": {"semantic": {}}, "common": {
        "img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 16,
        "decoder_depth": 1, "decoder_num_heads": 2, "epochs": 1, "batch_size": 16, "steps_per_epoch": 2}})  # fmt: skip
    before = "step\talpha\tepoch\tloss\tlr\n1\t0\t1\t0.9\t0.001\n"
    (tmp_path / "c.tsv").write_text(before)
    res = semmae(tmp_path, monkeypatch, "pretrain", "--variant", "semantic", "--part-shards", str(root), "--out", "out",
                 "--resume", "resume", "--metrics", "m.json", "--curves", "c.tsv")  # fmt: skip
    assert res.exit_code == 2 and "truncated or were replaced" in res.stderr, res.output[-3000:]
    assert (tmp_path / "c.tsv").read_text() == before
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "out").exists()
