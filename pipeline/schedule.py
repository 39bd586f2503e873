"""Per-iteration learning-rate schedule shared by the trainings: linear warm-up, half-cycle cosine."""

from __future__ import annotations

import math

__all__ = ["warmup_cosine"]


def warmup_cosine(epoch: float, epochs: float, warmup_epochs: float, peak: float, final: float = 0.0) -> float:
    """lr at fractional ``epoch``: ``peak * epoch / warmup_epochs`` during warm-up, then a half-cycle
    cosine from ``peak`` to ``final`` at ``epochs`` (MAE's ``adjust_learning_rate``)."""
    if epoch < warmup_epochs:
        return peak * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * min(epoch - warmup_epochs, span) / span))
