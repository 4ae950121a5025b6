"""Losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from kdcli.config.schema import ModelConfig
from kdcli.models.detector import Detector
from kdcli.models.losses import DetectionLoss, balanced_l1, quality_focal_loss


def test_qfl_hand_values():
    logits = torch.tensor([0.0, 0.0, 0.0, math.log(3)])  # p = 0.5, 0.5, 0.5, 0.75
    target = torch.tensor([1.0, 0.0, 0.5, 0.75])
    got = quality_focal_loss(logits, target, beta=2.0)
    ln2 = math.log(2)
    assert got[0].item() == pytest.approx(0.25 * ln2, abs=1e-6)
    assert got[1].item() == pytest.approx(0.25 * ln2, abs=1e-6)
    assert got[2].item() == pytest.approx(0.0, abs=1e-7)
    assert got[3].item() == pytest.approx(0.0, abs=1e-7)
    # beta = 0 is plain BCE: target 1, p = 0.75 -> -ln 0.75
    assert quality_focal_loss(torch.tensor([math.log(3)]), torch.tensor([1.0]), beta=0)[0].item() == pytest.approx(
        -math.log(0.75), abs=1e-6)


def test_balanced_l1_hand_values_and_continuity():
    b = math.e ** 3 - 1  # gamma / alpha = 3
    assert balanced_l1(torch.tensor([0.0]), torch.tensor([0.0]))[0].item() == 0.0
    big = balanced_l1(torch.tensor([1.0]), torch.tensor([0.0]))[0].item()
    assert big == pytest.approx(1.5 * 1 + 1.5 / b - 0.5 * 0.11, abs=1e-6)
    small = balanced_l1(torch.tensor([0.05]), torch.tensor([0.0]))[0].item()
    assert small == pytest.approx(0.5 / b * (b * 0.05 + 1) * math.log(b * 0.05 / 0.11 + 1) - 0.5 * 0.05, abs=1e-7)
    below = balanced_l1(torch.tensor([0.11 - 1e-6]), torch.tensor([0.0]))[0].item()
    above = balanced_l1(torch.tensor([0.11 + 1e-6]), torch.tensor([0.0]))[0].item()
    assert below == pytest.approx(above, abs=1e-5)
    assert balanced_l1(torch.tensor([-1.0]), torch.tensor([0.0]))[0].item() == pytest.approx(big)


@pytest.mark.parametrize("assigner", ["mg", "iou"])
def test_detection_loss_finite_on_empty_images_and_backprops(assigner: str):
    torch.manual_seed(0)
    cfg = ModelConfig(channels=16, assigner=assigner)
    model = Detector(cfg, 3, 64, 16)
    out = model(torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8))
    loss = DetectionLoss(cfg, 3)
    empty = loss(out, [torch.zeros(0, 4), torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)] * 2)
    assert torch.isfinite(empty["total"]) and empty["box"].item() == 0.0
    terms = loss(out, [torch.tensor([[10.0, 12.0, 30.0, 22.0]]), torch.zeros(0, 4)],
                 [torch.tensor([1]), torch.zeros(0, dtype=torch.long)])
    assert set(terms) == {"cls", "box", "total"} and terms["box"].item() > 0
    terms["total"].backward()
    grad = model.head.levels[0].cls_out.weight.grad
    assert grad is not None and torch.isfinite(grad).all()


def test_detection_loss_mg_hand_case_reductions():
    """The hand case of test_anchors_assign (classification positive a1, regression positive a0), through the
    loss: QFL summed over classes, / 1 positive, x 2; Balanced L1 averaged over the 4 coordinates of a0."""
    from kdcli.models.detector import DetectorOutput

    anchors = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10], [50, 50, 60, 60]])
    deltas = torch.tensor([[[30.0, 30, 0, 0], [-5, 0, 0, 0], [0, 0, 0, 0]]])  # a0 -> (30,30,40,40), a1 -> GT
    out = DetectorOutput([], anchors, [8], torch.zeros(1, 3, 2), deltas)
    terms = DetectionLoss(ModelConfig(mg_topk=1), 2)(out, [torch.tensor([[0.0, 0, 10, 10]])], [torch.tensor([1])])
    ln2, b = math.log(2), math.e ** 3 - 1
    assert terms["cls"].item() == pytest.approx(2 * 6 * 0.25 * ln2, rel=1e-5)  # every p = 0.5: |t-p|^2 = 0.25
    bl1_30 = 1.5 * 30 + 1.5 / b - 0.5 * 0.11
    assert terms["box"].item() == pytest.approx(2 * bl1_30 / 4, rel=1e-5)


def test_detection_loss_iou_mean_over_positives_and_coordinates():
    from kdcli.models.detector import DetectorOutput

    anchors = torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10], [50, 50, 60, 60]])
    deltas = torch.zeros(1, 3, 4)
    deltas[0, 0, 0] = 1.0  # a0 off by 1 in x; a1 exact
    out = DetectorOutput([], anchors, [8], torch.zeros(1, 3, 1), deltas)
    gt = [torch.tensor([[0.0, 0, 10, 10], [20.0, 0, 30, 10]])]
    terms = DetectionLoss(ModelConfig(assigner="iou", box_weight=1.0), 1)(out, gt, [torch.tensor([0, 0])])
    b = math.e ** 3 - 1
    assert terms["box"].item() == pytest.approx((1.5 + 1.5 / b - 0.055) / 8, rel=1e-5)  # 2 positives x 4


def test_iou_class_loss_is_the_references_focal_loss_with_its_ignore_mask():
    """Every p = 0.5. a0 on the GT (class 0): positive, binary target; a1 far: negative; a2 IoU 100/220 = 0.45,
    in the ignore band: only its class-0 entry leaves the loss. Focal element: alpha_t x 0.5^2 x ln 2 with
    alpha_t 0.25 for t = 1, 0.75 for t = 0. Sum = (0.0625 + 0.1875 | 2 x 0.1875 | 0.1875) ln 2, / 1 positive, x 2."""
    from kdcli.models.detector import DetectorOutput

    anchors = torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 22]])
    out = DetectorOutput([], anchors, [8], torch.zeros(1, 3, 2), torch.zeros(1, 3, 4))
    terms = DetectionLoss(ModelConfig(assigner="iou"), 2)(out, [torch.tensor([[0.0, 0, 10, 10]])],
                                                          [torch.tensor([0])])
    assert terms["cls"].item() == pytest.approx(2 * 0.8125 * math.log(2), rel=1e-5)
