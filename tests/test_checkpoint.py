"""Official iBOT checkpoint formats: strict loading, equality with timm, refusals with clear errors."""

from __future__ import annotations

import argparse
import os
import pickle

import pytest
import torch

from pipeline.models.checkpoint import CheckpointError, build_vit, load_backbone, save_backbone

ARCH = dict(arch="vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2)


@pytest.fixture
def source():
    torch.manual_seed(0)
    return build_vit(**ARCH).eval()


def official_teacher_file(vit, path):
    torch.save({"state_dict": vit.state_dict()}, path)


def official_full_file(vit, path):
    """iBOT's training checkpoint.pth layout: teacher/student with heads, optimizer, args Namespace."""
    head = {"head.mlp.0.weight": torch.randn(8, vit.embed_dim), "head.last_layer.weight_g": torch.ones(1, 4)}
    teacher = {f"backbone.{k}": v for k, v in vit.state_dict().items()} | head
    student = {f"module.backbone.{k}": v + 1 for k, v in vit.state_dict().items()}
    student |= {f"module.{k}": v for k, v in head.items()} | {"module.backbone.masked_embed": torch.zeros(vit.embed_dim)}
    args = argparse.Namespace(arch="vit_small", patch_size=16, out_dim=8192, lr=0.0005)
    torch.save({"teacher": teacher, "student": student, "optimizer": {"state": {}, "param_groups": []},
                "epoch": 100, "args": args, "ibot_loss": {"center": torch.zeros(1, 4)}}, path)  # fmt: skip


@pytest.mark.parametrize("writer", [official_teacher_file, official_full_file])
def test_both_official_formats_give_exactly_timms_forward_features(tmp_path, source, writer):
    path = tmp_path / "ckpt.pth"
    writer(source, path)
    loaded = load_backbone(build_vit(**ARCH), path).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x), source.forward_features(x))


def test_saved_backbone_is_official_format_and_reloads(tmp_path, source):
    save_backbone(source, tmp_path / "a.pth", dtype=torch.float32)
    obj = torch.load(tmp_path / "a.pth", weights_only=True)
    assert set(obj) == {"state_dict"} and set(obj["state_dict"]) == set(source.state_dict())
    loaded = load_backbone(build_vit(**ARCH), tmp_path / "a.pth")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval().forward_features(x), source.forward_features(x))
    save_backbone(source, tmp_path / "b.pth")  # fp16 by default: half the bytes, deterministic
    save_backbone(source, tmp_path / "c.pth")
    assert (tmp_path / "b.pth").read_bytes() == (tmp_path / "c.pth").read_bytes()
    assert torch.load(tmp_path / "b.pth", weights_only=True)["state_dict"]["pos_embed"].dtype == torch.float16


def test_position_embedding_is_resampled_for_another_resolution(tmp_path, source):
    official_teacher_file(source, tmp_path / "ckpt.pth")
    bigger = load_backbone(build_vit(**{**ARCH, "img_size": 48}), tmp_path / "ckpt.pth")
    assert bigger.pos_embed.shape == (1, 1 + 12 * 12, source.embed_dim)
    assert torch.equal(bigger.pos_embed[:, 0], source.pos_embed[:, 0])  # CLS position kept
    assert bigger.forward_features(torch.randn(1, 3, 48, 48)).shape == (1, 145, source.embed_dim)


def test_wrong_architecture_names_keys_and_shapes(tmp_path, source):
    official_teacher_file(source, tmp_path / "ckpt.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys \['blocks\.1\..*teacher\.arch"):
        load_backbone(build_vit(**{**ARCH, "depth": 1}), tmp_path / "ckpt.pth")
    with pytest.raises(CheckpointError, match=r"'cls_token' has shape \(1, 1, 192\) in the file but \(1, 1, 384\)"):
        load_backbone(build_vit(**{**ARCH, "arch": "vit_small_patch16_224"}), tmp_path / "ckpt.pth")


def test_missing_key_is_named(tmp_path, source):
    sd = source.state_dict()
    del sd["norm.weight"]
    torch.save({"state_dict": sd}, tmp_path / "ckpt.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \['norm\.weight'\]"):
        load_backbone(build_vit(**ARCH), tmp_path / "ckpt.pth")


def test_backbone_only_file_mistaken_for_full_checkpoint_is_not_loaded_silently(tmp_path, source):
    torch.save({"model": source.state_dict()}, tmp_path / "ckpt.pth")
    with pytest.raises(CheckpointError, match="unknown format"):
        load_backbone(build_vit(**ARCH), tmp_path / "ckpt.pth")


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/semmae-pwned",))


def test_hostile_pickle_is_refused_without_running_it(tmp_path, source):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": source.state_dict(), "extra": _Payload()}, path, pickle_protocol=2)
    if os.path.exists("/tmp/semmae-pwned"):
        os.remove("/tmp/semmae-pwned")
    with pytest.raises(CheckpointError, match="refused"):
        load_backbone(build_vit(**ARCH), path)
    assert not os.path.exists("/tmp/semmae-pwned")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"state_dict": {}}))
    with pytest.raises(CheckpointError):
        load_backbone(build_vit(**ARCH), tmp_path / "plain.pkl")
    with pytest.raises(CheckpointError, match="not found"):
        load_backbone(build_vit(**ARCH), tmp_path / "none.pth")
