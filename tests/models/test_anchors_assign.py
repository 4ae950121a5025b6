"""Anchors per level, box coding, and both assigners on constructed cases."""

from __future__ import annotations

import math

import pytest
import torch

from kdcli.config.schema import ModelConfig
from kdcli.models.anchors import decode, encode, level_shapes, make_anchors
from kdcli.models.assign import Targets, assign_iou, assign_mg
from kdcli.models.detector import Detector


def test_anchor_counts_shapes_and_first_anchor():
    strides = [8, 16, 32, 64]
    shapes = level_shapes(128, 96, strides)
    assert shapes == [(16, 12), (8, 6), (4, 3), (2, 2)]
    a = make_anchors(shapes, strides, base=16)
    assert a.shape == (6 * (16 * 12 + 8 * 6 + 4 * 3 + 2 * 2), 4)
    first = a[:6]
    assert torch.allclose((first[:, :2] + first[:, 2:]) / 2, torch.tensor([4.0, 4.0]).expand(6, 2))
    w, h = first[:, 2] - first[:, 0], first[:, 3] - first[:, 1]
    r2 = math.sqrt(2)
    assert torch.allclose(w, torch.tensor([16, 16 * r2, 16 / r2, 16 * r2, 32, 16]), atol=1e-4)
    assert torch.allclose(w * h, torch.tensor([256.0, 256, 256, 512, 512, 512]), atol=1e-3)
    level1 = a[6 * 16 * 12: 6 * 16 * 12 + 6]
    assert (level1[0, 2] - level1[0, 0]).item() == pytest.approx(32)  # s_1 = base * 2
    assert ((level1[0, :2] + level1[0, 2:]) / 2).tolist() == [8.0, 8.0]


def test_detector_output_matches_anchor_layout():
    for imgsz, levels in ((128, 4), (512, 5)):
        model = Detector(ModelConfig(channels=8), 2, imgsz, 16)
        assert len(model.strides) == levels
    model = Detector(ModelConfig(channels=8), 2, 128, 16).eval()
    out = model(torch.zeros(1, 3, 128, 128))
    assert out.cls_logits.shape == (1, out.anchors.shape[0], 2) and out.box_deltas.shape == (1, out.anchors.shape[0], 4)
    assert [tuple(f.shape[-2:]) for f in out.features] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert sum(out.level_sizes) == out.anchors.shape[0]
    feats_only = model(torch.zeros(1, 3, 128, 128), head=False)
    assert feats_only.cls_logits is None and len(feats_only.features) == 4


def test_encode_decode_round_trip_and_variances():
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0], [10.0, 10.0, 42.0, 26.0]])
    boxes = torch.tensor([[1.0, 2.0, 17.0, 20.0], [5.0, 12.0, 40.0, 30.0]])
    assert torch.allclose(decode(encode(boxes, anchors), anchors), boxes, atol=1e-4)
    d = encode(torch.tensor([[1.6, 0.0, 17.6, 16.0]]), anchors[:1])
    assert d[0, 0].item() == pytest.approx(1.0)  # 1.6 px shift / (16 px * 0.1)
    assert d[0, 2].item() == pytest.approx(0.0)


def _one(boxes, labels):
    return Targets.from_lists([torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)],
                              [torch.as_tensor(labels, dtype=torch.long)], torch.device("cpu"))


def test_iou_assigner_forces_best_anchor_and_respects_ignore_band():
    anchors = torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10], [0, 20, 10, 30], [100, 100, 110, 110]])
    gt = [[22.0, 0, 34, 10]]  # IoU with anchor 1 = 8*10/(10*10+12*10-80) = 0.5714
    a = assign_iou(anchors, anchors[None].clone(), _one(gt, [2]), 3, pos_iou=0.6, neg_iou=0.4)
    assert a.box_pos[0].tolist() == [False, True, False, False]  # below 0.6 but the GT's best: forced
    assert a.cls_target[0, 1].tolist() == [0, 0, 1] and a.cls_target[0, [0, 2, 3]].sum() == 0  # binary (reference)
    assert a.num_pos.item() == 1 and a.box_weight[0].tolist() == [0, 1, 0, 0]
    a = assign_iou(anchors, anchors[None].clone(), _one([[21.0, 0, 31, 10], [0, 22, 10, 32]], [0, 1]), 3,
                   pos_iou=0.85, neg_iou=0.4)
    # anchor 1: IoU 0.818 with GT 0 -> ignore band, but it is GT 0's best -> forced positive;
    assert a.box_pos[0, 1] and a.box_pos[0, 2]
    anchors2 = torch.cat([anchors, torch.tensor([[20.0, 0, 31, 10]])])  # IoU 0.909 with GT 0: the best
    a = assign_iou(anchors2, anchors2[None].clone(), _one([[21.0, 0, 31, 10]], [0]), 3, pos_iou=0.95, neg_iou=0.4)
    assert a.box_pos[0].tolist() == [False, False, False, False, True]
    # anchor 1 (IoU 0.818) is ignored for its own class only (the reference masks its label entry)
    assert a.cls_valid[0, :, 0].tolist() == [True, False, True, True, True] and a.cls_valid[0, :, 1:].all()


