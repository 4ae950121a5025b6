"""Feature imitation by plain MSE: weight x mean over levels of mean((adapt(f_s) - f_t)^2)."""

from __future__ import annotations

from typing import Any

import torch

from kdcli.distill.base import DistillMethod, register
from kdcli.models.detector import DetectorOutput


@register
class MSE(DistillMethod):
    name = "mse"
    uses_adapters = True

    def loss(self, student: DetectorOutput, teacher: DetectorOutput, batch: dict[str, Any]
             ) -> dict[str, torch.Tensor]:
        adapted = self.adapters(student.features)
        per_level = [(s.float() - t.float()).pow(2).mean() for s, t in zip(adapted, teacher.features)]
        return {"feat": self.cfg.mse.weight * torch.stack(per_level).mean()}
