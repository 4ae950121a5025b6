"""Distillation: the training loop of `Trainer` with a `Distiller` (kdcli/distill/distiller.py) adding its
terms to the loss. This module only connects the two: it rebuilds the teacher from its checkpoint, checks that
teacher and student fit (dataset, fold, classes, image size, strides), and evaluates the teacher before the
first epoch: a teacher below `distill.teacher_min_map` stops the run unless forced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from kdcli import atomic
from kdcli.config import load
from kdcli.console import err
from kdcli.data import coco
from kdcli.data.dataset import DetectionDataset, collate
from kdcli.distill.distiller import Distiller
from kdcli.engine import checkpoint, distributed as dist
from kdcli.engine.trainer import Trainer
from kdcli.engine.validator import evaluate
from kdcli.errors import FAILED, KdcliError

TEACHER_CHECK_IMAGES = 200  # a teacher checked on the training split (no val split) sees at most this many
STUDENT_MODEL = "models/student_r18_fpn"
STUDENT_LR = 0.01  # methods.md: the student's learning rate


def student_defaults(teacher_ckpt: checkpoint.Checkpoint) -> dict[str, Any]:
    """With no recipe: the teacher's data, fold, image size and training schedule, and the paper's R18+FPN
    student sharing the teacher's channels, levels, max-pool, normalisation and ImageNet-weights setting."""
    tr = teacher_ckpt.recipe
    model = load.read_yaml(load.find_recipe(STUDENT_MODEL))["model"]
    model.update({k: tr["model"][k] for k in ("pretrained", "channels", "levels", "maxpool", "norm", "backbone_norm")
                  if k in tr["model"]})
    return {"seed": tr["seed"], "data": {**tr["data"], "path": teacher_ckpt.data.path},
            "augment": tr["augment"], "model": model, "train": {**tr["train"], "lr": STUDENT_LR}}


