"""CrossKD: cross-head knowledge distillation (Wang, Chen et al., CVPR 2024, "CrossKD: Cross-Head Knowledge
Distillation for Object Detection"; reference: jbwang1997/CrossKD, its `CrossKDRetinaNet` and RetinaNet configs).

The student's head towers, cut at block `tap`, feed the frozen teacher's remaining head blocks and output convs;
those cross-head predictions mimic the teacher's own. The student's head is then pulled only by the ground truth,
while the teacher's signal reaches its trunk, neck and first head blocks through the frozen teacher layers
(gradients flow through them; their weights never change and stay out of every checkpoint).

Per level and branch (class, box), as the reference's `reuse_teacher_head`:
- x = the student tower's output after `tap` blocks (conv + norm + activation: what the reference really holds,
  since its in-place ReLU acts on the held tensor), standardised per channel over (batch, H, W) (unbiased std +
  1e-6) and given the teacher's per-channel std and mean at the same block (`align_scale`; teacher statistics
  carry no gradient); then the block activation (the reference's ReLU, ours LeakyReLU 0.1) when tap > 0;
- the teacher's blocks tap.. and its 1x1 output conv on x: cross logits s and cross deltas.

Terms, over every anchor (ours has no ignore band to leave out):
- class: KD quality focal loss with the teacher's sigmoid scores as targets, BCE(s, sigmoid(t)) x
  |sigmoid(s) - sigmoid(t)|^beta (beta 1), summed over anchors and classes;
- box: 1 - GIoU between the boxes decoded from the cross deltas and from the teacher's deltas (the reference's
  RetinaNet decodes both with the same anchors), weighted per anchor by the teacher's max class score;
both divided by one normaliser, weights 1 and 1 (the reference's RetinaNet values).

Departures, each for a reason of this detector:
- tap: the reference crosses at `reused_teacher_head_idx` 3 of 4 head blocks, so the teacher runs its last block
  and the output convs; our head has `head_convs` (2) blocks, so the default crosses after the student's
  second-to-last block (tap = head_convs - 1 = 1), the same place relative to the output.
- normaliser: the reference divides both terms by the number of ground-truth positives of its assigner; here it
  is the sum of the teacher's max class scores over the batch's anchors (what the reference's GFL config divides
  its box term by), clamped at 1, because a `soft` student has no assignment and an unlabelled image no ground
  truth, and CrossKD must work on both. Measured on the CPU study's teacher (16 training images, 27 boxes): the
  sum is 615 where Mutual Guidance assigns 261 positives, so at equal weights the terms are ~2.4x smaller than
  with the reference's normaliser (`crosskd.cls_weight` / `box_weight` scale them back).
- widths: when student and teacher channels differ, a learnable 1x1 conv per level and branch maps the student's
  tower output to the teacher's width before `align_scale` (the reference assumes equal widths).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torchvision.ops import generalized_box_iou_loss

from kdcli.config.base import Strict
from kdcli.distill.base import DistillMethod, register
from kdcli.models.anchors import decode
from kdcli.models.detector import DetectorOutput

ACTIVATION_SLOPE = 0.1  # the head blocks' LeakyReLU (models/blocks.py)


class CrossKDConfig(Strict):
    tap: int | None = Field(None, ge=0, description="head block where the student's towers cross into the teacher's "
                                                    "(default: head_convs - 1, the reference's 3 of 4)")
    cls_weight: float = Field(1.0, ge=0, description="weight of the cross-head class KD term (reference: 1)")
    box_weight: float = Field(1.0, ge=0, description="weight of the cross-head GIoU term (reference: 1)")
    beta: float = Field(1.0, ge=0, description="exponent of |p_s - p_t| in the class KD term (reference: 1)")


def kd_quality_focal(logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Element-wise BCE(s, sigmoid(t)) x |sigmoid(s) - sigmoid(t)|^beta (the reference's KDQualityFocalLoss)."""
    target = torch.sigmoid(teacher_logits)
    weight = (torch.sigmoid(logits) - target).abs().pow(beta)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight


def align_scale(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The student's map standardised per channel over (N, H, W) and given the teacher's per-channel std and
    mean (teacher statistics detached)."""
    s = student.float()
    t = teacher.detach().float()
    dims = (0, 2, 3)
    z = (s - s.mean(dims, keepdim=True)) / (s.std(dims, keepdim=True) + 1e-6)
    return z * (t.std(dims, keepdim=True) + 1e-6) + t.mean(dims, keepdim=True)


@register
class CrossKD(DistillMethod):
    name = "crosskd"
    config = CrossKDConfig
    needs_teacher_head = True

    def __init__(self, cfg: Any, channels: int = 256, levels: int = 1, teacher: Any = None,
                 student_channels: int | None = None):
        super().__init__(cfg, channels, levels, teacher, student_channels)
        if teacher is None:
            raise ValueError("crosskd runs the teacher's head: give the teacher")
        object.__setattr__(self, "_teacher_head", teacher.head)  # frozen, not a submodule: never saved or trained
        width = student_channels or channels
        self.widths = (nn.ModuleList(nn.Conv2d(width, channels, 1) for _ in range(2 * levels))
                       if width != channels else None)

    def head_tap(self, head_convs: int) -> int:
        tap = head_convs - 1 if self.cfg.tap is None else self.cfg.tap
        if not 0 <= tap <= head_convs:
            from kdcli.errors import KdcliError

            raise KdcliError(f"crosskd.tap={tap}: the head has {head_convs} blocks per branch",
                             hint=f"use 0..{head_convs}")
        return tap

    def cross_outputs(self, student: DetectorOutput, teacher: DetectorOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher head's (class logits, box deltas) [B, A, K], [B, A, 4] computed from the student's towers."""
        tap = self.head_tap(len(self._teacher_head.levels[0].cls_tower))
        cls_maps, box_maps = [], []
        for i, (level, (s_c, s_b), (t_c, t_b)) in enumerate(zip(self._teacher_head.levels, student.towers,
                                                                 teacher.towers)):
            xs = []
            for j, (s, t) in enumerate(((s_c, t_c), (s_b, t_b))):
                s = self.widths[2 * i + j](s) if self.widths is not None else s
                x = align_scale(s, t).to(t.dtype)
                xs.append(F.leaky_relu(x, ACTIVATION_SLOPE) if tap > 0 else x)
            c, b = level.finish(xs[0], xs[1], tap)
            cls_maps.append(c)
            box_maps.append(b)
        return self._teacher_head.flatten(cls_maps, box_maps)

    def loss(self, student: DetectorOutput, teacher: DetectorOutput, batch: dict[str, Any]
             ) -> dict[str, torch.Tensor]:
        c = self.cfg
        cross_cls, cross_box = self.cross_outputs(student, teacher)
        t_cls, t_box = teacher.cls_logits.float(), teacher.box_deltas.float()
        weight = torch.sigmoid(t_cls.max(-1).values)  # [B, A] the teacher's max class score
        norm = weight.sum().clamp(min=1.0)
        cls = kd_quality_focal(cross_cls.float(), t_cls, c.beta).sum() / norm
        anchors = teacher.anchors.expand(t_box.shape[0], -1, -1)
        giou = generalized_box_iou_loss(decode(cross_box.float(), anchors).reshape(-1, 4),
                                        decode(t_box, anchors).reshape(-1, 4))
        box = (giou * weight.reshape(-1)).sum() / norm
        return {"crosskd_cls": c.cls_weight * cls, "crosskd_box": c.box_weight * box}
