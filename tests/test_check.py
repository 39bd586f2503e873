"""The whole-file check (`semmae check`, run before every stage): the file's shape (known sections, no key
given twice), the pretrain section whatever its number of runs, and one failing case per cross-stage rule of
pipeline/config/check.py that no other test covers (the others: test_cli.py, test_config.py, test_finetune.py).
Pure parameter checks: nothing is trained or read but the YAML file."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, write_params

from pipeline.config import ConfigError, LinprobeConfig, PrepareConfig, load_pretrain_config, load_stage_config
from pipeline.config.base import read_params
from pipeline.config.check import check_params
from pipeline.config.pretrain import pretrain_runs


def check(tmp_path: Path, **sections):
    return check_params(write_params(tmp_path / "params.yaml", **sections))


def only(messages: list[str]) -> str:
    assert len(messages) == 1, messages
    return messages[0]


# --- teacher.patch_size: null -------------------------------------------------------------------------------


def test_teacher_patch_size_null_keeps_the_arch_patch_size(tmp_path):
    """vit_tiny_patch16_224 has 16-px patches: a 32-px teacher keeping them has a 2 x 2 grid (4 patches)."""
    teacher = {"init": "train", "arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": None}
    mae = {"common": {"img_size": 32, "patch_size": 16}, "variants": {"v": {}}}  # a 2 x 2 grid too
    rep = check(tmp_path, teacher=teacher, parts={"num_parts": 4}, export_parts={"grid": None}, pretrain=mae)
    assert rep.errors == [] and rep.warnings == []
    msg = only(check(tmp_path, teacher=teacher, parts={"num_parts": 5}).errors)
    assert "'parts.num_parts' = 5 exceeds the 2x2 patches of the teacher" in msg
    mae["common"]["patch_size"] = 8
    msg = only(check(tmp_path, teacher=teacher, export_parts={"grid": None}, pretrain=mae).errors)
    assert "= 4 differs from the teacher's grid (export_parts.grid: null) = 2" in msg
    msg = only(check(tmp_path, teacher={**teacher, "img_size": 40}).errors)
    assert "'teacher.img_size' = 40 is not a multiple of the patch size 16 of teacher.arch" in msg


# --- the pretrain section -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seeds", [0, [], [0, 0], ["a"]], ids=["int", "empty", "repeated", "text"])
def test_pretrain_seeds_must_be_a_list_of_distinct_integers(tmp_path, seeds):
    path = write_params(tmp_path / "params.yaml", pretrain={"seeds": seeds, "variants": {"v": {}}})
    msg = only(check_params(path).errors)
    assert f"'pretrain.seeds' = {seeds!r} is invalid" in msg and "e.g. [0]" in msg
    for load in (lambda: load_pretrain_config(path, "v", 0), lambda: pretrain_runs(path)):  # the stages, the report
        with pytest.raises(ConfigError, match=r"'pretrain\.seeds' = .* is invalid"):
            load()


@pytest.mark.parametrize(("seeds", "variants"), [([], {"a": {"bar": 1}}), ([0, 1], {}), ([0, 1], {"a": {"bar": 1}, "b": {}})])
def test_pretrain_common_and_variants_are_checked_whatever_the_number_of_runs(tmp_path, seeds, variants):
    rep = check(tmp_path, pretrain={"seeds": seeds, "common": {"foo": 1, "mask_ratio": 5}, "variants": variants})
    lines = [line for e in rep.errors for line in e.splitlines()]
    expected = ["unknown key 'pretrain.common.foo'", "'pretrain.common.mask_ratio' = 5 is invalid"]
    expected += ["'pretrain.seeds' = [] is invalid"] if not seeds else []
    expected += ["unknown key 'pretrain.variants.a.bar'"] if variants else []
    for fragment in expected:  # each once, though every run repeats the errors of pretrain.common
        assert sum(fragment in line for line in lines) == 1, (fragment, lines)
    assert len(lines) == len(expected), lines


# --- extract.splits -----------------------------------------------------------------------------------------


def test_extract_must_write_the_splits_train_parts_reads(tmp_path):
    for splits in (["train", "val"], ["val", "train"]):
        assert check(tmp_path, extract={"splits": splits}).errors == []
    for splits, missing in ((["train"], "val"), (["val"], "train")):
        msg = only(check(tmp_path, extract={"splits": splits}).errors)
        assert f"'extract.splits' = {splits} lacks {missing}" in msg and "[train, val]" in msg


# --- sections: unknown, missing -----------------------------------------------------------------------------


def test_an_unknown_section_is_refused_naming_the_known_ones(tmp_path):
    path = write_params(tmp_path / "params.yaml", prepare={}, linprob={"epochs": 1})
    known = "prepare, teacher, extract, parts, export_parts, pretrain, linprobe, finetune"
    for load in (lambda: check_params(path), lambda: load_stage_config(LinprobeConfig, path, "linprobe")):
        with pytest.raises(ConfigError, match=f"unknown section 'linprob' at the top level; the sections are: {known}"):
            load()


def test_every_shipped_params_file_has_only_known_sections():
    for path in (REPO / "params.yaml", *sorted((REPO / "configs").glob("*.yaml"))):
        read_params(path)  # raises on an unknown section or a repeated key


def test_a_missing_section_is_stated_once_and_takes_the_defaults(tmp_path, caplog):
    path = write_params(tmp_path / "params.yaml", prepare={"seed": 3})
    with caplog.at_level(logging.WARNING, logger="semmae.config"):
        assert load_stage_config(LinprobeConfig, path, "linprobe") == LinprobeConfig()
        assert load_stage_config(PrepareConfig, path, "prepare").seed == 3
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: no 'linprobe' section: every linprobe key takes its default"]


def test_a_stage_run_on_a_file_without_its_section_says_so_on_stderr(tmp_path):
    write_params(tmp_path / "p.yaml", prepare={"seed": 0})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([str(Path(sys.executable).parent / "semmae"), "extract", "--params", "p.yaml", "--prepared",
                          "nowhere", "--out", "f"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2  # no prepared shards
    assert "p.yaml: no 'extract' section: every extract key takes its default" in res.stderr


# --- keys given twice ---------------------------------------------------------------------------------------

SECTION_TWICE = """\
prepare:
  seed: 1
