"""`kdcli prepare` and `kdcli data` end to end through the CLI, including the user's own example verbatim."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from kdcli.cli.app import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), terminal_width=200)


def test_users_example_verbatim_with_default_folders(datasets_env: Path, vedai_raw: Path):
    shutil.copytree(vedai_raw, datasets_env / "raw" / "VEDAI")
    (datasets_env / "raw" / "VEDAI" / "KDCLI_SYNTHETIC").unlink()  # look like a real download
    r = run("prepare", "vedai", "--res", "25")
    assert r.exit_code == 0, r.output
    out = datasets_env / "vedai25"
    assert len(list((out / "annotations").glob("fold*_test.json"))) == 10
    assert "dataset written" in r.output and "merged into other" in r.output
    r = run("prepare", "vedai", "--res", "25")
    assert r.exit_code == 2 and "already exists" in r.output and "--force" in r.output
    assert run("prepare", "vedai", "--res", "25", "--force").exit_code == 0


def test_synthetic_then_prepare_each_kind(datasets_env: Path):
    r = run("prepare", "synthetic", "--kind", "vedai", "--images", "20", "--size", "64")
    assert r.exit_code == 0, r.output
    raw = datasets_env / "raw" / "synthetic-vedai"
    assert (raw / "Vehicules512" / "00000000_co.png").is_file()
    assert (raw / "Annotations1024" / "fold10test.txt").is_file()
    for res in ("25", "12"):
        r = run("prepare", "vedai", "--src", str(raw), "--res", res, "--classes", "vedai9")
        assert r.exit_code == 0, r.output
        meta = (datasets_env / f"synthetic-vedai{res}" / "dataset.yaml").read_text()
        assert "plane" in meta
    assert run("data", "check", "synthetic-vedai25").exit_code == 0
    r = run("data", "stats", "synthetic-vedai12", "--json")
    stats = json.loads(r.output)
    assert r.exit_code == 0 and stats["splits"]["fold01_test"]["images"] >= 1
    assert run("data", "stats", "synthetic-vedai25").exit_code == 0

    assert run("prepare", "synthetic", "--kind", "xview", "--images", "2", "--size", "300").exit_code == 0
    r = run("prepare", "xview", "--src", str(datasets_env / "raw" / "synthetic-xview"), "--tile", "128",
            "--val-fraction", "0.5")
    assert r.exit_code == 0, r.output
    assert run("data", "check", str(datasets_env / "synthetic-xview")).exit_code == 0

    assert run("prepare", "synthetic", "--kind", "voc", "--images", "9", "--size", "96").exit_code == 0
    r = run("prepare", "voc", "--src", str(datasets_env / "raw" / "synthetic-voc"))
    assert r.exit_code == 0, r.output
    assert run("data", "check", "synthetic-voc").exit_code == 0


def test_synthetic_is_deterministic(tmp_path: Path):
    for name in ("a", "b"):
        assert run("prepare", "synthetic", "--kind", "vedai", "--images", "3", "--size", "64", "--seed", "5",
                   "--out", str(tmp_path / name)).exit_code == 0
    for f in ("Vehicules512/00000001_co.png", "Annotations1024/00000002.txt", "Annotations512/fold03.txt"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_prepare_coco_and_check_failure_exit_code(tmp_path: Path, vedai25: Path):
    d = tmp_path / "copy"
    shutil.copytree(vedai25, d, symlinks=True)
    p = d / "annotations" / "fold01_test.json"
    data = json.loads(p.read_text())
    data["annotations"][0]["bbox"] = [-50, 0, 10, 10]
    p.write_text(json.dumps(data))
    r = run("data", "check", str(d))
    assert r.exit_code == 1 and "lies outside" in r.output and "1 problem(s) found" in r.output
    r = run("prepare", "coco", "--src", str(vedai25 / "annotations" / "fold01_train.json"), "--images",
            str(vedai25), "--out", str(tmp_path / "c"))
    assert r.exit_code == 0, r.output
    assert run("data", "check", str(tmp_path / "c")).exit_code == 0


def test_missing_dataset_dir(tmp_path: Path):
    r = run("data", "check", str(tmp_path / "nope"))
    assert r.exit_code == 2 and "dataset dir not found" in r.output


def test_recipe_show_and_keys(tmp_path: Path):
    r = run("recipe", "show", "data/vedai25", "fold=4", "--save", str(tmp_path / "r.yaml"))
    assert r.exit_code == 0 and "fold: 4" in r.output and "fold: 4" in (tmp_path / "r.yaml").read_text()
    r = run("recipe", "show", "data/vedai25", "fodl=4")
    assert r.exit_code == 2 and "did you mean 'fold'" in r.output
    r = run("recipe", "keys")
    assert r.exit_code == 0 and "data.anchor_size" in r.output
