"""The report stage on fabricated metrics: rows as mean ± sd, paired verdicts, fine-tuning columns, the CSV,
the merged curves and the numbers-only summary; bad input named."""

import contextlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_params
from pipeline.eval.report import ReportError, collect_rows, compare_rows
from stages.cli import app

VARIANTS = {"semantic": {"masking": "semantic"}, "random": {"masking": "random"}}
OUTPUTS = ("reports/linprobe.md", "reports/linprobe.csv", "reports/curves/pretrain.tsv", "reports/curves/linprobe.tsv",
           "metrics/report.json")  # fmt: skip


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def curve(path: Path, cols: list[str], value: float, blank: str = "") -> None:
    rows = "".join(f"{s}\t" + "\t".join(blank if c == "holdout_top1" and s % 2 else f"{value + s}" for c in cols) + "\n"
                   for s in range(3))  # fmt: skip
    write(path, "step\t" + "\t".join(cols) + f"\n{rows}")


def fabricate(root: Path, tops: dict[str, list[float]], finetune: dict[str, list[float]] | None = None,
              lrs: tuple = (None,)) -> None:  # fmt: skip
    """Metrics and curves of every run: linear top-1 ``tops[variant][seed]`` (k-NN 2 points lower, chosen
    probe lr cycling through ``lrs``, None = an older file without it); ``finetune[name][seed]``: fine-tune
    top-1 of the variants and of ``scratch``."""
    m = root / "metrics"
    for variant, values in tops.items():
        for seed, top1 in enumerate(values):
            probe = {"top1": top1, "top5": 0.99, "knn_top1": top1 - 0.02}
            if (lr := lrs[seed % len(lrs)]) is not None:
                probe.update(base_lr=lr, holdout_top1=top1 + 0.01, holdout_by_lr={str(lr): top1 + 0.01})
            write(m / "linprobe" / f"{variant}-{seed}.json", json.dumps(probe))
            write(m / "pretrain" / f"{variant}-{seed}.json", json.dumps({"final_loss": 0.5 + seed / 100}))
            curve(m / "pretrain_curves" / f"{variant}-{seed}.tsv", ["loss", "lr", "alpha"], top1)
            curve(m / "linprobe_curves" / f"{variant}-{seed}.tsv", ["loss", "train_top1"], top1)
    for name, values in (finetune or {}).items():
        for seed, top1 in enumerate(values):
            write(m / "finetune" / f"{name}-{seed}.json", json.dumps({
                "top1": top1, "top5": 0.995, "holdout_top1": top1 + 0.01, "holdout_top5": 0.99, "epochs": 2,
                "base_lr": 5e-4, "seconds": 1.5, "variant": name, "seed": seed, "pretrained": name != "scratch"}))
            curve(m / "finetune_curves" / f"{name}-{seed}.tsv", ["loss", "lr", "epoch", "holdout_top1"], top1)
    ref = {"top1": 0.5, "top5": 0.9, "knn_top1": 0.45, "base_lr": 10.0, "holdout_top1": 0.52}
    write(m / "linprobe" / "reference.json", json.dumps({"raw_pixels": ref, "random_encoder": {**ref, "base_lr": 1.0}}))


def report(root: Path, *extra: str, variants: dict = VARIANTS, seeds: int = 3, finetune: bool = False
           ):  # fmt: skip
    """``semmae report`` in ``root`` (in-process: seconds faster than a subprocess); its result has
    ``exit_code`` and ``stderr``."""
    sections = {"linprobe": {}, "pretrain": {"seeds": list(range(seeds)), "common": {}, "variants": variants}}
    write_params(root / "params.yaml", **sections, **({"finetune": {}} if finetune else {}))
    with contextlib.chdir(root):
        return CliRunner().invoke(app, ["report", *extra])


