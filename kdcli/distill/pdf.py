"""PDF-Distil (prediction-disagreement feature imitation).

Per anchor, the teacher/student disagreement d = sqrt(sum_k (p_t - p_s)^2) with p = sigmoid(class logits), no
gradient; averaged over the 6 anchors of a location; normalised over the whole batch and all levels to sum to 1
(zero everywhere when teacher and student agree). Loss = weight x sum over locations of
w x mean_c (adapt(f_s) - f_t)^2.

Variant `plus` (later code) adds sum (p_t - p_s)^2 BCE(student logit, p_t) / max(1, #{p_t > 0.5}) and an L1
between student and teacher box deltas on the anchors where the teacher is confident (max p_t > 0.5).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kdcli.distill.base import DistillMethod, register
from kdcli.models.anchors import ANCHORS_PER_LOCATION
from kdcli.models.detector import DetectorOutput

EPS = 1e-12


def disagreement_weights(p_s: torch.Tensor, p_t: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Per level [B, H, W] weights summing to 1 over the batch and all levels (all zero if p_s == p_t)."""
    d = (p_t - p_s).pow(2).sum(-1).sqrt()  # [B, A]
    maps, start = [], 0
    for h, w in shapes:
        n = h * w * ANCHORS_PER_LOCATION
        maps.append(d[:, start:start + n].reshape(d.shape[0], h, w, ANCHORS_PER_LOCATION).mean(-1))
        start += n
    total = sum(m.sum() for m in maps)
    if total <= EPS:
        return [torch.zeros_like(m) for m in maps]
    return [m / total for m in maps]


@register
class PDF(DistillMethod):
    name = "pdf"
    needs_teacher_head = True
    uses_adapters = True

    def loss(self, student: DetectorOutput, teacher: DetectorOutput, batch: dict[str, Any]
             ) -> dict[str, torch.Tensor]:
        c = self.cfg.pdf
        with torch.no_grad():
            p_s = torch.sigmoid(student.cls_logits.detach().float())
            p_t = torch.sigmoid(teacher.cls_logits.float())
            weights = disagreement_weights(p_s, p_t, [tuple(f.shape[-2:]) for f in teacher.features])
        adapted = self.adapters(student.features)
        feat = sum((w * (s.float() - t.float()).pow(2).mean(1)).sum()
                   for w, s, t in zip(weights, adapted, teacher.features))
        terms = {"feat": c.weight * feat}
        if c.variant == "plus":
            logits = student.cls_logits.float()
            bce = F.binary_cross_entropy_with_logits(logits, p_t, reduction="none")
            n_conf = (p_t > 0.5).sum().clamp(min=1)
            terms["pdf_cls"] = c.cls_weight * ((p_t - torch.sigmoid(logits)).pow(2) * bce).sum() / n_conf
            confident = p_t.max(-1).values > 0.5
            l1 = (student.box_deltas.float() - teacher.box_deltas.float()).abs().sum(-1)
            terms["pdf_box"] = c.box_weight * (l1 * confident).sum() / confident.sum().clamp(min=1)
        return terms
