"""Bad input to the dataset sources, table-driven with the harness of test_bad_input: exit code 2, one `error:` line
holding the stated fragment, no traceback, and the folder left as it was. Plus two runs writing one --out."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kdcli.atomic import atomic_dir
from kdcli.cli.app import app
from tests.cli.test_bad_input import Case, _write, run_case, runner

EMPTY_SPLIT = json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "car"}]})


def yolo_case(id: str, yaml_text: str, fragment: str, images: tuple[str, ...] = ()) -> Case:
    """`prepare yolo` of a folder holding data.yaml and images/a.png (and `images`, relative to it)."""
    return Case(id, ["prepare", "yolo", "--src", "{tmp}/y", "--out", "{tmp}/out"], fragment,
                {"y/data.yaml": yaml_text, "y/images/a.png": "PNG", **{f"y/{p}": "PNG" for p in images}})


CASES = [
    yolo_case("yolo-yaml-syntax-one-line", "train: [a\nnames: x\n",
              "data.yaml:2: invalid YAML: expected ',' or ']', but got ':'"),
    yolo_case("yolo-nc-disagrees-with-names", "train: images\nnc: 3\nnames: [car, van]\n",
              "data.yaml: 'nc: 3' disagrees with the 2 class names in 'names'"),
    yolo_case("yolo-duplicate-name-list", "train: images\nnames: [car, van, car]\n",
              "class name 'car' is given twice (id 0 and id 2)"),
    yolo_case("yolo-duplicate-name-mapping", "train: images\nnames: {0: car, 1: car}\n",
              "class name 'car' is given twice (id 0 and id 1)"),
    yolo_case("yolo-val-is-train", "train: images\nval: images\nnames: [car]\n",
              "data.yaml: val: 1 of its 1 images are also in train"),
    yolo_case("yolo-test-inside-train", "train: images\nval: v\ntest: images/sub\nnames: [car]\n",
              "data.yaml: test: 1 of its 1 images are also in train", ("v/b.png", "images/sub/c.png")),
    Case("yolo-duplicate-name-file", ["prepare", "yolo", "--src", "{tmp}/flat", "--names", "{tmp}/n.txt", "--out",
                                      "{tmp}/out"], "n.txt: class name 'car' is given twice (line 1 and line 4)",
         {"flat/a.png": "PNG", "n.txt": "car\n\ntruck\ncar\n"}),
    # a file given where a source folder belongs is named as a file, not as a missing folder
    *(Case(f"{name}-src-is-a-file", ["prepare", name, "--src", "{tmp}/a.png", "--out", "{tmp}/out"],
           "a.png: a file, not a folder hint: give --src the folder that holds the data", {"a.png": "PNG"})
      for name in ("images", "vedai", "xview", "voc", "dota", "yolo")),
    Case("coco-images-is-a-file", ["prepare", "coco", "--src", "{tmp}/ann.json", "--images", "{tmp}/a.png", "--out",
                                   "{tmp}/out"], "a.png: a file, not a folder",
         {"ann.json": json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "car"}]}),
          "a.png": "PNG"}),
    # one minimum tile for prepare and predict (kdcli.data.tiling.MIN_TILE)
    Case("images-tile-one-pixel", ["prepare", "images", "--src", "{tmp}/imgs", "--tile", "1", "--out", "{tmp}/out"],
         "the tile must be 0 (whole images) or at least 32 pixels", {"imgs/a.png": "PNG"}),
    Case("xview-tile-below-minimum", ["prepare", "xview", "--src", "{tmp}/x", "--tile", "16", "--out", "{tmp}/out"],
         "--tile >= 32", {"x/train_images/a.tif": "x", "x/xView_train.geojson": "{}"}),
    Case("predict-slice-below-minimum", ["predict", "{tmp}/best.pt", "{tmp}/a.png", "--slice", "16"],
         "--slice 16: a window is at least 32 pixels a side", {"a.png": "PNG"}),
    # distillation methods
    Case("distill-method-empty", ["distill", "--teacher", "{tmp}/t.pt", "--method", ""], "--method '': empty"),
    Case("distill-method-none-and-pdf", ["recipe", "show", "{tmp}/r.yaml", "distill.method=none,pdf"],
         "'none,pdf': none cannot be combined with other methods", {"r.yaml": "data:\n  path: x\n"}),
    Case("distill-method-trailing-comma", ["recipe", "show", "{tmp}/r.yaml", "distill.method=pdf,"],
         "'pdf,': an empty method name", {"r.yaml": "data:\n  path: x\n"}),
    # a truncated checkpoint, wherever it is read (kdcli.engine.checkpoint.load)
    *(Case(f"{'-'.join(args[:2]).strip('-')}-truncated-checkpoint", [*args, "{tmp}/best.pt"],
           "best.pt is truncated or damaged (could not be read as a torch checkpoint;",
           {"best.pt": "PK\x03\x04 the first bytes of a zip, then nothing", "a.png": "PNG"})
      for args in (["val"], ["train", "--resume"], ["distill", "--resume"], ["distill", "--teacher"],
                   ["benchmark", "--models"])),
    Case("predict-truncated-checkpoint", ["predict", "{tmp}/best.pt", "{tmp}/a.png"],
         "best.pt is truncated or damaged (could not be read as a torch checkpoint;",
         {"best.pt": "PK\x03\x04 the first bytes of a zip, then nothing", "a.png": "PNG"}),
    Case("train-fold-on-a-foldless-dataset", ["train", "recipes/train/synthetic_student.yaml", "data.path={tmp}/ds",
                                              "data.fold=1"],
         "split 'fold01_train' not found hint: this dataset has no folds: set data.fold=null",
         {"ds/dataset.yaml": "name: ds\nclasses: [car]\n", "ds/annotations/train.json": EMPTY_SPLIT,
          "ds/annotations/val.json": EMPTY_SPLIT}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_source_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = run_case(case, tmp_path, monkeypatch, width=200)
    assert [line for line in out.splitlines() if line.startswith("error:")] == [out.splitlines()[0]], out


def test_a_second_prepare_to_the_same_new_out_is_refused(tmp_path: Path):
    _write(tmp_path, {"y/data.yaml": "train: images\nnames: [car]\n", "y/images/a.png": "PNG"})
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:  # the first run, still writing
        (tmp / "first.txt").write_text("first")
        for extra in ([], ["--force"]):
            r = runner.invoke(app, ["prepare", "yolo", "--src", str(tmp_path / "y"), "--out", str(out), *extra],
                              terminal_width=200)
            assert r.exit_code == 2, r.output
            assert f"another kdcli run (pid {os.getpid()}) is writing it" in " ".join(r.output.split()), r.output
    assert [p.name for p in out.iterdir()] == ["first.txt"]
