"""Soft labels: the teacher's outputs as targets over every anchor (methods.md; multas' `soft` mode).

Class term, the authors' joint focal form with a soft target t = sigmoid(teacher logit), p = sigmoid(student):
  (alpha t + (1 - alpha)(1 - t)) * ((1 - p) t + p (1 - t))^gamma * BCE(student logit, t),
mean over all anchors x classes, times `cls_weight` (5e3: that mean is tiny). Its optimum stays near the
teacher's score (0.99 for t = 0.95), where the split form alpha t (1-p)^gamma (-log p) +
(1-alpha)(1-t) p^gamma (-log(1-p)), which agrees with it only for binary targets, pulls the student away
(0.74 for t = 0.95). Box term: Balanced L1 between student and teacher box deltas, mean over
all anchors x 4 coordinates, times `box_weight`.
`score_weighted` (beyond the paper, after Soft Teacher's reliability weights): each target counts as much as the
teacher is sure of it, rather than a hard threshold, for teachers that err (one trained on as few labels as the
student): the class term weighted by |2t - 1| per anchor and class (confident objects and confident background
count, scores near 0.5 hardly), the box term by the teacher's max class score per anchor (its box means something
only where it sees an object); each a weighted mean, so its scale stays that of the plain mean.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from kdcli.config.base import Strict
from kdcli.distill.base import DistillMethod, register
from kdcli.models.detector import DetectorOutput
from kdcli.models.losses import balanced_l1


class SoftConfig(Strict):
    """Soft labels: the teacher's outputs as targets (methods.md)."""

    cls_weight: float = Field(5e3, ge=0, description="weight of the focal BCE on teacher probabilities (its mean "
                                                      "over every anchor and class is tiny, hence 5e3)")
    alpha: float = Field(0.25, ge=0, le=1, description="focal alpha of the soft class term")
    gamma: float = Field(1.0, ge=0, description="focal gamma of the soft class term")
    box_weight: float = Field(1.0, ge=0, description="weight of balanced L1 between student and teacher deltas")
    score_weighted: bool = Field(False, description="weight each target by the teacher's certainty: class by "
                                                    "|2t - 1|, box by the teacher's max score (weighted means)")


def soft_focal_bce(logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Element-wise joint focal BCE with soft targets (the focal weight is not detached, as in the reference)."""
    p = torch.sigmoid(logits)
    pt = (1 - p) * target + p * (1 - target)
    weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    return weight * F.binary_cross_entropy_with_logits(logits, target, reduction="none")


def weighted_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum(w x) / sum(w); zero where every weight is zero (a teacher that is sure of nothing teaches nothing)."""
    return (w * x).sum() / w.sum().clamp_min(1e-12)


@register
class Soft(DistillMethod):
    name = "soft"
    config = SoftConfig
    kind = "labels"
    needs_teacher_head = True

    def loss(self, student: DetectorOutput, teacher: DetectorOutput, batch: dict[str, Any]
             ) -> dict[str, torch.Tensor]:
        c = self.cfg
        target = torch.sigmoid(teacher.cls_logits.float()).detach()
        cls = soft_focal_bce(student.cls_logits.float(), target, c.alpha, c.gamma)
        box = balanced_l1(student.box_deltas.float(), teacher.box_deltas.float()).mean(-1)
        if c.score_weighted:
            cls = weighted_mean(cls, (2 * target - 1).abs())
            box = weighted_mean(box, target.amax(-1))
        else:
            cls, box = cls.mean(), box.mean()
        return {"soft_cls": c.cls_weight * cls, "soft_box": c.box_weight * box}
