"""``part_sources``: other part maps pretrained beside the pipeline's own. The section's checks, the
``parts_source`` stage (a source is the parts section with overrides, built and exported exactly like
train_parts -> export_parts), the DVC stages it adds, and the report's "Where the parts come from"."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import REPO, write_params
from pipeline.config.base import ConfigError
from pipeline.config.check import check_params
from pipeline.config.part_sources import load_part_source, load_part_sources
from pipeline.config.parts import PartsConfig
from stages.cli import app
from test_report import VARIANTS, curve, fabricate, write

PRETRAIN = {"seeds": [0, 1, 2], "common": {}, "variants": VARIANTS}


def params(tmp_path: Path, sources, **extra) -> Path:
    section = {"variant": "semantic", "sources": sources} | extra
    return write_params(tmp_path / "params.yaml", parts={"num_parts": 5}, pretrain=PRETRAIN, part_sources=section)


# --- the section ----------------------------------------------------------------------------------------


def test_a_source_is_the_parts_section_with_its_overrides(tmp_path):
    path = params(tmp_path, {"kmeans": {"method": "kmeans"}, "same": {}, "cg": {"tokens": "channel_grouping", "seed": 4}})
    got = load_part_sources(path)
    assert got.variant == "semantic" and sorted(got.sources) == ["cg", "kmeans", "same"]
    assert (got.configs["kmeans"].method, got.configs["kmeans"].num_parts) == ("kmeans", 5)  # parts.num_parts kept
    assert got.configs["same"] == PartsConfig(num_parts=5)  # {}: the parts section as it is
    assert (load_part_source(path, "cg").tokens, load_part_source(path, "cg").seed) == ("channel_grouping", 4)
    assert load_part_source(path, "same").tokens == "mlp"
    with pytest.raises(ConfigError, match=r"no source 'part_sources.sources.nope' \(has \['cg', 'kmeans', 'same'\]\)"):
        load_part_source(path, "nope")


def test_no_section_means_no_source(tmp_path):
    path = write_params(tmp_path / "params.yaml", parts={}, pretrain=PRETRAIN)
    assert load_part_sources(path).sources == {}


@pytest.mark.parametrize(("sources", "extra", "message"), [
    ({"kmeans": {"metod": "kmeans"}}, {}, r"unknown key 'part_sources.sources.kmeans.metod'.*allowed keys: .*method"),
    ({"kmeans": {"method": "kmean"}}, {}, r"'part_sources.sources.kmeans.method' = 'kmean' is invalid"),
    ({"k-means": {"method": "kmeans"}}, {}, r"source name 'part_sources.sources.k-means' must match"),
    ({"kmeans": "kmeans"}, {}, r"'part_sources.sources.kmeans' must be a mapping of overrides"),
    ([{"method": "kmeans"}], {}, r"'part_sources.sources' must be a mapping of source name"),
    ({"kmeans": {"method": "kmeans"}}, {"variant": "random"}, r"'part_sources.variant' = 'random' masks with 'random'"),
    ({"kmeans": {"method": "kmeans"}}, {"variant": "semmae"}, r"no variant 'pretrain.variants.semmae'"),
    ({}, {"sorces": {}}, r"unknown key 'part_sources.sorces'; allowed keys: variant, sources"),
])  # fmt: skip
def test_bad_sections_are_refused_naming_the_key(tmp_path, sources, extra, message):
    path = params(tmp_path, sources, **extra)
    with pytest.raises(ConfigError, match=message):
        load_part_sources(path)
    assert re.search(message, "\n".join(check_params(path).errors))  # semmae check, before any stage


def test_a_bad_parts_key_is_named_in_the_parts_section(tmp_path):
    path = write_params(tmp_path / "params.yaml", parts={"num_parts": 1}, pretrain=PRETRAIN,
                        part_sources={"sources": {"a": {}, "b": {"method": "kmeans"}}})  # fmt: skip
    with pytest.raises(ConfigError) as exc:
        load_part_sources(path)
    assert str(exc.value).count("'parts.num_parts' = 1 is invalid") == 1  # once, not once per source


def test_the_check_bounds_every_sources_parts_by_the_teacher_grid(tmp_path):
    path = write_params(tmp_path / "params.yaml", teacher={"img_size": 16, "patch_size": 8, "init": "train"},
                        parts={"num_parts": 4}, pretrain=PRETRAIN,
                        part_sources={"sources": {"many": {"num_parts": 5}, "heads": {"method": "attention_heads"}}})  # fmt: skip
    errors = "\n".join(check_params(path).errors)
    assert "part_sources.sources.many: num_parts = 5 exceeds the 2x2 patches" in errors
    assert "heads" not in errors and "'parts.num_parts'" not in errors


# --- the DVC stages ------------------------------------------------------------------------------------------


def stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def options(cmd: str) -> dict[str, str]:
    words = cmd.split()
    return {w: words[i + 1] for i, w in enumerate(words) if w.startswith("--")}


def test_the_source_runs_are_the_pipelines_runs_on_other_part_shards():
    """pretrain_source / linprobe_source run the same command, code and parameters as pretrain / linprobe: only
    the part shards (and where the outputs go) differ, so seed for seed they pair with the pipeline's runs."""
    s = stages()
    for main, source in (("pretrain", "pretrain_source"), ("linprobe", "linprobe_source")):
        a, b = options(s[main]["cmd"]), options(s[source]["cmd"])
        assert s[main]["cmd"].split()[:2] == s[source]["cmd"].split()[:2]  # semmae <stage>
        assert set(a) == set(b)
        same = {k for k in a if a[k] == b[k]}
        assert same == {"pretrain": {"--params", "--seed"}, "linprobe": {"--params", "--prepared"}}[main]
        code = [d for d in s[main]["deps"] if d.startswith(("pipeline/", "stages/"))]
        assert [d for d in s[source]["deps"] if d.startswith(("pipeline/", "stages/"))] == code
    assert options(s["pretrain_source"]["cmd"])["--variant"] == "${part_sources.variant}"
    assert s["pretrain_source"]["params"] == ["pretrain.common", "pretrain.variants.${part_sources.variant}"]
    assert s["linprobe_source"]["params"] == s["linprobe"]["params"]
    assert s["pretrain_source"]["matrix"]["seed"] == s["pretrain"]["matrix"]["seed"]
    # the source's own stage follows the parts section, its overrides and the export settings
    assert s["parts_source"]["do"]["params"] == ["parts", "part_sources.sources.${key}", "export_parts"]


