"""A trained part source as export_parts reads it (the learner, k-means centroids, or none for attention
heads and ground truth) and the teacher whose tokens it reads. Kept apart from ``build.py`` so export_parts does not depend
on (and is not rerun for) the part learner's training code."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from pipeline.features import FeatureError
from pipeline.models.checkpoint import CheckpointError, load_torch_file
from pipeline.parts.model import PartLearner
from pipeline.teacher.load import teacher_vit

__all__ = ["PARTS_CHECKPOINT", "KMeansParts", "load_part_learner", "parts_teacher", "random_teacher"]

PARTS_CHECKPOINT = "part_learner.pth"


class KMeansParts(torch.nn.Module):
    """Parts = nearest (cosine) of N k-means centroids of the teacher's patch tokens; same interface as
    :class:`PartLearner` for export (``part_logits``)."""

    def __init__(self, centers: torch.Tensor, grid: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("centers", centers)
        self.grid = tuple(grid)

    def part_logits(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """Cosine similarities ``[B, N, H, W]`` (softmax then argmax = nearest centroid)."""
        sim = F.normalize(patches.float(), dim=-1) @ self.centers.T  # [B, L, N]
        return sim.transpose(1, 2).reshape(sim.shape[0], -1, *self.grid) / 0.01


def random_teacher(tcfg, seed: int):
    torch.manual_seed(seed + 999)
    return teacher_vit(tcfg).eval()


def _read(path: Path) -> dict:
    """The saved part source; any damage is a clear error naming the file (never a traceback)."""
    if not path.is_file():
        raise FeatureError(f"{path} not found: run the train_parts stage first")
    remedy = f"restore it (dvc checkout {path.parent}) or rerun the train_parts stage (dvc repro train_parts)"
    obj = load_torch_file(path, remedy)
    meta = obj.get("meta")
    if not isinstance(meta, dict) or not isinstance(meta.get("method"), str):
        raise CheckpointError(f"{path} holds no part-learner description ('meta'): {remedy}")
    return obj


def parts_teacher(vit, tcfg, parts_dir: str | Path):
    """The ViT whose tokens the saved parts read: ``vit`` itself, or the random teacher stored by
    ``method: random_teacher``."""
    obj = _read(Path(parts_dir) / PARTS_CHECKPOINT)
    if "teacher_state" not in obj:
        return vit
    rand = teacher_vit(tcfg)
    rand.load_state_dict(obj["teacher_state"], strict=True)
    return rand.eval()


def load_part_learner(path: str | Path) -> tuple[Optional[PartLearner], dict]:
    """A saved part learner (None for attention heads and ground truth) and its description (plain dict)."""
    path = Path(path)
    obj = _read(path)
    meta = obj["meta"]
    if meta["method"] in ("attention_heads", "ground_truth"):
        return None, meta
    if meta["method"] == "kmeans":
        return KMeansParts(obj["state_dict"]["centers"], tuple(meta["grid"])).eval(), meta
    model = PartLearner(meta["dim"], tuple(meta["grid"]), meta["num_parts"], meta["image_size"], meta["decoder_channels"],
                        meta["style_dim"], meta["blur_size"], meta["blur_sigma"], temperature=meta["temperature"],
                        tokens=meta.get("tokens", "mlp"))  # fmt: skip  (parts saved before the token forms: mlp)
    model.load_state_dict(obj["state_dict"], strict=True)
    return model.eval(), meta
