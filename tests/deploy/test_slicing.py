"""Sliced-inference geometry: windows cover the scene, coordinates map back exactly, a box seen by two windows
is merged to one (NMS and box fusion), boxes cut by an inner window edge are recognised."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcli.data.tiling import windows
from kdcli.deploy.slicing import drop_cut_boxes, merge, to_scene


@settings(max_examples=60, deadline=None)
@given(w=st.integers(1, 2000), h=st.integers(1, 2000), tile=st.integers(32, 700), overlap=st.floats(0, 0.9))
def test_windows_cover_the_scene(w: int, h: int, tile: int, overlap: float):
    wins = windows(w, h, tile, overlap)
    covered = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in wins:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and x1 - x0 <= tile and y1 - y0 <= tile
        covered[y0:y1, x0:x1] = True
    assert covered.all()


def test_to_scene_is_exact():
    b = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    assert to_scene(b.clone(), 512, 100, 0.5).tolist() == [[532.0, 140.0, 572.0, 220.0]]


@pytest.mark.parametrize("method", ["nms", "fusion"])
def test_a_box_seen_in_two_windows_is_merged(method: str):
    # the same vehicle predicted by the left window and, 1 px off, by the right one; a second vehicle elsewhere
    boxes = torch.tensor([[500.0, 40.0, 520.0, 50.0], [501.0, 40.0, 521.0, 50.0], [100.0, 100.0, 120.0, 110.0]])
    scores = torch.tensor([0.9, 0.6, 0.8])
    labels = torch.tensor([0, 0, 1])
    b, s, lab = merge(boxes, scores, labels, iou=0.5, method=method)
    assert len(b) == 2 and s.tolist() == pytest.approx([0.9, 0.8]) and lab.tolist() == [0, 1]
    expected = [500.0, 40.0, 520.0, 50.0] if method == "nms" else [500.4, 40.0, 520.4, 50.0]  # score-weighted
    assert b[0].tolist() == pytest.approx(expected)


def test_cut_boxes_only_at_inner_edges():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0],       # touches the scene border: kept
                          [600.0, 50.0, 639.5, 60.0],   # touches the window's inner right edge: cut
                          [300.0, 300.0, 320.0, 310.0]])  # inside: kept
    keep = drop_cut_boxes(boxes, (0, 0, 640, 640), (2000, 2000))
    assert keep.tolist() == [True, False, True]
    assert drop_cut_boxes(boxes, (0, 0, 640, 640), (640, 640)).tolist() == [True, True, True]  # scene edge
