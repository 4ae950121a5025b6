"""Session fixtures: small synthetic raw datasets in the real raw formats, generated once and shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def train_steps_args(dataset: Path) -> list[str]:
    """`kdcli train` arguments for two small training steps on a prepared dataset dir of any source (no fold)."""
    return ["train", "recipes/train/synthetic_student.yaml", f"data.path={dataset}", "data.fold=null", "imgsz=64",
            "model.channels=16", "train.epochs=1", "train.max_batches=2", "data.workers=0", "train.batch=2", "--json"]


def _synthetic_raw(factory: pytest.TempPathFactory, kind: str, images: int, size: int) -> Path:
    from kdcli.data.synthetic import generate

    out = factory.mktemp("raw") / f"synthetic-{kind}"
    generate(kind, out, seed=0, images=images, size=size)
    return out


@pytest.fixture(scope="session")
def vedai_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _synthetic_raw(tmp_path_factory, "vedai", images=40, size=96)


@pytest.fixture(scope="session")
def xview_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _synthetic_raw(tmp_path_factory, "xview", images=4, size=420)


@pytest.fixture(scope="session")
def voc_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _synthetic_raw(tmp_path_factory, "voc", images=18, size=128)


@pytest.fixture(scope="session")
def vedai25(tmp_path_factory: pytest.TempPathFactory, vedai_raw: Path) -> Path:
    from kdcli.data.sources import vedai

    out = tmp_path_factory.mktemp("datasets") / "vedai25"
    vedai.prepare(vedai_raw, out, res=25)
    return out


@pytest.fixture
def datasets_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty KDCLI_DATASETS for a test, with the working dir inside it."""
    root = tmp_path / "datasets"
    root.mkdir()
    monkeypatch.setenv("KDCLI_DATASETS", str(root))
    monkeypatch.chdir(tmp_path)
    return root


def tiny_recipe(dataset: Path, **sections):
    """The smallest training recipe that exercises every code path (CPU, seconds)."""
    from kdcli.config.schema import Recipe

    base = {
        "data": {"path": str(dataset), "fold": 1, "imgsz": 96, "anchor_size": 16, "workers": 0},
        "model": {"channels": 16},
        "train": {"epochs": 2, "batch": 4, "max_batches": 2, "warmup_iters": 2, "ema_tau": 5, "device": "cpu",
                  "plots": False},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return Recipe.model_validate(base)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, vedai25: Path) -> Path:
    """A tiny trained detector checkpoint (best.pt), made once per session."""
    from kdcli.engine.trainer import Trainer

    run = tmp_path_factory.mktemp("runs") / "tiny"
    Trainer(tiny_recipe(vedai25, train={"plots": True}), run_dir=run).fit()
    return run / "weights" / "best.pt"


@pytest.fixture(scope="session")
def overfit_run(tmp_path_factory: pytest.TempPathFactory, vedai_raw: Path) -> tuple[Path, dict]:
    """(run dir, summary) of a small model overfit on the 4 fold-1 test images of `vedai_raw`, one class."""
    from kdcli.data.sources import vedai
    from kdcli.engine.trainer import Trainer

    tmp = tmp_path_factory.mktemp("overfit")
    data = tmp / "one_class"
    vedai.prepare(vedai_raw, data, classes="vehicle", folds=[1], val_fraction=0)
    no_aug = {"hsv": 0, "brightness_contrast": 0, "fliplr": 0, "flipud": 0, "rot90": 0, "zoom": 0}
    recipe = tiny_recipe(data, data={"train_split": "test", "val_split": "test"}, augment=no_aug,
                         model={"channels": 32},
                         train={"epochs": 70, "batch": 4, "max_batches": 1, "optimizer": "adamw", "lr": 0.003,
                                "weight_decay": 1e-4, "warmup_iters": 10, "ema_decay": 0.9, "val_every": 70})
    summary = Trainer(recipe, run_dir=tmp / "run").fit()
    return tmp / "run", summary
