"""The training data pipeline: boxes stay consistent through augmentation, batching and worker processes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdcli.config.schema import AugmentConfig
from kdcli.data.dataset import DetectionDataset, collate
from kdcli.data.transforms import train_transform


def _off(**kw) -> AugmentConfig:
    base = dict(hsv=0, brightness_contrast=0, fliplr=0, flipud=0, rot90=0, zoom=0)
    return AugmentConfig(**{**base, **kw})


def test_eval_letterbox_scales_boxes(vedai25: Path):
    ds = DetectionDataset(vedai25, "test", fold=1, imgsz=192)
    raw = ds.records[0]
    s = ds[0]
    assert s["image"].shape == (3, 192, 192) and s["image"].dtype == torch.uint8
    assert s["scale"] == (2.0, 2.0)
    np.testing.assert_allclose(s["boxes"].numpy(), raw.boxes * 2, atol=1e-3)
    assert s["labels"].tolist() == raw.labels.tolist()


def test_horizontal_flip_mirrors_boxes(vedai25: Path):
    ds = DetectionDataset(vedai25, "train", fold=1, imgsz=96, transform=train_transform(_off(fliplr=1.0), 96))
    i = next(i for i, r in enumerate(ds.records) if len(r.boxes))
    raw, s = ds.records[i], ds[i]
    expected = raw.boxes.copy()
    expected[:, [0, 2]] = 96 - raw.boxes[:, [2, 0]]
    np.testing.assert_allclose(s["boxes"].numpy(), expected, atol=1e-3)
    plain = DetectionDataset(vedai25, "train", fold=1, imgsz=96)[i]["image"]
    assert torch.equal(s["image"], plain.flip(-1))


def test_rot90_keeps_box_sizes(vedai25: Path):
    ds = DetectionDataset(vedai25, "train", fold=1, imgsz=96, transform=train_transform(_off(rot90=1.0), 96))
    i = next(i for i, r in enumerate(ds.records) if len(r.boxes))
    torch.manual_seed(0)
    np.random.seed(0)
    s = ds[i]
    raw = ds.records[i].boxes
    got = s["boxes"].numpy()
    w, h = got[:, 2] - got[:, 0], got[:, 3] - got[:, 1]
    rw, rh = raw[:, 2] - raw[:, 0], raw[:, 3] - raw[:, 1]
    assert sorted(np.round(np.concatenate([w, h]), 2)) == sorted(np.round(np.concatenate([rw, rh]), 2))


def test_full_augmentation_keeps_boxes_inside(vedai25: Path):
    ds = DetectionDataset(vedai25, "train", fold=1, imgsz=128, transform=train_transform(AugmentConfig(), 128))
    for i in range(len(ds)):
        s = ds[i]
        b = s["boxes"]
        assert s["image"].shape == (3, 128, 128)
        assert len(b) == len(s["labels"])
        if len(b):
            assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 128).all() and (b[:, 3] <= 128).all()
            assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()


def test_dataloader_with_workers_and_ram_cache(vedai25: Path):
    ds = DetectionDataset(vedai25, "train", fold=1, imgsz=96, cache="ram",
                          transform=train_transform(AugmentConfig(), 96))
    assert ds.cache is not None and len(ds.cache) == len(ds)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, collate_fn=collate)
    n = 0
    for batch in loader:
        assert batch["images"].shape[1:] == (3, 96, 96)
        assert len(batch["boxes"]) == len(batch["labels"]) == batch["images"].shape[0]
        n += batch["images"].shape[0]
    assert n == len(ds)


def test_infrared_channel(vedai25: Path):
    ds = DetectionDataset(vedai25, "test", fold=1, imgsz=96, channels="ir")
    img = ds[0]["image"]
    assert img.shape == (3, 96, 96) and torch.equal(img[0], img[1])  # 1-channel IR repeated to 3


@pytest.mark.parametrize("split", ["nope"])
def test_unknown_split(vedai25: Path, split: str):
    from kdcli.errors import KdcliError

    with pytest.raises(KdcliError, match="split 'fold01_nope' not found"):
        DetectionDataset(vedai25, split, fold=1)


def test_loader_workers_are_capped_at_the_cores_available_once_said(monkeypatch: pytest.MonkeyPatch, capsys,
                                                                    vedai25: Path):
    """More workers than cores only compete for them, and torch warns on every loader; capped, said once."""
    import os
    import warnings

    from torch.utils.data import DataLoader

    from kdcli.data import dataset

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(dataset, "_capped", set())
    assert dataset.loader_workers(0) == 0 and dataset.loader_workers(1) == 1
    assert dataset.loader_workers(4) == 1 and dataset.loader_workers(4) == 1
    assert capsys.readouterr().err.count("note: 4 data loader workers asked for, 1 CPU core(s) available") == 1
    ds = DetectionDataset(vedai25, "test", fold=1, imgsz=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "This DataLoader will create 4 worker processes" warning
        next(iter(DataLoader(ds, batch_size=2, num_workers=dataset.loader_workers(4), collate_fn=collate)))
