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

    def forward(self, f: torch.Tensor, tap: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """(class map, box map, and with `tap` = i the input of each tower's block i: the output of its first i
        blocks, or `f` for i = 0)."""
        if tap is None:
            return self.cls_out(self.cls_tower(f)), self.box_out(self.box_tower(f)), None
        c_in, b_in = self.cls_tower[:tap](f), self.box_tower[:tap](f)
        return self.cls_out(self.cls_tower[tap:](c_in)), self.box_out(self.box_tower[tap:](b_in)), (c_in, b_in)

    def finish(self, cls_in: torch.Tensor, box_in: torch.Tensor, tap: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The class and box maps from tower inputs at block `tap` (another network's, for CrossKD)."""
        return self.cls_out(self.cls_tower[tap:](cls_in)), self.box_out(self.box_tower[tap:](box_in))


class Head(nn.Module):
    def __init__(self, channels: int, num_classes: int, num_levels: int, num_anchors: int = 6, convs: int = 2,
                 norm: str = "bn"):
        super().__init__()
        self.num_classes, self.num_anchors = num_classes, num_anchors
        self.levels = nn.ModuleList(LevelHead(channels, num_classes, num_anchors, convs, norm)
                                    for _ in range(num_levels))

    def forward(self, feats: list[torch.Tensor], tap: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """(class logits [B, A_total, K], box deltas [B, A_total, 4], and with `tap` the towers' inputs at that
        block per level)."""
        maps = [head(f, tap) for head, f in zip(self.levels, feats)]
        cls, box = self.flatten([m[0] for m in maps], [m[1] for m in maps])
        return cls, box, None if tap is None else [m[2] for m in maps]

    def flatten(self, cls: list[torch.Tensor], box: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-level maps -> [B, A_total, K] and [B, A_total, 4] in the anchors' order."""
        n = cls[0].shape[0]
        return (torch.cat([c.permute(0, 2, 3, 1).reshape(n, -1, self.num_classes) for c in cls], 1),
                torch.cat([b.permute(0, 2, 3, 1).reshape(n, -1, 4) for b in box], 1))
