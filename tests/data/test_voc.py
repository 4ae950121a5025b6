"""Pascal VOC: XML quirks (float coordinates, missing difficult, part boxes) and `prepare voc` end to end."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kdcli.data.sources import voc
from kdcli.data.sources.common import NON_FINITE
from kdcli.errors import KdcliError


def test_parse_xml_quirks(tmp_path: Path):
    f = tmp_path / "a.xml"
    f.write_text("<annotation><size><width>100</width><height>80</height><depth>3</depth></size>"
                 "<object><name>car</name><bndbox><xmin>10.0</xmin><ymin>5</ymin><xmax>20.5</xmax><ymax>15</ymax>"
                 "</bndbox></object>"
                 "<object><name>person</name><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
                 "<xmax>30</xmax><ymax>60</ymax></bndbox><part><name>head</name><bndbox><xmin>2</xmin>"
                 "<ymin>2</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></part></object></annotation>")
    w, h, objs = voc.parse_xml(f)
    assert (w, h) == (100, 80) and len(objs) == 2  # the <part> box is not an object
    assert objs[0] == {"name": "car", "box": [10.0, 5.0, 20.5, 15.0], "difficult": 0, "truncated": 0}
    assert objs[1]["difficult"] == 1 and objs[1]["box"] == [1, 1, 30, 60]


def test_parse_xml_errors(tmp_path: Path):
    f = tmp_path / "b.xml"
    f.write_text("<annotation><size><width>100</width><height>80</height></size><object><name>car</name>"
                 "<bndbox><xmin>a</xmin><ymin>5</ymin><xmax>20</xmax><ymax>15</ymax></bndbox></object></annotation>")
    with pytest.raises(KdcliError, match=r"b\.xml: object 1 \(car\): <xmin> is not a number"):
        voc.parse_xml(f)
    f.write_text("<annotation><size>")
    with pytest.raises(KdcliError, match=r"b\.xml:1: invalid XML"):
        voc.parse_xml(f)


def test_prepare_voc_end_to_end(tmp_path: Path, voc_raw: Path):
    out = tmp_path / "voc"
    meta = voc.prepare(voc_raw, out, val_fraction=0.2, seed=0)
    ids = {s: (voc_raw / y / "ImageSets" / "Main" / f"{s2}.txt").read_text().split()
           for s, y, s2 in (("07tv", "VOC2007", "trainval"), ("07t", "VOC2007", "test"),
                            ("12tv", "VOC2012", "trainval"))}
    n_train = len(ids["07tv"]) + len(ids["12tv"])
    assert meta["splits"]["train"]["images"] + meta["splits"]["val"]["images"] == n_train
    assert meta["splits"]["val"]["images"] == round(0.2 * n_train)
    assert meta["splits"]["test"]["images"] == len(ids["07t"])
    test = json.loads((out / "annotations" / "test.json").read_text())
    n_objects = 0
    n_difficult = 0
    for vid in ids["07t"]:
        root = ET.parse(voc_raw / "VOC2007" / "Annotations" / f"{vid}.xml").getroot()
        n_objects += len(root.findall("object"))
        n_difficult += sum(1 for o in root.findall("object") if o.findtext("difficult") == "1")
    assert len(test["annotations"]) == n_objects
    assert sum(1 for a in test["annotations"] if a.get("difficult") == 1) == n_difficult
    # 1-based inclusive -> 0-based: the first object of the first test image
    first = test["images"][0]
    root = ET.parse(voc_raw / "VOC2007" / "Annotations" / f"{first['voc_id'].split('/')[1]}.xml").getroot()
    bb = root.find("object").find("bndbox")
    xmin, ymin, xmax, ymax = (float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
    a = next(a for a in test["annotations"] if a["image_id"] == first["id"])
    assert a["bbox"] == pytest.approx([xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1])
    assert meta["classes"][a["category_id"] - 1] == root.find("object").findtext("name")
    assert (out / first["file_name"]).is_file()


def test_prepare_voc_selected_sets_and_errors(tmp_path: Path, voc_raw: Path):
    meta = voc.prepare(voc_raw, tmp_path / "v07", train_sets=["2007/trainval"], test_sets=["2007/test"],
                       val_fraction=0)
    assert meta["splits"]["val"]["images"] == 0
    with pytest.raises(KdcliError, match="VOC2011.*missing"):
        voc.prepare(voc_raw, tmp_path / "x", train_sets=["2011/trainval"])
    with pytest.raises(KdcliError, match="bad image set"):
        voc.prepare(voc_raw, tmp_path / "x", train_sets=["2007"])
    with pytest.raises(KdcliError, match="Pascal VOC not found"):
        voc.prepare(tmp_path / "nothing", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_nan_and_inf_coordinates_are_dropped_and_counted(tmp_path: Path, voc_raw: Path):
    import shutil

    raw = tmp_path / "VOCdevkit"
    shutil.copytree(voc_raw, raw)
    ids = (raw / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    xmls = [raw / "VOC2007" / "Annotations" / f"{i}.xml" for i in ids]
    xml = next(x for x in xmls if len(ET.parse(x).getroot().findall("object")) >= 2)
    tree = ET.parse(xml)
    first, second = tree.getroot().findall("object")[:2]
    first.find("bndbox").find("xmin").text = "nan"
    second.find("bndbox").find("ymax").text = "inf"
    tree.write(xml)
    meta = voc.prepare(raw, tmp_path / "out", train_sets=["2007/trainval"], val_fraction=0)
    assert meta["dropped"][NON_FINITE] == {"count": 2, "example": str(xml)}
    text = (tmp_path / "out" / "annotations" / "train.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    size = tree.getroot().find("size")
    size.find("width").text = "nan"
    tree.write(xml)
    with pytest.raises(KdcliError, match="size: <width> and <height> must be finite numbers, got nan x"):
        voc.parse_xml(xml)
