"""Distillation losses against direct formulas on tiny tensors; masks and weights on constructed cases."""

from __future__ import annotations

import math

import pytest
import torch

from kdcli.config.schema import DistillConfig
from kdcli.distill.adapters import Adapters
from kdcli.distill.defeat import DeFeat, decoupled_loss, defeat_masks
from kdcli.distill.mse import MSE
from kdcli.distill.pdf import PDF, disagreement_weights
from kdcli.distill.soft import Soft, soft_focal_bce
from kdcli.models.detector import DetectorOutput


def _identity_adapters(levels: int, c: int) -> Adapters:
    a = Adapters(levels, c, c, kernel=1)
    for conv in a.convs:
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
        with torch.no_grad():
            for i in range(c):
                conv.weight[i, i, 0, 0] = 1.0
    return a


def _out(feats, cls=None, box=None, strides=(8, 16)):
    return DetectorOutput(feats, torch.zeros(0, 4), list(strides), cls, box)


def test_soft_focal_bce_direct_formula():
    logit, t = torch.tensor([0.0]), torch.tensor([0.8])
    p = 0.5
    expected = 0.25 * 0.8 * (1 - p) * -math.log(p) + 0.75 * 0.2 * p * -math.log(1 - p)
    assert soft_focal_bce(logit, t, 0.25, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_soft_method_terms():
    s_cls = torch.tensor([[[0.0, 0.0]]])  # 1 image, 1 anchor, 2 classes
    t_cls = torch.tensor([[[math.log(4), -math.log(4)]]])  # p_t = 0.8, 0.2
    s_box = torch.tensor([[[0.0, 0.0, 0.0, 0.0]]])
    t_box = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    cfg = DistillConfig()
    terms = Soft(cfg).loss(_out([], s_cls, s_box), _out([], t_cls, t_box), {})
    e1 = 0.25 * 0.8 * 0.5 * math.log(2) + 0.75 * 0.2 * 0.5 * math.log(2)
    e2 = 0.25 * 0.2 * 0.5 * math.log(2) + 0.75 * 0.8 * 0.5 * math.log(2)
    assert terms["soft_cls"].item() == pytest.approx(5e3 * (e1 + e2) / 2, rel=1e-5)
    b = math.e ** 3 - 1
    assert terms["soft_box"].item() == pytest.approx(1.5 + 1.5 / b - 0.5 * 0.11, rel=1e-5)


def test_mse_with_identity_adapter():
    fs = [torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 1, 1)]
    ft = [torch.full((1, 2, 2, 2), 3.0), torch.full((1, 2, 1, 1), 1.0)]
    loss = MSE(DistillConfig(), _identity_adapters(2, 2)).loss(_out(fs), _out(ft), {})["feat"]
    assert loss.item() == pytest.approx(5.0 * (4.0 + 1.0) / 2)


def test_pdf_weights_sum_to_one_and_vanish_where_models_agree():
    torch.manual_seed(0)
    shapes = [(2, 2), (1, 1)]
    a = 6 * (4 + 1)
    p_s, p_t = torch.rand(2, a, 3), torch.rand(2, a, 3)
    w = disagreement_weights(p_s, p_t, shapes)
    assert [tuple(x.shape) for x in w] == [(2, 2, 2), (2, 1, 1)]
    assert sum(x.sum() for x in w).item() == pytest.approx(1.0, abs=1e-6)
    p_t2 = p_s.clone()
    p_t2[0, :6] += 0.5  # only the first location of image 0 disagrees
    w2 = disagreement_weights(p_s, p_t2, shapes)
    assert w2[0][0, 0, 0].item() == pytest.approx(1.0) and sum(x.sum() for x in w2).item() == pytest.approx(1.0)
    zero = disagreement_weights(p_s, p_s.clone(), shapes)
    assert all((x == 0).all() for x in zero)


