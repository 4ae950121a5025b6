"""Pyramid levels from the CEM output, then FPN (student) or PAFPN (teacher).

Levels: a 3x3 conv at stride 8, then 3x3 stride-2 convs for 16, 32, 64 (, 128). FPN adds a lateral 1x1 and
top-down nearest x2 path, then a 3x3 per level; PAFPN adds a bottom-up path (P(i+1) += 3x3 s2 (P(i))) and
another 3x3 per level.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdcli.models.blocks import conv_block


class Levels(nn.Module):
    def __init__(self, channels: int, n_levels: int, norm: str = "bn"):
        super().__init__()
        self.first = conv_block(channels, channels, 3, 1, norm)
        self.down = nn.ModuleList(conv_block(channels, channels, 3, 2, norm) for _ in range(n_levels - 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.first(x)]
        for d in self.down:
            feats.append(d(feats[-1]))
        return feats


class FPN(nn.Module):
    def __init__(self, channels: int, n_levels: int, norm: str = "bn"):
        super().__init__()
        self.lateral = nn.ModuleList(conv_block(channels, channels, 1, norm=norm) for _ in range(n_levels))
        self.smooth = nn.ModuleList(conv_block(channels, channels, 3, norm=norm) for _ in range(n_levels))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 2, -1, -1):
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="nearest")
        return [s(x) for s, x in zip(self.smooth, lat)]


class PAFPN(FPN):
    def __init__(self, channels: int, n_levels: int, norm: str = "bn"):
        super().__init__(channels, n_levels, norm)
        self.bottom_up = nn.ModuleList(conv_block(channels, channels, 3, 2, norm) for _ in range(n_levels - 1))
        self.smooth2 = nn.ModuleList(conv_block(channels, channels, 3, norm=norm) for _ in range(n_levels))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        p = super().forward(feats)
        for i, conv in enumerate(self.bottom_up):
            down = conv(p[i])
            p[i + 1] = p[i + 1] + down[..., : p[i + 1].shape[-2], : p[i + 1].shape[-1]]
        return [s(x) for s, x in zip(self.smooth2, p)]


NECKS = {"fpn": FPN, "pafpn": PAFPN}
