"""CWD, PKD and FGD against direct, separate computations of their formulas (loops, `math`) on tiny tensors, to
1e-5; the gradient reaches the student's features and the methods' own parameters (FGD's GcBlocks)."""

from __future__ import annotations

import math

import pytest
import torch

from kdcli.config.schema import DistillConfig
from kdcli.distill.cwd import CWD
from kdcli.distill.distiller import Distiller
from kdcli.distill.fgd import FGD, box_masks
from kdcli.distill.pkd import PKD
from kdcli.models.detector import DetectorOutput


def _out(feats, strides=(8, 16)):
    return DetectorOutput(feats, torch.zeros(0, 4), list(strides))


def _section(name: str, **kw):
    return getattr(DistillConfig(**{name: kw}), name)


def _feats(seed: int, shapes=((2, 3, 2, 3), (2, 3, 1, 2)), scale=1.0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*s, generator=g) * scale).requires_grad_(grad) for s in shapes]


# ---- CWD -------------------------------------------------------------------------------------------------------
def _cwd_direct(fs, ft, tau, weight):
    levels = []
    for s, t in zip(fs, ft):
        n, c = s.shape[:2]
        total = 0.0
        for i in range(n):
            for k in range(c):
                xs = [v / tau for v in s[i, k].reshape(-1).tolist()]
                xt = [v / tau for v in t[i, k].reshape(-1).tolist()]
                zs, zt = sum(math.exp(v) for v in xs), sum(math.exp(v) for v in xt)
                for a, b in zip(xs, xt):
                    pt, ps = math.exp(b) / zt, math.exp(a) / zs
                    total += pt * math.log(pt / ps)
        levels.append(tau**2 * total / (n * c))
    return weight * sum(levels)  # weight per level, levels summed (the reference's per-level losses)


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_cwd_equals_the_direct_formula(tau: float):
    fs, ft = _feats(0, grad=True), _feats(1, scale=2.0)
    term = CWD(_section("cwd", tau=tau), channels=3, levels=2).loss(_out(fs), _out(ft), {})["cwd"]
    assert term.item() == pytest.approx(_cwd_direct(fs, ft, tau, 5.0), rel=1e-5)
    term.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in fs)
    same = CWD(_section("cwd"), channels=3, levels=2).loss(_out(ft), _out(ft), {})["cwd"]
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    first = CWD(_section("cwd", levels=1), channels=3, levels=2).loss(_out(fs), _out(ft), {})["cwd"]
    assert first.item() == pytest.approx(_cwd_direct(fs[:1], ft[:1], 1.0, 5.0), rel=1e-5)  # the first level only


# ---- PKD -------------------------------------------------------------------------------------------------------
def _pearson_loss_direct(fs, ft, weight):
    total = 0.0
    for s, t in zip(fs, ft):
        n, c = s.shape[:2]
        sq = 0.0
        for k in range(c):
            def norm(x):
                v = x[:, k].reshape(-1).tolist()
                mean = sum(v) / len(v)
                std = math.sqrt(sum((a - mean) ** 2 for a in v) / (len(v) - 1))
                return [(a - mean) / (std + 1e-6) for a in v]
            sq += sum((a - b) ** 2 for a, b in zip(norm(s), norm(t)))
        total += sq / s.numel() / 2
    return weight * total


PKD_SHAPES = ((2, 3, 3, 3), (2, 3, 2, 4), (2, 3, 1, 1))  # 18, 16 and 2 values per channel: the last is left out


@pytest.mark.parametrize("weight", [1.0, 10.0])
def test_pkd_equals_the_direct_formula_and_ignores_scale_and_offset(weight: float):
    fs, ft = _feats(2, PKD_SHAPES, grad=True), _feats(3, PKD_SHAPES)
    pkd = PKD(_section("pkd", weight=weight), channels=3, levels=3)
    term = pkd.loss(_out(fs), _out(ft), {})["pkd"]
    assert term.item() == pytest.approx(_pearson_loss_direct(fs[:2], ft[:2], weight), rel=1e-5)
    term.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in fs[:2]) and fs[2].grad is None
    affine = [3.0 * t + 7.0 for t in ft]  # per-channel correlation is unchanged by scale and offset
    assert pkd.loss(_out(affine), _out(ft), {})["pkd"].item() == pytest.approx(0.0, abs=1e-5)
    assert PKD(_section("pkd"), channels=3, levels=3).cfg.weight == 1.0