def test_mg_hand_case_classification_and_regression_positives_differ():
    """One GT, three anchors; topk 1 so that each quality picks exactly one anchor.
    anchor 0 sits on the GT but predicts a box far off; anchor 1 sits beside it but predicts the GT exactly.
    q_loc (IoU of the predicted box): a0 0, a1 1, a2 0            -> classification positive: a1, target 1.
    q_cls (IoU of the anchor x exp(p/2)): a0 1*e^(0.5/2) -> 1 (clamped), a1 (1/3)e^(0.5/2) = 0.428, a2 0
                                                                  -> regression positive: a0, weight 1."""
    anchors = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10], [50, 50, 60, 60]])
    preds = torch.tensor([[[30.0, 30, 40, 40], [0, 0, 10, 10], [50, 50, 60, 60]]])
    logits = torch.zeros(1, 3, 2)  # p = 0.5 everywhere
    a = assign_mg(anchors, preds, logits, _one([[0.0, 0, 10, 10]], [1]), 2, sigma=2.0, topk=1)
    assert a.cls_target[0, :, 1].tolist() == [0.0, 1.0, 0.0] and a.cls_target[0, :, 0].sum() == 0
    assert a.box_pos[0].tolist() == [True, False, False]
    assert a.box_weight[0].tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert a.num_pos.item() == 1 and a.cls_valid.all()
    assert torch.equal(a.box_gt[0, 0], torch.tensor([0.0, 0, 10, 10]))


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Direct IoU matrix [len(a), len(b)], written out for the reference assigners below."""
    out = torch.zeros(len(a), len(b))
    for i, x in enumerate(a.tolist()):
        for j, y in enumerate(b.tolist()):
            iw = max(0.0, min(x[2], y[2]) - max(x[0], y[0]))
            ih = max(0.0, min(x[3], y[3]) - max(x[1], y[1]))
            inter = iw * ih
            union = (x[2] - x[0]) * (x[3] - x[1]) + (y[2] - y[0]) * (y[3] - y[1]) - inter
            out[i, j] = inter / max(union, 1e-9)
    return out


def _reference_pick(q: torch.Tensor, topk: int) -> torch.Tensor:
    """methods.md, one GT at a time: keep anchors where this GT's q is the highest, take its top k."""
    q = q.clone()
    q[q != q.max(0, keepdim=True).values] = 0.0
    for row in q:
        k = max(1, int(row.topk(min(topk, len(row))).values.sum()))
        k = min(k, int((row > 0).sum()))
        row[row.topk(k).indices] += 3.0
    return q


def _reference_mg(anchors, preds, logits, gt, labels, k_classes, sigma=2.0, topk=15):
    """Mutual Guidance for one image, straight from methods.md."""
    a = len(anchors)
    target, box_w, box_gt = torch.zeros(a, k_classes), torch.zeros(a), torch.zeros(a, 4)
    if len(gt) == 0:
        return target, box_w, box_gt
    q_loc = _iou(gt, preds)
    p_gt = torch.sigmoid(logits).t()[labels]
    q_cls = (_iou(gt, anchors) * torch.exp(p_gt / sigma)).clamp(max=1)
    val, idx = _reference_pick(q_loc, topk).max(0)
    for j in range(a):
        if val[j] >= 3:
            target[j, labels[idx[j]]] = val[j] - 3
    val, idx = _reference_pick(q_cls, topk).max(0)
    for j in range(a):
        if val[j] >= 3:
            box_w[j], box_gt[j] = val[j] - 3, gt[idx[j]]
    return target, box_w, box_gt


def _reference_iou(anchors, preds, gt, labels, k_classes, pos_iou=0.5, neg_iou=0.4):
    a = len(anchors)
    target, pos = torch.zeros(a, k_classes), torch.zeros(a, dtype=torch.bool)
    valid = torch.ones(a, k_classes, dtype=torch.bool)
    if len(gt) == 0:
        return target, pos, valid
    iou = _iou(gt, anchors)
    best, best_gt = iou.max(0)
    for m in range(len(gt)):  # forced: the later GT wins a shared best anchor
        j = int(iou[m].argmax())
        best[j], best_gt[j] = 1.0, m
    pos = best >= pos_iou
    for j in range(a):
        if pos[j]:
            target[j, labels[best_gt[j]]] = 1.0
        elif best[j] >= neg_iou:  # ignored: only its own class entry leaves the loss
            valid[j, labels[best_gt[j]]] = False
    return target, pos, valid


