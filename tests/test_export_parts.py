"""`train_parts` + `export_parts` end to end on tiny data: schema, ids, determinism, errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ExportPartsConfig, ExtractConfig, PartsConfig, PrepareConfig, TeacherConfig, resolved_config
from pipeline.data.prepare import prepare_dataset
from pipeline.data.shards import iter_raw_samples, iter_samples, shard_paths
from pipeline.features import FeatureError, extract_features, load_features
from pipeline.models.checkpoint import build_vit, save_backbone
from pipeline.parts.build import PARTS_CHECKPOINT, build_parts, load_part_learner
from pipeline.parts.export import PARTS_FORMAT, export_parts
from pipeline.parts.train import part_ids

TINY = dict(arch="vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, embed_dim=32, num_heads=2)
PARTS = dict(num_parts=3, epochs=1, batch_size=16, decoder_channels=8, style_dim=8, temperature=0.1)


def make_teacher(path: Path, seed: int) -> Path:
    path.mkdir()
    torch.manual_seed(seed)
    save_backbone(build_vit(**TINY), path / "checkpoint_teacher.pth")
    (path / "config.json").write_bytes(resolved_config(TeacherConfig.model_validate(TINY), "teacher"))
    return path


@pytest.fixture
def stages(fake_fmnist, tmp_path):
    root, _ = fake_fmnist
    prepared = tmp_path / "prepared"
    prepare_dataset(PrepareConfig(root=str(root), train_limit=60, val_limit=20, holdout_size=50, shard_size=25, num_workers=0), prepared)
    teacher = make_teacher(tmp_path / "teacher", 0)
    extract_features(ExtractConfig(batch_size=8), prepared, teacher, tmp_path / "features")
    metrics = build_parts(PartsConfig(**PARTS), prepared, teacher, tmp_path / "features", tmp_path / "parts",
                          figure_path=tmp_path / "fig.png")  # fmt: skip
    return prepared, teacher, tmp_path / "features", tmp_path / "parts", metrics


def digest(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def test_train_parts_reports_method_and_references_and_draws_the_figure(stages, tmp_path):
    _, _, _, parts, metrics = stages
    for name in ("parts", "attention_heads", "kmeans", "random_teacher"):
        stats = metrics[name]
        assert 0 <= stats["min_share"] <= stats["max_share"] <= 1
        assert stats["coherence_gain"] == pytest.approx(stats["coherence"] - stats["coherence_shuffled"])
    assert metrics["num_parts"] == 3 and metrics["val_recon_l1"] > 0
    model, meta = load_part_learner(parts / PARTS_CHECKPOINT)
    assert meta["num_parts"] == 3 and meta["grid"] == [4, 4]
    from PIL import Image

    with Image.open(tmp_path / "fig.png") as fig:
        assert fig.size[0] > 5 * 96  # image + 4 segmentations


def test_export_schema_ids_passthrough_and_determinism(stages, tmp_path):
    prepared, teacher, features, parts, _ = stages
    result = export_parts(ExportPartsConfig(grid=None, batch_size=8), prepared, teacher, parts, tmp_path / "a")
    assert result == {"grid": 4, "num_parts": 3, "train_samples": 60, "val_samples": 20}
    for split in ("train", "val"):
        src = list(iter_raw_samples(shard_paths(prepared, split)))
        out = list(iter_raw_samples(shard_paths(tmp_path / "a", split, PARTS_FORMAT)))
        assert [s["__key__"] for s in out] == [s["__key__"] for s in src]
        for a, b in zip(src, out):
            assert a["png"] == b["png"] and a["cls"] == b["cls"] and a["json"] == b["json"]
        decoded = list(iter_samples(shard_paths(tmp_path / "a", split, PARTS_FORMAT)))
        for s in decoded:
            assert s["parts"].dtype == np.uint8 and s["parts"].shape == (4, 4) and s["parts"].max() < 3
    # recomputed features give the same maps as the feature shards (same batch size)
    feats = load_features(features, "val")
    model, _ = load_part_learner(parts / PARTS_CHECKPOINT)
    expected = part_ids(model, torch.from_numpy(feats["cls"]), torch.from_numpy(feats["patches"])).numpy()
    np.testing.assert_array_equal(np.stack([s["parts"] for s in decoded]), expected)
    export_parts(ExportPartsConfig(grid=None, batch_size=8), prepared, teacher, parts, tmp_path / "b")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_export_on_a_finer_mae_grid(stages, tmp_path):
    prepared, teacher, _, parts, _ = stages
    export_parts(ExportPartsConfig(grid=8, batch_size=8), prepared, teacher, parts, tmp_path / "g8")
    s = next(iter(iter_samples(shard_paths(tmp_path / "g8", "val", PARTS_FORMAT))))
    assert s["parts"].shape == (8, 8) and s["parts"].max() < 3


def test_export_errors_before_compute(stages, tmp_path):
    prepared, teacher, _, parts, _ = stages
    other = make_teacher(tmp_path / "other", 1)
    with pytest.raises(FeatureError, match="trained on teacher .* rerun train_parts"):
        export_parts(ExportPartsConfig(), prepared, other, parts, tmp_path / "x")
    with pytest.raises(FeatureError, match="grid=5 does not divide the image size 16"):
        export_parts(ExportPartsConfig(grid=5), prepared, teacher, parts, tmp_path / "x")
    with pytest.raises(FeatureError, match="num_parts=3 exceeds the 1 patches"):
        export_parts(ExportPartsConfig(grid=1), prepared, teacher, parts, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_train_parts_errors(stages, tmp_path):
    prepared, teacher, features, _, _ = stages
    other = make_teacher(tmp_path / "other", 1)
    with pytest.raises(FeatureError, match="extracted with teacher .* rerun the extract stage"):
        build_parts(PartsConfig(**PARTS), prepared, other, features, tmp_path / "p")
    with pytest.raises(FeatureError, match="num_parts=17 exceeds the 16 patches"):
        build_parts(PartsConfig(**{**PARTS, "num_parts": 17, "min_share": 0.0}), prepared, teacher, features, tmp_path / "p")


def test_attention_heads_method_exports_head_ids(stages, tmp_path):
    prepared, teacher, features, _, _ = stages
    metrics = build_parts(PartsConfig(method="attention_heads"), prepared, teacher, features, tmp_path / "p", references=False)
    assert metrics["num_parts"] == 2 and "parts" in metrics  # N = the teacher's 2 heads
    export_parts(ExportPartsConfig(grid=None), prepared, teacher, tmp_path / "p", tmp_path / "e")
    s = next(iter(iter_samples(shard_paths(tmp_path / "e", "train", PARTS_FORMAT))))
    assert s["parts"].shape == (4, 4) and s["parts"].max() < 2


def test_export_under_two_processes_equals_one(stages, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import write_params

    prepared, teacher, _, parts, _ = stages
    export_parts(ExportPartsConfig(grid=None, batch_size=8), prepared, teacher, parts, tmp_path / "one")
    write_params(tmp_path / "params.yaml", export_parts={"grid": None, "batch_size": 8})
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    res = subprocess.run(
        [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node=2", "--no-python", "semmae", "export_parts",
         "--params", "params.yaml", "--prepared", str(prepared), "--teacher", str(teacher), "--parts", str(parts),
         "--out", "two", "--metrics", "m.json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert digest(tmp_path / "one") == digest(tmp_path / "two")


def test_kmeans_method_exports_nearest_centroid_ids(stages, tmp_path):
    prepared, teacher, features, _, _ = stages
    metrics = build_parts(PartsConfig(**{**PARTS, "method": "kmeans"}), prepared, teacher, features, tmp_path / "p",
                          references=False)  # fmt: skip
    assert metrics["method"] == "kmeans" and "parts" in metrics and "kmeans" not in metrics
    model, meta = load_part_learner(tmp_path / "p" / PARTS_CHECKPOINT)
    export_parts(ExportPartsConfig(grid=None, batch_size=8), prepared, teacher, tmp_path / "p", tmp_path / "e")
    va = load_features(features, "val")
    expected = model.part_logits(None, torch.from_numpy(va["patches"])).argmax(1).numpy()
    exported = {s["__key__"]: s["parts"] for s in iter_samples(shard_paths(tmp_path / "e", "val", PARTS_FORMAT))}
    assert np.array_equal(np.stack([exported[k] for k in va["key"]]), expected)


def test_random_teacher_method_reads_its_own_random_vit(stages, tmp_path):
    prepared, teacher, features, _, _ = stages
    metrics = build_parts(PartsConfig(**{**PARTS, "method": "random_teacher"}), prepared, teacher, features,
                          tmp_path / "p")  # fmt: skip
    assert metrics["method"] == "random_teacher" and "random_teacher" not in metrics  # it is the method here
    from pipeline.parts.build import parts_teacher
    from pipeline.teacher.build import load_teacher

    vit, tcfg, _ = load_teacher(teacher)
    rand = parts_teacher(vit, tcfg, tmp_path / "p")
    assert rand is not vit and not torch.equal(rand.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    export_parts(ExportPartsConfig(grid=None, batch_size=8), prepared, teacher, tmp_path / "p", tmp_path / "e")
    ids = np.stack([s["parts"] for s in iter_samples(shard_paths(tmp_path / "e", "val", PARTS_FORMAT))])
    assert ids.shape == (20, 4, 4) and ids.max() < 3


def test_killed_part_learner_training_resumes_to_the_same_parts(stages, tmp_path):

    from conftest import run_semmae, sigkill_after_first_checkpoint, write_params

    write_params(tmp_path / "params.yaml", parts={**PARTS, "epochs": 20})

    def run(name: str, wait: bool = True):
        return run_semmae(tmp_path, "train_parts", "--prepared", "prepared", "--teacher", "teacher", "--features",
                          "features", "--out", f"{name}/out", "--metrics", f"{name}/m.json", "--curves", f"{name}/c.tsv",
                          "--figure", f"{name}/f.png", "--resume", f"{name}/resume", wait=wait)  # fmt: skip

    run("unbroken")
    proc = run("broken", wait=False)
    last = tmp_path / "broken" / "resume" / "method" / "last.pth"
    sigkill_after_first_checkpoint(proc, last, tmp_path / "broken" / "out")
    run("broken")
    for rel in (f"out/{PARTS_CHECKPOINT}", "m.json", "c.tsv"):
        assert (tmp_path / "broken" / rel).read_bytes() == (tmp_path / "unbroken" / rel).read_bytes(), rel
    assert not any((tmp_path / "broken" / "resume").rglob("*.pth"))
