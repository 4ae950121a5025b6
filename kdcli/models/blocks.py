"""The conv block used throughout the CEM, neck and head: Conv + norm + LeakyReLU(0.1).

`norm`: `bn` (BatchNorm, the paper) or `gn` (GroupNorm, 32 groups or fewer when the channels do not divide:
statistics per image, so a detector trained from scratch on small batches, as on a CPU, does not depend on
the batch's composition; Wu & He, ECCV 2018).
"""

from __future__ import annotations

import math

from torch import nn

GN_GROUPS = 32


def norm_layer(kind: str, channels: int, groups: int | None = None) -> nn.Module:
    """`groups` forces the GroupNorm group count (1 = one group over all channels, for 1x1 maps)."""
    if kind == "gn":
        return nn.GroupNorm(groups or math.gcd(GN_GROUPS, channels), channels)
    return nn.BatchNorm2d(channels)


def conv_block(c_in: int, c_out: int, k: int = 3, stride: int = 1, norm: str = "bn") -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), norm_layer(norm, c_out),
                         nn.LeakyReLU(0.1, inplace=True))
