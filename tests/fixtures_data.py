"""Hand-made data for the data tests: tiny mp4s, RLE masks and record files (no downloads, fast)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from swim.data.masks import encode_mask
from swim.data.video import VideoSettings, write_video

VIDEO_HW = (56, 84)  # even sides (yuv420p); smart_resize keeps 56x84 -> a 2x3 merged-token grid per group
N_FRAMES = 8
FPS = 4.0

# Small budgets so every clip stays 56x84 and 4 frames (2 temporal groups x 6 tokens = 12 video tokens).
SMALL = VideoSettings(
    num_frames=4, max_frames=4, min_pixels=28 * 28, max_pixels=56 * 84, total_pixels=56 * 84 * 4
)


@functools.lru_cache(maxsize=1)
def tokenizer():
    from swim.tiny import build_tokenizer

    return build_tokenizer()


def write_clip(path: Path, n_frames: int = N_FRAMES, hw: tuple[int, int] = VIDEO_HW, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 255, size=(n_frames, *hw, 3), dtype=np.uint8)
    write_video(path, frames, FPS, codec="mpeg4")
    return path


def box_mask(hw=VIDEO_HW, box=(0, 0, 28, 28)) -> np.ndarray:
    """uint8 [H, W] with ones in rows box[0]:box[2], cols box[1]:box[3]."""
    m = np.zeros(hw, np.uint8)
    m[box[0] : box[2], box[1] : box[3]] = 1
    return m


def rle(mask: np.ndarray) -> dict:
    return encode_mask(mask)


def object_annotation(frames, hw=VIDEO_HW, box=(0, 0, 28, 28)) -> dict:
    return {str(f): {"segmentation": rle(box_mask(hw, box))} for f in frames}


def nl_refer(
    video: str, question: str, answer: str, objects: list[dict], index: str = "videorefer_detailed_0"
):
    return {
        "video": video,
        "index": index,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
        "annotation": objects,
    }


def llava(video: str, question: str = "<video>\nWhat happens?", answer: str = "A dog runs.") -> dict:
    return {
        "video": video,
        "data_source": "LLaVA-Video-178K",
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
    }


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path
