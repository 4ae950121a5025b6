"""The `Distiller`: everything distillation adds to a student's training, behind one small interface.

It owns the frozen teacher (`eval()` including BatchNorm for the whole run, no gradients, outside the optimizer
and every checkpoint, run only as far as the terms need: backbone + neck when no term reads its head), the
trainable side (per-level adapters and any parameters of the methods themselves, as one module: on the device,
in the optimizer through `trainable()`, saved in last.pt through `state_dict()`, wrapped for DDP), and the sum of
the weighted terms, one logged column each. The training loop and `kdcli benchmark --distill` both use it:

    distiller = Distiller(cfg, teacher, student_channels)
    terms = distiller.loss(student_out, batch, epoch)      # {name: weighted term}, without the hard terms
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from kdcli.distill.adapters import Adapters
from kdcli.distill.base import DistillMethod, discover
from kdcli.models.detector import Detector, DetectorOutput


def method_names(labels: str, method: str) -> list[str]:
    """The registry entries a (labels, method) pair runs: `soft` for soft labels, then the feature method."""
    return (["soft"] if "soft" in labels else []) + ([method] if method != "none" else [])


class DistillTerms(nn.Module):
    """The trainable side of distillation: adapters and methods, one forward for DDP."""

    def __init__(self, methods: list[DistillMethod], adapters: Adapters | None, adapted: list[bool]):
        super().__init__()
        self.methods = nn.ModuleList(methods)
        self.adapters = adapters
        self.adapted = adapted  # per method: whether it reads the adapted student features

    def forward(self, student: DetectorOutput, teacher: DetectorOutput, batch: dict[str, Any]
                ) -> dict[str, torch.Tensor]:
        adapted = replace(student, features=self.adapters(student.features)) if self.adapters is not None else student
        terms: dict[str, torch.Tensor] = {}
        for m, a in zip(self.methods, self.adapted):
            terms.update(m.loss(adapted if a else student, teacher, batch))
        return terms


class Distiller:
    def __init__(self, cfg: Any, teacher: Detector, student_channels: int):
        """cfg: the recipe's `distill` section; teacher: a detector with loaded weights (frozen here)."""
        self.cfg = cfg
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        registry = discover()
        classes = [registry[n] for n in method_names(cfg.labels, cfg.method)]
        levels, channels = len(teacher.strides), teacher.cfg.channels
        adapted = [c.adapts(student_channels, channels) for c in classes]
        adapters = Adapters(levels, student_channels, channels, cfg.adapter_kernel) if any(adapted) else None
        methods = [c(getattr(cfg, c.name), channels=channels, levels=levels) for c in classes]
        self.terms = DistillTerms(methods, adapters, adapted)
        self._forward: nn.Module = self.terms
        self.teacher_head = any(c.needs_teacher_head for c in classes)

    # ---- what the loop needs -----------------------------------------------------------------------------------
    @property
    def active_methods(self) -> list[str]:
        return [m.name for m in self.terms.methods]

    def has_parameters(self) -> bool:
        return any(p.requires_grad for p in self.terms.parameters())

    def trainable(self) -> list[nn.Module]:
        """Modules the optimizer trains beside the student (empty when no term learns anything)."""
        return [self.terms] if self.has_parameters() else []

    def to(self, device: torch.device) -> Distiller:
        self.teacher.to(device)
        self.terms.to(device)
        return self

    def train(self, mode: bool = True) -> None:
        """The trainable side follows the loop; the teacher stays in eval() whatever happens."""
        self.terms.train(mode)
        self.teacher.eval()

    def wrap_ddp(self, device: torch.device) -> None:
        if self.has_parameters():
            self._forward = nn.parallel.DistributedDataParallel(
                self.terms, device_ids=[device.index] if device.type == "cuda" else None)

    def is_active(self, epoch: int) -> bool:
        return bool(self.terms.methods) and (self.cfg.stop_epoch is None or epoch < self.cfg.stop_epoch)

    def loss(self, student: DetectorOutput, batch: dict[str, Any], epoch: int = 0) -> dict[str, torch.Tensor]:
        """The weighted distillation terms of one batch (empty after `stop_epoch`)."""
        if not self.is_active(epoch):
            return {}
        with torch.no_grad():
            teacher = self.teacher(batch["images"], head=self.teacher_head)
        return self._forward(student, teacher, batch)

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.terms.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], where: str) -> None:
        own = self.terms.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            from kdcli.errors import KdcliError

            raise KdcliError(f"{where}: the distillation state does not fit this method (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]})")
        self.terms.load_state_dict(state)

    def report(self, imgsz: int, student_channels: int) -> list[str]:
        """Lines for the start of a run: what the teacher runs, the adapters' shapes, the methods' parameters."""
        t = self.teacher
        part = "backbone + neck + head" if self.teacher_head else "backbone + neck (truncated)"
        lines = [f"teacher {t.cfg.backbone}+{t.cfg.neck}, frozen, runs {part}; labels {self.cfg.labels}, method "
                 f"{self.cfg.method}"]
        if self.terms.adapters is not None:
            from kdcli.models.anchors import level_shapes

            shapes = level_shapes(imgsz, imgsz, t.strides)
            lines += [f"  adapter {x}" for x in self.terms.adapters.report(
                [(student_channels, h, w) for h, w in shapes], [(t.cfg.channels, h, w) for h, w in shapes])]
        for m in self.terms.methods:
            n = sum(p.numel() for p in m.parameters())
            if n:
                lines.append(f"  {m.name}: {n / 1e3:.1f}k learnable parameters of its own")
        return lines
