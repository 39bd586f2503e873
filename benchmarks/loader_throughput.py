"""Benchmark the pretraining loader on ImageNet-sized JPEGs; prints JSON.

    python benchmarks/loader_throughput.py [--images 512] [--workers N] [--size 224]

It writes ``--images`` synthetic JPEGs (500 x 375, smooth content plus noise, quality 90: ~ImageNet's
size and decode cost) once as an ImageFolder and once as ``export_parts``-format shards (the same JPEG
bytes plus a 14 x 14 part map), then measures images/s of

- ``semmae``: the pretrain loader (``pipeline.mae.data.make_loader``: tar read, PIL decode,
  RandomResizedCrop + flip of image and part map, masking noise) in-process (one core) and with
  ``--workers`` loader processes;
- ``semmae_decode_device``: the same loader with ``decode: device``: what its workers sustain
  (tar read, JPEG header, part-map crop, noise), and with the batch decode + crop on the device
  (CUDA when present, else this CPU's libjpeg-turbo through torchvision);
- ``torchvision``: ``ImageFolder`` + ``RandomResizedCrop(224, (0.2, 1), bicubic)`` + flip + ``PILToTensor``
  through a DataLoader with the same workers (the usual MAE loader);
- ``breakdown``: where one core's time goes (tar read, JPEG decode, crop + resize, the rest);
- ``gpu_decode``: when CUDA is present, ``decode_crop`` alone on batches of 256 of the same bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data.shards import PARTS_FORMAT, iter_raw_samples, shard_paths, write_shards
from pipeline.io import json_bytes
from pipeline.mae.data import joint_crop, make_loader, sample_crop
from pipeline.mae.decode import EncodedImages, decode_crop
from pipeline.mae.masking import noise_size

GRID, PARTS = 14, 6


def synthetic_jpegs(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    out = []
    for _ in range(n):
        f = rng.uniform(0.005, 0.05, size=(3, 2))
        img = np.stack([127 + 100 * np.sin(xx * f[c, 0] + yy * f[c, 1] + rng.uniform(0, 6)) for c in range(3)], -1)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_sets(jpegs: list[bytes], root: Path, shard_size: int, val: int = 0) -> tuple[Path, Path]:
    """The JPEGs as an ImageFolder (train images only) and as export_parts shards with random 14 x 14
    part maps; the last ``val`` images form the shards' val split."""
    folder, shards = root / "folder", root / "part_shards"
    rng = np.random.default_rng(1)
    samples = []
    for i, data in enumerate(jpegs):
        cls = f"c{i % 2}"
        if i < len(jpegs) - val:
            (folder / cls).mkdir(parents=True, exist_ok=True)
            (folder / cls / f"{i:06d}.JPEG").write_bytes(data)
        npy = io.BytesIO()
        np.save(npy, rng.integers(0, PARTS, (GRID, GRID)).astype(np.uint8), allow_pickle=False)
        samples.append({"__key__": f"{i:06d}", "jpg": data, "cls": str(i % 2).encode(), "json": b"{}",
                        "parts.npy": npy.getvalue()})  # fmt: skip
    splits = {}
    for split, part in (("train", samples[: len(samples) - val]), ("val", samples[len(samples) - val :])):
        if part:
            splits[split] = {"num_samples": len(part), "class_counts": {},
                             "shards": write_shards(part, shards / split, split, shard_size)}  # fmt: skip
    index = {"format": PARTS_FORMAT, "classes": ["c0", "c1"], "grid": [GRID, GRID], "num_parts": PARTS,
             "method": "learned", "teacher_sha256": "0" * 64, "splits": splits}  # fmt: skip
    (shards / "index.json").write_bytes(json_bytes(index))
    return folder, shards


def semmae_rate(shards: Path, size: int, batch: int, batches: int, workers: int, decode: str = "cpu",
                device: torch.device | None = None) -> float:  # fmt: skip
    """Images/s of the pretrain loader; ``decode="device"`` with ``device`` also decodes and crops the
    batches there (without ``device``: the loader's CPU side alone, what the workers sustain)."""
    paths = shard_paths(shards, "train", PARTS_FORMAT)
    streams = max(1, workers)
    batch = -(-batch // streams) * streams  # a multiple of the streams
    loader = make_loader(paths, PARTS, size, GRID, batch, batches, 0, 0, (0.2, 1.0), (3 / 4, 4 / 3), 0.5, 256, workers,
                         streams, noise_size(GRID * GRID, PARTS), decode)  # fmt: skip
    it = iter(loader)
    next(it)  # start-up (worker processes, first shard) is not throughput
    start = time.perf_counter()
    n = 0
    for images, *_ in it:
        if device is not None and isinstance(images, EncodedImages):
            images = decode_crop(images, size, device)
        n += len(images)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def torchvision_rate(folder: Path, size: int, batch: int, batches: int, workers: int) -> float:
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.PILToTensor()])  # fmt: skip
    ds = datasets.ImageFolder(str(folder), transform=tf)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=batch * (batches + 1))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                                         prefetch_factor=4 if workers else None)  # fmt: skip
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    n = sum(len(b[0]) for b in it)
    return n / (time.perf_counter() - start)


