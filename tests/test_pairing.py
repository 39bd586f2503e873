"""Seed pairing: the runs of two variants with the same seed start from the same weights and see the same
batches (images, crops, flips, labels, part maps, masking noise), so the report may compare them seed by
seed; another seed differs in both."""

from pathlib import Path

import torch

from conftest import make_part_shards, write_params
from pipeline.config import load_pretrain_config
from pipeline.mae.train import _epoch_loader, _set_up

TINY = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 16,
        "decoder_depth": 1, "decoder_num_heads": 2, "epochs": 2, "batch_size": 8, "steps_per_epoch": 2,
        "warmup_epochs": 0.5, "shuffle_buffer": 16, "loader_streams": 2}  # fmt: skip


def start_of_run(tmp_path: Path, part_shards: Path, variant: str, seed: int) -> tuple[dict, list]:
    """The weights a pretrain run starts from and the first batches of its first two epochs, built as
    ``pretrain`` builds them (its set-up and epoch loader)."""
    variants = {name: {"masking": name} for name in ("semantic", "random", "block", "attention")}
    variants["block"]["block_min_patches"] = 4  # a 4 x 4 grid masks 12 patches
    params = write_params(tmp_path / "params.yaml", pretrain={"seeds": [0, 1], "common": TINY, "variants": variants})
    cfg = load_pretrain_config(params, variant, seed)
    run = _set_up(cfg, part_shards, tmp_path / f"{variant}-{seed}" / "out", tmp_path / f"{variant}-{seed}" / "resume")
    weights = {k: v.clone() for k, v in run.model.state_dict().items()}
    batches = [tuple(t.clone() for t in batch) for epoch in (0, 1) for batch in _epoch_loader(run, epoch)]
    return weights, batches


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_batches(a: list, b: list) -> bool:
    """The same images, part maps, labels and masking noise (a strategy's own extra element aside: the
    attention maps or block flags that only its runs load)."""
    return len(a) == len(b) and all(all(torch.equal(u, v) for u, v in zip(x[:4], y[:4])) for x, y in zip(a, b))


def test_variants_of_one_seed_share_initialisation_and_batches(tmp_path, part_shards):
    sem0 = start_of_run(tmp_path, part_shards, "semantic", 0)
    rand0 = start_of_run(tmp_path, part_shards, "random", 0)
    sem1 = start_of_run(tmp_path, part_shards, "semantic", 1)
    assert len(sem0[1]) == 4 and sem0[1][0][0].shape == (8, 3, 16, 16)  # 2 epochs x 2 batches: images [8, 3, 16, 16]
    # images (hence crops and flips), part maps, labels and the masking noise: all the same for both variants
    assert same_weights(sem0[0], rand0[0])
    assert same_batches(sem0[1], rand0[1])
    # another seed: other weights, other crops, other noise
    assert not same_weights(sem0[0], sem1[0])
    assert not any(torch.equal(sem0[1][0][i], sem1[1][0][i]) for i in (0, 3))  # images, noise


def test_every_masking_strategy_pairs_with_the_others_by_seed(tmp_path):
    """Block and attention runs draw nothing extra: the same seed gives the same weights, images, crops,
    part maps, labels and noise as the semantic and random runs (their extra batch element, the block flags
    of each sample's noise or its cropped attention map, comes on top)."""
    part_shards = make_part_shards(tmp_path / "part_shards", attention=True)
    runs = {v: start_of_run(tmp_path, part_shards, v, 0) for v in ("semantic", "block", "attention")}
    for name in ("block", "attention"):
        assert same_weights(runs["semantic"][0], runs[name][0])
        assert same_batches(runs["semantic"][1], runs[name][1])
        assert all(len(batch) == 5 for batch in runs[name][1])
    assert all(len(batch) == 4 for batch in runs["semantic"][1])
    flags = runs["block"][1][0][4]
    assert flags.dtype == torch.bool and flags.shape == (8, 16) and 0 < int(flags.sum(1).min())
    attention = runs["attention"][1][0][4]
    assert attention.dtype == torch.float32 and attention.shape == (8, 16) and bool((attention >= 0).all())
    assert bool((attention.sum(1) > 0).all())
