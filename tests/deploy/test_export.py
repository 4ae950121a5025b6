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


# ---- INT8 -----------------------------------------------------------------------------------------------------------
def test_int8_export_is_smaller_runs_passes_parity_and_val_scores_it(tmp_path: Path, tiny_checkpoint: Path,
                                                                     monkeypatch):
    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    fp32 = _export(tmp_path, tiny_checkpoint, "--out", str(tmp_path / "m.onnx"))
    res = _export(tmp_path, tiny_checkpoint, "--int8", "--out", str(tmp_path / "m.int8.onnx"))
    q = res["quantization"]
    assert res["precision"] == "int8" and q["format"] == "QDQ" and q["weights"] == "int8 per channel"
    assert q["calibrated_on"].endswith("fold01_train") and res["inputs_from"].endswith("fold01_val")
    assert res["checked_diff"] <= res["tolerance"] == 0.15 and 0 <= res["agreement"] <= 1
    size = Path(res["file"]).stat().st_size
    assert size < 0.35 * Path(fp32["file"]).stat().st_size
    model = onnx.load(res["file"])
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["kdcli_precision"] == "int8" and json.loads(meta["kdcli_data"])["fold"] == 1
    sess = ort.InferenceSession(res["file"], providers=["CPUExecutionProvider"])
    x = parity_inputs(checkpoint.load(tiny_checkpoint), 3)[0].float().numpy()
    boxes, scores = sess.run(None, {"images": x})
    assert boxes.shape[0] == scores.shape[0] == 3 and np.isfinite(scores).all() and (scores >= 0).all()
    # `kdcli val` of the exported files: the checkpoint's dataset from their metadata, the same metrics
    got = {}
    for name in ("best.pt", "m.onnx", "m.int8.onnx"):
        path = tiny_checkpoint if name == "best.pt" else tmp_path / name
        r = CliRunner().invoke(app, ["val", str(path), "split=test", "coco_backend=kdcli", "--json"])
        assert r.exit_code == 0, r.output
        got[name] = json.loads(r.output.strip().splitlines()[-1])
    assert got["m.int8.onnx"]["split"] == "test" and got["m.int8.onnx"]["fold"] == 1
    assert got["m.int8.onnx"]["images"] == got["best.pt"]["images"] > 0 and 0 <= got["m.int8.onnx"]["mAP50"] <= 1
    assert got["m.onnx"]["mAP50"] == pytest.approx(got["best.pt"]["mAP50"], abs=1e-3)
    assert got["m.onnx"]["detections"] == pytest.approx(got["best.pt"]["detections"], rel=0.01)


def test_int8_calibration_from_a_folder_with_nms_inside(tmp_path: Path, tiny_checkpoint: Path):
    ckpt = checkpoint.load(tiny_checkpoint)
    split = json.loads((Path(ckpt.data.path) / "annotations" / "fold01_train.json").read_text())
    calib = tmp_path / "calib"
    calib.mkdir()
    for im in split["images"][:5]:
        (calib / Path(im["file_name"]).name).symlink_to(Path(ckpt.data.path) / im["file_name"])
    res = _export(tmp_path, tiny_checkpoint, "--int8", "--nms", "--calib", str(calib), "--calib-images", "3",
                  "--per-tensor", "--out", str(tmp_path / "m.onnx"))
    assert res["quantization"]["calibrated_on"] == f"3 images of {calib}"
    assert res["quantization"]["weights"] == "int8 per tensor" and res["max_anchor_score_diff"] is None
    sess = ort.InferenceSession(res["file"], providers=["CPUExecutionProvider"])
    (det,) = sess.run(None, {"images": parity_inputs(ckpt, 2)[0].float().numpy()})
    assert det.ndim == 2 and det.shape[1] == 7


def test_int8_says_groupnorm_stays_float(tmp_path: Path, tiny_checkpoint: Path):
    """GroupNorm cannot be folded into a convolution: an INT8 export of such a model counts its float GroupNorms
    and says what that costs; the BatchNorm checkpoint has none and no note."""
    from kdcli.config.schema import ModelConfig
    from kdcli.models.detector import build_detector

    raw = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    cfg = {**raw["model"]["config"], "norm": "gn", "backbone_norm": "gn", "pretrained": False}
    net = build_detector(ModelConfig(**cfg), len(raw["model"]["classes"]), raw["model"]["imgsz"],
                         raw["model"]["anchor_size"])
    expected = sum(isinstance(m, torch.nn.GroupNorm) for m in net.modules())
    gn = tmp_path / "gn.pt"
    torch.save({**raw, "model": {**raw["model"], "config": cfg}, "weights": net.state_dict()}, gn)
    runner = CliRunner()
    got = runner.invoke(app, ["export", str(gn), "--int8", "--tolerance", "1", "--json"])
    assert got.exit_code == 0, got.output
    assert expected > 20 and json.loads(got.stdout)["float_groupnorms"] == expected
    assert f"note: {expected} GroupNorm layers" in " ".join(got.stderr.split())
    bn = runner.invoke(app, ["export", str(tiny_checkpoint), "--int8", "--out", str(tmp_path / "bn.onnx"), "--json"])
    assert bn.exit_code == 0 and json.loads(bn.stdout)["float_groupnorms"] == 0 and "GroupNorm" not in bn.stderr


