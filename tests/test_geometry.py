"""Boxes, points and polylines -> token-cell targets (hand-computed), on images and videos, and their validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures_data import SMALL, VIDEO_HW, object_annotation, tokenizer, write_clip, write_json
from PIL import Image

from swim.data.dataset import SwimDataset
from swim.data.geometry import box_cover, points_cover, polyline_mask
from swim.data.masks import object_group_targets
from swim.data.records import RecordError, load_records
from swim.data.validate import main as validate_main

# a 56x84 image is a 2x3 grid of 28-px merged tokens (Qwen2/2.5-VL); 112x168 resizes to the same grid
GRID = (2, 3)


def test_box_covers_cells_by_exact_area_fraction():
    # x 14..42 covers the right half of column 0 and the left half of column 1; y 0..28 the whole of row 0
    assert box_cover([14, 0, 42, 28], (56, 84), GRID).tolist() == [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]
    # the same box in a 2x larger original: coordinates are original pixels
    assert box_cover([28, 0, 84, 56], (112, 168), GRID).tolist() == [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]
    # a fractional box: y 21..35 covers a quarter of row 0 and a quarter of row 1, x 0..84 every column
    np.testing.assert_allclose(box_cover([0, 21, 84, 35], (56, 84), GRID), [[0.25] * 3, [0.25] * 3])


def test_points_cover_the_cell_they_fall_in():
    cover = points_cover([[10, 10], [83.9, 55], [84, 56]], (56, 84), GRID)  # the far edge is the last cell
    assert cover.tolist() == [[1, 0, 0], [0, 0, 1]]
    assert points_cover([[28, 28]], (56, 84), GRID).tolist() == [[0, 0, 0], [0, 1, 0]]  # an edge: right/below


def test_polyline_is_rasterised_then_area_pooled():
    # horizontal, 2 px thick at y = 14: pixel rows 13 and 14 (centres 13.5, 14.5), the whole width
    mask = polyline_mask([[0, 14], [84, 14]], 2, (56, 84))
    assert mask.sum() == 2 * 84 and mask[13].all() and mask[14].all()
    ann = {"0": {"polyline": [[0, 14], [84, 14]], "width": 2}}
    targets, valid = object_group_targets(ann, [0], (56, 84), (56, 84), temporal_patch=1)
    np.testing.assert_allclose(targets.reshape(GRID), [[2 * 28 / 784] * 3, [0] * 3], rtol=1e-6)
    assert valid.tolist() == [True]
    # a diagonal through the centre of cell (0, 0) and (1, 1) only
    diagonal = polyline_mask([[4, 4], [52, 52]], 3, (56, 84))
    cover = object_group_targets({"0": {"polyline": [[4, 4], [52, 52]], "width": 3}}, [0], (56, 84), (56, 84),
                                 temporal_patch=1)[0].reshape(GRID)  # fmt: skip
    assert (cover[0, 0] > 0) and (cover[1, 1] > 0) and cover[0, 2] == cover[1, 2] == 0
    assert cover.sum() * 784 == pytest.approx(diagonal.sum())


def test_video_group_combines_kinds_per_frame():
    # group 0 = frames 0, 1: a box on frame 0, a point on frame 1; group 1 = frames 2, 3: nothing
    ann = {"0": {"box": [0, 0, 14, 28]}, "1": {"points": [[70, 40]]}}
    union, valid = object_group_targets(ann, [0, 1, 2, 3], (56, 84), (56, 84), pair_mode="union")
    assert valid.tolist() == [True, False]
    assert union[0].reshape(GRID).tolist() == [[0.5, 0, 0], [0, 0, 1]] and not union[1].any()
    mean, _ = object_group_targets(ann, [0, 1, 2, 3], (56, 84), (56, 84), pair_mode="mean")
    assert mean[0].reshape(GRID).tolist() == [[0.25, 0, 0], [0, 0, 0.5]]


def _png(path, hw=VIDEO_HW):
    Image.fromarray(np.full((*hw, 3), 40, np.uint8)).save(path)
    return path.name


def klal_record(images, annotation, answer="C5", question="Where is the red square?"):
    return {
        "image": images,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
        "annotation": annotation,
    }


def test_image_records_become_vision_token_targets(tmp_path):
    """Two images of different sizes: one group each, targets on each image's own grid, in sequence order."""
    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png", (28, 56))  # 2x3 and 1x2 merged tokens
    ann = [{"0": {"box": [14, 0, 42, 28]}, "1": {"points": [[40, 5]]}}]
    write_json(tmp_path / "r.json", [klal_record([a, b], ann)])
    s = SwimDataset(
        load_records(tmp_path / "r.json")[0], SMALL, tokenizer(), query="answer_last", strict=True
    )[0]
    assert s["image_grid_thw"].tolist() == [[1, 4, 6], [1, 2, 4]]
    assert s["vision_token_group"].tolist() == [0] * 6 + [1] * 2
    assert s["vision_token_cell"].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2], [0, 0], [0, 1]]
    assert s["object_targets"].tolist() == [[0.5, 0.5, 0, 0, 0, 0, 0, 1]]
    assert s["object_group_valid"].tolist() == [[True, True]]
    assert int((s["mm_token_type_ids"] == 1).sum()) == 8 and len(s["query_positions"]) == 1


