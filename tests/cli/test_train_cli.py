"""`kdcli train`, `kdcli val`, `kdcli info model` and `kdcli benchmark` through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from kdcli.cli.app import app
from kdcli.engine import detfile
from tests.conftest import tiny_recipe

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), terminal_width=200)


def test_train_then_resume_refusals(tmp_path: Path, vedai25: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(vedai25, train={"epochs": 1}).model_dump(mode="json")))
    r = run("train", str(recipe), "seed=1", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    run_dir = Path(summary["run_dir"])
    assert run_dir == tmp_path / "runs" / "train" / "tiny" and summary["epochs"] == 1
    assert yaml.safe_load((run_dir / "args.yaml").read_text())["seed"] == 1
    r = run("train", "--resume", str(run_dir / "weights" / "last.pt"), "train.lr=0.1")
    assert r.exit_code == 2 and "cannot change on resume" in r.output
    r = run("train", "--resume", str(run_dir / "weights" / "best.pt"))
    assert r.exit_code == 2 and "best.pt cannot resume" in r.output
    r = run("train", "--resume", str(run_dir / "weights" / "last.pt"), "train.epochs=2")
    assert r.exit_code == 0, r.output
    assert len((run_dir / "results.csv").read_text().splitlines()) == 3
    r = run("train", str(recipe), "model.backbone=resnet19")
    assert r.exit_code == 2 and "model.backbone" in r.output


def _offline(*args, **kwargs):
    import urllib.error

    raise urllib.error.URLError("no route to host (simulated)")


def test_train_pretrained_offline_is_a_clear_error(tmp_path: Path, vedai25: Path, monkeypatch):
    import torch.hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(torch.hub, "urlopen", _offline)  # tests never touch the network
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(vedai25, model={"pretrained": True}).model_dump(mode="json")))
    r = run("train", str(recipe))
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert "ImageNet weights for resnet18 not found at" in text and "the download failed" in text, text
    assert "resnet18-f37072fd.pth" in text and "model.pretrained=false" in text
    assert not list((tmp_path / "torch").rglob("*.pth"))


class _Response:
    """Stands for urlopen's answer: a body and its length."""

    def __init__(self, body: bytes):
        import io

        self.body, self.stream = body, io.BytesIO(body)

    def info(self):
        from email.message import Message

        headers = Message()
        headers["Content-Length"] = str(len(self.body))
        return headers

    def read(self, n: int = -1) -> bytes:
        return self.stream.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_pretrained_true_downloads_into_the_hub_cache_with_its_hash_checked(tmp_path: Path, monkeypatch):
    import hashlib
    import io

    import torch
    import torch.hub
    import torchvision

    from kdcli.config.schema import ModelConfig
    from kdcli.errors import KdcliError
    from kdcli.models import backbones
    from kdcli.models.detector import Detector

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    net = torchvision.models.resnet18(weights=None)
    torch.nn.init.constant_(net.conv1.weight, 0.25)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    body = buf.getvalue()
    digest = hashlib.sha256(body).hexdigest()[:8]
    requested = []
    monkeypatch.setattr(torch.hub, "urlopen", lambda req, *a, **k: requested.append(req.full_url) or _Response(body))
    # a download whose bytes do not match the hash in torchvision's file name is refused and not kept
    with pytest.raises(KdcliError, match="failed its hash check"):
        Detector(ModelConfig(channels=8, pretrained=True), 2, 64, 16)
    assert not list((tmp_path / "torch").rglob("*.pth"))
    # the same bytes under a name carrying their own hash: downloaded once, cached, loaded
    monkeypatch.setattr(backbones, "weights_url", lambda name: f"https://example.invalid/{name}-{digest}.pth")
    model = Detector(ModelConfig(channels=8, pretrained=True), 2, 64, 16)
    assert torch.all(model.backbone.stem[0].weight == 0.25)
    assert backbones.weights_file("resnet18").is_file() and len(requested) == 2
    Detector(ModelConfig(channels=8, pretrained=True), 2, 64, 16)
    assert len(requested) == 2  # the cached file is used, no new download


