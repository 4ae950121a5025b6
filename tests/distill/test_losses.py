"""Distillation losses against direct, separate implementations of methods.md's formulas on tiny tensors (plain
Python loops and `math`), to 1e-5; masks on constructed cases; gradients where a term is detached."""

from __future__ import annotations

import math

import pytest
import torch

from kdcli.config.schema import DistillConfig
from kdcli.distill.adapters import Adapters
from kdcli.distill.defeat import DeFeat, anchor_masks, level_masks
from kdcli.distill.distiller import Distiller
from kdcli.distill.mse import MSE
from kdcli.distill.pdf import PDF, disagreement_weights
from kdcli.distill.soft import Soft, soft_focal_bce
from kdcli.models.detector import DetectorOutput


def _out(feats, cls=None, box=None, strides=(8, 16)):
    return DetectorOutput(feats, torch.zeros(0, 4), list(strides), cls, box)


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _bl1(d: float, alpha=0.5, gamma=1.5, beta=0.11) -> float:
    d, b = abs(d), math.e ** (gamma / alpha) - 1
    if d < beta:
        return alpha / b * (b * d + 1) * math.log(b * d / beta + 1) - alpha * d
    return gamma * d + gamma / b - alpha * beta


def _flat(t: torch.Tensor) -> list[float]:
    return t.reshape(-1).tolist()


def _section(name: str, **kw):
    return getattr(DistillConfig(**{name: kw}), name)


# ---- soft ------------------------------------------------------------------------------------------------------
def test_soft_terms_equal_the_joint_focal_form_mean_over_everything():
    g = torch.Generator().manual_seed(0)
    s_cls, t_cls = torch.randn(2, 3, 2, generator=g), torch.randn(2, 3, 2, generator=g) * 2
    s_box, t_box = torch.randn(2, 3, 4, generator=g) * 0.3, torch.randn(2, 3, 4, generator=g) * 0.3
    terms = Soft(_section("soft")).loss(_out([], s_cls, s_box), _out([], t_cls, t_box), {})
    cls = []
    for x, y in zip(_flat(s_cls), _flat(t_cls)):
        p, t = _sig(x), _sig(y)
        w = (0.25 * t + 0.75 * (1 - t)) * ((1 - p) * t + p * (1 - t)) ** 1.0
        cls.append(w * -(t * math.log(p) + (1 - t) * math.log(1 - p)))
    box = [_bl1(a - b) for a, b in zip(_flat(s_box), _flat(t_box))]
    assert terms["soft_cls"].item() == pytest.approx(5e3 * sum(cls) / len(cls), rel=1e-5)
    assert terms["soft_box"].item() == pytest.approx(sum(box) / len(box), rel=1e-5)  # mean over anchors x 4


def test_score_weighted_soft_terms_weigh_each_target_by_the_teachers_certainty():
    g = torch.Generator().manual_seed(1)
    s_cls, t_cls = torch.randn(2, 3, 2, generator=g), torch.randn(2, 3, 2, generator=g) * 2
    s_box, t_box = torch.randn(2, 3, 4, generator=g) * 0.3, torch.randn(2, 3, 4, generator=g) * 0.3
    terms = Soft(_section("soft", score_weighted=True)).loss(_out([], s_cls, s_box), _out([], t_cls, t_box), {})
    num = den = 0.0
    for x, y in zip(_flat(s_cls), _flat(t_cls)):
        p, t = _sig(x), _sig(y)
        w = (0.25 * t + 0.75 * (1 - t)) * ((1 - p) * t + p * (1 - t))
        num += abs(2 * t - 1) * w * -(t * math.log(p) + (1 - t) * math.log(1 - p))
        den += abs(2 * t - 1)
    assert terms["soft_cls"].item() == pytest.approx(5e3 * num / den, rel=1e-5)
    anchors = [(_flat(s_box[b, a]), _flat(t_box[b, a]), max(_sig(v) for v in _flat(t_cls[b, a])))
               for b in range(2) for a in range(3)]
    box = sum(w * sum(_bl1(u - v) for u, v in zip(s, t)) / 4 for s, t, w in anchors) / sum(w for *_, w in anchors)
    assert terms["soft_box"].item() == pytest.approx(box, rel=1e-5)
    # a teacher at 0.5 everywhere is sure of nothing: no class signal, rather than a division by zero
    unsure = Soft(_section("soft", score_weighted=True)).loss(_out([], s_cls, s_box),
                                                              _out([], torch.zeros_like(t_cls), t_box), {})
    assert unsure["soft_cls"].item() == 0.0


