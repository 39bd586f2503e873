"""MAE pretraining: model contract, joint augmentation, loader, the stage, resume and DDP."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from conftest import PART_COLOURS, make_part_shards, sigkill_after_first_checkpoint, write_params
from rename_audit import audit_env, renames_onto
from pipeline.config import ConfigError, PretrainConfig, load_pretrain_config
from pipeline.data.shards import ShardFormatError, shard_paths
from pipeline.mae.data import joint_crop, make_loader, sample_crop
from pipeline.mae.decode import decode_crop
from pipeline.mae.masking import random_masking, semantic_masking
from pipeline.mae.model import MaskedAutoencoder
from pipeline.mae.train import alpha_at, lr_at

TINY = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 16,
        "decoder_depth": 1, "decoder_num_heads": 2}  # fmt: skip
RUN = {**TINY, "epochs": 3, "batch_size": 16, "steps_per_epoch": 3, "warmup_epochs": 0.5, "base_lr": 1e-3,
       "shuffle_buffer": 32, "num_figure_images": 3}  # fmt: skip
BIN = Path(sys.executable).parent


def tiny_model(**kw) -> MaskedAutoencoder:
    torch.manual_seed(0)
    args = {k: v for k, v in TINY.items()}
    args.update(kw)
    return MaskedAutoencoder(**args)


def test_loss_counts_masked_patches_only():
    model = tiny_model()
    x = torch.randn(4, 3, 16, 16)
    m = random_masking(4, 16, 0.75, torch.Generator().manual_seed(0))
    _, pred = model(x, m)
    base = model.forward_loss(x, pred, m.mask)
    visible = (m.mask == 0).unsqueeze(-1)
    assert torch.equal(model.forward_loss(x, pred + 5.0 * visible, m.mask), base)
    assert model.forward_loss(x, pred + 5.0 * ~visible, m.mask) > base + 1


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    model = tiny_model()
    x = torch.randn(8, 3, 16, 16)
    parts = torch.randint(0, 4, (8, 16), generator=torch.Generator().manual_seed(1))
    m = semantic_masking(parts, 0.75, 0.5, 4, torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = None
    for _ in range(30):
        loss, _ = model(x, m)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_exported_encoder_loads_into_timm_without_remapping():
    model = tiny_model().eval()
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=4,
                            embed_dim=32, depth=2, num_heads=2).eval()  # fmt: skip
    vit.load_state_dict(model.encoder_state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    everything = random_masking(2, 16, 0.0, torch.Generator().manual_seed(0))  # keeps all 16 patches, shuffled
    ours = model.forward_encoder(x, everything)
    theirs = vit.forward_features(x)
    torch.testing.assert_close(ours[:, 0], theirs[:, 0], atol=1e-5, rtol=1e-5)
    unshuffled = torch.gather(ours[:, 1:], 1, everything.ids_restore.unsqueeze(-1).expand(-1, -1, 32))
    torch.testing.assert_close(unshuffled, theirs[:, 1:], atol=1e-5, rtol=1e-5)
    # the encoder's fixed sin-cos position embedding is not trained
    assert not model.encoder.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


def test_joint_crop_keeps_the_part_map_on_the_image():
    """Images painted by their part map: after any crop and flip, every output patch centre has its part's colour."""
    rng = np.random.default_rng(0)
    for trial in range(50):
        g = 8
        parts = rng.integers(0, 6, (g, g)).astype(np.uint8)
        img = Image.fromarray(PART_COLOURS[parts].repeat(8, 0).repeat(8, 1))  # 64 x 64, 8-px cells
        crop = sample_crop(64, (0.2, 1.0), (0.75, 4 / 3), rng)
        flip = bool(trial % 2)
        out, ids = joint_crop(img, parts, 64, 8, crop, flip)  # output cells of 8 px: centre pixel (3..4, 3..4)
        top, left, h, w = crop
        for r in range(8):
            for c in range(8):
                cy, cx = top + (r + 0.5) * h / 8, left + ((7 - c if flip else c) + 0.5) * w / 8
                if min(cy % 8, 8 - cy % 8, cx % 8, 8 - cx % 8) < 1.0:
                    continue  # the centre lies on a cell border: the bicubic pixel blends two colours
                pixel = out[:, int(r * 8 + 4), int(c * 8 + 4)]
                assert np.abs(pixel.astype(int) - PART_COLOURS[ids[r, c]].astype(int)).max() < 60, (trial, r, c)