@pytest.mark.parametrize(("tops", "expected", "verdict"), [
    ({"semantic": [0.70, 0.71, 0.72], "random": [0.60, 0.61, 0.62]}, "| linear top-1 | +10.00 | +10.00 to +10.00 | 3 | win |", 1),
    ({"semantic": [0.60, 0.70, 0.65], "random": [0.64, 0.62, 0.66]}, "| linear top-1 | +1.00 | -14.51 to +16.51 | 3 | no difference detected |", 0),
    ({"semantic": [0.50, 0.55, 0.60], "random": [0.60, 0.66, 0.71]}, "| linear top-1 | -10.67 | -12.10 to -9.23 | 3 | loss |", -1),
    ({"semantic": [0.70], "random": [0.60]}, "| linear top-1 | +10.00 | – | 1 | one seed: no verdict |", None),
])  # fmt: skip
def test_report_renders_from_fabricated_metrics(tmp_path, tops, expected, verdict):
    fabricate(tmp_path, tops, lrs=(1.0, 10.0, 1.0))
    seeds = len(tops["semantic"])
    res = report(tmp_path, seeds=seeds)
    assert res.exit_code == 0, (res.stderr, res.exception)
    md = (tmp_path / "reports" / "linprobe.md").read_text()
    assert "| SemMAE (semantic masking) − MAE (random masking) " + expected in md
    assert "| k-NN top-1 |" in md and "fine-tune" not in md  # no --finetune: no fine-tuning columns or verdicts
    for row in ("| SemMAE (semantic masking) | masking=semantic |", "| MAE (random masking) | masking=random |",
                "| raw pixels | – | – | 50.0 | 90.0 | 45.0 | – | 10 |", "| random encoder (no pretraining) |"):  # fmt: skip
        assert row in md
    assert ("| 1 (2×), 10 (1×) |" if seeds == 3 else "| 1 |") in md  # the probe lr each seed chose on the hold-out
    assert "every accuracy in the table is measured on the validation/test split" in md
    table = (tmp_path / "reports" / "linprobe.csv").read_text().splitlines()
    assert table[0] == "row,seeds,top1,top1_sd,top5,top5_sd,knn_top1,knn_top1_sd,finetune_top1,finetune_top1_sd"
    assert len(table) == 5 and all(line.endswith(",,") for line in table[1:])  # no fine-tune numbers
    assert f"MAE (random masking),{seeds},{100 * sum(tops['random']) / seeds:.2f}," in "\n".join(table)
    curves = (tmp_path / "reports" / "curves" / "pretrain.tsv").read_text().splitlines()
    assert curves[0] == "run\tstep\tloss\tlr\talpha" and len(curves) == 1 + 3 * 2 * seeds  # every run's rows
    assert {line.split("\t")[0] for line in curves[1:]} == {f"{v}-{s}" for v in tops for s in range(seeds)}
    assert not (tmp_path / "reports" / "curves" / "finetune.tsv").exists()
    summary = json.loads((tmp_path / "metrics" / "report.json").read_text())
    pair = summary["comparisons"]["semantic_vs_random"]
    assert pair["top1"]["mean"] == pytest.approx(sum(tops["semantic"]) / seeds - sum(tops["random"]) / seeds, abs=1e-6)
    assert set(pair) == {"top1", "knn_top1"} and pair["top1"]["n"] == seeds
    assert pair["top1"].get("verdict") == verdict  # +1 win, 0 no difference, -1 loss; one seed: none
    assert ("ci_low" in pair["top1"]) == (seeds > 1)  # one seed: no interval
    if verdict is not None:  # the interval of the table's line, as fractions
        low, high = (float(x) / 100 for x in expected.split(" | ")[2].split(" to "))
        assert pair["top1"]["ci_low"] == pytest.approx(low, abs=5e-5)
        assert pair["top1"]["ci_high"] == pytest.approx(high, abs=5e-5)
    assert summary["reference_raw_pixels"]["probe_base_lr"] == 10.0 and summary["random"]["probe_base_lr"] == 1.0


