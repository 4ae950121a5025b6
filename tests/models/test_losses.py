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


def test_iou_class_loss_with_its_ignore_mask_qfl_by_default_focal_on_request():
    """Every p = 0.5. a0 on the GT (class 0): positive, binary target; a1 far: negative; a2 IoU 100/220 = 0.45,
    in the ignore band: only its class-0 entry leaves the loss, so 5 of the 6 entries remain, 0.5^2 x ln 2 each,
    / 1 positive, x 2 (qfl, the default). Focal: each element x alpha_t, 0.25 for t = 1, 0.75 for t = 0:
    (0.0625 + 0.1875 | 2 x 0.1875 | 0.1875) ln 2, / 1 positive, x 2."""
    from kdcli.models.detector import DetectorOutput

    anchors = torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 22]])
    out = DetectorOutput([], anchors, [8], torch.zeros(1, 3, 2), torch.zeros(1, 3, 4))
    gt, labels = [torch.tensor([[0.0, 0, 10, 10]])], [torch.tensor([0])]
    assert ModelConfig().cls_loss == "qfl"
    qfl = DetectionLoss(ModelConfig(assigner="iou"), 2)(out, gt, labels)
    assert qfl["cls"].item() == pytest.approx(2 * 5 * 0.25 * math.log(2), rel=1e-5)
    focal = DetectionLoss(ModelConfig(assigner="iou", cls_loss="focal"), 2)(out, gt, labels)
    assert focal["cls"].item() == pytest.approx(2 * 0.8125 * math.log(2), rel=1e-5)


def _reference_iou_class_loss(logits: torch.Tensor, label: torch.Tensor, ignored: torch.Tensor, form: str,
                              gamma: float, weight: float, alpha: float = 0.25) -> float:
    """The reference's class loss on iou targets, written out: one-hot labels per anchor (label -1: background),
    an ignored anchor's own label entry left out; gfc: |t - p|^gamma x BCE; fc: alpha_t x |t - p|^gamma x BCE;
    summed over the entries kept, / the number of target-1 entries, x weight. In float64, by the formula."""
    x = logits.double()
    p = 1 / (1 + torch.exp(-x))
    t = torch.zeros_like(x)
    keep = torch.ones_like(x, dtype=torch.bool)
    for i, (c, ign) in enumerate(zip(label.tolist(), ignored.tolist())):
        if c >= 0 and not ign:
            t[i, c] = 1.0
        if c >= 0 and ign:
            keep[i, c] = False
    bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
    elem = (t - p).abs() ** gamma * bce
    if form == "fc":
        elem = elem * (alpha * t + (1 - alpha) * (1 - t))
    return weight * elem[keep].sum().item() / (t[keep] == 1).sum().item()


@pytest.mark.parametrize("cls_loss, gamma, weight", [("qfl", 2.0, 2.0), ("focal", 2.0, 2.0), ("focal", 1.0, 1.0)])
def test_iou_class_loss_equals_the_references_forms_on_random_logits(cls_loss: str, gamma: float, weight: float):
    """Two GTs of classes 0 and 2; six anchors: two positives of GT0 (IoU 1 and 100/120), one of GT1 (IoU 1), two in
    the ignore band (IoU 100/220 with GT0 and GT1), one negative; random logits over 3 classes. qfl = the reference's
    `gfc` (gamma 2, weight 2); focal = its `fc` (the reference's own gamma 1 and weight 1, and kdcli's 2 and 2)."""
    from kdcli.models.detector import DetectorOutput

    anchors = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 12], [0, 0, 10, 22], [100, 100, 110, 110],
                            [50, 50, 60, 60], [50, 50, 60, 72]])
    logits = torch.randn(1, 6, 3, generator=torch.Generator().manual_seed(0)) * 2
    out = DetectorOutput([], anchors, [8], logits, torch.zeros(1, 6, 4))
    gt, labels = [torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60]])], [torch.tensor([0, 2])]
    cfg = ModelConfig(assigner="iou", cls_loss=cls_loss, qfl_beta=gamma, cls_weight=weight)
    got = DetectionLoss(cfg, 3)(out, gt, labels)["cls"].item()
    label, ignored = torch.tensor([0, 0, 0, -1, 2, 2]), torch.tensor([False, False, True, False, False, True])
    want = _reference_iou_class_loss(logits[0], label, ignored, "gfc" if cls_loss == "qfl" else "fc", gamma, weight)
    assert got == pytest.approx(want, rel=1e-5)
    other = _reference_iou_class_loss(logits[0], label, ignored, "fc" if cls_loss == "qfl" else "gfc", gamma, weight)
    assert got != pytest.approx(other, rel=1e-3)  # the two forms really differ on this batch


def test_focal_on_mg_uses_binary_targets():
    """cls_loss focal with mg: the quality targets become 1 on the classification positives (the reference's `fc`
    under mutual guidance), so the loss equals QFL on those binary targets times the alpha balance."""
    from kdcli.models.detector import DetectorOutput

    anchors = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10], [50, 50, 60, 60]])
    # a1 predicts (10/3, 0, 40/3, 10): IoU 0.5 with the GT, its quality target; a0 predicts far away
    deltas = torch.tensor([[[30.0, 30, 0, 0], [-5 / 3, 0, 0, 0], [0, 0, 0, 0]]])
    out = DetectorOutput([], anchors, [8], torch.zeros(1, 3, 2), deltas)
    gt, labels = [torch.tensor([[0.0, 0, 10, 10]])], [torch.tensor([1])]
    # qfl: a1's class-1 entry has t = 0.5 = p (no loss); the 5 other entries t = 0: 0.5^2 ln 2 each; / 1, x 2
    qfl = DetectionLoss(ModelConfig(mg_topk=1), 2)(out, gt, labels)
    assert qfl["cls"].item() == pytest.approx(2 * 5 * 0.25 * math.log(2), rel=1e-4)
    # focal: that entry becomes t = 1 (alpha 0.25), the others keep t = 0 (alpha 0.75); each 0.5^2 ln 2
    focal = DetectionLoss(ModelConfig(mg_topk=1, cls_loss="focal"), 2)(out, gt, labels)
    assert focal["cls"].item() == pytest.approx(2 * (0.25 + 5 * 0.75) * 0.25 * math.log(2), rel=1e-5)
