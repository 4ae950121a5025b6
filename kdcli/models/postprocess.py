"""Detections from raw outputs: sigmoid scores, confidence filter, top-k, decode, NMS, cap per image."""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms

from kdcli.config.schema import ModelConfig
from kdcli.models.anchors import decode
from kdcli.models.detector import DetectorOutput


@torch.no_grad()
def postprocess(out: DetectorOutput, cfg: ModelConfig, image_size: tuple[int, int] | None = None
                ) -> list[dict[str, torch.Tensor]]:
    """Per image: boxes [N, 4] (x0, y0, x1, y1 input pixels), scores [N], labels [N] (0-based)."""
    results = []
    scores_all = torch.sigmoid(out.cls_logits.float())
    for i in range(scores_all.shape[0]):
        scores, labels = scores_all[i].max(-1)
        keep = scores > cfg.conf
        idx = keep.nonzero().squeeze(1)
        if len(idx) > cfg.pre_nms:
            idx = idx[scores[idx].topk(cfg.pre_nms).indices]
        boxes = decode(out.box_deltas[i, idx].float(), out.anchors[idx])
        if image_size is not None:
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image_size[1])
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image_size[0])
        s, lab = scores[idx], labels[idx]
        groups = torch.zeros_like(lab) if cfg.class_agnostic_nms else lab
        kept = batched_nms(boxes, s, groups, cfg.nms_iou)[: cfg.max_det]
        results.append({"boxes": boxes[kept], "scores": s[kept], "labels": lab[kept]})
    return results
