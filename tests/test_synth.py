"""swim.data.synth (shapes, cli): exact occlusion-aware masks, distractors, record formats, determinism, CLI."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest

from swim.data.masks import decode_segmentation, object_group_targets
from swim.data.synth.cli import main
from swim.data.synth.shapes import (
    BENCH_Q_TYPES,
    PALETTE,
    SceneObject,
    SynthConfig,
    generate,
    object_attributes,
    render,
    sample_scene,
    shape_mask,
)
from swim.data.video import VideoSettings, load_video, read_frames

CFG = SynthConfig()
COUNTS = {"train": 6, "val": 2, "bench_q": 5, "bench_d": 2}


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate(out, CFG, seed=3, counts=COUNTS)
    return out


def _load(out, split):
    return json.loads((out / f"{split}.json").read_text())


def test_masks_are_exact_and_occlusion_aware():
    below = SceneObject("square", "red", "right", 10.0, 10.0)
    above = SceneObject("circle", "blue", "left", 20.0, 14.0)
    video = render([below, above], CFG)  # `above` is drawn last, on top
    for t in range(CFG.frames):
        red, blue = below.masks[t], above.masks[t]
        assert not (red & blue).any()
        assert np.array_equal(red | blue, video[t].any(-1))  # masks cover exactly the drawn pixels
        assert (video[t][red] == PALETTE["red"]).all() and (video[t][blue] == PALETTE["blue"]).all()
        top = shape_mask("circle", *above.position(t, CFG.speed), CFG.object_size, CFG.size)
        assert np.array_equal(blue, top)  # the top object is never occluded
    assert below.masks[0].sum() < 22 * 22  # the square is partly hidden behind the circle at frame 0


def test_distractors_share_one_attribute_and_pairs_are_unique():
    rng = np.random.default_rng(0)
    cfg = replace(CFG, p_same_shape=1.0, p_same_colour=1.0, min_distractors=3, max_distractors=3)
    for _ in range(20):
        attrs = object_attributes(rng, cfg)
        (shape, colour), rest = attrs[0], attrs[1:]
        assert len(attrs) == 4 and len(set(attrs)) == 4
        assert (shape, colour) not in rest
        assert any(s == shape and c != colour for s, c in rest)
        assert any(s != shape and c == colour for s, c in rest)


def test_scene_objects_stay_in_frame_and_visible():
    rng = np.random.default_rng(1)
    for _ in range(10):
        objects, video = sample_scene(rng, CFG)
        assert video.shape == (8, 112, 112, 3) and video.dtype == np.uint8
        for obj in objects:
            assert all(m.any() for m in obj.masks)


def test_refer_records_format(synth_dir):
    records = _load(synth_dir, "train")
    assert len(records) == COUNTS["train"]
    for r in records:
        assert set(r) == {"video", "index", "conversations", "annotation", "height", "width", "scene"}
        assert r["scene"][0]["annotation"] == r["annotation"][0]  # the referred object comes first
        assert (synth_dir / r["video"]).is_file() and not r["video"].startswith("/")
        question, answer = (c["value"] for c in r["conversations"])
        assert [c["from"] for c in r["conversations"]] == ["human", "gpt"]
        tags = re.findall(r"<ins>(\w+)</ins>", question)
        assert len(tags) == len(r["annotation"]) == 1 and "<ins>" not in answer
        frames = r["annotation"][0]
        assert all(k.isdigit() for k in frames)
        seg = frames[min(frames, key=int)]["segmentation"]
        assert isinstance(seg["counts"], str)
        assert decode_segmentation(seg, r["height"], r["width"]).any()
        if "_qa_" in r["index"]:
            assert re.fullmatch(r"\([A-D]\) .+", answer) and answer.split(" ", 1)[1] in question


def test_bench_records_format(synth_dir):
    bench_q = _load(synth_dir, "bench_q")
    assert [r["type"] for r in bench_q] == list(BENCH_Q_TYPES)
    for r in bench_q:
        assert {"id", "video", "Question", "type", "options", "Answer", "annotation"} <= set(r)
        assert r["Answer"] in r["options"] and len(r["options"]) == 4
        assert [o[:3] for o in r["options"]] == ["(A)", "(B)", "(C)", "(D)"]
        assert r["Question"].count("<ins>") == len(r["annotation"])
    for r in _load(synth_dir, "bench_d"):
        assert r["conversations"][1]["value"] == r["caption"] and "<ins>" in r["conversations"][0]["value"]
        assert len(r["annotation"]) == 1


def test_same_seed_is_byte_identical(synth_dir, tmp_path):
    generate(tmp_path, CFG, seed=3, counts=COUNTS)
    for split in COUNTS:
        assert (tmp_path / f"{split}.json").read_bytes() == (synth_dir / f"{split}.json").read_bytes()
    other = tmp_path / "other"
    generate(other, CFG, seed=4, counts={"train": 2})
    assert (other / "train.json").read_bytes() != (synth_dir / "train.json").read_bytes()


def test_videos_decode_and_masks_fit_the_token_grid(synth_dir):
    r = _load(synth_dir, "train")[0]
    path = synth_dir / r["video"]
    frames = read_frames(path, list(range(CFG.frames)))
    assert frames.shape == (8, 112, 112, 3)
    # the referred object's colour is what the codec shows inside its (slightly eroded) mask
    obj = r["annotation"][0]
    mask = decode_segmentation(obj["0"]["segmentation"], 112, 112)
    interior = mask & np.roll(mask, 2, 0) & np.roll(mask, -2, 0) & np.roll(mask, 2, 1) & np.roll(mask, -2, 1)
    colour = next(c for c in PALETTE if f" {c} <ins>" in r["conversations"][0]["value"])
    assert np.abs(frames[0][interior.astype(bool)].mean(0) - PALETTE[colour]).max() < 25
    settings = VideoSettings(num_frames=8, min_pixels=112 * 112, max_pixels=112 * 112)
    clip = load_video(path, settings, keep=[int(k) for k in obj])
    assert clip.grid_thw == (4, 8, 8) and clip.second_per_grid_ts == pytest.approx(1.0)
    targets, valid = object_group_targets(
        obj, clip.frame_indices, clip.original_hw, clip.resized_hw, pair_mode="mean"
    )
    assert valid.all() and targets.shape == (4, 16)
    mask1 = decode_segmentation(obj["1"]["segmentation"], 112, 112)
    assert targets[0].sum() * 28 * 28 == pytest.approx((mask.sum() + mask1.sum()) / 2, rel=1e-5)


def test_bench_q_as_frame_folders(tmp_path):
    generate(tmp_path, replace(CFG, bench_q_frame_folders=True), seed=0, counts={"bench_q": 1})
    folder = tmp_path / _load(tmp_path, "bench_q")[0]["video"]
    assert folder.is_dir() and len(list(folder.glob("*.jpg"))) == CFG.frames


def test_cli(tmp_path):
    main(
        [str(tmp_path), "--seed", "1", "--num-train", "2", "--num-val", "1", "--num-bench-q", "0",
         "--num-bench-d", "0", "--size", "56", "--frames", "4", "--object-size", "14", "--speed", "2",
         "--colours", "red", "blue", "--codec", "mpeg4"]
    )  # fmt: skip
    records = _load(tmp_path, "train")
    assert len(records) == 2 and records[0]["height"] == 56
    cfg = json.loads((tmp_path / "synth_config.json").read_text())
    assert cfg["colours"] == ["red", "blue"] and cfg["seed"] == 1
    assert read_frames(tmp_path / records[0]["video"], [0, 3]).shape == (2, 56, 56, 3)


def test_config_rejects_impossible_motion():
    with pytest.raises(ValueError, match="travel"):
        SynthConfig(size=56, frames=16, speed=4)


def test_shifted_split_changes_the_drawing_not_the_training_split(synth_dir, tmp_path):
    shifted = replace(CFG, size=160, height=96, frames=12, fps=6.0, object_size=24, min_distractors=2,
                      max_distractors=4, min_visible=0.3, annotated_fraction=0.5, templates="shifted")  # fmt: skip
    generate(tmp_path, shifted, seed=3, counts={"val_shifted": 6})
    records = _load(tmp_path, "val_shifted")
    for r in records:
        assert (r["height"], r["width"]) == (96, 160) and 3 <= len(r["scene"]) <= 5
        frames = sorted(int(f) for f in r["annotation"][0])
        assert len(frames) <= 6 and all(0 <= f < 12 for f in frames)  # masks on half of the 12 frames at most
        mask = decode_segmentation(r["annotation"][0][str(frames[0])]["segmentation"])
        assert mask.shape == (96, 160) and mask.any()
        question = r["conversations"][0]["value"].split("\n")[0]
        assert not any(
            question.startswith(t.split("{")[0])
            for t in ("Describe the {", "What does the {", "How does the {", "Which way does the {")
        )
    frames = read_frames(tmp_path / records[0]["video"], [0, 11])
    assert frames.shape == (2, 96, 160, 3)
    # the training distribution is untouched by the new knobs: still byte-identical to a fresh generation
    again = tmp_path / "again"
    generate(again, CFG, seed=3, counts=COUNTS)
    assert (again / "train.json").read_bytes() == (synth_dir / "train.json").read_bytes()
    with pytest.raises(ValueError, match="templates must be one of"):
        replace(CFG, templates="other")
