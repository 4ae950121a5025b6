"""The RetinaNet-style head, one per pyramid level (methods.md: "per level"): a class branch and a box branch
of `head_convs` conv blocks each, then a 1x1 output conv. Separate heads give every level its own BatchNorm
statistics (a head shared across levels would mix them at inference) and put the teacher/student parameter
ratio at the paper's 1.6.

Outputs are flattened level by level, location (y, x) by location, anchor by anchor: the order of
`anchors.make_anchors`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kdcli.models.blocks import conv_block

PRIOR = 0.01


class LevelHead(nn.Module):
    def __init__(self, channels: int, num_classes: int, num_anchors: int, convs: int, norm: str = "bn"):
        super().__init__()
        self.cls_tower = nn.Sequential(*(conv_block(channels, channels, norm=norm) for _ in range(convs)))
        self.box_tower = nn.Sequential(*(conv_block(channels, channels, norm=norm) for _ in range(convs)))
        self.cls_out = nn.Conv2d(channels, num_anchors * num_classes, 1)
        self.box_out = nn.Conv2d(channels, num_anchors * 4, 1)
        for conv in (self.cls_out, self.box_out):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls_out.bias, -math.log((1 - PRIOR) / PRIOR))

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls_out(self.cls_tower(f)), self.box_out(self.box_tower(f))


class Head(nn.Module):
    def __init__(self, channels: int, num_classes: int, num_levels: int, num_anchors: int = 6, convs: int = 2,
                 norm: str = "bn"):
        super().__init__()
        self.num_classes, self.num_anchors = num_classes, num_anchors
        self.levels = nn.ModuleList(LevelHead(channels, num_classes, num_anchors, convs, norm)
                                    for _ in range(num_levels))

    def forward(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits [B, A_total, K], box deltas [B, A_total, 4])."""
        cls, box = [], []
        for head, f in zip(self.levels, feats):
            c, b = head(f)
            n = f.shape[0]
            cls.append(c.permute(0, 2, 3, 1).reshape(n, -1, self.num_classes))
            box.append(b.permute(0, 2, 3, 1).reshape(n, -1, 4))
        return torch.cat(cls, 1), torch.cat(box, 1)