def test_soft_class_term_optimum_stays_near_the_teacher_score():
    """methods.md: for a teacher score of 0.95 the split form's optimum is 0.74; the joint form's is near 0.99."""
    p = torch.linspace(0.5, 0.999, 2000)
    logits = torch.log(p / (1 - p))
    joint = soft_focal_bce(logits, torch.full_like(p, 0.95), 0.25, 1.0)
    best = p[joint.argmin()].item()
    assert 0.97 < best < 0.995
    split = (0.25 * 0.95 * (1 - p) * -torch.log(p) + 0.75 * 0.05 * p * -torch.log(1 - p))  # the old form
    assert p[split.argmin()].item() == pytest.approx(0.74, abs=0.02)


# ---- mse -------------------------------------------------------------------------------------------------------
def test_mse_is_the_mean_over_all_locations_of_all_levels_together():
    g = torch.Generator().manual_seed(1)
    fs = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 2, 2, generator=g)]
    ft = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 2, 2, generator=g)]
    loss = MSE(_section("mse")).loss(_out(fs), _out(ft), {})["mse"]
    sq = [(a - b) ** 2 for s, t in zip(fs, ft) for a, b in zip(_flat(s), _flat(t))]
    assert loss.item() == pytest.approx(5.0 * sum(sq) / len(sq), rel=1e-5)
    per_level_means = sum(((s - t) ** 2).mean().item() for s, t in zip(fs, ft)) / 2
    assert abs(loss.item() - 5.0 * per_level_means) > 1e-3  # not the mean of per-level means


# ---- pdf -------------------------------------------------------------------------------------------------------
def _pdf_direct(s_cls, t_cls, fs, ft, weight=5.0):
    """PDF-Distil `bmvc` in loops: d per anchor, mean over 6 anchors of a location, weights over the batch."""
    b_n, a_n, k_n = s_cls.shape
    loc_w, loc_err = [], []
    start = 0
    for s, t in zip(fs, ft):
        _, c, h, w = s.shape
        for b in range(b_n):
            for y in range(h):
                for x in range(w):
                    base = start + (y * w + x) * 6
                    ds = [math.sqrt(sum((_sig(t_cls[b, base + j, k].item()) - _sig(s_cls[b, base + j, k].item())) ** 2
                                        for k in range(k_n))) for j in range(6)]
                    loc_w.append(sum(ds) / 6)
                    loc_err.append(sum((s[b, ch, y, x].item() - t[b, ch, y, x].item()) ** 2 for ch in range(c)) / c)
        start += h * w * 6
    total = sum(loc_w)
    return weight * sum(w / total * e for w, e in zip(loc_w, loc_err))


def test_pdf_bmvc_equals_the_direct_formula():
    g = torch.Generator().manual_seed(2)
    fs = [torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 1, 1, generator=g)]
    ft = [torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 1, 1, generator=g)]
    a = 6 * (4 + 1)
    s_cls, t_cls = torch.randn(2, a, 2, generator=g), torch.randn(2, a, 2, generator=g)
    terms = PDF(_section("pdf")).loss(_out(fs, s_cls), _out(ft, t_cls), {})
    assert set(terms) == {"pdf"}
    assert terms["pdf"].item() == pytest.approx(_pdf_direct(s_cls, t_cls, fs, ft), rel=1e-5)


def test_pdf_weights_sum_to_one_and_vanish_where_models_agree():
    torch.manual_seed(0)
    shapes = [(2, 2), (1, 1)]
    a = 6 * (4 + 1)
    p_s, p_t = torch.rand(2, a, 3), torch.rand(2, a, 3)
    w = disagreement_weights(p_s, p_t, shapes)
    assert [tuple(x.shape) for x in w] == [(2, 2, 2), (2, 1, 1)]
    assert sum(x.sum() for x in w).item() == pytest.approx(1.0, abs=1e-6)
    zero = disagreement_weights(p_s, p_s.clone(), shapes)
    assert all((x == 0).all() for x in zero)


