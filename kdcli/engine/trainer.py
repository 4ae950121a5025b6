"""The training loop. A reader should hold it in their head at once: setup, then per epoch
`train_one_epoch` -> `validate` -> `save`; subclasses (distillation) override `build_extra`, `compute_loss`
and `checkpoint_extra`.

Reproducibility: data order is drawn from (seed, epoch), each sample's augmentation from (seed, epoch, index),
multi-scale sizes from (seed, step), so a resumed run replays exactly what a straight run does. `last.pt` is
written every epoch and on SIGTERM/SIGINT; an interrupt stops at the next optimizer step and saves the batches done
so far, so the resumed epoch continues with the next batch of the same order. `best.pt` is written when
validation mAP50 improves.
"""

from __future__ import annotations

import copy
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader, Dataset

import kdcli
from kdcli import atomic, paths
from kdcli.config.load import dump
from kdcli.config.schema import Recipe
from kdcli.console import err
from kdcli.data import coco
from kdcli.data.dataset import DetectionDataset, collate, label_split, loader_workers
from kdcli.data.transforms import train_transform
from kdcli.engine import checkpoint, distributed as dist
from kdcli.engine.acceleration import compile_forward
from kdcli.engine.callbacks import Callbacks, default_callbacks
from kdcli.engine.ema import ModelEMA
from kdcli.engine.schedule import lr_at
from kdcli.engine.validator import evaluate
from kdcli.errors import FAILED, KdcliError
from kdcli.models.detector import Detector, build_detector
from kdcli.models.losses import DetectionLoss

MAX_RELOADS = 3


RESUME_OVERRIDES = ("train.device", "data.workers", "train.epochs", "train.plots")  # what a resume may change


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def unique_run_dir(root: Path, name: str) -> Path:
    d, n = root / name, 2
    while d.exists():
        d, n = root / f"{name}{n}", n + 1
    return d


