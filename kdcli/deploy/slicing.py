"""Sliced inference on scenes larger than the model's input (SAHI style): detections of overlapping windows are
shifted back to scene coordinates and the duplicates seen across a seam are merged.

Merging: `nms` keeps the highest-scoring box of each overlapping group (torchvision's batched NMS); `fusion`
averages each group's boxes weighted by score (weighted box fusion), which recovers a box cut by one window's
edge from its complete copy in the neighbouring window.
"""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms, box_iou


def to_scene(boxes: torch.Tensor, x0: int, y0: int, scale: float) -> torch.Tensor:
    """Boxes predicted on a window resized by `scale` (model pixels / scene pixels) -> scene pixels."""
    out = boxes / scale
    out[:, 0::2] += x0
    out[:, 1::2] += y0
    return out


def drop_cut_boxes(boxes: torch.Tensor, window: tuple[int, int, int, int], scene: tuple[int, int],
                   margin: float = 2.0) -> torch.Tensor:
    """Mask of boxes that do not touch an inner edge of their window (a window edge that is not the scene's
    border): such boxes are usually a vehicle cut in two, seen whole by the neighbouring window."""
    x0, y0, x1, y1 = window
    w, h = scene
    keep = torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
    if x0 > 0:
        keep &= boxes[:, 0] > x0 + margin
    if y0 > 0:
        keep &= boxes[:, 1] > y0 + margin
    if x1 < w:
        keep &= boxes[:, 2] < x1 - margin
    if y1 < h:
        keep &= boxes[:, 3] < y1 - margin
    return keep


def merge(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float = 0.5,
          method: str = "nms", class_agnostic: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge duplicates; returns (boxes, scores, labels) sorted by score."""
    if len(boxes) == 0:
        return boxes, scores, labels
    groups = torch.zeros_like(labels) if class_agnostic else labels
    if method == "nms":
        keep = batched_nms(boxes.float(), scores.float(), groups, iou)
        return boxes[keep], scores[keep], labels[keep]
    if method != "fusion":
        raise ValueError(f"unknown merge method {method!r}")
    order = scores.argsort(descending=True)
    boxes, scores, labels, groups = boxes[order], scores[order], labels[order], groups[order]
    overlaps = box_iou(boxes.float(), boxes.float())
    used = torch.zeros(len(boxes), dtype=torch.bool)
    out_b, out_s, out_l = [], [], []
    for i in range(len(boxes)):
        if used[i]:
            continue
        member = (~used) & (overlaps[i] >= iou) & (groups == groups[i])
        member[i] = True
        used |= member
        w = scores[member].float()
        out_b.append((boxes[member].float() * w[:, None]).sum(0) / w.sum())
        out_s.append(scores[member].max())
        out_l.append(labels[i])
    return torch.stack(out_b), torch.stack(out_s), torch.stack(out_l)
