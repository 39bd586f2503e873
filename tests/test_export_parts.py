"""`train_parts` + `export_parts` end to end on tiny data: schema, ids, determinism, errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shipped_teacher_dir, write_idx
from pipeline.config import ExportPartsConfig, ExtractConfig, PartsConfig, PrepareConfig, TeacherConfig, resolved_config
from pipeline.data.images import normalize, to_square
from pipeline.data.prepare import prepare_dataset
from pipeline.data.shards import decode_image, iter_raw_samples, iter_samples, shard_paths
from pipeline.features import FeatureError, extract_features, load_features
from pipeline.models.checkpoint import build_vit, save_backbone
from pipeline.parts.build import PARTS_CHECKPOINT, build_parts, load_part_learner
from pipeline.parts.export import PARTS_FORMAT, export_parts
from pipeline.parts.metrics import kmeans
from pipeline.parts.train import part_ids

TINY = dict(arch="vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, embed_dim=32, num_heads=2)
PARTS = dict(num_parts=3, epochs=1, batch_size=16, decoder_channels=8, style_dim=8, temperature=0.1)


def make_teacher(path: Path, seed: int, **overrides) -> Path:
    """A random tiny ViT (``TINY`` with ``overrides``) saved as a teacher directory."""
    arch = {**TINY, **overrides}
    path.mkdir()
    torch.manual_seed(seed)
    save_backbone(build_vit(**arch), path / "checkpoint_teacher.pth")
    (path / "config.json").write_bytes(resolved_config(TeacherConfig.model_validate(arch), "teacher"))
    return path


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """prepare -> teacher -> extract -> train_parts (with references), built once for this module's tests,
    which only read it (each writes into its own tmp_path)."""
    tmp = tmp_path_factory.mktemp("stages")
    root = tmp / "fmnist"  # conftest's fake_fmnist (function-scoped), written once here
    root.mkdir()
    rng = np.random.default_rng(123)
    for stem, n in (("train", 300), ("t10k", 120)):
        labels = np.arange(n, dtype=np.uint8) % 10
        write_idx(root / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))
        rng.shuffle(labels)
        write_idx(root / f"{stem}-labels-idx1-ubyte.gz", labels)
    prepared = tmp / "prepared"
    prepare_dataset(PrepareConfig(root=str(root), train_limit=60, val_limit=20, holdout_size=50, shard_size=25, num_workers=0), prepared)
    teacher = make_teacher(tmp / "teacher", 0)
    extract_features(ExtractConfig(batch_size=8), prepared, teacher, tmp / "features")
    metrics = build_parts(PartsConfig(**PARTS), prepared, teacher, tmp / "features", tmp / "parts",
                          figure_path=tmp / "fig.png")  # fmt: skip
    return prepared, teacher, tmp / "features", tmp / "parts", metrics


def split_images(prepared: Path, split: str, size: int = 16) -> tuple[list[str], torch.Tensor]:
    """Keys and normalised images ``[N, 3, S, S]`` of a prepared split, in shard order."""
    samples = list(iter_samples(shard_paths(prepared, split)))
    x = torch.from_numpy(np.stack([to_square(decode_image(s["image"]), size) for s in samples])).float() / 255
    return [s["__key__"] for s in samples], normalize(x)


def head_attention(vit, x: torch.Tensor) -> torch.Tensor:
    """Last-block CLS-to-patch attention ``[B, heads, L]`` as timm itself computes it (captured from its
    unfused attention), independent of pipeline.parts.metrics.cls_attention."""
    attn = vit.blocks[-1].attn
    fused, attn.fused_attn = attn.fused_attn, False
    captured = []
    hook = attn.attn_drop.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with torch.no_grad():
            vit.forward_features(x)
    finally:
        hook.remove()
        attn.fused_attn = fused
    return captured[0][:, :, 0, vit.num_prefix_tokens :]


def exported_ids(out: Path, split: str) -> dict[str, np.ndarray]:
    return {s["__key__"]: s["parts"] for s in iter_samples(shard_paths(out, split, PARTS_FORMAT))}


def numpy_stats(ids: np.ndarray, num_parts: int) -> dict[str, float]:
    """Shares and 4-neighbour coherence of ``ids [B, H, W]``, recomputed in plain numpy."""
    shares = np.bincount(ids.ravel(), minlength=num_parts) / ids.size
    same = np.concatenate([(ids[:, :, 1:] == ids[:, :, :-1]).ravel(), (ids[:, 1:] == ids[:, :-1]).ravel()])
    return {"min_share": shares.min(), "max_share": shares.max(), "coherence": same.mean()}


def digest(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def test_train_parts_reports_method_and_references_and_draws_the_figure(stages, tmp_path):
    prepared, teacher, features, parts, metrics = stages
    stats = metrics["random_teacher"]  # its learner is not saved: ranges only
    assert 0 <= stats["min_share"] <= stats["max_share"] <= 1 and 0 <= stats["coherence_shuffled"] <= 1
    assert metrics["num_parts"] == 3 and metrics["val_recon_l1"] > 0
    # the other token form is reported too; without ground-truth masks (Fashion-MNIST) no part IoU is
    assert "parts_channel_grouping" in metrics and "patch_grid_oracle" not in metrics
    assert not any("part_iou" in v for v in metrics.values() if isinstance(v, dict))
    model, meta = load_part_learner(parts / PARTS_CHECKPOINT)
    assert meta["num_parts"] == 3 and meta["grid"] == [4, 4]
    # the statistics are those of the validation maps each method gives, recomputed here
    va, tr = load_features(features, "val"), load_features(features, "train")
    va_patches = torch.from_numpy(va["patches"]).float()
    with torch.no_grad():
        learned = model.part_logits(torch.from_numpy(va["cls"]).float(), va_patches).argmax(1)
    from pipeline.teacher.build import load_teacher

    vit = load_teacher(teacher)[0]
    keys, x = split_images(prepared, "val")
    assert keys == va["key"].tolist()
    heads = head_attention(vit, x).argmax(1).view(-1, 4, 4)
    centres = kmeans(torch.from_numpy(tr["patches"]).flatten(0, 1), 3, seed=0).numpy()
    nearest = (va["patches"].astype(np.float64) / np.linalg.norm(va["patches"].astype(np.float64), axis=-1, keepdims=True)
               @ centres.T).argmax(-1).reshape(-1, 4, 4)  # fmt: skip
    for name, ids, n in (("parts", learned.numpy(), 3), ("attention_heads", heads.numpy(), 2), ("kmeans", nearest, 3)):
        for key, value in numpy_stats(ids, n).items():
            assert metrics[name][key] == pytest.approx(value, abs=1e-6), (name, key)
        assert 0 <= metrics[name]["coherence_shuffled"] <= 1
    from PIL import Image

    with Image.open(parts.parent / "fig.png") as fig:
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
    from pipeline.teacher.build import load_teacher

    keys, x = split_images(prepared, "val")  # one shard of 20: the export's batch too
    expected = head_attention(load_teacher(teacher)[0], x).argmax(1).view(-1, 4, 4).numpy()
    exported = exported_ids(tmp_path / "e", "val")
    np.testing.assert_array_equal(np.stack([exported[k] for k in keys]), expected)
    assert len(np.unique(expected)) == 2  # both heads win somewhere: a constant map would not pass by chance


@pytest.mark.slow
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
    # the ids are the learner's on the tokens of the random ViT stored in its checkpoint, recomputed here
    stored = torch.load(tmp_path / "p" / PARTS_CHECKPOINT, weights_only=True)["teacher_state"]
    stored_vit = build_vit(**TINY).eval()
    stored_vit.load_state_dict(stored)
    learner, _ = load_part_learner(tmp_path / "p" / PARTS_CHECKPOINT)
    keys, x = split_images(prepared, "val")

    def ids_from(v) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(x), 8):  # the export's batches (one shard of 20 images)
                t = v.forward_features(x[i : i + 8]).half().float()
                out.append(learner.part_logits(t[:, 0], t[:, 1:]).argmax(1).numpy())
        return np.concatenate(out)

    exported = exported_ids(tmp_path / "e", "val")
    exported = np.stack([exported[k] for k in keys])
    np.testing.assert_array_equal(exported, ids_from(stored_vit))
    assert not np.array_equal(exported, ids_from(vit))  # the real teacher's tokens give other maps
    for key, value in numpy_stats(exported, 3).items():  # the stored ViT is the one the learner was trained on
        assert metrics["parts"][key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.slow
def test_killed_part_learner_training_resumes_to_the_same_parts(stages, tmp_path):

    import json
    import re

    from conftest import run_semmae, sigkill_after_first_checkpoint, write_params

    prepared, teacher, features, _, _ = stages
    write_params(tmp_path / "params.yaml", parts={**PARTS, "epochs": 20})

    def run(name: str, wait: bool = True):
        return run_semmae(tmp_path, "train_parts", "--prepared", str(prepared), "--teacher", str(teacher), "--features",
                          str(features), "--out", f"{name}/out", "--metrics", f"{name}/m.json", "--curves",
                          f"{name}/c.tsv", "--figure", f"{name}/f.png", "--resume", f"{name}/resume", wait=wait)  # fmt: skip

    run("unbroken")
    proc = run("broken", wait=False)
    last = tmp_path / "broken" / "resume" / "method" / "last.pth"
    sigkill_after_first_checkpoint(proc, last, tmp_path / "broken" / "out")
    rerun = run("broken")
    for rel in (f"out/{PARTS_CHECKPOINT}", "c.tsv"):
        assert (tmp_path / "broken" / rel).read_bytes() == (tmp_path / "unbroken" / rel).read_bytes(), rel
    assert not any((tmp_path / "broken" / "resume").rglob("*.pth"))
    # the rerun continued the killed run (a deterministic run from scratch would give the same bytes):
    # it says so, and it trained only the epochs after the checkpoint
    broken, unbroken = (json.loads((tmp_path / n / "m.json").read_text()) for n in ("broken", "unbroken"))
    start = broken["train"].pop("resumed_from_epoch")
    assert unbroken["train"].pop("resumed_from_epoch") == 0 and 1 <= start < 20
    assert broken == unbroken
    assert re.findall(r"train parts: (\d+) of 20 epochs trained in this run", rerun.stderr) == [str(20 - start)]


def test_parts_follow_objects_on_shape_images(tmp_path):
    """Bright rectangles (random, mostly non-square, off-centre) on a dark background, seen by the shipped
    teacher: with N = 2 the learned parts and the k-means reference, as exported, give the object's patches
    one id and the background's the other, at the right (row, column): a transposed, flipped or shifted map,
    or parts that ignore the image, fail."""
    from PIL import Image

    rng = np.random.default_rng(0)
    boxes = {}
    for split, n in (("train", 60), ("val", 30)):
        for i in range(n):
            (tmp_path / "src" / split / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            img = np.full((32, 32, 3), rng.integers(20, 60), np.uint8)
            h, w = int(rng.integers(3, 6)), int(rng.integers(2, 5))  # in 4-pixel patches of the 8 x 8 grid
            top, left = int(rng.integers(0, 9 - h)), int(rng.integers(0, 9 - w))
            img[4 * top : 4 * (top + h), 4 * left : 4 * (left + w)] = (rng.integers(180, 250), 100, 40)
            img = np.clip(img + rng.integers(-10, 11, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "src" / split / f"c{i % 2}" / f"{i}.png")
            box = np.zeros((8, 8), bool)
            box[top : top + h, left : left + w] = True
            boxes[f"c{i % 2}/{i}.png"] = box
    prepared = tmp_path / "prepared"
    prepare_dataset(PrepareConfig(source="imagefolder", root=str(tmp_path / "src"), val_dir="val", holdout_size=2,
                                  num_workers=0), prepared)  # fmt: skip
    teacher = shipped_teacher_dir(tmp_path / "teacher")
    extract_features(ExtractConfig(batch_size=64), prepared, teacher, tmp_path / "features")
    for method in ("learned", "kmeans"):
        cfg = PartsConfig(method=method, num_parts=2, epochs=20, batch_size=16)
        build_parts(cfg, prepared, teacher, tmp_path / "features", tmp_path / method, references=False)
        export_parts(ExportPartsConfig(batch_size=64), prepared, teacher, tmp_path / method, tmp_path / f"{method}_e")
        maps = {s["json"]["source"]: s["parts"] for s in iter_samples(shard_paths(tmp_path / f"{method}_e", "val", PARTS_FORMAT))}
        assert len(maps) == 30
        obj = np.stack([m == 1 for m in maps.values()])
        truth = np.stack([boxes[k] for k in maps])
        agree = (obj == truth).mean((1, 2))
        agree = agree if agree.mean() >= 0.5 else 1 - agree  # which of the two ids is the object's is arbitrary
        assert agree.min() >= 0.9 and agree.mean() >= 0.97, (method, np.round(agree, 2))
