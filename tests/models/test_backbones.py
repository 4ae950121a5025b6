"""Edge students (MobileNetV3-Large/Small, EfficientNet-B0) as entries of the BACKBONES table: the teacher's strides
with and without the max-pool setting, the table's widths, GroupNorm, ImageNet weights through the same loader as
the ResNets, a training step, a distillation step from a ResNet teacher, and `kdcli info model`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

from kdcli.cli.app import app
from kdcli.config.schema import DistillConfig, ModelConfig
from kdcli.distill.distiller import Distiller
from kdcli.errors import KdcliError
from kdcli.models import backbones
from kdcli.models.backbones import BACKBONES, build_trunk
from kdcli.models.detector import Detector
from kdcli.models.losses import DetectionLoss

EDGE = ["mobilenet_v3_large", "mobilenet_v3_small", "efficientnet_b0"]
WIDTHS = {"mobilenet_v3_large": (112, 960), "mobilenet_v3_small": (48, 576), "efficientnet_b0": (112, 1280)}


def _images(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randint(0, 255, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", EDGE)
@pytest.mark.parametrize("maxpool", [False, True])
def test_edge_trunks_keep_the_resnet_strides_and_the_table_widths(name: str, maxpool: bool):
    trunk = build_trunk(name, maxpool=maxpool).eval()
    resnet = build_trunk("resnet18", maxpool=maxpool)
    c4, c5 = trunk(torch.zeros(1, 3, 64, 64))
    assert trunk.out_channels == BACKBONES[name].channels == WIDTHS[name] == (c4.shape[1], c5.shape[1])
    assert trunk.strides == resnet.strides == ((16, 32) if maxpool else (8, 16))
    assert (64 // c4.shape[-1], 64 // c5.shape[-1]) == trunk.strides
    # the whole ImageNet network is kept: every `features` block but the classifier
    net = getattr(torchvision.models, name)()
    assert sum(p.numel() for p in trunk.parameters()) == sum(p.numel() for p in net.features.parameters())


@pytest.mark.parametrize("name", EDGE)
def test_group_norm_replaces_every_batch_norm_and_refuses_imagenet_weights(name: str):
    trunk = build_trunk(name, norm="gn")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in trunk.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in trunk.modules())
    c4, _ = trunk.train()(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(c4).all()
    with pytest.raises(KdcliError, match="backbone_norm=gn trains the backbone from scratch"):
        build_trunk(name, pretrained=True, norm="gn")


def test_imagenet_weights_load_through_the_table(tmp_path: Path, monkeypatch):
    net = torchvision.models.mobilenet_v3_small()
    nn.init.constant_(net.features[0][0].weight, 0.5)
    torch.save(net.state_dict(), tmp_path / "mbv3s.pth")  # classifier included, as torchvision's file
    model = Detector(ModelConfig(backbone="mobilenet_v3_small", channels=8, pretrained=str(tmp_path / "mbv3s.pth")),
                     2, 64, 16)
    assert torch.all(model.backbone.c4[0][0].weight == 0.5)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(KdcliError, match="not mobilenet_v3_small weights"):
        Detector(ModelConfig(backbone="mobilenet_v3_small", channels=8, pretrained=str(tmp_path / "r18.pth")), 2, 64,
                 16)
    for name in EDGE:  # torchvision's files, with the hash prefix torch.hub checks
        url = backbones.weights_url(name)
        assert url.endswith(".pth") and torch.hub.HASH_REGEX.search(backbones.weights_file(name).name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(KdcliError, match="ImageNet weights for efficientnet_b0 not found at .*efficientnet_b0"):
        Detector(ModelConfig(backbone="efficientnet_b0", channels=8, pretrained=True), 2, 64, 16)


@pytest.mark.parametrize("name", EDGE)
def test_an_edge_student_trains_one_step_and_distils_one_step_from_a_resnet_teacher(name: str):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=name, channels=16)
    student = Detector(cfg, 3, 64, 16).train()
    teacher = Detector(ModelConfig(backbone="resnet18", channels=32, neck="pafpn"), 3, 64, 16)
    images = _images()
    boxes = [torch.tensor([[8.0, 8.0, 30.0, 26.0]]), torch.tensor([[20.0, 30.0, 44.0, 50.0]])]
    labels = [torch.tensor([0]), torch.tensor([2])]
    distiller = Distiller(DistillConfig(labels="hard+soft", method="pdf"), teacher, cfg.channels)
    distiller.train()
    opt = torch.optim.SGD([p for m in [student, *distiller.trainable()] for p in m.parameters()], lr=0.01)
    before = student.backbone.c4[0][0].weight.detach().clone()
    out = student(images)
    assert out.strides == teacher(images).strides == [8, 16, 32, 64]
    terms = DetectionLoss(cfg, 3)(out, boxes, labels)
    kd = distiller.loss(out, {"images": images, "boxes": boxes, "labels": labels})
    assert {"soft_cls", "soft_box", "pdf"} <= set(kd)
    total = terms["total"] + sum(kd.values())
    assert torch.isfinite(total)
    total.backward()
    opt.step()
    assert not torch.equal(before, student.backbone.c4[0][0].weight)
    assert all(p.grad is None for p in teacher.parameters())


def test_a_mobile_student_distils_from_the_cli(tiny_checkpoint: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    r = CliRunner().invoke(app, ["distill", "--teacher", str(tiny_checkpoint), "--method", "pdf",
                                 "model.backbone=mobilenet_v3_large", "train.epochs=1", "train.max_batches=1",
                                 "distill.teacher_min_map=0", "--json"], terminal_width=200)
    assert r.exit_code == 0, r.output
    run_dir = Path(json.loads(r.output.strip().splitlines()[-1])["run_dir"])
    from kdcli.engine import checkpoint

    best = checkpoint.load(run_dir / "weights" / "best.pt")
    assert best.model.config["backbone"] == "mobilenet_v3_large" and best.distill["method"] == "pdf"
    model = checkpoint.model_from_checkpoint(best)
    assert model.strides == checkpoint.model_from_checkpoint(checkpoint.load(tiny_checkpoint)).strides


def test_info_model_gives_parameters_and_flops_of_each_edge_student():
    rows = {}
    for name in ["resnet18", *EDGE]:
        r = CliRunner().invoke(app, ["info", "model", "models/student_r18_fpn", f"model.backbone={name}",
                                     "model.channels=16", "--imgsz", "64", "--json"])
        assert r.exit_code == 0, r.output
        (row,) = json.loads(r.output)["models"]
        assert row["backbone"] == name and row["gflops"] > 0
        assert row["params"]["total"] == sum(v for k, v in row["params"].items() if k != "total")
        rows[name] = row
    assert rows["mobilenet_v3_small"]["params"]["backbone"] < rows["mobilenet_v3_large"]["params"]["backbone"] < \
        rows["efficientnet_b0"]["params"]["backbone"] < rows["resnet18"]["params"]["backbone"]
    assert rows["mobilenet_v3_large"]["gflops"] < rows["resnet18"]["gflops"]
    assert rows["mobilenet_v3_large"]["levels"][0]["stride"] == 8
    r = CliRunner().invoke(app, ["info", "model", "models/student_r18_fpn", "model.backbone=mobilenet_v4"])
    assert r.exit_code == 2 and "unknown backbone 'mobilenet_v4'" in r.output
