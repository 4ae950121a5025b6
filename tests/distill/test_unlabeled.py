"""Distillation on unlabelled images: the label fraction, `kdcli prepare images`, the pool joined to every batch,
the hard loss on labelled images only, every term on all of them, and the pool's bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from kdcli.cli.app import app
from kdcli.config.schema import Recipe
from kdcli.data.dataset import read_records, label_split
from kdcli.engine import checkpoint
from kdcli.engine.distill_trainer import DistillTrainer, student_defaults

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), terminal_width=200)


def _recipe(teacher: Path, **distill) -> Recipe:
    r = Recipe.model_validate({**student_defaults(checkpoint.load(teacher)),
                               "distill": {"teacher": str(teacher), "teacher_min_map": 0, **distill}})
    return r.model_copy(update={"train": r.train.model_copy(update={"device": "cpu", "epochs": 1, "max_batches": 2,
                                                                    "batch": 2, "plots": False})})


def test_label_fraction_is_seeded_per_fold(vedai25: Path):
    records, _, _ = read_records(vedai25, "train", 1)
    kept, rest = label_split(records, 0.25, seed=0, fold=1)
    assert len(kept) == round(0.25 * len(records)) and len(kept) + len(rest) == len(records)
    assert {r.image_id for r in kept}.isdisjoint(r.image_id for r in rest)
    assert all(len(r.boxes) == 0 for r in rest)  # the rest carry no labels
    again, _ = label_split(records, 0.25, seed=0, fold=1)
    assert [r.image_id for r in again] == [r.image_id for r in kept]
    other_fold, _ = label_split(records, 0.25, seed=0, fold=2)
    other_seed, _ = label_split(records, 0.25, seed=1, fold=1)
    assert [r.image_id for r in other_fold] != [r.image_id for r in kept] != [r.image_id for r in other_seed]
    assert label_split(records, 1.0, 0, 1) == (records, [])
    assert len(label_split(records, 1e-6, 0, 1)[0]) == 1  # at least one image keeps its labels


def test_hard_loss_sees_labelled_images_only_and_the_terms_see_all(tiny_checkpoint: Path, tmp_path: Path):
    """Each batch holds 2 labelled images and 2 of the pool (`rest`, from label_fraction 0.5): the hard loss must
    get 2 images with their boxes, the distillation terms all 4, and the labelled images must come from the kept
    half only."""
    t = DistillTrainer(_recipe(tiny_checkpoint, labels="hard+soft", method="pdf", unlabeled="rest").model_copy(
        update={"data": _recipe(tiny_checkpoint).data.model_copy(update={"label_fraction": 0.5})}),
        run_dir=tmp_path / "d")
    t.setup()
    assert len(t.train_set) + len(t.pool) == len(read_records(t.dataset_dir, "train", 1)[0])
    kept = {r.image_id for r in t.train_set.records}
    hard_sizes, term_sizes = [], []
    loss_fn = t.loss_fn

    def hard(out, boxes, labels):
        hard_sizes.append((out.cls_logits.shape[0], len(boxes), len(labels)))
        return loss_fn(out, boxes, labels)

    t.loss_fn = hard
    forward = t.distiller._forward
    t.distiller._forward = lambda s, te, b: (term_sizes.append((s.cls_logits.shape[0], te.features[0].shape[0])),
                                             forward(s, te, b))[1]
    for raw in list(t.train_loader(0))[:2]:
        assert raw["labeled"] == [True, True, False, False]
        assert set(raw["image_ids"][:2]) <= kept and not set(raw["image_ids"][2:]) & kept
        assert all(len(b) == 0 for b in raw["boxes"][2:])
        terms = t.compute_loss(t.preprocess(raw, 0))
        assert {"cls", "box", "soft_cls", "soft_box", "pdf", "total"} == set(terms)
    assert hard_sizes == [(2, 2, 2)] * 2 and term_sizes == [(4, 4)] * 2


def test_boxes_of_unlabelled_images_come_from_the_teacher_for_terms_that_read_boxes(tiny_checkpoint: Path,
                                                                                    tmp_path: Path):
    t = DistillTrainer(_recipe(tiny_checkpoint, method="defeat", unlabeled="rest", pseudo_conf=0.01).model_copy(
        update={"data": _recipe(tiny_checkpoint).data.model_copy(update={"label_fraction": 0.5})}),
        run_dir=tmp_path / "d")
    t.setup()
    assert t.distiller.teacher_head  # the detections need the teacher's head
    batch = t.preprocess(next(iter(t.train_loader(0))), 0)
    seen = []
    loss = t.distiller.terms.methods[0].loss
    t.distiller.terms.methods[0].loss = lambda s, te, b: (seen.append(b["boxes"]), loss(s, te, b))[1]
    t.compute_loss(batch)
    teacher_out = t.teacher(batch["images"])
    from kdcli.models.postprocess import postprocess

    cfg = t.teacher.cfg.model_copy(update={"conf": 0.01})
    want = postprocess(teacher_out, cfg, tuple(batch["images"].shape[-2:]))
    boxes = seen[0]
    assert all(torch.equal(boxes[i], batch["boxes"][i]) for i in (0, 1))  # labelled: their own boxes
    assert all(torch.allclose(boxes[i], want[i]["boxes"]) for i in (2, 3)) and sum(len(boxes[i]) for i in (2, 3))


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory: pytest.TempPathFactory, vedai_raw: Path, vedai25: Path) -> Path:
    """A `kdcli prepare images` dataset dir from the synthetic VEDAI colour scenes (96 px), none of them a fold-1
    val or test image (a pool never holds them)."""
    held = {Path(im["file_name"]).name for split in ("val", "test")
            for im in json.loads((vedai25 / "annotations" / f"fold01_{split}.json").read_text())["images"]}
    src = tmp_path_factory.mktemp("flights") / "colour"
    src.mkdir()
    for p in [p for p in sorted((vedai_raw / "Vehicules512").glob("*_co.png")) if p.name not in held][:12]:
        (src / p.name).symlink_to(p)
    out = tmp_path_factory.mktemp("pools") / "pool"
    r = run("prepare", "images", "--src", str(src), "--out", str(out))
    assert r.exit_code == 0, r.output
    return out


def test_prepare_images_writes_an_unlabeled_split(pool_dir: Path, tmp_path: Path):
    data = json.loads((pool_dir / "annotations" / "unlabeled.json").read_text())
    assert len(data["images"]) == 12 and data["annotations"] == [] and data["categories"] == []
    assert run("data", "check", str(pool_dir)).exit_code == 0
    st = json.loads(run("data", "stats", str(pool_dir), "--json").output)["splits"]["unlabeled"]
    assert st["unlabeled"] and st["images"] == 12 and st["image_side_px"]["p50"] == 96
    # tiles: a 3-band 16-bit TIFF scene of 200 x 120 cut into 96 px tiles with 20 % overlap -> columns 0, 76, 104
    import numpy as np
    import tifffile

    scenes = tmp_path / "scenes"
    scenes.mkdir()
    tifffile.imwrite(scenes / "s.tif", (np.arange(120 * 200 * 3) % 4000).astype(np.uint16).reshape(120, 200, 3))
    r = run("prepare", "images", "--src", str(scenes), "--tile", "96", "--out", str(tmp_path / "tiles"))
    assert r.exit_code == 0, r.output
    images = json.loads((tmp_path / "tiles" / "annotations" / "unlabeled.json").read_text())["images"]
    assert sorted((im["origin"]["x0"], im["origin"]["y0"]) for im in images) == [
        (x, y) for x in (0, 76, 104) for y in (0, 24)]
    assert all((im["width"], im["height"]) == (96, 96) for im in images)


def test_distil_with_a_prepared_pool_from_the_cli(pool_dir: Path, tiny_checkpoint: Path, tmp_path: Path,
                                                  monkeypatch):
    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    r = run("distill", "--teacher", str(tiny_checkpoint), "--labels", "soft", "--method", "pdf",
            f"distill.unlabeled={pool_dir}", "distill.unlabeled_ratio=0.5", "train.epochs=1", "train.max_batches=2",
            "distill.teacher_min_map=0", "--json")
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())  # rich wraps the line at the terminal width, which varies with the tmp path
    assert "unlabelled pool" in flat and "12 images, 2 per step" in flat
    run_dir = Path(json.loads(r.output.strip().splitlines()[-1])["run_dir"])
    best = checkpoint.load(run_dir / "weights" / "best.pt")
    assert best.distill["unlabeled_images"] == 12 and best.recipe["distill"]["unlabeled"] == str(pool_dir)


def _odd_pool(tmp_path: Path, size: int, mode: str = "RGB") -> Path:
    src = tmp_path / f"src{size}{mode}"
    src.mkdir()
    for i in range(3):
        Image.new(mode, (size, size), 90).save(src / f"{i}.png")
    out = tmp_path / f"pool{size}{mode}"
    assert run("prepare", "images", "--src", str(src), "--out", str(out)).exit_code == 0
    return out


@pytest.mark.parametrize("case", ["hard", "rest-without-fraction", "not-a-pool", "size-class", "bands", "train",
                                  "fraction-0", "fraction-above-1", "empty-folder", "ratio-0"])
def test_bad_pools_are_one_clear_line(case: str, tiny_checkpoint: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    base = ["distill", "--teacher", str(tiny_checkpoint), "--labels", "soft", "train.epochs=1",
            "train.max_batches=1", "distill.teacher_min_map=0"]
    cases = {
        "hard": lambda: (["distill", "--teacher", str(tiny_checkpoint), "distill.unlabeled=rest",
                          "data.label_fraction=0.5"], "a `hard` student learns from labels only"),
        "rest-without-fraction": lambda: ([*base, "distill.unlabeled=rest"], "data.label_fraction is 1"),
        "not-a-pool": lambda: ([*base, f"distill.unlabeled={tmp_path}"], "neither a split of"),
        "size-class": lambda: ([*base, f"distill.unlabeled={_odd_pool(tmp_path, 400)}"], "another size class"),
        "bands": lambda: ([*base, f"distill.unlabeled={_odd_pool(tmp_path, 96, 'L')}"],
                          "1 band(s), the labelled images 3"),
        "train": lambda: (["train", "recipes/train/synthetic_student.yaml", f"data.path={tmp_path}",
                           "distill.unlabeled=rest"], "is for `kdcli distill`"),
        "fraction-0": lambda: ([*base, "data.label_fraction=0"], "data.label_fraction"),
        "fraction-above-1": lambda: ([*base, "data.label_fraction=1.5"], "data.label_fraction"),
        "empty-folder": lambda: (["prepare", "images", "--src", str(tmp_path), "--out", str(tmp_path / "p")],
                                 "no images"),
        "ratio-0": lambda: ([*base, "distill.unlabeled=rest", "distill.unlabeled_ratio=0"],
                            "distill.unlabeled_ratio"),
    }
    args, fragment = cases[case]()
    if case == "train":
        (tmp_path / "dataset.yaml").write_text("classes: [car]\n")
    r = run(*args)
    assert r.exit_code == 2, r.output
    assert fragment in r.output and "Traceback" not in r.output and "internal error" not in r.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "p").exists()  # nothing half-written


def test_strong_pool_view_jitters_the_students_pool_images_only(tiny_checkpoint: Path, tmp_path: Path):
    t = DistillTrainer(_recipe(tiny_checkpoint, labels="soft", unlabeled="rest", pool_view="strong").model_copy(
        update={"data": _recipe(tiny_checkpoint).data.model_copy(update={"label_fraction": 0.5})}),
        run_dir=tmp_path / "d")
    t.setup()
    batch = t.preprocess(next(iter(t.train_loader(0))), 0)
    seen = {}
    student, teacher = t.model.forward, t.teacher.forward
    t.model.forward = lambda images, **kw: (seen.setdefault("student", images), student(images, **kw))[1]
    t.teacher.forward = lambda images, **kw: (seen.setdefault("teacher", images), teacher(images, **kw))[1]
    torch.manual_seed(0)
    t.compute_loss(batch)
    s, te = seen["student"].float(), seen["teacher"].float()
    assert torch.equal(te, batch["images"].float())  # the teacher sees the images as they are
    assert torch.equal(s[:2], te[:2])  # labelled images: the same view
    assert (s[2:] - te[2:]).abs().mean() > 1 and s.min() >= 0 and s.max() <= 255  # pool: jittered, still 0-255