def test_the_report_reads_the_source_runs_from_folders_it_depends_on():
    s = stages()
    deps = s["report"]["deps"]
    for stage, key in (("parts_source", "metrics"), ("pretrain_source", "metrics"), ("linprobe_source", "metrics")):
        spec = s[stage].get("do", s[stage])
        for out in spec[key]:
            assert any(out.startswith(d + "/") for d in deps if d.startswith("metrics/")), (stage, out)
    for stage in ("pretrain_source", "linprobe_source"):
        curves = [o for o in s[stage]["outs"] if o.endswith(".tsv")]
        assert curves and all(any(c.startswith(d + "/") for d in deps) for c in curves)
    assert "part_sources" in s["report"]["params"]


# --- the report ------------------------------------------------------------------------------------------------


def fabricate_sources(root: Path, tops: dict[str, list[float]], iou: dict[str, float | None]) -> None:
    m = root / "metrics"
    for name, values in tops.items():
        for seed, top1 in enumerate(values):
            write(m / "linprobe" / "sources" / f"{name}-{seed}.json",
                  json.dumps({"top1": top1, "top5": 0.99, "knn_top1": top1 - 0.05, "base_lr": 1.0}))
            write(m / "pretrain" / "sources" / f"{name}-{seed}.json", json.dumps({"final_loss": 0.6}))
            curve(m / "pretrain_curves" / "sources" / f"{name}-{seed}.tsv", ["loss", "lr", "alpha"], top1)
            curve(m / "linprobe_curves" / "sources" / f"{name}-{seed}.tsv", ["loss", "train_top1"], top1)
    for name, value in iou.items():
        parts = {"coherence": 0.3} | ({} if value is None else {"part_iou": {"miou": value, "miou_shuffled": 0.05}})
        write(m / "pretrain" / "sources" / f"{name}.parts.json", json.dumps({"method": "kmeans", "parts": parts}))


