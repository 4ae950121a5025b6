"""Soft labels: the teacher's outputs as targets over every anchor.

Class term: focal-weighted BCE against p_t = sigmoid(teacher logit),
  alpha t (1 - p)^gamma (-log p) + (1 - alpha)(1 - t) p^gamma (-log(1 - p)),
mean over all anchors x classes, times `cls_weight` (5e3: that mean is tiny). Box term: Balanced L1 between
student and teacher box deltas, summed over the 4 coordinates, mean over anchors, times `box_weight`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kdcli.distill.base import DistillMethod, register
from kdcli.models.detector import DetectorOutput
from kdcli.models.losses import balanced_l1


def soft_focal_bce(logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Element-wise focal BCE with soft targets."""
    p = torch.sigmoid(logits)
    pos = alpha * target * (1 - p).pow(gamma) * F.binary_cross_entropy_with_logits(logits, torch.ones_like(p),
                                                                                     reduction="none")
    neg = (1 - alpha) * (1 - target) * p.pow(gamma) * F.binary_cross_entropy_with_logits(
        logits, torch.zeros_like(p), reduction="none")
    return pos + neg


@register
class Soft(DistillMethod):
    name = "soft"
    needs_teacher_head = True

    def loss(self, student: DetectorOutput, teacher: DetectorOutput, batch: dict[str, Any]
             ) -> dict[str, torch.Tensor]:
        c = self.cfg.soft
        target = torch.sigmoid(teacher.cls_logits.float())
        cls = soft_focal_bce(student.cls_logits.float(), target, c.alpha, c.gamma).mean()
        box = balanced_l1(student.box_deltas.float(), teacher.box_deltas.float()).sum(-1).mean()
        return {"soft_cls": c.cls_weight * cls, "soft_box": c.box_weight * box}
