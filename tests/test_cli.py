"""The `semmae` command: help, clean errors before any output, and a full prepare run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import write_params

BIN = Path(sys.executable).parent


def semmae(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["semmae", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_help_lists_every_stage(tmp_path):
    res = semmae("--help", cwd=tmp_path)
    assert res.returncode == 0 and "dvc repro" in res.stdout
    for stage in ("prepare", "teacher", "extract", "train_parts", "export_parts"):
        assert stage in res.stdout
    res = semmae("prepare", "--help", cwd=tmp_path)
    assert res.returncode == 0 and "--params" in res.stdout and "ImageFolder" in res.stdout


def test_bad_parameter_fails_cleanly_before_any_output(tmp_path, fake_fmnist):
    root, _ = fake_fmnist
    write_params(tmp_path / "params.yaml", prepare={"root": str(root), "shard_size": 0, "holdout_size": 50})
    res = semmae("prepare", "--out", "data/prepared", "--metrics", "m.json", cwd=tmp_path)
    assert res.returncode == 2
    assert "prepare.shard_size" in res.stderr and "greater than 0" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "m.json").exists()


def test_a_cross_stage_mismatch_fails_the_first_stage_not_the_fifth(tmp_path, fake_fmnist):
    """export_parts.grid disagrees with the MAE's img_size / patch_size: `semmae prepare` already refuses
    (every stage checks the whole file), and `semmae check` says the same without running anything."""
    root, _ = fake_fmnist
    write_params(tmp_path / "params.yaml", prepare={"root": str(root)}, export_parts={"grid": 4},
                 pretrain={"common": {"img_size": 32, "patch_size": 4}, "variants": {"semantic": {}}},
                 linprobe={"batch_size": 100000})  # fmt: skip
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["prepare"]["train_limit"] = 8  # below Fashion-MNIST's 10 classes: two would never reach the probe head
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for args in (("prepare", "--out", "data/prepared", "--metrics", "m.json"), ("check",)):
        res = semmae(*args, cwd=tmp_path)
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert "pretrain@semantic-0: the MAE grid img_size/patch_size = 32/4 = 8 differs from export_parts.grid = 4" in res.stderr
        assert "'linprobe.batch_size' = 100000 exceeds the 8 train images" in res.stderr  # every problem at once
        assert "'prepare.train_limit' = 8 is below the 10 classes" in res.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "m.json").exists()


def test_missing_dataset_fails_cleanly(tmp_path):
    write_params(tmp_path / "params.yaml", prepare={"root": str(tmp_path / "none")})
    res = semmae("prepare", cwd=tmp_path)
    assert res.returncode == 2 and "dataset-fashion-mnist" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "data").exists()


def test_prepare_writes_shards_index_config_and_metrics(tmp_path, fake_fmnist):
    root, _ = fake_fmnist
    write_params(tmp_path / "p.yaml", prepare={"root": str(root), "train_limit": 50, "val_limit": 20, "holdout_size": 30,
                                               "shard_size": 20})  # fmt: skip
    res = semmae("prepare", "--params", "p.yaml", "--out", "o", "--metrics", "metrics/prepare.json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    metrics = json.loads((tmp_path / "metrics" / "prepare.json").read_text())
    assert metrics["train"] == {"num_samples": 50, "num_shards": 3, "skipped": 0}
    assert metrics["val"]["num_samples"] == 20 and metrics["num_classes"] == 10
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["config.json", "holdout", "index.json", "train", "val"]


def test_an_imagefolder_with_more_classes_than_train_images_is_refused_at_the_start(tmp_path, monkeypatch):
    """Classes vs the probe head: an imagefolder's class folders are counted (not read) when the DAG starts."""
    from pipeline.config.check import check_params

    for name in ("cat", "dog", "owl"):
        (tmp_path / "data_in" / "train" / name).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", prepare={"source": "imagefolder", "root": "data_in", "train_limit": 2,
                                                    "val_limit": 2})  # fmt: skip
    report = check_params(tmp_path / "params.yaml")
    assert any("'prepare.train_limit' = 2 is below the 3 classes" in e for e in report.errors)
    assert any("'prepare.val_limit' = 2 is below the 3 classes" in w for w in report.warnings)
    write_params(tmp_path / "params.yaml", prepare={"source": "imagefolder", "root": "data_in", "train_limit": 3})
    assert check_params(tmp_path / "params.yaml").errors == []


def test_errors_name_the_sub_command_the_user_ran(tmp_path, monkeypatch):
    """Two sub-commands live in one module each (linprobe_reference, finetune_scratch): an error names the
    one that ran (it said `semmae linprobe:` for linprobe_reference)."""
    from typer.testing import CliRunner

    from stages.cli import app, command_name

    assert {c.name: command_name(c.callback.__wrapped__) for c in app.registered_commands} == {
        c.name: c.name for c in app.registered_commands}  # every registration: the name errors will use  # fmt: skip
    write_params(tmp_path / "params.yaml", pretrain={"seeds": [0], "common": {}, "variants": {"semantic": {}}})
    monkeypatch.chdir(tmp_path)
    for args in (["linprobe_reference", "--prepared", "none", "--metrics", "m.json"],
                 ["finetune_scratch", "--prepared", "none", "--out", "o", "--metrics", "m.json", "--curves", "c.tsv"]):  # fmt: skip
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2 and res.stderr.startswith(f"semmae {args[0]}: error: "), res.output
        assert "none" in res.stderr
