"""swim.data.video: sizes, frame selection, patch order, decoding, and equality with the HF video processor."""

from __future__ import annotations

import importlib.util
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from swim.data.video import (
    QWEN_MEAN,
    QWEN_STD,
    VideoDecodeError,
    VideoSettings,
    _with_timeout,
    frame_max_pixels,
    load_video,
    patchify,
    probe_video,
    read_frames,
    resize_frames,
    select_frame_indices,
    smart_resize,
    write_video,
)

S = VideoSettings()


def _frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth-ish test frames (codec-friendly): gradients plus a moving square."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((n, h, w, 3), np.uint8)
    for t in range(n):
        out[t, ..., 0] = (xx * 255 // w + 10 * t) % 256
        out[t, ..., 1] = yy * 255 // h
        out[t, 8 + t : 24 + t, 8 + 2 * t : 24 + 2 * t, 2] = 200
    return out


# ---------------------------------------------------------------------------------------------------------
# smart_resize and the per-frame budget


@pytest.mark.parametrize(
    ("hw", "mn", "mx", "expected"),
    [
        ((28, 28), 56 * 56, 14 * 14 * 4 * 1280, (56, 56)),  # too small: ceil after scaling by 2
        ((720, 1280), 128 * 784, 768 * 784, (560, 1008)),  # too big: floor (docs/official_release.md §3.2)
        ((360, 640), 128 * 784, 768 * 784, (364, 644)),  # in range: nearest multiple of 28
        ((112, 112), 128 * 784, 768 * 784, (336, 336)),  # sqrt(8) * 112 / 28 = 11.3 -> 12
        # ratio exactly 200 is allowed; HF rounds 10 px to 0 (no max(factor, .)), so the min-area branch runs
        ((10, 2000), 28 * 28, 10**7, (28, 420)),
    ],
)
def test_smart_resize_cases(hw, mn, mx, expected):
    assert smart_resize(*hw, 28, mn, mx) == expected


def test_smart_resize_rejects_extreme_aspect_ratio():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)


def test_frame_max_pixels_rule():
    # max(min(VIDEO_MAX_PIXELS, total / n * 2), int(min_pixels * 1.05))
    assert frame_max_pixels(32, S) == 768 * 784
    assert frame_max_pixels(400, S) == int(S.total_pixels / 400 * 2)
    assert frame_max_pixels(4000, S) == int(128 * 784 * 1.05)


# ---------------------------------------------------------------------------------------------------------
# frame selection


def test_uniform_selection():
    assert select_frame_indices(100, 25.0, replace(S, num_frames=4)) == [0, 33, 66, 99]


def test_annotated_frames_are_kept_and_budget_filled():
    idx = select_frame_indices(100, 25.0, replace(S, num_frames=4), keep=[50, 5, 5, 500])
    assert idx == [0, 5, 50, 99]  # 500 is out of range and dropped; 0 and 99 fill the budget


def test_more_annotated_frames_than_budget_are_subsampled():
    keep = list(range(0, 100, 2))
    idx = select_frame_indices(100, 25.0, replace(S, num_frames=32, max_frames=8), keep=keep)
    assert len(idx) == 8 and set(idx) <= set(keep) and idx == sorted(idx)
    assert idx[0] == 0 and idx[-1] == 98


def test_max_frames_caps_the_budget():
    assert len(select_frame_indices(1000, 30.0, replace(S, num_frames=64, max_frames=32))) == 32
    # an odd cap is rounded down so that padding cannot exceed it
    assert len(select_frame_indices(1000, 30.0, replace(S, num_frames=64, max_frames=7))) == 6


def test_odd_count_is_padded_with_last_index():
    idx = select_frame_indices(100, 25.0, replace(S, num_frames=7))
    assert len(idx) == 8 and idx[-1] == idx[-2] and len(set(idx)) == 7


def test_short_video_takes_every_frame_once():
    assert select_frame_indices(5, 30.0, S) == [0, 1, 2, 3, 4, 4]
    assert select_frame_indices(1, 30.0, S) == [0, 0]


def test_fps_based_selection():
    idx = select_frame_indices(100, 25.0, replace(S, sample_fps=2.0))  # 4 s at 2 fps
    assert len(idx) == 8 and idx[0] == 0 and idx[-1] == 99


# ---------------------------------------------------------------------------------------------------------
# patchify


