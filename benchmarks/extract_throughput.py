"""Benchmark the extract stage against the bare teacher forward on the same images; prints JSON.

    python benchmarks/extract_throughput.py [--prepared data/prepared] [--teacher data/teacher] [--limit 2000]

Without --teacher, a random teacher of the default shape (params.yaml 'teacher') is used. The stage
number includes shard reading, image decoding, resizing, the forward pass and Arrow writing; the
bare number is the forward pass alone on pre-decoded tensors with the same batch size and device.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config import ExtractConfig, TeacherConfig, load_stage_config, resolved_config
from pipeline.data.images import load_split, normalize
from pipeline.features import extract_features
from pipeline.models.checkpoint import save_backbone
from pipeline.teacher.build import load_teacher, teacher_vit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", default="data/prepared")
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir = args.teacher
        if teacher_dir is None:
            tcfg = load_stage_config(TeacherConfig, args.params, "teacher")
            teacher_dir = Path(tmp) / "teacher"
            teacher_dir.mkdir()
            save_backbone(teacher_vit(tcfg), teacher_dir / "checkpoint_teacher.pth")
            (teacher_dir / "config.json").write_bytes(resolved_config(tcfg, "teacher"))
        cfg = ExtractConfig(splits=["train"], limit=args.limit, batch_size=args.batch_size)
        start = time.perf_counter()
        rows = extract_features(cfg, args.prepared, teacher_dir, Path(tmp) / "features")["train_rows"]
        stage_s = time.perf_counter() - start

        vit, tcfg, _ = load_teacher(teacher_dir)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        vit.to(device)
        images = load_split(args.prepared, "train", tcfg.img_size)[0][:rows]
        batches = [normalize(images[i : i + args.batch_size].to(device).float() / 255) for i in range(0, rows, args.batch_size)]
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            vit.forward_features(batches[0])  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for x in batches:
                vit.forward_features(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            bare_s = time.perf_counter() - start
    print(json.dumps({
        "benchmark": "extract",
        "device": str(device),
        "images": rows,
        "arch": tcfg.arch,
        "img_size": tcfg.img_size,
        "stage_images_per_s": round(rows / stage_s, 1),
        "bare_forward_images_per_s": round(rows / bare_s, 1),
        "stage_over_bare": round(bare_s / stage_s, 3),
    }))


if __name__ == "__main__":
    main()