def test_pdf_plus_values_and_detached_disagreement():
    g = torch.Generator().manual_seed(3)
    fs, ft = [torch.randn(1, 2, 1, 2, generator=g)], [torch.randn(1, 2, 1, 2, generator=g)]
    a = 12
    s_cls = torch.randn(1, a, 2, generator=g).requires_grad_(True)
    t_cls = torch.randn(1, a, 2, generator=g) * 2
    s_box, t_box = torch.randn(1, a, 4, generator=g), torch.randn(1, a, 4, generator=g)
    terms = PDF(_section("pdf", variant="plus")).loss(_out(fs, s_cls, s_box, (8,)), _out(ft, t_cls, t_box, (8,)), {})
    pt, ps = [_sig(v) for v in _flat(t_cls)], [_sig(v) for v in _flat(s_cls.detach())]
    n_conf = max(1, sum(v > 0.5 for v in pt))
    cls = sum((t - s) ** 2 * -(t * math.log(s) + (1 - t) * math.log(1 - s)) for s, t in zip(ps, pt)) / n_conf
    box = sum(abs(x - y) for x, y in zip(_flat(s_box), _flat(t_box))) / (a * 4)
    assert terms["pdf_cls"].item() == pytest.approx(cls, rel=1e-5)
    assert terms["pdf_box"].item() == pytest.approx(box, rel=1e-5)  # mean over all anchors x 4
    assert terms["pdf"].item() == pytest.approx(_pdf_direct(s_cls.detach(), t_cls, fs, ft), rel=1e-5)
    # d2 is a constant: the gradient is d2 * dBCE/dlogit = d2 * (p_s - p_t) / n_conf only
    terms["pdf_cls"].backward()
    expected = [(t - s) ** 2 * (s - t) / n_conf for s, t in zip(ps, pt)]
    assert _flat(s_cls.grad) == pytest.approx(expected, abs=1e-6)


def test_pdf_plus_guards_an_unconfident_teacher():
    fs, ft = [torch.zeros(1, 2, 1, 2)], [torch.ones(1, 2, 1, 2)]
    s_cls, t_cls = torch.zeros(1, 12, 1), torch.full((1, 12, 1), -9.0)  # no p_t > 0.5
    box = torch.zeros(1, 12, 4)
    terms = PDF(_section("pdf", variant="plus")).loss(_out(fs, s_cls, box, (8,)), _out(ft, t_cls, box, (8,)), {})
    assert all(torch.isfinite(v) for v in terms.values()) and terms["pdf_box"].item() == 0.0


# ---- defeat ----------------------------------------------------------------------------------------------------
def test_defeat_anchor_masks():
    boxes = [torch.tensor([[0.0, 0.0, 12.0, 12.0]]), torch.zeros(0, 4)]
    m = anchor_masks(boxes, [(4, 4), (2, 2)], [8, 16])
    # level 0 centres at 4, 12, 20, 28: (4, 4), (4, 12), (12, 4), (12, 12) lie in the box (edges count)
    assert m[0][0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert m[1][0].tolist() == [[1, 0], [0, 0]]  # centre (8, 8)
    assert m[0][1].sum() == 0 and m[1][1].sum() == 0  # an image without boxes: all background


def test_defeat_level_masks_follow_the_official_rule():
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [8.0, 8.0, 128.0, 128.0], [100.0, 40.0, 103.0, 43.0]])]
    m = level_masks(boxes, [(16, 16), (8, 8), (4, 4)], [8, 16, 32], level_base=56)
    # side 10 -> level 0, cells floor(0/8)..floor(10/8) = [0, 1): one cell; side 120 -> floor(log2(120/56)) = 1,
    # cells [0, 8); the 3 px box is thinner than a cell: the one cell at its corner (row 5, column 12)
    assert m[0][0].sum() == 2 and m[0][0, 0, 0] == 1 and m[0][0, 5, 12] == 1
    assert m[1][0, 0:8, 0:8].sum() == 64 and m[2][0].sum() == 0
    # 111 px a side: sqrt(111 x 111) / 56 = 1.98 would be level 0; the official +1 gives 112 / 56 = 2: level 1
    edge = level_masks([torch.tensor([[0.0, 0.0, 111.0, 111.0]])], [(16, 16), (8, 8), (4, 4)], [8, 16, 32], 56)
    assert edge[0].sum() == 0 and edge[1].sum() == 36  # cells [0, floor(111 / 16)) = [0, 6) both ways


