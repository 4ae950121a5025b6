"""The one-stage detector: trunk (ResNet, MobileNetV3, EfficientNet) -> CEM -> pyramid levels -> FPN/PAFPN ->
shared head.

`forward` returns a `DetectorOutput` that the loss, inference and distillation all read. It takes uint8 (or
0-255 float) images and normalises them itself, so loaders stay uint8. `head=False` stops after the neck
(a teacher used for feature imitation only needs that far); `tap=i` also returns the head towers' inputs at
block i (CrossKD runs the teacher's remaining head blocks on the student's). Its normalisation is the one the
trunk's ImageNet weights expect (the BACKBONES table).

A pretrained trunk keeps its BatchNorm frozen (statistics and affine parameters: mmdetection's `norm_eval`,
detectron2's FrozenBatchNorm2d) and its stem and first stage frozen (`frozen_stages`) unless the recipe says
otherwise: batch statistics of 4-8 images are noisier than ImageNet's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from kdcli.config.schema import ModelConfig
from kdcli.models.anchors import ANCHORS_PER_LOCATION, level_shapes, make_anchors
from kdcli.models.backbones import BACKBONES, batchnorms, build_trunk, freeze
from kdcli.models.cem import CEM
from kdcli.models.head import Head
from kdcli.models.necks import NECKS, Levels

@dataclass
class DetectorOutput:
    features: list[torch.Tensor]  # neck features per level, [B, C, H_l, W_l]
    anchors: torch.Tensor  # [A, 4] xyxy input pixels, A = 6 x locations over all levels
    strides: list[int]
    cls_logits: torch.Tensor | None = None  # [B, A, K]
    box_deltas: torch.Tensor | None = None  # [B, A, 4]
    level_sizes: list[int] = field(default_factory=list)  # anchors per level
    towers: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per level (class, box) tower inputs at `tap`

    def select(self, keep: torch.Tensor) -> DetectorOutput:
        """The outputs of the images where `keep` [B] (bool) is True."""
        pick = lambda x: None if x is None else x[keep]  # noqa: E731
        return replace(self, features=[f[keep] for f in self.features], cls_logits=pick(self.cls_logits),
                       box_deltas=pick(self.box_deltas),
                       towers=None if self.towers is None else [(c[keep], b[keep]) for c, b in self.towers])


def default_levels(imgsz: int) -> int:
    return 4 if imgsz < 512 else 5


class Detector(nn.Module):
    def __init__(self, cfg: ModelConfig, num_classes: int, imgsz: int = 512, anchor_size: float = 16.0):
        super().__init__()
        self.cfg, self.num_classes, self.anchor_size = cfg, num_classes, anchor_size
        n_levels = cfg.levels or default_levels(imgsz)
        self.backbone = build_trunk(cfg.backbone, cfg.pretrained, cfg.maxpool, cfg.backbone_norm)
        c4, c5 = self.backbone.out_channels
        self.cem = CEM(c4, c5, cfg.channels, cfg.norm)
        self.levels = Levels(cfg.channels, n_levels, cfg.norm)
        self.neck = NECKS[cfg.neck](cfg.channels, n_levels, cfg.norm)
        self.head = Head(cfg.channels, num_classes, n_levels, ANCHORS_PER_LOCATION, cfg.head_convs, cfg.norm)
        first = self.backbone.strides[0]
        self.strides = [first * 2 ** k for k in range(n_levels)]
        trunk = BACKBONES[cfg.backbone]
        self.register_buffer("mean", torch.tensor(trunk.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(trunk.std).view(1, 3, 1, 1), persistent=False)
        self._anchor_cache: dict[tuple, torch.Tensor] = {}
        self.frozen_bn = cfg.trunk_freeze_bn
        if self.frozen_bn:
            for bn in batchnorms(self.backbone):
                bn.requires_grad_(False)
        self.frozen_stages = cfg.trunk_frozen_stages
        freeze(self.backbone, self.frozen_stages)

    def train(self, mode: bool = True) -> Detector:
        """Frozen BatchNorm and frozen stages stay in eval mode while the rest trains."""
        super().train(mode)
        if mode:
            if self.frozen_bn:
                for bn in batchnorms(self.backbone):
                    bn.eval()
            freeze(self.backbone, self.frozen_stages)
        return self

    def anchors(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        key = (height, width, str(device))
        if key not in self._anchor_cache:
            shapes = level_shapes(height, width, self.strides)
            self._anchor_cache[key] = make_anchors(shapes, self.strides, self.anchor_size, device)
        return self._anchor_cache[key]

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = ((images.float() - self.mean) / self.std).to(self.std.dtype)  # half after model.half() (export)
        c4, c5 = self.backbone(x)
        return self.neck(self.levels(self.cem(c4, c5)))

    def forward(self, images: torch.Tensor, head: bool = True, tap: int | None = None) -> DetectorOutput:
        feats = self.features(images)
        h, w = images.shape[-2:]
        out = DetectorOutput(feats, self.anchors(h, w, images.device), self.strides,
                             level_sizes=[f.shape[-2] * f.shape[-1] * ANCHORS_PER_LOCATION for f in feats])
        if head:
            out.cls_logits, out.box_deltas, out.towers = self.head(feats, tap)
        return out


def build_detector(cfg: ModelConfig, num_classes: int, imgsz: int, anchor_size: float) -> Detector:
    return Detector(cfg, num_classes, imgsz, anchor_size)
