"""Georeferenced outputs: boxes in the scene's CRS and in WGS84 lon/lat (RFC 7946) from generated GeoTIFFs with
known corners: an EPSG-coded UTM scene, a CRS given only as WKT, a rotated transform; without rasterio the EPSG
code from the GeoKeys; a transform without a CRS is a warning line, not a guess."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from kdcli.cli.app import app
from kdcli.data import rasters
from kdcli.data.rasters import open_raster
from kdcli.deploy.predict import Detections, geojson

# a Transverse Mercator with no EPSG code: its natural origin (false easting, false northing) is lon 10.25, lat 45.5
CUSTOM_TM = ('PROJCS["kdcli test TM",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563]],'
             'PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],PROJECTION["Transverse_Mercator"],'
             'PARAMETER["latitude_of_origin",45.5],PARAMETER["central_meridian",10.25],'
             'PARAMETER["scale_factor",0.9996],PARAMETER["false_easting",123456],'
             'PARAMETER["false_northing",654321],UNIT["metre",1]]')
BOX = Detections(np.array([[10.0, 10.0, 30.0, 50.0]], np.float32), np.array([0.9], np.float32),
                 np.array([0], np.int64))  # its first corner is pixel (10, 10)


def _write(path: Path, crs: str, transform) -> Path:
    rasterio = pytest.importorskip("rasterio")
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8", crs=crs,
                       transform=transform, tiled=True, blockxsize=32, blockysize=32, compress="deflate") as ds:
        ds.write(np.full((3, 64, 64), 90, np.uint8))
    return path


def _direct(crs: str, x: list[float], y: list[float]) -> tuple[np.ndarray, np.ndarray]:
    from rasterio.warp import transform

    lon, lat = transform(crs, "EPSG:4326", x, y)
    return np.asarray(lon), np.asarray(lat)


def _ring(gj: dict) -> np.ndarray:
    return np.array(gj["features"][0]["geometry"]["coordinates"][0])


def _ccw(ring: np.ndarray) -> bool:
    x, y = ring[:, 0], ring[:, 1]
    return float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1])) > 0


def test_utm_scene_box_in_wgs84_against_a_known_corner(tmp_path: Path):
    Affine = pytest.importorskip("affine").Affine  # comes with rasterio

    # pixel (10, 10) -> UTM 32N (500 000 E, 0 N): on the zone's central meridian at the equator, lon 9, lat 0
    r = open_raster(_write(tmp_path / "utm.tif", "EPSG:32632", Affine(0.5, 0, 499995.0, 0, -0.5, 5.0)))
    assert r.epsg == 32632
    gj = geojson(BOX, ["car"], r, "wgs84")
    ring = _ring(gj)
    assert "crs" not in gj and _ccw(ring) and ring.shape == (5, 2) and (ring[0] == ring[-1]).all()
    assert np.ptp(ring[:, 0]) > 0 and np.ptp(ring[:, 1]) > 0  # a real polygon, not a point
    assert any(np.allclose(p, [9.0, 0.0], atol=1e-9) for p in ring)
    lon, lat = _direct("EPSG:32632", [500010.0], [-20.0])  # pixel (30, 50)
    assert any(np.allclose(p, [lon[0], lat[0]], atol=1e-6) for p in ring)
    native = geojson(BOX, ["car"], r, "map")
    assert native["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32632"
    assert any(np.allclose(p, [500000.0, 0.0]) for p in _ring(native))


def test_a_crs_given_only_as_wkt(tmp_path: Path):
    Affine = pytest.importorskip("affine").Affine  # comes with rasterio

    r = open_raster(_write(tmp_path / "wkt.tif", CUSTOM_TM, Affine(0.5, 0, 123451.0, 0, -0.5, 654326.0)))
    assert r.epsg is None and "kdcli test TM" in r.crs
    ring = _ring(geojson(BOX, ["car"], r, "wgs84"))
    assert any(np.allclose(p, [10.25, 45.5], atol=1e-9) for p in ring)  # pixel (10, 10) = the natural origin
    lon, lat = _direct(CUSTOM_TM, [123466.0], [654301.0])  # pixel (30, 50)
    assert any(np.allclose(p, [lon[0], lat[0]], atol=1e-6) for p in ring)
    assert "kdcli test TM" in geojson(BOX, ["car"], r, "map")["crs_wkt"]


def test_a_rotated_transform(tmp_path: Path):
    Affine = pytest.importorskip("affine").Affine  # comes with rasterio

    # 30 degrees rotation about pixel (10, 10), which lands on (500 000, 0) in UTM 32N
    t = Affine.translation(500000, 0) @ Affine.rotation(30) @ Affine.scale(0.5, -0.5) @ Affine.translation(-10, -10)
    r = open_raster(_write(tmp_path / "rot.tif", "EPSG:32632", t))
    assert r.transform == pytest.approx(tuple(t)[:6])
    ring = _ring(geojson(BOX, ["car"], r, "wgs84"))
    assert _ccw(ring) and any(np.allclose(p, [9.0, 0.0], atol=1e-9) for p in ring)
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    dx, dy = 20 * 0.5, 40 * -0.5  # pixel (30, 50) from (10, 10), by hand
    lon, lat = _direct("EPSG:32632", [500000 + c * dx - s * dy], [s * dx + c * dy])
    assert any(np.allclose(p, [lon[0], lat[0]], atol=1e-6) for p in ring)


def _tifffile_geotiff(path: Path, geokeys: bool = True) -> Path:
    """UTM 32N by tags, as the GeoTIFF spec writes them: pixel (10, 10) -> (500 000, 0)."""
    tags = [(33550, "d", 3, (0.5, 0.5, 0.0), False), (33922, "d", 6, (10, 10, 0, 500000.0, 0.0, 0), False)]
    if geokeys:
        tags.append((34735, "H", 12, (1, 1, 0, 2, 1024, 0, 1, 1, 3072, 0, 1, 32632), False))
    tifffile.imwrite(path, np.full((64, 64, 3), 90, np.uint8), photometric="rgb", extratags=tags)
    return path


def test_without_rasterio_the_epsg_code_is_read_from_the_geokeys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(rasters, "optional_rasterio", lambda: None)
    r = open_raster(_tifffile_geotiff(tmp_path / "s.tif"))
    assert r.epsg == 32632 and r.crs == "EPSG:32632" and r.transform == (0.5, 0, 499995.0, 0, -0.5, 5.0)
    monkeypatch.setitem(sys.modules, "pyproj", None)  # neither rasterio nor pyproj: the reason, named
    with pytest.raises(rasters.KdcliError, match="need rasterio or pyproj"):
        geojson(BOX, ["car"], r, "wgs84")
    monkeypatch.delitem(sys.modules, "pyproj")
    pytest.importorskip("pyproj")
    assert any(np.allclose(p, [9.0, 0.0], atol=1e-9) for p in _ring(geojson(BOX, ["car"], r, "wgs84")))


def test_predict_writes_native_and_wgs84_geojson_and_refuses_an_unknown_crs(tmp_path: Path, tiny_checkpoint: Path):
    Affine = pytest.importorskip("affine").Affine  # comes with rasterio

    scenes = tmp_path / "scenes"
    scenes.mkdir()
    _write(scenes / "utm.tif", "EPSG:32632", Affine(0.5, 0, 499995.0, 0, -0.5, 5.0))
    _tifffile_geotiff(scenes / "nocrs.tif", geokeys=False)  # a transform but no CRS
    out = tmp_path / "pred"
    args = ["predict", str(tiny_checkpoint), "--conf", "0", "--out", str(out), "--no-draw"]
    # a georeferenced scene whose CRS is unknown: one line, exit 2, before any window runs, nothing written
    res = CliRunner().invoke(app, [*args[:2], str(scenes), *args[2:]], terminal_width=200)
    assert res.exit_code == 2 and not out.exists() and "Traceback" not in res.output
    flat = " ".join(res.output.split())
    assert "nocrs.tif: georeferenced (a pixel -> map transform) but its CRS is unknown to kdcli" in flat
    assert "--no-map" in flat
    # --no-map: pixel coordinates only, for every scene
    res = CliRunner().invoke(app, [*args[:2], str(scenes), *args[2:], "--no-map"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["images.json", "nocrs.geojson", "predictions.json",
                                                     "utm.geojson"]
    # a known CRS: the pixel, native-CRS and WGS84 GeoJSON
    res = CliRunner().invoke(app, [*args[:2], str(scenes / "utm.tif"), *args[2:], "--force"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["images.json", "predictions.json", "utm.geojson",
                                                     "utm.map.geojson", "utm.wgs84.geojson"]
    assert "warning" not in res.output
    pixel, native, wgs84 = (json.loads((out / f"utm{s}.geojson").read_text()) for s in ("", ".map", ".wgs84"))
    assert len(pixel["features"]) == len(native["features"]) == len(wgs84["features"]) > 0
    lon, lat = np.array([f["geometry"]["coordinates"][0] for f in wgs84["features"]]).reshape(-1, 2).T
    assert (np.abs(lon - 9) < 1e-3).all() and (np.abs(lat) < 1e-3).all()  # a 32 m scene at (9 E, 0 N)
