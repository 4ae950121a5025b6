"""Exponential moving average of the weights (and float buffers): decay * (1 - exp(-updates / tau)).

One fused multiply-add over every tensor (`torch._foreach_*`) per update rather than a Python loop over them:
on a CPU the per-tensor loop cost a tenth of the training step.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float = 0.9998, tau: float = 2000, updates: int = 0):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates
        self._pairs: tuple[int, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None
        self._pairs = None

    def _tensors(self, model: nn.Module):
        """(float EMA tensors, their model tensors, other EMA tensors, theirs), cached per model object (the
        optimizer and state loading update tensors in place, so the pairs stay valid)."""
        if self._pairs is None or self._pairs[0] != id(model):
            msd, esd = model.state_dict(keep_vars=True), self.module.state_dict(keep_vars=True)
            floats = [k for k, v in esd.items() if v.dtype.is_floating_point]
            others = [k for k, v in esd.items() if not v.dtype.is_floating_point]
            self._pairs = (id(model), [esd[k].data for k in floats], [msd[k].data for k in floats],
                           [esd[k].data for k in others], [msd[k].data for k in others])
        return self._pairs[1:]

    def decay_at(self, updates: int) -> float:
        return self.decay * (1 - math.exp(-updates / self.tau))

    def window(self, updates: int) -> float:
        """How many recent steps the average effectively spans after `updates` updates: 1 / (1 - decay)."""
        return 1 / (1 - self.decay_at(updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay_at(self.updates)
        ema_f, model_f, ema_o, model_o = self._tensors(model)
        torch._foreach_mul_(ema_f, d)
        torch._foreach_add_(ema_f, model_f, alpha=1 - d)
        for e, m in zip(ema_o, model_o):
            e.copy_(m)
