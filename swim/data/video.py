"""Video reading, frame selection, resizing and Qwen VL patchify (any family's geometry), without torchvision.

`load_video` is the one call the dataset needs: probe -> select frames -> decode -> smart_resize (with the
qwen-vl-utils per-frame pixel budget) -> bicubic resize -> patchify. The output equals what
`Qwen2VLVideoProcessor` gives for the same frames and size (tested to 1e-5).

Design decisions (differences from the official SWIM loader, docs/official_release.md §3.2 and §7 item 7):
- Annotated frames are always sampled when the budget allows; the frame count never exceeds `max_frames`
  (when more frames are annotated than the budget, the annotated frames are subsampled uniformly).
- Odd frame counts are padded by repeating the last index, as the HF processor pads frames, so the index list
  always has one entry per frame given to the model and temporal group g is `indices[2g], indices[2g+1]`.
- `second_per_grid_ts` uses the real spacing of the sampled frames (`temporal_patch / sampled_fps`, with
  `sampled_fps = source_fps * n_unique_selected / n_total`, the qwen-vl-utils rule), not a constant 1.0.
- Decoding is bounded in time and raises `VideoDecodeError` instead of returning a fake zero frame.
- A folder of JPEG/PNG frames is a video too (VideoRefer-Bench-Q ships DAVIS frame folders); its fps is
  `VideoSettings.folder_fps`, default 24 because DAVIS-2017 was captured at 24 fps.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if (
    TYPE_CHECKING
):  # torch is imported by the functions that resize and patchify: probing and decoding run without it
    import torch

logger = logging.getLogger(__name__)

# OpenAI CLIP statistics, used by Qwen2/2.5-VL's image and video processors (Qwen3-VL and Qwen3.5 use 0.5/0.5:
# `swim.modeling.families` sets the statistics of each family through `VideoSettings`).
QWEN_MEAN = (0.48145466, 0.4578275, 0.40821073)
QWEN_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MAX_ASPECT_RATIO = 200  # transformers' smart_resize limit (qwen-vl-utils allows 1000)

T = TypeVar("T")


class VideoDecodeError(RuntimeError):
    """A video could not be probed or decoded (corrupt, unreadable, unsupported, or too slow)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode video {self.path}: {reason}")


@dataclass
class VideoSettings:
    """How a video becomes model input. Defaults follow the official SWIM training of Qwen2.5-VL (32 uniform
    frames, the qwen-vl-utils pixel budgets); `FamilySpec.video_settings()` gives each family's preset."""

    num_frames: int = 32  # uniform sampling budget (ignored when sample_fps is set)
    sample_fps: float | None = None  # fps-based sampling when set
    max_frames: int = 32  # hard cap on sampled frames, annotated frames included
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28  # per-frame cap (qwen-vl-utils VIDEO_MAX_PIXELS)
    total_pixels: int = int(128000 * 28 * 28 * 0.9)  # whole-video budget (qwen-vl-utils VIDEO_TOTAL_PIXELS)
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, float, float] = QWEN_MEAN
    image_std: tuple[float, float, float] = QWEN_STD
    decode_timeout_s: float = 60.0
    backend: str = "auto"  # "auto" (decord, then PyAV), "decord" or "pyav"
    folder_fps: float = 24.0  # fps assumed for frame folders (DAVIS-2017 is 24 fps)

    @property
    def factor(self) -> int:
        """Side length in pixels of one merged token (28 for Qwen2/2.5-VL, 32 for Qwen3-VL)."""
        return self.patch_size * self.merge_size


@dataclass
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int


@dataclass
class VideoClip:
    """A decoded, patchified video ready for the model.

    `frame_indices` has one entry per frame given to the model (padding repeats included), so temporal
    group g covers `frame_indices[tp*g : tp*(g+1)]` and `len(frame_indices) == grid_thw[0] * tp`.
    """

    pixel_values: torch.Tensor  # float32 [t*h*w, 3*tp*p*p]
    grid_thw: tuple[int, int, int]  # in patches: (frames / tp, H / p, W / p)
    second_per_grid_ts: float  # tp / fps of the sampled frames
    frame_indices: list[int]
    source_fps: float
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    frames: np.ndarray | None = None  # uint8 [T, H0, W0, 3] decoded frames, kept on request (`keep_frames`)


