"""Benchmark the prepare stage on the full Fashion-MNIST (60k train + 10k val); prints JSON.

    python benchmarks/prepare_throughput.py [--root DIR] [--num-workers N]

Prints wall seconds and images/s for the whole stage (idx decoding, PNG encoding, tar writing,
sha256 of every shard) with every image of both splits.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from pipeline.config import PrepareConfig
from pipeline.data.prepare import prepare_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=PrepareConfig().root)
    ap.add_argument("--num-workers", type=int, default=None, help="default: all cores")
    ap.add_argument("--shard-size", type=int, default=10000)
    args = ap.parse_args()
    cfg = PrepareConfig(
        root=args.root, train_limit=None, val_limit=None, shard_size=args.shard_size, num_workers=args.num_workers
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        metrics = prepare_dataset(cfg, Path(tmp) / "prepared")
        seconds = time.perf_counter() - start
    images = metrics["train"]["num_samples"] + metrics["val"]["num_samples"]
    print(json.dumps({
        "benchmark": "prepare_fashion_mnist_full",
        "images": images,
        "train_images": metrics["train"]["num_samples"],
        "seconds": round(seconds, 2),
        "images_per_s": round(images / seconds, 1),
        "num_workers": args.num_workers if args.num_workers is not None else os.cpu_count(),
        "cpu_count": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
