"""The `Distiller`: everything distillation adds to a student's training, behind one small interface.

It owns the frozen teacher (`eval()` including BatchNorm for the whole run, no gradients, outside the optimizer
and every checkpoint, run only as far as the terms need: backbone + neck when no term reads its head), the
trainable side (adapters and any parameters of the methods themselves, as one module: on the device, in the
optimizer through `trainable()`, saved in last.pt through `state_dict()`, wrapped for DDP), and the sum of the
weighted terms, one logged column each (named after their method: `pdf`, `mse`, `defeat_fg`, ...; two terms
never share a key, `merge_terms`). The training loop and `kdcli benchmark --distill` both use it:

    distiller = Distiller(cfg, teacher, student_channels)
    terms = distiller.student_loss(student, hard_loss, batch, epoch)   # {name: term, ..., "total": their sum}

A batch may mix labelled images with unlabelled ones (`batch["labeled"]`, one bool per image): the hard loss
sees the labelled images only, every distillation term sees them all, and a term that reads ground-truth boxes
(`needs_boxes`: DeFeat, FGD) gets the teacher's confident detections (score > `distill.pseudo_conf`) as the boxes
of an unlabelled image: DeFeat's and FGD's foreground is where objects are, and on an unlabelled image the
teacher's detections are the best estimate of that (leaving such images out would waste the pool for them).
With `distill.pool_view=strong` the student sees a photometrically jittered copy of each unlabelled image, the
teacher the image itself (`views.py`). A teacher at r x the student's resolution reads `batch["teacher_images"]`
(the trainer's full-size images; the student's are a 1/r copy): its maps cover the same ground as the student's.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import torch
from torch import nn

from kdcli.config.schema import feature_methods
from kdcli.distill.adapters import Adapters
from kdcli.distill.base import DistillMethod, discover
from kdcli.models.detector import Detector, DetectorOutput


HARD_TERMS = ("cls", "box")  # the hard loss's terms; "total" is the sum of them all


def merge_terms(terms: dict[str, torch.Tensor], new: dict[str, torch.Tensor], source: str,
                prefix: str | None = None) -> None:
    """Add `new`, the terms of `source`, to `terms`. Each key is a logged column (`loss_<key>` in results.csv),
    so two terms never share one: a key already there is an error, never an overwrite; with `prefix` (a method's
    name) every key must be the name itself or start with it and `_` (`pdf`, `pdf_cls`)."""
    for key in new:
        if prefix is not None and key != prefix and not key.startswith(prefix + "_"):
            raise ValueError(f"distillation method '{prefix}' returned a term '{key}': a method's terms are named "
                             f"'{prefix}' or '{prefix}_<part>', so that each has its own column")
        if key in terms or key == "total":
            raise ValueError(f"{source} returned a term '{key}' that this step already has (from "
                             f"{', '.join(terms)}): two terms would share one key and column")
    terms.update(new)


def method_names(labels: str, method: str) -> list[str]:
    """The registry entries a (labels, method) pair runs: `soft` for soft labels, then the feature methods."""
    return (["soft"] if "soft" in labels else []) + feature_methods(method)


class DistillTerms(nn.Module):
    """The trainable side of distillation: adapters and methods, one forward for DDP."""

    def __init__(self, methods: list[DistillMethod], adapters: Adapters | None, align: Adapters | None):
        super().__init__()
        self.methods = nn.ModuleList(methods)
        self.adapters = adapters  # the paper's adapters (`adapter = "paper"`)
        self.align = align  # 1x1 width alignment (`adapter = "align"`), only when the widths differ

    def forward(self, student: DetectorOutput, teacher: DetectorOutput, batch: dict[str, Any]
                ) -> dict[str, torch.Tensor]:
        views = {"none": student}
        for kind, module in (("paper", self.adapters), ("align", self.align)):
            views[kind] = replace(student, features=module(student.features)) if module is not None else student
        terms: dict[str, torch.Tensor] = {}
        for m in self.methods:
            merge_terms(terms, m.loss(views[m.adapter], teacher, batch), f"method '{m.name}'", prefix=m.name)
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
        kinds = {c.adapter for c in classes}
        adapters = Adapters(levels, student_channels, channels, cfg.adapter_kernel) if "paper" in kinds else None
        align = (Adapters(levels, student_channels, channels, 1)
                 if "align" in kinds and student_channels != channels else None)
        methods = [c(getattr(cfg, c.name), channels=channels, levels=levels, teacher=teacher,
                     student_channels=student_channels) for c in classes]
        self.terms = DistillTerms(methods, adapters, align)
        self._forward: nn.Module = self.terms
        self.needs_boxes = any(c.needs_boxes for c in classes)
        self.pool = getattr(cfg, "unlabeled", None) is not None
        self.teacher_head = any(c.needs_teacher_head for c in classes) or (self.needs_boxes and self.pool)
        taps = {t for t in (m.head_tap(teacher.cfg.head_convs) for m in methods) if t is not None}
        self.tap = max(taps) if taps else None

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

    def student_loss(self, student: nn.Module, hard_loss: Callable[..., dict[str, torch.Tensor]],
                     batch: dict[str, Any], epoch: int = 0) -> dict[str, torch.Tensor]:
        """One step's terms: the student's forward (with the head taps a method reads), the hard loss on the
        labelled images when the labels include `hard`, the distillation terms on every image, and `total`."""
        active = self.is_active(epoch)
        labeled = batch.get("labeled")
        images = batch["images"]
        if self.cfg.pool_view == "strong" and labeled is not None and not all(labeled):
            from kdcli.distill.views import strong

            pool = torch.tensor([not k for k in labeled], device=images.device)
            images = images.float().clone()
            images[pool] = strong(images[pool])
        out = student(images, tap=self.tap if active else None)
        terms: dict[str, torch.Tensor] = {}
        if "hard" in self.cfg.labels:
            if labeled is None or all(labeled):
                hard = hard_loss(out, batch["boxes"], batch["labels"])
            else:
                keep = torch.tensor(labeled, device=batch["images"].device)
                hard = hard_loss(out.select(keep), [b for b, k in zip(batch["boxes"], labeled) if k],
                                 [x for x, k in zip(batch["labels"], labeled) if k])
            terms.update({k: hard[k] for k in HARD_TERMS})
        if active:
            merge_terms(terms, self.loss(out, batch, epoch), "distillation")
        terms["total"] = torch.stack(list(terms.values())).sum()
        return terms

    def loss(self, student: DetectorOutput, batch: dict[str, Any], epoch: int = 0) -> dict[str, torch.Tensor]:
        """The weighted distillation terms of one batch (empty after `stop_epoch`)."""
        if not self.is_active(epoch):
            return {}
        with torch.no_grad():
            teacher = self.teacher(batch.get("teacher_images", batch["images"]), head=self.teacher_head, tap=self.tap)
            if self.needs_boxes and not all(batch.get("labeled") or [True]):
                batch = {**batch, "boxes": self.pseudo_boxes(teacher, batch)}
        return self._forward(student, teacher, batch)

    def pseudo_boxes(self, teacher: DetectorOutput, batch: dict[str, Any]) -> list[torch.Tensor]:
        """The batch's boxes with each unlabelled image's replaced by the teacher's detections above
        `distill.pseudo_conf` (after its NMS), for the terms that read boxes: in the student's pixels."""
        from kdcli.models.postprocess import postprocess

        cfg = self.teacher.cfg.model_copy(update={"conf": self.cfg.pseudo_conf})
        unlabeled = [i for i, k in enumerate(batch["labeled"]) if not k]
        keep = torch.zeros(len(batch["labeled"]), dtype=torch.bool, device=batch["images"].device)
        keep[unlabeled] = True
        seen = batch.get("teacher_images", batch["images"])
        found = postprocess(teacher.select(keep), cfg, tuple(seen.shape[-2:]))
        r = seen.shape[-1] / batch["images"].shape[-1]
        boxes = list(batch["boxes"])
        for i, det in zip(unlabeled, found):
            boxes[i] = det["boxes"] / r
        return boxes

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
        from kdcli.models.anchors import level_shapes

        shapes = level_shapes(imgsz, imgsz, t.strides)
        for name, module in (("adapter", self.terms.adapters), ("align", self.terms.align)):
            if module is not None:
                lines += [f"  {name} {x}" for x in module.report(
                    [(student_channels, h, w) for h, w in shapes], [(t.cfg.channels, h, w) for h, w in shapes])]
        for m in self.terms.methods:
            n = sum(p.numel() for p in m.parameters())
            if n:
                lines.append(f"  {m.name}: {n / 1e3:.1f}k learnable parameters of its own")
        return lines
