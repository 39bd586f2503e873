"""Every masking strategy through the real ``semmae pretrain`` stage (in-process, tiny shards with attention
maps, a few steps): the masks the model is trained with are the strategy's, seen at the model's forward."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_part_shards, write_params
from pipeline.mae.model import MaskedAutoencoder
from stages.cli import app

GRID = 8  # 32 px / patch 4: 64 patches, 48 masked at 0.75
RUN = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 16,
       "decoder_depth": 1, "decoder_num_heads": 2, "epochs": 1, "batch_size": 16, "steps_per_epoch": 3,
       "warmup_epochs": 0.5, "shuffle_buffer": 32, "crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0],
       "hflip": 0.0}  # fmt: skip
# one attention map for every image, all values distinct: with the whole image as the crop and no flip, the
# map each sample brings is this one, so attention masking's masks are known in advance
ATTENTION = (np.arange(GRID * GRID, dtype=np.float64)[::-1].reshape(GRID, GRID) + 1) ** 2
RANKED = np.argsort(-ATTENTION.reshape(-1), kind="stable")  # most attended first (exact in float16 here)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_part_shards(tmp_path_factory.mktemp("parts") / "part_shards", size=32, grid=GRID,
                            attention=ATTENTION)  # fmt: skip


@pytest.fixture
def masks_seen(monkeypatch) -> list[torch.Tensor]:
    """The mask of every MAE forward pass of the runs in the test."""
    seen: list[torch.Tensor] = []
    real = MaskedAutoencoder.forward

    def spy(self, imgs, masking):
        seen.append(masking.mask.detach().clone())
        return real(self, imgs, masking)

    monkeypatch.setattr(MaskedAutoencoder, "forward", spy)
    return seen


def pretrain(root: Path, shards: Path, **variant):
    root.mkdir(parents=True, exist_ok=True)
    write_params(root / "params.yaml", pretrain={"seeds": [0], "common": RUN, "variants": {"v": variant}})
    args = ["pretrain", "--params", "params.yaml", "--variant", "v", "--part-shards", str(shards), "--out", "out",
            "--resume", "resume", "--metrics", "m.json", "--curves", "c.tsv"]  # fmt: skip
    with contextlib.chdir(root):
        return CliRunner().invoke(app, args)


def ok(res) -> None:
    assert res.exit_code == 0, (res.stderr[-3000:], res.exception)


def adjacency(masks: torch.Tensor) -> float:
    """Mean number of masked 4-neighbour pairs per image: rectangles score far above scattered patches."""
    m = masks.view(-1, GRID, GRID)
    return float(((m[:, 1:] * m[:, :-1]).sum((1, 2)) + (m[:, :, 1:] * m[:, :, :-1]).sum((1, 2))).mean())


@pytest.mark.parametrize("mode", ["high", "low", "hint"])
def test_attention_runs_mask_by_the_stored_attention(tmp_path, shards, masks_seen, mode):
    res = pretrain(tmp_path, shards, masking="attention", attention_mode=mode)
    ok(res)
    assert json.loads((tmp_path / "m.json").read_text())["variant_masking"] == "attention"
    masks = torch.cat(masks_seen)
    assert masks.shape == (48, 64) and bool((masks.sum(1) == 48).all())
    top, bottom = np.zeros(64), np.zeros(64)
    top[RANKED[:48]], bottom[RANKED[16:]] = 1, 1
    if mode == "high":
        assert bool((masks == torch.from_numpy(top).float()).all())
    elif mode == "low":
        assert bool((masks == torch.from_numpy(bottom).float()).all())
    else:  # a pool of the int(0.1 * 64) = 6 most attended, int(0.1 * 0.75 * 64) = 4 of them revealed
        pool = masks[:, RANKED[:6]]
        assert bool((pool.sum(1) == 2).all())  # 4 revealed, 2 masked
        assert bool((masks[:, RANKED[6:52]] == 1).all()) and bool((masks[:, RANKED[52:]] == 0).all())
        assert len({tuple(row.tolist()) for row in pool}) > 1  # which hints: drawn per sample


def test_block_runs_mask_rectangles_and_random_runs_do_not(tmp_path, shards, masks_seen):
    ok(pretrain(tmp_path / "block", shards, masking="block"))
    block = torch.cat(masks_seen)
    masks_seen.clear()
    ok(pretrain(tmp_path / "random", shards, masking="random"))
    random = torch.cat(masks_seen)
    assert bool((block.sum(1) == 48).all()) and bool((random.sum(1) == 48).all())
    # 48 of 64 scattered at random: ~ 112 * (48/64) * (47/63) = 62.7 masked neighbour pairs; BEiT's blocks more
    assert adjacency(random) < 66 < 72 < adjacency(block), (adjacency(random), adjacency(block))
    alpha = (tmp_path / "block" / "c.tsv").read_text().splitlines()
    col = alpha[0].split("\t").index("alpha")
    assert all(float(r.split("\t")[col]) == 0.0 for r in alpha[1:])  # the curriculum is semantic-only


def test_an_attention_run_refuses_shards_without_attention_maps(tmp_path, masks_seen):
    old = make_part_shards(tmp_path / "old", size=32, grid=GRID)
    res = pretrain(tmp_path / "run", old, masking="attention")
    assert res.exit_code == 2 and "export_parts" in res.stderr and not masks_seen
    assert not (tmp_path / "run" / "out").exists()
