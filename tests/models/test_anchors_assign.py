"""Anchors per level, box coding, and both assigners on constructed cases."""

from __future__ import annotations

import math

import pytest
import torch

from kdcli.config.schema import ModelConfig
from kdcli.models.anchors import decode, encode, level_shapes, make_anchors
from kdcli.models.assign import _pick_topk, assign_iou, assign_mg
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


def test_iou_assigner_forces_best_anchor_and_respects_ignore_band():
    anchors = torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10], [0, 20, 10, 30], [100, 100, 110, 110]])
    gt = torch.tensor([[22.0, 0, 34, 10]])  # IoU with anchor 1 = 8*10/(10*10+12*10-80) = 0.5714
    a = assign_iou(anchors, anchors.clone(), gt, torch.tensor([2]), 3, pos_iou=0.6, neg_iou=0.4)
    assert a.box_pos.tolist() == [False, True, False, False]  # below 0.6 but the GT's best: forced
    assert a.cls_target[1, 2].item() == pytest.approx(80 / 140, abs=1e-4) and a.cls_target[1, :2].sum() == 0
    a = assign_iou(anchors, anchors.clone(), torch.tensor([[21.0, 0, 31, 10], [0, 22, 10, 32]]), torch.tensor([0, 1]),
                   3, pos_iou=0.85, neg_iou=0.4)
    # anchor 1: IoU 0.818 with GT 0 -> ignore band, but it is GT 0's best -> forced positive;
    assert a.box_pos[1] and a.box_pos[2]
    anchors2 = torch.cat([anchors, torch.tensor([[20.0, 0, 31, 10]])])  # IoU 0.909 with GT 0: the best
    a = assign_iou(anchors2, anchors2.clone(), torch.tensor([[21.0, 0, 31, 10]]), torch.tensor([0]), 3,
                   pos_iou=0.95, neg_iou=0.4)
    assert a.box_pos.tolist() == [False, False, False, False, True]
    assert a.cls_valid.tolist() == [True, False, True, True, True]  # anchor 1 (IoU 0.818) is ignored


def test_pick_topk_owner_and_dynamic_k():
    q = torch.tensor([[0.9, 0.8, 0.1, 0.0, 0.0], [0.95, 0.0, 0.0, 0.6, 0.5]])
    pos = _pick_topk(q, topk=15)
    # GT 0 owns anchors 1, 2 (anchor 0 belongs to GT 1): k = int(0.8 + 0.1) -> clamped to 1
    assert pos[0].tolist() == [False, True, False, False, False]
    # GT 1 owns anchors 0, 3, 4: k = int(0.95 + 0.6 + 0.5) = 2
    assert pos[1].tolist() == [True, False, False, True, False]
    assert not (pos[0] & pos[1]).any()


def test_mg_assigner_targets_are_prediction_ious_on_gt_class():
    anchors = torch.tensor([[0.0, 0, 10, 10], [2, 0, 12, 10], [50, 50, 60, 60]])
    preds = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]])
    logits = torch.full((3, 2), -4.0)
    gt = torch.tensor([[0.0, 0, 10, 10]])
    a = assign_mg(anchors, preds, logits, gt, torch.tensor([1]), 2, sigma=2.0, topk=15)
    assert a.cls_target[:, 0].sum() == 0
    assert a.cls_target[0, 1].item() == pytest.approx(1.0)
    assert a.box_pos[0] and not a.box_pos[2]
    assert a.box_weight[0] > 0 and a.box_weight[2] == 0
    assert torch.equal(a.box_gt[0], gt[0])
