"""Cost of every masking strategy next to MAE's random masking, on the same device; prints JSON.

    python benchmarks/masking_cost.py [--batch 256] [--patches 196] [--parts 6] [--device cpu|cuda] [--threads N]

Times (median of ``--repeats`` runs after warm-up, CUDA synchronised) MAE's own random masking (two
argsorts), this project's random masking (one argsort and a scatter), SemMAE's semantic masking on random
part maps, BEiT's block masking and AttMask's attention masking (high, low, hint). Goal: each device-side
strategy <= 2x MAE's random masking (the ``*_over_mae_random`` ratios).

- random and semantic draw their noise from a generator inside the timed call, as MAE's does; block and
  attention take the loader's per-sample noise already on the device (their training path), so the draw
  of B x L uniforms is not in their time.
- block: the device part is :func:`block_masking` from flags precomputed by the loader; BEiT's sequential
  block loop (:func:`block_flags`) runs per image in the loader's workers (as in BEiT) and is timed apart,
  on one CPU core over ``--block-images`` images: microseconds per image and images/s per core, with the
  share of images where BEiT stops short of the target.
- attention: random attention maps (softmax of Gaussian logits), ``--hint-share`` for hint.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np
import torch

from pipeline.mae.masking import (attention_masking, block_flags, block_masking, len_keep, noise_size, random_masking,
                                  semantic_masking)  # fmt: skip


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


def block_loader_cost(noise: np.ndarray, grid: int, ratio: float) -> tuple[float, float]:
    """``(microseconds per image, share short of the target)`` of :func:`block_flags` over the rows of
    ``noise`` on this process's one core (the loader-worker side of block masking)."""
    target = grid * grid - len_keep(grid * grid, ratio)
    t = time.perf_counter()
    masked = [int(block_flags(row, grid, ratio).sum()) for row in noise]
    elapsed = time.perf_counter() - t
    return elapsed / len(noise) * 1e6, sum(m < target for m in masked) / len(masked)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--patches", type=int, default=196)
    ap.add_argument("--parts", type=int, default=6)
    ap.add_argument("--ratio", type=float, default=0.75)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--hint-share", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--block-images", type=int, default=1000, help="images timed for the loader's block_flags")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (e.g. 1); default: torch's")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    grid = math.isqrt(args.patches)
    if grid * grid != args.patches:
        ap.error(f"--patches={args.patches} is not a square grid (block masking needs one): use e.g. 196 or 64")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    b, length = args.batch, args.patches
    parts = torch.randint(0, args.parts, (b, length), device=device, generator=gen)
    # the loader's per-sample noise and BEiT flags, precomputed as in training
    rows = (max(b, args.block_images), noise_size(length, args.parts))
    noise_np = np.random.default_rng(0).random(rows, dtype=np.float32)
    noise = torch.from_numpy(noise_np[:b]).to(device)
    block_us, block_short = block_loader_cost(noise_np[: args.block_images], grid, args.ratio)
    flags = torch.from_numpy(np.stack([block_flags(row, grid, args.ratio) for row in noise_np[:b]])).to(device)
    attention = torch.randn(b, length, generator=gen, device=device).softmax(1)

    runs = {
        "mae_random": lambda: mae_random_masking(b, length, args.ratio, gen, device),
        "random": lambda: random_masking(b, length, args.ratio, gen, device),
        "semantic": lambda: semantic_masking(parts, args.ratio, args.alpha, args.parts, gen),
        "block": lambda: block_masking(flags, args.ratio, noise),
        **{f"attention_{m}": (lambda m=m: attention_masking(attention, args.ratio, m, args.hint_share, noise))
           for m in ("high", "low", "hint")},
    }  # fmt: skip
    ms = {name: timed(fn, args.repeats, device) * 1e3 for name, fn in runs.items()}
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "batch": b, "patches": length, "parts": args.parts, "ratio": args.ratio,
        **{f"{name}_ms": round(t, 4) for name, t in ms.items()},
        **{f"{name}_over_mae_random": round(t / ms["mae_random"], 3) for name, t in ms.items() if name != "mae_random"},
        "semantic_over_random": round(ms["semantic"] / ms["random"], 3),
        "block_flags_us_per_image": round(block_us, 1), "block_flags_images_per_s_per_core": round(1e6 / block_us),
        "block_flags_images": args.block_images, "block_short_share": round(block_short, 4),
    }  # fmt: skip
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
