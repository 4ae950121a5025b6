"""Anchor assignment for a whole batch at once: which anchors learn which ground-truth box, with what targets.

Ground truth arrives padded to the batch's largest GT count (`Targets`), so both assigners are a few tensor
operations over [images, GTs, anchors] on the device, with no Python loop over images (a batch too large for
memory is cut into chunks of images).

`iou`: max-IoU matching (positive >= pos_iou, negative < neg_iou, ignored between; each GT's best anchor is
forced positive), as the references' `match` and MultiBoxLoss do it: the class target of a positive is 1 on its
GT's class (binary: the loss is the focal loss), and an ignored anchor leaves out only its own (matched) class
entry, its other classes stay negatives.

`mg`: Mutual Guidance (methods.md; MutualGuide's `mutual_match`). Two qualities per (GT, anchor), detached:
q_loc = IoU(GT, the box the anchor predicts) and q_cls = min(1, IoU(GT, anchor) * exp(p_gt / sigma)). For each
quality separately, an anchor is kept only for the GT(s) where it scores highest, and each GT takes its top k
(k = clamp(int(sum of its `topk` best), 1, #anchors with quality > 0)). "Localise to classify": the anchors picked
by q_loc are the classification positives, with target q_loc. "Classify to regress": the anchors picked by
q_cls are the regression positives, weighted by q_cls. Every other anchor is a classification negative.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

MAX_PAIRS = 1 << 25  # [images, GTs, anchors] elements per chunk (a few tensors of this size live at once)
PICKED = 3.0  # the reference's marker: a picked anchor's quality is raised by 3 (qualities lie in [0, 1])


@dataclass
class Targets:
    """Ground truth of a batch padded to its largest GT count M."""

    boxes: torch.Tensor  # [B, M, 4] xyxy
    labels: torch.Tensor  # [B, M] long
    valid: torch.Tensor  # [B, M] bool: False for padding

    @classmethod
    def from_lists(cls, boxes: list[torch.Tensor], labels: list[torch.Tensor], device: torch.device) -> Targets:
        n = len(boxes)
        if n == 0 or max(len(b) for b in boxes) == 0:
            return cls(torch.zeros(n, 0, 4, device=device), torch.zeros(n, 0, dtype=torch.long, device=device),
                       torch.zeros(n, 0, dtype=torch.bool, device=device))
        b = pad_sequence([x.to(device).float().reshape(-1, 4) for x in boxes], batch_first=True)
        lab = pad_sequence([x.to(device).long().reshape(-1) for x in labels], batch_first=True)
        valid = pad_sequence([torch.ones(len(x), dtype=torch.bool, device=device) for x in boxes], batch_first=True)
        return cls(b, lab, valid)

    def __getitem__(self, s: slice) -> Targets:
        return Targets(self.boxes[s], self.labels[s], self.valid[s])


@dataclass
class Assignment:
    cls_target: torch.Tensor  # [B, A, K] quality on the GT class of positives, 0 elsewhere
    cls_valid: torch.Tensor  # [B, A, K] bool: (anchor, class) entries of the class loss (False = ignored)
    box_pos: torch.Tensor  # [B, A] bool: anchors that regress a box
    box_gt: torch.Tensor  # [B, A, 4] the GT box each anchor regresses (valid where box_pos)
    box_weight: torch.Tensor  # [B, A] weight of each anchor's box loss (0 where not box_pos)
    num_pos: torch.Tensor  # scalar: classification positives, which normalise the class loss

    @staticmethod
    def cat(parts: list[Assignment]) -> Assignment:
        if len(parts) == 1:
            return parts[0]
        return Assignment(*(torch.cat([getattr(p, f) for p in parts]) for f in
                            ("cls_target", "cls_valid", "box_pos", "box_gt", "box_weight")),
                          torch.stack([p.num_pos for p in parts]).sum())


def batched_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every a[i, m] with every b[i, n]: a [B, M, 4], b [B, N, 4] (or [N, 4], shared) -> [B, M, N]."""
    b = b.expand(a.shape[0], -1, -1) if b.dim() == 2 else b
    lt = torch.maximum(a[:, :, None, :2], b[:, None, :, :2])
    rb = torch.minimum(a[:, :, None, 2:], b[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    return inter / (area_a[:, :, None] + area_b[:, None, :] - inter).clamp(min=1e-9)


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of a[..., i] with b[..., i] ([..., 4] each)."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[..., 2] - x[..., 0]).clamp(min=0) * (x[..., 3] - x[..., 1]).clamp(min=0)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp(min=1e-9)


def _gather_gt(gt: Targets, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The boxes [B, A, 4] and labels [B, A] of GT index idx [B, A]."""
    boxes = gt.boxes.gather(1, idx[..., None].expand(-1, -1, 4))
    return boxes, gt.labels.gather(1, idx)


def _class_target(labels: torch.Tensor, quality: torch.Tensor, pos: torch.Tensor, num_classes: int) -> torch.Tensor:
    target = torch.zeros(*labels.shape, num_classes, device=labels.device, dtype=quality.dtype)
    return target.scatter_(-1, labels[..., None], torch.where(pos, quality, 0.0)[..., None])


def _in_chunks(fn, anchors: torch.Tensor, gt: Targets, *per_image: torch.Tensor, **kw) -> Assignment:
    """Run `fn` over chunks of images small enough for memory; one chunk in the common case."""
    b, m, a = gt.boxes.shape[0], max(1, gt.boxes.shape[1]), anchors.shape[0]
    step = max(1, MAX_PAIRS // (m * a))
    return Assignment.cat([fn(anchors, gt[i:i + step], *(x[i:i + step] for x in per_image), **kw)
                           for i in range(0, b, step)])


def _empty(b: int, a: int, num_classes: int, device: torch.device) -> Assignment:
    z = torch.zeros(b, a, dtype=torch.bool, device=device)
    return Assignment(torch.zeros(b, a, num_classes, device=device),
                      torch.ones(b, a, num_classes, dtype=torch.bool, device=device), z,
                      torch.zeros(b, a, 4, device=device), torch.zeros(b, a, device=device),
                      torch.zeros((), device=device))


@torch.no_grad()
def assign_iou(anchors: torch.Tensor, pred_boxes: torch.Tensor, gt: Targets, num_classes: int,
               pos_iou: float = 0.5, neg_iou: float = 0.4) -> Assignment:
    """anchors [A, 4], pred_boxes [B, A, 4] (decoded, detached)."""
    return _in_chunks(_assign_iou, anchors, gt, pred_boxes, num_classes=num_classes, pos_iou=pos_iou,
                      neg_iou=neg_iou)


def _assign_iou(anchors: torch.Tensor, gt: Targets, pred_boxes: torch.Tensor, num_classes: int, pos_iou: float,
                neg_iou: float) -> Assignment:
    b, a = pred_boxes.shape[:2]
    if gt.boxes.shape[1] == 0:
        return _empty(b, a, num_classes, anchors.device)
    iou = batched_iou(gt.boxes, anchors).masked_fill(~gt.valid[..., None], -1.0)  # [B, M, A]
    best_iou, best_gt = iou.max(1)
    # each GT's best anchor is forced positive; when two GTs share a best anchor, the later GT keeps it (reference)
    m_idx = torch.arange(gt.boxes.shape[1], device=anchors.device).expand_as(gt.valid)
    forced = torch.full((b, a), -1, dtype=torch.long, device=anchors.device)
    forced.scatter_reduce_(1, iou.argmax(2), torch.where(gt.valid, m_idx, -1), reduce="amax")
    best_gt = torch.where(forced >= 0, forced, best_gt)
    pos = (best_iou >= pos_iou) | (forced >= 0)
    ignored = ~pos & (best_iou >= neg_iou)
    matched, labels = _gather_gt(gt, best_gt)
    target = _class_target(labels, torch.ones_like(best_iou), pos, num_classes)
    valid = ~_class_target(labels, torch.ones_like(best_iou), ignored, num_classes).bool()
    return Assignment(target, valid, pos, matched, pos.float(), pos.sum().float())


def _pick(q: torch.Tensor, topk: int) -> torch.Tensor:
    """[B, M, A] qualities -> the same with PICKED added where a GT picks an anchor: among the anchors where it
    has the highest quality of all GTs, its top k, k = clamp(int(sum of its `topk` largest), 1, #q > 0)."""
    q = torch.where(q == q.max(1, keepdim=True).values, q, 0.0)
    k = q.topk(min(topk, q.shape[-1]), dim=-1).values.sum(-1).int().clamp(min=1)
    k = torch.minimum(k, (q > 0).sum(-1).int())
    kmax = int(k.max()) if k.numel() else 0
    if kmax == 0:
        return q
    idx = q.topk(kmax, dim=-1).indices
    picked = torch.zeros_like(q, dtype=torch.bool).scatter_(-1, idx, torch.arange(kmax, device=q.device) < k[..., None])
    return q + PICKED * picked


@torch.no_grad()
def assign_mg(anchors: torch.Tensor, pred_boxes: torch.Tensor, cls_logits: torch.Tensor, gt: Targets,
              num_classes: int, sigma: float = 2.0, topk: int = 15) -> Assignment:
    """anchors [A, 4], pred_boxes [B, A, 4] (decoded, detached), cls_logits [B, A, K]."""
    return _in_chunks(_assign_mg, anchors, gt, pred_boxes, cls_logits, num_classes=num_classes, sigma=sigma,
                      topk=topk)


def _assign_mg(anchors: torch.Tensor, gt: Targets, pred_boxes: torch.Tensor, cls_logits: torch.Tensor,
               num_classes: int, sigma: float, topk: int) -> Assignment:
    b, a = pred_boxes.shape[:2]
    if gt.boxes.shape[1] == 0:
        return _empty(b, a, num_classes, anchors.device)
    invalid = ~gt.valid[..., None]
    q_loc = batched_iou(gt.boxes, pred_boxes).clamp(min=0).masked_fill(invalid, 0.0)
    probs = torch.sigmoid(cls_logits.float()).transpose(1, 2)  # [B, K, A]
    p_gt = probs.gather(1, gt.labels[..., None].expand(-1, -1, a))  # [B, M, A]
    q_cls = (batched_iou(gt.boxes, anchors) * torch.exp(p_gt / sigma)).clamp(max=1.0).masked_fill(invalid, 0.0)
    # localise to classify
    cls_q, cls_gt = _pick(q_loc, topk).max(1)
    cls_pos = cls_q >= PICKED
    _, cls_labels = _gather_gt(gt, cls_gt)
    cls_target = _class_target(cls_labels, cls_q - PICKED, cls_pos, num_classes)
    # classify to regress
    box_q, box_gt = _pick(q_cls, topk).max(1)
    box_pos = box_q >= PICKED
    matched, _ = _gather_gt(gt, box_gt)
    weight = torch.where(box_pos, box_q - PICKED, 0.0)
    valid = torch.ones(b, a, num_classes, dtype=torch.bool, device=anchors.device)
    return Assignment(cls_target, valid, box_pos, matched, weight, cls_pos.sum().float())