def test_a_backbone_is_one_entry_of_the_table(monkeypatch):
    from kdcli.config.schema import ModelConfig
    from kdcli.models import backbones
    from kdcli.models.detector import Detector

    with pytest.raises(ValueError, match="unknown backbone 'resnet19' \\(did you mean 'resnet18'"):
        ModelConfig(backbone="resnet19")
    monkeypatch.setitem(backbones.BACKBONES, "wide_resnet50_2",
                        backbones.Trunk("wide_resnet50_2", "Wide_ResNet50_2_Weights", (1024, 2048)))
    model = Detector(ModelConfig(backbone="wide_resnet50_2", channels=8), 2, 64, 16)
    assert model.backbone.out_channels == (1024, 2048) and model.eval()(torch_images()).cls_logits.shape[-1] == 2


def torch_images():
    import torch

    return torch.zeros(1, 3, 64, 64, dtype=torch.uint8)


def test_pretrained_from_local_file(tmp_path: Path):
    import torch
    import torchvision

    from kdcli.config.schema import ModelConfig
    from kdcli.models.detector import Detector

    net = torchvision.models.resnet18(weights=None)
    torch.nn.init.constant_(net.conv1.weight, 0.5)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    model = Detector(ModelConfig(channels=8, pretrained=str(tmp_path / "r18.pth")), 2, 64, 16)
    assert torch.all(model.backbone.stem[0].weight == 0.5)


