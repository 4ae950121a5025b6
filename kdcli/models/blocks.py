"""The conv block used throughout the neck and head: Conv + BN + LeakyReLU(0.1)."""

from __future__ import annotations

from torch import nn


def conv_block(c_in: int, c_out: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out),
                         nn.LeakyReLU(0.1, inplace=True))
