"""LARS as MAE's linear probe uses it (You et al., 2017; MAE ``util/lars.py``).

For a parameter with ``ndim > 1`` the step direction ``d = grad + wd * p`` is rescaled by the trust
ratio ``trust_coefficient * ||p|| / ||d||`` (1 when either norm is 0); parameters with ``ndim <= 1``
(biases, norm weights) get neither weight decay nor the rescaling. Then heavy-ball momentum
``mu = momentum * mu + d`` and ``p -= lr * mu``.

timm's ``Lars`` differs where it matters here: with ``weight_decay=0`` (the probe's setting) it
skips the trust ratio entirely unless ``always_adapt=True``, i.e. it degrades to SGD.
"""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["LARS"]


class LARS(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:  # fmt: skip
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(f"invalid LARS settings lr={lr} weight_decay={weight_decay} momentum={momentum} "
                             f"trust_coefficient={trust_coefficient}")  # fmt: skip
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "trust_coefficient": trust_coefficient}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    ratio = group["trust_coefficient"] * p_norm / d_norm
                    ratio = torch.where((p_norm > 0) & (d_norm > 0), ratio, torch.ones_like(ratio))
                    d = d.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(d)
                p.add_(mu, alpha=-group["lr"])
        return loss
