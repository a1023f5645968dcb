"""J, F, J&F, cIoU/gIoU on hand-made masks with known answers."""

import numpy as np
import pytest

from swim.eval.segmentation import (
    IoUAccumulator,
    boundary_f,
    davis_stats,
    dilate,
    disk,
    expression_scores,
    region_similarity,
    seg2bmap,
    summarize,
)


def square(h=60, w=80, top=20, left=30, side=20):
    mask = np.zeros((h, w), bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_identical_disjoint_and_empty():
    a = square()
    assert region_similarity(a, a) == 1.0 and boundary_f(a, a) == 1.0
    b = square(left=2, top=2, side=5)
    assert region_similarity(a, b) == 0.0 and boundary_f(a, b) == 0.0  # far apart: no boundary match either
    empty = np.zeros_like(a)
    assert region_similarity(empty, empty) == 1.0 and boundary_f(empty, empty) == 1.0
    assert region_similarity(a, empty) == 0.0 and boundary_f(a, empty) == 0.0 and boundary_f(empty, a) == 0.0


def test_one_pixel_shift_keeps_f_and_lowers_j():
    a, shifted = square(), square(left=31)
    assert region_similarity(a, shifted) == pytest.approx(19 * 20 / (21 * 20))  # hand count: 380 / 420
    assert boundary_f(a, shifted) == 1.0  # within the ceil(0.008 · 100) = 1 px tolerance
    far = square(left=40)  # 10 px: the vertical edges are out of tolerance, the horizontal ones half in
    assert 0 < boundary_f(a, far) < 1


def test_boundary_map_and_tolerance_radius():
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    # hand-applied rule: a pixel differing from its E, S or SE neighbour (zeros outside; the last row and column
    # compare along the edge only), e.g. (0, 0) differs from its SE neighbour (1, 1), (1, 1) from none
    expected = np.array([[1, 1, 1, 0], [1, 0, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]], bool)
    assert (seg2bmap(mask) == expected).all()
    assert disk(1).sum() == 5 and disk(2).sum() == 13  # scikit-image's disk
    dot = np.zeros((5, 5), bool)
    dot[2, 2] = True
    assert (dilate(dot, disk(1)) == np.pad(disk(1), 1)).all()  # a plus around the dot
    # the DAVIS tolerance at 480x854 is 8 px
    assert int(np.ceil(0.008 * np.hypot(480, 854))) == 8


def test_expression_scores_and_summary():
    a, empty = square(), np.zeros((60, 80), bool)
    scores = expression_scores([a, empty], [a, a])  # one perfect frame, one missed
    assert (scores["J"], scores["F"], scores["JF"]) == (0.5, 0.5, 0.5)
    total = summarize([scores, expression_scores([a], [a])])
    assert total == {"J": 0.75, "F": 0.75, "JF": 0.75, "expressions": 2}
    with pytest.raises(ValueError, match="one prediction per"):
        expression_scores([a], [a, a])


def test_davis_stats():
    stats = davis_stats([1.0, 1.0, 0.6, 0.4, 0.2, 0.0, 0.0, 0.0])
    assert stats == pytest.approx({"M": 0.4, "R": 0.375, "D": 1.0 - 0.0})


def test_ciou_and_giou():
    acc = IoUAccumulator()
    a = square()
    assert acc.add(a, a) == 1.0
    half = a.copy()
    half[:, 40:] = False  # 200 of the 400 pixels
    assert acc.add(half, a) == 0.5
    assert acc.summary() == {"cIoU": (400 + 200) / (400 + 400), "gIoU": 0.75, "samples": 2}
