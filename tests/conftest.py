"""Shared fixtures: small datasets the tests write themselves, and the real Fashion-MNIST when present."""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FMNIST_DIR = Path(os.environ.get("SEMMAE_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an idx file (gzip-compressed when the name ends in .gz)."""
    magic = 0x00000800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if path.suffix == ".gz":
        # mtime=0: identical bytes every time, like the real package's files
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def fake_fmnist(tmp_path: Path):
    """A Fashion-MNIST-shaped idx directory: 300 train / 120 val images, 10 classes, random pixels."""
    rng = np.random.default_rng(123)
    root = tmp_path / "fmnist"
    root.mkdir()
    arrays = {}
    for split, stem, n in (("train", "train", 300), ("val", "t10k", 120)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        rng.shuffle(labels)
        write_idx(root / f"{stem}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{stem}-labels-idx1-ubyte.gz", labels)
        arrays[split] = (images, labels)
    return root, arrays


def make_imagefolder(root: Path, classes: dict[str, int], seed: int = 0) -> dict[str, Path]:
    """Class folders of mixed-size JPEG and PNG images (RGB, grayscale, RGBA); returns name -> path."""
    rng = np.random.default_rng(seed)
    files = {}
    for c, (name, count) in enumerate(sorted(classes.items())):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            w, h = int(rng.integers(20, 60)), int(rng.integers(20, 60))
            kind = (i + c) % 3
            if kind == 0:
                img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                path = root / name / f"img{i}.JPEG"
                img.save(path, quality=90)
            elif kind == 1:
                img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
                path = root / name / f"img{i}.png"
                img.save(path)
            else:
                img = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8))
                path = root / name / f"sub.dir.{i}.png"
                img.save(path)
            files[path.relative_to(root).as_posix()] = path
    return files


def write_params(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=True))
    return path


@pytest.fixture
def real_fmnist() -> Path:
    """The Debian package's Fashion-MNIST; skipped when absent unless SEMMAE_REQUIRE_FMNIST=1 (CI)."""
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        msg = f"Fashion-MNIST not installed in {FMNIST_DIR} (apt-get install dataset-fashion-mnist)"
        if os.environ.get("SEMMAE_REQUIRE_FMNIST") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return FMNIST_DIR


PART_COLOURS = np.array([(0, 0, 0), (230, 30, 30), (30, 230, 30), (30, 30, 230), (230, 230, 30), (30, 230, 230)], np.uint8)


def make_part_shards(root: Path, n_train: int = 96, n_val: int = 16, size: int = 16, grid: int = 4,
                     num_parts: int = 4, shard_size: int = 24, seed: int = 0, fmt: str = "png",
                     attention: bool | np.ndarray = False) -> Path:  # fmt: skip
    """An ``export_parts``-format shard set: images painted by their (blocky, random) part maps, plus noise
    (``fmt``: stored as PNG or as JPEG); ``attention``: also an ``attn.npy`` per sample (random float16 weights
    summing to ~1, from a generator of their own so the other bytes do not change; or the given ``[grid, grid]``
    array for every sample) and the index entry."""
    from pipeline.data.shards import write_shards
    from pipeline.io import json_bytes

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        samples, counts = [], {}
        for i in range(n):
            parts = rng.integers(0, num_parts, (grid, grid)).astype(np.uint8)
            img = PART_COLOURS[parts].repeat(size // grid, 0).repeat(size // grid, 1).astype(np.int16)
            img = np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
            buf, npy = io.BytesIO(), io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG" if fmt == "png" else "JPEG", quality=95)
            np.save(npy, parts, allow_pickle=False)
            label = i % 3
            counts[str(label)] = counts.get(str(label), 0) + 1
            samples.append({"__key__": f"{split}{i:05d}", fmt: buf.getvalue(), "cls": str(label).encode(),
                            "json": b'{"source": "synthetic"}', "parts.npy": npy.getvalue()})  # fmt: skip
        if attention is not False:
            attention_rng = np.random.default_rng([seed, 1 if split == "train" else 2])
            for sample in samples:
                weights = attention_rng.random((grid, grid)) ** 3 if attention is True else np.asarray(attention)
                npy = io.BytesIO()
                np.save(npy, (weights / weights.sum()).astype(np.float16), allow_pickle=False)
                sample["attn.npy"] = npy.getvalue()
        shards = write_shards(samples, root / split, split, shard_size)
        splits[split] = {"num_samples": n, "shards": shards, "class_counts": counts}
    index = {"format": "semmae-parts/1", "classes": ["a", "b", "c"], "grid": [grid, grid], "num_parts": num_parts,
             "method": "learned", "teacher_sha256": "0" * 64, "splits": splits}  # fmt: skip
    if attention is not False:
        index["attention"] = {"source": "synthetic", "dtype": "float16", "grid": [grid, grid]}
    (root / "index.json").write_bytes(json_bytes(index))
    return root


@pytest.fixture
def part_shards(tmp_path: Path) -> Path:
    return make_part_shards(tmp_path / "part_shards")


def sigkill_after_first_checkpoint(proc, checkpoint: Path, output: Path, timeout: float = 120) -> None:
    """SIGKILL the stage process ``proc`` as soon as ``checkpoint`` (its first resume state) exists, and
    check that it died before writing ``output`` (else the test proved nothing)."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert checkpoint.exists(), f"{checkpoint} never appeared"
    assert not output.exists(), "the run finished before it could be killed"


def run_semmae(cwd: Path, *args: str, wait: bool = True):
    """Run ``semmae <args>`` in ``cwd`` on one thread: to completion (asserting success), or started in
    the background (``wait=False``, returns the Popen) for a test that kills it."""
    import subprocess
    import sys

    cmd = [str(Path(sys.executable).parent / "semmae"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res



def shipped_teacher_dir(dest: Path) -> Path:
    """A `teacher` stage output at ``dest`` holding the shipped iBOT teacher (assets/teacher): its checkpoint
    and the resolved config it was trained with."""
    import shutil

    from pipeline.config import TeacherConfig, resolved_config

    dest.mkdir(parents=True)
    shutil.copy(REPO / "assets" / "teacher" / "checkpoint_teacher.pth", dest / "checkpoint_teacher.pth")
    shipped = yaml.safe_load((REPO / "assets" / "teacher" / "params.yaml").read_text())["teacher"]
    (dest / "config.json").write_bytes(resolved_config(TeacherConfig.model_validate(shipped), "teacher"))
    return dest
