"""The dataset dir's split files: a missing split says how to fix the fold setting that most often causes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdcli.data import coco
from kdcli.errors import KdcliError


def _dataset(root: Path, names: list[str]) -> Path:
    (root / coco.ANNOTATIONS).mkdir(parents=True)
    for n in names:
        coco.CocoBuilder(["car"], n).write(root, n)
    return root


@pytest.mark.parametrize("names,split,fold,message,hint", [
    (["train", "val"], "train", 1, "split 'fold01_train' not found", "this dataset has no folds: set data.fold=null"),
    (["fold01_train", "fold02_train", "fold01_val"], "train", None, "split 'train' not found",
     "this dataset has folds 1, 2: set data.fold to one of them"),
    (["fold01_train", "fold02_train"], "train", 3, "split 'fold03_train' not found",
     "this dataset has folds 1, 2: set data.fold to one of them"),
    (["train"], "test", None, "split 'test' not found", "available splits: train"),
    ([], "train", None, "split 'train' not found", "run `kdcli prepare` first"),
])
def test_a_missing_split_hints_at_the_fold_setting(tmp_path: Path, names: list[str], split: str, fold: int | None,
                                                   message: str, hint: str):
    root = _dataset(tmp_path / "ds", names)
    with pytest.raises(KdcliError, match=message) as e:
        coco.read_split(root, split, fold)
    assert e.value.hint == hint
    if names:
        assert coco.read_split(root, names[0].split("_")[-1], 1 if "fold" in names[0] else None)["images"] == []