# ---------------------------------------------------------------------------------------------------------
# Sizes and frame selection (pure functions)


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 14 * 14 * 4 * 1280
) -> tuple[int, int]:
    """Target (h, w), both multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    Same arithmetic as `transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize` (5.23), which
    the video processor uses: nearest multiple first, then floor (too big) or ceil (too small) after scaling.
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def frame_max_pixels(num_frames: int, settings: VideoSettings) -> int:
    """Per-frame pixel cap under the whole-video budget (qwen-vl-utils `fetch_video`):
    `max(min(max_pixels, total_pixels / nframes * temporal_patch), int(min_pixels * 1.05))`."""
    share = settings.total_pixels / max(num_frames, 1) * settings.temporal_patch_size
    return int(max(min(settings.max_pixels, share), int(settings.min_pixels * 1.05)))


def video_target_hw(height: int, width: int, num_frames: int, settings: VideoSettings) -> tuple[int, int]:
    """Model frame size (h, w) for a video of `num_frames` sampled frames of size (height, width)."""
    return smart_resize(
        height, width, settings.factor, settings.min_pixels, frame_max_pixels(num_frames, settings)
    )


def _uniform_pick(items: Sequence[int], n: int) -> list[int]:
    """n items spread evenly over `items` (first and last included when n >= 2), order kept."""
    if n >= len(items):
        return list(items)
    if n <= 0:
        return []
    pos = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[p] for p in pos]


def frame_budget(num_total: int, fps: float, settings: VideoSettings) -> int:
    """How many distinct frames to sample: `num_frames`, or duration * `sample_fps` when set; never above
    `max_frames` rounded down to the temporal patch (so padding an odd count cannot exceed the cap)."""
    tp = settings.temporal_patch_size
    cap = max(tp, settings.max_frames // tp * tp)
    if settings.sample_fps is not None:
        if fps <= 0:
            raise ValueError(f"fps-based sampling needs the source fps, got {fps}")
        wanted = max(tp, round(num_total / fps * settings.sample_fps))
    else:
        wanted = settings.num_frames
    return max(1, min(wanted, cap))


def select_frame_indices(
    num_total: int, fps: float, settings: VideoSettings, keep: Sequence[int] = ()
) -> list[int]:
    """Sorted source-frame indices to decode, padded to a multiple of the temporal patch.

    - Budget from `frame_budget`; annotated frames in `keep` (out-of-range ones dropped) are always taken
      and the rest of the budget is filled uniformly from the other frames. If `keep` alone exceeds the
      budget, `keep` is subsampled uniformly.
    - A video with fewer frames than the budget gives all its frames once (no duplicates, unlike the
      official `linspace` sampler), so e.g. 5 frames -> [0, 1, 2, 3, 4, 4].
    - An odd count is padded by repeating the last index, as the HF processor repeats the last frame.
    """
    if num_total <= 0:
        raise ValueError(f"video has no frames (num_total={num_total})")
    budget = min(frame_budget(num_total, fps, settings), num_total)
    kept = sorted({int(k) for k in keep if 0 <= int(k) < num_total})
    if len(kept) >= budget:
        chosen = _uniform_pick(kept, budget)
    else:
        kept_set = set(kept)
        others = [i for i in range(num_total) if i not in kept_set]
        chosen = sorted(kept + _uniform_pick(others, budget - len(kept)))
    tp = settings.temporal_patch_size
    return chosen + [chosen[-1]] * (-len(chosen) % tp)


def sampled_fps(source_fps: float, num_total: int, frame_indices: Sequence[int]) -> float:
    """Average rate of the sampled frames: source fps scaled by the fraction of distinct frames kept."""
    return source_fps * len(set(frame_indices)) / num_total


# ---------------------------------------------------------------------------------------------------------
# Decoding


def _with_timeout(fn: Callable[[], T], timeout_s: float, path: str) -> T:
    """Run `fn` in a worker thread and give up after `timeout_s`. A stuck decoder thread is abandoned (daemon),
    never joined, so the caller cannot hang."""
    result: list = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # re-raised in the caller's thread
            error.append(e)

    worker = threading.Thread(target=target, name="swim-video-decode", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise VideoDecodeError(path, f"decode took longer than {timeout_s:.0f} s")
    if error:
        e = error[0]
        if isinstance(e, VideoDecodeError):
            raise e
        raise VideoDecodeError(path, f"{type(e).__name__}: {e}") from e
    return result[0]


def _frame_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise VideoDecodeError(folder, f"folder has no {'/'.join(IMAGE_SUFFIXES)} frames")
    return files


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


class _FolderReader:
    def __init__(self, path: Path, folder_fps: float):
        self.files = _frame_files(path)
        first = _read_image(self.files[0])
        self.info = VideoInfo(len(self.files), folder_fps, first.shape[0], first.shape[1])
        self.num_frames, self.fps = self.info.num_frames, self.info.fps

    def get(self, indices: Sequence[int]) -> np.ndarray:
        cache = {i: _read_image(self.files[i]) for i in sorted(set(indices))}
        return np.stack([cache[i] for i in indices])


class _DecordReader:
    def __init__(self, path: Path):
        import decord

        self.vr = decord.VideoReader(str(path), num_threads=1)
        self.num_frames, self.fps = len(self.vr), float(self.vr.get_avg_fps())

    @property
    def info(self) -> VideoInfo:
        # decord exposes no frame size without decoding, so only probing pays for frame 0
        h, w = self.vr[0].shape[:2]
        return VideoInfo(self.num_frames, self.fps, h, w)

    def get(self, indices: Sequence[int]) -> np.ndarray:
        return self.vr.get_batch(list(indices)).asnumpy()


class _PyAVReader:
    """Sequential PyAV decode; frame i is the i-th decoded frame, which is how decord counts too."""

    def __init__(self, path: Path):
        import av

        self.path = path
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0.0)
            n = stream.frames
            if n <= 0:  # some containers do not store the count: demux to count packets with a picture
                n = sum(1 for p in container.demux(stream) if p.size > 0)
            h, w = stream.codec_context.height, stream.codec_context.width
        self.info = VideoInfo(int(n), fps, h, w)
        self.num_frames, self.fps = self.info.num_frames, self.info.fps

    def get(self, indices: Sequence[int]) -> np.ndarray:
        import av

        wanted, last = set(indices), max(indices)
        found: dict[int, np.ndarray] = {}
        with av.open(str(self.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    found[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
        missing = wanted - found.keys()
        if missing:
            raise VideoDecodeError(
                self.path, f"frames {sorted(missing)[:5]} not decodable ({len(found)} read)"
            )
        return np.stack([found[i] for i in indices])


def _open(path: str | os.PathLike, settings: VideoSettings):
    """Open a frame folder or a video file with the configured backend ("auto": decord, then PyAV)."""
    p = Path(path)
    if p.is_dir():
        return _FolderReader(p, settings.folder_fps)
    if not p.is_file():
        raise VideoDecodeError(p, "no such file or folder")
    backends = {"auto": ("decord", "pyav"), "decord": ("decord",), "pyav": ("pyav",)}
    if settings.backend not in backends:
        raise ValueError(f"unknown video backend {settings.backend!r}; use one of {sorted(backends)}")
    errors = []
    for name in backends[settings.backend]:
        try:
            reader = _DecordReader(p) if name == "decord" else _PyAVReader(p)
            if reader.num_frames <= 0:
                raise ValueError("no frames")
            return reader
        except ImportError as e:
            errors.append(f"{name} not installed ({e})")
        except Exception as e:  # decord and PyAV raise their own error types
            errors.append(f"{name}: {type(e).__name__}: {e}")
    raise VideoDecodeError(p, "; ".join(errors))


def probe_video(path: str | os.PathLike, settings: VideoSettings | None = None) -> VideoInfo:
    """Frame count, fps and size of an mp4 (any container decord/PyAV reads) or a JPEG/PNG frame folder."""
    settings = settings or VideoSettings()
    return _with_timeout(lambda: _open(path, settings).info, settings.decode_timeout_s, str(path))


def read_frames(
    path: str | os.PathLike, indices: Sequence[int], settings: VideoSettings | None = None
) -> np.ndarray:
    """Decode the given source frames (repeats allowed), uint8 [T, H, W, 3]. Raises `VideoDecodeError`."""
    settings = settings or VideoSettings()
    if len(indices) == 0:
        raise ValueError("no frame indices to read")

    def run() -> np.ndarray:
        reader = _open(path, settings)
        bad = [i for i in indices if not 0 <= i < reader.num_frames]
        if bad:
            raise VideoDecodeError(path, f"frame indices {bad[:5]} outside [0, {reader.num_frames})")
        return reader.get(indices)

    return _with_timeout(run, settings.decode_timeout_s, str(path))


def write_video(
    path: str | os.PathLike, frames: np.ndarray, fps: float, codec: str = "libx264", crf: int | None = None
) -> None:
    """Encode uint8 [T, H, W, 3] frames (H, W even) as yuv420p with PyAV, single-threaded (for short clips
    encoder thread start-up costs more than it saves). `crf` applies to libx264 (0 = lossless luma)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.thread_count = 1
        if codec == "libx264":
            stream.options = {"preset": "veryfast", **({"crf": str(crf)} if crf is not None else {})}
        for frame in frames:
            container.mux(
                stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24"))
            )
        container.mux(stream.encode())


