"""The ``report`` stage's logic: one table, one CSV for DVC's bar plots, and the summary metrics.

Rows: each pretrain variant (mean and spread over its seeds), then the references that need no
pretraining (random encoder, raw pixels). The verdict compares SemMAE (the ``semantic`` variant)
with MAE (``random``) and says plainly when the difference is within seed noise or untested.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

from pipeline.errors import PipelineError

__all__ = ["collect_rows", "verdict", "render_markdown", "render_csv", "summary_metrics", "row_label", "merge_curves", "upstream_numbers", "ReportError"]

METRICS = (("top1", "linear top-1"), ("top5", "linear top-5"), ("knn_top1", "k-NN top-1"))


class ReportError(PipelineError):
    """A metrics file the report needs is missing or malformed."""


def _load(path: Path) -> dict:
    if not path.is_file():
        raise ReportError(f"{path} not found: run the stage that writes it (dvc repro)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc})") from None


def _summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "values": values}  # fmt: skip


def collect_rows(linprobe_dir: Path, pretrain_dir: Path, variants: dict, seeds: list[int]) -> list[dict]:
    """One row per variant (metrics summarised over seeds) plus the two reference rows."""
    rows = []
    for name, settings in variants.items():
        runs = [_load(linprobe_dir / f"{name}-{s}.json") for s in seeds]
        pre = [_load(pretrain_dir / f"{name}-{s}.json") for s in seeds]
        row = {"name": name, "settings": settings, "seeds": seeds, "kind": "pretrained"}
        for key, _ in METRICS:
            if all(key in r for r in runs):
                row[key] = _summary([float(r[key]) for r in runs])
        row["pretrain_loss"] = _summary([float(p["final_loss"]) for p in pre])
        rows.append(row)
    ref = _load(linprobe_dir / "reference.json")
    for key, title in (("random_encoder", "random encoder (no pretraining)"), ("raw_pixels", "raw pixels")):
        row = {"name": title, "key": f"reference_{key}", "settings": {}, "seeds": [], "kind": "reference"}
        for metric, _ in METRICS:
            if metric in ref[key]:
                row[metric] = _summary([float(ref[key][metric])])
        rows.append(row)
    return rows


def verdict(rows: list[dict], semantic: str = "semantic", random: str = "random") -> dict:
    """SemMAE minus MAE in linear top-1, and whether it rises above seed noise (difference of means
    larger than twice its standard error; needs >= 2 seeds per variant)."""
    by = {r["name"]: r for r in rows}
    if semantic not in by or random not in by:
        return {"text": f"no comparison: variants {semantic!r} and {random!r} are both needed"}
    a, b = by[semantic]["top1"], by[random]["top1"]
    diff = a["mean"] - b["mean"]
    out = {"semantic_minus_random_top1": diff, "seeds": a["n"]}
    if a["std"] is None or b["std"] is None:
        out["text"] = (f"SemMAE {'beat' if diff > 0 else 'did not beat'} MAE by {100 * diff:+.1f} points of linear "
                       f"top-1 with one seed per variant: no spread is measured, so this is not evidence either "
                       "way (set pretrain.seeds to several seeds).")  # fmt: skip
        out["significant"] = None
        return out
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    out["standard_error"] = se
    out["significant"] = abs(diff) > 2 * se
    if out["significant"]:
        out["text"] = (f"SemMAE {'beat' if diff > 0 else 'lost to'} MAE: {100 * diff:+.1f} points of linear top-1 "
                       f"(mean of {a['n']} seeds; 2 x standard error = {200 * se:.1f}).")  # fmt: skip
    else:
        out["text"] = (f"No difference above seed noise: SemMAE - MAE = {100 * diff:+.1f} points of linear top-1, "
                       f"within 2 x standard error ({200 * se:.1f}) over {a['n']} seeds.")  # fmt: skip
    return out


def _fmt(s: dict | None) -> str:
    if s is None:
        return "–"
    if s["std"] is None:
        return f"{100 * s['mean']:.1f}"
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def render_markdown(rows: list[dict], result: dict, context: dict) -> str:
    lines = ["# Linear probe: SemMAE vs MAE", "", result["text"], "",
             "| row | masking settings | seeds | " + " | ".join(t for _, t in METRICS) + " | final pretrain loss |",
             "|---|---|---|" + "---|" * len(METRICS) + "---|"]  # fmt: skip
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in sorted(r["settings"].items())) or "–"
        seeds = ",".join(map(str, r["seeds"])) or "–"
        loss = r.get("pretrain_loss")
        loss_text = "–" if loss is None else (f"{loss['mean']:.4f}" if loss["std"] is None else f"{loss['mean']:.4f} ± {loss['std']:.4f}")
        lines.append(f"| {row_label(r['name'])} | {settings} | {seeds} | " + " | ".join(_fmt(r.get(k)) for k, _ in METRICS)
                     + f" | {loss_text} |")  # fmt: skip
    lines += ["", "Accuracies in % (mean ± standard deviation over seeds). Settings:", ""]
    lines += [f"- {k}: {v}" for k, v in context.items()]
    return "\n".join(lines) + "\n"


def row_label(name: str) -> str:
    """How a row is named in tables and plots: the variants SemMAE compares get their method's name, so the
    MAE baseline ("random" masking) is never confused with the "random encoder" reference."""
    return {"semantic": "SemMAE (semantic masking)", "random": "MAE (random masking)"}.get(name, name)


def render_csv(rows: list[dict]) -> str:
    """One line per row (mean and standard deviation over seeds, in %), for DVC's bar plots: ``dvc plots
    show`` draws it, ``dvc plots diff`` overlays it across experiments and commits."""
    head = ["row", "seeds"] + [f"{key}{suffix}" for key, _ in METRICS for suffix in ("", "_sd")]
    lines = [",".join(head)]
    for r in rows:
        cells = [row_label(r["name"]).replace(",", ";"), str(max(1, len(r["seeds"])))]
        for key, _ in METRICS:
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
        q = _load(parts).get("parts", {})
        out["parts"] = {k: round(q[k], 6) for k in UPSTREAM["parts"] if isinstance(q.get(k), (int, float))}
    return out


def summary_metrics(rows: list[dict], result: dict, upstream: dict | None = None) -> dict:
    """The numbers a person compares (``dvc metrics show/diff``): per row and metric the mean and standard
    deviation over seeds, the verdict's numbers, and ``upstream`` (:func:`upstream_numbers`). No text,
    lists or settings (those are in the report)."""
    out: dict = dict(upstream or {})
    for r in rows:
        entry = {}
        for key, _ in (*METRICS, ("pretrain_loss", "")):
            s = r.get(key)
            if s is not None:
                entry[key] = round(s["mean"], 6)
                if s["std"] is not None:
                    entry[f"{key}_sd"] = round(s["std"], 6)
        out[r.get("key", r["name"])] = entry
    out["verdict"] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in result.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip
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
