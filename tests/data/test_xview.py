"""xView: tiling geometry (property-based), GeoJSON streaming, and `prepare xview` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcli.data.sources import xview
from kdcli.data.sources.common import NON_FINITE
from kdcli.data.synthetic.xview import TYPE_OF
from kdcli.data.tiling import tile_boxes, tile_origins
from kdcli.errors import KdcliError

sizes = st.integers(min_value=1, max_value=3000)
tiles = st.integers(min_value=32, max_value=700)
overlaps = st.floats(min_value=0.0, max_value=0.9)


@given(size=sizes, tile=tiles, overlap=overlaps)
def test_tiles_cover_the_axis_and_stay_inside(size: int, tile: int, overlap: float):
    starts = tile_origins(size, tile, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    ends = [s + min(tile, size - s) for s in starts]
    assert max(ends) == size and all(0 <= s < size for s in starts) and all(e <= size for e in ends)
    for a, b in zip(ends, starts[1:]):
        assert b <= a  # consecutive tiles touch or overlap: no gap
    if size > tile:
        assert starts[-1] == size - tile  # the last tile is shifted back to the border


boxes_st = st.lists(st.tuples(st.floats(0, 900), st.floats(0, 900), st.floats(1, 120), st.floats(1, 120)),
                    min_size=0, max_size=30)


@settings(max_examples=80, deadline=None)
@given(raw=boxes_st, x0=st.integers(0, 600), y0=st.integers(0, 600), tile=st.integers(32, 400),
       min_visible=st.floats(0.05, 1.0))
def test_tile_boxes_inside_and_full_boxes_unchanged(raw, x0: int, y0: int, tile: int, min_visible: float):
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in raw], dtype=np.float64).reshape(-1, 4)
    kept = tile_boxes(boxes, x0, y0, tile, tile, min_visible)
    kept_idx = {i for i, _ in kept}
    for i, (bx0, by0, bx1, by1) in kept:
        assert 0 <= bx0 < bx1 <= tile and 0 <= by0 < by1 <= tile
        full = boxes[i]
        vis = (bx1 - bx0) * (by1 - by0) / ((full[2] - full[0]) * (full[3] - full[1]))
        assert vis >= min_visible - 1e-9
    for i, b in enumerate(boxes):
        inside = b[0] >= x0 and b[1] >= y0 and b[2] <= x0 + tile and b[3] <= y0 + tile
        if inside and min(b[2] - b[0], b[3] - b[1]) >= 1:
            assert i in kept_idx
            local = dict(kept)[i]
            assert local == pytest.approx((b[0] - x0, b[1] - y0, b[2] - x0, b[3] - y0))


def test_prepare_xview_end_to_end(tmp_path: Path, xview_raw: Path):
    out = tmp_path / "xview"
    meta = xview.prepare(xview_raw, out, tile=128, overlap=0.2, min_visible=0.5, val_fraction=0.25, seed=0,
                         keep_empty=0.0, workers=2)
    train, val = meta["scenes"]["train"], meta["scenes"]["val"]
    assert set(train).isdisjoint(val) and len(train) + len(val) == 4 and len(val) == 1
    d = meta["dropped"]
    assert d["scene referenced in the GeoJSON but absent (skipped)"]["example"] == "1395.tif"
    assert d["type_id 75 is not a class (dropped)"]["count"] == 2
    assert d["type_id 82 is not a class (dropped)"]["count"] == 2
    assert d["box with no area inside the scene (dropped)"]["count"] == 4
    assert d["box clipped to the scene"]["count"] >= 4
    geo = json.loads((xview_raw / "xView_train.geojson").read_text())
    vehicle_ids = set(xview.VEHICLE_IDS)
    scenes_present = {p.name for p in (xview_raw / "train_images").iterdir()}
    expected = sum(1 for f in geo["features"] if f["properties"]["type_id"] in vehicle_ids
                   and f["properties"]["image_id"] in scenes_present) - 4  # minus the zero-area boxes
    val_scenes = json.loads((out / "annotations" / "val_scenes.json").read_text())
    tiles = {s: json.loads((out / "annotations" / f"{s}.json").read_text()) for s in ("train", "val")}
    assert [im["scene"] for im in val_scenes["images"]] == val
    assert (out / val_scenes["images"][0]["file_name"]).is_file()
    assert meta["class_counts"]["val_scenes"]["vehicle"] == sum(
        1 for f in geo["features"] if f["properties"]["image_id"] in val and f["properties"]["type_id"] in vehicle_ids
    ) - sum(1 for f in geo["features"] if f["properties"]["image_id"] in val and f["properties"]["bounds_imcoords"]
            .split(",")[0] == f["properties"]["bounds_imcoords"].split(",")[2])
    assert expected > 0
    for split, data in tiles.items():
        names = {s for s in (train if split == "train" else val)}
        by_id = {im["id"]: im for im in data["images"]}
        for im in data["images"]:
            assert im["origin"]["scene"] in names  # no scene leaks into the other split
            stem = Path(im["origin"]["scene"]).stem
            assert Path(im["file_name"]).name == f"{stem}_{im['origin']['x0']}_{im['origin']['y0']}.png"
            assert (out / im["file_name"]).is_file()
        for a in data["annotations"]:
            im = by_id[a["image_id"]]
            x, y, w, h = a["bbox"]
            assert x >= 0 and y >= 0 and x + w <= im["width"] + 1e-6 and y + h <= im["height"] + 1e-6
            assert a["raw_class"] in vehicle_ids
        if split == "train":  # keep_empty=0: every kept training tile has a box
            assert all(any(a["image_id"] == im["id"] for a in data["annotations"]) for im in data["images"])
    assert set(TYPE_OF.values()) & vehicle_ids


def test_prepare_xview_workers_match_serial(tmp_path: Path, xview_raw: Path):
    a = xview.prepare(xview_raw, tmp_path / "a", tile=160, workers=0)
    b = xview.prepare(xview_raw, tmp_path / "b", tile=160, workers=2)
    for split in ("train", "val", "val_scenes"):
        ja = json.loads((tmp_path / "a" / "annotations" / f"{split}.json").read_text())
        jb = json.loads((tmp_path / "b" / "annotations" / f"{split}.json").read_text())
        assert ja["images"] == jb["images"] and ja["annotations"] == jb["annotations"]
    assert a["splits"] == b["splits"]


def test_xview_errors(tmp_path: Path, xview_raw: Path):
    with pytest.raises(KdcliError, match="xView not found"):
        xview.prepare(tmp_path / "none", tmp_path / "out")
    bad = tmp_path / "bad"
    (bad / "train_images").mkdir(parents=True)
    (bad / "xView_train.geojson").write_text('{"type": "FeatureCollection", "features": [{"broken": ')
    with pytest.raises(KdcliError, match="invalid GeoJSON"):
        xview.prepare(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(KdcliError, match="unknown xView class preset"):
        xview.prepare(xview_raw, tmp_path / "out", classes="boats")


def test_nan_and_inf_bounds_are_dropped_counted_and_not_in_the_class_table(tmp_path: Path, xview_raw: Path):
    import shutil

    raw = tmp_path / "xView"
    shutil.copytree(xview_raw, raw)
    geo = json.loads((raw / xview.GEOJSON).read_text())
    present = {p.name for p in (raw / xview.IMAGES_DIR).iterdir()}
    cars = [f for f in geo["features"] if f["properties"]["type_id"] == 18 and f["properties"]["image_id"] in present]
    cars[0]["properties"]["bounds_imcoords"] = "nan,10,20,30"
    cars[1]["properties"]["bounds_imcoords"] = "5,10,inf,30"
    (raw / xview.GEOJSON).write_text(json.dumps(geo))
    meta = xview.prepare(raw, tmp_path / "out", tile=420, classes="vehicles", keep_empty=0.0)
    assert meta["dropped"][NON_FINITE]["count"] == 2
    (row,) = [r for r in meta["class_mapping"] if r["raw_id"] == 18]
    assert row["fate"] == "kept" and row["objects"] == len(cars) - 2  # the class table counts only finite boxes
    for split in ("train", "val", "val_scenes"):
        text = (tmp_path / "out" / "annotations" / f"{split}.json").read_text()
        assert "NaN" not in text and "Infinity" not in text


def test_a_16_bit_scene_is_stretched_as_prepare_images_does_said_and_recorded(tmp_path: Path):
    """Pillow cuts a 16-bit RGB scene to its high byte without a word: its tiles are stretched per band between
    percentiles 2 and 98 (as `prepare images` does), counted, said and recorded; an 8-bit scene is as it was."""
    import tifffile
    import yaml
    from PIL import Image
    from typer.testing import CliRunner

    from kdcli.cli.app import app

    raw = tmp_path / "xView"
    (raw / "train_images").mkdir(parents=True)
    band = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 10  # 0..40950
    tifffile.imwrite(raw / "train_images" / "1.tif", np.stack([band, band // 2, band], -1), photometric="rgb")
    Image.new("RGB", (64, 64), (90, 60, 30)).save(raw / "train_images" / "2.tif")
    features = [{"type": "Feature", "properties": {"image_id": s, "type_id": 18, "bounds_imcoords": "10,10,30,30"}}
                for s in ("1.tif", "2.tif")]
    (raw / "xView_train.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["prepare", "xview", "--src", str(raw), "--out", str(out), "--tile", "64"],
                           terminal_width=400)
    assert r.exit_code == 0, r.output
    assert "note: 1 of 2 source images are not 8-bit (uint16: 1): stretched to 8 bit per image and band, linear " \
           "from percentile 2 to percentile 98" in " ".join(r.output.split())
    meta = yaml.safe_load((out / "dataset.yaml").read_text())
    assert meta["stretch"]["images"] == 1 and meta["stretch"]["dtypes"] == {"uint16": 1}
    tiles = {im["origin"]["scene"]: im for s in ("train", "val")
             for im in json.loads((out / "annotations" / f"{s}.json").read_text())["images"]}
    assert "stretch" not in tiles["2.tif"]
    assert np.asarray(Image.open(out / tiles["2.tif"]["file_name"]))[0, 0].tolist() == [90, 60, 30]
    lo, hi = np.percentile(band, [2, 98]), np.percentile(band // 2, [2, 98])  # by numpy on the whole band
    assert tiles["1.tif"]["stretch"]["dtype"] == "uint16"
    np.testing.assert_allclose(tiles["1.tif"]["stretch"]["bands"], [lo, hi, lo], rtol=1e-4)
    expected = np.clip((band - lo[0]) / (lo[1] - lo[0]) * 255, 0, 255)
    got = np.asarray(Image.open(out / tiles["1.tif"]["file_name"]))
    assert got.dtype == np.uint8 and np.abs(got[..., 0] - expected).max() <= 1  # Pillow: band >> 8, at most 159
