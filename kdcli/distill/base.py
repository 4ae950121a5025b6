"""The method interface and the registry. A new method is one module in `kdcli/distill/` holding its config
section and its loss; `discover()` imports every module of the package, and the recipe schema, the CLI's name
checks and the `Distiller` take it from there:

    class MineConfig(Strict):
        weight: float = Field(1.0, ge=0, description="...")

    @register
    class Mine(DistillMethod):
        name, config = "mine", MineConfig           # recipe section distill.mine, config name hard+mine
        adapter = "paper"                             # student features arrive adapted to the teacher's
        def loss(self, student, teacher, batch): return {"mine": self.cfg.weight * ...}
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from kdcli.config.base import Strict

if TYPE_CHECKING:
    from kdcli.models.detector import DetectorOutput

REGISTRY: dict[str, type[DistillMethod]] = {}
INFRASTRUCTURE = {"base", "adapters", "distiller", "views"}  # modules of the package that hold no method


def register(cls: type[DistillMethod]) -> type[DistillMethod]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise TypeError(f"two distillation methods are called '{cls.name}'")
    REGISTRY[cls.name] = cls
    return cls


def discover() -> dict[str, type[DistillMethod]]:
    """Import every method module of the package once; returns the registry."""
    package = importlib.import_module("kdcli.distill")
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in INFRASTRUCTURE:
            importlib.import_module(f"kdcli.distill.{info.name}")
    return REGISTRY


Adapter = Literal["none", "paper", "align"]


class DistillMethod(nn.Module):
    """One distillation signal. `kind`: `labels` (chosen with --labels: soft) or `features` (--method).
    `needs_teacher_head`: whether the teacher must run its head (class logits, box deltas) or only backbone +
    neck. `adapter`: how the student's neck features reach `loss`: `paper`, through the paper's per-level
    adapters (a `distill.adapter_kernel` conv, 3x3 by default); `align`, through a 1x1 conv only when student and
    teacher widths differ (what CWD's, FGD's and PKD's references do), else as they are; `none`, as they are.
    `needs_boxes`: whether `loss` reads `batch["boxes"]` (on unlabelled images the `Distiller` puts the teacher's
    confident detections there). `head_tap`: the head block whose tower inputs the method reads (the detector
    returns them with `tap`). A method may hold learnable parameters of its own: the `Distiller` trains them,
    saves them in last.pt and leaves them out of best.pt. `loss` returns weighted terms, one logged column each,
    each named after the method (`name` or `name_<part>`: `pdf`, `pdf_cls`), so that the terms of a combination
    (`--method pdf,mse`) never share a key; the `Distiller` refuses a term named otherwise."""

    name: ClassVar[str] = ""
    config: ClassVar[type[Strict] | None] = None
    kind: ClassVar[Literal["labels", "features"]] = "features"
    needs_teacher_head: ClassVar[bool] = False
    needs_boxes: ClassVar[bool] = False
    adapter: ClassVar[Adapter] = "none"

    def __init__(self, cfg: Any, channels: int = 256, levels: int = 1, teacher: Any = None,
                 student_channels: int | None = None):
        """cfg: this method's config section; channels, levels: of the teacher's neck features; teacher: the
        frozen teacher, for a method that runs part of it (kept out of this module's parameters);
        student_channels: the student's width (default: the teacher's)."""
        super().__init__()
        self.cfg = cfg

    def head_tap(self, head_convs: int) -> int | None:
        """The head block whose tower inputs `loss` reads from both networks (None: none)."""
        return None

    def loss(self, student: DetectorOutput, teacher: DetectorOutput, batch: dict[str, Any]
             ) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def method_class(name: str) -> type[DistillMethod]:
    methods = discover()
    if name not in methods:
        from kdcli.errors import KdcliError

        raise KdcliError(f"unknown distillation method '{name}'",
                         hint=f"use one of: {', '.join(sorted(n for n, c in methods.items() if c.kind == 'features'))}")
    return methods[name]
