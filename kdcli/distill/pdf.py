"""PDF-Distil: prediction-disagreement feature imitation (Zhang et al., BMVC 2021; methods.md).

Per anchor, the teacher/student disagreement d = sqrt(sum_k (p_t - p_s)^2) with p = sigmoid(class logits), no
gradient; averaged over the 6 anchors of a location; normalised over the whole batch and all levels to sum to 1
(zero everywhere when teacher and student agree). Loss = weight x sum over locations of
w x mean_c (adapt(f_s) - f_t)^2.

Variant `plus` (multas' `pdf` mode, the authors' later code) adds two terms, weight 1 each:
- class: sum d2 * BCE(student logit, p_t) / max(1, #{p_t > 0.5}), d2 = (p_t - p_s)^2 detached (the reference
  computes it under no_grad);
- box: the plain L1 between student and teacher box deltas, mean over all anchors x 4 coordinates.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from kdcli.config.base import Strict
from kdcli.distill.base import DistillMethod, register
from kdcli.models.anchors import ANCHORS_PER_LOCATION
from kdcli.models.detector import DetectorOutput

EPS = 1e-12


class PDFConfig(Strict):
    weight: float = Field(5.0, ge=0, description="weight of the disagreement-weighted feature imitation")
    variant: Literal["bmvc", "plus"] = Field("bmvc", description="bmvc: features only; plus: also disagreement-"
                                                                "weighted class and box terms (later code)")
    cls_weight: float = Field(1.0, ge=0, description="plus: weight of the disagreement-weighted class term")
    box_weight: float = Field(1.0, ge=0, description="plus: weight of the L1 between student and teacher deltas")


def disagreement_weights(p_s: torch.Tensor, p_t: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Per level [B, H, W] weights summing to 1 over the batch and all levels (all zero if p_s == p_t)."""
    d = (p_t - p_s).pow(2).sum(-1).sqrt()  # [B, A]
    maps, start = [], 0
    for h, w in shapes:
        n = h * w * ANCHORS_PER_LOCATION
        maps.append(d[:, start:start + n].reshape(d.shape[0], h, w, ANCHORS_PER_LOCATION).mean(-1))
        start += n
    total = torch.stack([m.sum() for m in maps]).sum()
    scale = torch.where(total > EPS, 1 / total.clamp(min=EPS), torch.zeros_like(total))
    return [m * scale for m in maps]


@register
class PDF(DistillMethod):
    name = "pdf"
    config = PDFConfig
    needs_teacher_head = True
    adapter = "paper"

    def loss(self, student: DetectorOutput, teacher: DetectorOutput, batch: dict[str, Any]
             ) -> dict[str, torch.Tensor]:
        c = self.cfg
        with torch.no_grad():
            p_s = torch.sigmoid(student.cls_logits.detach().float())
            p_t = torch.sigmoid(teacher.cls_logits.float())
            weights = disagreement_weights(p_s, p_t, [tuple(f.shape[-2:]) for f in teacher.features])
        feat = torch.stack([(w * (s.float() - t.float()).pow(2).mean(1)).sum()
                            for w, s, t in zip(weights, student.features, teacher.features)]).sum()
        terms = {"pdf": c.weight * feat}
        if c.variant == "plus":
            with torch.no_grad():
                d2 = (p_t - p_s).pow(2)
                n_conf = (p_t > 0.5).sum().clamp(min=1)
            bce = F.binary_cross_entropy_with_logits(student.cls_logits.float(), p_t, reduction="none")
            terms["pdf_cls"] = c.cls_weight * (d2 * bce).sum() / n_conf
            terms["pdf_box"] = c.box_weight * (student.box_deltas.float() - teacher.box_deltas.float()).abs().mean()
        return terms