def test_newer_methods_align_widths_with_a_1x1_conv_only_when_they_differ():
    """CWD, FGD and PKD compare the student's own features when the widths match (the references' connectors
    exist only for a width change, as 1x1 convs); the paper's methods always go through the 3x3 adapters."""
    from kdcli.config.schema import ModelConfig
    from kdcli.models.detector import Detector

    assert {PKD.adapter, CWD.adapter, FGD.adapter} == {"align"}
    teacher = Detector(ModelConfig(channels=16, backbone="resnet18"), 2, 64, 16)
    for method in ("cwd", "fgd", "pkd"):
        same = Distiller(DistillConfig(method=method), teacher, 16)
        assert same.terms.adapters is None and same.terms.align is None
        wider = Distiller(DistillConfig(method=method), teacher, 8)
        assert wider.terms.adapters is None and {c.kernel_size for c in wider.terms.align.convs} == {(1, 1)}
    both = Distiller(DistillConfig(method="pdf,cwd"), teacher, 16)
    assert both.terms.align is None and {c.kernel_size for c in both.terms.adapters.convs} == {(3, 3)}


# ---- FGD -------------------------------------------------------------------------------------------------------
def test_fgd_masks_by_hand():
    # image 32 x 32, grid 4 x 4 (stride 8). Box (4, 9, 12, 15): columns floor(0.5)=0..ceil(1.5)=2, rows
    # floor(1.125)=1..ceil(1.875)=2 -> 2 rows x 3 columns, value 1/6; the second image has no box.
    fg, bg = box_masks([torch.tensor([[4.0, 9.0, 12.0, 15.0]]), torch.zeros(0, 4)], (32, 32), (4, 4))
    want = torch.zeros(4, 4)
    want[1:3, 0:3] = 1 / 6
    assert torch.allclose(fg[0], want) and fg[1].abs().sum() == 0
    assert torch.allclose(bg[0], (want == 0).float() / 10) and torch.allclose(bg[1], torch.full((4, 4), 1 / 16))
    # overlapping boxes keep the larger value (the smaller box): the whole image covers 5 x 5 cells (1/25, the
    # inclusive ceil end included), the tall box rows 0..3 x columns 0..1 (1/8); a tall box is not transposed
    fg, _ = box_masks([torch.tensor([[0.0, 0.0, 31.0, 31.0], [0.0, 0.0, 4.0, 20.0]])], (32, 32), (4, 4))
    assert fg[0, 0, 0].item() == pytest.approx(1 / 8) and fg[0, 3, 1].item() == pytest.approx(1 / 8)
    assert fg[0, 1, 3].item() == pytest.approx(1 / 25) and fg[0, 3, 3].item() == pytest.approx(1 / 25)


def _fgd_direct(fgd: FGD, fs, ft, boxes, image_hw, temp, weights):
    """Loops over cells and channels; the GcBlocks evaluated step by step."""
    a, b, g_, l_ = weights
    total = {"fg": 0.0, "bg": 0.0, "att": 0.0, "rel": 0.0}
    for level, (s, t) in enumerate(zip(fs, ft)):
        n, c, h, w = s.shape

        def att(x, i):
            sp = [[sum(abs(x[i, k, r, q].item()) for k in range(c)) / c for q in range(w)] for r in range(h)]
            z = sum(math.exp(v / temp) for row in sp for v in row)
            sp = [[h * w * math.exp(v / temp) / z for v in row] for row in sp]
            ch = [sum(abs(x[i, k, r, q].item()) for r in range(h) for q in range(w)) / (h * w) for k in range(c)]
            zc = sum(math.exp(v / temp) for v in ch)
            return sp, [c * math.exp(v / temp) / zc for v in ch]

        for i in range(n):
            mask = [[0.0] * w for _ in range(h)]
            for x0, y0, x1, y1 in boxes[i].tolist():
                c0, c1 = math.floor(x0 / image_hw[1] * w), math.ceil(x1 / image_hw[1] * w)
                r0, r1 = math.floor(y0 / image_hw[0] * h), math.ceil(y1 / image_hw[0] * h)
                v = 1 / ((r1 + 1 - r0) * (c1 + 1 - c0))
                for r in range(max(r0, 0), min(r1, h - 1) + 1):
                    for q in range(max(c0, 0), min(c1, w - 1) + 1):
                        mask[r][q] = max(mask[r][q], v)
            nbg = sum(1 for row in mask for v in row if v == 0)
            sp_s, ch_s = att(s, i)
            sp_t, ch_t = att(t, i)
            for r in range(h):
                for q in range(w):
                    for k in range(c):
                        e = (s[i, k, r, q].item() - t[i, k, r, q].item()) ** 2 * sp_t[r][q] * ch_t[k]
                        total["fg"] += a * e * mask[r][q] / n
                        total["bg"] += b * e * (1.0 if mask[r][q] == 0 else 0.0) / max(nbg, 1) / n
            total["att"] += g_ * (sum(abs(p - q_) for p, q_ in zip(ch_s, ch_t))
                                  + sum(abs(p - q_) for rs, rt in zip(sp_s, sp_t) for p, q_ in zip(rs, rt))) / n

        def context_out(block, x, i):
            logits = [[block.mask(x[i:i + 1])[0, 0, r, q].item() for q in range(w)] for r in range(h)]
            z = sum(math.exp(v) for row in logits for v in row)
            ctx = torch.tensor([sum(x[i, k, r, q].item() * math.exp(logits[r][q]) / z for r in range(h)
                                    for q in range(w)) for k in range(c)]).view(1, c, 1, 1)
            add = block.transform(ctx)[0, :, 0, 0].tolist()
            return [[[x[i, k, r, q].item() + add[k] for q in range(w)] for r in range(h)] for k in range(c)]

        for i in range(n):
            os_, ot = context_out(fgd.student_context[level], s, i), context_out(fgd.teacher_context[level], t, i)
            total["rel"] += l_ * sum((os_[k][r][q] - ot[k][r][q]) ** 2 for k in range(c) for r in range(h)
                                     for q in range(w)) / n
    return total


