"""Anchors and SSD-style box coding.

Six anchors per location: for s in (s_k, s_k * sqrt 2), boxes (s, s), (s sqrt2, s / sqrt2), (s / sqrt2,
s sqrt2), with s_k = base * 2^k at level k. Deltas use variances (0.1, 0.2).
"""

from __future__ import annotations

import math

import torch

VARIANCES = (0.1, 0.2)
ANCHORS_PER_LOCATION = 6


def level_shapes(height: int, width: int, strides: list[int]) -> list[tuple[int, int]]:
    """Feature map sizes the network produces for an input size (stride-2 convs round up)."""
    return [(math.ceil(height / s), math.ceil(width / s)) for s in strides]


def make_anchors(shapes: list[tuple[int, int]], strides: list[int], base: float,
                 device: torch.device | None = None) -> torch.Tensor:
    """[A, 4] anchors (x0, y0, x1, y1 input pixels), level by level, (y, x) by location, 6 per location."""
    r2 = math.sqrt(2)
    out = []
    for k, ((h, w), stride) in enumerate(zip(shapes, strides)):
        s = base * 2 ** k
        wh = torch.tensor([(z * a, z / a) for z in (s, s * r2) for a in (1.0, r2, 1 / r2)], device=device)
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        ctr = torch.stack([(xs.reshape(-1) + 0.5) * stride, (ys.reshape(-1) + 0.5) * stride], -1).float()
        ctr = ctr[:, None, :].expand(-1, len(wh), -1)
        half = (wh / 2)[None].expand_as(ctr)
        out.append(torch.cat([ctr - half, ctr + half], -1).reshape(-1, 4))
    return torch.cat(out, 0)


def encode(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Deltas of `boxes` relative to `anchors` (both [..., 4] xyxy)."""
    aw, ah = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
    ax, ay = anchors[..., 0] + aw / 2, anchors[..., 1] + ah / 2
    bw, bh = (boxes[..., 2] - boxes[..., 0]).clamp(min=1e-3), (boxes[..., 3] - boxes[..., 1]).clamp(min=1e-3)
    bx, by = boxes[..., 0] + bw / 2, boxes[..., 1] + bh / 2
    v0, v1 = VARIANCES
    return torch.stack([(bx - ax) / (aw * v0), (by - ay) / (ah * v0), torch.log(bw / aw) / v1,
                        torch.log(bh / ah) / v1], -1)


def decode(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Boxes (xyxy) from deltas relative to anchors."""
    aw, ah = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
    ax, ay = anchors[..., 0] + aw / 2, anchors[..., 1] + ah / 2
    v0, v1 = VARIANCES
    dw = (deltas[..., 2] * v1).clamp(max=math.log(1000 / 16))
    dh = (deltas[..., 3] * v1).clamp(max=math.log(1000 / 16))
    x, y = ax + deltas[..., 0] * v0 * aw, ay + deltas[..., 1] * v0 * ah
    w, h = aw * torch.exp(dw), ah * torch.exp(dh)
    return torch.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], -1)