def test_loader_yields_a_fixed_number_of_batches_seeded_by_epoch_whatever_the_workers(part_shards):
    shards = shard_paths(part_shards, "train", "semmae-parts/1")

    def epoch(e, workers=0, streams=2, batch=8):
        dl = make_loader(shards, 4, 16, 4, batch, 5, e, 0, (0.2, 1.0), (0.75, 4 / 3), 0.5, 16, workers, streams, 40)
        return [tuple(t.clone() for t in item) for item in dl]

    a, b, c = epoch(0), epoch(0), epoch(1)
    assert len(a) == 5 and all(x.shape == (8, 3, 16, 16) and p.shape == (8, 4, 4) and n.shape == (8, 40)
                               for x, p, _, n in a)  # fmt: skip
    assert all(all(torch.equal(u, v) for u, v in zip(i, j)) for i, j in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    # the same two streams served by two worker processes: the very same batches, crops and noise
    two = epoch(0, workers=2)
    assert all(all(torch.equal(u, v) for u, v in zip(i, j)) for i, j in zip(a, two))
    # half-size micro-batches (accumulation, or two ranks) are the same samples, split differently
    halves = epoch(0, batch=4)
    assert torch.equal(halves[0][0][:2], a[0][0][:2]) and torch.equal(halves[0][0][2:], a[0][0][4:6])
    with pytest.raises(ShardFormatError, match="4 train shards cannot feed 5 loader streams"):
        epoch(0, streams=5, batch=5)
    with pytest.raises(ShardFormatError, match="loader_streams=3 must be a multiple of 1 rank"):
        epoch(0, workers=2, streams=3)
    with pytest.raises(ShardFormatError, match="cannot be split over its 2 loader streams"):
        epoch(0, batch=7)


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_device_decode_gives_the_cpu_paths_crops_flips_part_maps_and_noise(tmp_path, fmt):
    """decode: device (here the CPU stands in for the GPU: torchvision's decode_jpeg + torch resize)."""
    shards = shard_paths(make_part_shards(tmp_path / fmt, fmt=fmt), "train", "semmae-parts/1")

    def epoch(decode, scale=(0.2, 1.0), ratio=(0.75, 4 / 3), workers=0):
        dl = make_loader(shards, 4, 16, 4, 8, 3, 0, 0, scale, ratio, 0.5, 16, workers, 2, 40, decode)
        return [(decode_crop(x, 16, torch.device("cpu")) if decode == "device" else x, p, y, n) for x, p, y, n in dl]

    cpu, dev, dev_workers = epoch("cpu"), epoch("device"), epoch("device", workers=2)
    for (x1, p1, y1, n1), (x2, p2, y2, n2), item in zip(cpu, dev, dev_workers):
        assert all(torch.equal(a, b) for a, b in zip((x2, p2, y2, n2), item))  # through worker processes too
        assert torch.equal(p1, p2) and torch.equal(y1, y2) and torch.equal(n1, n2)
        assert x2.shape == x1.shape and x2.dtype == torch.uint8
        # resampling differs in detail (whole-pixel crop box, torch's bicubic), not in content
        assert (x1.float() - x2.float()).abs().mean() < 12
    # a crop of the whole image at its own size: both paths are the identity, up to rounding
    whole_cpu, whole_dev = epoch("cpu", (1.0, 1.0), (1.0, 1.0)), epoch("device", (1.0, 1.0), (1.0, 1.0))
    for (x1, *_), (x2, *_) in zip(whole_cpu, whole_dev):
        assert (x1.int() - x2.int()).abs().max() <= 1


def test_schedules_and_lr():
    cfg = PretrainConfig(epochs=10, warmup_epochs=1, base_lr=1e-3, batch_size=512, min_lr=0.0)
    assert lr_at(cfg, 0, 100) == 0.0
    assert lr_at(cfg, 100, 100) == pytest.approx(2e-3)  # peak = base * 512 / 256 after warm-up
    assert lr_at(cfg, 550, 100) == pytest.approx(1e-3)  # half-way through the cosine
    assert alpha_at(cfg, 500, 100) == pytest.approx(0.25)  # (t/T)^2 per iteration
    per_epoch = PretrainConfig(epochs=10, curriculum_unit="epoch")
    assert alpha_at(per_epoch, 450, 100) == pytest.approx(0.25)  # ((4 + 1) / 10)^2
    assert alpha_at(PretrainConfig(masking="random"), 450, 100) == 0.0


def test_variant_config_merges_common_and_names_bad_keys(tmp_path):
    params = write_params(tmp_path / "p.yaml", pretrain={
        "seeds": [0, 1], "common": {"epochs": 3, "gamma": 2.0},
        "variants": {"semantic": {"masking": "semantic", "gamma": 1.0}, "random": {"masking": "random"}}})  # fmt: skip
    cfg = load_pretrain_config(params, "semantic", 1)
    assert (cfg.epochs, cfg.gamma, cfg.seed, cfg.masking) == (3, 1.0, 1, "semantic")
    assert load_pretrain_config(params, "random", 0).gamma == 2.0
    with pytest.raises(ConfigError, match="no variant 'pretrain.variants.fixed'"):
        load_pretrain_config(params, "fixed", 0)
    write_params(params, pretrain={"common": {"epochs": 3}, "variants": {"semantic": {"gama": 1.0}}})
    with pytest.raises(ConfigError, match=r"unknown key 'pretrain.variants.semantic.gama'"):
        load_pretrain_config(params, "semantic", 0)
    write_params(params, pretrain={"common": {"mask_ratio": 1.5}, "variants": {"semantic": {}}})
    with pytest.raises(ConfigError, match=r"'pretrain.common.mask_ratio' = 1.5 is invalid"):
        load_pretrain_config(params, "semantic", 0)


def run_stage(tmp_path: Path, part_shards: Path, name: str, variant: str = "semantic", torchrun: int = 0,
              wait: bool = True, env: dict | None = None, **overrides):  # fmt: skip
    write_params(tmp_path / "params.yaml", pretrain={"seeds": [0], "common": {**RUN, **overrides},
                 "variants": {"semantic": {"masking": "semantic"}, "random": {"masking": "random"}}})  # fmt: skip
    args = ["semmae", "pretrain", "--params", "params.yaml", "--variant", variant, "--seed", "0",
            "--part-shards", str(part_shards), "--out", f"{name}/out", "--resume", f"{name}/resume",
            "--metrics", f"{name}/m.json", "--curves", f"{name}/c.tsv"]  # fmt: skip
    if torchrun:
        args = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={torchrun}", "--no-python", *args]
    else:
        args[0] = str(BIN / "semmae")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
           **(env or {})}  # fmt: skip
    if not wait:
        return subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    res = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_stage_writes_timm_encoder_and_curves(tmp_path, part_shards):
    run_stage(tmp_path, part_shards, "a")
    out = tmp_path / "a"
    assert sorted(p.name for p in (out / "out").iterdir()) == ["config.json", "encoder.pth", "mae.pth", "meta.json", "timm"]
    sd = torch.load(out / "out" / "encoder.pth", weights_only=True)["state_dict"]
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=16, patch_size=4, embed_dim=32, depth=2,
                            num_heads=2)  # fmt: skip
    vit.load_state_dict(sd, strict=True)
    rows = (out / "c.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["step", "alpha", "epoch", "loss", "lr"] and len(rows) == 1 + 9
    alphas = [float(r.split("\t")[1]) for r in rows[1:]]
    assert alphas == sorted(alphas) and alphas[0] == 0 and alphas[-1] > 0.7  # the curriculum moves to whole parts
    metrics = json.loads((out / "m.json").read_text())
    assert metrics["steps"] == 9 and metrics["resumed_from_epoch"] == 0 and np.isfinite(metrics["final_loss"])


def kill_after_first_checkpoint(tmp_path: Path, part_shards: Path, name: str, **overrides) -> None:
    proc = run_stage(tmp_path, part_shards, name, wait=False, **overrides)
    sigkill_after_first_checkpoint(proc, tmp_path / name / "resume" / "last.pth", tmp_path / name / "out")


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights_as_an_unbroken_run(tmp_path, part_shards):
    run_stage(tmp_path, part_shards, "unbroken", steps_per_epoch=6)
    kill_after_first_checkpoint(tmp_path, part_shards, "broken", steps_per_epoch=6)
    run_stage(tmp_path, part_shards, "broken", steps_per_epoch=6)
    assert json.loads((tmp_path / "broken" / "m.json").read_text())["resumed_from_epoch"] >= 1
    for name in ("encoder.pth", "mae.pth", "meta.json", "config.json", "timm/config.json", "timm/model.safetensors"):  # the whole output, byte for byte
        assert (tmp_path / "broken" / "out" / name).read_bytes() == (tmp_path / "unbroken" / "out" / name).read_bytes()
    assert (tmp_path / "broken" / "c.tsv").read_text() == (tmp_path / "unbroken" / "c.tsv").read_text()
    assert not any((tmp_path / "broken" / "resume").iterdir())  # a finished run leaves nothing to resume


@pytest.mark.slow
def test_changed_params_do_not_resume_a_stale_run(tmp_path, part_shards):
    kill_after_first_checkpoint(tmp_path, part_shards, "r", steps_per_epoch=6)
    run_stage(tmp_path, part_shards, "r", steps_per_epoch=6, base_lr=2e-3)
    assert json.loads((tmp_path / "r" / "m.json").read_text())["resumed_from_epoch"] == 0


def test_train_shards_stream_from_a_url_template_and_decode_on_the_device(tmp_path, part_shards):
    """shards_url: the directory holds only index.json; the shards come through a WebDataset pipe: URL.
    decode: device, with 2 loader workers (the CPU stands in for the GPU)."""
    index_only = tmp_path / "index_only"
    index_only.mkdir()
    shutil.copy(part_shards / "index.json", index_only / "index.json")
    run_stage(tmp_path, index_only, "url", epochs=1, shards_url=f"pipe:cat {part_shards}/{{path}}", decode="device",
              num_workers=2, loader_streams=2)  # fmt: skip
    assert json.loads((tmp_path / "url" / "m.json").read_text())["steps"] == 3


def test_shard_names_from_the_index_never_reach_a_path_or_shell_unchecked(tmp_path, part_shards):
    index = json.loads((part_shards / "index.json").read_text())
    index["splits"]["train"]["shards"][0]["file"] = "x.tar; touch pwned"
    (part_shards / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardFormatError, match=r"shard name 'x.tar; touch pwned' in split 'train' is not of the form"):
        shard_paths(part_shards, "train", "semmae-parts/1", url="pipe:cat /tmp/{path}")


def test_bad_shards_fail_before_training(tmp_path, part_shards):
    write_params(tmp_path / "params.yaml", pretrain={"common": {**RUN, "img_size": 32}, "variants": {"semantic": {}}})
    res = subprocess.run([str(BIN / "semmae"), "pretrain", "--params", "params.yaml", "--variant", "semantic",
                          "--part-shards", str(part_shards), "--out", "o", "--resume", "r", "--metrics", "m.json",
                          "--curves", "c.tsv"], cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 2
    assert "part maps are 4x4 but the MAE grid is img_size/patch_size = 32/4 = 8" in res.stderr
    assert not (tmp_path / "o").exists()


def curve(path: Path) -> np.ndarray:
    rows = [r.split("\t") for r in path.read_text().splitlines()]
    return np.array([[float(v) for v in r] for r in rows[1:]])[:, rows[0].index("loss")]


@pytest.mark.slow
def test_two_processes_follow_the_one_process_loss_curve(tmp_path, part_shards):
    """Same global batch (16) on 1 process, on 2 processes (torchrun, gloo), and on 1 process with 2
    accumulation steps: with a fixed loader_streams, the same samples, crops and masks, so the same run."""
    same = {"epochs": 2, "loader_streams": 2}
    run_stage(tmp_path, part_shards, "one", **same)
    audit, renames = audit_env(tmp_path)  # records which rank renamed what (atomic writes end in a rename)
    ddp = run_stage(tmp_path, part_shards, "ddp", torchrun=2, env=audit, **same)
    run_stage(tmp_path, part_shards, "accum", accum_steps=2, **same)
    one = curve(tmp_path / "one" / "c.tsv")
    assert len(one) == 6 and np.isfinite(one).all()
    encoders = {}
    for name in ("one", "ddp", "accum"):
        np.testing.assert_allclose(curve(tmp_path / name / "c.tsv"), one, rtol=1e-5, err_msg=name)
        assert json.loads((tmp_path / name / "m.json").read_text())["steps"] == 6
        encoders[name] = torch.load(tmp_path / name / "out" / "encoder.pth", weights_only=True)["state_dict"]
    for name in ("ddp", "accum"):
        for key, value in encoders["one"].items():
            torch.testing.assert_close(encoders[name][key], value, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
    # rank 0 alone wrote the outputs, once each (and logged so once), and left no temporary
    assert renames_onto(renames, "ddp/out", "ddp/m.json") == [("0", "ddp/m.json"), ("0", "ddp/out")]
    assert ddp.stderr.count("semmae.pretrain: done: ") == 1, ddp.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["c.tsv", "m.json", "out", "resume"]
    assert [str(p) for pattern in (".*.tmp-*", ".*.old-*") for p in (tmp_path / "ddp").rglob(pattern)] == []