teacher:
  init: train
prepare:
  seed: 2
"""
VARIANT_TWICE = """\
pretrain:
  variants:
    semantic: {masking: semantic}
    random: {masking: random}
    semantic: {masking: random}
"""
KEY_TWICE = """\
linprobe:
  epochs: 5
  batch_size: 8
  epochs: 6
"""


@pytest.mark.parametrize(
    ("text", "key", "lines", "loads"),
    [(SECTION_TWICE, "prepare", (1, 5), [lambda p: load_stage_config(PrepareConfig, p, "prepare")]),
     (VARIANT_TWICE, "semantic", (3, 5), [lambda p: load_pretrain_config(p, "random", 0), pretrain_runs]),
     (KEY_TWICE, "epochs", (2, 4), [lambda p: load_stage_config(LinprobeConfig, p, "linprobe")]),
     ("linprobe: {epochs: 5, epochs: 6}\n", "epochs", (1, 1), [lambda p: load_stage_config(LinprobeConfig, p, "linprobe")])],
    ids=["section", "variant", "key", "one_line"],
)  # fmt: skip
def test_a_key_given_twice_is_refused_with_both_lines(tmp_path, text, key, lines, loads):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    for load in (check_params, *loads):
        with pytest.raises(ConfigError, match=f"key '{key}' is given twice in one mapping, at lines {lines[0]} and {lines[1]}"):
            load(path)


def test_overriding_a_merged_key_is_not_a_repeat(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("pretrain:\n  common: &c {epochs: 2, warmup_epochs: 1.0}\n  variants:\n    v: {<<: *c, epochs: 3}\n")
    assert load_pretrain_config(path, "v", 0).epochs == 3
    assert check_params(path).errors == []


# --- the cross-stage rules of check.py, one failing case each (and the value at the boundary passing) ----------

MAE = {"variants": {"v": {}}}  # one run, v-0


def mae(**common) -> dict:
    return {**MAE, "common": common}


RULES = {
    # rule: (the failing sections, the same sections with the boundary value, "error" or "warning", fragments)
    "holdout_below_classes": ({"prepare": {"holdout_size": 9}}, {"prepare": {"holdout_size": 10}}, "warning",
                              ["'prepare.holdout_size' = 9 is below the 10 classes"]),
    "synthetic_train_below_classes": ({"prepare": {"source": "synthetic_parts", "train_limit": 5}},
                                      {"prepare": {"source": "synthetic_parts", "train_limit": 6}}, "error",
                                      ["'prepare.train_limit' = 5 is below the 6 classes"]),
    "synthetic_pretrain_batch_above_train_images": (
        {"prepare": {"source": "synthetic_parts", "train_limit": 100}, "pretrain": mae(batch_size=101)},
        {"prepare": {"source": "synthetic_parts", "train_limit": 100}, "pretrain": mae(batch_size=100)}, "error",
        ["pretrain@v-0: batch_size=101 exceeds the 100 train images"]),
    "teacher_checkpoint_missing": ({"teacher": {"checkpoint": "nowhere/teacher.pth"}}, None, "error",
                                   ["'teacher.checkpoint' = 'nowhere/teacher.pth' does not exist", "teacher.init: train"]),
    "num_parts_above_teacher_patches": (
        {"teacher": {"init": "train", "img_size": 16, "patch_size": 4}, "parts": {"num_parts": 17}},
        {"teacher": {"init": "train", "img_size": 16, "patch_size": 4}, "parts": {"num_parts": 16}}, "error",
        ["'parts.num_parts' = 17 exceeds the 4x4 patches", "teacher.img_size / teacher.patch_size"]),
    "map_grid_null_vs_mae_grid": (
        {"teacher": {"init": "train"}, "export_parts": {"grid": None}, "pretrain": mae(img_size=32, patch_size=8)},
        {"teacher": {"init": "train"}, "export_parts": {"grid": None}, "pretrain": mae(img_size=32, patch_size=4)},
        "error", ["pretrain@v-0: the MAE grid img_size/patch_size = 32/8 = 4", "(export_parts.grid: null) = 8",
                  "set export_parts.grid: 4"]),
    "mask_ratio_leaves_no_patch": ({"pretrain": mae(img_size=8, patch_size=4, mask_ratio=0.8)},
                                   {"pretrain": mae(img_size=8, patch_size=4, mask_ratio=0.75)}, "error",
                                   ["pretrain@v-0: mask_ratio=0.8 leaves no visible patch of 4"]),
    "pretrain_batch_above_train_images": (
        {"prepare": {"train_limit": 100}, "pretrain": mae(batch_size=101)},
        {"prepare": {"train_limit": 100}, "pretrain": mae(batch_size=100)}, "error",
        ["pretrain@v-0: batch_size=101 exceeds the 100 train images", "prepare.train_limit"]),
    "loader_streams_above_shards": (
        {"prepare": {"train_limit": 100, "shard_size": 50}, "pretrain": mae(batch_size=12, loader_streams=3)},
        {"prepare": {"train_limit": 100, "shard_size": 50}, "pretrain": mae(batch_size=12, loader_streams=2)}, "error",
        ["pretrain@v-0: loader_streams=3 exceeds the 2 train shards", "prepare.shard_size 50"]),
    "micro_batch_not_a_multiple_of_streams": ({"pretrain": mae(batch_size=12, accum_steps=2, loader_streams=4)},
                                              {"pretrain": mae(batch_size=16, accum_steps=2, loader_streams=4)}, "error",
                                              ["batch_size/accum_steps = 6 is not a multiple of loader_streams=4"]),
    "teacher_batch_above_train_images": (
        {"prepare": {"train_limit": 100}, "teacher": {"init": "train", "train": {"batch_size": 101}}},
        {"prepare": {"train_limit": 100}, "teacher": {"init": "train", "train": {"batch_size": 100}}}, "error",
        ["'teacher.train.batch_size' = 101 exceeds the 100 train images"]),
    "resize_below_img_size": ({"prepare": {"resize": 31}, "pretrain": mae(img_size=32)},
                              {"prepare": {"resize": 32}, "pretrain": mae(img_size=32)}, "warning",
                              ["prepare.resize=31 is below pretrain@v-0 img_size=32"]),
    "extract_vs_export_batch": ({"extract": {"batch_size": 128}, "export_parts": {"batch_size": 256}},
                                {"extract": {"batch_size": 256}, "export_parts": {"batch_size": 256}}, "warning",
                                ["extract.batch_size=128 != export_parts.batch_size=256"]),
}  # fmt: skip


@pytest.mark.parametrize("rule", list(RULES))
def test_each_cross_stage_rule_names_its_keys(tmp_path, monkeypatch, rule):
    failing, boundary, kind, fragments = RULES[rule]
    monkeypatch.chdir(tmp_path)  # relative paths (teacher.checkpoint) resolve here, as in a stage
    rep = check(tmp_path, **failing)
    msg = only(rep.errors if kind == "error" else rep.warnings)
    assert str(tmp_path / "params.yaml") in msg
    for fragment in fragments:
        assert fragment in msg, msg
    if kind == "warning":
        assert rep.errors == []
    if boundary is None:  # the checkpoint rule: the file there
        (tmp_path / "nowhere").mkdir()
        (tmp_path / "nowhere" / "teacher.pth").write_bytes(b"")
        boundary = failing
    rep = check(tmp_path, **boundary)
    assert (rep.errors, rep.warnings) == ([], [])
