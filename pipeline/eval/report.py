"""The ``report`` stage's logic: one table and one figure comparing every probed encoder.

Rows: each pretrain variant (mean and spread over its seeds), then the references that need no
pretraining (random encoder, raw pixels). The verdict compares SemMAE (the ``semantic`` variant)
with MAE (``random``) and says plainly when the difference is within seed noise or untested.
"""

from __future__ import annotations

import io
import json
import math
import statistics
from pathlib import Path

from PIL import Image, ImageDraw

from pipeline.errors import PipelineError
from pipeline.io import atomic_write_bytes

__all__ = ["collect_rows", "verdict", "render_markdown", "render_figure", "ReportError"]

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
        row = {"name": title, "settings": {}, "seeds": [], "kind": "reference"}
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
        lines.append(f"| {r['name']} | {settings} | {seeds} | " + " | ".join(_fmt(r.get(k)) for k, _ in METRICS)
                     + f" | {loss_text} |")  # fmt: skip
    lines += ["", "Accuracies in % (mean ± standard deviation over seeds). Settings:", ""]
    lines += [f"- {k}: {v}" for k, v in context.items()]
    return "\n".join(lines) + "\n"


def render_figure(rows: list[dict], path: str | Path, width: int = 720) -> None:
    """Horizontal bars of linear top-1 and k-NN top-1 per row, with seed spread as whiskers."""
    bar_h, gap, left, top = 14, 14, 230, 30
    height = top + len(rows) * (2 * bar_h + gap) + 30
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    scale = (width - left - 60) / 100.0
    d.text((left, 8), "accuracy (%)   ", fill="black")
    d.rectangle((left + 120, 10, left + 130, 20), fill=(31, 119, 180))
    d.text((left + 135, 8), "linear top-1", fill="black")
    d.rectangle((left + 230, 10, left + 240, 20), fill=(255, 127, 14))
    d.text((left + 245, 8), "k-NN top-1", fill="black")
    for i, r in enumerate(rows):
        y = top + i * (2 * bar_h + gap)
        d.text((6, y + bar_h // 2), r["name"][:36], fill="black")
        for j, (key, colour) in enumerate((("top1", (31, 119, 180)), ("knn_top1", (255, 127, 14)))):
            s = r.get(key)
            if s is None:
                continue
            y0 = y + j * bar_h
            x1 = left + 100 * s["mean"] * scale
            d.rectangle((left, y0, x1, y0 + bar_h - 2), fill=colour)
            d.text((x1 + 4, y0), f"{100 * s['mean']:.1f}", fill="black")
            if s["std"]:
                lo, hi = left + 100 * (s["mean"] - s["std"]) * scale, left + 100 * (s["mean"] + s["std"]) * scale
                d.line((lo, y0 + bar_h // 2, hi, y0 + bar_h // 2), fill="black", width=1)
    for tick in range(0, 101, 20):
        x = left + tick * scale
        d.line((x, height - 26, x, height - 22), fill="black")
        d.text((x - 6, height - 20), str(tick), fill="black")
    d.line((left, height - 26, left + 100 * scale, height - 26), fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
