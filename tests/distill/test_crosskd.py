"""CrossKD against a direct computation of the reference's formulas (loops, `math`), a hand-checked class term,
where its gradient goes, and that the teacher's head stays frozen and out of every checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdcli.config.schema import DistillConfig, ModelConfig
from kdcli.distill.crosskd import CrossKD, kd_quality_focal
from kdcli.distill.distiller import Distiller
from kdcli.models.anchors import VARIANCES
from kdcli.models.detector import Detector
from kdcli.models.losses import DetectionLoss


def test_class_term_by_hand():
    """One anchor, two classes: cross logits (0.5, -1), teacher logits (2, -3). sigmoid(t) = (0.8807971,
    0.0474259), sigmoid(s) = (0.6224593, 0.2689414); BCE = softplus(s) - s sigmoid(t) = (0.5336785, 0.3606876);
    times |sigmoid(s) - sigmoid(t)| = (0.2583377, 0.2215156) gives (0.1378693, 0.0798979)."""
    out = kd_quality_focal(torch.tensor([0.5, -1.0]), torch.tensor([2.0, -3.0]), beta=1.0)
    assert out.tolist() == pytest.approx([0.1378693, 0.0798979], abs=1e-6)
    assert kd_quality_focal(torch.tensor([0.3]), torch.tensor([0.3]), 1.0).item() == 0.0


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _giou(a: list[float], b: list[float]) -> float:
    iw, ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0])), max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def _decode(d: list[float], anchor: list[float]) -> list[float]:
    aw, ah = anchor[2] - anchor[0], anchor[3] - anchor[1]
    x, y = anchor[0] + aw / 2 + d[0] * VARIANCES[0] * aw, anchor[1] + ah / 2 + d[1] * VARIANCES[0] * ah
    w, h = aw * math.exp(d[2] * VARIANCES[1]), ah * math.exp(d[3] * VARIANCES[1])
    return [x - w / 2, y - h / 2, x + w / 2, y + h / 2]


def _direct(student: Detector, teacher: Detector, images: torch.Tensor, tap: int) -> tuple[float, float]:
    """The reference's recipe written out: the student's towers after `tap` blocks, per channel standardised and
    given the teacher's std and mean, activated, through the teacher's remaining blocks and output convs; then
    the class and box terms over every anchor with the teacher's max score as weight and normaliser."""
    fs, ft = student.features(images), teacher.features(images)
    cross_cls, cross_box = [], []
    for s_head, t_head, f_s, f_t in zip(student.head.levels, teacher.head.levels, fs, ft):
        outs = []
        for s_tower, t_tower in ((s_head.cls_tower, t_head.cls_tower), (s_head.box_tower, t_head.box_tower)):
            s, t = s_tower[:tap](f_s), t_tower[:tap](f_t)
            x = torch.empty_like(s)
            for c in range(s.shape[1]):
                sv, tv = s[:, c], t[:, c]
                x[:, c] = (sv - sv.mean()) / (sv.std() + 1e-6) * (tv.std() + 1e-6) + tv.mean()
            outs.append(t_tower[tap:](F.leaky_relu(x, 0.1)))
        cross_cls.append(t_head.cls_out(outs[0]))
        cross_box.append(t_head.box_out(outs[1]))
    cls_s, box_s = teacher.head.flatten(cross_cls, cross_box)
    t_out = teacher(images)
    anchors = t_out.anchors.tolist()
    cls_sum = box_sum = norm = 0.0
    for b in range(cls_s.shape[0]):
        for a in range(cls_s.shape[1]):
            t_logits = t_out.cls_logits[b, a].tolist()
            w = _sig(max(t_logits))
            norm += w
            for k, t in enumerate(t_logits):
                s = cls_s[b, a, k].item()
                pt, ps = _sig(t), _sig(s)
                bce = -(pt * math.log(ps) + (1 - pt) * math.log(1 - ps))
                cls_sum += bce * abs(ps - pt)
            giou = _giou(_decode(box_s[b, a].tolist(), anchors[a]), _decode(t_out.box_deltas[b, a].tolist(),
                                                                           anchors[a]))
            box_sum += w * (1 - giou)
    norm = max(norm, 1.0)
    return cls_sum / norm, box_sum / norm


