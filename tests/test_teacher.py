"""iBOT teacher: the objective's pieces, a few training steps, and the `teacher` stage end to end."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from pipeline.config import TeacherConfig, TeacherTrainConfig
from pipeline.data.augment import block_masks, random_resized_crop
from pipeline.data.prepare import prepare_dataset
from pipeline.config import PrepareConfig
from pipeline.eval.knn import knn_accuracy
from pipeline.models.checkpoint import build_vit, load_backbone
from pipeline.teacher.build import build_teacher, teacher_vit
from pipeline.teacher.ibot import IBOTHead, IBOTLoss, IBOTNetwork, ema_update, make_teacher
from pipeline.teacher.train import train_ibot

from conftest import REPO

TINY = dict(arch="vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, embed_dim=32, num_heads=2)


def test_block_masks_hit_the_requested_ratio_in_blocks():
    m = block_masks(64, (8, 8), (0.25, 0.25), np.random.default_rng(0)).view(64, 8, 8)
    assert m.shape == (64, 8, 8) and m.dtype == torch.bool
    assert (m.sum((1, 2)) == 16).all()
    # blocks, not salt-and-pepper: most masked patches have a masked 4-neighbour
    neigh = torch.zeros_like(m)
    neigh[:, 1:] |= m[:, :-1]
    neigh[:, :-1] |= m[:, 1:]
    neigh[:, :, 1:] |= m[:, :, :-1]
    neigh[:, :, :-1] |= m[:, :, 1:]
    assert (m & neigh).sum() / m.sum() > 0.8


def test_random_resized_crop_full_scale_without_flip_is_identity():
    x = torch.rand(4, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    y = random_resized_crop(x, 16, (1.0, 1.0), g, ratio=(1.0, 1.0), flip=False)
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
    assert random_resized_crop(x, 8, (0.1, 0.5), g).shape == (4, 3, 8, 8)


def test_masked_patches_get_the_mask_token_and_change_the_output():
    net = IBOTNetwork(build_vit(**TINY), IBOTHead(32, 16, 32, 8)).eval()
    x = torch.randn(2, 3, 16, 16)
    none = torch.zeros(2, 16, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(net.tokens(x, none), net.backbone.forward_features(x))
        masked = none.clone()
        masked[:, :4] = True
        assert not torch.allclose(net.tokens(x, masked), net.tokens(x, none))


def test_objective_steps_lower_the_loss_on_a_fixed_batch_and_ema_follows():
    torch.manual_seed(0)
    student = IBOTNetwork(build_vit(**TINY), IBOTHead(32, 16, 32, 8))
    teacher = make_teacher(student)
    loss_fn = IBOTLoss(16)
    views = torch.randn(2, 8, 3, 16, 16)
    masks = block_masks(16, (4, 4), (0.2, 0.4), np.random.default_rng(0))
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    t_before = [p.clone() for p in teacher.parameters()]

    def loss() -> torch.Tensor:
        g = views.flatten(0, 1)
        with torch.no_grad():
            t_cls, t_patch = teacher(g)
        s_cls, s_patch = student(g, masks)
        out = loss_fn(list(s_cls.chunk(2)), list(s_patch.chunk(2)), list(t_cls.chunk(2)), list(t_patch.chunk(2)),
                      list(masks.chunk(2)), 0.04)  # fmt: skip
        assert torch.isfinite(out["loss"]) and out["teacher_entropy"] >= 0
        return out["loss"]

    first = loss().item()
    for _ in range(15):
        opt.zero_grad()
        loss().backward()
        opt.step()
        ema_update(teacher, student, 0.9)
    assert loss().item() < first
    moved = [not torch.equal(a, b) for a, b in zip(t_before, teacher.parameters())]
    assert sum(moved) > len(moved) // 2  # the EMA teacher follows the student
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert not t.requires_grad


def test_train_ibot_runs_and_updates_the_teacher():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (48, 3, 16, 16), dtype=torch.uint8)
    vit = build_vit(**TINY)
    init = {k: v.clone() for k, v in vit.state_dict().items()}
    cfg = TeacherTrainConfig(epochs=2, batch_size=16, warmup_epochs=0, local_size=8, n_local_crops=2,
                             out_dim=16, head_hidden_dim=32, head_bottleneck_dim=8, freeze_last_layer_epochs=0)  # fmt: skip
    logged = []
    teacher, stats = train_ibot(vit, images, cfg, torch.device("cpu"), log_step=lambda s, st: logged.append((s, st)))
    assert [s for s, _ in logged] == [3, 6] and np.isfinite(stats["loss"])
    assert any(not torch.equal(init[k], v) for k, v in teacher.state_dict().items())
    with pytest.raises(ValueError, match="batch_size=64 exceeds the 48 training images"):
        train_ibot(build_vit(**TINY), images, TeacherTrainConfig(batch_size=64), torch.device("cpu"))


def test_knn_on_a_toy_set():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    val = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.2, 1.0]])
    assert knn_accuracy(train, labels, val, torch.tensor([0, 1, 1]), k=2) == 1.0
    assert knn_accuracy(train, labels, val, torch.tensor([1, 1, 1]), k=2) == pytest.approx(2 / 3)


def test_teacher_config_rejects_inconsistent_grid():
    with pytest.raises(ValueError, match="img_size=30 is not a multiple of patch_size=4"):
        TeacherConfig(img_size=30)
    with pytest.raises(ValueError, match="local_scale"):
        TeacherConfig.model_validate({"train": {"local_scale": [0.5, 0.1]}})


@pytest.fixture
def prepared(fake_fmnist, tmp_path):
    root, _ = fake_fmnist
    prepare_dataset(PrepareConfig(root=str(root), train_limit=100, val_limit=40, holdout_size=50, num_workers=0), tmp_path / "prepared")
    return tmp_path / "prepared"


def test_teacher_stage_trains_saves_official_format_and_reports_knn(prepared, tmp_path):
    cfg = TeacherConfig.model_validate({**TINY, "init": "train", "eval_batch_size": 64,
        "train": {"epochs": 1, "batch_size": 32, "local_size": 8, "out_dim": 16, "head_hidden_dim": 32,
                  "head_bottleneck_dim": 8}})  # fmt: skip
    metrics = build_teacher(cfg, prepared, tmp_path / "teacher", device=torch.device("cpu"))
    for key in ("knn_teacher", "knn_random_vit", "knn_raw_pixels"):  # random pixels: only ranges (real images below)
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["train"]["resumed_from_epoch"] == 0
    obj = torch.load(tmp_path / "teacher" / "checkpoint_teacher.pth", weights_only=True)
    assert set(obj) == {"state_dict"}
    reloaded = load_backbone(teacher_vit(cfg), tmp_path / "teacher" / "checkpoint_teacher.pth")
    assert reloaded.embed_dim == 32
    assert json.loads((tmp_path / "teacher" / "config.json").read_text())["teacher"]["init"] == "train"


def test_teacher_stage_loads_a_checkpoint_and_fails_early_on_a_bad_one(prepared, tmp_path):
    from pipeline.models.checkpoint import CheckpointError, save_backbone

    torch.manual_seed(1)
    vit = build_vit(**TINY)
    save_backbone(vit, tmp_path / "given.pth", dtype=torch.float32)
    cfg = TeacherConfig.model_validate({**TINY, "checkpoint": str(tmp_path / "given.pth"), "save_dtype": "float32"})
    metrics = build_teacher(cfg, prepared, tmp_path / "teacher", device=torch.device("cpu"))
    assert metrics["init"] == "checkpoint" and not any("sha256" in k for k in metrics)  # numbers, not hashes
    assert len(json.loads((tmp_path / "teacher" / "meta.json").read_text())["source_sha256"]) == 64
    out = torch.load(tmp_path / "teacher" / "checkpoint_teacher.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(out[k], v) for k, v in vit.state_dict().items())
    bad = TeacherConfig.model_validate({**TINY, "depth": 2, "checkpoint": str(tmp_path / "given.pth")})
    with pytest.raises(CheckpointError, match="missing keys"):
        build_teacher(bad, prepared, tmp_path / "teacher2", device=torch.device("cpu"))
    assert not (tmp_path / "teacher2").exists()


def numpy_knn(train: np.ndarray, train_y: np.ndarray, val: np.ndarray, val_y: np.ndarray, k: int = 20,
              temperature: float = 0.07) -> float:
    """A plain reimplementation of DINO's weighted cosine k-NN (the reference for knn_accuracy)."""
    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    b = val / np.linalg.norm(val, axis=1, keepdims=True)
    sim = b @ a.T
    nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(val), int(max(train_y.max(), val_y.max())) + 1))
    rows = np.arange(len(val))[:, None]
    np.add.at(votes, (rows, train_y[nearest]), np.exp(sim[rows, nearest] / temperature))
    return float((votes.argmax(1) == val_y).mean())


