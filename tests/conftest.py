"""Shared fixtures: small datasets the tests write themselves, and the real Fashion-MNIST when present."""

from __future__ import annotations

import gzip
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
