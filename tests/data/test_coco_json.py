"""`prepare coco`: a user's COCO JSON becomes a dataset dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from kdcli.data.sources import coco_json
from kdcli.data.sources.common import NON_FINITE
from kdcli.errors import KdcliError


def _user_dataset(tmp_path: Path, n: int = 10) -> tuple[Path, Path]:
    images = tmp_path / "imgs"
    images.mkdir()
    data = {"images": [], "annotations": [], "categories": [{"id": 7, "name": "ship"}, {"id": 3, "name": "car"}]}
    for i in range(n):
        Image.new("RGB", (64, 48), (i * 10, 0, 0)).save(images / f"im{i}.jpg")
        data["images"].append({"id": 100 + i, "file_name": f"im{i}.jpg", "width": 64, "height": 48})
        data["annotations"].append({"id": i + 1, "image_id": 100 + i, "category_id": 7 if i % 2 else 3,
                                    "bbox": [10, 10, 20, 15], "area": 300, "iscrowd": 0})
    data["annotations"].append({"id": 99, "image_id": 100, "category_id": 3, "bbox": [50, 40, 30, 30], "iscrowd": 0})
    data["annotations"].append({"id": 98, "image_id": 101, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 1})
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps(data))
    return ann, images


def test_prepare_coco_renumbers_and_carves_val(tmp_path: Path):
    ann, images = _user_dataset(tmp_path)
    meta = coco_json.prepare(ann, images, tmp_path / "out", val_fraction=0.2, seed=0)
    assert meta["classes"] == ["ship", "car"]
    assert meta["splits"]["train"]["images"] == 8 and meta["splits"]["val"]["images"] == 2
    assert meta["dropped"]["crowd box (dropped)"]["count"] == 1
    assert meta["dropped"]["box clipped to the image"]["count"] == 1
    both = [json.loads((tmp_path / "out" / "annotations" / f"{s}.json").read_text()) for s in ("train", "val")]
    anns = [a for d in both for a in d["annotations"]]
    assert len(anns) == 11
    assert {a["category_id"] for a in anns} == {1, 2}
    clipped = next(a for a in anns if a["bbox"][0] == 50)
    assert clipped["bbox"] == [50, 40, 14, 8]


def test_prepare_coco_errors(tmp_path: Path):
    ann, images = _user_dataset(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [], "annotations": []}')
    with pytest.raises(KdcliError, match="no 'categories' list"):
        coco_json.prepare(bad, images, tmp_path / "o")
    bad.write_text('{"images": [\n,]}')
    with pytest.raises(KdcliError, match=r"bad\.json:2: invalid JSON"):
        coco_json.prepare(bad, images, tmp_path / "o")
    with pytest.raises(KdcliError, match="image folder not found"):
        coco_json.prepare(ann, tmp_path / "nope", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_nothing_is_lost_without_being_counted(tmp_path: Path):
    ann, images = _user_dataset(tmp_path, n=4)
    data = json.loads(ann.read_text())
    data["annotations"] += [
        {"id": 200, "image_id": 100, "category_id": 3, "bbox": [1, 2, float("nan"), 4]},  # NaN: dropped, counted
        {"id": 201, "image_id": 555, "category_id": 3, "bbox": [1, 2, 3, 4]},  # no such image
        {"id": 202, "image_id": "101", "category_id": 3, "bbox": [1, 2, 3, 4]},  # a string id: another type
    ]
    ann.write_text(json.dumps(data))  # json writes NaN, as Python's and many tools' JSON writers do
    meta = coco_json.prepare(ann, images, tmp_path / "out", val_fraction=0.25, seed=0)
    dropped = meta["dropped"]
    assert dropped[NON_FINITE] == {"count": 1, "example": "train.json: annotations[6]"}  # the check all sources share
    plain = "annotation of an image id not in images (dropped)"
    typed = plain + " (an id of another type matches: ids must have the same JSON type)"
    assert dropped[plain]["count"] == 1 and "555" in dropped[plain]["example"]
    assert dropped[typed]["count"] == 1 and '"101"' in dropped[typed]["example"]
    kept = sum(s["objects"] for s in meta["splits"].values())
    assert kept == 4 + 2 - 1  # the 4 boxes, the extra one on image 100 and the crowd box dropped as before


def test_a_skipped_bad_image_counts_its_boxes(tmp_path: Path):
    ann, images = _user_dataset(tmp_path, n=4)
    (images / "im0.jpg").write_bytes(b"not a jpeg")  # image 100: its own box and the extra one
    meta = coco_json.prepare(ann, images, tmp_path / "out", val_fraction=0, skip_bad_images=True)
    assert meta["dropped"]["boxes of skipped images (dropped)"] == {"count": 2, "example": f"{images / 'im0.jpg'}: 2"}
    assert meta["splits"]["train"] == {"images": 3, "objects": 3}  # one each; the crowd box on 101 dropped
