"""swim.data.masks: decoding, exact area pooling on the token grid, per-group targets."""

from __future__ import annotations

import numpy as np
import pytest

from swim.data.geometry import pool_mask
from swim.data.masks import (
    MaskDecodeError,
    annotated_frames,
    decode_segmentation,
    encode_mask,
    object_group_targets,
)


def _box(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


# ---------------------------------------------------------------------------------------------------------
# decoding


def test_compressed_rle_round_trip_str_and_bytes():
    m = _box(20, 30, 3, 9, 4, 17)
    rle = encode_mask(m)
    assert isinstance(rle["counts"], str) and rle["size"] == [20, 30]
    assert np.array_equal(decode_segmentation(rle), m)
    assert np.array_equal(decode_segmentation({**rle, "counts": rle["counts"].encode()}, 20, 30), m)


def test_uncompressed_rle():
    # column-major runs starting with zeros: col0 = 0,0,1; col1 = 1,1,0 -> runs [2, 3, 1]
    out = decode_segmentation({"size": [3, 2], "counts": [2, 3, 1]})
    assert out.dtype == np.uint8 and out.tolist() == [[0, 1], [0, 1], [1, 0]]


def test_polygon():
    out = decode_segmentation([[2, 2, 7, 2, 7, 7, 2, 7]], height=10, width=12)
    assert out.shape == (10, 12) and out[4, 4] == 1 and out[9, 9] == 0 and 20 <= out.sum() <= 36


@pytest.mark.parametrize(
    ("seg", "hw", "match"),
    [
        (None, (4, 4), "None"),
        ({"size": [4, 4]}, (4, 4), "no 'counts'"),
        ({"counts": [16]}, (None, None), "no 'size'"),
        ({"size": [4, 4], "counts": 3.5}, (4, 4), "must be str, bytes or list"),
        ([[0, 0, 3, 0, 3, 3]], (None, None), "needs the frame height and width"),
        ([[0, 0, 3, 0]], (4, 4), "even number"),
        ("abc", (4, 4), "unsupported segmentation type"),
    ],
)
def test_decode_errors_are_clear(seg, hw, match):
    with pytest.raises(MaskDecodeError, match=match):
        decode_segmentation(seg, *hw)


def test_size_mismatch_names_both_sizes():
    rle = encode_mask(np.ones((32, 48), np.uint8))
    with pytest.raises(MaskDecodeError, match=r"mask size \(32, 48\) != video size \(64, 96\)"):
        decode_segmentation(rle, 64, 96)


# ---------------------------------------------------------------------------------------------------------
# pooling


def test_pool_mask_grid_aligned_fractions():
    m = _box(56, 84, 0, 28, 0, 14)  # left half of cell (0, 0)
    m[28:35, 56:84] = 1  # top quarter of cell (1, 2)
    pooled = pool_mask(m, (56, 84))
    expected = np.zeros((2, 3), np.float32)
    expected[0, 0], expected[1, 2] = 0.5, 0.25
    assert pooled.dtype == np.float32 and np.array_equal(pooled, expected)


def test_pool_mask_rescales_to_model_size():
    # original 112x168 -> model frame 56x84: every 56x56 original block is one token cell
    m = _box(112, 168, 0, 56, 0, 28)
    assert np.allclose(pool_mask(m, (56, 84)), [[0.5, 0, 0], [0, 0, 0]])
    # non-integer scale: 30 rows into one 28-px cell; top 15 rows are half of it
    assert np.allclose(pool_mask(_box(30, 30, 0, 15, 0, 30), (28, 28)), [[0.5]])
    assert np.allclose(pool_mask(np.ones((37, 53), np.uint8), (56, 84)), 1.0)


def test_pool_mask_rejects_unaligned_size():
    with pytest.raises(ValueError, match="multiple of 28"):
        pool_mask(np.ones((10, 10), np.uint8), (50, 56))


# ---------------------------------------------------------------------------------------------------------
# group targets

HW = (56, 84)


def _ann(frames: dict[int, np.ndarray | None]) -> dict:
    return {str(f): {"segmentation": None if m is None else encode_mask(m)} for f, m in frames.items()}


def test_frame_zero_only_gives_one_valid_group():
    ann = _ann({0: _box(*HW, 0, 28, 0, 28)})
    targets, valid = object_group_targets(ann, [0, 5, 10, 15], HW, HW)
    assert valid.tolist() == [True, False]
    assert targets.shape == (2, 6) and targets[0].tolist() == [1, 0, 0, 0, 0, 0] and not targets[1].any()


def test_union_is_pixel_union_and_mean_averages_annotated_frames():
    left, right = _box(*HW, 0, 28, 0, 14), _box(*HW, 0, 28, 14, 28)  # two halves of cell (0, 0)
    ann = _ann({3: left, 4: right, 8: left})
    union, valid = object_group_targets(ann, [3, 4, 7, 8], HW, HW, pair_mode="union")
    mean, _ = object_group_targets(ann, [3, 4, 7, 8], HW, HW, pair_mode="mean")
    assert valid.tolist() == [True, True]
    assert union[0, 0] == 1.0  # a max of pooled maps would give 0.5
    assert mean[0, 0] == 0.5
    # group 1: only frame 8 is annotated, so both modes give its own map
    assert union[1, 0] == mean[1, 0] == 0.5


def test_null_segmentation_unsampled_frames_and_padding():
    ann = _ann({1: None, 2: _box(*HW, 28, 56, 56, 84), 40: _box(*HW, 0, 28, 0, 28)})
    assert annotated_frames(ann) == [2, 40]
    targets, valid = object_group_targets(ann, [0, 1, 2, 2], HW, HW)  # padded; frame 40 not sampled
    assert valid.tolist() == [False, True] and targets[1].tolist() == [0, 0, 0, 0, 0, 1]


def test_group_targets_errors():
    ann = _ann({0: np.ones((28, 28), np.uint8)})
    with pytest.raises(MaskDecodeError, match=r"frame 0: mask size \(28, 28\) != video size \(56, 84\)"):
        object_group_targets(ann, [0, 1], HW, HW)
    with pytest.raises(ValueError, match="pair_mode"):
        object_group_targets(ann, [0, 1], HW, HW, pair_mode="max")
    with pytest.raises(ValueError, match="multiple of temporal_patch"):
        object_group_targets(ann, [0, 1, 2], HW, HW)
    with pytest.raises(MaskDecodeError, match="not an integer"):
        annotated_frames({"first": {"segmentation": None}})


def test_corrupt_rle_counts_are_rejected():
    with pytest.raises(MaskDecodeError, match="corrupt RLE"):
        decode_segmentation({"size": [56, 84], "counts": "zzzzzz"})