def test_validate_reports_every_bad_geometry_on_one_line(tmp_path, capsys):
    name = _png(tmp_path / "a.png")
    records = [
        klal_record(name, [{"0": {"box": [0, 0, 90, 28]}}]),  # outside the 84 px width
        klal_record(name, [{"0": {"box": [10, 0, 10, 28]}}]),  # degenerate
        klal_record(name, [{"0": {"points": [[1, 2, 3]]}}]),  # wrong arity
        klal_record(name, [{"0": {"polyline": [[1, 2]], "width": 2}}]),  # one point
        klal_record(name, [{"0": {"points": [[1, 2]], "box": [0, 0, 1, 1]}}]),  # two kinds
        klal_record(name, [{"1": {"points": [[1, 2]]}}]),  # image index beyond the record's one image
        klal_record(name, [{"0": {"points": [[-1, 2]]}}]),  # a point outside
        klal_record(name, [{"0": {"polyline": [[0, 0], [84, 56]], "width": 3}}]),  # good
    ]
    write_json(tmp_path / "r.json", records)
    with pytest.raises(SystemExit) as exit_info:
        validate_main([str(tmp_path / "r.json"), "--query", "answer_last"])
    assert exit_info.value.code == 1
    lines = capsys.readouterr().out.strip().splitlines()
    path = tmp_path / "r.json"
    assert lines == [
        f"{path}:0: annotation[0]['0'].box: box [0, 0, 90, 28] outside the 84x56 image (x in [0, 84], y in [0, 56])",
        f"{path}:1: annotation[0]['0'].box: degenerate box [10, 0, 10, 28]: needs x0 < x1 and y0 < y1",
        f"{path}:2: annotation[0]['0'].points: a point must be [x, y] (two numbers), got [1, 2, 3]",
        f"{path}:3: annotation[0]['0'].polyline: polyline needs at least 2 points, got 1",
        f"{path}:4: annotation[0]['0']: expected exactly one of segmentation, box, points, polyline; got keys "
        "['box', 'points']",
        f"{path}:5: annotation[0]['1']: frame index 1 beyond the record's 1 image(s)",
        f"{path}:6: annotation[0]['0'].points: 1 point(s) outside the 84x56 image, first [-1, 2]",
    ]


def test_dataset_skips_out_of_bounds_geometry_and_strict_raises(tmp_path):
    name = _png(tmp_path / "a.png")
    write_json(tmp_path / "r.json", [klal_record(name, [{"0": {"box": [0, 0, 90, 28]}}]),
                                     klal_record(name, [{"0": {"box": [0, 0, 28, 28]}}])])  # fmt: skip
    records = load_records(tmp_path / "r.json")[0]
    ds = SwimDataset(records, SMALL, tokenizer(), query="answer_last")
    assert ds[0]["object_targets"].tolist() == [[1, 0, 0, 0, 0, 0]] and ds.skips.counts == {
        "out_of_bounds": 1
    }
    with pytest.raises(RecordError, match="outside the 84x56 image"):
        SwimDataset(records, SMALL, tokenizer(), query="answer_last", strict=True)[0]


def test_video_record_with_boxes(tmp_path):
    write_clip(tmp_path / "v.mp4")
    ann = {"0": {"box": [0, 0, 28, 28]}, "5": {"points": [[80, 50]]}}
    rec = {"video": "v.mp4", "conversations": [{"from": "human", "value": "Where does the <ins>dog</ins> go?"},
                                               {"from": "gpt", "value": "Right."}], "annotation": [ann]}  # fmt: skip
    write_json(tmp_path / "r.json", [rec])
    s = SwimDataset(load_records(tmp_path / "r.json")[0], SMALL, tokenizer(), strict=True)[0]
    # frames 0 and 5 are kept among the 4 sampled: groups (0, a) and (b, 5)
    targets = s["object_targets"][0].view(2, 6)
    assert targets[0].tolist() == [1, 0, 0, 0, 0, 0] and targets[1].tolist() == [0, 0, 0, 0, 0, 1]
    assert s["vision_token_group"].tolist() == [0] * 6 + [1] * 6
    mask_ann = object_annotation([0], box=(0, 0, 28, 28))  # the same box as a mask gives the same target
    rec["annotation"] = [mask_ann]
    write_json(tmp_path / "m.json", [rec])
    m = SwimDataset(load_records(tmp_path / "m.json")[0], SMALL, tokenizer(), strict=True)[0]
    assert torch.equal(m["object_targets"][0, :6], s["object_targets"][0, :6])