def test_val_prints_table_json_and_files(tiny_checkpoint: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    r = run("val", str(tiny_checkpoint), "split=test", "coco_backend=kdcli", "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.output.strip().splitlines()[-1])
    assert 0 <= m["mAP50"] <= 1 and m["coco_backend"] == "kdcli" and m["split"] == "test" and m["fold"] == 1
    assert {"mAP0.1", "mAP0.25", "mAP0.75", "coco_AP50", "mAP50-95"} <= set(m)
    assert len(m["per_class"]) == 8
    lo, hi = m["mAP50_ci95"]
    assert 0 <= lo <= hi <= 1
    r = run("val", str(tiny_checkpoint), "split=val")
    assert r.exit_code == 0 and "mAP50" in r.output and "car" in r.output and "95 % interval over the" in r.output
    val_runs = sorted((tmp_path / "runs" / "val").iterdir())
    assert len(val_runs) == 2 and (val_runs[0] / "metrics.json").is_file()
    assert (val_runs[0] / "predictions.png").is_file()
    dets, _, ids, _ = detfile.load(val_runs[1] / "dets_val.npz")  # what paired comparisons read
    assert len(dets.scores) == json.loads((val_runs[1] / "metrics.json").read_text())["detections"] and ids
    assert json.loads((val_runs[1] / "metrics.json").read_text())["coco_backend"] == "pycocotools"
    r = run("val", str(tiny_checkpoint), "splt=val")
    assert r.exit_code == 2 and "did you mean 'split'" in r.output
    r = run("val", str(tmp_path / "nope.pt"))
    assert r.exit_code == 2 and "checkpoint not found" in r.output


def test_info_model_ratio_and_json():
    r = run("info", "model", "models/teacher_r50_pafpn", "models/student_r18_fpn", "--imgsz", "128", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    t, s = info["models"]
    assert t["params"]["total"] == sum(v for k, v in t["params"].items() if k != "total")
    assert 1.5 < info["param_ratio"] < 1.75  # the paper states 1.6
    assert len(t["levels"]) == 5 and t["levels"][0]["stride"] == 8  # 5 levels: the recipe size is 512
    assert t["gflops"] > s["gflops"] > 0


def test_benchmark_reduced_mode_writes_json(tmp_path: Path):
    r = run("benchmark", "--imgsz", "64", "--batch", "2", "--repeats", "1", "-m", "models/student_r18_fpn",
            "--eval-images", "10", "--save", str(tmp_path / "b.json"), "--json")
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "b.json").read_text())
    assert [row["model"] for row in data["rows"]] == ["resnet18+fpn", "torchvision retinanet_resnet50_fpn"]
    assert data["rows"][0]["ms_per_image"] > 0 and 0 <= data["rows"][0]["assign_loss_share"] <= 1
    inf = data["rows"][0]["inference"]
    assert inf["latency_b1"]["p10_ms"] <= inf["latency_b1"]["median_ms"] <= inf["latency_b1"]["p90_ms"]
    assert inf["throughput_img_s"] > 0 and data["rows"][0]["params_m"] > 1 and data["rows"][0]["gflops"] > 0
    e = data["evaluation"]
    assert e["images"] == 10 and e["kdcli_s"] > 0 and e["pycocotools_s"] > 0
    assert data["machine"]["threads"] >= 1 and data["imgsz"] == 64


def test_benchmark_checkpoints_take_their_image_size(tmp_path: Path, tiny_checkpoint: Path):
    r = run("benchmark", "--models", f"{tiny_checkpoint},{tiny_checkpoint}", "--batch", "2", "--repeats", "1",
            "--no-reference", "--no-eval", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["imgsz"] == 96 and len(data["rows"]) == 2 and data["rows"][0]["inference"]["imgsz"] == 96


def test_benchmark_distill_rows(tmp_path: Path):
    r = run("benchmark", "--imgsz", "64", "--batch", "2", "--repeats", "1", "--no-reference", "--no-eval",
            "--no-inference", "--distill", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output.strip().splitlines()[-1])["distill"]
    assert [row["row"] for row in d["rows"]] == ["hard", "hard+soft", "hard+mse", "hard+pdf", "hard+defeat",
                                                "hard+crosskd", "hard+cwd", "hard+fgd", "hard+pkd", "soft", "soft+mse",
                                                "soft+pdf", "soft+defeat", "soft+crosskd", "soft+cwd", "soft+fgd",
                                                "soft+pkd", "hard+soft@pool", "hard+pdf@pool"]
    assert d["rows"][0]["time_ratio"] == 1.0 and d["rows"][0]["flop_ratio"] == 1.0
    by_row = {row["row"]: row for row in d["rows"]}
    assert by_row["hard+mse"]["teacher"] == "backbone+neck" and by_row["hard+pdf"]["teacher"] == "full"
    assert by_row["hard+mse"]["flop_ratio"] < by_row["hard+pdf"]["flop_ratio"]
    assert by_row["hard+crosskd"]["teacher"] == "full"
    # each row's terms, each method's under its own name
    assert by_row["hard+pdf"]["terms"] == ["cls", "box", "pdf"] and by_row["soft+mse"]["terms"] == [
        "soft_cls", "soft_box", "mse"]
    assert by_row["hard+defeat"]["terms"] == ["cls", "box", "defeat_fg", "defeat_bg"]
    # a pooled step runs student and teacher on the batch and as many pool images
    assert by_row["hard+pdf@pool"]["images"] == 4 and by_row["hard+pdf@pool"]["flop_ratio"] == pytest.approx(
        2 * by_row["hard+pdf"]["flop_ratio"], abs=2e-3)
    assert 0 < d["truncation_saving"] < 1


def test_benchmark_real_epoch_next_to_the_step(vedai25: Path, tmp_path: Path):
    saved = tmp_path / "bench.json"
    r = run("benchmark", "--models", "models/student_r18_fpn", "--imgsz", "96", "--batch", "2", "--repeats", "1",
            "--no-reference", "--no-eval", "--no-inference", "--data", str(vedai25), "--workers", "0",
            "--epoch-batches", "3", "--save", str(saved))
    assert r.exit_code == 0, r.output
    assert "one real epoch" in r.output and "command" in r.output
    row = json.loads(saved.read_text())["rows"][0]
    e = row["epoch"]
    assert e["images"] == 6 and e["images_per_s"] > 0 and e["epoch_s"] > 0
    assert 0 < e["first_step_s"] < e["command_s"]  # measured inside the fresh `kdcli train` process
    assert e["step_ratio"] == pytest.approx(row["images_per_s"] / e["images_per_s"], rel=0.02)


def test_benchmark_formats_one_row_per_format_and_a_failing_format_is_a_row(tmp_path: Path, tiny_checkpoint: Path,
                                                                           monkeypatch):
    from kdcli.deploy import formats

    monkeypatch.setitem(formats.FORMATS, "onnx-int8-nocalib",
                        formats.Format(".onnx", {"fmt": "onnx", "int8": True, "calib": str(tmp_path / "none")}))
    saved = tmp_path / "formats.json"
    r = run("benchmark", "--formats", "torch,onnx,onnx-int8,onnx-int8-nocalib", "--model", str(tiny_checkpoint),
            "--split", "val", "--repeats", "3", "--workers", "0", "--save", str(saved))
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    assert "resnet18" in flat and "p90" in r.output and "onnx-int8-nocalib" in flat  # rich may wrap "p90 ms"
    data = json.loads(saved.read_text())
    (m,) = data["models"]
    rows = {row["format"]: row for row in m["rows"]}
    assert list(rows) == ["torch", "onnx", "onnx-int8", "onnx-int8-nocalib"] and m["split"] == "val"
    for name in ("torch", "onnx", "onnx-int8"):
        row = rows[name]
        assert "error" not in row, row
        assert row["size_mb"] > 0 and 0 <= row["mAP50"] <= 1 and row["images"] > 0
        assert 0 < row["latency_b1"]["median_ms"] <= row["latency_b1"]["p90_ms"] and row["speedup_vs_torch"] > 0
    assert rows["onnx"]["mAP50"] == pytest.approx(rows["torch"]["mAP50"], abs=1e-3)
    assert rows["onnx-int8"]["size_mb"] < 0.35 * rows["onnx"]["size_mb"] and rows["torch"]["speedup_vs_torch"] == 1
    p = rows["onnx-int8"]["parity"]
    assert p["passed"] == (p["checked_diff"] <= p["tolerance"] == 0.15) and p["max_abs_diff"] >= p["checked_diff"]
    assert "neither a folder nor a readable split" in rows["onnx-int8-nocalib"]["error"]
    assert m["params_m"] > 0 and m["imgsz"] == 96 and data["machine"]["threads"] >= 1
    threads = torch.get_num_threads()
    try:  # --threads: an edge device's core count, for PyTorch and ONNX Runtime alike
        r = run("benchmark", "--formats", "torch", "--model", str(tiny_checkpoint), "--split", "val", "--repeats",
                "2", "--workers", "0", "--threads", "1", "--json")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0 and [row["format"] for row in json.loads(r.stdout)["models"][0]["rows"]] == ["torch"]
    assert json.loads(r.stdout)["machine"]["threads"] == 1


@pytest.mark.parametrize("args,expected", [
    (["--formats", "torch,tflite", "--model", "x.pt"], "--formats torch,tflite: unknown format tflite"),
    (["--formats", "onnx", "--model", "models/student_r18_fpn"], "--formats measures trained models"),
    (["--formats", "onnx"], "--formats measures trained models"),
])
def test_benchmark_formats_bad_arguments(args: list[str], expected: str):
    r = run("benchmark", *args)
    assert r.exit_code == 2 and expected in " ".join(r.output.split()), r.output


def test_benchmark_help_lists_every_format(monkeypatch):
    from kdcli.deploy.formats import FORMATS

    monkeypatch.setenv("COLUMNS", "250")  # rich wraps at the terminal width (and may break at a hyphen)
    r = runner.invoke(app, ["benchmark", "--help"], terminal_width=250)
    flat = " ".join(r.output.replace("│", " ").split())
    assert r.exit_code == 0 and f"({', '.join(FORMATS)})" in flat
