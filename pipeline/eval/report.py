"""The ``report`` stage's logic: one table, one CSV for DVC's bar plots, and the summary metrics.

Rows: each pretrain variant (mean ± sd over its seeds), the from-scratch fine-tuning row when fine-tuning
ran, then the references that need no pretraining (random encoder, raw pixels). The verdicts compare
runs paired by seed (:mod:`pipeline.eval.stats`): each variant against the MAE baseline (the variant with
random masking) on linear top-1, k-NN top-1 and fine-tune top-1, and each pretrained variant against
fine-tuning from scratch.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Optional

from pipeline.errors import PipelineError
from pipeline.eval.stats import Comparison, mean_sd, paired_comparison

__all__ = ["collect_rows", "compare_rows", "source_rows", "compare_sources", "render_sources", "part_iou_of", "SOURCES",
           "render_markdown", "render_csv", "summary_metrics", "row_label",
           "merge_curves", "upstream_numbers", "SCRATCH", "ReportError"]  # fmt: skip

PROBE = (("top1", "linear top-1"), ("top5", "linear top-5"), ("knn_top1", "k-NN top-1"))
FINETUNE = (("finetune_top1", "fine-tune top-1"), ("finetune_top5", "fine-tune top-5"))
COMPARED = (("top1", "linear top-1"), ("knn_top1", "k-NN top-1"), ("finetune_top1", "fine-tune top-1"))
SCRATCH = "scratch"  # the fine-tuning runs from a random initialisation: metrics/finetune/scratch-<seed>.json
TITLES = dict(PROBE + FINETUNE)


class ReportError(PipelineError):
    """A metrics file the report needs is missing or malformed."""


def _load(path: Path) -> dict:
    if not path.is_file():
        raise ReportError(f"{path} not found: run the stage that writes it (dvc repro)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object of metrics, got {type(data).__name__}")
    return data


def _number(data: dict, key: str, path: Path) -> Optional[float]:
    """``data[key]`` as a float; None when absent (older metrics files); an error naming it when not a number."""
    if key not in data or data[key] is None:
        return None
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReportError(f"{path}: '{key}' = {value!r} is not a number: rerun the stage that writes it")
    return float(value)


def _summary(by_seed: dict) -> dict:
    mean, sd, n = mean_sd(list(by_seed.values()))
    return {"mean": mean, "std": sd, "n": n, "by_seed": by_seed}


def _add(row: dict, key: str, by_seed: dict) -> None:
    if by_seed:
        row[key] = _summary(by_seed)


def _finetune_runs(finetune_dir: Path, name: str, seeds: list[int], pretrained: bool) -> list[tuple[int, dict, Path]]:
    """The fine-tune metrics of ``name`` (a variant, or :data:`SCRATCH`) per seed, checked against their file name."""
    runs = []
    for s in seeds:
        path = finetune_dir / f"{name}-{s}.json"
        data = _load(path)
        for key, expected in (("variant", name), ("seed", s), ("pretrained", pretrained)):
            if key in data and data[key] != expected:
                raise ReportError(f"{path}: '{key}' is {data[key]!r}, its file name says {expected!r}: rerun the "
                                  "finetune stage that writes it")  # fmt: skip
        runs.append((s, data, path))
    return runs


def collect_rows(linprobe_dir: Path, pretrain_dir: Path, variants: dict, seeds: list[int],
                 finetune_dir: Optional[Path] = None) -> list[dict]:  # fmt: skip
    """One row per variant (each metric as ``{mean, std, n, by_seed}`` over its seeds), the from-scratch
    fine-tuning row when ``finetune_dir`` is given, and the two reference rows."""
    if finetune_dir is not None and SCRATCH in variants:
        raise ReportError(f"pretrain variant {SCRATCH!r} clashes with the from-scratch fine-tuning runs "
                          f"({finetune_dir}/{SCRATCH}-<seed>.json): rename the variant")  # fmt: skip
    rows = []
    for name, settings in variants.items():
        row = _pretrained_row(name, name, settings, seeds, linprobe_dir, pretrain_dir)
        if finetune_dir is not None:
            _add_finetune(row, _finetune_runs(finetune_dir, name, seeds, True))
        rows.append(row)
    if finetune_dir is not None:
        row = {"name": "from scratch (fine-tuning, no pretraining)", "key": SCRATCH, "settings": {}, "seeds": seeds,
               "kind": "scratch", "probe_lr": {}}  # fmt: skip
        _add_finetune(row, _finetune_runs(finetune_dir, SCRATCH, seeds, False))
        rows.append(row)
    path = linprobe_dir / "reference.json"
    ref = _load(path)
    for key, title in (("random_encoder", "random encoder (no pretraining)"), ("raw_pixels", "raw pixels")):
        entry = ref.get(key)
        if not isinstance(entry, dict):
            raise ReportError(f"{path}: no '{key}' entry: rerun the linprobe_reference stage")
        row = {"name": title, "key": f"reference_{key}", "settings": {}, "seeds": [], "kind": "reference"}
        for metric, _ in PROBE:
            _add(row, metric, {0: v} if (v := _number(entry, metric, path)) is not None else {})
        row["probe_lr"] = {0: v} if (v := _number(entry, "base_lr", path)) is not None else {}
        rows.append(row)
    return rows


def _pretrained_row(name: str, key: str, settings: dict, seeds: list[int], linprobe_dir: Path, pretrain_dir: Path,
                    kind: str = "pretrained") -> dict:  # fmt: skip
    """A pretrained row: its probe metrics (``linprobe_dir/<name>-<seed>.json``) and final pretraining loss."""
    row: dict = {"name": name, "key": key, "settings": settings, "seeds": seeds, "kind": kind}
    probes = [(s, _load(linprobe_dir / f"{name}-{s}.json"), linprobe_dir / f"{name}-{s}.json") for s in seeds]
    for metric, _ in PROBE:
        _add(row, metric, {s: v for s, d, p in probes if (v := _number(d, metric, p)) is not None})
    row["probe_lr"] = {s: v for s, d, p in probes if (v := _number(d, "base_lr", p)) is not None}
    losses = {}
    for s in seeds:
        path = pretrain_dir / f"{name}-{s}.json"
        if (v := _number(_load(path), "final_loss", path)) is not None:
            losses[s] = v
    _add(row, "pretrain_loss", losses)
    return row


def part_iou_of(path: Path) -> Optional[dict]:
    """``{miou, miou_shuffled}`` of the method's parts in a train_parts / parts_source metrics file; None when the
    prepared set had no ground truth (no ``part_iou`` there)."""
    data = _load(path)
    entry = (data.get("parts") or {}).get("part_iou")
    if entry is None:
        return None
    out = {k: _number(entry, k, path) for k in ("miou", "miou_shuffled")}
    if out["miou"] is None:
        raise ReportError(f"{path}: 'parts.part_iou' has no 'miou': rerun the stage that writes it")
    return out


SOURCES = "sources"  # the source runs' metrics and curves: <dir>/sources/<name>-<seed>.{json,tsv}


def source_rows(linprobe_dir: Path, pretrain_dir: Path, sources: dict[str, dict], seeds: list[int]) -> list[dict]:
    """One row per part source (``part_sources.sources``): the source runs' probe metrics and losses over the
    seeds, and the source's part IoU (``pretrain_dir/sources/<name>.parts.json``, written by parts_source)."""
    rows = []
    for name, settings in sources.items():
        row = _pretrained_row(name, f"source_{name}", settings, seeds, linprobe_dir / SOURCES, pretrain_dir / SOURCES,
                              kind="source")  # fmt: skip
        row["name"] = f"parts: {name}"
        row["part_iou"] = part_iou_of(pretrain_dir / SOURCES / f"{name}.parts.json")
        rows.append(row)
    return rows


