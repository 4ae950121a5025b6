"""The method interface and registry. A new method is one file with one class and one `@register` line:

    @register
    class MyMethod(DistillMethod):
        name = "mine"
        def loss(self, student, teacher, batch): return {"mine": ...}
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from kdcli.config.schema import DistillConfig
from kdcli.errors import KdcliError
from kdcli.models.detector import DetectorOutput

REGISTRY: dict[str, type[DistillMethod]] = {}


def register(cls: type[DistillMethod]) -> type[DistillMethod]:
    REGISTRY[cls.name] = cls
    return cls


class DistillMethod(nn.Module):
    """A distillation term. `needs_teacher_head`: whether the teacher must run its head (class logits, box
    deltas) or only backbone + neck; `uses_adapters`: whether student features are adapted to the teacher's."""

    name: ClassVar[str] = ""
    needs_teacher_head: ClassVar[bool] = False
    uses_adapters: ClassVar[bool] = False

    def __init__(self, cfg: DistillConfig, adapters: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.adapters = adapters

    def loss(self, student: DetectorOutput, teacher: DetectorOutput, batch: dict[str, Any]
             ) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def method_class(name: str) -> type[DistillMethod]:
    from kdcli.distill import defeat, mse, pdf, soft  # noqa: F401  (registration)

    if name not in REGISTRY:
        raise KdcliError(f"unknown distillation method '{name}'",
                         hint=f"use one of: {', '.join(sorted(n for n in REGISTRY if n != 'soft'))}")
    return REGISTRY[name]
