"""Distillation: the training loop of `Trainer` with a frozen teacher and the chosen terms added to the loss.

The teacher is rebuilt from its checkpoint alone, kept in `eval()` (BatchNorm too) for the whole run, runs
under `no_grad`, is not in the optimizer and is never saved with the student; it runs only as far as the
terms need (backbone + neck for feature-only methods). Before training it is evaluated on the validation
split, and a teacher below `distill.teacher_min_map` stops the run unless forced.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from kdcli.config import load
from kdcli.console import err
from kdcli.data.dataset import DetectionDataset, collate
from kdcli.distill.adapters import Adapters
from kdcli.distill.base import DistillMethod, method_class
from kdcli.engine import checkpoint, distributed as dist
from kdcli.engine.trainer import Trainer
from kdcli.engine.validator import evaluate
from kdcli.errors import FAILED, KdcliError
from kdcli.models.anchors import level_shapes

TEACHER_CHECK_IMAGES = 200  # a teacher checked on the training split (no val split) sees at most this many
STUDENT_MODEL = "models/student_r18_fpn"
STUDENT_LR = 0.01  # methods.md: the student's learning rate


def student_defaults(teacher_ckpt: dict[str, Any]) -> dict[str, Any]:
    """With no recipe: the teacher's data, fold, image size and training schedule, and the paper's R18+FPN
    student sharing the teacher's channels, levels, max-pool and ImageNet-weights setting."""
    tr = teacher_ckpt["recipe"]
    model = load.read_yaml(load.find_recipe(STUDENT_MODEL))["model"]
    model.update({k: tr["model"][k] for k in ("pretrained", "channels", "levels", "maxpool")})
    return {"seed": tr["seed"], "data": {**tr["data"], "path": teacher_ckpt["data"]["path"]},
            "augment": tr["augment"], "model": model, "train": {**tr["train"], "lr": STUDENT_LR}}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DistillTrainer(Trainer):
    task = "distill"

    def __init__(self, *args: Any, force: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.force = force
        self.teacher_map: float | None = None

    # ---- setup -------------------------------------------------------------------------------------------------
    def build_extra(self) -> None:
        cfg = self.recipe.distill
        if not cfg.teacher:
            raise KdcliError("no teacher given", hint="pass --teacher runs/train/<name>/weights/best.pt")
        self.teacher_path = Path(cfg.teacher)
        ckpt = checkpoint.load(self.teacher_path)
        self.teacher = checkpoint.model_from_checkpoint(ckpt, str(self.teacher_path)).to(self.device).eval()
        self._check_compatible(ckpt)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher_sha256 = file_sha256(self.teacher_path)
        names = (["soft"] if "soft" in cfg.labels else []) + ([cfg.method] if cfg.method != "none" else [])
        classes = [method_class(n) for n in names]
        self.adapters: Adapters | None = None
        if any(c.uses_adapters for c in classes):
            n_levels = len(self.bare_model.strides)
            self.adapters = Adapters(n_levels, self.recipe.model.channels, self.teacher.cfg.channels,
                                     cfg.adapter_kernel).to(self.device)
        self.methods: list[DistillMethod] = [c(cfg, self.adapters if c.uses_adapters else None) for c in classes]
        self.teacher_head = any(c.needs_teacher_head for c in classes)
        self._report()

    def _check_compatible(self, ckpt: dict[str, Any]) -> None:
        t_data, t_model = ckpt["data"], ckpt["model"]
        if Path(t_data["path"]).resolve() != self.dataset_dir or t_data["fold"] != self.recipe.data.fold:
            raise KdcliError(f"the teacher was trained on {t_data['path']} fold {t_data['fold']}, this run asks for "
                             f"{self.dataset_dir} fold {self.recipe.data.fold}",
                             hint="a student distils on its teacher's dataset and fold: train a teacher for it")
        if t_model["classes"] != self.classes:
            raise KdcliError(f"class names differ: teacher {t_model['classes']}, dataset {self.classes}")
        if t_model["imgsz"] != self.recipe.data.imgsz:
            raise KdcliError(f"image size differs: teacher {t_model['imgsz']}, student {self.recipe.data.imgsz}",
                             hint=f"set data.imgsz={t_model['imgsz']}")
        if self.teacher.strides != self.bare_model.strides:
            raise KdcliError(f"pyramid strides differ: teacher {self.teacher.strides}, student "
                             f"{self.bare_model.strides}",
                             hint="use the teacher's model.levels and model.maxpool")

    def _report(self) -> None:
        cfg = self.recipe.distill
        if not dist.is_main():
            return
        part = "backbone + neck + head" if self.teacher_head else "backbone + neck (truncated)"
        err.print(f"teacher {self.teacher_path} ({self.teacher.cfg.backbone}+{self.teacher.cfg.neck}), frozen, runs "
                  f"{part}; labels {cfg.labels}, method {cfg.method}", highlight=False)
        if self.adapters is not None:
            imgsz = self.recipe.data.imgsz
            shapes = level_shapes(imgsz, imgsz, self.bare_model.strides)
            s = [(self.recipe.model.channels, h, w) for h, w in shapes]
            t = [(self.teacher.cfg.channels, h, w) for h, w in shapes]
            for line in self.adapters.report(s, t):
                err.print(f"  adapter {line}", highlight=False, soft_wrap=True)

    def trainable_extra(self) -> list[nn.Module]:
        return [self.adapters] if getattr(self, "adapters", None) is not None else []

    def setup(self) -> None:
        super().setup()
        if dist.world_size() > 1 and self.adapters is not None:
            wrapped = nn.parallel.DistributedDataParallel(
                self.adapters, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            for m in self.methods:
                if m.adapters is not None:
                    m.adapters = wrapped

    def before_train(self) -> None:
        """Evaluate the teacher first: a random teacher must not be distilled silently."""
        if self.epoch > 0:  # resumed: it was checked when the run started
            return
        if self.val_set is not None:
            loader_set, gt, where = self.val_set, self.val_json, "val"
        else:
            ds = self.train_set
            n = min(len(ds), TEACHER_CHECK_IMAGES)
            plain = DetectionDataset(ds.dataset_dir, self.recipe.data.train_split, self.recipe.data.fold,
                                     self.recipe.data.imgsz, self.recipe.data.letterbox,
                                     channels=self.recipe.data.channels)
            loader_set = Subset(plain, range(n))
            ids = {r.image_id for r in plain.records[:n]}
            full = plain.coco
            gt = {**full, "images": [im for im in full["images"] if im["id"] in ids],
                  "annotations": [a for a in full["annotations"] if a["image_id"] in ids]}
            where = f"first {n} train images (no val split)"
        loader = DataLoader(loader_set, batch_size=self.recipe.train.batch * 2, num_workers=self.recipe.data.workers,
                            collate_fn=collate)
        metrics, _ = evaluate(self.teacher, loader, gt, self.classes, self.teacher.cfg, self.device, [],
                              amp_dtype=self.amp_dtype)
        self.teacher_map = metrics["mAP50"]
        err.print(f"teacher mAP50 on {where}: {self.teacher_map:.4f}", highlight=False)
        threshold = self.recipe.distill.teacher_min_map
        if self.teacher_map < threshold and not self.force:
            raise KdcliError(f"the teacher looks untrained: mAP50 {self.teacher_map:.4f} < {threshold} on {where}",
                             hint="train it longer, check the checkpoint, or pass --force", exit_code=FAILED)

    # ---- loss --------------------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        cfg = self.recipe.distill
        student = self.model(batch["images"])
        terms: dict[str, torch.Tensor] = {}
        if "hard" in cfg.labels:
            hard = self.loss_fn(student, batch["boxes"], batch["labels"])
            terms.update(cls=hard["cls"], box=hard["box"])
        active = cfg.stop_epoch is None or self.epoch < cfg.stop_epoch
        if self.methods and active:
            with torch.no_grad():
                teacher = self.teacher(batch["images"], head=self.teacher_head)
            for m in self.methods:
                terms.update(m.loss(student, teacher, batch))
        terms["total"] = torch.stack([v for v in terms.values()]).sum()
        return terms

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def checkpoint_extra(self) -> dict[str, Any]:
        cfg = self.recipe.distill
        return {"distill": {"teacher": str(self.teacher_path.resolve()), "teacher_sha256": self.teacher_sha256,
                            "teacher_val_mAP50": self.teacher_map, "labels": cfg.labels, "method": cfg.method,
                            "config": cfg.model_dump(mode="json")}}

    def train_state_extra(self) -> dict[str, Any]:
        state = {"teacher_map": self.teacher_map}
        return {**state, "adapters": self.adapters.state_dict()} if self.adapters is not None else state

    def load_train_state_extra(self, state: dict[str, Any]) -> None:
        self.teacher_map = state.get("teacher_map")
        if self.adapters is not None:
            if "adapters" not in state:
                raise KdcliError("last.pt has no adapter state for this distillation method")
            checkpoint.load_state_strict(self.adapters, state["adapters"], "last.pt adapters")