def _identity(levels: int, c: int) -> Adapters:
    a = Adapters(levels, c, c, kernel=1)
    for conv in a.convs:
        torch.nn.init.zeros_(conv.bias)
        with torch.no_grad():
            conv.weight.copy_(torch.eye(c)[:, :, None, None])
    return a


def test_defeat_anchors_variant_direct():
    g = torch.Generator().manual_seed(4)
    fs = [torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 1, 1, generator=g)]
    ft = [torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 1, 1, generator=g)]
    boxes = [torch.tensor([[0.0, 0.0, 9.0, 9.0]]), torch.tensor([[6.0, 6.0, 20.0, 20.0]])]
    terms = DeFeat(_section("defeat")).loss(_out(fs), _out(ft), {"boxes": boxes})
    fg = bg = n_fg = n_bg = 0.0
    for (s, t, stride) in zip(fs, ft, (8, 16)):
        _, c, h, w = s.shape
        for b in range(2):
            x0, y0, x1, y1 = boxes[b][0].tolist()
            for y in range(h):
                for x in range(w):
                    cx, cy = (x + 0.5) * stride, (y + 0.5) * stride
                    e = sum((s[b, ch, y, x].item() - t[b, ch, y, x].item()) ** 2 for ch in range(c))
                    if x0 <= cx <= x1 and y0 <= cy <= y1:
                        fg, n_fg = fg + e, n_fg + 1
                    else:
                        bg, n_bg = bg + e, n_bg + 1
    assert n_fg == 4  # (4,4) in box 0; (12,12) in box 1 on level 0; (8,8) in both boxes on level 1
    assert terms["defeat_fg"].item() == pytest.approx(fg / max(1, 2 * n_fg) / 2, rel=1e-5)
    assert terms["defeat_bg"].item() == pytest.approx(bg / max(1, 2 * n_bg) / 2, rel=1e-5)


def test_defeat_level_variant_direct_and_empty_guard():
    g = torch.Generator().manual_seed(5)
    fs = [torch.randn(1, 2, 2, 2, generator=g), torch.randn(1, 2, 1, 1, generator=g)]
    ft = [torch.randn(1, 2, 2, 2, generator=g), torch.randn(1, 2, 1, 1, generator=g)]
    batch = {"boxes": [torch.tensor([[0.0, 0, 4, 4]])]}
    terms = DeFeat(_section("defeat", variant="level")).loss(_out(fs), _out(ft), batch)
    fg, bg = [], []
    for lvl, (s, t) in enumerate(zip(fs, ft)):
        _, c, h, w = s.shape
        err = [[sum((s[0, ch, y, x].item() - t[0, ch, y, x].item()) ** 2 for ch in range(c)) for x in range(w)]
               for y in range(h)]
        mask = [[1.0 if (lvl == 0 and y == 0 and x == 0) else 0.0 for x in range(w)] for y in range(h)]
        m = sum(map(sum, mask))
        fg.append(sum(err[y][x] * mask[y][x] for y in range(h) for x in range(w)) / max(1, 2 * c * m))
        bg.append(sum(err[y][x] * (1 - mask[y][x]) for y in range(h) for x in range(w)) / max(1, 2 * c * (h * w - m)))
    assert terms["defeat_fg"].item() == pytest.approx(3 * sum(fg) / 2, rel=1e-5)  # mean over the 2 levels
    assert terms["defeat_bg"].item() == pytest.approx(12 * sum(bg) / 2, rel=1e-5)
    none = DeFeat(_section("defeat")).loss(_out(fs), _out(ft), {"boxes": [torch.zeros(0, 4)]})
    assert none["defeat_fg"].item() == 0.0 and torch.isfinite(none["defeat_bg"])


