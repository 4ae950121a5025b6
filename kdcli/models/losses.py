"""Quality Focal Loss (classes) and Balanced L1 (boxes), and the detection loss that combines them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdcli.config.schema import ModelConfig
from kdcli.models.anchors import decode, encode
from kdcli.models.assign import Assignment, Targets, assign_iou, assign_mg
from kdcli.models.detector import DetectorOutput


def quality_focal_loss(logits: torch.Tensor, target: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Element-wise |t - sigmoid(x)|^beta * BCE(x, t) (Li et al., Generalized Focal Loss)."""
    p = torch.sigmoid(logits)
    return (target - p).abs().pow(beta) * F.binary_cross_entropy_with_logits(logits, target, reduction="none")


def balanced_l1(pred: torch.Tensor, target: torch.Tensor, alpha: float = 0.5, gamma: float = 1.5,
                beta: float = 0.11) -> torch.Tensor:
    """Element-wise Balanced L1 (Pang et al., Libra R-CNN); continuous at |x| = beta."""
    diff = (pred - target).abs()
    b = math.exp(gamma / alpha) - 1
    return torch.where(diff < beta,
                       alpha / b * (b * diff + 1) * torch.log(b * diff / beta + 1) - alpha * diff,
                       gamma * diff + gamma / b - alpha * beta)


class DetectionLoss:
    """Assigns the anchors of the whole batch at once, then the class loss over every valid (anchor, class) entry
    (normalised by the classification positives) and Balanced L1 over the box positives (mean over the 4
    coordinates, weighted mean over anchors: mg weights by q_cls, iou weights 1), as the reference's MultiBoxLoss
    reduces them. The class loss (`model.cls_loss`) is by default QFL on the assigner's targets: mg's qualities, or
    iou's binary targets with an ignored anchor's own class entry left out (the reference's `gfc`, which the
    authors' students ran); `focal` is QFL on binary targets times the alpha balance (alpha t + (1 - alpha)(1 - t)),
    the reference's `fc` (with its gamma 1 and weight 1 when qfl_beta and cls_weight are set to 1)."""

    def __init__(self, cfg: ModelConfig, num_classes: int):
        self.cfg = cfg
        self.num_classes = num_classes

    def class_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Element-wise class loss (`model.cls_loss`): `qfl` on the assigner's targets; `focal` on their binary
        form (positive where the target is above 0), QFL times the alpha balance."""
        cfg = self.cfg
        if cfg.cls_loss == "qfl":
            return quality_focal_loss(logits, target, cfg.qfl_beta)
        t = (target > 0).to(logits.dtype)
        return quality_focal_loss(logits, t, cfg.qfl_beta) * (cfg.focal_alpha * t + (1 - cfg.focal_alpha) * (1 - t))

    def assign(self, out: DetectorOutput, boxes: list[torch.Tensor], labels: list[torch.Tensor]) -> Assignment:
        cfg = self.cfg
        gt = Targets.from_lists(boxes, labels, out.anchors.device)
        pred_boxes = decode(out.box_deltas.detach().float(), out.anchors)
        if cfg.assigner == "mg":
            return assign_mg(out.anchors, pred_boxes, out.cls_logits.detach(), gt, self.num_classes, cfg.mg_sigma,
                             cfg.mg_topk)
        return assign_iou(out.anchors, pred_boxes, gt, self.num_classes, cfg.pos_iou, cfg.neg_iou)

    def __call__(self, out: DetectorOutput, boxes: list[torch.Tensor], labels: list[torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        cls_logits, deltas = out.cls_logits.float(), out.box_deltas.float()
        a = self.assign(out, boxes, labels)
        cls_loss = (self.class_loss(cls_logits, a.cls_target) * a.cls_valid).sum() / a.num_pos.clamp(min=1)
        # every anchor is encoded (no host sync on the positives' count); non-positives weigh 0
        gt_deltas = encode(a.box_gt, out.anchors.expand_as(a.box_gt))
        bl1 = balanced_l1(deltas, gt_deltas, cfg.bl1_alpha, cfg.bl1_gamma, cfg.bl1_beta).mean(-1)
        box_loss = (bl1 * a.box_weight).sum() / a.box_weight.sum().clamp(min=1e-6)
        cls_loss, box_loss = cfg.cls_weight * cls_loss, cfg.box_weight * box_loss
        return {"cls": cls_loss, "box": box_loss, "total": cls_loss + box_loss}
