"""Bad input, table-driven: every case gives exit code 2 (or the stated one), one `error:` line holding the stated
fragment, no traceback or "internal error", and leaves the folder as it was (nothing new, existing files
byte-identical)."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
from PIL import Image
from typer.testing import CliRunner

from kdcli.cli.app import app

runner = CliRunner()

GOOD_COCO = {"images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32},
                        {"id": 2, "file_name": "b.png", "width": 32, "height": 32}],
             "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]},
                             {"id": 2, "image_id": 2, "category_id": 1, "bbox": [4, 4, 8, 8]}],
             "categories": [{"id": 1, "name": "car"}]}


def coco_with(change: Callable[[dict[str, Any]], Any]) -> str:
    """GOOD_COCO edited in place by `change`; a change that returns a value replaces the whole document."""
    data = copy.deepcopy(GOOD_COCO)
    result = change(data)
    return json.dumps(data if result is None else result)


def _pop(path: list[Any]) -> Callable[[dict[str, Any]], None]:
    def change(d: dict[str, Any]) -> None:
        target = d
        for k in path[:-1]:
            target = target[k]
        del target[path[-1]]
    return change


def _append(key: str, entry: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    return lambda d: d[key].append(entry)


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(d: dict[str, Any]) -> None:
        target = d
        for k in path[:-1]:
            target = target[k]
        target[path[-1]] = value
    return change


@dataclass
class Case:
    id: str
    args: list[str]  # {tmp} is the case's folder
    fragment: str
    files: dict[str, str] = field(default_factory=dict)  # relative path -> text ("PNG" writes a 32x32 image)
    code: int = 2
    readonly: str | None = None  # a folder that os.access reports as not writable (tests run as root)


def coco_case(id: str, change: Callable[[dict[str, Any]], Any], fragment: str) -> Case:
    return Case(id, ["prepare", "coco", "--src", "{tmp}/ann.json", "--images", "{tmp}/imgs", "--out", "{tmp}/out"],
                fragment, {"ann.json": coco_with(change), "imgs/a.png": "PNG", "imgs/b.png": "PNG"})


# a study on a dataset dir (under KDCLI_DATASETS) that declares folds 1 and 2
TINY_STUDY = {"datasets/ds/dataset.yaml": "name: ds\nclasses: [car]\nfolds: [1, 2]\n",
              "t.yaml": "data: {path: ds, fold: 1}\n", "s.yaml": "model: {channels: 16}\n",
              "st.yaml": "teacher: t.yaml\nstudent: s.yaml\nconfigs: [teacher, hard]\nfolds: 1-2\n"}

CASES = [
    # prepare coco: structure
    coco_case("coco-top-level-list", lambda d: [d], "top level is a list"),
    coco_case("coco-images-not-list", _set(["images"], {"1": "a.png"}), "no 'images' list"),
    coco_case("coco-image-not-object", _set(["images", 0], "a.png"), "images[0]: expected an object"),
    coco_case("coco-file-name-null", _set(["images", 0, "file_name"], None), "images[0].file_name"),
    coco_case("coco-file-name-number", _set(["images", 0, "file_name"], 5), "images[0].file_name"),
    coco_case("coco-image-id-float", _set(["images", 0, "id"], 1.5), "images[0].id"),
    coco_case("coco-image-id-duplicate", _set(["images", 1, "id"], 1), "duplicate image id 1"),
    coco_case("coco-bbox-3-numbers", _set(["annotations", 0, "bbox"], [1, 2, 3]), "annotations[0].bbox"),
    coco_case("coco-bbox-string-value", _set(["annotations", 0, "bbox"], [1, "2", 3, 4]), "annotations[0].bbox"),
    coco_case("coco-bbox-null", _set(["annotations", 1, "bbox"], None), "annotations[1].bbox"),
    coco_case("coco-bbox-string", _set(["annotations", 0, "bbox"], "1 2 3 4"), "annotations[0].bbox"),
    coco_case("coco-annotation-no-bbox", _pop(["annotations", 0, "bbox"]), "annotations[0]: needs"),
    coco_case("coco-annotation-image-id-list", _set(["annotations", 0, "image_id"], [1]),
              "annotations[0].image_id"),
    coco_case("coco-category-id-twice", _append("categories", {"id": 1, "name": "truck"}),
              "category id 1 is declared twice"),
    coco_case("coco-category-name-twice", _append("categories", {"id": 2, "name": "car"}),
              "category name 'car' is declared twice"),
    coco_case("coco-category-no-name", _set(["categories", 0, "name"], None), "categories[0]: needs"),
    Case("coco-invalid-json", ["prepare", "coco", "--src", "{tmp}/ann.json", "--images", "{tmp}/imgs", "--out",
                               "{tmp}/out"], "ann.json:2: invalid JSON", {"ann.json": '{"images": [\n,]}',
                                                                           "imgs/a.png": "PNG"}),
    Case("coco-src-missing", ["prepare", "coco", "--src", "{tmp}/nope.json", "--images", "{tmp}/imgs", "--out",
                              "{tmp}/out"], "nope.json: file not found", {"imgs/a.png": "PNG"}),
    Case("coco-src-is-dir", ["prepare", "coco", "--src", "{tmp}/imgs", "--images", "{tmp}/imgs", "--out",
                             "{tmp}/out"], "imgs: file not found", {"imgs/a.png": "PNG"}),
    Case("coco-images-dir-missing", ["prepare", "coco", "--src", "{tmp}/ann.json", "--images", "{tmp}/none",
                                     "--out", "{tmp}/out"], "image folder not found",
         {"ann.json": json.dumps(GOOD_COCO)}),
    # recipes
    Case("recipe-duplicate-key", ["recipe", "show", "{tmp}/r.yaml"], "r.yaml:3: invalid YAML: key 'imgsz' is given "
         "twice (first on line 2)", {"r.yaml": "data:\n  imgsz: 256\n  imgsz: 512\n  path: x\n"}),
    Case("recipe-section-file-missing", ["recipe", "show", "{tmp}/r.yaml"], "r.yaml:2: data: section file "
         "'nothere.yaml' not found", {"r.yaml": "name: x\ndata: nothere.yaml\n"}),
    Case("recipe-is-a-folder", ["recipe", "show", "{tmp}/sub"], "sub: a folder, not a file", {"sub/x.txt": ""}),
    Case("recipe-not-a-mapping", ["recipe", "show", "{tmp}/r.yaml"], "r.yaml:1: a recipe must be a mapping",
         {"r.yaml": "- a\n- b\n"}),
    Case("recipe-unknown-key", ["recipe", "show", "{tmp}/r.yaml"], "unknown key 'imgsiz' (did you mean 'data.imgsz'?)",
         {"r.yaml": "data:\n  path: x\n  imgsiz: 3\n"}),
    Case("recipe-wrong-type", ["recipe", "show", "{tmp}/r.yaml"], "r.yaml:3: data.imgsz:",
         {"r.yaml": "data:\n  path: x\n  imgsz: big\n"}),
    Case("recipe-bad-override", ["recipe", "show", "{tmp}/r.yaml", "train.epochs=many"],
         "override 'train.epochs=many': train.epochs", {"r.yaml": "data:\n  path: x\n"}),
    Case("recipe-override-unknown-key", ["recipe", "show", "{tmp}/r.yaml", "train.epoch=3"],
         "unknown recipe key 'train.epoch'", {"r.yaml": "data:\n  path: x\n"}),
    Case("recipe-override-no-equals", ["recipe", "show", "{tmp}/r.yaml", "train.epochs"], "bad override",
         {"r.yaml": "data:\n  path: x\n"}),
    # checkpoints
    Case("val-checkpoint-is-a-folder", ["val", "{tmp}/run"], "run: a folder, not a checkpoint file",
         {"run/weights/x.txt": ""}),
    Case("val-checkpoint-missing", ["val", "{tmp}/best.pt"], "best.pt: checkpoint not found"),
    Case("val-checkpoint-not-torch", ["val", "{tmp}/best.pt"], "best.pt: not a readable kdcli checkpoint",
         {"best.pt": "hello"}),
    # output places
    Case("prepare-out-under-a-file", ["prepare", "coco", "--src", "{tmp}/ann.json", "--images", "{tmp}/imgs",
                                      "--out", "{tmp}/afile/sub"], "afile is a file, not a folder",
         {"ann.json": json.dumps(GOOD_COCO), "imgs/a.png": "PNG", "imgs/b.png": "PNG", "afile": "keep"}),
    Case("prepare-out-exists", ["prepare", "coco", "--src", "{tmp}/ann.json", "--images", "{tmp}/imgs", "--out",
                                "{tmp}/afile"], "afile already exists",
         {"ann.json": json.dumps(GOOD_COCO), "imgs/a.png": "PNG", "imgs/b.png": "PNG", "afile": "keep"}),
    Case("predict-out-is-a-file", ["predict", "{tmp}/best.pt", "{tmp}/a.png", "--out", "{tmp}/afile"],
         "afile: the --out folder exists as a file", {"a.png": "PNG", "afile": "keep"}),
    Case("predict-out-under-a-file", ["predict", "{tmp}/best.pt", "{tmp}/a.png", "--out", "{tmp}/afile/x"],
         "afile is a file, not a folder", {"a.png": "PNG", "afile": "keep"}),
    Case("predict-overlap-one", ["predict", "{tmp}/best.pt", "{tmp}/a.png", "--slice", "64", "--overlap", "1"],
         "--overlap 1.0: give a fraction in [0, 1)", {"a.png": "PNG"}),
    Case("predict-no-images", ["predict", "{tmp}/best.pt"], "give images to predict"),
    Case("predict-bad-merge", ["predict", "{tmp}/best.pt", "{tmp}/a.png", "--merge", "vote"], "--merge vote",
         {"a.png": "PNG"}),
    Case("predict-bad-percentiles", ["predict", "{tmp}/best.pt", "{tmp}/a.png", "--percentiles", "98,2"],
         "--percentiles 98,2", {"a.png": "PNG"}),
    Case("predict-band-zero", ["predict", "{tmp}/best.pt", "{tmp}/a.png", "--bands", "0,1,2"],
         "--bands 0,1,2: bands are numbered from 1 (as in GDAL)", {"a.png": "PNG"}),
    Case("predict-two-bands", ["predict", "{tmp}/best.pt", "{tmp}/a.png", "--bands", "1,2"],
         "--bands 1,2: the model takes 3 bands, or 1 repeated to 3; 2 given", {"a.png": "PNG"}),
    Case("predict-four-bands", ["predict", "{tmp}/best.pt", "{tmp}/a.png", "--bands", "1,2,3,4"],
         "--bands 1,2,3,4: the model takes 3 bands, or 1 repeated to 3; 4 given", {"a.png": "PNG"}),
    Case("predict-out-not-empty", ["predict", "{tmp}/best.pt", "{tmp}/a.png", "--out", "{tmp}/old"],
         "old: the folder is not empty (an earlier run's outputs would mix", {"a.png": "PNG", "old/x.geojson": "{}"}),
    Case("predict-force-not-a-predict-folder", ["predict", "{tmp}/best.pt", "{tmp}/a.png", "--out", "{tmp}/mine",
                                                "--force"], "mine: not the folder of an earlier `kdcli predict`",
         {"a.png": "PNG", "mine/notes.txt": "keep"}),
    Case("export-out-under-a-file", ["export", "{tmp}/best.pt", "--out", "{tmp}/afile/m.onnx"],
         "afile: the output folder exists as a file", {"afile": "keep", "best.pt": "x"}),
    Case("export-out-is-a-folder", ["export", "{tmp}/best.pt", "--out", "{tmp}/sub"], "a folder; give the output",
         {"sub/x": "", "best.pt": "x"}),
    Case("export-bad-format", ["export", "{tmp}/best.pt", "--format", "tflite"], "--format tflite",
         {"best.pt": "x"}),
    # every command's missing or wrong input
    Case("prepare-vedai-bad-res", ["prepare", "vedai", "--res", "30", "--src", "{tmp}"], "--res must be 25 or 12"),
    Case("prepare-vedai-missing", ["prepare", "vedai", "--res", "25", "--src", "{tmp}/VEDAI"], "VEDAI not found at"),
    Case("prepare-xview-missing", ["prepare", "xview", "--src", "{tmp}"], "train_images: missing"),
    Case("prepare-voc-missing", ["prepare", "voc", "--src", "{tmp}"], "trainval.txt: missing"),
    Case("prepare-dota-missing", ["prepare", "dota", "--src", "{tmp}/none"], "DOTA not found at"),
    Case("prepare-dota-no-labels", ["prepare", "dota", "--src", "{tmp}/d"], "labelTxt: missing",
         {"d/images/a.png": "PNG"}),
    Case("prepare-dota-bad-preset", ["prepare", "dota", "--src", "{tmp}/d", "--classes", "cars"],
         "unknown DOTA preset", {"d/images/a.png": "PNG", "d/labelTxt/a.txt": "1 1 9 1 9 9 1 9 plane 0\n"}),
    Case("prepare-yolo-missing", ["prepare", "yolo", "--src", "{tmp}/none"], "YOLO dataset not found at"),
    Case("prepare-yolo-bad-yaml", ["prepare", "yolo", "--src", "{tmp}/y"], "data.yaml:2: invalid YAML",
         {"y/data.yaml": "train: [a\nnames: x\n"}),
    Case("prepare-yolo-names-missing", ["prepare", "yolo", "--src", "{tmp}/y", "--names", "{tmp}/n.txt"],
         "n.txt: names file not found", {"y/a.png": "PNG"}),
    Case("prepare-synthetic-kind", ["prepare", "synthetic", "--kind", "hrsc", "--out", "{tmp}/x"],
         "unknown synthetic kind 'hrsc'"),
    Case("prepare-synthetic-no-images", ["prepare", "synthetic", "--images", "0", "--out", "{tmp}/x"],
         "--images must be >= 1"),
    Case("study-recipe-missing", ["study", "{tmp}/nostudy.yaml"], "recipe not found"),
    Case("study-devices-missing", ["study", "{tmp}/st.yaml", "--devices", "99", "--per-device", "1000"],
         "--devices 99: GPU 99 not found", TINY_STUDY),
    Case("study-devices-not-indices", ["study", "{tmp}/st.yaml", "--devices", "cuda:0"],
         "--devices cuda:0: give GPU indices", TINY_STUDY),
    Case("study-folds-beyond-dataset", ["study", "{tmp}/st.yaml", "folds=1-20", "--dry-run"],
         "folds 1-20: the dataset", TINY_STUDY),
    Case("study-folds-beyond-dataset-hint", ["study", "{tmp}/st.yaml", "folds=2-3", "--dry-run"],
         "has folds 1-2 (3 missing) hint: set folds=1-2", TINY_STUDY),
    Case("report-not-a-study", ["report", "{tmp}"], "not a study directory"),
    Case("distill-teacher-missing", ["distill", "--teacher", "{tmp}/t.pt"], "t.pt: checkpoint not found"),
    Case("train-recipe-missing", ["train", "no_such_recipe"], "recipe not found: no_such_recipe"),
    Case("train-recipe-and-resume", ["train", "--resume", "{tmp}/last.pt", "recipes/train/synthetic_student.yaml"],
         "give a recipe or --resume, not both"),
    Case("train-resume-missing", ["train", "--resume", "{tmp}/last.pt"], "last.pt: checkpoint not found"),
    Case("data-check-missing", ["data", "check", "{tmp}/nodata"], "dataset dir not found"),
    Case("data-stats-missing", ["data", "stats", "{tmp}/nodata"], "dataset dir not found"),
    Case("info-model-missing", ["info", "model", "no_such.yaml"], "recipe not found"),
    Case("predict-weights-missing", ["predict", "{tmp}/none.pt", "{tmp}/a.png"], "none.pt: checkpoint not found",
         {"a.png": "PNG"}),
    Case("data-check-bad-dataset-yaml", ["data", "check", "{tmp}/ds"], "dataset.yaml:2: invalid YAML",
         {"ds/dataset.yaml": "classes: [car\nname: : x\n", "ds/annotations/train.json": "{}"}),
    Case("data-stats-binary-dataset-yaml", ["data", "stats", "{tmp}/ds"], "dataset.yaml: cannot read",
         {"ds/dataset.yaml": "BINARY", "ds/annotations/train.json": "{}"}),
    Case("data-stats-no-classes", ["data", "stats", "{tmp}/ds"], "malformed dataset.yaml (no 'classes')",
         {"ds/dataset.yaml": "name: x\n"}),
    # benchmark options
    Case("benchmark-imgsz-negative", ["benchmark", "--imgsz", "-5"], "--imgsz"),
    Case("benchmark-imgsz-zero", ["benchmark", "--imgsz", "0"], "--imgsz"),
    Case("benchmark-batch-one", ["benchmark", "--batch", "1"], "--batch"),
    Case("benchmark-data-missing", ["benchmark", "--models", "models/student_r18_fpn", "--imgsz", "64", "--data",
                                    "{tmp}/nodata", "--no-eval", "--no-inference", "--no-reference"],
         "not a kdcli dataset dir"),
    # output folders that cannot be written, refused before any work
    Case("prepare-out-unwritable", ["prepare", "synthetic", "--images", "4", "--out", "{tmp}/ro/new"],
         "cannot create the output: " , {"ro/keep.txt": "x"}, readonly="ro"),
    Case("train-runs-unwritable", ["train", "recipes/train/synthetic_student.yaml", "data.path={tmp}/ds"],
         "cannot create the run folder: ", {"runs/keep.txt": "x"}, readonly="runs"),
    Case("prepare-vedai-folds-out-of-range", ["prepare", "vedai", "--res", "25", "--folds", "11", "--src",
                                              "{tmp}/VEDAI"], "--folds"),
    Case("prepare-vedai-classes-unknown", ["prepare", "vedai", "--res", "25", "--classes", "cars", "--src",
                                           "{tmp}/VEDAI"], "--classes"),
]


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if text == "PNG":
            Image.new("RGB", (32, 32), (200, 10, 10)).save(p)
        elif text == "BINARY":
            p.write_bytes(b"\xff\xfe\x00\x81 not utf-8")
        else:
            p.write_text(text)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_case(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, width: int = 200) -> str:
    """Run a table case in a fresh KDCLI_DATASETS/KDCLI_RUNS: its exit code, no traceback, its fragment, and no
    file left behind or changed. Returns the output for the file's own checks."""
    monkeypatch.setenv("KDCLI_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("KDCLI_DEBUG", raising=False)
    _write(tmp_path, case.files)
    before = _snapshot(tmp_path)
    r = runner.invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in case.args], terminal_width=width)
    out = r.output
    assert r.exit_code == case.code, out
    assert "Traceback" not in out and "internal error" not in out, out
    assert case.fragment in " ".join(out.split()), out
    assert _snapshot(tmp_path) == before, "the case left files behind or changed existing ones"
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KDCLI_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("KDCLI_DEBUG", raising=False)
    _write(tmp_path, case.files)
    if case.readonly:
        locked, real_access = (tmp_path / case.readonly).resolve(), os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if (mode & os.W_OK and Path(p).resolve()
                                                                              == locked) else real_access(p, mode))
    before = _snapshot(tmp_path)
    r = runner.invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in case.args], terminal_width=200)
    out = r.output
    assert r.exit_code == case.code, out
    assert "Traceback" not in out and "internal error" not in out, out
    flat = " ".join(out.split())
    assert case.fragment in flat, out
    errors = [line for line in out.splitlines() if line.startswith("error:") or "Error" in line[:12]]
    assert len(errors) <= 1 or all("Usage" not in e for e in errors), out
    assert _snapshot(tmp_path) == before, "the case left files behind or changed existing ones"