def report_with_sources(root: Path, sources: dict, *extra: str):
    write_params(root / "params.yaml", linprobe={}, pretrain=PRETRAIN,
                 part_sources={"variant": "semantic", "sources": sources})  # fmt: skip
    with contextlib.chdir(root):
        return CliRunner().invoke(app, ["report", *extra])


def test_the_report_sets_every_source_against_mae_and_the_pipelines_parts(tmp_path):
    fabricate(tmp_path, {"semantic": [0.70, 0.71, 0.72], "random": [0.60, 0.61, 0.62]})
    fabricate_sources(tmp_path, {"kmeans": [0.65, 0.66, 0.67], "heads": [0.55, 0.70, 0.60]},
                      {"kmeans": 0.087, "heads": None})  # fmt: skip
    write(tmp_path / "metrics" / "parts.json", json.dumps({"parts": {"part_iou": {"miou": 0.123, "miou_shuffled": 0.05}}}))
    res = report_with_sources(tmp_path, {"kmeans": {"method": "kmeans"}, "heads": {"method": "attention_heads"}},
                              "--parts", "metrics/parts.json")  # fmt: skip
    assert res.exit_code == 0, res.output
    md = (tmp_path / "reports" / "linprobe.md").read_text()
    section = md[md.index("## Where the parts come from") : md.index("## Settings")]
    assert "| SemMAE (semantic masking) | the parts section (pipeline's parts) | 0,1,2 | 12.3 (5.0) | 71.0 ± 1.0 | 69.0 ± 1.0 |" in section
    assert "| parts: kmeans | method=kmeans | 0,1,2 | 8.7 (5.0) | 66.0 ± 1.0 | 61.0 ± 1.0 |" in section
    assert "| parts: heads | method=attention_heads | 0,1,2 | – | 61.7 ± 7.6 |" in section
    assert "| MAE (random masking) | none (random masking) | 0,1,2 | – | 61.0 ± 1.0 |" in section
    # paired by seed: kmeans - MAE = +5 every seed (a win), kmeans - SemMAE = -5 every seed (a loss)
    assert "| parts: kmeans − MAE (random masking) | linear top-1 | +5.00 | +5.00 to +5.00 | 3 | win |" in section
    assert "| parts: kmeans − SemMAE (semantic masking) | linear top-1 | -5.00 | -5.00 to -5.00 | 3 | loss |" in section
    assert "| parts: kmeans − MAE (random masking) | k-NN top-1 | +2.00 |" in section  # its k-NN is 5 below, MAE's 2
    assert "| parts: heads − MAE (random masking) | linear top-1 | +0.67 |" in section
    summary = json.loads((tmp_path / "metrics" / "report.json").read_text())
    assert summary["source_kmeans"]["top1"] == pytest.approx(0.66) and summary["source_kmeans"]["part_miou"] == 0.087
    assert "part_miou" not in summary["source_heads"]
    assert summary["comparisons"]["source_kmeans_vs_random"]["top1"]["verdict"] == 1
    assert summary["comparisons"]["source_kmeans_vs_semantic"]["top1"]["verdict"] == -1
    assert "semantic_vs_random" in summary["comparisons"]  # the pipeline's own verdicts stay
    csv = (tmp_path / "reports" / "linprobe.csv").read_text()
    assert "\nparts: kmeans,3,66.00,1.00," in csv
    curves = (tmp_path / "reports" / "curves" / "pretrain.tsv").read_text()
    assert {line.split("\t")[0] for line in curves.splitlines()[1:]} >= {"sources/kmeans-2", "sources/heads-0", "random-1"}
    # without sources the section is absent
    res = report_with_sources(tmp_path, {})
    assert res.exit_code == 0, res.output
    assert "Where the parts come from" not in (tmp_path / "reports" / "linprobe.md").read_text()