def _read_checks(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


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
        teacher = checkpoint.model_from_checkpoint(ckpt, str(self.teacher_path))
        self._check_compatible(ckpt, teacher)
        self.teacher_sha256 = file_sha256(self.teacher_path)
        self.distiller = Distiller(cfg, teacher, self.recipe.model.channels).to(self.device)
        if dist.is_main():
            err.print(f"teacher {self.teacher_path}", highlight=False)
            for line in self.distiller.report(self.recipe.data.imgsz, self.recipe.model.channels):
                err.print(line, highlight=False, soft_wrap=True)

    def forward_modules(self) -> list[nn.Module]:
        return [self.model, self.teacher]

    @property
    def teacher(self) -> nn.Module:
        return self.distiller.teacher

    def _check_compatible(self, ckpt: checkpoint.Checkpoint, teacher: nn.Module) -> None:
        t_data, t_model = ckpt.data, ckpt.model
        if Path(t_data.path).resolve() != self.dataset_dir or t_data.fold != self.recipe.data.fold:
            raise KdcliError(f"the teacher was trained on {t_data.path} fold {t_data.fold}, this run asks for "
                             f"{self.dataset_dir} fold {self.recipe.data.fold}",
                             hint="a student distils on its teacher's dataset and fold: train a teacher for it")
        if t_model.classes != self.classes:
            raise KdcliError(f"class names differ: teacher {t_model.classes}, dataset {self.classes}")
        if t_model.imgsz != self.recipe.data.imgsz:
            raise KdcliError(f"image size differs: teacher {t_model.imgsz}, student {self.recipe.data.imgsz}",
                             hint=f"set data.imgsz={t_model.imgsz}")
        if teacher.strides != self.bare_model.strides:
            raise KdcliError(f"pyramid strides differ: teacher {teacher.strides}, student "
                             f"{self.bare_model.strides}",
                             hint="use the teacher's model.levels and model.maxpool")

    def trainable_extra(self) -> list[nn.Module]:
        return self.distiller.trainable() if hasattr(self, "distiller") else []

    def set_train_mode(self) -> None:
        super().set_train_mode()
        self.distiller.train()

    def setup(self) -> None:
        super().setup()
        if dist.world_size() > 1:
            self.distiller.wrap_ddp(self.device)

    def before_train(self) -> None:
        """Evaluate the teacher first: a random teacher must not be distilled silently. The result is cached beside
        the teacher (`<name>.checks.json`, keyed by its SHA-256, dataset, fold and split), so the students of one
        teacher in a study pay for it once."""
        if self.epoch > 0:  # resumed: it was checked when the run started
            return
        where = "val" if self.val_set is not None else f"first {TEACHER_CHECK_IMAGES} train images (no val split)"
        cache = self.teacher_path.with_suffix(".checks.json")
        d = self.recipe.data
        split = coco.split_path(self.dataset_dir, d.val_split if self.val_set is not None else d.train_split, d.fold)
        st = split.stat()  # a re-prepared dataset at the same path is checked again
        key = f"{self.teacher_sha256}|{split}|{st.st_size}|{st.st_mtime_ns}|{where}"
        cached = _read_checks(cache).get(key)
        if cached is not None:
            self.teacher_map = float(cached)
            err.print(f"teacher mAP50 on {where}: {self.teacher_map:.4f} (checked before: {cache.name})",
                      highlight=False)
        else:
            self.teacher_map = self._evaluate_teacher()
            err.print(f"teacher mAP50 on {where}: {self.teacher_map:.4f}", highlight=False)
            with contextlib.suppress(OSError):  # a read-only teacher folder: the check is simply not cached
                atomic.write_json(cache, {**_read_checks(cache), key: self.teacher_map}, indent=1)
        threshold = self.recipe.distill.teacher_min_map
        if self.teacher_map < threshold and not self.force:
            raise KdcliError(f"the teacher looks untrained: mAP50 {self.teacher_map:.4f} < {threshold} on {where}",
                             hint="train it longer, check the checkpoint, or pass --force", exit_code=FAILED)

    def _evaluate_teacher(self) -> float:
        if self.val_set is not None:
            loader_set, gt = self.val_set, self.val_json
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
        loader = DataLoader(loader_set, batch_size=self.recipe.train.batch * 2, num_workers=self.recipe.data.workers,
                            collate_fn=collate)
        metrics, _ = evaluate(self.teacher, loader, gt, self.classes, self.teacher.cfg, self.device, [],
                              amp_dtype=self.amp_dtype)
        return float(metrics["mAP50"])

    # ---- loss --------------------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        student = self.model(batch["images"])
        terms: dict[str, torch.Tensor] = {}
        if "hard" in self.recipe.distill.labels:
            hard = self.loss_fn(student, batch["boxes"], batch["labels"])
            terms.update(cls=hard["cls"], box=hard["box"])
        terms.update(self.distiller.loss(student, batch, self.epoch))
        terms["total"] = torch.stack(list(terms.values())).sum()
        return terms

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def checkpoint_extra(self) -> dict[str, Any]:
        cfg = self.recipe.distill
        return {"distill": {"teacher": str(self.teacher_path.resolve()), "teacher_sha256": self.teacher_sha256,
                            "teacher_val_mAP50": self.teacher_map, "labels": cfg.labels, "method": cfg.method,
                            "config": cfg.model_dump(mode="json")}}

    def train_state_extra(self) -> dict[str, Any]:
        return {"teacher_map": self.teacher_map, "distiller": self.distiller.state_dict()}

    def load_train_state_extra(self, state: checkpoint.TrainState) -> None:
        self.teacher_map = state.extra("teacher_map")
        if state.extra("distiller") is None:
            raise KdcliError("last.pt has no distillation state (written by an older kdcli?)",
                             hint="start the distillation again")
        self.distiller.load_state_dict(state.extra("distiller"), "last.pt")
