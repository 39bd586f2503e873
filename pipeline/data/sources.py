"""Labelled image sources for ``prepare``: Fashion-MNIST idx files, ImageFolder trees and the generated
``synthetic_parts`` set (images with ground-truth part masks).

A source yields :class:`Record` lists (one per split) and the class names. Records are cheap
descriptions (the generated set's aside: they hold their pixels and masks); the pixels are read and
encoded later by :mod:`pipeline.data.prepare`.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from pipeline.errors import PipelineError

__all__ = [
    "DataSourceError",
    "Record",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "load_fashion_mnist",
    "scan_imagefolder",
    "load_synthetic_parts",
    "IMAGE_EXTENSIONS",
]


class DataSourceError(PipelineError):
    """The image source is missing, malformed or inconsistent; the message says what to do."""


@dataclass(frozen=True)
class Record:
    """One labelled image. ``pixels`` (decoded uint8 array) or ``path`` (an image file) is set; ``mask``
    (uint8 ``[H, W]`` ground-truth part ids of ``pixels``, ``synthetic_parts`` only) is stored beside it."""

    key: str
    label: int
    source_id: str
    pixels: Optional[np.ndarray] = None
    path: Optional[Path] = None
    mask: Optional[np.ndarray] = None


FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned-byte data, 3-d images / 1-d labels
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png"}

_HOW_TO_GET_FMNIST = (
    "Install the Debian package (sudo apt-get install dataset-fashion-mnist, which puts them in "
    "/usr/share/datasets/fashion-mnist), or download the four idx .gz files of Fashion-MNIST and set "
    "prepare.root in params.yaml to their directory."
)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataSourceError(f"Fashion-MNIST file {root / (stem + '.gz')} not found. {_HOW_TO_GET_FMNIST}")


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataSourceError(f"{path}: cannot read ({exc}); the file is corrupt or truncated, re-install it") from exc
    if len(raw) < 4 + 4 * ndim:
        raise DataSourceError(f"{path}: too short for an idx file ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != _IDX_MAGIC[ndim]:
        raise DataSourceError(
            f"{path}: idx magic number {magic:#010x}, expected {_IDX_MAGIC[ndim]:#010x} "
            f"(unsigned bytes, {ndim}-d); is this the right file?"
        )
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataSourceError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes) but holds {data.size} bytes")
    return data.reshape(dims)


def load_fashion_mnist(root: Union[str, Path]) -> tuple[dict[str, list[Record]], list[str]]:
    """Read the four Fashion-MNIST idx files under ``root``: ``train`` (60k) and ``val`` (the 10k test set)."""
    root = Path(root)
    if not root.is_dir():
        raise DataSourceError(f"Fashion-MNIST directory {root} not found. {_HOW_TO_GET_FMNIST}")
    splits: dict[str, list[Record]] = {}
    for split, (img_stem, lbl_stem) in FASHION_MNIST_FILES.items():
        img_path, lbl_path = _find_idx(root, img_stem), _find_idx(root, lbl_stem)
        images, labels = _read_idx(img_path, 3), _read_idx(lbl_path, 1)
        if len(images) != len(labels):
            raise DataSourceError(
                f"{img_path} holds {len(images)} images but {lbl_path} holds {len(labels)} labels; "
                "the files do not belong together"
            )
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise DataSourceError(f"{lbl_path}: label {int(labels.max())} outside 0..{len(FASHION_MNIST_CLASSES) - 1}")
        splits[split] = [
            Record(key=f"{split}_{i:08d}", label=int(labels[i]), source_id=f"{img_path.name}#{i}", pixels=images[i])
            for i in range(len(images))
        ]
    return splits, list(FASHION_MNIST_CLASSES)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "x"


def _scan_class_tree(root: Path, what: str) -> dict[str, list[Path]]:
    if not root.is_dir():
        raise DataSourceError(
            f"{what} directory {root} not found: expected one sub-folder per class holding JPEG/PNG images "
            "(the ImageNet layout); check prepare.root / prepare.train_dir / prepare.val_dir"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataSourceError(f"{what} directory {root} has no class sub-folders (expected <root>/<class>/<image>.jpg)")
    tree: dict[str, list[Path]] = {}
    for name in classes:
        files = sorted(
            p for p in (root / name).rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )  # fmt: skip
        if not files:
            raise DataSourceError(
                f"class folder {root / name} holds no JPEG/PNG images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "remove the folder or add images"
            )
        tree[name] = files
    return tree


def _records(tree: dict[str, list[Path]], root: Path, classes: list[str], split: str) -> list[Record]:
    import hashlib

    index = {name: i for i, name in enumerate(classes)}
    out = []
    for name, files in tree.items():
        for p in files:
            rel = p.relative_to(root).as_posix()
            digest = hashlib.sha1(rel.encode()).hexdigest()[:16]
            out.append(Record(key=f"{split}_{_safe(name)}_{digest}", label=index[name], source_id=rel, path=p))
    return out


def scan_imagefolder(
    root: Union[str, Path], train_dir: str, val_dir: Optional[str], val_fraction: float, seed: int
) -> tuple[dict[str, list[Record]], list[str]]:
    """Scan an ImageFolder tree. Class index = position in the sorted train class-folder names.

    Without ``val_dir`` a seeded ``val_fraction`` of each class (at least one image, and never a
    class's last image) is held out for validation.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataSourceError(f"imagefolder root {root} not found: set prepare.root to your dataset directory")
    train_root = root / train_dir
    train_tree = _scan_class_tree(train_root, "imagefolder train")
    classes = sorted(train_tree)
    if val_dir is not None:
        val_root = root / val_dir
        val_tree = _scan_class_tree(val_root, "imagefolder val")
        unknown = sorted(set(val_tree) - set(classes))
        if unknown:
            raise DataSourceError(
                f"val directory {val_root} has class folders not in {train_root}: {unknown}; "
                "both trees must use the same class folder names"
            )
        return {
            "train": _records(train_tree, train_root, classes, "train"),
            "val": _records(val_tree, val_root, classes, "val"),
        }, classes
    rng = np.random.default_rng(seed)
    train_part: dict[str, list[Path]] = {}
    val_part: dict[str, list[Path]] = {}
    for name in classes:
        files = train_tree[name]
        if len(files) < 2:
            raise DataSourceError(
                f"class folder {train_root / name} has {len(files)} image; holding out a validation share "
                "needs at least 2 per class (or give prepare.val_dir)"
            )
        n_val = min(len(files) - 1, max(1, round(val_fraction * len(files))))
        held = set(rng.permutation(len(files))[:n_val].tolist())
        val_part[name] = [f for i, f in enumerate(files) if i in held]
        train_part[name] = [f for i, f in enumerate(files) if i not in held]
    return {
        "train": _records(train_part, train_root, classes, "train"),
        "val": _records(val_part, train_root, classes, "val"),
    }, classes


def load_synthetic_parts(train: int, val: int, size: int, seed: int) -> tuple[dict[str, list[Record]], list[str]]:
    """Generate the ``synthetic_parts`` pools: ``train`` images of its split ``train`` (the caller carves the
    hold-out out of them) and ``val`` of its split ``val``, ``size`` pixels per side, class-balanced, each a
    pure function of ``(seed, split, index, size)``, with its part mask. Class names:
    :data:`pipeline.data.synthetic_parts.CLASSES`."""
    from pipeline.data import synthetic_parts as sp  # numpy + PIL drawing; it imports this module

    splits = {
        split: [Record(key=s.key, label=s.label, source_id=f"synthetic_parts/{split}/{i}", pixels=s.image, mask=s.mask)
                for i, s in enumerate(sp.generate(n, size, seed, split, balanced=True))]
        for split, n in (("train", train), ("val", val))
    }  # fmt: skip
    return splits, list(sp.CLASSES)