def test_a_missing_source_run_stops_the_report_naming_it(tmp_path):
    fabricate(tmp_path, {"semantic": [0.70, 0.71, 0.72], "random": [0.60, 0.61, 0.62]})
    fabricate_sources(tmp_path, {"kmeans": [0.65, 0.66, 0.67]}, {"kmeans": 0.1})
    (tmp_path / "metrics" / "linprobe" / "sources" / "kmeans-1.json").unlink()
    res = report_with_sources(tmp_path, {"kmeans": {"method": "kmeans"}})
    assert res.exit_code == 2 and "metrics/linprobe/sources/kmeans-1.json not found" in res.output
    fabricate_sources(tmp_path, {"kmeans": [0.65, 0.66, 0.67]}, {})
    (tmp_path / "metrics" / "pretrain" / "sources" / "kmeans.parts.json").unlink()
    res = report_with_sources(tmp_path, {"kmeans": {"method": "kmeans"}})
    assert res.exit_code == 2 and "metrics/pretrain/sources/kmeans.parts.json not found" in res.output
    assert not (tmp_path / "reports").exists()  # nothing written


# --- the parts_source stage on tiny data with true parts -------------------------------------------------------

TINY_PARTS = {"num_parts": 4, "epochs": 1, "batch_size": 16, "decoder_channels": 8, "style_dim": 8}
TINY_SOURCES = {"same": {}, "kmeans": {"method": "kmeans"}, "grouping": {"tokens": "channel_grouping"},
                "truth": {"method": "ground_truth"}}


@pytest.fixture(scope="module")
def sources_built(tmp_path_factory):
    """prepare (synthetic_parts) -> tiny teacher -> extract, then through the CLI as dvc.yaml runs them:
    train_parts + export_parts (the pipeline's parts) and parts_source for every source of TINY_SOURCES."""
    from pipeline.config import ExtractConfig, PrepareConfig
    from pipeline.data.prepare import prepare_dataset
    from pipeline.features import extract_features
    from test_export_parts import make_teacher

    tmp = tmp_path_factory.mktemp("sources")
    prepare_dataset(PrepareConfig(source="synthetic_parts", synthetic_size=32, seed=3, train_limit=48, val_limit=30,
                                  holdout_size=12, shard_size=20, num_workers=0), tmp / "prepared")  # fmt: skip
    make_teacher(tmp / "teacher", 0, img_size=32)
    extract_features(ExtractConfig(batch_size=8), tmp / "prepared", tmp / "teacher", tmp / "features")
    write_params(tmp / "params.yaml", parts=TINY_PARTS, export_parts={"grid": None, "batch_size": 8}, pretrain=PRETRAIN,
                 part_sources={"sources": TINY_SOURCES})  # fmt: skip
    runner = CliRunner()
    with contextlib.chdir(tmp):
        for args in (["train_parts", "--figure", "parts.png"], ["export_parts"],
                     *[["parts_source", "--source", name, "--out", f"data/part_sources/{name}", "--metrics",
                        f"metrics/pretrain/sources/{name}.parts.json", "--figure", f"plots/{name}.png", "--resume",
                        f"data/resume/part_sources/{name}"] for name in TINY_SOURCES]):  # fmt: skip
            res = runner.invoke(app, [args[0], "--prepared", "prepared", "--teacher", "teacher", *args[1:]]
                                + (["--features", "features"] if args[0] != "export_parts" else []))  # fmt: skip
            assert res.exit_code == 0, (args, res.output)
    return tmp


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_source_without_overrides_exports_the_pipelines_part_shards_byte_for_byte(sources_built):
    """So pretrain_source@same-<seed> would be pretrain@semantic-<seed> bit for bit: the source runs differ from
    the pipeline's own only where their parts do."""
    main, same = tree(sources_built / "data" / "part_shards"), tree(sources_built / "data/part_sources/same/part_shards")
    assert main and main == same
    assert tree(sources_built / "data" / "parts") == tree(sources_built / "data/part_sources/same/parts")