def test_fgd_equals_the_direct_formula_and_trains_its_context_blocks():
    torch.manual_seed(0)
    cfg = _section("fgd", fg_weight=1.0, bg_weight=0.5, attention_weight=0.25, global_weight=0.1)
    fgd = FGD(cfg, channels=4, levels=2)
    with torch.no_grad():  # the last conv starts at zero as in the reference: give it values so it matters here
        for block in [*fgd.student_context, *fgd.teacher_context]:
            block.transform[-1].weight.normal_(0, 0.3)
            block.transform[-1].bias.normal_(0, 0.1)
    shapes = ((2, 4, 4, 4), (2, 4, 2, 2))
    fs, ft = _feats(4, shapes, grad=True), _feats(5, shapes, scale=1.5)
    boxes = [torch.tensor([[4.0, 9.0, 12.0, 15.0], [20.0, 2.0, 30.0, 8.0]]), torch.zeros(0, 4)]
    batch = {"images": torch.zeros(2, 3, 32, 32), "boxes": boxes}
    terms = fgd.loss(_out(fs), _out(ft), batch)
    direct = _fgd_direct(fgd, fs, ft, boxes, (32, 32), 0.5, (1.0, 0.5, 0.25, 0.1))
    for ours, key in (("fgd_fg", "fg"), ("fgd_bg", "bg"), ("fgd_attention", "att"), ("fgd_global", "rel")):
        assert terms[ours].item() == pytest.approx(direct[key], rel=1e-5), ours
    sum(terms.values()).backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in fs)
    for block in [*fgd.student_context, *fgd.teacher_context]:
        assert block.mask.weight.grad is not None and block.mask.weight.grad.abs().sum() > 0
        assert block.transform[0].weight.grad.abs().sum() > 0
    defaults = _section("fgd")  # the authors' RetinaNet settings
    assert (defaults.temperature, defaults.fg_weight, defaults.bg_weight, defaults.attention_weight,
            defaults.global_weight) == (0.5, 1e-3, 5e-4, 5e-4, 5e-6)


def test_fgd_context_blocks_are_trained_saved_and_not_part_of_the_student():
    from kdcli.config.schema import ModelConfig
    from kdcli.models.detector import build_detector

    teacher = build_detector(ModelConfig(channels=16, backbone="resnet18", neck="fpn"), 2, 64, 16)
    d = Distiller(DistillConfig(method="fgd"), teacher, 8)
    assert d.has_parameters() and d.trainable() == [d.terms]
    names = list(d.state_dict())
    assert any("student_context" in k for k in names) and any("teacher_context" in k for k in names)
    assert any(k.startswith("align.") for k in names)  # 8 -> 16 channels: a 1x1 alignment
    assert not any(p.requires_grad for p in teacher.parameters())
