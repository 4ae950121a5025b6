"""Callbacks: event name -> list of functions taking the trainer. Loggers, plots and checkpoints are callbacks,
so a user (or a distillation trainer) adds behaviour without touching the loop.

Events: on_train_start, on_epoch_start, on_batch_end, on_epoch_end (after validation and saving),
on_train_end (after the last epoch, or after an interruption).
"""

from __future__ import annotations

import csv
import functools
import importlib.util
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from kdcli import atomic
from kdcli.console import err

if TYPE_CHECKING:
    from kdcli.engine.trainer import Trainer

EVENTS = ("on_train_start", "on_epoch_start", "on_batch_end", "on_epoch_end", "on_train_end")


class Callbacks:
    def __init__(self) -> None:
        self.handlers: dict[str, list[Callable[[Trainer], None]]] = defaultdict(list)

    def add(self, event: str, fn: Callable[[Trainer], None]) -> None:
        if event not in EVENTS:
            raise ValueError(f"unknown callback event {event!r}; events: {', '.join(EVENTS)}")
        self.handlers[event].append(fn)

    def extend(self, other: Callbacks) -> None:
        for event, fns in other.handlers.items():
            for fn in fns:
                self.add(event, fn)

    def run(self, event: str, trainer: Trainer) -> None:
        for fn in self.handlers.get(event, []):
            fn(trainer)


def write_results_csv(trainer: Trainer) -> None:
    """results.csv: one row per epoch, every loss term, lr, metrics and time (rewritten whole, atomically)."""
    rows: list[dict[str, Any]] = trainer.history
    if not rows:
        return
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    path = trainer.run_dir / "results.csv"
    with atomic.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def write_progress(trainer: Trainer) -> None:
    """progress.json: where a run stands and its training speed (what `kdcli study` shows for running cells)."""
    row = trainer.history[-1]
    seconds = row.get("train_s") or row.get("time_s") or 0
    images = trainer.images_per_epoch()
    atomic.write_json(trainer.run_dir / "progress.json", {
        "epoch": row["epoch"], "epochs": trainer.recipe.train.epochs,
        "images_per_s": round(images / seconds, 2) if seconds else 0.0})


def plot_curves(trainer: Trainer) -> None:
    if trainer.recipe.train.plots and (trainer.run_dir / "results.csv").is_file():
        from kdcli.engine.plots import plot_results

        plot_results(trainer.run_dir / "results.csv", trainer.run_dir / "results.png")


def plot_predictions(trainer: Trainer) -> None:
    """val_predictions.png: the last validation's first images, predictions over ground truth."""
    if trainer.recipe.train.plots and trainer.val_samples:
        from kdcli.engine.plots import prediction_grid

        prediction_grid(trainer.val_samples, trainer.classes, trainer.run_dir / "val_predictions.png")


def _tensorboard_tag(key: str) -> str:
    """Group the scalars in TensorBoard's sidebar: loss/<term>, metrics/<name>, time/<name>, lr."""
    if key.startswith("loss_"):
        return f"loss/{key[5:]}"
    if key.endswith("_s"):
        return f"time/{key}"
    return key if key == "lr" else f"metrics/{key}"


@functools.cache
def _warn_broken_tensorboard(error: str) -> None:
    """Once per process and error: the install is there, so its user expects logs that will not come."""
    err.print(f"[yellow]warning:[/] TensorBoard is installed but does not work ({escape(error)}): training goes on "
              "without TensorBoard logs (reinstall it: pip install 'kdcli\\[tensorboard]')", highlight=False,
              soft_wrap=True)


def _error_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def tensorboard_logger(writer_factory: Callable[[str], Any] | None = None) -> Callbacks | None:
    """TensorBoard logging into <run dir>/tensorboard when tensorboard is installed (`kdcli[tensorboard]`): every
    loss term, lr, the validation metrics and times per epoch, and the val prediction image at each validation.
    A study's cells each have a run dir, so `tensorboard --logdir runs/study/<name>` compares the cells.
    Not installed: no logs, silently (it is optional). Installed but broken (its import or its writer fails):
    training goes on without it, with one warning naming the error."""
    if writer_factory is None:
        if importlib.util.find_spec("tensorboard") is None:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as e:  # noqa: BLE001 - a broken install fails in many ways (protobuf, numpy, ...)
            _warn_broken_tensorboard(_error_line(e))
            return None
        writer_factory = SummaryWriter
    writers: dict[str, Any] = {}

    def log(trainer: Trainer) -> None:
        import numpy as np

        from kdcli.engine.plots import prediction_image

        if "w" not in writers:
            try:
                writers["w"] = writer_factory(str(trainer.run_dir / "tensorboard"))
            except Exception as e:  # noqa: BLE001 - as for the import: a broken install must not stop training
                _warn_broken_tensorboard(_error_line(e))
                writers["w"] = None
        w, row = writers["w"], trainer.history[-1]
        if w is None:
            return
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch":
                w.add_scalar(_tensorboard_tag(k), v, row["epoch"])
        if "mAP50" in row and trainer.val_samples and trainer.recipe.train.plots:
            image = prediction_image(trainer.val_samples, trainer.classes)
            if image is not None:
                w.add_image("val/predictions", np.asarray(image), row["epoch"], dataformats="HWC")
        w.flush()

    def close(trainer: Trainer) -> None:
        if writers.get("w") is not None:
            writers.pop("w").close()

    cb = Callbacks()
    cb.add("on_epoch_end", log)
    cb.add("on_train_end", close)
    return cb


def default_callbacks() -> Callbacks:
    cb = Callbacks()
    cb.add("on_epoch_end", write_results_csv)
    cb.add("on_epoch_end", write_progress)
    # pictures once, at the end (also after an interruption): drawing them every epoch cost seconds each time
    cb.add("on_train_end", plot_curves)
    cb.add("on_train_end", plot_predictions)
    tb = tensorboard_logger()
    if tb is not None:
        cb.extend(tb)
    return cb