def test_each_source_builds_its_own_parts_as_train_parts_scores_them(sources_built):
    """The k-means and channel-grouping sources are the rows train_parts reports as references: the same maps,
    so the same part IoU against the generator's true parts."""
    reference = json.loads((sources_built / "metrics" / "parts.json").read_text())
    got = {n: json.loads((sources_built / f"metrics/pretrain/sources/{n}.parts.json").read_text()) for n in TINY_SOURCES}
    assert got["kmeans"]["method"] == "kmeans" and "tokens" not in got["kmeans"]
    assert got["kmeans"]["parts"]["part_iou"] == reference["kmeans"]["part_iou"]
    assert got["grouping"]["tokens"] == "channel_grouping"
    assert got["grouping"]["parts"]["part_iou"] == reference["parts_channel_grouping"]["part_iou"]
    assert got["same"]["parts"] == reference["parts"] and got["same"]["tokens"] == "mlp"
    assert got["grouping"]["parts"]["part_iou"] != got["same"]["parts"]["part_iou"]
    # the control: each patch's majority true part is the patch-grid oracle train_parts scores
    assert got["truth"]["parts"]["part_iou"] == reference["patch_grid_oracle"]["part_iou"]
    assert got["truth"]["num_parts"] == 19 and got["truth"]["export"]["num_parts"] == 19  # 18 part names + background
    for name, data in got.items():
        assert data["source"] == name and data["export"]["val_samples"] == 30
        index = json.loads((sources_built / f"data/part_sources/{name}/part_shards/index.json").read_text())
        assert index["method"] == data["method"] and (sources_built / f"plots/{name}.png").is_file()


def test_the_ground_truth_source_exports_each_patchs_majority_true_part(sources_built):
    """Recomputed outside the pipeline: the generator draws every image's mask again; the exported map of every
    train and val sample is its 4 x 4-pixel blocks' most frequent part (ties: the lowest id)."""
    import numpy as np

    from pipeline.data.shards import iter_samples, shard_paths
    from pipeline.data.synthetic_parts import CLASSES, render
    from pipeline.parts.export import PARTS_FORMAT

    for split in ("train", "val"):
        samples = list(iter_samples(shard_paths(sources_built / "data/part_sources/truth/part_shards", split, PARTS_FORMAT)))
        assert len(samples) == {"train": 48, "val": 30}[split]
        for s in samples:
            stream, index = s["__key__"].split("_")  # the generator's stream and index (the key prepare stores)
            mask = render(3, stream, int(index), 32, label=s["cls"]).mask
            counts = np.stack([(mask == k).reshape(8, 4, 8, 4).sum(axis=(1, 3)) for k in range(19)])
            np.testing.assert_array_equal(s["parts"], counts.argmax(0), err_msg=s["__key__"])
        assert {s["cls"] for s in samples} == set(range(len(CLASSES)))


def test_ground_truth_parts_need_true_masks(tmp_path):
    path = write_params(tmp_path / "params.yaml", prepare={"source": "fashion_mnist"}, parts={}, pretrain=PRETRAIN,
                        part_sources={"sources": {"truth": {"method": "ground_truth"}}})  # fmt: skip
    errors = "\n".join(check_params(path).errors)
    assert "'part_sources.sources.truth.method' = 'ground_truth' needs true part masks" in errors
    path = write_params(tmp_path / "params.yaml", prepare={"source": "synthetic_parts", "train_limit": 60, "val_limit": 12},
                        parts={"method": "ground_truth"}, pretrain=PRETRAIN)  # fmt: skip
    assert not [e for e in check_params(path).errors if "'ground_truth' needs" in e]
