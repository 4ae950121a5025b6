"""Sources are plug-ins: the registry drives `kdcli prepare <source>`, its options, default folders and the
synthetic kinds; a new source is one module registering a `Source`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from typer.testing import CliRunner

from kdcli.cli.prepare import source_command
from kdcli.data import synthetic
from kdcli.data.sources import FORCE, LINK, Option, Source, discover


def test_the_registry_holds_every_source_with_its_raw_folder():
    sources = discover()
    assert {"vedai", "xview", "voc", "coco", "yolo", "dota"} <= set(sources)
    assert {n: sources[n].raw_dir for n in ("vedai", "xview", "voc")} == {"vedai": "VEDAI", "xview": "xView",
                                                                        "voc": "VOCdevkit"}
    assert sources["coco"].raw_dir is None  # --src is required
    assert {"vedai", "xview", "voc", "yolo", "dota"} <= set(synthetic.kinds()) and "coco" not in synthetic.kinds()


def test_a_new_source_is_one_registry_entry(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KDCLI_DATASETS", str(tmp_path / "datasets"))
    calls: list[tuple[Path, Path, dict[str, Any]]] = []

    def run(src: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        calls.append((src, out, options))
        return {"classes": ["car"], "images": 0}

    fake = Source(name="fake", title="A fake source.", example="kdcli prepare fake", raw_dir="FakeRaw", run=run,
                  out_name=lambda src, o: f"fake{o['tile']}",
                  options=(Option("tile", int, 256, "Tile side."), Option("ratio", float, 0.5, "A ratio."),
                           Option("names", Path, None, "A file.", required=True), LINK, FORCE))
    app = typer.Typer()
    app.command("fake")(source_command(fake))
    app.command("other")(lambda: None)  # a group, as `kdcli prepare` is
    runner = CliRunner()
    r = runner.invoke(app, ["fake", "--tile", "128", "--copy", "--names", "n.txt"])
    assert r.exit_code == 0, r.output
    src, out, options = calls[-1]
    assert src == tmp_path / "datasets" / "raw" / "FakeRaw" and out == tmp_path / "datasets" / "fake128"
    assert options == {"tile": 128, "ratio": 0.5, "names": Path("n.txt"), "link": False, "force": False}
    r = runner.invoke(app, ["fake", "--tile", "x", "--names", "n.txt"])
    assert r.exit_code == 2 and "--tile" in r.output
    r = runner.invoke(app, ["fake"])
    assert r.exit_code == 2 and "--names" in r.output  # required
    r = runner.invoke(app, ["fake", "--help"])
    assert "A fake source." in r.output and "kdcli prepare fake" in r.output and "Tile side." in r.output