def test_val_after_the_dataset_moved_says_how_to_point_at_it(tiny_checkpoint: Path, tmp_path: Path):
    import torch

    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    ckpt["data"]["path"] = str(tmp_path / "moved-away")
    moved = tmp_path / "best.pt"
    torch.save(ckpt, moved)
    before = _snapshot(tmp_path)
    r = runner.invoke(app, ["val", str(moved)], terminal_width=200)
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and "moved-away no longer exists" in flat and "data=NEWDIR" in flat, r.output
    assert _snapshot(tmp_path) == before


def test_predict_asks_before_a_mistyped_overlap_runs_all_night(tiny_checkpoint: Path, tmp_path: Path):
    Image.new("RGB", (2000, 2000), (90, 90, 90)).save(tmp_path / "scene.png")
    before = _snapshot(tmp_path)
    r = runner.invoke(app, ["predict", str(tiny_checkpoint), str(tmp_path / "scene.png"), "--slice", "64",
                            "--overlap", "0.99", "--out", str(tmp_path / "pred")], terminal_width=200)
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and "3751969 windows to predict in 1 image(s)" in flat and "--yes" in flat, r.output
    assert _snapshot(tmp_path) == before


class _NotData:
    """Stands for any Python object a checkpoint must not hold (loading it would run its class's code)."""


