"""FGD: focal and global distillation (Yang et al., CVPR 2022, "Focal and Global Knowledge Distillation for
Detectors"; reference: the authors' `FeatureLoss`, yzd-v/FGD, with their RetinaNet settings).

Per level, on the student map S (aligned by a 1x1 conv only when the widths differ, as the reference's `align`)
and the teacher map T ([N, C, H, W]):
- attention from |x| (temperature `temperature`): spatial A_s = H W softmax_hw(mean_c |x| / temp), channel
  A_c = C softmax_c(mean_hw |x| / temp), for both networks;
- masks: each GT box, scaled to the level's grid, covers rows floor(y0)..ceil(y1) and columns floor(x0)..ceil(x1)
  (inclusive) with the value 1 / (rows x columns), the largest value kept where boxes overlap; background
  B = 1 where no box is, divided by its count;
- focal feature loss with the teacher's attention: fg = sum (S - T)^2 A_s^t A_c^t M / N, bg the same with B;
- attention loss: sum |A_c^s - A_c^t| / N + sum |A_s^s - A_s^t| / N;
- global relation loss through a GcBlock per network and level (a 1x1 conv to one channel, softmax over
  locations as context weights, then conv1x1 C -> C/2, LayerNorm, ReLU, conv1x1 C/2 -> C added to every
  location): sum (S + g_s(S) - T - g_t(T))^2 / N.
The level's loss is alpha fg + beta bg + gamma attention + lambda global (`fg_weight`, `bg_weight`,
`attention_weight`, `global_weight`); levels are summed (one reference loss
per FPN level). Defaults are the authors' RetinaNet ones (temp 0.5, alpha 1e-3, beta 5e-4, gamma 5e-4, lambda
5e-6). Both GcBlocks of every level are learnable parameters of the method: the `Distiller` trains them, keeps
them in last.pt and leaves them out of best.pt; their last conv starts at zero and the context convs with
Kaiming (fan-in) weights, as in the reference.

Departure from the reference: its mask fill indexes the [H, W] mask as [columns, rows] (transposed); here the
box covers its own rows and columns.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdcli.config.base import Strict
from kdcli.distill.base import DistillMethod, register
from kdcli.models.assign import Targets
from kdcli.models.detector import DetectorOutput


class FGDConfig(Strict):
    temperature: float = Field(0.5, gt=0, description="attention temperature (authors' RetinaNet: 0.5)")
    fg_weight: float = Field(1e-3, ge=0, description="alpha: foreground feature loss (RetinaNet: 1e-3)")
    bg_weight: float = Field(5e-4, ge=0, description="beta: background feature loss (RetinaNet: 5e-4)")
    attention_weight: float = Field(5e-4, ge=0, description="gamma: attention loss (RetinaNet: 5e-4)")
    global_weight: float = Field(5e-6, ge=0, description="lambda: global relation loss (RetinaNet: 5e-6)")


def attention(x: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(spatial [N, H, W] summing to H W per image, channel [N, C] summing to C per image)."""
    n, c, h, w = x.shape
    a = x.float().abs()
    spatial = h * w * F.softmax(a.mean(1).flatten(1) / temperature, dim=1)
    channel = c * F.softmax(a.mean((2, 3)) / temperature, dim=1)
    return spatial.view(n, h, w), channel


def box_masks(boxes: list[torch.Tensor], image_hw: tuple[int, int], grid_hw: tuple[int, int]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(foreground [N, H, W]: the largest 1/area of the boxes covering a cell; background [N, H, W]: 1/count on
    cells no box covers)."""
    (ih, iw), (h, w) = image_hw, grid_hw
    device = boxes[0].device if boxes else torch.device("cpu")
    gt = Targets.from_lists(boxes, [torch.zeros(len(b), dtype=torch.long) for b in boxes], device)
    g = gt.boxes.float()  # [N, M, 4]
    x0, x1 = torch.floor(g[..., 0] / iw * w), torch.ceil(g[..., 2] / iw * w)
    y0, y1 = torch.floor(g[..., 1] / ih * h), torch.ceil(g[..., 3] / ih * h)
    value = 1.0 / ((y1 + 1 - y0) * (x1 + 1 - x0)) * gt.valid  # [N, M]
    rows = torch.arange(h, device=device, dtype=g.dtype)
    cols = torch.arange(w, device=device, dtype=g.dtype)
    in_r = (rows >= y0[..., None]) & (rows <= y1[..., None])  # [N, M, H]
    in_c = (cols >= x0[..., None]) & (cols <= x1[..., None])  # [N, M, W]
    cover = in_r[..., :, None] & in_c[..., None, :]  # [N, M, H, W]
    fg = (cover * value[..., None, None]).amax(1) if g.shape[1] else torch.zeros(len(boxes), h, w, device=device)
    bg = (fg <= 0).float()
    bg = bg / bg.sum((1, 2), keepdim=True).clamp(min=1)
    return fg, bg


class GlobalContext(nn.Module):
    """GcBlock as FGD uses it: context pooled with softmax weights from a 1x1 conv, transformed, added back."""

    def __init__(self, channels: int):
        super().__init__()
        self.mask = nn.Conv2d(channels, 1, 1)
        self.transform = nn.Sequential(nn.Conv2d(channels, channels // 2, 1), nn.LayerNorm([channels // 2, 1, 1]),
                                       nn.ReLU(inplace=True), nn.Conv2d(channels // 2, channels, 1))
        nn.init.kaiming_normal_(self.mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.mask.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        weights = F.softmax(self.mask(x).flatten(1), dim=1)  # [N, H W]
        context = torch.bmm(x.flatten(2), weights[..., None]).view(n, c, 1, 1)
        return x + self.transform(context)


@register
class FGD(DistillMethod):
    name = "fgd"
    needs_boxes = True
    config = FGDConfig
    adapter = "align"

    def __init__(self, cfg: Any, channels: int = 256, levels: int = 1, **kwargs: Any):
        super().__init__(cfg, channels, levels, **kwargs)
        self.student_context = nn.ModuleList(GlobalContext(channels) for _ in range(levels))
        self.teacher_context = nn.ModuleList(GlobalContext(channels) for _ in range(levels))

    def loss(self, student: DetectorOutput, teacher: DetectorOutput, batch: dict[str, Any]
             ) -> dict[str, torch.Tensor]:
        c = self.cfg
        image_hw = tuple(batch["images"].shape[-2:])
        fg_l, bg_l, att_l, rel_l = [], [], [], []
        for level, (s, t) in enumerate(zip(student.features, teacher.features)):
            s, t = s.float(), t.float()
            n = s.shape[0]
            sp_s, ch_s = attention(s, c.temperature)
            sp_t, ch_t = attention(t, c.temperature)
            fg, bg = box_masks(batch["boxes"], image_hw, tuple(s.shape[-2:]))
            err = (s - t).pow(2) * sp_t[:, None] * ch_t[..., None, None]
            fg_l.append((err * fg[:, None]).sum() / n)
            bg_l.append((err * bg[:, None]).sum() / n)
            att_l.append((ch_s - ch_t).abs().sum() / n + (sp_s - sp_t).abs().sum() / n)
            rel = self.student_context[level](s) - self.teacher_context[level](t)
            rel_l.append(rel.pow(2).sum() / n)
        return {"fgd_fg": c.fg_weight * torch.stack(fg_l).sum(), "fgd_bg": c.bg_weight * torch.stack(bg_l).sum(),
                "fgd_attention": c.attention_weight * torch.stack(att_l).sum(),
                "fgd_global": c.global_weight * torch.stack(rel_l).sum()}
