"""The TensorBoard callback: what it writes, through a recording writer (the test needs no tensorboard install)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kdcli.engine.callbacks import default_callbacks, tensorboard_logger
from kdcli.engine.trainer import Trainer
from tests.conftest import tiny_recipe


class RecordingWriter:
    made: list[RecordingWriter] = []

    def __init__(self, logdir: str):
        self.logdir, self.scalars, self.images, self.closed = logdir, {}, [], False
        RecordingWriter.made.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.setdefault(tag, []).append((step, value))

    def add_image(self, tag: str, image: Any, step: int, dataformats: str = "CHW") -> None:
        self.images.append((tag, step, np.asarray(image).shape, dataformats))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_every_loss_term_lr_map_and_the_val_image_reach_tensorboard(vedai25: Path, tmp_path: Path):
    RecordingWriter.made.clear()
    callbacks = default_callbacks()
    callbacks.extend(tensorboard_logger(RecordingWriter))
    run = tmp_path / "run"
    Trainer(tiny_recipe(vedai25, train={"epochs": 2, "max_batches": 2, "plots": True}), run_dir=run,
            callbacks=callbacks).fit()
    (w,) = RecordingWriter.made
    assert w.logdir == str(run / "tensorboard") and w.closed
    assert {"loss/cls", "loss/box", "loss/total", "lr", "metrics/mAP50", "metrics/mAP50-95"} <= set(w.scalars)
    assert [step for step, _ in w.scalars["loss/total"]] == [1, 2]
    csv = (run / "results.csv").read_text().splitlines()
    header, last = csv[0].split(","), csv[-1].split(",")
    assert w.scalars["metrics/mAP50"][-1][1] == float(last[header.index("mAP50")])  # the same figure as results.csv
    assert [(tag, step) for tag, step, _, _ in w.images] == [("val/predictions", 1), ("val/predictions", 2)]
    assert all(len(shape) == 3 and shape[2] == 3 and fmt == "HWC" for _, _, shape, fmt in w.images)
