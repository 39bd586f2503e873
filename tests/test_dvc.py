"""`dvc repro` from the repository root, on the real Fashion-MNIST and the shipped default teacher."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow  # DVC end to end

BIN = Path(sys.executable).parent


def checkout_copy(dest: Path) -> Path:
    """Copy the repository's files (tracked + untracked, not ignored) into a fresh git repo at ``dest``."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file() and not rel.startswith(("data/", "metrics/", "plots/", "reports/")) and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    git = ["git", "-c", "user.email=test@example.com", "-c", "user.name=test"]
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=dest, check=True)
    return dest


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def run_json(cmd: list[str], cwd: Path):
    """A DVC command's --json output (stdout only: DVC warns on stderr)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}"
    return json.loads(res.stdout)


def test_dvc_repro_prepare_is_reproducible(tmp_path, real_fmnist):
    locks = []
    for name in ("a", "b"):
        repo = checkout_copy(tmp_path / name)
        assert "Running stage 'prepare'" in run(["dvc", "repro", "prepare"], repo)
        metrics = json.loads((repo / "metrics" / "prepare.json").read_text())
        assert metrics["train"]["num_samples"] == 5000 and metrics["val"]["num_samples"] == 1000
        locks.append(yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["prepare"]["outs"])
    assert locks[0] == locks[1]  # two independent runs: the same output hash


def shorten_pretrain(repo: Path, train_limit: int = 5000, **overrides) -> None:
    """Seconds-scale pretraining in the copy (the default's minutes are measured by benchmarks/, not here)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["prepare"]["train_limit"] = train_limit
    params["pretrain"]["common"].update({"epochs": 1, "steps_per_epoch": 3, "warmup_epochs": 0.5, **overrides})
    params["linprobe"].update({"epochs": 2, "warmup_epochs": 1})
    params["finetune"].update({"epochs": 1, "steps_per_epoch": 2, "warmup_epochs": 0.5})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_dvc_repro_default_dag_runs_once_with_a_teacher_that_beats_random(tmp_path, real_fmnist):
    repo = checkout_copy(tmp_path / "repo")
    shorten_pretrain(repo, train_limit=2500)  # half the default's images: the same chain in half the time
    out = run(["dvc", "repro"], repo)
    for stage in ("prepare", "teacher", "extract", "train_parts", "export_parts", "pretrain@semantic-0",
                  "pretrain@random-0", "pretrain_figures@semantic-0", "pretrain_figures@random-0", "linprobe@semantic-0",
                  "linprobe@random-0", "linprobe_reference", "finetune@semantic-0", "finetune@random-0",
                  "finetune_scratch@0", "report"):  # fmt: skip
        assert f"Running stage '{stage}'" in out
    teacher = json.loads((repo / "metrics" / "teacher.json").read_text())
    assert teacher["init"] == "checkpoint"
    assert teacher["knn_teacher"] >= teacher["knn_random_vit"] + 0.10  # the shipped teacher's promise
    parts = json.loads((repo / "metrics" / "parts.json").read_text())["parts"]
    assert parts["min_share"] >= 0.03 and parts["max_share"] <= 0.55 and parts["coherence_gain"] >= 0.15
    assert (repo / "plots" / "parts" / "val_parts.png").stat().st_size > 0
    exported = json.loads((repo / "metrics" / "export_parts.json").read_text())
    assert exported == {"grid": 8, "num_parts": 6, "train_samples": 2500, "val_samples": 1000}
    for variant in ("semantic", "random"):
        pretrained = json.loads((repo / "metrics" / "pretrain" / f"{variant}-0.json").read_text())
        assert pretrained["steps"] == 3 and pretrained["variant_masking"] == variant
        assert (repo / "data" / "pretrain" / f"{variant}-0" / "encoder.pth").is_file()
        assert not any((repo / "data" / "resume" / "pretrain" / f"{variant}-0").iterdir())  # cleared when done
        assert (repo / "plots" / "pretrain" / f"{variant}-0" / "curriculum_masks.png").is_file()
    probes = {name: json.loads((repo / "metrics" / "linprobe" / f"{name}.json").read_text())
              for name in ("semantic-0", "random-0", "reference")}  # fmt: skip
    assert all(0 <= p["top1"] <= 1 and 0 <= p["knn_top1"] <= 1 for p in (probes["semantic-0"], probes["random-0"]))
    assert probes["reference"]["raw_pixels"]["knn_top1"] > 0.6  # Fashion-MNIST pixels: ~78% k-NN
    report = (repo / "reports" / "linprobe.md").read_text()
    assert "| SemMAE (semantic masking) |" in report and "| raw pixels |" in report and "one seed: no verdict" in report
    assert "| from scratch (fine-tuning, no pretraining) |" in report
    for name in ("semantic-0", "random-0", "scratch-0"):
        tuned = json.loads((repo / "metrics" / "finetune" / f"{name}.json").read_text())
        assert tuned["steps"] == 2 and {"top1", "holdout_top1"} <= set(tuned)
    plots_and_metrics_read_clean(repo)
    again = run(["dvc", "repro"], repo)
    assert "Running stage" not in again
    assert "up to date" in run(["dvc", "status"], repo)
    documented_experiments_run_as_printed(repo)
    # one variant's parameters rerun that variant (and, once its encoder changes, its probe) and the report
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pretrain"]["variants"]["random"]["hflip"] = 0.0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dry = run(["dvc", "repro", "--dry"], repo)
    assert sorted(re.findall(r"Running stage '([^']+)'", dry)) == ["pretrain@random-0", "report"]
    block_and_attention_join_the_dag(repo)


def block_and_attention_join_the_dag(repo: Path) -> None:
    """The two other masking strategies, added as variants, train through DVC beside the existing runs
    (which are not rerun): their pretrain stages read the exported attention maps (attention) or make BEiT's
    blocks in the loader (block), and their figure stages draw from them. (Their probe, fine-tuning and
    report stages are the same code as every variant's; the report's rows and comparisons for them are
    tested in test_report.)"""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pretrain"]["variants"]["random"].pop("hflip", None)  # back to the state the DAG ran with
    params["pretrain"]["variants"] |= {"block": {"masking": "block"}, "attention": {"masking": "attention"}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro", "pretrain_figures@block-0", "pretrain_figures@attention-0"], repo)
    ran = sorted(re.findall(r"Running stage '([^']+)'", out))
    assert ran == [f"{stage}@{v}-0" for stage in ("pretrain", "pretrain_figures") for v in ("attention", "block")], ran
    for variant in ("block", "attention"):
        pretrained = json.loads((repo / "metrics" / "pretrain" / f"{variant}-0.json").read_text())
        assert pretrained["steps"] == 3 and pretrained["variant_masking"] == variant
        assert (repo / "plots" / "pretrain" / f"{variant}-0" / "curriculum_masks.png").stat().st_size > 0
    index = json.loads((repo / "data" / "part_shards" / "index.json").read_text())
    assert index["attention"]["dtype"] == "float16" and index["attention"]["grid"] == [8, 8]


# What each documented `dvc exp run -S` must rerun (the stages whose own deps or params change, or that are
# new; the ones downstream follow once their inputs do).
EXPECTED_EXPERIMENTS = {
    "linprobe.knn_k=10": ["linprobe@random-0", "linprobe@semantic-0", "linprobe_reference", "report"],
    "++pretrain.variants.semantic.gamma=3": ["pretrain@semantic-0", "report"],
    "pretrain.common.mask_ratio=0.6": ["pretrain@random-0", "pretrain@semantic-0", "report"],
    "++pretrain.variants.random.hflip=0.0": ["pretrain@random-0", "report"],
    "pretrain.seeds=[0,1,2]": sorted([f"{stage}@{v}-{s}" for stage in ("finetune", "linprobe", "pretrain", "pretrain_figures")
                                      for v in ("random", "semantic") for s in (1, 2)]
                                     + ["finetune_scratch@1", "finetune_scratch@2", "report"]),  # fmt: skip
    "++pretrain.variants.random90={masking:random,mask_ratio:0.9}": [
        "finetune@random90-0", "linprobe@random90-0", "pretrain@random90-0", "pretrain_figures@random90-0", "report"],
    "finetune.base_lr=2e-3": ["finetune@random-0", "finetune@semantic-0", "finetune_scratch@0", "report"],
    "++pretrain.variants.block={masking:block}": [
        "finetune@block-0", "linprobe@block-0", "pretrain@block-0", "pretrain_figures@block-0", "report"],
    "parts.method=kmeans": ["train_parts"],
    "++part_sources.sources.kmeans={method:kmeans}": ["linprobe_source@kmeans-0", "parts_source@kmeans",
                                                       "pretrain_source@kmeans-0", "report"],
    "teacher.init=train": ["teacher"],
}


def documented_experiments() -> list[list[str]]:
    """Every `dvc exp run ...` command line in the README and docs/, split as a shell would."""
    lines = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for line in doc.read_text().splitlines():
            if line.startswith("dvc exp run "):
                lines.append(shlex.split(line.split("  #")[0]))
    return lines


def documented_experiments_run_as_printed(repo: Path) -> None:
    """Each documented `-S` experiment is accepted by DVC and reruns exactly the stages the docs promise; the
    four questions the docs answer are all covered. `dvc exp run --dry` always works in a temporary copy
    without the outputs, so the override is applied to params.yaml by the function `dvc exp run -S` itself
    uses (dvc.utils.hydra.apply_overrides: a key that does not exist is refused the same way), then
    `dvc status` lists the stages that will rerun first (`repro --dry` cannot hash a new run's missing
    inputs), and params.yaml is restored."""
    from dvc.utils.hydra import apply_overrides

    commands = documented_experiments()
    sets = [cmd[cmd.index("-S") + 1] for cmd in commands]
    assert set(EXPECTED_EXPERIMENTS) <= set(sets), "documented experiments missing from the docs"
    assert all(cmd[:3] == ["dvc", "exp", "run"] and len(cmd) == 5 for cmd in commands), commands
    params = repo / "params.yaml"
    before = params.read_bytes()
    try:
        for override in sets:
            apply_overrides(params, [override])
            stages = sorted(run_json(["dvc", "status", "--json"], repo))
            assert stages == EXPECTED_EXPERIMENTS.get(override, stages) and stages, f"-S {override}: {stages}"
            params.write_bytes(before)
    finally:
        params.write_bytes(before)


def plots_and_metrics_read_clean(repo: Path) -> None:
    """`dvc plots show` renders every plot without an error, the curves overlay every run in one chart,
    and `dvc metrics show` holds numbers a person compares (no hashes, no provenance strings)."""
    shown = run_json(["dvc", "plots", "show", "--json"], repo)
    assert not shown.get("errors"), shown.get("errors")
    loss = shown["data"]["reports/curves/pretrain.tsv"][0]["content"]
    assert {row["run"] for row in loss["data"]["values"]} == {"semantic-0", "random-0"}  # one chart, both runs
    assert shown["data"]["teacher_training"][0]["content"]["data"]["values"]  # the shipped teacher's record
    bars = shown["data"]["reports/linprobe.csv"][0]["content"]["data"]["values"]
    assert {"SemMAE (semantic masking)", "MAE (random masking)", "raw pixels"} <= {b["row"] for b in bars}
    assert any(p.endswith("reconstruction.png") for p in shown["data"])  # the figure stage's images
    metrics = run_json(["dvc", "metrics", "show", "--json"], repo)

    def leaves(obj):
        return [x for v in obj.values() for x in leaves(v)] if isinstance(obj, dict) else [obj]

    strings = [v for v in leaves(metrics) if isinstance(v, str)]
    summary = next(iter(metrics.values()))["data"]["metrics/report.json"]["data"]
    assert summary["teacher"]["knn_teacher"] > summary["teacher"]["knn_random_vit"] and "semantic" in summary
    assert not [v for v in strings if len(v) >= 32], "hashes/provenance in the metrics files"