def test_pdf_loss_direct_and_plus_terms_guarded():
    a = 6 * 2
    s_cls = torch.zeros(1, a, 1)
    t_cls = torch.zeros(1, a, 1)
    t_cls[0, :6] = math.log(3)  # location 0: p_t 0.75 vs p_s 0.5 -> all the weight
    fs, ft = [torch.zeros(1, 2, 1, 2)], [torch.zeros(1, 2, 1, 2)]
    ft[0][0, :, 0, 0] = 2.0  # imitation error 4 at location 0, 0 at location 1
    box = torch.zeros(1, a, 4)
    cfg = DistillConfig(pdf={"variant": "plus"})
    terms = PDF(cfg, _identity_adapters(1, 2)).loss(_out(fs, s_cls, box, (8,)), _out(ft, t_cls, box + 1, (8,)), {})
    assert terms["feat"].item() == pytest.approx(5.0 * 1.0 * 4.0)
    bce = -(0.75 * math.log(0.5) + 0.25 * math.log(0.5))
    assert terms["pdf_cls"].item() == pytest.approx(6 * 0.25 ** 2 * bce / 6 + 0.0 * 6, rel=1e-5)
    assert terms["pdf_box"].item() == pytest.approx(4.0)  # L1 of 4 coordinates on the 6 confident anchors
    agree = PDF(cfg, _identity_adapters(1, 2)).loss(_out(fs, s_cls, box, (8,)), _out(ft, s_cls.clone() - 9, box,
                                                                                         (8,)), {})
    assert all(torch.isfinite(v) for v in agree.values()) and agree["pdf_box"].item() == 0.0  # no confident anchor


def test_defeat_masks_anchor_variant():
    boxes = [torch.tensor([[0.0, 0.0, 12.0, 12.0]]), torch.zeros(0, 4)]
    m = defeat_masks(boxes, [(4, 4), (2, 2)], [8, 16], "anchors")
    # level 0 centres at 4, 12, 20, 28: (4, 4), (4, 12), (12, 4), (12, 12) lie in the box
    assert m[0][0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert m[1][0].tolist() == [[1, 0], [0, 0]]  # centre (8, 8)
    assert m[0][1].sum() == 0 and m[1][1].sum() == 0  # an image without boxes: all background


def test_defeat_masks_level_variant():
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [8.0, 8.0, 128.0, 128.0]])]
    m = defeat_masks(boxes, [(16, 16), (8, 8), (4, 4)], [8, 16, 32], "level", level_base=56)
    # the small box (side 10) -> level 0, cells [0:2) x [0:2); the big one (side 120) -> floor(log2(120/56)) = 1
    assert m[0][0, :2, :2].sum() == 4 and m[0][0].sum() == 4
    assert m[1][0, 0:8, 0:8].sum() == 64 and m[2][0].sum() == 0


def test_decoupled_loss_direct_and_empty_guard():
    s = [torch.zeros(1, 2, 2, 2)]
    t = [torch.ones(1, 2, 2, 2)]
    mask = [torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])]
    fg, bg = decoupled_loss(s, t, mask)
    assert fg.item() == pytest.approx(2.0 / 2) and bg.item() == pytest.approx(6.0 / 6)
    fg0, bg0 = decoupled_loss(s, t, [torch.zeros(1, 2, 2)])
    assert fg0.item() == 0.0 and bg0.item() == pytest.approx(8.0 / 8)
    cfg = DistillConfig(defeat={"variant": "anchors"})
    terms = DeFeat(cfg, _identity_adapters(1, 2)).loss(_out(s, strides=(8,)), _out(t, strides=(8,)),
                                                       {"boxes": [torch.zeros(0, 4)]})
    assert terms["feat_fg"].item() == 0.0 and terms["feat_bg"].item() == pytest.approx(1.0)
    level = DeFeat(DistillConfig(defeat={"variant": "level"}), _identity_adapters(1, 2)).loss(
        _out(s, strides=(8,)), _out(t, strides=(8,)), {"boxes": [torch.tensor([[0.0, 0.0, 4.0, 4.0]])]})
    assert level["feat_fg"].item() == pytest.approx(3 * 1.0) and level["feat_bg"].item() == pytest.approx(12 * 1.0)
