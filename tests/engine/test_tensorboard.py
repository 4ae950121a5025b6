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


def test_a_broken_tensorboard_install_warns_once_and_training_goes_on(tmp_path: Path, monkeypatch, capsys):
    import sys
    from types import SimpleNamespace

    from kdcli.engine import callbacks

    fake = tmp_path / "site" / "tensorboard"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('protobuf 5 is too new\\nsecond line of advice')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    callbacks._warn_broken_tensorboard.cache_clear()
    assert tensorboard_logger() is None and tensorboard_logger() is None  # no logger, no exception
    text = " ".join(capsys.readouterr().err.split())
    assert text.count("warning: TensorBoard is installed but does not work") == 1, text  # once, not per run
    assert "ImportError: protobuf 5 is too new" in text and "second line" not in text

    def failing_writer(logdir: str) -> Any:
        raise RuntimeError("cannot create event file")

    cb = tensorboard_logger(failing_writer)
    trainer = SimpleNamespace(run_dir=tmp_path, history=[{"epoch": 1, "loss_total": 1.0}], val_samples=None)
    for _ in range(2):
        cb.run("on_epoch_end", trainer)
    cb.run("on_train_end", trainer)
    text = " ".join(capsys.readouterr().err.split())
    assert text.count("RuntimeError: cannot create event file") == 1, text


def test_tensorboard_not_installed_is_silent(monkeypatch, capsys):
    import importlib.util

    from kdcli.engine import callbacks

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    callbacks._warn_broken_tensorboard.cache_clear()
    assert tensorboard_logger() is None and capsys.readouterr().err == ""
