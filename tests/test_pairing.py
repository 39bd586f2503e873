"""Seed pairing: the runs of two variants with the same seed start from the same weights and see the same
batches (images, crops, flips, labels, part maps, masking noise), so the report may compare them seed by
seed; another seed differs in both."""

from pathlib import Path

import torch

from conftest import write_params
from pipeline.config import load_pretrain_config
from pipeline.mae.train import _epoch_loader, _set_up

TINY = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 16,
        "decoder_depth": 1, "decoder_num_heads": 2, "epochs": 2, "batch_size": 8, "steps_per_epoch": 2,
        "warmup_epochs": 0.5, "shuffle_buffer": 16, "loader_streams": 2}  # fmt: skip


def start_of_run(tmp_path: Path, part_shards: Path, variant: str, seed: int) -> tuple[dict, list]:
    """The weights a pretrain run starts from and the first batches of its first two epochs, built as
    ``pretrain`` builds them (its set-up and epoch loader)."""
    params = write_params(tmp_path / "params.yaml", pretrain={"seeds": [0, 1], "common": TINY,
                          "variants": {"semantic": {"masking": "semantic"}, "random": {"masking": "random"}}})  # fmt: skip
    cfg = load_pretrain_config(params, variant, seed)
    run = _set_up(cfg, part_shards, tmp_path / f"{variant}-{seed}" / "out", tmp_path / f"{variant}-{seed}" / "resume")
    weights = {k: v.clone() for k, v in run.model.state_dict().items()}
    batches = [tuple(t.clone() for t in batch) for epoch in (0, 1) for batch in _epoch_loader(run, epoch)]
    return weights, batches


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(all(torch.equal(u, v) for u, v in zip(x, y)) for x, y in zip(a, b))


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
