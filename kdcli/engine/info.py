"""Model size and cost: parameters per part, FLOPs at an input size (torch.utils.flop_counter), output shapes."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from kdcli.models.detector import Detector


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def describe(model: Detector, imgsz: int) -> dict[str, Any]:
    model.eval()
    x = torch.zeros(1, 3, imgsz, imgsz)
    with FlopCounterMode(display=False) as fc:
        out = model(x)
    parts = {"backbone": count(model.backbone), "neck": count(model.cem) + count(model.levels) + count(model.neck),
             "head": count(model.head)}
    return {
        "backbone": model.cfg.backbone, "neck": model.cfg.neck, "imgsz": imgsz, "classes": model.num_classes,
        "params": {**parts, "total": count(model)},
        "gflops": round(fc.get_total_flops() / 1e9, 3),
        "levels": [{"stride": s, "shape": list(f.shape[1:]), "anchors": n}
                   for s, f, n in zip(out.strides, out.features, out.level_sizes)],
        "anchors": int(out.anchors.shape[0]),
    }