def _random_batch(seed: int, counts: list[int], k_classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    anchors = make_anchors(level_shapes(64, 64, [8, 16]), [8, 16], base=12)
    a = len(anchors)
    preds = anchors[None] + torch.randn(len(counts), a, 4, generator=g) * 3
    preds = torch.cat([torch.minimum(preds[..., :2], preds[..., 2:] - 1), preds[..., 2:]], -1)
    logits = torch.randn(len(counts), a, k_classes, generator=g)
    boxes, labels = [], []
    for n in counts:
        xy = torch.rand(n, 2, generator=g) * 50
        wh = 4 + torch.rand(n, 2, generator=g) * 20
        boxes.append(torch.cat([xy, xy + wh], 1))
        labels.append(torch.randint(0, k_classes, (n,), generator=g))
    return anchors, preds, logits, boxes, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_assigners_equal_per_image_reference(seed: int):
    counts = [3, 0, 7, 1]
    anchors, preds, logits, boxes, labels = _random_batch(seed, counts)
    gt = Targets.from_lists(boxes, labels, torch.device("cpu"))
    mg = assign_mg(anchors, preds, logits, gt, 3, sigma=2.0, topk=15)
    iou = assign_iou(anchors, preds, gt, 3, pos_iou=0.5, neg_iou=0.4)
    n_cls = 0
    for i in range(len(counts)):
        t, w, bgt = _reference_mg(anchors, preds[i], logits[i], boxes[i], labels[i], 3)
        assert torch.allclose(mg.cls_target[i], t, atol=1e-5)
        assert torch.allclose(mg.box_weight[i], w, atol=1e-5)
        assert torch.equal(mg.box_pos[i], w > 0)
        assert torch.allclose(mg.box_gt[i][w > 0], bgt[w > 0])
        n_cls += int((t > 0).any(1).sum())
        t2, pos2, valid2 = _reference_iou(anchors, preds[i], boxes[i], labels[i], 3)
        assert torch.equal(iou.box_pos[i], pos2) and torch.equal(iou.cls_valid[i], valid2)
        assert torch.allclose(iou.cls_target[i], t2, atol=1e-5)
    assert mg.num_pos.item() == n_cls
    assert mg.box_pos[1].sum() == 0 and mg.cls_target[1].sum() == 0  # the image without GT
    # cut into chunks of one image (as for a batch too large for memory): the same result
    import kdcli.models.assign as assign_mod

    old = assign_mod.MAX_PAIRS
    try:
        assign_mod.MAX_PAIRS = 1
        chunked = assign_mg(anchors, preds, logits, gt, 3)
    finally:
        assign_mod.MAX_PAIRS = old
    assert torch.equal(chunked.cls_target, mg.cls_target) and torch.equal(chunked.box_weight, mg.box_weight)


def test_assigners_on_a_batch_without_any_gt():
    anchors, preds, logits, _, _ = _random_batch(0, [0, 0])
    gt = Targets.from_lists([torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.long)] * 2, torch.device("cpu"))
    for a in (assign_mg(anchors, preds, logits, gt, 3), assign_iou(anchors, preds, gt, 3)):
        assert a.cls_target.shape == (2, len(anchors), 3) and a.cls_target.sum() == 0
        assert not a.box_pos.any() and a.num_pos.item() == 0 and a.cls_valid.all()


def test_groupnorm_option_makes_neck_and_head_independent_of_the_batch():
    from torch import nn

    cfg = ModelConfig(channels=32, norm="gn", neck="pafpn")
    model = Detector(cfg, 2, 128, 16).train()
    ours = [model.cem, model.levels, model.neck, model.head]
    assert not any(isinstance(m, nn.BatchNorm2d) for part in ours for m in part.modules())
    assert model.cem.glb[1].num_groups == 1 and model.head.levels[0].cls_tower[0][1].num_groups == 32
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())  # the trunk keeps torchvision's
    torch.manual_seed(0)
    a, b = torch.randn(1, 32, 16, 16), torch.randn(1, 32, 16, 16) * 5 + 3
    alone = model.head(model.neck(model.levels(a)))
    together = model.head(model.neck(model.levels(torch.cat([a, b]))))
    assert torch.allclose(alone[0][0], together[0][0], atol=1e-5)  # train mode, yet no batch statistics
    bn = Detector(ModelConfig(channels=32), 2, 128, 16).train()
    x = bn.head(bn.neck(bn.levels(a.expand(2, -1, -1, -1).contiguous())))[0][0]
    y = bn.head(bn.neck(bn.levels(torch.cat([a, b]))))[0][0]
    assert not torch.allclose(x, y, atol=1e-3)  # with BatchNorm the other image changes this one's output
