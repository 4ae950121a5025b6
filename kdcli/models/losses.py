"""Quality Focal Loss (classes) and Balanced L1 (boxes), and the detection loss that combines them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdcli.config.schema import ModelConfig
from kdcli.models.anchors import decode, encode
from kdcli.models.assign import assign_iou, assign_mg
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
    """Assigns anchors per image, then QFL over all valid anchors and Balanced L1 over box positives."""

    def __init__(self, cfg: ModelConfig, num_classes: int):
        self.cfg = cfg
        self.num_classes = num_classes

    def __call__(self, out: DetectorOutput, boxes: list[torch.Tensor], labels: list[torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        cls_logits, deltas = out.cls_logits.float(), out.box_deltas.float()
        anchors = out.anchors
        with torch.no_grad():
            pred_boxes = decode(deltas.detach(), anchors)
        targets, valid, box_pos, box_gt, box_w = [], [], [], [], []
        num_pos = 0
        for i in range(cls_logits.shape[0]):
            gt, lab = boxes[i].to(anchors.device).float(), labels[i].to(anchors.device).long()
            if cfg.assigner == "mg":
                a = assign_mg(anchors, pred_boxes[i], cls_logits[i].detach(), gt, lab, self.num_classes,
                              cfg.mg_sigma, cfg.mg_topk)
            else:
                a = assign_iou(anchors, pred_boxes[i], gt, lab, self.num_classes, cfg.pos_iou, cfg.neg_iou)
            targets.append(a.cls_target)
            valid.append(a.cls_valid)
            box_pos.append(a.box_pos)
            box_gt.append(a.box_gt)
            box_w.append(a.box_weight)
            num_pos += a.num_pos
        target, valid_m = torch.stack(targets), torch.stack(valid)
        qfl = quality_focal_loss(cls_logits, target, cfg.qfl_beta).sum(-1)
        cls_loss = (qfl * valid_m).sum() / max(1, num_pos)
        pos = torch.stack(box_pos)
        if pos.any():
            gt_deltas = encode(torch.stack(box_gt)[pos], anchors[None].expand(pos.shape[0], -1, -1)[pos])
            w = torch.stack(box_w)[pos]
            bl1 = balanced_l1(deltas[pos], gt_deltas, cfg.bl1_alpha, cfg.bl1_gamma, cfg.bl1_beta).sum(-1)
            box_loss = (bl1 * w).sum() / w.sum().clamp(min=1e-6)
        else:
            box_loss = deltas.sum() * 0.0
        cls_loss, box_loss = cfg.cls_weight * cls_loss, cfg.box_weight * box_loss
        return {"cls": cls_loss, "box": box_loss, "total": cls_loss + box_loss}
