"""YOLO source: both layouts, the box conversion, every kind of bad line counted with file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from kdcli.cli.app import app
from kdcli.data.sources import yolo
from kdcli.data.sources.common import NON_FINITE
from kdcli.errors import KdcliError
from tests.conftest import train_steps_args


def _image(path: Path, w: int = 200, h: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (90, 90, 90)).save(path)


def _boxes(out: Path, split: str) -> dict[str, list[list[float]]]:
    data = json.loads((out / "annotations" / f"{split}.json").read_text())
    files = {im["id"]: im["yolo_file"] for im in data["images"]}
    found: dict[str, list[list[float]]] = {Path(f).name: [] for f in files.values()}
    for a in data["annotations"]:
        found[Path(files[a["image_id"]]).name].append([a["category_id"], *a["bbox"]])
    return found


def test_plain_folder_with_names_file_boxes_by_hand(tmp_path: Path):
    src = tmp_path / "flat"
    _image(src / "a.png")  # 200 x 100
    (src / "a.txt").write_text("1 0.5 0.5 0.2 0.4\n"  # cx 100, cy 50, w 40, h 40 -> x0 80 y0 30
                               "0 0.1 0.1 0.3 0.2 0.2 0.4 0.05 0.3\n")  # 4 points -> x 0.05..0.3, y 0.1..0.4
    _image(src / "b.png")
    (tmp_path / "names.txt").write_text("car\ntruck\n")
    meta = yolo.prepare(src, tmp_path / "out", names=tmp_path / "names.txt", val_fraction=0.5)
    assert meta["classes"] == ["car", "truck"] and meta["splits"]["train"]["images"] == 1
    assert meta["splits"]["val"]["images"] == 1  # carved: the folder has no val split
    boxes = {**_boxes(tmp_path / "out", "train"), **_boxes(tmp_path / "out", "val")}
    assert sorted(boxes["a.png"]) == sorted([[2, 80.0, 30.0, 40.0, 40.0], [1, 10.0, 10.0, 50.0, 30.0]])
    assert boxes["b.png"] == [] and "image without a label file (no objects)" in meta["dropped"]


def test_synthetic_yolo_end_to_end_counts_the_known_dirt(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KDCLI_DATASETS", str(tmp_path / "datasets"))
    runner = CliRunner()
    r = runner.invoke(app, ["prepare", "synthetic", "--kind", "yolo", "--images", "10"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["prepare", "yolo", "--src", str(tmp_path / "datasets" / "raw" / "synthetic-yolo")])
    assert r.exit_code == 0, r.output
    out = tmp_path / "datasets" / "synthetic-yolo"
    meta = json.loads(json.dumps(__import__("yaml").safe_load((out / "dataset.yaml").read_text())))
    dropped = {k: v["count"] for k, v in meta["dropped"].items()}
    assert dropped == {"image without a label file (no objects)": 1, "label file without an image (not used)": 1,
                       "label line with 4 fields (want 5, or a class and 3+ points) (dropped)": 1,
                       "label value outside [0, 1] (dropped)": 1,
                       "label of an unknown class (not 0..2) (dropped)": 1}
    assert meta["dropped"]["label value outside [0, 1] (dropped)"]["example"].endswith("scene_00002.txt:5")
    assert meta["classes"] == ["car", "truck", "bus"] and meta["splits"]["val"]["images"] == 2  # its own val
    assert runner.invoke(app, ["data", "check", str(out)]).exit_code == 0
    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    r = runner.invoke(app, train_steps_args(out))
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["epochs"] == 1


def test_data_yaml_names_list_txt_lists_and_class_subset(tmp_path: Path):
    root = tmp_path / "ds"
    for i in range(4):
        _image(root / "images" / f"{i}.jpg")
        (root / "labels").mkdir(parents=True, exist_ok=True)
        (root / "labels" / f"{i}.txt").write_text("0 0.5 0.5 0.1 0.1\n1 0.2 0.2 0.1 0.1\n")
    (root / "train.txt").write_text("./images/0.jpg\n./images/1.jpg\n./images/2.jpg\n")
    (root / "data.yaml").write_text(f"path: {root}\ntrain: train.txt\nval: [images/3.jpg]\nnames: [car, van]\n"
                                    .replace("[images/3.jpg]", "val.txt"))
    (root / "val.txt").write_text("images/3.jpg\n")
    meta = yolo.prepare(root / "data.yaml", tmp_path / "out", classes="van")
    assert meta["classes"] == ["van"] and meta["splits"]["train"] == {"images": 3, "objects": 3}
    assert meta["dropped"]["box of a class outside --classes (dropped)"]["count"] == 4
    with pytest.raises(KdcliError, match=r"--classes: \['bike'\] not among"):
        yolo.prepare(root, tmp_path / "o2", classes="bike")


@pytest.mark.parametrize("yaml_text,fragment", [
    ("train: images\nnames: {0: a, 2: b}\n", "'names' ids must be 0..1"),
    ("train: images\nnames: []\n", "'names' must be a non-empty list"),
    ("names: [a]\n", "no 'train' entry"),
    ("train: nowhere\nnames: [a]\n", "nowhere not found"),
    ("- a\n", "expected a mapping"),
])
def test_bad_data_yaml_is_named(tmp_path: Path, yaml_text: str, fragment: str):
    (tmp_path / "images").mkdir()
    (tmp_path / "data.yaml").write_text(yaml_text)
    with pytest.raises(KdcliError, match=fragment) as e:
        yolo.prepare(tmp_path, tmp_path / "out")
    assert "data.yaml" in e.value.message and not (tmp_path / "out").exists()


def test_plain_folder_without_names_says_what_to_give(tmp_path: Path):
    _image(tmp_path / "a.png")
    with pytest.raises(KdcliError, match="no data.yaml") as e:
        yolo.prepare(tmp_path, tmp_path / "out")
    assert "--names" in e.value.hint


def _yolo_root(root: Path, yaml_text: str, labels: dict[str, str]) -> Path:
    """A data.yaml folder; `labels` maps an image path (relative) to its label text (None: no label file)."""
    for rel, text in labels.items():
        _image(root / rel, 40, 20)
        if text is not None:
            lab = yolo.label_path(root / rel)
            lab.parent.mkdir(parents=True, exist_ok=True)
            lab.write_text(text)
    (root / "data.yaml").write_text(yaml_text)
    return root


def test_nan_and_inf_go_through_the_shared_finite_check(tmp_path: Path):
    root = _yolo_root(tmp_path / "ds", "train: images\nnames: [car, van]\n", {
        "images/a.png": "0 nan 0.5 0.2 0.2\n1 0.5 inf 0.2 0.2\nnan 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.5 0.5\n"})
    meta = yolo.prepare(root, tmp_path / "out", val_fraction=0)
    assert meta["dropped"][NON_FINITE] == {"count": 2, "example": f"{root / 'labels' / 'a.txt'}:1"}
    assert meta["dropped"]["label of an unknown class (not 0..1) (dropped)"]["count"] == 1  # class nan: no crash
    assert _boxes(tmp_path / "out", "train") == {"a.png": [[1, 10.0, 5.0, 20.0, 10.0]]}
    assert "NaN" not in (tmp_path / "out" / "annotations" / "train.json").read_text()


def test_symlinked_image_folders_are_followed_and_a_link_loop_ends(tmp_path: Path):
    root = _yolo_root(tmp_path / "ds", "train: images/train\nnames: [car]\n",
                      {"images/train/a.png": "0 0.5 0.5 0.5 0.5\n"})
    _yolo_root(tmp_path / "elsewhere", "", {f"images/{i}.png": "0 0.5 0.5 0.5 0.5\n" for i in range(3)})
    (root / "images" / "train" / "linked").symlink_to(tmp_path / "elsewhere" / "images")
    (root / "labels" / "train" / "linked").symlink_to(tmp_path / "elsewhere" / "labels")
    (root / "images" / "train" / "loop").symlink_to(".")  # a link to its own folder: visited once
    meta = yolo.prepare(root, tmp_path / "out", val_fraction=0)
    assert meta["splits"]["train"] == {"images": 4, "objects": 4} and meta["dropped"] == {}


def test_image_lists_among_labels_are_lists_not_orphan_labels(tmp_path: Path):
    src = tmp_path / "flat"
    for name in ("a", "b"):
        _image(src / f"{name}.png")
        (src / f"{name}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    for name in ("train", "val", "full1"):
        (src / f"{name}.txt").write_text("./a.png\n./b.png\n")
    (tmp_path / "names.txt").write_text("\ufeffcar\n")  # a BOM is not part of the first name
    meta = yolo.prepare(src, tmp_path / "out", names=tmp_path / "names.txt", val_fraction=0)
    lists = "image list among the label files (a .txt of image paths, not labels; not used)"
    assert meta["dropped"] == {lists: {"count": 3, "example": str(src / "full1.txt")}}
    assert meta["classes"] == ["car"] and meta["splits"]["train"] == {"images": 2, "objects": 2}


def test_lists_named_by_data_yaml_any_case_are_used_not_counted(tmp_path: Path):
    labels = {f"data/{n}.jpg": "\ufeff0 0.5 0.5 0.2 0.2\n0 0.2 0.2 0.1 0.1\n" for n in "abc"}  # BOM: both lines
    root = _yolo_root(tmp_path / "ds", "path: data\ntrain: train.TXT\nval: val.txt\nnames: [car]\n", labels)
    (root / "data" / "train.TXT").write_text("./a.jpg\n./b.jpg\n")
    (root / "data" / "val.txt").write_text("./c.jpg\n")
    meta = yolo.prepare(root, tmp_path / "out")
    assert meta["splits"]["train"] == {"images": 2, "objects": 4} and meta["splits"]["val"]["objects"] == 2
    assert meta["dropped"] == {}


def test_roboflow_parent_paths_resolve_as_ultralytics_does(tmp_path: Path):
    root = _yolo_root(tmp_path / "export", "train: ../train/images\nval: ../valid/images\nnc: 1\nnames: ['car']\n",
                      {"train/images/a.jpg": "0 0.5 0.5 0.2 0.2\n", "valid/images/b.jpg": "0 0.5 0.5 0.2 0.2\n"})
    meta = yolo.prepare(root, tmp_path / "out")
    assert meta["splits"]["train"]["objects"] == 1 and meta["splits"]["val"]["objects"] == 1


def test_a_skipped_bad_image_counts_its_boxes(tmp_path: Path):
    root = _yolo_root(tmp_path / "ds", "train: images\nnames: [car]\n",
                      {"images/a.png": "0 0.5 0.5 0.2 0.2\n", "images/b.png": "0 0.5 0.5 0.2 0.2\n0 0.1 0.1 0.1 0.1\n"})
    (root / "images" / "b.png").write_bytes((root / "images" / "b.png").read_bytes()[:60])
    meta = yolo.prepare(root, tmp_path / "out", val_fraction=0, skip_bad_images=True)
    lost = meta["dropped"]["boxes of skipped images (dropped)"]
    assert lost == {"count": 2, "example": f"{root / 'images' / 'b.png'}: 2"}
    assert "label file without an image (not used)" not in meta["dropped"]  # its label is accounted for
    assert meta["splits"]["train"] == {"images": 1, "objects": 1}


@pytest.mark.parametrize("layout", ["plain", "data.yaml"])
def test_a_rerun_with_force_leaves_its_own_output_inside_src_out(tmp_path: Path, layout: str):
    """`--out` inside `--src`: a rerun with --force must not read the previous output's images back as input."""
    src = tmp_path / "flat"
    for name in ("a", "b"):
        _image(src / f"{name}.png")
        (src / f"{name}.txt").write_text("0 0.5 0.5 0.2 0.4\n")
    if layout == "plain":
        (tmp_path / "names.txt").write_text("car\n")
        extra = ["--names", str(tmp_path / "names.txt")]
    else:
        (src / "data.yaml").write_text("train: .\nnames: [car]\n")
        extra = []
    out = src / "ds"
    for force in ([], ["--force"], ["--force", "--copy"]):
        r = CliRunner().invoke(app, ["prepare", "yolo", "--src", str(src), "--out", str(out), "--val-fraction", "0",
                                     *extra, *force], terminal_width=400)
        assert r.exit_code == 0, r.output
        meta = yaml.safe_load((out / "dataset.yaml").read_text())
        assert meta["images"] == 2 and sum(s["images"] for s in meta["splits"].values()) == 2
    assert f"note: {out} left out of the inputs: it is this command's output (--out)" in " ".join(r.output.split())
    assert meta["left_out"] == [f"{out} (this command's output)"]