def breakdown(shards: Path, size: int, n: int) -> dict:
    """Seconds per image of each step of the PIL path, on one core."""
    rng = np.random.default_rng(0)
    t = {"tar_read": 0.0, "jpeg_decode": 0.0, "crop_resize_flip": 0.0}
    start = time.perf_counter()
    raws = []
    for raw in iter_raw_samples(shard_paths(shards, "train", PARTS_FORMAT)):
        raws.append(raw)
        if len(raws) == n:
            break
    t["tar_read"] = time.perf_counter() - start
    for raw in raws:
        s = time.perf_counter()
        img = Image.open(io.BytesIO(raw["jpg"]))
        img = img.convert("RGB")
        parts = np.load(io.BytesIO(raw["parts.npy"]), allow_pickle=False)
        m = time.perf_counter()
        joint_crop(img, parts, size, GRID, sample_crop(min(img.size), (0.2, 1.0), (3 / 4, 4 / 3), rng), True)
        e = time.perf_counter()
        t["jpeg_decode"] += m - s
        t["crop_resize_flip"] += e - m
    return {k: round(v / len(raws) * 1e3, 3) for k, v in t.items()} | {"unit": "ms per image"}


def gpu_decode_rate(jpegs: list[bytes], size: int, batch: int, device: torch.device) -> dict:
    """``decode_crop`` alone (nvJPEG batch decode + per-image crop/resize/flip on the device)."""
    rng = np.random.default_rng(0)
    data = jpegs[:batch]
    enc = EncodedImages.pack([(j, sample_crop(375, (0.2, 1.0), (3 / 4, 4 / 3), rng), bool(rng.random() < 0.5), str(i))
                              for i, j in enumerate(data)])  # fmt: skip
    decode_crop(enc, size, device)
    torch.cuda.synchronize()
    start = time.perf_counter()
    reps = 5
    for _ in range(reps):
        decode_crop(enc, size, device)
    torch.cuda.synchronize()
    return {"images_per_s": round(reps * len(data) / (time.perf_counter() - start), 1), "batch": len(data)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        jpegs = synthetic_jpegs(args.images)
        folder, shards = write_sets(jpegs, Path(tmp), shard_size=max(1, args.images // max(4, args.workers)))
        batches = max(2, args.images // args.batch - 1)
        out = {"benchmark": "loader", "cpu_count": os.cpu_count(), "workers": args.workers, "images": args.images,
               "mean_jpeg_kb": round(sum(map(len, jpegs)) / len(jpegs) / 1024, 1), "source_size": [500, 375],
               "output_size": args.size}  # fmt: skip
        one = semmae_rate(shards, args.size, args.batch, batches, 0)
        many = semmae_rate(shards, args.size, args.batch, batches, args.workers)
        tv_one = torchvision_rate(folder, args.size, args.batch, batches, 0)
        tv_many = torchvision_rate(folder, args.size, args.batch, batches, args.workers)
        out["semmae"] = {"one_core_images_per_s": round(one, 1), "all_workers_images_per_s": round(many, 1)}
        # decode: device — the workers only read shards, parse headers, crop part maps, draw noise
        read_one = semmae_rate(shards, args.size, args.batch, batches, 0, "device")
        read_many = semmae_rate(shards, args.size, args.batch, batches, args.workers, "device")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        decoded = semmae_rate(shards, args.size, args.batch, batches, args.workers, "device", device)
        out["semmae_decode_device"] = {"workers_side_one_core_images_per_s": round(read_one, 1),
                                       "workers_side_all_workers_images_per_s": round(read_many, 1),
                                       "with_decode_and_crop_images_per_s": round(decoded, 1),
                                       "decode_device": str(device)}  # fmt: skip
        out["torchvision_imagefolder"] = {"one_core_images_per_s": round(tv_one, 1),
                                          "all_workers_images_per_s": round(tv_many, 1)}  # fmt: skip
        out["breakdown_one_core"] = breakdown(shards, args.size, min(args.images, 128))
        if torch.cuda.is_available():
            out["gpu_decode"] = gpu_decode_rate(jpegs, args.size, 256, torch.device("cuda"))
            out["gpu_decode"]["device"] = torch.cuda.get_device_name()
        else:
            out["gpu_decode"] = "skipped: no CUDA device"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