def test_shipped_teacher_beats_a_random_vit_on_real_images(real_fmnist, tmp_path):
    """The shipped default teacher on 300 real Fashion-MNIST training / 200 validation images: its k-NN
    accuracy is well above a random ViT's of the same shape (measured: 0.63 vs 0.375), and the stage's
    numbers equal a plain numpy k-NN on features encoded here from the checkpoint file."""
    import yaml

    from pipeline.data.images import normalize, to_square
    from pipeline.data.shards import decode_image, iter_samples, shard_paths

    prepare_dataset(PrepareConfig(root=str(real_fmnist), train_limit=300, val_limit=200, holdout_size=10,
                                  num_workers=0), tmp_path / "prepared")  # fmt: skip
    shipped = yaml.safe_load((REPO / "assets" / "teacher" / "params.yaml").read_text())["teacher"]
    ckpt = REPO / "assets" / "teacher" / "checkpoint_teacher.pth"
    cfg = TeacherConfig.model_validate({**shipped, "init": "checkpoint", "checkpoint": str(ckpt)})
    metrics = build_teacher(cfg, tmp_path / "prepared", tmp_path / "teacher", device=torch.device("cpu"))
    assert metrics["knn_images"] == {"train": 300, "val": 200}

    shape = dict(arch=cfg.arch, img_size=cfg.img_size, patch_size=cfg.patch_size, depth=cfg.depth,
                 embed_dim=cfg.embed_dim, num_heads=cfg.num_heads)  # fmt: skip
    teacher = load_backbone(build_vit(**shape), ckpt).eval()
    torch.manual_seed(cfg.train.seed + 12345)  # the stage's random reference
    random_vit = build_vit(**shape).eval()
    feats: dict = {"teacher": {}, "random_vit": {}}
    labels = {}
    for split in ("train", "val"):
        samples = list(iter_samples(shard_paths(tmp_path / "prepared", split)))
        x = torch.from_numpy(np.stack([to_square(decode_image(s["image"]), cfg.img_size) for s in samples]))
        labels[split] = np.array([s["cls"] for s in samples])
        with torch.no_grad():
            for name, vit in (("teacher", teacher), ("random_vit", random_vit)):
                feats[name][split] = vit.forward_features(normalize(x.float() / 255))[:, 0].double().numpy()
    expected = {name: numpy_knn(f["train"], labels["train"], f["val"], labels["val"], cfg.knn_k) for name, f in feats.items()}
    for name, acc in expected.items():
        assert metrics[f"knn_{name}"] == pytest.approx(acc, abs=1.01 / 200), name  # at most one tie resolved otherwise
    assert metrics["knn_margin_over_random"] == pytest.approx(expected["teacher"] - expected["random_vit"], abs=2.02 / 200)
    assert expected["teacher"] >= expected["random_vit"] + 0.10  # ~6 standard errors of 200 images below the measured gap


