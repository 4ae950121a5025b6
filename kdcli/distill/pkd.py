"""PKD: feature imitation through the Pearson correlation (Cao et al., NeurIPS 2022, "PKD: General Distillation
Framework for Object Detectors via Pearson Correlation Coefficient"; reference: mmrazor's `PKDLoss`).

Each level's student and teacher maps are normalised per channel to zero mean and unit standard deviation over
(batch, H, W) (the unbiased std + 1e-6, as the reference), then compared by MSE / 2, which equals 1 - r per
channel; the levels are summed and weighted, as the reference does:

    pkd = weight x sum_l mean((norm(f_s) - norm(f_t))^2) / 2

Because the normalisation removes each channel's scale and offset, no adapter is needed when the widths match
(the student's own features are compared); with different widths the student's features pass the adapters.
Default weight 10: mmrazor's RetinaNet setting (`pkd_fpn_retina_x101_retina_r50_2x_coco`: loss_weight 10 per level).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from kdcli.config.base import Strict
from kdcli.distill.base import DistillMethod, register
from kdcli.models.detector import DetectorOutput


class PKDConfig(Strict):
    weight: float = Field(10.0, ge=0, description="weight per level (reference RetinaNet setting: 10)")


def channel_standardised(x: torch.Tensor) -> torch.Tensor:
    """Per channel over (batch, H, W): (x - mean) / (unbiased std + 1e-6)."""
    flat = x.float().transpose(0, 1).flatten(1)  # [C, N H W]
    z = (flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-6)
    return z.view(x.shape[1], x.shape[0], *x.shape[2:]).transpose(0, 1)


@register
class PKD(DistillMethod):
    name = "pkd"
    config = PKDConfig
    uses_adapters = True

    @classmethod
    def adapts(cls, student_channels: int, teacher_channels: int) -> bool:
        return student_channels != teacher_channels

    def loss(self, student: DetectorOutput, teacher: DetectorOutput, batch: dict[str, Any]
             ) -> dict[str, torch.Tensor]:
        per_level = [(channel_standardised(s) - channel_standardised(t)).pow(2).mean() / 2
                     for s, t in zip(student.features, teacher.features)]
        return {"pkd": self.cfg.weight * torch.stack(per_level).sum()}
