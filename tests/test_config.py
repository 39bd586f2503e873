"""Stage configs: invalid params fail at load time with the key, the value and what is allowed."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, write_params

from pipeline.config import (
    ConfigError,
    ExportPartsConfig,
    ExtractConfig,
    LinprobeConfig,
    PartsConfig,
    PrepareConfig,
    PretrainConfig,
    TeacherConfig,
    load_pretrain_config,
    load_stage_config,
    resolved_config,
)


def load(tmp_path, **prepare):
    return load_stage_config(PrepareConfig, write_params(tmp_path / "params.yaml", prepare=prepare), "prepare")


def test_repository_params_load_and_match_the_embedded_default():
    cfg = load_stage_config(PrepareConfig, REPO / "params.yaml", "prepare")
    assert cfg == PrepareConfig()  # params.yaml spells out the defaults
    assert (cfg.source, cfg.train_limit, cfg.val_limit) == ("fashion_mnist", 5000, 1000)


@pytest.mark.parametrize(
    ("model", "section"),
    [(TeacherConfig, "teacher"), (ExtractConfig, "extract"), (PartsConfig, "parts"), (ExportPartsConfig, "export_parts"),
     (LinprobeConfig, "linprobe")],
)
def test_every_repository_section_loads_and_spells_out_the_defaults(model, section):
    assert load_stage_config(model, REPO / "params.yaml", section) == model()


def test_repository_pretrain_variants_differ_only_in_masking():
    runs = {v: load_pretrain_config(REPO / "params.yaml", v, 0).model_dump() for v in ("semantic", "random")}
    assert (runs["semantic"]["masking"], runs["random"]["masking"]) == ("semantic", "random")
    assert {k for k in runs["semantic"] if runs["semantic"][k] != runs["random"][k]} == {"masking"}


def test_nested_unknown_key_lists_the_nested_keys(tmp_path):
    params = write_params(tmp_path / "params.yaml", teacher={"train": {"epochz": 3}})
    with pytest.raises(ConfigError, match=r"unknown key 'teacher.train.epochz'.*allowed keys: base_lr, batch_size"):
        load_stage_config(TeacherConfig, params, "teacher")


def test_valid_values_are_accepted(tmp_path):
    cfg = load(tmp_path, source="imagefolder", root="/data/in", val_dir="val", train_limit=None, resize=64)
    assert cfg.source == "imagefolder" and cfg.val_dir == "val" and cfg.train_limit is None and cfg.resize == 64


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("shard_size", 0, "greater than 0"),
        ("shard_size", "100", "valid integer"),
        ("train_limit", 2.5, "valid integer"),
        ("val_fraction", 1.5, "less than 1"),
        ("source", "cifar", "'fashion_mnist', 'imagefolder' or 'synthetic_parts'"),
        ("on_corrupt", "ignore", "'fail' or 'skip'"),
        ("jpeg_quality", 101, "less than or equal to 100"),
        ("seed", -1, "greater than or equal to 0"),
        ("val_dir", "../elsewhere", "relative to root"),
        ("holdout_size", 0, "greater than 0"),
    ],
)
def test_invalid_value_names_key_value_and_allowed(tmp_path, key, value, expected):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, **{key: value})
    msg = str(err.value)
    assert f"prepare.{key}" in msg or key in msg
    assert repr(value) in msg
    assert expected in msg
    assert "params.yaml" in msg


def test_unknown_key_is_rejected_with_allowed_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'prepare.shardsize'.*allowed keys: .*shard_size"):
        load(tmp_path, shardsize=10)


def test_every_error_is_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, shard_size=-1, seed="x")
    assert "prepare.shard_size" in str(err.value) and "prepare.seed" in str(err.value)


def test_missing_file_bad_yaml_and_bad_section(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_stage_config(PrepareConfig, tmp_path / "nope.yaml", "prepare")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prepare: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_stage_config(PrepareConfig, bad, "prepare")
    bad.write_text("prepare: 3\n")
    with pytest.raises(ConfigError, match="section 'prepare' must be a mapping"):
        load_stage_config(PrepareConfig, bad, "prepare")


def test_resolved_config_is_complete_and_deterministic(tmp_path):
    cfg = load(tmp_path, shard_size=7)
    data = resolved_config(cfg, "prepare")
    assert data == resolved_config(load(tmp_path, shard_size=7), "prepare")
    resolved = json.loads(data)["prepare"]
    assert resolved["shard_size"] == 7 and set(resolved) == set(PrepareConfig.model_fields)


def test_holdout_and_probe_grid_keys(tmp_path):
    from pipeline.config.check import check_params

    assert PrepareConfig().holdout_size == 1000
    probe = LinprobeConfig(base_lr=[10.0, 0.1, 1.0], batch_size=512)
    assert probe.base_lrs() == [0.1, 1.0, 10.0] and probe.peak_lr(1.0) == 2.0
    assert LinprobeConfig(base_lr=4).base_lr == [4.0]  # one number is a one-candidate grid
    with pytest.raises(ValueError, match="is a grid"):
        probe.peak_lr()
    path = tmp_path / "params.yaml"
    for value, expected in (([], "at least 1 item"), ([1.0, -2.0], "every candidate must be > 0"), ("ten", "valid")):
        write_params(path, linprobe={"base_lr": value})
        with pytest.raises(ConfigError, match=f"linprobe.base_lr.*{expected}"):
            load_stage_config(LinprobeConfig, path, "linprobe")
    write_params(path, linprobe={"eval_crop_pct": 0.0})
    with pytest.raises(ConfigError, match="linprobe.eval_crop_pct"):
        load_stage_config(LinprobeConfig, path, "linprobe")
    # the hold-out comes out of Fashion-MNIST's 60k training images: 59,000 remain for train_limit: null
    write_params(path, prepare={"train_limit": None, "holdout_size": 1000}, linprobe={"batch_size": 59_001})
    assert any("'linprobe.batch_size' = 59001 exceeds the 59000 train images" in e for e in check_params(path).errors)
    write_params(path, prepare={"holdout_size": 59_991})
    assert any("'prepare.holdout_size' = 59991 leaves no training image" in e for e in check_params(path).errors)


@pytest.mark.parametrize(
    ("over", "expected"),
    [
        ({"masking": "beit"}, ["pretrain.variants.v.masking", "'semantic', 'random', 'block' or 'attention'"]),
        ({"masking": "attention", "attention_mode": "top"}, ["attention_mode", "'high', 'low' or 'hint'"]),
        ({"masking": "attention", "hint_share": 1.0}, ["hint_share", "less than 1"]),
        ({"masking": "attention", "hint_share": 0.5}, ["hint_share=0.5 reveals 24 hints", "16 visible", "lower hint_share"]),
        ({"masking": "block", "block_min_patches": 49}, ["block_min_patches=49", "48 patches masked", "lower it"]),
        ({"masking": "block", "block_min_aspect": 0.0}, ["block_min_aspect", "greater than 0"]),
        ({"masking": "block", "block_min_aspect": 1.5}, ["block_min_aspect", "less than or equal to 1"]),
    ],
)
def test_masking_strategy_keys_are_checked_naming_the_key(tmp_path, over, expected):
    """Each strategy's keys are validated when the run's config loads (8x8 grid, mask_ratio 0.75: 48 masked,
    16 visible), naming the key and what to change; the limits themselves pass."""
    params = write_params(tmp_path / "params.yaml", pretrain={"seeds": [0], "common": {}, "variants": {"v": over}})
    with pytest.raises(ConfigError) as err:
        load_pretrain_config(params, "v", 0)
    for text in expected:
        assert text in str(err.value)
    at_limit = {"block_min_patches": 48, "hint_share": 0.3, "block_min_aspect": 1.0}
    ok = {k: at_limit.get(k, v) for k, v in over.items() if k in at_limit}
    if ok:
        strategy = "block" if "block_min_patches" in ok or "block_min_aspect" in ok else "attention"
        write_params(params, pretrain={"seeds": [0], "common": {}, "variants": {"v": {"masking": strategy, **ok}}})
        cfg = load_pretrain_config(params, "v", 0)
        assert all(getattr(cfg, k) == v for k, v in ok.items())
