"""Weighted k-NN classification on frozen features (cosine similarity), as in DINO/iBOT."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["knn_accuracy"]


@torch.no_grad()
def knn_accuracy(
    train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor, val_labels: torch.Tensor,
    k: int = 20, temperature: float = 0.07, chunk: int = 1024,
) -> float:  # fmt: skip
    """Top-1 accuracy of a cosine k-NN vote weighted by ``exp(sim / temperature)``; train = memory bank."""
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, bank.shape[0])
    correct = 0
    for start in range(0, val_features.shape[0], chunk):
        q = F.normalize(val_features[start : start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        correct += int((votes.argmax(1) == val_labels[start : start + chunk]).sum())
    return correct / val_features.shape[0]
