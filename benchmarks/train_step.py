"""Benchmark one MAE pretraining step (forward, backward, AdamW) with semantic and with random masking;
prints JSON: images/s, model TFLOP/s (FLOPs counted by torch's FlopCounterMode on the real step), the
matmul peak measured in the same run, MFU = model TFLOP/s / that peak, and the masking's share of a step.

    python benchmarks/train_step.py                      # ViT-B/16, 224 px, batch 256 (a GPU's job)
    python benchmarks/train_step.py --embed-dim 192 --depth 4 --num-heads 3 --decoder-embed-dim 128 \\
        --decoder-depth 2 --batch 32 --steps 5           # the same code path at reduced width (CPU)

The data is synthetic and already on the device (the loader has its own benchmark): images, part
maps of 6 parts and the per-sample masking noise, so the number is the model step alone. bf16
autocast on CUDA (--precision), fused AdamW on CUDA, optional torch.compile (--compile).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import PretrainConfig
from pipeline.mae.masking import noise_size
from pipeline.mae.strategies import make_masking
from pipeline.mae.train import build_mae


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """Achieved TFLOP/s of an n x n x n matmul in ``dtype`` (the denominator of the MFU)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def run(cfg: PretrainConfig, batch: int, steps: int, device: torch.device, bf16: bool, compile_: bool,
        num_parts: int = 6) -> dict:  # fmt: skip
    model = build_mae(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    step_model = torch.compile(model) if compile_ else model
    g = torch.Generator(device=device).manual_seed(0)
    length = cfg.grid * cfg.grid
    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device, generator=g)
    parts = torch.randint(0, num_parts, (batch, cfg.grid, cfg.grid), device=device, generator=g, dtype=torch.uint8)
    noise = torch.rand(batch, noise_size(length, num_parts), device=device, generator=g)

    def step() -> torch.Tensor:
        masking = make_masking(cfg, parts, 0.5, num_parts, noise=noise)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = step_model(x, masking)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(2):  # warm-up (and compilation)
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    step_s = (time.perf_counter() - start) / steps

    reps = max(steps * 4, 20)
    start = time.perf_counter()
    for _ in range(reps):
        make_masking(cfg, parts, 0.5, num_parts, noise=noise)
    sync(device)
    mask_s = (time.perf_counter() - start) / reps
    return {"images_per_s": round(batch / step_s, 1), "step_ms": round(step_s * 1e3, 2),
            "model_tflop_per_step": round(flops / 1e12, 4), "model_tflops": round(flops / step_s / 1e12, 3),
            "masking_ms": round(mask_s * 1e3, 3), "masking_share_of_step": round(mask_s / step_s, 5)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="vit_base_patch16_224")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--embed-dim", type=int, default=768)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--num-heads", type=int, default=12)
    ap.add_argument("--decoder-embed-dim", type=int, default=512)
    ap.add_argument("--decoder-depth", type=int, default=8)
    ap.add_argument("--decoder-num-heads", type=int, default=16)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--peak-n", type=int, default=None, help="matmul side for the peak (default 8192 GPU, 2048 CPU)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda" if args.precision == "auto" else args.precision == "bf16"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    shape = {"arch": args.arch, "img_size": args.img_size, "patch_size": args.patch_size, "embed_dim": args.embed_dim,
             "depth": args.depth, "num_heads": args.num_heads, "decoder_embed_dim": args.decoder_embed_dim,
             "decoder_depth": args.decoder_depth, "decoder_num_heads": args.decoder_num_heads}  # fmt: skip
    peak = matmul_peak(device, torch.bfloat16 if bf16 else torch.float32,
                       args.peak_n or (8192 if device.type == "cuda" else 2048))  # fmt: skip
    out = {"benchmark": "train_step", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "precision": "bf16" if bf16 else "fp32", "compile": args.compile,
           "batch": args.batch, **shape, "matmul_peak_tflops": round(peak, 3)}  # fmt: skip
    for masking in ("semantic", "random"):
        cfg = PretrainConfig(**shape, masking=masking, batch_size=args.batch)
        res = run(cfg, args.batch, args.steps, device, bf16, args.compile)
        res["mfu"] = round(res["model_tflops"] / peak, 4)
        out[masking] = res
    out["semantic_step_cost_vs_random"] = round(out["semantic"]["step_ms"] / out["random"]["step_ms"] - 1, 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
