"""The segmentation demo's class-agnostic SAM-2 base (`swim seg pretrain-sam2`): prompts built from the synthetic
scenes, positional codes shared between prompts and image, and the build cached by content hash."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from swim.demos import sam_base
from swim.demos.sam_base import (
    SamBaseConfig,
    ScenePool,
    area_fractions,
    bounding_boxes,
    build_sam_base,
    cached_sam_base,
    class_count,
    label_loss,
    object_class,
    predict,
    sample_prompts,
)
from swim.seg.sam2 import build_tiny_sam2

ROOT = Path(__file__).resolve().parents[1]
SYNTH = {"size": 56, "frames": 2, "object_size": 14, "min_distractors": 2, "max_distractors": 2}


def _config(**changes) -> SamBaseConfig:
    cfg = SamBaseConfig.from_yaml(ROOT / "recipes" / "seg_sam_base.yaml")
    cfg.synth, cfg.num_scenes, cfg.num_val, cfg.steps, cfg.batch_size, cfg.hidden = (
        dict(SYNTH),
        4,
        4,
        2,
        2,
        32,
    )
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def test_point_and_image_positions_share_one_code(tmp_path):
    """A point at a cell's centre gets the code of that cell in the image-wide positional map. transformers
    draws the two random matrices independently; without tying them a point names a position the image does
    not use, and a point-prompted SAM-2 cannot learn where it points."""
    from transformers import Sam2Model

    sam = Sam2Model.from_pretrained(build_tiny_sam2(tmp_path / "sam", size=128, hidden=32))
    image_pe = sam.get_image_wide_positional_embeddings()[0]  # [C, h, h]
    side, cells = 128, image_pe.shape[-1]
    for row, col in [(0, 0), (2, 5), (7, 3)]:
        centre = torch.tensor([[[[(col + 0.5) * side / cells, (row + 0.5) * side / cells]]]])
        code = sam.prompt_encoder.shared_embedding(centre, (side, side))[0, 0, 0]
        torch.testing.assert_close(code, image_pe[:, row, col], atol=1e-5, rtol=1e-5)


def test_prompts_lie_inside_distinct_objects_of_their_frame():
    from swim.data.synth.shapes import SynthConfig

    pool = ScenePool.draw(SynthConfig(**SYNTH), 3, seed=5)
    assert pool.frames.shape == (3, 2, 56, 56, 3) and pool.masks.shape == (3, 2, 3, 56, 56)
    frames, points, masks, labels = sample_prompts(pool, np.random.default_rng(0), 6, per_frame=2)
    assert frames.shape == (6, 56, 56, 3) and points.shape == (6, 2, 2) and masks.shape == (6, 2, 56, 56)
    assert labels.shape == (6, 56, 56)
    for frame_points, frame_masks, frame_labels in zip(points, masks, labels):
        for (x, y), mask in zip(frame_points, frame_masks):
            assert mask[int(y), int(x)]  # the point is a pixel centre of its object
            assert (
                len(np.unique(frame_labels[mask])) == 1 and frame_labels[mask][0] > 0
            )  # one class per object
        assert not np.array_equal(frame_masks[0], frame_masks[1])  # three objects visible: two distinct ones


def test_object_classes_by_hand():
    from swim.data.synth.shapes import SceneObject, SynthConfig

    synth = SynthConfig(shapes=["square", "ring", "cross"], colours=["red", "green", "blue", "yellow"])
    ring = SceneObject("ring", "blue", "up", 0, 0)
    assert object_class(ring, synth, "shape") == 1 and class_count(synth, "shape") == 4
    assert object_class(ring, synth, "colour_shape") == 2 * 3 + 1 and class_count(synth, "colour_shape") == 13
    with pytest.raises(ValueError, match="labels must be"):
        object_class(ring, synth, "colour")


def test_label_loss_by_hand():
    """Two classes, one cell all class 1 and one split 50/50: the soft cross-entropy and the accuracy on the
    cell an object covers most of."""
    classifier = torch.nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        classifier.weight.zero_()  # uniform logits: log-softmax = log 1/2 everywhere
    embedding = torch.zeros(1, 1, 1, 2)
    target = torch.tensor([[[[0.0, 0.5]], [[1.0, 0.5]]]])  # [B=1, K=2, 1, 2]
    loss, accuracy = label_loss(classifier, embedding, target)
    assert float(loss.detach()) == pytest.approx(np.log(2))
    assert accuracy == 0.0  # arg-max of equal logits is class 0; the first cell's truth is class 1


def test_area_fractions_and_boxes_by_hand():
    mask = np.zeros((1, 8, 8), bool)
    mask[0, 0:4, 0:2] = True  # the left half of the top-left quarter
    fractions = area_fractions(mask, 2)
    torch.testing.assert_close(fractions, torch.tensor([[[0.5, 0.0], [0.0, 0.0]]]), atol=0.05, rtol=0)
    assert bounding_boxes(mask).tolist() == [[0.0, 0.0, 2.0, 4.0]]  # x0, y0, x1, y1 (exclusive)


def test_predict_takes_points_and_boxes_per_frame(tmp_path):
    from transformers import Sam2Model

    sam = Sam2Model.from_pretrained(build_tiny_sam2(tmp_path / "sam", size=128, hidden=32)).eval()
    frames = np.zeros((2, 56, 56, 3), np.uint8)
    with torch.no_grad():
        by_point, embedding = predict(sam, frames, points=np.full((2, 3, 2), 10.0, np.float32))
        by_box, _ = predict(sam, frames, boxes=np.tile(np.float32([4, 4, 20, 20]), (2, 3, 1)))
    assert by_point.shape == by_box.shape == (2, 3, 32, 32) and embedding.shape == (2, 32, 8, 8)


def test_shipped_config_is_the_documented_one():
    from swim.data.synth.shapes import SynthConfig

    cfg = SamBaseConfig.from_yaml(ROOT / "recipes" / "seg_sam_base.yaml")
    synth = SynthConfig(**cfg.synth)
    assert (cfg.prompt, cfg.labels, cfg.label_weight > 0) == ("box", "colour_shape", True)
    assert list(synth.shapes) == ["square", "ring", "cross"] and cfg.seed not in (0, 1, 2, 3, 4, 7, 11)


def test_hash_follows_content(tmp_path):
    assert _config().content_hash() == _config().content_hash()
    assert _config(steps=3).content_hash() != _config().content_hash()
    assert _config(prompt="point").content_hash() != _config(prompt="box").content_hash()


def test_unknown_setting_names_the_file(tmp_path):
    path = tmp_path / "sam.yaml"
    path.write_text("steps: 3\nprompts: box\n")
    with pytest.raises(ValueError, match=r"sam\.yaml.*prompts"):
        SamBaseConfig.from_yaml(path)


def test_build_once_then_reuse(tmp_path, monkeypatch):
    from transformers import Sam2Model

    cfg = _config()
    cache = tmp_path / "cache"
    assert cached_sam_base(cfg, cache) is None
    built = build_sam_base(cfg, cache)
    assert built == cache / f"sam2-{cfg.content_hash()}" == cached_sam_base(cfg, cache)
    summary = json.loads((built / "sam_base.json").read_text())
    assert summary["hash"] == cfg.content_hash() and 0.0 <= summary["held_out_iou"] <= 1.0
    assert 0.0 <= summary["held_out_label_accuracy"] <= 1.0
    assert [e["step"] for e in summary["log"]] == [2] and not list(cache.glob(".build-*"))
    sam = Sam2Model.from_pretrained(built)  # a stock checkpoint, positional codes still tied
    torch.testing.assert_close(
        sam.prompt_encoder.shared_embedding.positional_embedding,
        sam.shared_image_embedding.positional_embedding,
    )

    def no_training(*args, **kwargs):
        raise AssertionError("a cached SAM-2 base must not be trained again")

    monkeypatch.setattr(sam_base, "train_sam_base", no_training)
    assert build_sam_base(cfg, cache) == built
    shutil.rmtree(built)
    with pytest.raises(AssertionError, match="trained again"):
        build_sam_base(cfg, cache)
