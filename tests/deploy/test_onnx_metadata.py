"""An exported ONNX model whose kdcli metadata is missing or garbled: `kdcli val` and `kdcli predict` say which file
and which key in one line (exit 2), before any image runs, and write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from kdcli.cli.app import app

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "m.onnx"
    res = CliRunner().invoke(app, ["export", str(tiny_checkpoint), "--format", "onnx", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def _with_metadata(src: Path, dst: Path, key: str, value: str | None) -> Path:
    m = onnx.load(str(src))
    props = {p.key: p.value for p in m.metadata_props}
    if value is None:
        props.pop(key)
    else:
        props[key] = value
    del m.metadata_props[:]
    for k, v in props.items():
        entry = m.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(m, str(dst))
    return dst


@pytest.mark.parametrize("key, value, fragment", [
    ("kdcli_imgsz", "abc", "metadata kdcli_imgsz = 'abc' is not an image size"),
    ("kdcli_imgsz", None, "its kdcli metadata lacks kdcli_imgsz"),
    ("kdcli_imgsz", "0", "metadata kdcli_imgsz = '0' is not an image size"),
    ("kdcli_imgsz", "512", "metadata kdcli_imgsz = '512' is not the size of the graph's input (96x96)"),
    ("kdcli_postprocess", None, "its kdcli metadata lacks kdcli_postprocess"),
    ("kdcli_postprocess", '{"conf": ', "metadata kdcli_postprocess = '{\"conf\": ' is not a JSON object"),
    ("kdcli_postprocess", '{"conf": 7}', "is not valid postprocess settings (conf: Input should be less"),
    ("kdcli_postprocess", '[1]', "is not valid postprocess settings"),
    ("kdcli_classes", "[1, 2]", "metadata kdcli_classes = '[1, 2]' is not a JSON list of class names"),
    ("kdcli_classes", "car", "metadata kdcli_classes = 'car' is not a JSON list of class names"),
])
def test_garbled_metadata_is_one_line_naming_file_and_key(exported: Path, tmp_path: Path, key: str,
                                                          value: str | None, fragment: str):
    bad = _with_metadata(exported, tmp_path / "bad.onnx", key, value)
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    for args in (["val", str(bad)], ["predict", str(bad), str(tmp_path / "a.png"), "--out", str(tmp_path / "p")]):
        res = CliRunner().invoke(app, args, terminal_width=300)
        assert res.exit_code == 2, res.output
        assert "internal error" not in res.output and "Traceback" not in res.output, res.output
        errors = [x for x in res.output.splitlines() if x.startswith("error:")]
        assert len(errors) == 1 and "bad.onnx" in errors[0] and fragment in errors[0], res.output
    assert not (tmp_path / "p").exists()


def test_kdcli_data_garbled_is_named_by_val(exported: Path, tmp_path: Path):
    bad = _with_metadata(exported, tmp_path / "bad.onnx", "kdcli_data", json.dumps({"path": 3}))
    res = CliRunner().invoke(app, ["val", str(bad)], terminal_width=300)
    assert res.exit_code == 2 and "internal error" not in res.output, res.output
    assert "bad.onnx: metadata kdcli_data = '{\"path\": 3}' is not its dataset" in res.output


def test_class_names_that_do_not_fit_the_graph_are_named_by_predict(exported: Path, tmp_path: Path):
    bad = _with_metadata(exported, tmp_path / "bad.onnx", "kdcli_classes", '["car"]')
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    res = CliRunner().invoke(app, ["predict", str(bad), str(tmp_path / "a.png"), "--out", str(tmp_path / "p")],
                             terminal_width=300)
    assert res.exit_code == 2 and "internal error" not in res.output, res.output
    assert "metadata kdcli_classes = '[\"car\"]' is not the graph's classes (1 given" in res.output
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("option", [["--conf", "5"], ["--iou", "0"], ["--max-det", "0"]])
def test_postprocess_options_out_of_range_are_refused(exported: Path, tiny_checkpoint: Path, tmp_path: Path,
                                                      option: list[str]):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    for weights in (exported, tiny_checkpoint):
        res = CliRunner().invoke(app, ["predict", str(weights), str(tmp_path / "a.png"), "--out",
                                       str(tmp_path / "p"), *option], terminal_width=300)
        assert res.exit_code == 2 and f"error: {option[0]} " in res.output, res.output
