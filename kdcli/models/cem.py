"""ThunderNet's Context Enhancement Module: C4, upsampled C5 and global context of C5, summed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdcli.models.blocks import norm_layer


def _conv_norm(c_in: int, c_out: int, norm: str, groups: int | None = None) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), norm_layer(norm, c_out, groups))


class CEM(nn.Module):
    """out = LeakyReLU(n(1x1 C4) + up2(n(1x1 C5)) + broadcast(n(1x1 GAP(C5)))) at C4's stride, n the norm."""

    def __init__(self, c4: int, c5: int, channels: int = 256, norm: str = "bn"):
        super().__init__()
        self.lat4 = _conv_norm(c4, channels, norm)
        self.lat5 = _conv_norm(c5, channels, norm)
        self.glb = _conv_norm(c5, channels, norm, groups=1)  # a 1x1 map: GroupNorm over all its channels
        self.act = nn.LeakyReLU(0.1, inplace=True)

    def forward(self, c4: torch.Tensor, c5: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.lat5(c5), size=c4.shape[-2:], mode="nearest")
        glb = self.glb(F.adaptive_avg_pool2d(c5, 1))
        return self.act(self.lat4(c4) + up + glb)