def test_int8_parity_compares_detections_object_by_object():
    from types import SimpleNamespace

    from kdcli.deploy.export import int8_parity

    ref = torch.tensor([[0, 10, 10, 30, 30, 0.9, 0], [0, 50, 50, 70, 70, 0.3, 1], [1, 0, 0, 5, 5, 0.08, 0]])
    new = np.array([[0, 11, 10, 30, 31, 0.85, 0], [0, 80, 80, 90, 90, 0.2, 0], [1, 0, 0, 5, 5, 0.06, 0]], np.float32)
    res = int8_parity(ref, [new], True, SimpleNamespace(conf=0.05), (96, 96))
    # by hand: PyTorch's 0.9 meets 0.85 (0.05); its 0.3 has no int8 twin (0.3 - conf 0.05 = 0.25); int8's 0.85
    # meets 0.9 (0.05), its 0.2 has no PyTorch twin (0.15); the 0.08 / 0.06 pair scores below min_score 0.1
    assert res["detections_compared"] == 4 and res["agreement"] == 0.5
    assert res["max_score_diff"] == pytest.approx(0.25, abs=1e-4)
    # the gate: 95th percentile of 0.05, 0.05, 0.15, 0.25 with linear interpolation: 0.15 + 0.85 x 0.10
    assert res["p95_score_diff"] == pytest.approx(0.235, abs=1e-4)
    assert res["mean_score_diff"] == pytest.approx((0.05 + 0.25 + 0.05 + 0.15) / 4, abs=1e-4)


def _no_files(folder: Path) -> bool:
    return not any(p.is_file() for p in folder.rglob("*"))


@pytest.mark.parametrize("case", ["empty", "four_bands", "two_bands", "one_band", "torchscript", "calib_without_int8",
                                  "split", "half"])
def test_int8_bad_inputs_are_one_line_and_write_nothing(case: str, tmp_path: Path, tiny_checkpoint: Path):
    import tifffile
    from PIL import Image

    calib, out_dir = tmp_path / "calib", tmp_path / "out"
    calib.mkdir()
    out_dir.mkdir()
    if case == "four_bands":
        Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(calib / "a.png")
        tifffile.imwrite(calib / "b.tif", np.zeros((4, 96, 96), np.uint8), photometric="minisblack",
                         planarconfig="separate")  # a 4-band (e.g. RGB + NIR) scene
    if case == "two_bands":  # read by default, band 2 would be dropped without a word (as prepare images/predict)
        tifffile.imwrite(calib / "b.tif", np.zeros((2, 96, 96), np.uint16), photometric="minisblack",
                         planarconfig="separate")
    if case == "one_band":
        Image.fromarray(np.zeros((96, 96), np.uint8)).save(calib / "gray.png")
    args, expected = {
        "empty": (["--int8", "--calib", str(calib)], f"--calib {calib}: no image in the folder"),
        "four_bands": (["--int8", "--calib", str(calib)], "b.tif has 4 band(s); the model takes 3 (rgb)"),
        "two_bands": (["--int8", "--calib", str(calib)], "b.tif has 2 band(s); the model takes 3 (rgb)"),
        "one_band": (["--int8", "--calib", str(calib)], "gray.png has 1 band(s); the model takes 3 (rgb)"),
        "torchscript": (["--int8", "--format", "torchscript"], "--int8 is ONNX Runtime's static quantization: "
                                                                "not available for torchscript"),
        "calib_without_int8": (["--calib", str(calib)], "--calib calibrates an INT8 export"),
        "split": (["--int8", "--calib", "nosuchsplit"], "--calib nosuchsplit: neither a folder nor a readable split"),
        "half": (["--int8", "--half"], "--int8 and --half: choose one precision"),
    }[case]
    r = CliRunner().invoke(app, ["export", str(tiny_checkpoint), *args, "--out", str(out_dir / "m.onnx")],
                           terminal_width=300)
    assert r.exit_code == 2, r.output
    assert expected in " ".join(r.output.split()) and "Traceback" not in r.output
    assert _no_files(out_dir)


def test_int8_leaves_shape_arithmetic_float(tmp_path: Path):
    """TF SAME padding (EfficientNet-Lite) computes its pads from the input's size in the graph: those nodes must
    never be quantized (they were: wrong pads, -32.5 mAP50). Every node feeding a Pad's pads is shape arithmetic;
    the convolutions are not."""
    import onnx
    from timm.layers import Conv2dSame

    from kdcli.deploy.export import _shape_arithmetic

    net = torch.nn.Sequential(Conv2dSame(3, 4, 3, stride=2), torch.nn.ReLU())
    path = tmp_path / "same.onnx"
    torch.onnx.export(net, torch.zeros(1, 3, 16, 16), str(path), input_names=["images"],
                      dynamic_axes={"images": {0: "batch"}}, opset_version=17, dynamo=False)
    graph = onnx.load(str(path)).graph
    shape = _shape_arithmetic(graph)
    producer = {o: n for n in graph.node for o in n.output}
    pad = next(n for n in graph.node if n.op_type == "Pad")
    feeding, todo = set(), [pad.input[1]]
    while todo:
        n = producer.get(todo.pop())
        if n is not None and n.name not in feeding:
            feeding.add(n.name)
            todo.extend(n.input)
    feeding -= {n.name for n in graph.node if n.op_type == "Constant"}
    assert feeding and feeding <= shape
    assert not any(n.op_type in ("Conv", "Pad", "Relu") and n.name in shape for n in graph.node)
