"""DeFeat: decoupled foreground/background feature imitation (Guo et al., CVPR 2021; methods.md).

With e = sum over channels of (adapt(f_s) - f_t)^2 at each location, foreground mask M and background 1 - M:

- variant `anchors` (default; multas' `defeat` mode, the paper authors' later code): M marks every location
  whose anchor centre lies inside a GT box, on every level; the levels are concatenated and
  fg = sum_{b,l} M e / max(1, 2 sum_{b,l} M) / B (the mask counted over locations only, divided by the batch
  size), bg likewise with 1 - M; weights 1 and 1. Default because our detector is one-stage with dense anchors
  on all levels: with one level per box, small vehicles would all fall on the first level.
- variant `level` (DeFeat's official code, Faster R-CNN on VOC): each GT box marks the cells it covers on one
  level, floor(log2(sqrt((w + 1)(h + 1)) / level_base)) clamped to the levels (the official `_map_roi_levels`;
  cells floor(x0 / s) .. floor(x1 / s) - 1, or the one cell at the box's corner when the box is thinner than a
  cell); per level
  fg_l = sum M e / max(1, 2 C sum M) (the mask counted over channels too), bg_l likewise; fg and bg are the
  means over levels (the official code divides the level sum by the number of levels); weights 3 and 12.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field

from kdcli.config.base import Strict
from kdcli.distill.base import DistillMethod, register
from kdcli.models.assign import Targets
from kdcli.models.detector import DetectorOutput

DEFAULT_WEIGHTS = {"anchors": (1.0, 1.0), "level": (3.0, 12.0)}


class DeFeatConfig(Strict):
    variant: Literal["anchors", "level"] = Field(
        "anchors", description="anchors: every location whose anchor centre lies in a GT box, on all levels "
                               "(the paper authors' later code); level: each box's region on one level (official)")
    fg_weight: float | None = Field(None, ge=0, description="foreground weight (default: anchors 1, level 3)")
    bg_weight: float | None = Field(None, ge=0, description="background weight (default: anchors 1, level 12)")
    level_base: float = Field(56.0, gt=0, description="level variant: level = floor(log2(sqrt((w+1)(h+1)) / base))")


def anchor_masks(boxes: list[torch.Tensor], shapes: list[tuple[int, int]], strides: list[int]) -> list[torch.Tensor]:
    """Per level [B, H, W]: 1 where the location's anchor centre lies inside (or on) any GT box."""
    device = boxes[0].device if boxes else torch.device("cpu")
    gt = Targets.from_lists(boxes, [torch.zeros(len(b), dtype=torch.long) for b in boxes], device)
    masks = []
    for (h, w), s in zip(shapes, strides):
        cx = (torch.arange(w, device=device) + 0.5) * s
        cy = (torch.arange(h, device=device) + 0.5) * s
        g = gt.boxes[:, :, None, :]  # [B, M, 1, 4]
        in_x = (cx >= g[..., 0]) & (cx <= g[..., 2])  # [B, M, W]
        in_y = (cy >= g[..., 1]) & (cy <= g[..., 3])  # [B, M, H]
        inside = in_y[..., :, None] & in_x[..., None, :] & gt.valid[..., None, None]
        masks.append(inside.any(1).float() if gt.boxes.shape[1] else torch.zeros(len(boxes), h, w, device=device))
    return masks


def level_masks(boxes: list[torch.Tensor], shapes: list[tuple[int, int]], strides: list[int],
                level_base: float = 56.0) -> list[torch.Tensor]:
    """Per level [B, H, W]: each box marks the cells it covers on its one level (DeFeat's `get_gt_mask`)."""
    device = boxes[0].device if boxes else torch.device("cpu")
    masks = [torch.zeros(len(boxes), h, w, device=device) for h, w in shapes]
    for b, gt in enumerate(boxes):
        for x0, y0, x1, y1 in gt.float().tolist():
            side = math.sqrt((x1 - x0 + 1) * (y1 - y0 + 1))  # the official `_map_roi_levels`: +1 pixel
            k = min(max(math.floor(math.log2(side / level_base + 1e-6)), 0), len(shapes) - 1)
            (h, w), s = shapes[k], strides[k]
            c0, r0 = max(int(x0 / s), 0), max(int(y0 / s), 0)
            c1, r1 = min(int(x1 / s), w), min(int(y1 / s), h)
            if c0 >= c1 or r0 >= r1:
                masks[k][b, min(r0, h - 1), min(c0, w - 1)] = 1.0
            else:
                masks[k][b, r0:r1, c0:c1] = 1.0
    return masks


def decoupled_anchors(adapted: list[torch.Tensor], teacher: list[torch.Tensor], masks: list[torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels concatenated; normalised by twice the masked locations, then by the batch size."""
    err = torch.cat([(s.float() - t.float()).pow(2).sum(1).flatten(1) for s, t in zip(adapted, teacher)], 1)
    m = torch.cat([x.flatten(1) for x in masks], 1)
    b = err.shape[0]
    fg = (err * m).sum() / (2 * m.sum()).clamp(min=1) / b
    bg = (err * (1 - m)).sum() / (2 * (1 - m).sum()).clamp(min=1) / b
    return fg, bg


def decoupled_level(adapted: list[torch.Tensor], teacher: list[torch.Tensor], masks: list[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per level, normalised by twice the masked elements (locations x channels); mean over levels."""
    fg, bg = [], []
    for s, t, m in zip(adapted, teacher, masks):
        c = s.shape[1]
        err = (s.float() - t.float()).pow(2).sum(1)  # [B, H, W]
        fg.append((err * m).sum() / (2 * c * m.sum()).clamp(min=1))
        bg.append((err * (1 - m)).sum() / (2 * c * (1 - m).sum()).clamp(min=1))
    return torch.stack(fg).mean(), torch.stack(bg).mean()


@register
class DeFeat(DistillMethod):
    name = "defeat"
    needs_boxes = True
    config = DeFeatConfig
    adapter = "paper"

    def loss(self, student: DetectorOutput, teacher: DetectorOutput, batch: dict[str, Any]
             ) -> dict[str, torch.Tensor]:
        c = self.cfg
        w_fg0, w_bg0 = DEFAULT_WEIGHTS[c.variant]
        w_fg = w_fg0 if c.fg_weight is None else c.fg_weight
        w_bg = w_bg0 if c.bg_weight is None else c.bg_weight
        shapes = [tuple(f.shape[-2:]) for f in teacher.features]
        if c.variant == "anchors":
            fg, bg = decoupled_anchors(student.features, teacher.features,
                                       anchor_masks(batch["boxes"], shapes, student.strides))
        else:
            fg, bg = decoupled_level(student.features, teacher.features,
                                     level_masks(batch["boxes"], shapes, student.strides, c.level_base))
        return {"defeat_fg": w_fg * fg, "defeat_bg": w_bg * bg}