def test_patch_order_is_t_h_w_after_merging():
    settings = replace(S, patch_size=2, merge_size=2, temporal_patch_size=2)
    t_frames, gh, gw, p = 4, 4, 6, 2
    frames = torch.zeros(t_frames, 3, gh * p, gw * p)
    for t in range(t_frames):
        for i in range(gh):
            for j in range(gw):
                frames[t, :, i * p : (i + 1) * p, j * p : (j + 1) * p] = torch.tensor(
                    [10.0 * t, 20.0 * i, 20.0 * j]
                ).view(3, 1, 1)
    pv, grid = patchify(frames, settings)
    assert grid == (2, gh, gw) and pv.shape == (2 * gh * gw, 3 * 2 * p * p)
    # undo normalisation; columns are (channel, tp, p, p)
    mean, std = torch.tensor(QWEN_MEAN), torch.tensor(QWEN_STD)
    raw = (pv.view(-1, 3, 2, p * p) * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)) * 255
    decoded = raw.mean(-1).round()  # [rows, channel, tp]
    row = 0
    for gt in range(2):
        for bi in range(gh // 2):
            for bj in range(gw // 2):
                for mi in range(2):
                    for mj in range(2):
                        i, j = 2 * bi + mi, 2 * bj + mj
                        assert decoded[row, 0].tolist() == [10.0 * 2 * gt, 10.0 * (2 * gt + 1)]
                        assert decoded[row, 1].tolist() == [20.0 * i] * 2
                        assert decoded[row, 2].tolist() == [20.0 * j] * 2
                        # merged token index k = (t*(h/2) + bi)*(w/2) + bj owns rows 4k..4k+3
                        assert row // 4 == (gt * (gh // 2) + bi) * (gw // 2) + bj
                        row += 1


def test_patchify_pads_odd_frame_count_with_last_frame():
    frames = torch.rand(3, 3, 28, 28) * 255
    pv, grid = patchify(frames, S)
    pv4, _ = patchify(torch.cat([frames, frames[-1:]]), S)
    assert grid == (2, 2, 2) and torch.equal(pv, pv4)


# ---------------------------------------------------------------------------------------------------------
# decoding


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    path = tmp_path_factory.mktemp("vid") / "clip.mp4"
    frames = _frames(16, 64, 96)
    write_video(path, frames, fps=8, crf=0)
    return path, frames


def test_mp4_read_back_with_decord_and_pyav(mp4):
    path, source = mp4
    pytest.importorskip("decord")
    idx = [0, 5, 10, 15, 15]
    info = probe_video(path, replace(S, backend="pyav"))
    assert (info.num_frames, info.fps, info.height, info.width) == (16, 8.0, 64, 96)
    assert probe_video(path, replace(S, backend="decord")) == info
    a = read_frames(path, idx, replace(S, backend="decord"))
    b = read_frames(path, idx, replace(S, backend="pyav"))
    assert a.shape == (5, 64, 96, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)  # both decode with FFmpeg
    assert np.abs(a.astype(int) - source[idx].astype(int)).mean() < 4  # yuv420p chroma loss only


def test_load_video_clip_fields(mp4):
    path, _ = mp4
    settings = replace(S, num_frames=4, min_pixels=28 * 28, max_pixels=56 * 84)
    clip = load_video(path, settings, keep=[3])
    assert clip.frame_indices == [0, 3, 8, 15]
    assert clip.original_hw == (64, 96) and clip.resized_hw == (56, 84)
    assert clip.grid_thw == (2, 4, 6) and clip.pixel_values.shape == (2 * 4 * 6, 1176)
    assert clip.source_fps == 8.0
    assert clip.second_per_grid_ts == pytest.approx(2 / (8.0 * 4 / 16))  # 4 of 16 frames at 8 fps -> 2 fps


def test_frame_folder_video(tmp_path):
    frames = _frames(5, 32, 48)
    for t, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / f"{t:05d}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    info = probe_video(tmp_path, replace(S, folder_fps=24.0))
    assert (info.num_frames, info.fps, info.height, info.width) == (5, 24.0, 32, 48)
    assert np.array_equal(read_frames(tmp_path, [4, 0], S), frames[[4, 0]])
    clip = load_video(tmp_path, replace(S, min_pixels=28 * 28, max_pixels=28 * 56))
    assert clip.frame_indices == [0, 1, 2, 3, 4, 4] and clip.grid_thw == (3, 2, 4)
    assert clip.second_per_grid_ts == pytest.approx(2 / 24)


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_corrupt_file_raises_quickly(tmp_path, backend):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    start = time.perf_counter()
    with pytest.raises(VideoDecodeError, match="bad.mp4"):
        load_video(bad, replace(S, backend=backend))
    assert time.perf_counter() - start < 5


def test_missing_and_empty_inputs_raise(tmp_path):
    with pytest.raises(VideoDecodeError, match="no such file"):
        probe_video(tmp_path / "absent.mp4")
    with pytest.raises(VideoDecodeError, match="no .*frames"):
        probe_video(tmp_path)


def test_decode_timeout_never_hangs():
    start = time.perf_counter()
    with pytest.raises(VideoDecodeError, match="longer than"):
        _with_timeout(lambda: time.sleep(3), 0.1, "slow.mp4")
    assert time.perf_counter() - start < 1


# ---------------------------------------------------------------------------------------------------------
# equality with the official HF video processor (needs torchvision)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision not installed")
@pytest.mark.parametrize(("n_frames", "hw"), [(3, (50, 70)), (4, (64, 96))])
def test_matches_hf_video_processor(n_frames, hw):
    # On CPU-only machines the CUDA torchvision wheel imports through the shim `make setup` installs
    # (tools/tv_cpu_shim.py); elsewhere torchvision imports as it is.
    pytest.importorskip("torchvision")
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    for h in range(20, 400, 37):
        for w in range(20, 700, 53):
            assert smart_resize(h, w, 28, 56 * 56, 200 * 200) == hf_smart_resize(h, w, 28, 56 * 56, 200 * 200)

    settings = replace(S, min_pixels=56 * 56, max_pixels=112 * 140)
    frames = np.random.default_rng(1).integers(0, 256, (n_frames, *hw, 3), dtype=np.uint8)
    proc = Qwen2VLVideoProcessor(
        size={"shortest_edge": settings.min_pixels, "longest_edge": settings.max_pixels},
        cap_pixels_per_frame=False,
    )
    ref = proc(videos=[frames], return_tensors="pt")
    target = smart_resize(*hw, 28, settings.min_pixels, settings.max_pixels)
    ours, grid = patchify(resize_frames(frames, target), settings)
    assert list(ref["video_grid_thw"][0]) == list(grid)
    assert (ours - ref["pixel_values_videos"]).abs().max().item() <= 1e-5