def param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only: none on biases and normalisation layers."""
    decay, no_decay = [], []
    for module in modules:
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                if name == "bias" or isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                    no_decay.append(p)
                else:
                    decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(groups: list[dict[str, Any]], t: Any) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW with the fused kernels where torch has them for the device (CPU included since
    torch 2.4: six times faster than the per-tensor loop torch otherwise picks on a CPU), else `foreach`."""
    cls, kw = ((torch.optim.SGD, {"momentum": t.momentum, "nesterov": True}) if t.optimizer == "sgd" else
               (torch.optim.AdamW, {"betas": (t.momentum, 0.999)}))
    try:
        return cls(groups, lr=t.lr, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return cls(groups, lr=t.lr, foreach=True, **kw)


class Trainer:
    task = "train"

    def __init__(self, recipe: Recipe, run_dir: Path | None = None,
                 resume: str | Path | checkpoint.Checkpoint | None = None, callbacks: Callbacks | None = None,
                 recipe_path: str | None = None):
        self.recipe = recipe
        # a checkpoint already read (by `resume`) is kept until setup restores it, so last.pt is read once
        self._resume_checkpoint = resume if isinstance(resume, checkpoint.Checkpoint) else None
        self.resume_path = (self._resume_checkpoint.path if self._resume_checkpoint else
                            Path(resume) if resume else None)
        self.callbacks = callbacks or default_callbacks()
        name = recipe.name or (Path(recipe_path).stem if recipe_path else self.task)
        self.run_dir = run_dir or (self.resume_path.parent.parent if self.resume_path else
                                   unique_run_dir(paths.runs_root() / self.task, name))
        self.weights_dir = self.run_dir / "weights"
        self.history: list[dict[str, Any]] = []
        self.best_fitness = -1.0
        self.best_epoch = -1
        self.epoch = 0
        self.step = 0  # optimizer steps taken
        self.stop_requested = False
        self.partial_epoch: dict[str, Any] | None = None  # batches done, loss sums and count of an interrupted epoch
        self.bad_steps = 0
        self.reloads = 0
        self.last_metrics: dict[str, Any] = {}
        self.seconds_before = 0.0  # training time of earlier attempts (resume)
        self.writer = checkpoint.BackgroundWriter()
        self.val_samples: list[dict[str, Any]] = []
        self.attempt_start = time.perf_counter()
        self.first_step_s: float | None = None  # from the start of the process to the end of the first step

    @classmethod
    def resume(cls, path: str | Path, overrides: list[str] | None = None, **kwargs: Any) -> Trainer:
        """The trainer that continues the run of `path` (a last.pt) exactly: its stored recipe, with only the
        overrides a resume may change (RESUME_OVERRIDES). `kdcli train/distill --resume` and the study runner all
        come through here."""
        from kdcli.config import load

        path = Path(path)
        ckpt = checkpoint.load(path)
        if ckpt.train_state is None:
            raise KdcliError(f"{path}: no training state (best.pt cannot resume)", hint="resume from last.pt")
        task = ckpt.task
        if task != cls.task:
            raise KdcliError(f"{path}: a '{task}' run; resume it with `kdcli {task} --resume`")
        for item in overrides or []:
            key = ".".join(load.resolve_key(Recipe, load.parse_override(item)[0]))
            if key not in RESUME_OVERRIDES:
                raise KdcliError(f"'{item}' cannot change on resume", hint=f"allowed: {', '.join(RESUME_OVERRIDES)}")
        return cls(load.load(Recipe, None, overrides or [], defaults=ckpt.recipe), resume=ckpt, **kwargs)

    # ---- setup -------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        r, t = self.recipe, self.recipe.train
        self.check_recipe()
        seed_everything(r.seed, t.deterministic)
        self.device = dist.resolve_device(t.device)
        dist.init(self.device)
        self.dataset_dir = paths.resolve_dataset(r.data.path).resolve()
        self.meta = coco.read_dataset_yaml(self.dataset_dir)
        d, size = r.data, self.train_imgsz()
        self.train_set = DetectionDataset(self.dataset_dir, d.train_split, d.fold, size, d.letterbox,
                                          train_transform(r.augment, size, d.letterbox), d.channels)
        if len(self.train_set) == 0:
            raise KdcliError(f"{coco.split_path(self.dataset_dir, d.train_split, d.fold)}: no training images")
        total = len(self.train_set)
        self.train_set.records, self.unlabeled_records = label_split(self.train_set.records, d.label_fraction,
                                                                     r.seed, d.fold)
        if self.unlabeled_records and dist.is_main():
            err.print(f"{len(self.train_set)} of {total} training images keep their labels (data.label_fraction="
                      f"{d.label_fraction}, seed {r.seed}, fold {d.fold})", highlight=False)
        if d.cache == "ram":
            self.train_set.cache_in_ram()
        self.classes = self.train_set.classes
        self.train_set.seed = r.seed
        self.val_set = self.val_json = None
        if coco.split_path(self.dataset_dir, d.val_split, d.fold).is_file():
            val_set = DetectionDataset(self.dataset_dir, d.val_split, d.fold, d.imgsz, d.letterbox,
                                       channels=d.channels, cache=d.cache)
            if len(val_set):
                self.val_set, self.val_json = val_set, val_set.coco
        torch.manual_seed(r.seed)
        self.model = self.build_model().to(self.device)
        self.loss_fn = DetectionLoss(r.model, len(self.classes))
        self.build_extra()
        if t.channels_last:
            for m in self.forward_modules():
                m.to(memory_format=torch.channels_last)
        self.ema = ModelEMA(self.model, t.ema_decay, t.ema_tau) if t.ema else None
        if t.compile:  # after the EMA copy, which stays a plain module for evaluation
            for m in self.forward_modules():
                compile_forward(m, self.device)
        groups = param_groups([self.model, *self.trainable_extra()], t.weight_decay)
        self.optimizer = make_optimizer(groups, t)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.accumulate = max(1, round((t.nominal_batch or t.batch) / t.batch))
        self.steps_per_epoch = math.ceil(self._batches_per_epoch() / self.accumulate)
        self.total_steps = t.epochs * self.steps_per_epoch
        if self.ema is not None and dist.is_main():
            window = self.ema.window(self.total_steps)
            if window > max(10.0, self.total_steps / 4):
                err.print(f"[yellow]warning:[/] at the end of this run the EMA averages over about {window:.0f} "
                          f"steps of {self.total_steps}: the saved model would lag behind training",
                          highlight=False, soft_wrap=True)
                err.print("[dim]hint: lower train.ema_decay (e.g. 0.99 for a few hundred steps) or raise "
                          "train.ema_tau[/]", highlight=False)
        if self.resume_path:
            self.load_resume(self._resume_checkpoint or checkpoint.load(self.resume_path))
            self._resume_checkpoint = None
        if dist.world_size() > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def build_model(self) -> Detector:
        r = self.recipe
        return build_detector(r.model, len(self.classes), r.data.imgsz, r.data.anchor_size)

    def check_recipe(self) -> None:
        """Hook: refuse a recipe this task cannot run, before anything is read. A plain training run learns from
        labels only: no unlabelled pool."""
        if self.recipe.distill.unlabeled is not None:
            raise KdcliError(f"distill.unlabeled={self.recipe.distill.unlabeled}: a pool of unlabelled images is for "
                             "`kdcli distill`; `kdcli train` learns from the labelled images only",
                             hint="drop distill.unlabeled, or distil a student with it")

    def build_extra(self) -> None:
        """Hook: more modules trained beside the model (distillation adapters)."""

    def forward_modules(self) -> list[nn.Module]:
        """Hook: the networks that take the images (distillation: the teacher too)."""
        return [self.model]

    def before_train(self) -> None:
        """Hook: checks after setup, before the first epoch (distillation: the teacher check)."""

    def trainable_extra(self) -> list[nn.Module]:
        """Hook: modules trained beside the model (distillation: adapters, methods' parameters)."""
        return []

    def set_train_mode(self) -> None:
        """Hook: put what trains into train mode at the start of an epoch."""
        self.model.train()
        for m in self.trainable_extra():
            m.train()

    def _amp_dtype(self) -> torch.dtype | None:
        mode = self.recipe.train.amp
        if self.device.type != "cuda" or mode == "off":
            return None
        if mode == "fp16":
            return torch.float16
        if mode == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16

    def _drop_last(self) -> bool:
        """Drop a ragged last batch (BatchNorm on the CEM's 1x1 global branch needs 2+ images) when it leaves
        at least one full batch."""
        return len(self.train_set) // dist.world_size() >= self.recipe.train.batch

    def _batches_per_epoch(self) -> int:
        per_rank = len(self.train_set) / dist.world_size() / self.recipe.train.batch
        n = math.floor(per_rank) if self._drop_last() else math.ceil(per_rank)
        return min(n, self.recipe.train.max_batches or n)

    def images_per_epoch(self) -> int:
        """Training images one epoch goes through, all processes together."""
        return self._batches_per_epoch() * self.recipe.train.batch * dist.world_size()

    @property
    def bare_model(self) -> Detector:
        return self.model.module if isinstance(self.model, nn.parallel.DistributedDataParallel) else self.model

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's batches of one epoch, as indices into `loader_dataset()`: a permutation drawn from
        (seed, epoch), shared out between DDP processes, cut into batches (a ragged last one dropped when
        `_drop_last`), at most `train.max_batches`. Written out in full so a resumed epoch can skip what was done."""
        g = torch.Generator().manual_seed(self.recipe.seed * 100_003 + epoch)
        n, world, b = len(self.train_set), dist.world_size(), self.recipe.train.batch
        order = torch.randperm(n, generator=g).tolist()
        if world > 1:
            order = (order + order[:(-n) % world])[dist.rank()::world]
        return [order[i:i + b] for i in range(0, len(order), b)][:self._batches_per_epoch()]

    def loader_dataset(self) -> Dataset:
        """Hook: what `epoch_batches` indexes (distillation with an unlabelled pool: labelled + pool images)."""
        return self.train_set

    def set_epoch(self, epoch: int) -> None:
        """Hook: tell the training datasets the epoch (each sample's augmentation is drawn from it)."""
        self.train_set.epoch = epoch

    def train_loader(self, epoch: int, start: int = 0) -> DataLoader:
        """The epoch's batches from batch `start` on (a resumed, interrupted epoch skips those already done)."""
        self.set_epoch(epoch)
        # its own generator: creating the loader draws no number from the global RNG, which the resume restores
        g = torch.Generator().manual_seed(self.recipe.seed * 100_003 + epoch)
        return DataLoader(self.loader_dataset(), batch_sampler=self.epoch_batches(epoch)[start:],
                          num_workers=loader_workers(self.recipe.data.workers), collate_fn=collate, generator=g,
                          pin_memory=self.device.type == "cuda")

    def val_loader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.recipe.train.batch * 2, shuffle=False,
                          num_workers=loader_workers(self.recipe.data.workers), collate_fn=collate)

    def train_imgsz(self) -> int:
        """Hook: the size training images are read at: data.imgsz (distillation from a teacher at r x the student's
        resolution reads them at the teacher's and gives the student a 1/r copy)."""
        return self.recipe.data.imgsz

    # ---- one step ----------------------------------------------------------------------------------------------
    def preprocess(self, batch: dict[str, Any], epoch: int) -> dict[str, Any]:
        """Move to the device; multi-scale: resize the batch to a size drawn for this step."""
        t, imgsz = self.recipe.train, self.recipe.data.imgsz
        images = batch["images"].to(self.device, non_blocking=True).float()
        if t.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        boxes = [b.to(self.device) for b in batch["boxes"]]
        if t.multiscale and epoch < t.multiscale_until * t.epochs:
            size = random.Random(self.recipe.seed * 1_000_003 + self.step).choice(t.multiscale)
            if size != images.shape[-1]:
                images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
                boxes = [b * (size / imgsz) for b in boxes]
        return {**batch, "images": images, "boxes": boxes, "labels": [x.to(self.device) for x in batch["labels"]]}

    def compute_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Loss terms for one batch; `total` is what is optimised. Distillation adds its own terms."""
        out = self.model(batch["images"])
        return self.loss_fn(out, batch["boxes"], batch["labels"])

    # ---- loop --------------------------------------------------------------------------------------------------
    def run_callbacks(self, event: str) -> None:
        """Callbacks (loggers, plots) run on the main process only."""
        if dist.is_main():
            self.callbacks.run(event, self)

    @property
    def train_seconds(self) -> float:
        """Wall time spent in `fit` over every attempt of this run (resumed attempts add up)."""
        return self.seconds_before + time.perf_counter() - self.attempt_start

    def fit(self) -> dict[str, Any]:
        self.attempt_start = time.perf_counter()
        if dist.is_main():
            atomic.ensure_dir_possible(self.run_dir, "run folder")  # before data, models and the teacher check
            self._remove_stale_temps()
        self.setup()
        self.before_train()
        t = self.recipe.train
        if dist.is_main():
            self.weights_dir.mkdir(parents=True, exist_ok=True)
            atomic.write_yaml(self.run_dir / "args.yaml", dump(self.recipe))
            err.print(f"[bold]{self.task}[/] -> {self.run_dir}  ({len(self.train_set)} train images, "
                      f"{len(self.val_set) if self.val_set else 0} val, device {self.device}"
                      f"{', AMP ' + str(self.amp_dtype).split('.')[-1] if self.amp_dtype else ''})", highlight=False)
        self.run_callbacks("on_train_start")
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            signal.signal(s, self._on_signal)
        self._remember_good_state()
        try:
            while self.epoch < t.epochs and not self.stop_requested:
                self.run_callbacks("on_epoch_start")
                t0 = time.perf_counter()
                losses, complete = self.train_one_epoch(self.epoch)
                if not complete:  # interrupted mid-epoch: save; the resume continues with the next batch
                    if dist.is_main():
                        self.save(epoch_complete=False)
                    break
                row = {"epoch": self.epoch + 1, **{f"loss_{k}": round(v, 6) for k, v in losses.items()},
                       "lr": self.optimizer.param_groups[0]["lr"], "train_s": round(time.perf_counter() - t0, 2)}
                last = self.epoch + 1 == t.epochs
                if self.val_set is not None and ((self.epoch + 1) % t.val_every == 0 or last):
                    self.last_metrics = self.validate()
                    row.update({k: round(self.last_metrics[k], 6) for k in ("mAP50", "mAP50-95")})
                row["time_s"] = round(time.perf_counter() - t0, 2)
                self.history.append(row)
                self.epoch += 1
                improved = self._update_best(row)
                if dist.is_main():
                    self.save(epoch_complete=True, best=improved)
                    self._print_epoch(row, improved)
                self._remember_good_state()
                self.run_callbacks("on_epoch_end")
                if t.patience and self.epoch - self.best_epoch >= t.patience and self.val_set is not None:
                    err.print(f"early stop: no mAP50 improvement for {t.patience} epochs (best at epoch "
                              f"{self.best_epoch})")
                    break
            self.run_callbacks("on_train_end")
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            self.writer.wait()
            dist.cleanup()
        return {"run_dir": str(self.run_dir), "epochs": self.epoch, "best_epoch": self.best_epoch,
                "best_fitness": self.best_fitness, "metrics": self.last_metrics,
                "interrupted": self.stop_requested, "train_seconds": round(self.train_seconds, 1),
                "first_step_s": self.first_step_s}

    def _remove_stale_temps(self) -> None:
        """A resumed (or restarted) run first removes what a killed checkpoint write left in its folders: a
        hidden `.last.pt.<pid>.<random>.tmp` as large as a checkpoint, which nothing else would ever remove."""
        for folder in (self.run_dir, self.weights_dir):
            files, size = atomic.remove_stale_temps(folder)
            if files:
                err.print(f"removed {files} temporary file(s) of {size:,} bytes ({size / 2**20:.1f} MiB) from "
                          f"{folder}: left by a write that was killed midway", highlight=False, soft_wrap=True)

    def train_one_epoch(self, epoch: int) -> tuple[dict[str, float], bool]:
        """One pass over the epoch's batches (from where an interrupted attempt stopped); returns the mean of each
        loss term and whether the epoch is complete (False: interrupted, `partial_epoch` says how far it got)."""
        t = self.recipe.train
        self.set_train_mode()
        part, self.partial_epoch = self.partial_epoch or {"batch": 0, "sums": {}, "count": 0}, None
        start, sums, count = int(part["batch"]), dict(part["sums"]), int(part["count"])
        loader = self.train_loader(epoch, start)
        n_batches = self._batches_per_epoch()
        show = dist.is_main()
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[losses]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                      console=err, disable=not show, transient=True) as bar:
            task = bar.add_task(f"{self.task} {epoch + 1}/{t.epochs}", total=n_batches, completed=start, losses="")
            self.optimizer.zero_grad(set_to_none=True)
            for i, batch in enumerate(loader, start):
                batch = self.preprocess(batch, epoch)
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    terms = self.compute_loss(batch)
                values = dict(zip(terms, torch.stack([v.detach().float() for v in terms.values()]).tolist()))
                if not math.isfinite(values["total"]):  # one host sync per step for the check and the log
                    self._on_nonfinite(terms)
                    continue
                self.scaler.scale(terms["total"] / self.accumulate).backward()
                stepped = (i + 1) % self.accumulate == 0 or i + 1 == n_batches
                if stepped:
                    self._optimizer_step()
                    if self.first_step_s is None:
                        self.first_step_s = round(time.perf_counter() - kdcli.STARTED, 2)
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                bar.update(task, advance=1, losses="  ".join(f"{k} {v / count:.4f}" for k, v in sums.items()))
                self.run_callbacks("on_batch_end")
                if self.stop_requested and stepped and i + 1 < n_batches:  # never inside an accumulation
                    self.partial_epoch = {"batch": i + 1, "sums": sums, "count": count}
                    return {k: v / max(count, 1) for k, v in sums.items()}, False
        means = torch.tensor([sums.get(k, 0.0) / max(count, 1) for k in sorted(sums)], device=self.device)
        means = dist.all_reduce_mean(means).tolist()
        return dict(zip(sorted(sums), means)), True

    def _optimizer_step(self) -> None:
        t = self.recipe.train
        lr = lr_at(self.step, self.total_steps, t.lr, t.warmup_iters, t.final_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
        if not torch.isfinite(norm) and self.amp_dtype != torch.float16:
            self.optimizer.zero_grad(set_to_none=True)
            self._on_nonfinite({"grad_norm": norm})
            return
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.bad_steps = 0
        if self.ema is not None:
            self.ema.update(self.bare_model)

    def _on_nonfinite(self, terms: dict[str, torch.Tensor]) -> None:
        """Skip a non-finite step; after `nan_skip_limit` in a row, reload the last good state."""
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps += 1
        bad = ", ".join(k for k, v in terms.items() if not torch.isfinite(v.detach()).all())
        err.print(f"[yellow]warning:[/] non-finite {bad} at step {self.step}: step skipped "
                  f"({self.bad_steps}/{self.recipe.train.nan_skip_limit})")
        if self.bad_steps >= self.recipe.train.nan_skip_limit:
            self.reloads += 1
            if self.reloads > MAX_RELOADS:
                raise KdcliError(f"training diverged: non-finite losses persist after {MAX_RELOADS} reloads of the "
                                 "last good state", hint="lower train.lr, raise train.warmup_iters, or set "
                                                         "train.amp=off", exit_code=FAILED)
            err.print(f"[yellow]reloading the last good state[/] (reload {self.reloads}/{MAX_RELOADS})")
            self._restore_good_state()
            self.bad_steps = 0

    def _remember_good_state(self) -> None:
        self._good = {"model": copy.deepcopy(self.bare_model.state_dict()),
                      "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                      "ema": copy.deepcopy(self.ema.module.state_dict()) if self.ema else None,
                      "extra": [copy.deepcopy(m.state_dict()) for m in self.trainable_extra()]}

    def _restore_good_state(self) -> None:
        self.bare_model.load_state_dict(self._good["model"])
        self.optimizer.load_state_dict(self._good["optimizer"])
        if self.ema is not None and self._good["ema"] is not None:
            self.ema.module.load_state_dict(self._good["ema"])
        for m, s in zip(self.trainable_extra(), self._good["extra"]):
            m.load_state_dict(s)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop_requested = True
        err.print(f"[yellow]{signal.Signals(signum).name}: stopping after this batch, saving last.pt[/]")

    def _update_best(self, row: dict[str, Any]) -> bool:
        fitness = row.get("mAP50")
        if fitness is None:  # no validation split: the last model is the one reported
            self.best_epoch = self.epoch
            return True
        if fitness > self.best_fitness:
            self.best_fitness, self.best_epoch = float(fitness), self.epoch
            return True
        return False

    def _print_epoch(self, row: dict[str, Any], improved: bool) -> None:
        losses = "  ".join(f"{k[5:]} {v:.4f}" for k, v in row.items() if k.startswith("loss_"))
        metric = f"  mAP50 {row['mAP50']:.4f}  mAP50-95 {row['mAP50-95']:.4f}" if "mAP50" in row else ""
        star = " [green]*best[/]" if improved and "mAP50" in row else ""
        err.print(f"epoch {row['epoch']}/{self.recipe.train.epochs}  {losses}{metric}  ({row['time_s']:.1f}s){star}",
                  highlight=False)

    # ---- validation and checkpoints ----------------------------------------------------------------------------
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.bare_model

    def validate(self) -> dict[str, Any]:
        if not dist.is_main():
            dist.barrier()
            return {"mAP50": 0.0, "mAP50-95": 0.0}
        metrics, samples = evaluate(self.eval_model(), self.val_loader(), self.val_json, self.classes,
                                    self.recipe.model, self.device, self.recipe.train.eval_iou_thresholds,
                                    amp_dtype=self.amp_dtype)
        self.val_samples = samples  # drawn once, at the end of training (callbacks.plot_predictions)
        dist.barrier()
        return metrics

    def checkpoint_extra(self) -> dict[str, Any]:
        """Hook: metadata a subclass adds to both checkpoints (distillation: teacher, method)."""
        return {}

    def train_state_extra(self) -> dict[str, Any]:
        """Hook: training-only state a subclass keeps in last.pt (distillation: adapters)."""
        return {}

    def base_payload(self) -> dict[str, Any]:
        r = self.recipe
        return {
            "kind": "detector", "task": self.task,
            "model": {"config": r.model.model_dump(mode="json"), "classes": self.classes, "imgsz": r.data.imgsz,
                      "anchor_size": r.data.anchor_size},
            "data": {"path": str(self.dataset_dir), "fold": r.data.fold, "train_split": r.data.train_split,
                     "val_split": r.data.val_split, "test_split": r.data.test_split, "letterbox": r.data.letterbox,
                     "channels": r.data.channels, "source": self.meta.get("source")},
            "recipe": dump(r), "weights": self.eval_model().state_dict(), "epoch": self.epoch,
            "metrics": {k: v for k, v in self.last_metrics.items() if k != "per_class"},
            "per_class": self.last_metrics.get("per_class", []), **self.checkpoint_extra(),
        }

    def save(self, epoch_complete: bool = True, best: bool = False) -> None:
        payload = self.base_payload()
        state = {"model": self.bare_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "ema_updates": self.ema.updates if self.ema else 0,
                 "step": self.step, "epoch": self.epoch, "epoch_complete": epoch_complete,
                 "partial_epoch": None if epoch_complete else self.partial_epoch,
                 "best_fitness": self.best_fitness, "best_epoch": self.best_epoch, "history": self.history,
                 "rng": rng_state(), "reloads": self.reloads, "train_seconds": self.train_seconds,
                 **self.train_state_extra()}
        # best.pt before last.pt: a last.pt on disk never names a best epoch whose best.pt is not there yet
        items = [(self.weights_dir / "best.pt", payload)] if best else []
        self.writer.submit([*items, (self.weights_dir / "last.pt", {**payload, "train_state": state})])

    def load_resume(self, ckpt: checkpoint.Checkpoint) -> None:
        path = ckpt.path
        state = ckpt.train_state
        if state is None:
            raise KdcliError(f"{path}: no training state (best.pt cannot resume)", hint="resume from last.pt")
        checkpoint.load_state_strict(self.bare_model, state.model, str(path))
        if self.ema is not None:
            checkpoint.load_state_strict(self.ema.module, ckpt.weights, str(path))
            self.ema.updates = state.ema_updates
        self.optimizer.load_state_dict(state.optimizer)
        self.scaler.load_state_dict(state.scaler)
        self.step, self.epoch = state.step, state.epoch
        self.best_fitness, self.best_epoch = state.best_fitness, state.best_epoch
        self.history, self.reloads = list(state.history), state.reloads
        self.partial_epoch = None if state.epoch_complete else state.partial_epoch
        self.seconds_before = (float(state.train_seconds) if state.train_seconds is not None
                               else sum(r.get("time_s", 0) for r in self.history))
        self.last_metrics = dict(ckpt.metrics)
        set_rng_state(state.rng)
        self.load_train_state_extra(state)
        within = f", batch {self.partial_epoch['batch'] + 1}" if self.partial_epoch else ""
        err.print(f"resuming {path} at epoch {self.epoch + 1}{within} (step {self.step})")

    def load_train_state_extra(self, state: checkpoint.TrainState) -> None:
        """Hook: restore what `train_state_extra` saved."""
