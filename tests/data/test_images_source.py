"""`kdcli prepare images` changes nothing silently: its own --out inside --src is left out on a rerun, non-8-bit
images are stretched with the stretch said and recorded, a 2-band image needs --bands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile
import yaml
from PIL import Image
from typer.testing import CliRunner

from kdcli.cli.app import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), terminal_width=400)


def test_a_rerun_with_force_leaves_its_own_output_inside_src_out(tmp_path: Path):
    src = tmp_path / "flights"
    src.mkdir()
    for i in range(3):
        Image.new("RGB", (48, 48), (i * 40, 90, 90)).save(src / f"{i}.png")
    out = src / "pool"
    for extra in ([], ["--force"], ["--force", "--copy"]):
        r = run("prepare", "images", "--src", str(src), "--out", str(out), *extra)
        assert r.exit_code == 0, r.output
        images = json.loads((out / "annotations" / "unlabeled.json").read_text())["images"]
        assert sorted(im["file_name"] for im in images) == [f"images/{i}.png" for i in range(3)]
    flat = " ".join(r.output.split())
    assert f"note: {out} left out of the inputs: it is this command's output (--out)" in flat
    assert yaml.safe_load((out / "dataset.yaml").read_text())["left_out"] == [f"{out} (this command's output)"]
    # a leftover of a killed earlier build beside it is left out too
    (src / ".pool.999999.abc.partial" / "images").mkdir(parents=True)
    Image.new("RGB", (48, 48)).save(src / ".pool.999999.abc.partial" / "images" / "x.png")
    r = run("prepare", "images", "--src", str(src), "--out", str(out), "--force")
    assert r.exit_code == 0, r.output
    assert len(json.loads((out / "annotations" / "unlabeled.json").read_text())["images"]) == 3


def test_a_16_bit_stretch_is_said_and_recorded(tmp_path: Path):
    src = tmp_path / "scenes"
    src.mkdir()
    band = np.arange(40 * 40, dtype=np.uint16).reshape(40, 40)  # 0..1599: percentiles 2 and 98 are 31.98, 1567.02
    tifffile.imwrite(src / "s.tif", np.stack([band, band * 2, band], -1), photometric="rgb")
    Image.new("RGB", (40, 40)).save(src / "plain.png")
    r = run("prepare", "images", "--src", str(src), "--out", str(tmp_path / "pool"))
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    assert "note: 1 of 2 source images are not 8-bit (uint16: 1): stretched to 8 bit per image and band, linear " \
           "from percentile 2 to percentile 98" in flat
    meta = yaml.safe_load((tmp_path / "pool" / "dataset.yaml").read_text())
    assert meta["stretch"]["images"] == 1 and meta["stretch"]["dtypes"] == {"uint16": 1}
    assert "percentile 2 to percentile 98" in meta["stretch"]["rule"]
    images = {im["file_name"]: im for im in
              json.loads((tmp_path / "pool" / "annotations" / "unlabeled.json").read_text())["images"]}
    stretch = images["images/s_0_0.png"]["stretch"]
    assert stretch["dtype"] == "uint16"
    np.testing.assert_allclose(stretch["bands"], [[31.98, 1567.02], [63.96, 3134.04], [31.98, 1567.02]], rtol=1e-3)
    assert "stretch" not in images["images/plain.png"]


def test_a_two_band_image_needs_bands(tmp_path: Path):
    src = tmp_path / "two"
    src.mkdir()
    tifffile.imwrite(src / "b.tif", np.full((2, 40, 40), 7, np.uint8), photometric="minisblack",
                     planarconfig="separate")
    r = run("prepare", "images", "--src", str(src), "--out", str(tmp_path / "pool"))
    assert r.exit_code == 2, r.output
    assert "b.tif: has 2 bands; without --bands only band 1 would be used" in " ".join(r.output.split())
    assert not (tmp_path / "pool").exists()
    r = run("prepare", "images", "--src", str(src), "--bands", "2", "--out", str(tmp_path / "pool"))
    assert r.exit_code == 0, r.output
    assert yaml.safe_load((tmp_path / "pool" / "dataset.yaml").read_text())["band_selection"] == [2]
