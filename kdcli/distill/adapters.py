"""Per-level adaptation layers: a conv (3x3 by default, no BN or activation) mapping student neck features to
the teacher's channels. They exist only while distilling: kept in last.pt, never in best.pt or exports."""

from __future__ import annotations

import torch
from torch import nn


class Adapters(nn.Module):
    def __init__(self, levels: int, c_student: int, c_teacher: int, kernel: int = 3):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c_student, c_teacher, kernel, padding=kernel // 2)
                                   for _ in range(levels))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(f) for conv, f in zip(self.convs, feats)]

    def report(self, student_shapes: list[tuple[int, ...]], teacher_shapes: list[tuple[int, ...]]) -> list[str]:
        """One line per level: student shape -> adapter -> teacher shape, and parameters."""
        lines = []
        for i, (conv, s, t) in enumerate(zip(self.convs, student_shapes, teacher_shapes)):
            n = sum(p.numel() for p in conv.parameters())
            k = conv.kernel_size[0]
            lines.append(f"L{i}: student {tuple(s)} -conv{k}x{k}-> teacher {tuple(t)}, {n / 1e3:.1f}k params")
        return lines


def check_shapes(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> None:
    from kdcli.errors import KdcliError

    if len(student) != len(teacher):
        raise KdcliError(f"student has {len(student)} pyramid levels, teacher {len(teacher)}",
                         hint="set model.levels to the teacher's")
    for i, (s, t) in enumerate(zip(student, teacher)):
        if s.shape[-2:] != t.shape[-2:]:
            raise KdcliError(f"level {i}: student features {tuple(s.shape[-2:])} but teacher {tuple(t.shape[-2:])}",
                             hint="student and teacher need the same input size and max-pool setting")