def test_fine_tuning_rows_verdicts_curves_and_byte_identical_reruns(tmp_path):
    tops = {"semantic": [0.70, 0.60, 0.65], "random": [0.69, 0.61, 0.64]}
    fabricate(tmp_path, tops, finetune={"semantic": [0.80, 0.70, 0.75], "random": [0.79, 0.69, 0.74],
                                         "scratch": [0.50, 0.40, 0.45]})  # fmt: skip
    args = ("--finetune", "metrics/finetune", "--finetune-curves", "metrics/finetune_curves")
    res = report(tmp_path, *args, finetune=True)
    assert res.exit_code == 0, (res.stderr, res.exception)
    first = {name: (tmp_path / name).read_bytes() for name in (*OUTPUTS, "reports/curves/finetune.tsv")}
    assert report(tmp_path, *args, finetune=True).exit_code == 0
    assert {name: (tmp_path / name).read_bytes() for name in first} == first  # byte-deterministic
    md = first["reports/linprobe.md"].decode()
    assert "| linear top-1 | linear top-5 | k-NN top-1 | fine-tune top-1 | fine-tune top-5 | final pretrain loss |" in md
    assert "| from scratch (fine-tuning, no pretraining) | – | 0,1,2 | – | – | – | 45.0 ± 5.0 | 99.5 ± 0.0 | – | – |" in md
    assert "| raw pixels | – | – | 50.0 | 90.0 | 45.0 | – | – | – | 10 |" in md
    assert "| SemMAE (semantic masking) − MAE (random masking) | fine-tune top-1 | +1.00 | +1.00 to +1.00 | 3 | win |" in md
    assert "| MAE (random masking) − from scratch (fine-tuning, no pretraining) | fine-tune top-1 | +29.00 |" in md
    assert "| SemMAE (semantic masking) − MAE (random masking) | linear top-1 | +0.33 |" in md
    assert "- fine-tuning (finetune):" in md
    table = first["reports/linprobe.csv"].decode().splitlines()
    assert table[2].startswith("SemMAE (semantic masking),3,65.00,5.00,") and table[2].endswith(",75.00,5.00")
    assert table[3].startswith("from scratch (fine-tuning; no pretraining),3,,,,,,,45.00,5.00")
    assert table[4].startswith("random encoder (no pretraining),1,50.00,") and table[4].endswith(",,")
    curves = first["reports/curves/finetune.tsv"].decode().splitlines()
    assert curves[0] == "run\tstep\tloss\tlr\tepoch\tholdout_top1" and len(curves) == 1 + 3 * 3 * 3
    assert curves[-2].startswith("scratch-2\t1\t") and curves[-2].endswith("\t")  # an empty hold-out cell stays empty
    summary = json.loads(first["metrics/report.json"])

    def leaves(obj):
        return [x for v in obj.values() for x in leaves(v)] if isinstance(obj, dict) else [obj]

    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in leaves(summary))  # numbers only
    assert set(summary["comparisons"]) == {"semantic_vs_random", "semantic_vs_scratch", "random_vs_scratch"}
    assert set(summary["comparisons"]["semantic_vs_random"]) == {"top1", "knn_top1", "finetune_top1"}
    assert summary["comparisons"]["semantic_vs_scratch"]["finetune_top1"]["verdict"] == 1
    assert summary["comparisons"]["semantic_vs_random"]["top1"]["verdict"] == 0
    assert summary["scratch"] == {"finetune_top1": 0.45, "finetune_top1_sd": 0.05, "finetune_top5": 0.995,
                                  "finetune_top5_sd": 0.0}  # fmt: skip


def test_the_verdict_is_paired_by_seed(tmp_path):
    """A small difference that every seed shows is a win, even under a seed-to-seed spread that swamps an
    unpaired comparison (difference of means 1 point, each variant's sd 10 points)."""
    fabricate(tmp_path, {"semantic": [0.51, 0.71, 0.615], "random": [0.50, 0.70, 0.60]})
    rows = collect_rows(tmp_path / "metrics" / "linprobe", tmp_path / "metrics" / "pretrain", VARIANTS, [0, 1, 2])
    top1 = next(c for c in compare_rows(rows, "random") if c["metric"] == "top1")["result"]
    assert (top1.verdict, top1.n) == ("win", 3) and top1.mean == pytest.approx(0.01 + 0.005 / 3)
    # only the seeds both have: a seed missing on one side is left out, not compared with another seed
    rows[0]["top1"]["by_seed"].pop(2)
    top1 = next(c for c in compare_rows(rows, "random") if c["metric"] == "top1")["result"]
    assert (top1.n, top1.seeds) == (2, (0, 1))


def test_the_baseline_is_the_variant_with_random_masking(tmp_path):
    fabricate(tmp_path, {"parts": [0.70, 0.71], "mae": [0.60, 0.61], "blocks": [0.65, 0.66]})
    res = report(tmp_path, variants={"parts": {"masking": "semantic"}, "mae": {"masking": "random"},
                                     "blocks": {"masking": "semantic", "alpha": 1.0}}, seeds=2)  # fmt: skip
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert set(json.loads((tmp_path / "metrics" / "report.json").read_text())["comparisons"]) == {"parts_vs_mae",
                                                                                                   "blocks_vs_mae"}  # fmt: skip
    fabricate(tmp_path / "b", {"semantic": [0.70], "other": [0.60]})
    res = report(tmp_path / "b", variants={"semantic": {"masking": "semantic"}, "other": {"masking": "semantic"}}, seeds=1)
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert "No variant has random masking" in (tmp_path / "b" / "reports" / "linprobe.md").read_text()


def test_report_names_bad_input(tmp_path):
    fabricate(tmp_path, {"semantic": [0.7], "random": [0.6]}, finetune={"semantic": [0.8], "random": [0.7], "scratch": [0.5]})
    lin, pre, fin = (tmp_path / "metrics" / d for d in ("linprobe", "pretrain", "finetune"))
    assert collect_rows(lin, pre, VARIANTS, [0], fin)[2]["key"] == "scratch"
    (fin / "scratch-0.json").write_text(json.dumps({"top1": 0.5, "seed": 1}))
    with pytest.raises(ReportError, match=r"scratch-0.json: 'seed' is 1, its file name says 0"):
        collect_rows(lin, pre, VARIANTS, [0], fin)
    (fin / "scratch-0.json").unlink()
    with pytest.raises(ReportError, match=r"scratch-0.json not found: run the stage that writes it"):
        collect_rows(lin, pre, VARIANTS, [0], fin)
    (lin / "random-0.json").write_text(json.dumps({"top1": "0.6"}))
    with pytest.raises(ReportError, match=r"random-0.json: 'top1' = '0.6' is not a number"):
        collect_rows(lin, pre, VARIANTS, [0])
    (lin / "random-0.json").unlink()
    with pytest.raises(ReportError, match=r"random-0.json not found: run the stage that writes it"):
        collect_rows(lin, pre, VARIANTS, [0])
    res = report(tmp_path, "--finetune", "metrics/nowhere", seeds=1, finetune=True)
    assert res.exit_code == 2 and "--finetune metrics/nowhere: no such directory" in res.stderr


