"""`kdcli export`: ONNX (NMS outside and inside, FP32 and FP16) and TorchScript match PyTorch on real images,
take any batch size, carry their metadata, and a parity failure is loud."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kdcli.cli.app import app
from kdcli.deploy.export import Raw, parity_inputs
from kdcli.engine import checkpoint

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _export(tmp_path: Path, weights: Path, *args: str) -> dict:
    res = CliRunner().invoke(app, ["export", str(weights), "--json", *args])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_onnx_parity_dynamic_batch_and_metadata(tmp_path: Path, tiny_checkpoint: Path):
    out = tmp_path / "m.onnx"
    res = _export(tmp_path, tiny_checkpoint, "--format", "onnx", "--out", str(out))
    assert res["max_abs_diff"] <= 1e-3 and res["inputs"] >= 1 and res["inputs_from"].endswith("fold01_val")
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    ckpt = checkpoint.load(tiny_checkpoint)
    assert json.loads(meta["kdcli_classes"]) == ckpt.model.classes
    assert meta["kdcli_imgsz"] == str(ckpt.model.imgsz) and "normalised inside" in meta["kdcli_input"]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model = checkpoint.model_from_checkpoint(ckpt, str(tiny_checkpoint)).eval()
    raw = Raw(model, ckpt.model.imgsz).eval()
    x = parity_inputs(ckpt, 3)[0].float()
    for n in (1, 3):  # batch sizes other than the export's
        boxes, scores = sess.run(None, {"images": x[:n].numpy()})
        with torch.no_grad():
            ref_boxes, ref_scores = raw(x[:n])
        assert scores.shape == tuple(ref_scores.shape) and np.abs(scores - ref_scores.numpy()).max() < 1e-3
        assert np.abs(boxes - ref_boxes.numpy()).max() < 1e-2


@pytest.mark.parametrize("args", [["--nms"], ["--half"], ["--format", "torchscript"],
                                  ["--format", "torchscript", "--half"]])
def test_other_variants_pass_parity(tmp_path: Path, tiny_checkpoint: Path, args: list[str]):
    suffix = ".torchscript" if "torchscript" in args else ".onnx"
    res = _export(tmp_path, tiny_checkpoint, *args, "--out", str(tmp_path / f"m{suffix}"))
    assert res["max_abs_diff"] <= res["tolerance"] and Path(res["file"]).stat().st_size > 10_000
    if "--nms" in args:
        sess = ort.InferenceSession(res["file"], providers=["CPUExecutionProvider"])
        x = parity_inputs(checkpoint.load(tiny_checkpoint), 2)[0].float().numpy()
        (det,) = sess.run(None, {"images": x})
        assert det.ndim == 2 and det.shape[1] == 7 and set(np.unique(det[:, 0])) <= {0.0, 1.0}


def test_parity_failure_is_loud(tmp_path: Path, tiny_checkpoint: Path):
    res = CliRunner().invoke(app, ["export", str(tiny_checkpoint), "--half", "--tolerance", "1e-9",
                                   "--out", str(tmp_path / "m.onnx")])
    assert res.exit_code == 1 and "parity check failed" in res.output
    res = CliRunner().invoke(app, ["export", str(tiny_checkpoint), "--format", "tflite"])
    assert res.exit_code == 2 and "use onnx or torchscript" in res.output


def test_parity_says_when_it_fell_back_to_random_pixels(tmp_path: Path, tiny_checkpoint: Path):
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    ckpt["data"]["path"] = str(tmp_path / "moved-away")
    torch.save(ckpt, tmp_path / "best.pt")
    res = CliRunner().invoke(app, ["export", str(tmp_path / "best.pt"), "--format", "torchscript"],
                             terminal_width=200)
    flat = " ".join(res.output.split())
    assert res.exit_code == 0 and "real images" not in flat, res.output
    assert f"parity on 2 images (random pixels: the dataset {tmp_path / 'moved-away'} is not readable here)" in flat


@pytest.mark.slow
@pytest.mark.parametrize("nms", [False, True])
def test_predict_runs_the_onnx_model_like_the_checkpoint(tmp_path: Path, overfit_run: tuple[Path, dict], nms: bool):
    weights = overfit_run[0] / "weights" / "best.pt"
    onnx_file = tmp_path / "m.onnx"
    _export(tmp_path, weights, "--out", str(onnx_file), *(["--nms"] if nms else []))
    ckpt = checkpoint.load(weights)
    split = json.loads((Path(ckpt.data.path) / "annotations" / "fold01_test.json").read_text())
    image = Path(ckpt.data.path) / split["images"][0]["file_name"]
    got = {}
    for name, model in (("pt", weights), ("onnx", onnx_file)):
        res = CliRunner().invoke(app, ["predict", str(model), str(image), "--conf", "0.05", "--out",
                                       str(tmp_path / name), "--no-draw"])
        assert res.exit_code == 0, res.output
        got[name] = sorted(json.loads((tmp_path / name / "predictions.json").read_text()), key=lambda r: -r["score"])
        got[name] = [r for r in got[name] if r["score"] >= 0.1]  # away from --conf: a score within 1e-3 may flip
    assert len(got["pt"]) == len(got["onnx"]) > 0
    for a, b in zip(got["pt"][:20], got["onnx"][:20]):
        assert a["score"] == pytest.approx(b["score"], abs=1e-3) and np.allclose(a["bbox"], b["bbox"], atol=0.05)
