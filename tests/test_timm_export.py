"""The timm export of an encoder: ``timm.create_model("local-dir:<dir>")`` rebuilds it with its weights
(strictly, same features), and timm resolves the preprocessing it was trained with, not the arch name's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from pipeline.data.images import IMAGENET_MEAN, IMAGENET_STD, normalize, to_square
from pipeline.mae.model import MaskedAutoencoder
from pipeline.models.checkpoint import CheckpointError, build_vit, save_timm_export

ARCH = "vit_tiny_patch16_224"
SHAPE = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture
def encoder():
    """The MAE encoder as pretrain trains it (a headless timm ViT), with every weight made non-trivial."""
    torch.manual_seed(0)
    enc = MaskedAutoencoder(ARCH, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, **SHAPE).encoder
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return enc.eval()


@pytest.mark.parametrize("stats", [(IMAGENET_MEAN, IMAGENET_STD), ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))])
def test_local_dir_export_rebuilds_the_encoder_and_its_transform(tmp_path, encoder, stats):
    mean, std = stats
    save_timm_export(encoder, tmp_path / "timm", ARCH, SHAPE, mean=mean, std=std)
    assert sorted(p.name for p in (tmp_path / "timm").iterdir()) == ["config.json", "model.safetensors"]
    m = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()  # timm loads strictly
    assert type(m) is type(encoder) and m.num_classes == 0
    assert m.state_dict().keys() == encoder.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), encoder.state_dict().values()))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m.forward_features(x), encoder.forward_features(x)) and torch.equal(m(x), encoder(x))
    cfg = resolve_data_config({}, model=m)
    assert tuple(cfg["mean"]) == tuple(mean) and tuple(cfg["std"]) == tuple(std)
    assert cfg["input_size"] == (3, 32, 32) and cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 1.0
    # timm's eval transform is the pipeline's own preprocessing (resize the shorter side, centre crop, normalise)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    pixels = torch.tensor(to_square(img, 32)).float() / 255
    ours = (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    if mean == IMAGENET_MEAN:
        assert torch.allclose(ours, normalize(pixels[None])[0], atol=1e-6)
    assert torch.allclose(create_transform(**cfg)(img), ours, atol=1e-5)


def test_dynamic_size_encoders_and_their_config_are_exported(tmp_path):
    torch.manual_seed(1)
    vit = build_vit(ARCH, 32, patch_size=4, depth=2, num_heads=2, embed_dim=32).eval()  # the teacher's kind
    save_timm_export(vit, tmp_path / "t", ARCH, SHAPE)
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["architecture"] == ARCH and config["num_classes"] == 0
    assert config["model_args"] == {**SHAPE, "num_classes": 0, "global_pool": "token", "dynamic_img_size": True}
    m = timm.create_model(f"local-dir:{tmp_path / 't'}", pretrained=True).eval()
    x = torch.randn(1, 3, 48, 48)  # another resolution, as the source model takes
    with torch.no_grad():
        assert torch.equal(m.forward_features(x), vit.forward_features(x))
    assert tuple(resolve_data_config({}, model=m)["input_size"]) == (3, 32, 32)


def test_export_bytes_are_deterministic_sorted_and_replace_atomically(tmp_path, encoder):
    save_timm_export(encoder, tmp_path / "a", ARCH, SHAPE)
    save_timm_export(encoder, tmp_path / "b", ARCH, SHAPE)
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    text = (tmp_path / "a" / "config.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    with pytest.raises(CheckpointError):  # a refused export leaves the previous one as it was
        save_timm_export(encoder, tmp_path / "a", ARCH, {**SHAPE, "depth": 3})
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary left behind


def test_wrong_model_args_and_bad_inputs_are_refused_by_name(tmp_path, encoder):
    out = tmp_path / "x"
    with pytest.raises(CheckpointError, match=r"does not fit the model \(blocks\.2\..*pass the model_args"):
        save_timm_export(encoder, out, ARCH, {**SHAPE, "depth": 3})
    with pytest.raises(CheckpointError, match=r"pos_embed: model \(1, 65, 32\) vs timm \(1, 3137, 32\)"):
        save_timm_export(encoder, out, ARCH, {k: v for k, v in SHAPE.items() if k != "img_size"})
    with pytest.raises(CheckpointError, match=r"cannot build 'no_such_vit'"):
        save_timm_export(encoder, out, "no_such_vit", SHAPE)
    with pytest.raises(CheckpointError, match=r"model_args global_pool='avg' but the model has 'token'"):
        save_timm_export(encoder, out, ARCH, {**SHAPE, "global_pool": "avg"})
    with pytest.raises(CheckpointError, match=r"std=\(0\.2, 0\.0, 0\.2\) must be three finite numbers above 0"):
        save_timm_export(encoder, out, ARCH, SHAPE, std=(0.2, 0.0, 0.2))
    with pytest.raises(CheckpointError, match=r"10-class head"):
        save_timm_export(timm.create_model(ARCH, num_classes=10, **SHAPE), out, ARCH, SHAPE)
    assert not out.exists()