@pytest.mark.parametrize(("text", "problem"), [
    ('{"top1": 0.6, "top5": ', "not valid JSON"),  # a truncated write
    ("[0.6, 0.9]", "expected a JSON object of metrics, got list"),
    ("", "not valid JSON"),
])  # fmt: skip
def test_a_malformed_metrics_file_stops_the_report_naming_it(tmp_path, text, problem):
    fabricate(tmp_path, {"semantic": [0.70, 0.71], "random": [0.60, 0.61]})
    (tmp_path / "metrics" / "linprobe" / "random-1.json").write_text(text)
    res = report(tmp_path, seeds=2)
    assert res.exit_code == 2, (res.stderr, res.exception)
    assert f"semmae report: error: metrics/linprobe/random-1.json: {problem}" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "reports").exists() and not (tmp_path / "metrics" / "report.json").exists()


def test_a_malformed_curves_file_stops_the_report_before_any_output(tmp_path):
    fabricate(tmp_path, {"semantic": [0.70, 0.71], "random": [0.60, 0.61]})
    (tmp_path / "metrics" / "linprobe_curves" / "random-1.tsv").write_text("epoch\tloss\n1\t0.5\n")
    res = report(tmp_path, seeds=2)
    assert res.exit_code == 2, (res.stderr, res.exception)
    assert "random-1.tsv: not a curve file" in res.stderr
    # the table and CSV come before the curves in the code, yet neither may be written
    assert not (tmp_path / "reports").exists() and not (tmp_path / "metrics" / "report.json").exists()


def test_every_masking_strategy_is_compared_with_random_masking_on_every_protocol(tmp_path):
    """Four strategies: block and attention rows named after their methods, each compared with random masking
    on linear, k-NN and fine-tune top-1 (and with scratch on fine-tuning), seed-paired."""
    tops = {"semantic": [0.70, 0.71], "random": [0.60, 0.61], "block": [0.62, 0.64], "attention": [0.58, 0.57]}
    fabricate(tmp_path, tops, finetune={**tops, "scratch": [0.40, 0.41]})
    variants = {name: {"masking": name} for name in tops}
    args = ("--finetune", "metrics/finetune", "--finetune-curves", "metrics/finetune_curves")
    res = report(tmp_path, *args, variants=variants, seeds=2, finetune=True)
    assert res.exit_code == 0, (res.stderr, res.exception)
    md = (tmp_path / "reports" / "linprobe.md").read_text()
    for label in ("BEiT (block masking)", "AttMask (attention masking)"):
        assert f"| {label} | masking=" in md
        for metric in ("linear top-1", "k-NN top-1", "fine-tune top-1"):
            assert f"| {label} − MAE (random masking) | {metric} |" in md
    assert "| BEiT (block masking) − MAE (random masking) | linear top-1 | +2.50 | -3.85 to +8.85 | 2 |" in md
    comparisons = json.loads((tmp_path / "metrics" / "report.json").read_text())["comparisons"]
    assert {"block_vs_random", "attention_vs_random", "semantic_vs_random"} <= set(comparisons)


def test_the_summary_carries_the_parts_quality_and_its_ground_truth_score(tmp_path):
    """metrics/report.json's upstream numbers: the parts' statistics always, their part IoU and the oracle's
    only when train_parts scored them against ground truth (the synthetic_parts source)."""
    from pipeline.eval.report import upstream_numbers

    stats = {"coherence": 0.6, "coherence_gain": 0.3, "min_share": 0.1, "max_share": 0.4}
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"parts": stats, "kmeans": stats}))
    assert upstream_numbers(None, plain) == {"parts": stats}
    scored = tmp_path / "scored.json"
    scored.write_text(json.dumps({"parts": {**stats, "part_iou": {"miou": 0.25, "miou_global": 0.1}},
                                  "kmeans": {**stats, "part_iou": {"miou": 0.3}},
                                  "patch_grid_oracle": {"part_iou": {"miou": 0.5}}}))  # fmt: skip
    assert upstream_numbers(None, scored) == {"parts": {**stats, "part_miou": 0.25, "part_miou_oracle": 0.5}}