def run_teacher(cwd, name: str, wait: bool = True):
    from conftest import run_semmae

    return run_semmae(cwd, "teacher", "--prepared", "prepared", "--out", f"{name}/out", "--metrics", f"{name}/m.json",
                      "--curves", f"{name}/c.tsv", "--resume", f"{name}/resume", wait=wait)


@pytest.mark.slow
def test_killed_teacher_training_resumes_to_the_same_teacher(prepared, tmp_path):
    from conftest import sigkill_after_first_checkpoint, write_params

    write_params(tmp_path / "params.yaml", teacher={**TINY, "init": "train", "eval_batch_size": 64, "train": {
        "epochs": 8, "batch_size": 16, "local_size": 8, "out_dim": 16, "head_hidden_dim": 32, "head_bottleneck_dim": 8,
        "warmup_epochs": 1}})  # fmt: skip
    run_teacher(tmp_path, "unbroken")
    proc = run_teacher(tmp_path, "broken", wait=False)
    last = tmp_path / "broken" / "resume" / "last.pth"
    sigkill_after_first_checkpoint(proc, last, tmp_path / "broken" / "out")
    rerun = run_teacher(tmp_path, "broken")
    for rel in ("out/checkpoint_teacher.pth", "c.tsv"):
        assert (tmp_path / "broken" / rel).read_bytes() == (tmp_path / "unbroken" / rel).read_bytes(), rel
    assert not any((tmp_path / "broken" / "resume").iterdir())  # cleared once the teacher is written
    # the rerun continued the killed run (a deterministic run from scratch would give the same bytes):
    # it says so, and it trained only the epochs after the checkpoint
    broken, unbroken = (json.loads((tmp_path / n / "m.json").read_text()) for n in ("broken", "unbroken"))
    start = broken["train"].pop("resumed_from_epoch")
    assert unbroken["train"].pop("resumed_from_epoch") == 0 and 1 <= start < 8
    assert broken == unbroken
    trained = [int(e) for e in re.findall(r"epoch (\d+)/8 ", rerun.stderr)]
    assert trained == list(range(start + 1, 9)), rerun.stderr[-2000:]