def _pair(seed: int = 0, gn: bool = True):
    torch.manual_seed(seed)
    norm = "gn" if gn else "bn"
    teacher = Detector(ModelConfig(channels=16, backbone="resnet18", neck="pafpn", norm=norm), 2, 32, 8).eval()
    student = Detector(ModelConfig(channels=16, norm=norm), 2, 32, 8)
    with torch.no_grad():  # output convs far from their prior init, so scores and boxes vary from anchor to anchor
        for level in teacher.head.levels:
            level.cls_out.weight.normal_(0, 0.3)
            level.box_out.weight.normal_(0, 0.3)
    return teacher, student


@pytest.mark.parametrize("gn", [True, False])
def test_loss_equals_the_direct_formula(gn: bool):
    teacher, student = _pair(gn=gn)
    images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    d = Distiller(DistillConfig(method="crosskd"), teacher, 16)
    assert d.tap == 1 and d.teacher_head  # the last of the 2 head blocks: the reference's 3 of 4
    student.eval()  # BatchNorm in eval in both computations, so they see the same statistics
    terms = d.loss(student(images, tap=d.tap), {"images": images})
    with torch.no_grad():
        cls, box = _direct(student, teacher, images, tap=1)
    assert terms["crosskd_cls"].item() == pytest.approx(cls, rel=1e-4)
    assert terms["crosskd_box"].item() == pytest.approx(box, rel=1e-4)


def test_gradient_reaches_the_student_before_the_crossing_and_the_teacher_stays_frozen():
    teacher, student = _pair(1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = Distiller(DistillConfig(labels="hard", method="crosskd"), teacher, 16)
    images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    out = student(images, tap=d.tap)
    sum(d.loss(out, {"images": images}).values()).backward()
    head = student.head.levels[0]
    assert head.cls_tower[0][0].weight.grad.abs().sum() > 0 and head.box_tower[0][0].weight.grad.abs().sum() > 0
    assert student.backbone.stem[0].weight.grad.abs().sum() > 0  # through the neck into the trunk
    # the student's blocks after the crossing and its output convs learn from the ground truth only
    assert head.cls_tower[1][0].weight.grad is None and head.cls_out.weight.grad is None
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    # steps of the whole loss (hard + crosskd) change the student, never the teacher; its head is not saved
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    boxes, labels = [torch.tensor([[4.0, 4, 20, 20]])] * 2, [torch.tensor([1])] * 2
    for _ in range(2):
        opt.zero_grad()
        d.student_loss(student, DetectionLoss(student.cfg, 2), {"images": images, "boxes": boxes,
                                                                "labels": labels})["total"].backward()
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert d.state_dict() == {} and not d.trainable()


def test_width_mismatch_gets_learnable_1x1_convs_kept_in_the_distiller_state():
    teacher, _ = _pair()
    student = Detector(ModelConfig(channels=8, norm="gn"), 2, 32, 8)
    d = Distiller(DistillConfig(method="crosskd"), teacher, 8)
    assert d.trainable() and all(k.startswith("methods.0.widths.") for k in d.state_dict())
    images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    terms = d.loss(student(images, tap=d.tap), {"images": images})
    assert all(torch.isfinite(v) for v in terms.values())


def test_tap_is_checked_and_combinations_read_at_load():
    from kdcli.config.schema import StudyConfig
    from kdcli.errors import KdcliError

    teacher, _ = _pair()
    with pytest.raises(KdcliError, match="crosskd.tap=3: the head has 2 blocks"):
        Distiller(DistillConfig(method="crosskd", crosskd={"tap": 3}), teacher, 16)
    assert DistillConfig(method="crosskd, pkd").method == "crosskd,pkd"
    assert StudyConfig.labels_method("hard+crosskd+pkd") == ("hard", "crosskd,pkd")
    with pytest.raises(ValueError, match="unknown distillation method 'crosskdd'.*did you mean 'crosskd'"):
        DistillConfig(method="crosskdd,pkd")
    with pytest.raises(ValueError, match="names a method twice"):
        DistillConfig(method="pkd,pkd")
    both = Distiller(DistillConfig(method="crosskd,pkd"), teacher, 16)
    assert both.active_methods == ["crosskd", "pkd"]
    assert CrossKD.adapter == "none"