def compare_sources(sources: list[dict], rows: list[dict], baseline: Optional[str], variant: str) -> list[dict]:
    """Each source row minus the MAE baseline and minus ``variant`` (the same runs on the pipeline's own parts),
    paired by seed, on linear and k-NN top-1."""
    by = {r["key"]: r for r in rows}
    return _paired([(r, by[other], ["top1", "knn_top1"]) for r in sources for other in (baseline, variant) if other in by])


def _iou(entry: Optional[dict]) -> str:
    if entry is None:
        return "–"
    chance = "" if entry.get("miou_shuffled") is None else f" ({100 * entry['miou_shuffled']:.1f})"
    return f"{100 * entry['miou']:.1f}{chance}"


def render_sources(sources: list[dict], rows: list[dict], comparisons: list[dict], variant: str,
                   baseline: Optional[str], variant_iou: Optional[dict]) -> list[str]:  # fmt: skip
    """The markdown section "Where the parts come from": part IoU next to the accuracies, then the verdicts."""
    by = {r["key"]: r for r in rows}
    labels = _label_of(rows + sources)
    lines = ["## Where the parts come from", "",
             f"The {labels.get(variant, variant)} runs again, seed for seed, on other part maps: only the parts differ.",
             "", "| parts | source settings | seeds | part IoU (chance) | linear top-1 | k-NN top-1 |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    shown = [(by[variant], "the parts section (pipeline's parts)", variant_iou)] if variant in by else []
    shown += [(r, ", ".join(f"{k}={v}" for k, v in sorted(r["settings"].items())) or "the parts section", r["part_iou"])
              for r in sources]  # fmt: skip
    shown += [(by[baseline], "none (random masking)", None)] if baseline in by else []
    for r, settings, iou in shown:
        seeds = ",".join(map(str, r["seeds"])) or "–"
        lines.append(f"| {labels[r['key']]} | {settings} | {seeds} | {_iou(iou)} | {_fmt(r.get('top1'))} | "
                     f"{_fmt(r.get('knn_top1'))} |")  # fmt: skip
    lines += ["", "Part IoU in % on the validation images (mean over object classes of the true parts' IoU with the "
              "matched part ids, Hungarian matching per class), in brackets the same maps with their patches shuffled "
              "inside each image (chance); – where the prepared set has no true parts.", ""]  # fmt: skip
    if comparisons:
        lines += _verdict_table(comparisons, labels) + [""]
    return lines


def _add_finetune(row: dict, runs: list[tuple[int, dict, Path]]) -> None:
    for key, source in (("finetune_top1", "top1"), ("finetune_top5", "top5")):
        _add(row, key, {s: v for s, d, p in runs if (v := _number(d, source, p)) is not None})


def compare_rows(rows: list[dict], baseline: Optional[str]) -> list[dict]:
    """The paired comparisons ``{a, b, metric, result: Comparison}``: every other variant minus ``baseline``
    (the MAE variant: random masking) on linear top-1, k-NN top-1 and fine-tune top-1, then every
    pretrained variant minus the from-scratch row on fine-tune top-1; a metric either side lacks is skipped."""
    by = {r["key"]: r for r in rows}
    pretrained = [r for r in rows if r["kind"] == "pretrained"]
    pairs = [(r, by[baseline], [k for k, _ in COMPARED]) for r in pretrained if baseline in by and r["key"] != baseline]
    if SCRATCH in by:
        pairs += [(r, by[SCRATCH], ["finetune_top1"]) for r in pretrained]
    return _paired(pairs)


def _paired(pairs: list[tuple[dict, dict, list[str]]]) -> list[dict]:
    """``{a, b, metric, result}`` for each ``(a, b, metrics)``: ``a - b`` paired by seed on every metric both have."""
    return [{"a": a["key"], "b": b["key"], "metric": key,
             "result": paired_comparison(a[key]["by_seed"], b[key]["by_seed"])}
            for a, b, metrics in pairs for key in metrics if key in a and key in b]  # fmt: skip


def _fmt(s: Optional[dict], scale: float = 100.0, digits: int = 1) -> str:
    if s is None:
        return "–"
    if s["std"] is None:
        return f"{scale * s['mean']:.{digits}f}"
    return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"


def _lrs(row: dict) -> str:
    """The probe learning rates chosen on the hold-out, each distinct value once (with its seed count when they differ)."""
    values = list(row.get("probe_lr", {}).values())
    if not values:
        return "–"
    distinct = sorted(set(values))
    if len(distinct) == 1:
        return f"{distinct[0]:g}"
    return ", ".join(f"{v:g} ({values.count(v)}×)" for v in distinct)


def _label_of(rows: list[dict]) -> dict:
    return {r["key"]: row_label(r["name"]) for r in rows}


def _comparison_line(c: dict, labels: dict) -> str:
    r: Comparison = c["result"]
    mean = "–" if r.mean is None else f"{100 * r.mean:+.2f}"
    ci = "–" if r.ci_low is None else f"{100 * r.ci_low:+.2f} to {100 * r.ci_high:+.2f}"
    return f"| {labels[c['a']]} − {labels[c['b']]} | {TITLES[c['metric']]} | {mean} | {ci} | {r.n} | {r.verdict} |"


def _verdict_table(comparisons: list[dict], labels: dict) -> list[str]:
    return ["| comparison | metric | mean difference (points) | 95% confidence interval | seeds | verdict |",
            "|---|---|---|---|---|---|"] + [_comparison_line(c, labels) for c in comparisons]  # fmt: skip


def render_markdown(rows: list[dict], comparisons: list[dict], context: dict, baseline: Optional[str],
                    sections: Optional[list[str]] = None) -> str:  # fmt: skip
    finetune = any(r["kind"] == "scratch" for r in rows)
    metrics = PROBE + (FINETUNE if finetune else ())
    labels = _label_of(rows)
    lines = ["# SemMAE vs MAE: linear probe" + (", k-NN and fine-tuning" if finetune else " and k-NN"), "",
             "| row | masking settings | seeds | " + " | ".join(t for _, t in metrics)
             + " | final pretrain loss | probe lr (hold-out) |",
             "|---|---|---|" + "---|" * len(metrics) + "---|---|"]  # fmt: skip
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in sorted(r["settings"].items())) or "–"
        seeds = ",".join(map(str, r["seeds"])) or "–"
        lines.append(f"| {labels[r['key']]} | {settings} | {seeds} | " + " | ".join(_fmt(r.get(k)) for k, _ in metrics)
                     + f" | {_fmt(r.get('pretrain_loss'), 1.0, 4)} | {_lrs(r)} |")  # fmt: skip
    lines += ["", "Accuracies in % (mean ± standard deviation over seeds; a single run shows one number). Splits: "
              "every accuracy in the table is measured on the validation/test split; the hold-out (images set "
              "aside from the training source, never trained on) only makes choices: the probe learning rate (last "
              "column, with each seed's count when they differ)" + (" and the fine-tuning settings (by their hold-out "
              "top-1)" if finetune else "") + ". Nothing is chosen on the split that is reported.", "", "## Verdicts",
              ""]  # fmt: skip
    if baseline is None:
        lines += ["No variant has random masking: there is no MAE baseline to compare the variants with.", ""]
    if comparisons:
        lines += _verdict_table(comparisons, labels)
        lines += ["", "Paired by seed: runs with the same seed share their initialisation and data order, so each "
                  "seed gives one difference a − b (seeds present in both). The interval is mean ± t(0.975, n − 1) "
                  "× sd / √n; **win** when it lies above 0, **loss** when below, otherwise *no difference "
                  "detected*; a single seed gives no verdict (set pretrain.seeds to several seeds).", ""]  # fmt: skip
    lines += list(sections or [])
    lines += ["## Settings", ""] + [f"- {k}: {v}" for k, v in context.items()]
    return "\n".join(lines) + "\n"


def row_label(name: str) -> str:
    """How a row is named in tables and plots: the variants SemMAE compares get their method's name, so the
    MAE baseline ("random" masking) is never confused with the "random encoder" reference."""
    return {"semantic": "SemMAE (semantic masking)", "random": "MAE (random masking)", "block": "BEiT (block masking)",
            "attention": "AttMask (attention masking)"}.get(name, name)


def render_csv(rows: list[dict]) -> str:
    """One line per row (mean and standard deviation over seeds, in %), for DVC's bar plots: ``dvc plots
    show`` draws it, ``dvc plots diff`` overlays it across experiments and commits. A metric a row lacks
    (fine-tuning of the probe-only references) is left empty."""
    keys = [k for k, _ in PROBE] + ["finetune_top1"]
    head = ["row", "seeds"] + [f"{key}{suffix}" for key in keys for suffix in ("", "_sd")]
    lines = [",".join(head)]
    for r in rows:
        cells = [row_label(r["name"]).replace(",", ";"), str(max(1, len(r["seeds"])))]
        for key in keys:
            s = r.get(key)
            cells += ["", ""] if s is None else [f"{100 * s['mean']:.2f}", f"{100 * (s['std'] or 0.0):.2f}"]
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


UPSTREAM = {"teacher": ("knn_teacher", "knn_random_vit", "knn_raw_pixels"),
            "parts": ("coherence", "coherence_gain", "min_share", "max_share")}


def upstream_numbers(teacher: Path | None, parts: Path | None) -> dict:
    """The few upstream numbers worth comparing across commits next to the results: the teacher's k-NN
    check and the learned parts' quality (from the stages' own metrics files)."""
    out = {}
    if teacher is not None:
        t = _load(teacher)
        out["teacher"] = {k: t[k] for k in UPSTREAM["teacher"] if isinstance(t.get(k), (int, float))}
    if parts is not None:
        p = _load(parts)
        q = p.get("parts", {})
        out["parts"] = {k: round(q[k], 6) for k in UPSTREAM["parts"] if isinstance(q.get(k), (int, float))}
        # with ground-truth masks (prepare.source: synthetic_parts): how right the parts pretraining used are,
        # and the ceiling of any patch map, beside the results
        for key, entry in (("part_miou", q), ("part_miou_oracle", p.get("patch_grid_oracle", {}))):
            miou = (entry.get("part_iou") or {}).get("miou")
            if isinstance(miou, (int, float)):
                out["parts"][key] = round(miou, 6)
    return out


def summary_metrics(rows: list[dict], comparisons: list[dict], upstream: dict | None = None) -> dict:
    """The numbers a person compares (``dvc metrics show/diff``): per row and metric the mean and standard
    deviation over seeds and the probe lr chosen on the hold-out (the median of the seeds' choices, one of
    them); per comparison (``<a>_vs_<b>``) and metric the mean difference, n, and with two seeds or more the
    95% interval and the verdict as +1 (win) / 0 (no difference detected) / -1 (loss); and ``upstream``
    (:func:`upstream_numbers`). Numbers only: no text, lists or settings (those are in the report)."""
    out: dict = dict(upstream or {})
    for r in rows:
        entry = {}
        for key in [k for k, _ in PROBE + FINETUNE] + ["pretrain_loss"]:
            s = r.get(key)
            if s is not None:
                entry[key] = round(s["mean"], 6)
                if s["std"] is not None:
                    entry[f"{key}_sd"] = round(s["std"], 6)
        if r.get("probe_lr"):
            entry["probe_base_lr"] = statistics.median_low(r["probe_lr"].values())
        if r.get("part_iou"):
            entry.update({f"part_{k}": round(v, 6) for k, v in r["part_iou"].items() if v is not None})
        out[r["key"]] = entry
    pairs: dict = {}
    for c in comparisons:
        numbers = c["result"].numbers()
        if numbers:
            pairs.setdefault(f"{c['a']}_vs_{c['b']}", {})[c["metric"]] = numbers
    out["comparisons"] = pairs
    return out


def merge_curves(curve_dir: Path, runs: list[str]) -> str:
    """The per-run curve TSVs of ``curve_dir`` (``<run>.tsv``, a ``step`` column and values) as one long TSV
    with a ``run`` column, so one DVC plot overlays every run, whatever the variants and seeds."""
    columns: list[str] = []
    tables = []
    for run in runs:
        path = curve_dir / f"{run}.tsv"
        if not path.is_file():
            raise ReportError(f"{path} not found: run the stage that writes it (dvc repro)")
        with open(path, newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            if not reader.fieldnames or reader.fieldnames[0] != "step":
                raise ReportError(f"{path}: not a curve file (its first column must be 'step')")
            columns += [c for c in reader.fieldnames if c not in columns]
            tables.append((run, list(reader)))
    out = io.StringIO()
    writer = csv.DictWriter(out, ["run", *columns], delimiter="\t", lineterminator="\n", restval="")
    writer.writeheader()
    for run, rows in tables:
        writer.writerows({"run": run, **row} for row in rows)
    return out.getvalue()
