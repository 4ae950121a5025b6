"""Scenes read window by window: each reader (rasterio/GDAL, the tifffile fallback, Pillow) returns a window's
pixels, a prediction decodes only the windows it runs on (counted at the decoder, and in traced memory), and bad
scenes or windows fail in one line with nothing written."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from typer.testing import CliRunner

from kdcli.cli.app import app
from kdcli.data import rasters
from kdcli.data.rasters import open_raster
from kdcli.deploy.predict import Predictor
from kdcli.errors import KdcliError


@pytest.fixture(params=["gdal", "tifffile"])
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which TIFF reader open_raster uses: rasterio when installed, tifffile without it."""
    if request.param == "gdal":
        pytest.importorskip("rasterio")
    else:
        monkeypatch.setattr(rasters, "optional_rasterio", lambda: None)
    return request.param


def _scene(h: int, w: int, bands: int, dtype: type = np.uint8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, np.iinfo(dtype).max, (h, w, bands), endpoint=True).astype(dtype)


LAYOUTS = {  # tifffile.imwrite arguments: tiled, stripped, planar, uncompressed
    "tiled-zlib": {"tile": (32, 32), "compression": "zlib"},
    "stripped-zlib": {"rowsperstrip": 7, "compression": "zlib"},
    "planar-stripped-zlib": {"rowsperstrip": 16, "compression": "zlib", "planarconfig": "separate"},
    "uncompressed": {},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_window_is_the_scenes_pixels(tmp_path: Path, reader: str, layout: str):
    arr = _scene(100, 70, 4)
    kw = LAYOUTS[layout]
    data = np.moveaxis(arr, -1, 0) if kw.get("planarconfig") == "separate" else arr
    tifffile.imwrite(tmp_path / "s.tif", data, photometric="rgb", extrasamples=[0], **kw)
    r = open_raster(tmp_path / "s.tif", bands=[4, 2, 1])
    assert (r.width, r.height, r.bands) == (70, 100, 4)
    for x0, y0, x1, y1 in [(0, 0, 70, 100), (5, 33, 64, 99), (31, 31, 33, 33), (69, 99, 70, 100)]:
        assert (r.read(x0, y0, x1, y1) == arr[y0:y1, x0:x1][..., [3, 1, 0]]).all(), (x0, y0, x1, y1)
    one = open_raster(tmp_path / "s.tif", bands=[2])
    assert (one.read(3, 4, 20, 30) == np.repeat(arr[4:30, 3:20, 1:2], 3, -1)).all()  # one band, repeated
    r.close()


def test_16bit_windows_are_scaled_between_percentiles_of_a_decimated_read(tmp_path: Path, reader: str,
                                                                           monkeypatch: pytest.MonkeyPatch):
    arr = (np.arange(200 * 150 * 3, dtype=np.uint32).reshape(200, 150, 3) % 4000 + 1000).astype(np.uint16)
    arr[..., 1] = 5000  # a flat band
    tifffile.imwrite(tmp_path / "s.tif", arr, photometric="rgb", tile=(64, 64), compression="zlib")
    monkeypatch.setattr(rasters, "SAMPLE_PIXELS", 2000)  # step 3: a decimated read, not every pixel
    r = open_raster(tmp_path / "s.tif", percentiles=(0, 100))
    lo, hi = r.scale[0]
    assert 1000 <= lo < 1100 and 4900 < hi <= 4999 and r.scale[1] == (5000.0, 5000.0)
    win = r.read(10, 10, 40, 20)
    expected = np.clip((arr[10:20, 10:40, 0].astype(np.float32) - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8)
    assert np.abs(win[..., 0].astype(int) - expected).max() <= 1 and (win[..., 1] == 0).all()


def test_declared_nodata_is_left_out_of_the_statistics_and_read_as_black(tmp_path: Path, reader: str):
    arr = np.full((64, 64, 3), 2000, np.uint16)
    arr[:, 32:] = 3000
    arr[:16] = 65535  # nodata, declared in GDAL_NODATA
    tifffile.imwrite(tmp_path / "s.tif", arr, photometric="rgb", tile=(32, 32), compression="zlib",
                     extratags=[(42113, "s", 0, "65535", False)])
    r = open_raster(tmp_path / "s.tif", percentiles=(0, 100))
    assert r.scale == [(2000.0, 3000.0)] * 3  # 65535 not taken as the top of the range
    win = r.read(0, 0, 64, 64)
    assert (win[:16] == 0).all() and (win[16:, :32] == 0).all() and (win[16:, 32:] == 255).all()


def _counting_decoder(reader: str, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Pixels decoded per call: GDAL is asked for (windowed or decimated reads), tifffile decodes (segments)."""
    counts: list[int] = []
    if reader == "gdal":
        import rasterio.io

        real = rasterio.io.DatasetReader.read

        def read(self, indexes=None, out=None, window=None, out_shape=None, **kw):
            h, w = (out_shape[-2:] if out_shape is not None else
                    (window.height, window.width) if window is not None else (self.height, self.width))
            counts.append(int(h * w))
            return real(self, indexes, out=out, window=window, out_shape=out_shape, **kw)

        monkeypatch.setattr(rasterio.io.DatasetReader, "read", read)
    else:
        real_decode = tifffile.TiffPage.decode.func

        def decode(page):
            inner = real_decode(page)

            def counted(data, index, **kw):
                out = inner(data, index, **kw)
                counts.append(int(np.prod(out[2][1:3])))
                return out
            return counted

        monkeypatch.setattr(tifffile.TiffPage, "decode", property(decode))
    return counts


def test_prediction_decodes_only_its_windows(tmp_path: Path, reader: str, tiny_checkpoint: Path,
                                              monkeypatch: pytest.MonkeyPatch):
    """Would fail if the scene were read whole: no single read covers it, the statistics decode each tile at most
    once, the windows at most twice their area (tiles straddling their edges), and the Python-side memory peak
    (numpy arrays are traced; GDAL's cache is bounded on its own) stays below half the decoded scene."""
    h, w = 960, 480
    arr = (_scene(h, w, 3, np.uint16) // 4).astype(np.uint16)  # 16-bit: the statistics read happens too
    tifffile.imwrite(tmp_path / "s.tif", arr, photometric="rgb", tile=(32, 32), compression="zlib")
    monkeypatch.setattr(rasters, "SAMPLE_PIXELS", 5000)
    monkeypatch.setattr(rasters, "CACHE_MIN", 64 << 10)  # a cache of a few tiles, far below the scene
    counts = _counting_decoder(reader, monkeypatch)
    pred = Predictor(tiny_checkpoint, torch.device("cpu"), slice_size=96, overlap=0.2, batch=2)
    tracemalloc.start()
    try:
        r = open_raster(tmp_path / "s.tif")
        statistics = sum(counts)
        wins = pred.windows(r)
        pred.predict(r)
        r.close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    area = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in wins)
    assert counts and max(counts) < h * w / 4, max(counts)
    assert 0 < statistics <= h * w and sum(counts) - statistics <= 2 * area, (statistics, sum(counts), area)
    assert peak < arr.nbytes / 2, (peak, arr.nbytes)


def test_a_window_outside_the_scene_is_one_line(tmp_path: Path, reader: str):
    tifffile.imwrite(tmp_path / "s.tif", _scene(40, 50, 3), photometric="rgb", tile=(16, 16), compression="zlib")
    r = open_raster(tmp_path / "s.tif")
    for window in [(-1, 0, 10, 10), (0, 0, 51, 40), (45, 30, 60, 50), (10, 10, 10, 20)]:
        with pytest.raises(KdcliError, match=r"s\.tif: window x .* is not inside the 50 x 40 scene"):
            r.read(*window)


def test_a_corrupt_tile_fails_in_one_line_and_writes_nothing(tmp_path: Path, reader: str, tiny_checkpoint: Path):
    tifffile.imwrite(tmp_path / "s.tif", _scene(128, 128, 3), photometric="rgb", tile=(32, 32), compression="zlib")
    page = tifffile.TiffFile(tmp_path / "s.tif").pages[0]
    offset, size = page.dataoffsets[10], page.databytecounts[10]
    with open(tmp_path / "s.tif", "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * size)  # not a deflate stream
    out = tmp_path / "pred"
    res = CliRunner().invoke(app, ["predict", str(tiny_checkpoint), str(tmp_path / "s.tif"), "--slice", "64",
                                   "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "s.tif: cannot read window" in " ".join(res.output.split()) and "Traceback" not in res.output
    assert not out.exists()


@pytest.mark.filterwarnings("ignore:Dataset has no geotransform")
def test_without_rasterio_a_jpeg_tiff_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    rasterio = pytest.importorskip("rasterio")
    with rasterio.open(tmp_path / "j.tif", "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8",
                       compress="jpeg", tiled=True, blockxsize=32, blockysize=32) as ds:
        ds.write(np.full((3, 64, 64), 100, np.uint8))
    assert open_raster(tmp_path / "j.tif").read(0, 0, 64, 64).mean() == pytest.approx(100, abs=2)
    monkeypatch.setattr(rasters, "optional_rasterio", lambda: None)
    with pytest.raises(KdcliError, match=r"j\.tif: JPEG compression needs GDAL") as e:
        open_raster(tmp_path / "j.tif")
    assert "kdcli[geo]" in str(e.value)


def test_png_is_decoded_whole_with_one_warning_when_big(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    arr = _scene(60, 80, 3)
    for name in ("a.png", "b.png"):
        Image.fromarray(arr).save(tmp_path / name)
    monkeypatch.setattr(rasters, "BIG_DECODE", 1000)
    monkeypatch.setattr(rasters, "_warned", set())
    for name in ("a.png", "b.png"):
        r = open_raster(tmp_path / name)
        assert (r.read(10, 20, 50, 60) == arr[20:60, 10:50]).all()
        assert (r.read_decimated(4) == arr[::4, ::4]).all()
        r.close()
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("warning:") == 1 and "a.png: PNG cannot be read by window" in err