# ---------------------------------------------------------------------------------------------------------
# Resize and patchify


def _resize_uint8(frames: np.ndarray | torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> uint8 [T, 3, h, w] (see `resize_frames`)."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(frames)
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 frames, got {x.dtype}")
    x = x.permute(0, 3, 1, 2).contiguous()
    if tuple(x.shape[-2:]) != tuple(hw):
        x = F.interpolate(x, size=tuple(hw), mode="bicubic", antialias=True, align_corners=False)
    return x


def resize_frames(frames: np.ndarray | torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [T, 3, h, w] holding integers 0..255.

    Bicubic with antialias on the uint8 tensor, which runs torch's native uint8 kernel: the exact call
    torchvision makes for uint8 input, hence what the HF video processor and qwen-vl-utils produce. (Resizing
    in float and rounding differs by up to ~18 levels when one axis shrinks; PIL bicubic differs too.)
    """
    return _resize_uint8(frames, hw).float()


def patchify(frames: torch.Tensor, settings: VideoSettings) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[T, 3, H, W] in 0..255 (uint8 or float) -> (pixel_values float32 [t*h*w, 3*tp*p*p], grid (t, h, w)).

    Pad T to a multiple of tp by repeating the last frame, rescale by 1/255 and normalise with the settings'
    mean/std (CLIP for Qwen2/2.5-VL, 0.5 for Qwen3-VL).
    Qwen's order: rows are (t, h/m, w/m, m, m), i.e. the m*m patches of one merged token are consecutive and
    merged tokens are (t, h/m, w/m) row-major; columns are (channel, tp, p, p).
    """
    import torch

    p, m, tp = settings.patch_size, settings.merge_size, settings.temporal_patch_size
    n, c, height, width = frames.shape
    if height % (p * m) or width % (p * m):
        raise ValueError(f"frame size {height}x{width} is not a multiple of {p * m}")
    x = frames
    if pad := -n % tp:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
    gt, gh, gw = x.shape[0] // tp, height // p, width // p
    x = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    out = x.reshape(gt * gh * gw, c * tp * p * p).to(torch.float32, copy=True)
    # (x / 255 - mean) / std as one multiply-add per column; columns run over channels first
    std = torch.tensor(settings.image_std, dtype=torch.float32).repeat_interleave(tp * p * p)
    mean = torch.tensor(settings.image_mean, dtype=torch.float32).repeat_interleave(tp * p * p)
    return out.mul_(1.0 / (255.0 * std)).sub_(mean / std), (gt, gh, gw)


def load_video(
    path: str | os.PathLike,
    settings: VideoSettings | None = None,
    keep: Sequence[int] = (),
    keep_frames: bool = False,
) -> VideoClip:
    """probe -> select (keeping annotated frames `keep`) -> decode -> resize -> patchify, one file open.
    `keep_frames`: also return the decoded frames at their original size (`VideoClip.frames`)."""
    settings = settings or VideoSettings()

    def decode() -> tuple[int, float, list[int], np.ndarray]:
        reader = _open(path, settings)
        indices = select_frame_indices(reader.num_frames, reader.fps, settings, keep)
        return reader.num_frames, reader.fps, indices, reader.get(indices)

    num_total, source_fps, indices, frames = _with_timeout(decode, settings.decode_timeout_s, str(path))
    if source_fps <= 0:
        raise VideoDecodeError(path, f"unknown fps ({source_fps}); cannot set the temporal spacing")
    original_hw = (int(frames.shape[1]), int(frames.shape[2]))
    resized_hw = video_target_hw(*original_hw, len(indices), settings)
    # stay in uint8 until patchify's reorder is done: 4x less memory traffic than reordering floats
    pixel_values, grid = patchify(_resize_uint8(frames, resized_hw), settings)
    return VideoClip(
        pixel_values=pixel_values,
        grid_thw=grid,
        second_per_grid_ts=settings.temporal_patch_size / sampled_fps(source_fps, num_total, indices),
        frame_indices=indices,
        source_fps=source_fps,
        original_hw=original_hw,
        resized_hw=resized_hw,
        frames=frames if keep_frames else None,
    )


@dataclass
class ImageInput:
    """One patchified image ready for the model: a single temporal group (the frame repeated over the temporal
    patch, as Qwen's image processor does)."""

    pixel_values: torch.Tensor  # float32 [h*w, 3*tp*p*p]
    grid_thw: tuple[int, int, int]  # (1, H / p, W / p)
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]


def load_image(path: str | os.PathLike, settings: VideoSettings | None = None) -> ImageInput:
    """Read an image (any PIL format), smart-resize it within the settings' per-image pixel budget
    (`min_pixels`..`max_pixels`, a multiple of the merged-token side) and patchify it. Raises `OSError` /
    PIL's errors for an unreadable file."""
    from PIL import Image

    settings = settings or VideoSettings()
    with Image.open(path) as im:
        rgb = np.array(im.convert("RGB"))
    hw = smart_resize(rgb.shape[0], rgb.shape[1], settings.factor, settings.min_pixels, settings.max_pixels)
    pixel_values, grid = patchify(resize_frames(rgb[None], hw), settings)
    return ImageInput(pixel_values, grid, (int(rgb.shape[0]), int(rgb.shape[1])), hw)
