"""CWD: channel-wise distillation (Shu et al., ICCV 2021, "Channel-wise Knowledge Distillation for Dense
Prediction"; reference: mmrazor's `ChannelWiseDivergence` and the authors' mmdetection-distiller configs).

Each channel of a level's student map (aligned by a 1x1 conv only when the widths differ, as the reference's
connector) and of the teacher's map becomes a distribution over the H x W locations, softmax(x / tau); the
level's term is KL(teacher || student) x tau^2, averaged over the batch and channels (the reference divides the
sum by N x C); the first `levels` levels are distilled, each weighted, and summed:

    cwd = weight x sum_{l < levels} [ tau^2 / (N C) x sum_{n,c} sum_hw p_t log(p_t / p_s) ]

Defaults are the authors' RetinaNet setting (mmdetection-distiller,
`cwd_retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco`): tau 1.0, weight 5.0 per level on `fpn_convs` 0-3,
the first 4 of RetinaNet's 5 levels (strides 8-64; our 4-level pyramid below 512 px has exactly these).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from kdcli.config.base import Strict
from kdcli.distill.base import DistillMethod, register
from kdcli.models.detector import DetectorOutput


class CWDConfig(Strict):
    tau: float = Field(1.0, gt=0, description="softmax temperature over locations (authors' detection setting: 1)")
    weight: float = Field(5.0, ge=0, description="weight per level, levels summed (authors' RetinaNet: 5)")
    levels: int = Field(4, ge=1, description="distil the first this many levels (authors' RetinaNet: 4 of 5)")


def channel_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 x KL(softmax_hw(t / tau) || softmax_hw(s / tau)), summed over locations, averaged over N x C."""
    s = student.float().flatten(2) / tau
    t = teacher.float().flatten(2) / tau
    log_pt = F.log_softmax(t, dim=2)
    kl = (log_pt.exp() * (log_pt - F.log_softmax(s, dim=2))).sum(2)  # [N, C]
    return kl.mean() * tau**2


@register
class CWD(DistillMethod):
    name = "cwd"
    config = CWDConfig
    adapter = "align"

    def loss(self, student: DetectorOutput, teacher: DetectorOutput, batch: dict[str, Any]
             ) -> dict[str, torch.Tensor]:
        pairs = list(zip(student.features, teacher.features))[:self.cfg.levels]
        return {"cwd": self.cfg.weight * torch.stack([channel_kl(s, t, self.cfg.tau) for s, t in pairs]).sum()}
