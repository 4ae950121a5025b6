"""Feature imitation by plain MSE (methods.md; multas' `mse` mode): weight x the mean of (adapt(f_s) - f_t)^2
over all locations of all levels together, channels and batch. Levels are concatenated, so each counts by its
number of locations and stride 8, where small vehicles live, dominates (not the mean of per-level means)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from kdcli.config.base import Strict
from kdcli.distill.base import DistillMethod, register
from kdcli.models.detector import DetectorOutput


class MSEConfig(Strict):
    weight: float = Field(5.0, ge=0, description="weight of the adapted-feature MSE")


@register
class MSE(DistillMethod):
    name = "mse"
    config = MSEConfig
    adapter = "paper"

    def loss(self, student: DetectorOutput, teacher: DetectorOutput, batch: dict[str, Any]
             ) -> dict[str, torch.Tensor]:
        sq = torch.cat([(s.float() - t.float()).pow(2).flatten(2) for s, t in zip(student.features, teacher.features)],
                       dim=2)
        return {"mse": self.cfg.weight * sq.mean()}
