"""`kdcli predict`: a tiny model trained on one image finds its boxes again in a sliced mosaic scene (16-bit,
4-band GeoTIFF included), writes every output, and whole xView scenes are predicted and scored end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from kdcli.cli.app import app
from kdcli.data import coco
from kdcli.data.rasters import open_raster
from kdcli.data.sources import xview
from kdcli.engine.trainer import Trainer
from tests.conftest import tiny_recipe


@pytest.fixture(scope="module")
def overfit(overfit_run: tuple[Path, dict]) -> tuple[Path, np.ndarray, np.ndarray]:
    """(best.pt of a model overfit on the fold-1 test images, the test image with most boxes, its boxes xyxy)."""
    run, _ = overfit_run
    data = run.parent / "one_class"
    split = coco.read_split(data, "test", 1)
    im = max(split["images"], key=lambda i: sum(a["image_id"] == i["id"] for a in split["annotations"]))
    boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                      for a in split["annotations"] if a["image_id"] == im["id"]])
    return run / "weights" / "best.pt", np.asarray(Image.open(data / im["file_name"]).convert("RGB")), boxes


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def _predicted(out: Path, stem: str, min_score: float = 0.3) -> np.ndarray:
    feats = json.loads((out / f"{stem}.geojson").read_text())["features"]
    return np.array([[*f["geometry"]["coordinates"][0][0], *f["geometry"]["coordinates"][0][2]]
                     for f in feats if f["properties"]["score"] >= min_score]).reshape(-1, 4)


@pytest.mark.slow
def test_sliced_mosaic_recovers_every_box_once(tmp_path: Path, overfit):
    weights, image, gt = overfit
    s = image.shape[0]
    mosaic = np.concatenate([np.concatenate([image, image], 1)] * 2, 0)  # 2 x 2 copies
    Image.fromarray(mosaic).save(tmp_path / "scene.png")
    expected = np.concatenate([gt + [dx, dy, dx, dy] for dy in (0, s) for dx in (0, s)])
    for overlap, merge in ((0.0, "nms"), (0.5, "nms"), (0.5, "fusion")):
        out = tmp_path / f"out_{overlap}_{merge}"
        res = CliRunner().invoke(app, ["predict", str(weights), str(tmp_path / "scene.png"), "--slice", str(s),
                                       "--overlap", str(overlap), "--merge", merge, "--out", str(out)])
        assert res.exit_code == 0, res.output
        pred = _predicted(out, "scene", min_score=0.5)  # a seam's duplicates score alike (~0.99): look above 0.5
        iou = _iou(expected, pred)
        assert (iou.max(1) > 0.5).mean() >= 0.9, (overlap, merge, iou.max(1))  # found again, in scene pixels
        assert ((iou > 0.5).sum(1) <= 1).all(), (overlap, merge)  # and once: seams merged
    coco_res = json.loads((out / "predictions.json").read_text())
    assert coco_res and {r["image_id"] for r in coco_res} == {1} and all(len(r["bbox"]) == 4 for r in coco_res)
    assert (out / "scene.png").is_file()


@pytest.mark.slow
def test_16bit_multiband_geotiff(tmp_path: Path, overfit):
    weights, image, gt = overfit
    nir = image.mean(-1, keepdims=True)
    arr = (np.concatenate([image[..., ::-1], nir], -1).astype(np.uint16) * 40 + 3000)  # B, G, R, NIR in 16 bits
    tifffile.imwrite(tmp_path / "scene.tif", arr, photometric="rgb", extrasamples=[0], extratags=[
        (33550, "d", 3, (0.5, 0.5, 0.0), False), (33922, "d", 6, (0, 0, 0, 400000.0, 5000000.0, 0), False),
        (34735, "H", 8, (1, 1, 0, 1, 3072, 0, 1, 32632), False)])
    r = open_raster(tmp_path / "scene.tif", bands=[3, 2, 1])
    assert (r.width, r.height, r.bands, r.epsg) == (image.shape[1], image.shape[0], 4, 32632)
    back = open_raster(tmp_path / "scene.tif", bands=[3, 2, 1], percentiles=(0, 100)).read(0, 0, r.width, r.height)
    assert back.dtype == np.uint8 and back.shape == image.shape
    for c in range(3):  # each band stretched linearly from its own min..max to 0..255
        assert np.corrcoef(back[..., c].reshape(-1), image[..., c].reshape(-1))[0, 1] > 0.999
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["predict", str(weights), str(tmp_path / "scene.tif"), "--bands", "3,2,1",
                                   "--percentiles", "0,100", "--out", str(out)])  # undoes the 16-bit encoding
    assert res.exit_code == 0, res.output
    assert (_iou(gt, _predicted(out, "scene")).max(1) > 0.5).mean() >= 0.9
    geo = json.loads((out / "scene.map.geojson").read_text())
    assert geo["crs"]["properties"]["name"].endswith("EPSG::32632")
    x, y = geo["features"][0]["geometry"]["coordinates"][0][0]
    assert 400000 <= x <= 400000 + 0.5 * r.width and 5000000 - 0.5 * r.height <= y <= 5000000

    res = CliRunner().invoke(app, ["predict", str(weights), str(tmp_path / "scene.tif"), "--bands", "5"])
    assert res.exit_code == 2 and "has 4 band(s)" in res.output


def test_xview_whole_scenes_end_to_end(tmp_path: Path, xview_raw: Path):
    data = tmp_path / "xview"
    xview.prepare(xview_raw, data, tile=128, overlap=0.2, val_fraction=0.5)
    run = tmp_path / "run"
    Trainer(tiny_recipe(data, data={"fold": None, "imgsz": 128}, train={"epochs": 1}), run_dir=run).fit()
    out = tmp_path / "pred"
    res = CliRunner().invoke(app, ["predict", str(run / "weights" / "best.pt"), "--split", "val_scenes",
                                   "--slice", "128", "--conf", "0.01", "--out", str(out), "--no-draw"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    scenes = coco.read_split(data, "val_scenes")
    assert m["images"] == len(scenes["images"]) and m["objects"] == len(scenes["annotations"]) > 0
    assert 0 <= m["mAP50"] <= 1 and "scenes: mAP50" in res.output
    ids = {r["image_id"] for r in json.loads((out / "predictions.json").read_text())}
    assert ids <= {im["id"] for im in scenes["images"]}

    # --data: another dataset dir's split is scored (here a copy holding one scene of the two), not the checkpoint's
    other = tmp_path / "other"
    shutil.copytree(data, other, symlinks=True)
    one = {**scenes, "images": scenes["images"][-1:],
           "annotations": [a for a in scenes["annotations"] if a["image_id"] == scenes["images"][-1]["id"]]}
    (other / "annotations" / "test.json").write_text(json.dumps(one))
    base = ["predict", str(run / "weights" / "best.pt"), "--slice", "128", "--conf", "0.01", "--no-draw"]
    res = CliRunner().invoke(app, [*base, "--split", "test", "--data", str(other), "--out", str(tmp_path / "p2")])
    assert res.exit_code == 0, res.output
    m2 = json.loads((tmp_path / "p2" / "metrics.json").read_text())
    assert m2["images"] == 1 < len(scenes["images"]) and m2["objects"] == len(one["annotations"]) > 0
    kept = one["images"][0]["id"]
    assert kept != 1 and {r["image_id"] for r in json.loads((tmp_path / "p2" / "predictions.json").read_text())} \
        == {kept}  # the split's own ids: predictions.json joins with its COCO file
    assert [im["id"] for im in json.loads((tmp_path / "p2" / "images.json").read_text())["images"]] == [kept]
    assert (out / "dets_val_scenes.npz").is_file() and (tmp_path / "p2" / "dets_test.npz").is_file()
    res = CliRunner().invoke(app, ["compare", str(tmp_path / "p2"), str(tmp_path / "p2"), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["rows"][1]["gain"] == 0
    assert json.loads(res.output)["rows"][1]["score"] == pytest.approx(m2["mAP50"], abs=1e-4)
    res = CliRunner().invoke(app, ["compare", str(out), str(tmp_path / "p2")])
    assert res.exit_code == 2 and "scores other images" in res.output
    res = CliRunner().invoke(app, [*base, "--split", "holdout", "--data", str(other)])
    assert res.exit_code == 2 and "no split 'holdout'" in res.output and "val_scenes" in res.output
    res = CliRunner().invoke(app, [*base, "--data", str(other)])
    assert res.exit_code == 2 and "--split" in res.output
    wrong = {**one, "categories": [{**c, "name": f"{c['name']}x"} for c in one["categories"]]}
    (other / "annotations" / "test.json").write_text(json.dumps(wrong))
    res = CliRunner().invoke(app, [*base, "--split", "test", "--data", str(other)])
    assert res.exit_code == 2 and "test.json: classes" in res.output and "--classes" in res.output


def test_predict_errors(tmp_path: Path, tiny_checkpoint: Path):
    res = CliRunner().invoke(app, ["predict", str(tiny_checkpoint), str(tmp_path / "nothing*.png")])
    assert res.exit_code == 2 and "no image found" in res.output
    res = CliRunner().invoke(app, ["predict", str(tiny_checkpoint)])
    assert res.exit_code == 2 and "give images to predict" in res.output
    res = CliRunner().invoke(app, ["predict", str(tiny_checkpoint), "x.png", "--merge", "vote"])
    assert res.exit_code == 2 and "--merge vote" in res.output


def test_float_tiff_with_nodata_nan_is_scaled_without_numpy_warnings(tmp_path: Path, capsys):
    import warnings

    from kdcli.data.rasters import open_raster
    from kdcli.errors import KdcliError

    arr = np.linspace(0, 1000, 64 * 64 * 3, dtype=np.float32).reshape(64, 64, 3)
    arr[:16] = np.nan  # a nodata stripe, as GDAL writes it
    tifffile.imwrite(tmp_path / "f.tif", arr, photometric="rgb")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "All-NaN slice" / invalid value warnings would raise here
        r = open_raster(tmp_path / "f.tif")
        win = r.read(0, 0, 64, 64)
    assert all(np.isfinite(v) for pair in r.scale for v in pair)
    assert win.dtype == np.uint8 and (win[:16] == 0).all() and win[16:].max() > 200
    err = capsys.readouterr().err
    assert "25.0 % of the sampled pixels are nodata (NaN, infinite or masked)" in " ".join(err.split())
    arr[..., 1] = np.nan
    tifffile.imwrite(tmp_path / "g.tif", arr, photometric="rgb")
    with pytest.raises(KdcliError, match=r"band\(s\) 2 hold no valid value"):
        open_raster(tmp_path / "g.tif")


def test_a_second_run_into_the_same_out_is_refused_or_replaces_it_whole(tmp_path: Path, tiny_checkpoint: Path):
    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "a.png")
    out = tmp_path / "pred"
    args = ["predict", str(tiny_checkpoint), str(tmp_path / "a.png"), "--out", str(out), "--no-draw"]
    res = CliRunner().invoke(app, args, terminal_width=200)
    assert res.exit_code == 0, res.output
    timing = json.loads((out / "images.json").read_text())["timing"]  # how fast: printed and kept
    assert timing["seconds"] > 0 and timing["images_per_s"] == pytest.approx(1 / timing["seconds"], rel=0.01)
    assert timing["device"] == "cpu" and timing["threads"] >= 1 and "images/s" in res.output
    (out / "stale.geojson").write_text("{}")  # as if an earlier run predicted another image here
    res = CliRunner().invoke(app, args, terminal_width=200)
    assert res.exit_code == 2 and "the folder is not empty" in res.output and "--force" in res.output
    res = CliRunner().invoke(app, [*args, "--force", "--bands", "2"])  # one band, repeated to three
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["a.geojson", "images.json", "predictions.json"]


def test_the_predictor_api_refuses_a_window_below_the_minimum_tile(tmp_path: Path):
    """The Python API keeps the CLI's rule (kdcli.data.tiling.MIN_TILE), checked before any model loads."""
    import torch

    from kdcli.deploy.predict import Predictor
    from kdcli.errors import KdcliError

    absent = tmp_path / "absent.pt"
    with pytest.raises(KdcliError, match=r"--slice 31: a window is at least 32 pixels a side"):
        Predictor(absent, torch.device("cpu"), slice_size=31)
    with pytest.raises(KdcliError) as e:  # 32 passes the rule: what fails next is the missing checkpoint
        Predictor(absent, torch.device("cpu"), slice_size=32)
    assert "--slice" not in e.value.message and "absent.pt" in e.value.message
