"""Anchor assignment for one image: which anchors learn which ground-truth box, and with what targets.

`iou`: max-IoU matching (positive >= pos_iou, negative < neg_iou, ignored between; each GT's best anchor is
forced positive). `mg`: Mutual Guidance (methods.md): localisation quality picks the anchors that learn to
classify, classification-aware quality picks the anchors that learn to regress. In both, the class target of a
positive is the IoU of its *predicted* box with its GT (Quality Focal Loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import box_iou


@dataclass
class Assignment:
    cls_target: torch.Tensor  # [A, K] quality on the GT class of positives, 0 elsewhere
    cls_valid: torch.Tensor  # [A] bool: anchors that contribute to the class loss (False = ignored)
    box_pos: torch.Tensor  # [A] bool: anchors that regress a box
    box_gt: torch.Tensor  # [A, 4] the GT box each anchor regresses (valid where box_pos)
    box_weight: torch.Tensor  # [A] weight of each anchor's box loss
    num_pos: int  # positives for normalising the class loss


def _empty(num_anchors: int, num_classes: int, device: torch.device) -> Assignment:
    z = torch.zeros(num_anchors, dtype=torch.bool, device=device)
    return Assignment(torch.zeros(num_anchors, num_classes, device=device), ~z, z,
                      torch.zeros(num_anchors, 4, device=device), torch.zeros(num_anchors, device=device), 0)


def assign_iou(anchors: torch.Tensor, pred_boxes: torch.Tensor, gt: torch.Tensor, labels: torch.Tensor,
               num_classes: int, pos_iou: float = 0.5, neg_iou: float = 0.4) -> Assignment:
    if len(gt) == 0:
        return _empty(len(anchors), num_classes, anchors.device)
    iou = box_iou(gt, anchors)  # [M, A]
    best_iou, best_gt = iou.max(0)
    pos = best_iou >= pos_iou
    forced = iou.argmax(1)  # each GT's best anchor
    best_gt[forced] = torch.arange(len(gt), device=gt.device)
    pos[forced] = True
    valid = pos | (best_iou < neg_iou)
    matched = gt[best_gt]
    quality = box_iou_pairwise(pred_boxes, matched).clamp(min=0).detach()
    cls_target = torch.zeros(len(anchors), num_classes, device=anchors.device)
    cls_target[pos, labels[best_gt[pos]]] = quality[pos]
    return Assignment(cls_target, valid, pos, matched, pos.float(), int(pos.sum()))


def box_iou_pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of a[i] with b[i] ([N, 4] each)."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area = lambda x: (x[:, 2] - x[:, 0]).clamp(min=0) * (x[:, 3] - x[:, 1]).clamp(min=0)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp(min=1e-9)


def _pick_topk(q: torch.Tensor, topk: int) -> torch.Tensor:
    """[M, A] bool: for each GT, among anchors where it has the highest q, the top k by q with
    k = clamp(int(sum of its `topk` largest q), 1, #anchors with q > 0)."""
    m, a = q.shape
    owner = q.argmax(0)
    own = torch.zeros_like(q, dtype=torch.bool)
    own[owner, torch.arange(a, device=q.device)] = True
    q_own = torch.where(own, q, torch.zeros_like(q))
    n = min(topk, a)
    k = q_own.topk(n, dim=1).values.sum(1).int().clamp(min=1)
    k = torch.minimum(k, (q_own > 0).sum(1).int())
    kmax = int(k.max()) if m else 0
    pos = torch.zeros_like(q, dtype=torch.bool)
    if kmax > 0:
        idx = q_own.topk(kmax, dim=1).indices
        pos.scatter_(1, idx, torch.arange(kmax, device=q.device)[None, :] < k[:, None])
    return pos


def assign_mg(anchors: torch.Tensor, pred_boxes: torch.Tensor, cls_logits: torch.Tensor, gt: torch.Tensor,
              labels: torch.Tensor, num_classes: int, sigma: float = 2.0, topk: int = 15) -> Assignment:
    if len(gt) == 0:
        return _empty(len(anchors), num_classes, anchors.device)
    with torch.no_grad():
        q_cls = box_iou(gt, pred_boxes).clamp(min=0)  # localisation quality of each anchor's prediction
        p_gt = torch.sigmoid(cls_logits.float()).t()[labels]  # [M, A] predicted prob of each GT's class
        q_reg = (box_iou(gt, anchors) * torch.exp(p_gt / sigma)).clamp(max=1.0)
        cls_pick = _pick_topk(q_reg, topk)  # anchors that learn to classify
        reg_pick = _pick_topk(q_cls, topk)  # anchors that learn to regress
        cls_target = torch.zeros(len(anchors), num_classes, device=anchors.device)
        cls_pos = cls_pick.any(0)
        cls_gt = cls_pick.float().argmax(0)
        cls_target[cls_pos, labels[cls_gt[cls_pos]]] = q_cls[cls_gt[cls_pos], cls_pos.nonzero().squeeze(1)]
        box_pos = reg_pick.any(0)
        box_gt_idx = reg_pick.float().argmax(0)
        weight = torch.where(box_pos, q_reg[box_gt_idx, torch.arange(len(anchors), device=anchors.device)],
                             torch.zeros(len(anchors), device=anchors.device))
    valid = torch.ones(len(anchors), dtype=torch.bool, device=anchors.device)
    return Assignment(cls_target, valid, box_pos, gt[box_gt_idx], weight, int(cls_pos.sum()))