def test_an_unsafe_checkpoint_is_refused_without_torch_advice(tmp_path: Path):
    import torch

    torch.save({"format_version": 1, "model": _NotData()}, tmp_path / "evil.pt")
    r = runner.invoke(app, ["val", str(tmp_path / "evil.pt")], terminal_width=200)
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and "safe (weights-only) reader refuses to load" in flat, r.output
    assert "weights_only" not in flat and "trust" not in flat  # never pass on the advice to switch the check off


def test_distilling_on_another_dataset_than_the_teachers_names_both(tiny_checkpoint: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    import shutil

    from kdcli.engine import checkpoint

    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    other = tmp_path / "other-dataset"
    shutil.copytree(checkpoint.load(tiny_checkpoint).data.path, other)
    before = _snapshot(tmp_path)
    r = runner.invoke(app, ["distill", "--teacher", str(tiny_checkpoint), f"data.path={other}"], terminal_width=200)
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and "the teacher was trained on" in flat and str(other) in flat, r.output
    assert "train a teacher for it" in flat and _snapshot(tmp_path) == before


def test_a_checkpoint_lacking_a_field_names_it(tiny_checkpoint: Path, tmp_path: Path):
    import torch

    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    del ckpt["model"]["classes"]
    torch.save(ckpt, tmp_path / "old.pt")
    r = runner.invoke(app, ["val", str(tmp_path / "old.pt")], terminal_width=200)
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and "old.pt: not a valid kdcli checkpoint: field 'model.classes' missing" in flat, r.output


def test_a_forced_distillation_resumes_forced(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`distill --force` past a weak teacher, stopped in its first epoch: `--resume` (without --force) checks the
    teacher again, and must not refuse what the run was started to accept."""
    import torch

    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    r = runner.invoke(app, ["distill", "--teacher", str(tiny_checkpoint), "--force", "distill.teacher_min_map=0.99",
                            "train.epochs=1", "train.max_batches=1", "--json"], terminal_width=200)
    assert r.exit_code == 0, r.output
    last = Path(json.loads(r.output.strip().splitlines()[-1])["run_dir"]) / "weights" / "last.pt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    ckpt["train_state"]["epoch"] = 0  # as if stopped before its first epoch ended
    torch.save(ckpt, last)
    r = runner.invoke(app, ["distill", "--resume", str(last)], terminal_width=200)
    assert r.exit_code == 0 and "teacher mAP50" in r.output and "looks untrained" not in r.output, r.output


def _weights(kind: str, path: Path) -> None:
    import torch
    import torchvision

    if kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "resnet50":
        torch.save(torchvision.models.resnet50().state_dict(), path)
    elif kind == "4-band":
        state = torchvision.models.resnet18().state_dict()
        state["conv1.weight"] = torch.zeros(64, 4, 7, 7)
        torch.save(state, path)
    elif kind == "module":
        torch.save(torch.nn.Conv2d(3, 8, 3), path)
    else:
        path.write_bytes(bytes(range(256)) * 4)


@pytest.mark.parametrize("kind, fragment", [
    ("list", "w.pth: not a state dict (the file holds a list"),
    ("resnet50", "w.pth: not resnet18 weights: layer1.0.conv1.weight: [64, 64, 1, 1] in the file, [64, 64, 3, 3] "
                 "in resnet18 (and 22 more tensors of another shape)"),
    ("4-band", "w.pth: not resnet18 weights: conv1.weight: [64, 4, 7, 7] in the file, [64, 3, 7, 7] in resnet18 "
               "hint: kdcli's backbones take 3-band images"),
    ("module", "w.pth: holds Python objects beyond tensors (a pickled model?)"),
    ("bytes", "w.pth: cannot read ImageNet weights (not a torch file, or a damaged one)")])
def test_imagenet_weights_that_do_not_fit_are_named_in_one_line(kind: str, fragment: str, vedai25: Path,
                                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    _weights(kind, tmp_path / "w.pth")
    before = _snapshot(tmp_path)
    r = runner.invoke(app, ["train", "recipes/train/synthetic_student.yaml", f"data.path={vedai25}",
                            f"model.pretrained={tmp_path / 'w.pth'}", "model.channels=16"], terminal_width=400)
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and fragment in flat and "internal error" not in flat, r.output
    assert len(r.output.strip().splitlines()) <= 2 and "weights_only" not in flat, r.output  # error + hint
    assert _snapshot(tmp_path) == before


def _copies_of_test_images(dataset: Path, where: Path) -> Path:
    """A `kdcli prepare images` pool of copies (not links) of the fold-1 test images."""
    import shutil

    where.mkdir()
    for im in json.loads((dataset / "annotations" / "fold01_test.json").read_text())["images"]:
        shutil.copy((dataset / im["file_name"]).resolve(), where / Path(im["file_name"]).name)
    r = runner.invoke(app, ["prepare", "images", "--src", str(where), "--out", str(where.parent / "copies")])
    assert r.exit_code == 0, r.output
    return where.parent / "copies"


@pytest.mark.parametrize("case", ["test-split", "val-split", "dir-val-split", "copies-of-test", "ratio-below-one"])
def test_a_pool_never_holds_the_folds_val_or_test_images(case: str, tiny_checkpoint: Path, vedai25: Path,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A student distilled on its fold's val or test images would be selected or scored on images it trained on;
    and a ratio that gives less than one pool image a step is refused, naming the least ratio for the batch."""
    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    scored = "images of fold01_test.json (the fold's test split): the student would be scored on images it trained on"
    selected = "images of fold01_val.json (the fold's val split): the student would be selected (best.pt, early stop)"
    pool, fragment = {
        "test-split": lambda: (["distill.unlabeled=test"], scored),
        "val-split": lambda: (["distill.unlabeled=val"], selected),
        "dir-val-split": lambda: ([f"distill.unlabeled={vedai25}:val"], selected),
        "copies-of-test": lambda: ([f"distill.unlabeled={_copies_of_test_images(vedai25, tmp_path / 'c')}"], scored),
        "ratio-below-one": lambda: (["distill.unlabeled=rest", "data.label_fraction=0.5", "train.batch=4",
                                     "distill.unlabeled_ratio=0.01"],
                                    "distill.unlabeled_ratio=0.01 with train.batch=4: 0.04 pool images per step; a "
                                    "step takes whole images, at least one: distill.unlabeled_ratio >= 0.25"),
    }[case]()
    before = _snapshot(tmp_path)
    r = runner.invoke(app, ["distill", "--teacher", str(tiny_checkpoint), "--labels", "soft", *pool,
                            "distill.teacher_min_map=0", "train.epochs=1", "train.max_batches=1"], terminal_width=400)
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and fragment in flat and "Traceback" not in flat, r.output
    assert _snapshot(tmp_path) == before and not (tmp_path / "runs").exists()


def test_predict_refuses_a_two_band_image_without_bands(tiny_checkpoint: Path, tmp_path: Path):
    import numpy as np
    import tifffile

    tifffile.imwrite(tmp_path / "b.tif", np.full((2, 64, 64), 7, np.uint8), photometric="minisblack",
                     planarconfig="separate")
    before = _snapshot(tmp_path)
    r = runner.invoke(app, ["predict", str(tiny_checkpoint), str(tmp_path / "b.tif"), "--out", str(tmp_path / "p")],
                      terminal_width=400)
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and "b.tif: has 2 bands; without --bands only band 1 would be used" in flat, r.output
    assert _snapshot(tmp_path) == before
