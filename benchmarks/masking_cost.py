"""Cost of SemMAE's semantic masking next to MAE's random masking, on the same device; prints JSON.

    python benchmarks/masking_cost.py [--batch 256] [--patches 196] [--parts 6] [--device cpu|cuda]

Times MAE's own random masking (two argsorts), this project's random masking (one argsort and a
scatter) and the semantic masking (median of ``--repeats`` runs after warm-up, CUDA synchronised) on
random part maps; the goal is semantic <= 2x MAE's random masking.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pipeline.mae.masking import random_masking, semantic_masking


def mae_random_masking(batch: int, length: int, ratio: float, gen: torch.Generator, device: torch.device):
    """MAE's own random_masking index work (models_mae.py): noise, two argsorts, a gather."""
    keep = int(length * (1 - ratio))
    noise = torch.rand(batch, length, generator=gen, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, length, device=device)
    mask[:, :keep] = 0
    return ids_shuffle, ids_restore, torch.gather(mask, 1, ids_restore)


def timed(fn, repeats: int, device: torch.device) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--patches", type=int, default=196)
    ap.add_argument("--parts", type=int, default=6)
    ap.add_argument("--ratio", type=float, default=0.75)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    parts = torch.randint(0, args.parts, (args.batch, args.patches), device=device, generator=gen)
    t_mae = timed(lambda: mae_random_masking(args.batch, args.patches, args.ratio, gen, device), args.repeats, device)
    t_random = timed(lambda: random_masking(args.batch, args.patches, args.ratio, gen, device), args.repeats, device)
    t_semantic = timed(lambda: semantic_masking(parts, args.ratio, args.alpha, args.parts, gen), args.repeats, device)
    print(json.dumps({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "batch": args.batch, "patches": args.patches, "parts": args.parts,
        "mae_random_ms": round(t_mae * 1e3, 4), "random_ms": round(t_random * 1e3, 4),
        "semantic_ms": round(t_semantic * 1e3, 4), "semantic_over_mae_random": round(t_semantic / t_mae, 3),
        "semantic_over_random": round(t_semantic / t_random, 3),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