# ---- the distiller ---------------------------------------------------------------------------------------------
def test_distiller_adapts_features_once_and_freezes_the_teacher():
    from kdcli.config.schema import ModelConfig
    from kdcli.models.detector import Detector

    torch.manual_seed(0)
    teacher = Detector(ModelConfig(channels=16, backbone="resnet18"), 2, 64, 16).train()
    student = Detector(ModelConfig(channels=8), 2, 64, 16)
    d = Distiller(DistillConfig(labels="hard+soft", method="mse"), teacher, 8)
    assert d.active_methods == ["soft", "mse"] and d.teacher_head
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    d.train()
    assert not teacher.training and d.terms.training
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    terms = d.loss(student(images), {"images": images, "boxes": [torch.zeros(0, 4)] * 2})
    assert set(terms) == {"soft_cls", "soft_box", "mse"}
    sum(terms.values()).backward()
    assert d.terms.adapters.convs[0].weight.grad is not None and teacher.head.levels[0].cls_out.weight.grad is None
    assert set(d.state_dict()) == set(d.terms.state_dict())
    assert all(k.startswith("adapters.") for k in d.state_dict())
    late = Distiller(DistillConfig(method="mse", stop_epoch=2), teacher, 8)
    assert late.loss(student(images), {"images": images, "boxes": []}, epoch=2) == {}


def test_a_combination_keeps_every_methods_term_and_its_total_is_their_sum():
    """`pdf,mse` on one batch: its terms are the hard loss's, pdf's and mse's, each under its own name and equal to
    the term of that method run alone (same adapters); the total is their sum; and it is not `mse` alone (the two
    once shared the key `feat`, and the second overwrote the first)."""
    from kdcli.config.schema import ModelConfig
    from kdcli.models.detector import Detector
    from kdcli.models.losses import DetectionLoss

    torch.manual_seed(0)
    teacher = Detector(ModelConfig(channels=16, backbone="resnet18"), 2, 64, 16)
    student = Detector(ModelConfig(channels=8), 2, 64, 16).eval()  # eval: the same forward on every call
    hard = DetectionLoss(student.cfg, 2)
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    batch = {"images": images, "boxes": [torch.tensor([[8.0, 8, 30, 26]]), torch.tensor([[20.0, 30, 44, 50]])],
             "labels": [torch.tensor([0]), torch.tensor([1])]}
    both = Distiller(DistillConfig(method="pdf,mse"), teacher, 8)
    alone = {m: Distiller(DistillConfig(method=m), teacher, 8) for m in ("pdf", "mse")}
    for d in alone.values():
        d.terms.adapters.load_state_dict(both.terms.adapters.state_dict())
    terms = both.student_loss(student, hard, batch)
    single = {m: d.student_loss(student, hard, batch) for m, d in alone.items()}
    assert list(terms) == ["cls", "box", "pdf", "mse", "total"]
    assert set(single["pdf"]) == {"cls", "box", "pdf", "total"} and set(single["mse"]) == {"cls", "box", "mse", "total"}
    for key, want in (("cls", single["mse"]["cls"]), ("box", single["mse"]["box"]), ("pdf", single["pdf"]["pdf"]),
                      ("mse", single["mse"]["mse"])):
        assert terms[key].item() == pytest.approx(want.item(), rel=1e-6)
    parts = sum(terms[k].item() for k in ("cls", "box", "pdf", "mse"))
    assert terms["total"].item() == pytest.approx(parts, rel=1e-6)
    assert terms["total"].item() == pytest.approx(single["pdf"]["total"].item() + single["mse"]["mse"].item(),
                                                  rel=1e-6)
    assert single["pdf"]["pdf"].item() > 0 and terms["total"].item() > single["mse"]["total"].item()


def test_terms_never_share_a_key():
    """A method's terms carry its name; a key already in the step (or named after another method) is an error,
    never an overwrite."""
    from kdcli.distill.distiller import merge_terms

    one = torch.tensor(1.0)
    terms = {"cls": one, "box": one}
    merge_terms(terms, {"pdf": one, "pdf_cls": one}, "method 'pdf'", prefix="pdf")
    with pytest.raises(ValueError, match="'pdf' that this step already has"):
        merge_terms(terms, {"pdf": one}, "method 'other'")
    with pytest.raises(ValueError, match="'total'"):
        merge_terms(terms, {"total": one}, "method 'x'")
    with pytest.raises(ValueError, match="method 'mse' returned a term 'feat'"):
        merge_terms(terms, {"feat": one}, "method 'mse'", prefix="mse")
    assert set(terms) == {"cls", "box", "pdf", "pdf_cls"}
    # through the Distiller's terms: a method that names its term otherwise stops the step
    from kdcli.distill.distiller import DistillTerms

    mse = MSE(_section("mse"))
    mse.loss = lambda s, t, b: {"feat": one}
    with pytest.raises(ValueError, match="'mse_<part>'"):
        DistillTerms([mse], None, None)(_out([]), _out([]), {})
