"""Video data throughput: swim's loader vs qwen-vl-utils `fetch_video`, in DataLoader workers.

    python benchmarks/data_throughput.py [--json out.json] [--samples 24]

Source: a 64-frame 448x800 (448p, 16:9) 30 fps H.264 clip written with PyAV in a temp dir, plus 3 objects
with COCO-RLE masks on 16 frames each. Both pipelines sample 32 frames from it.
- ours: `load_video` (probe, select keeping the 16 annotated frames, decode, smart_resize to 448x812,
  bicubic resize, patchify) + `object_group_targets` for the 3 objects (decode RLE, area-pool per group);
- fetch_video: qwen-vl-utils 0.0.14 with `FORCE_QWENVL_VIDEO_READER=decord` (decode + resize only: no
  patchify, no masks), i.e. strictly less work than ours. It needs torchvision (the CPU shim in tools/).
Each pipeline runs in a `torch.utils.data.DataLoader` with 1 and 2 workers (one torch thread each); the rate
is measured from the first sample received to the last, so worker start-up is excluded.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from swim.data.masks import encode_mask, object_group_targets
from swim.data.video import VideoSettings, load_video, write_video

logger = logging.getLogger("data_throughput")
ROOT = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH, SOURCE_FRAMES, FPS, SAMPLED = 448, 800, 64, 30, 32


def make_clip(folder: Path) -> tuple[Path, list[dict]]:
    """Write the source clip (moving gradient + 3 moving boxes) and the boxes' RLE annotations."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    frames = np.empty((SOURCE_FRAMES, HEIGHT, WIDTH, 3), np.uint8)
    boxes = [(40, 60, 120), (200, 300, 90), (300, 600, 70)]  # (y, x, side)
    annotations: list[dict] = [{} for _ in boxes]
    for t in range(SOURCE_FRAMES):
        frames[t, ..., 0] = (xx + 4 * t) % 256
        frames[t, ..., 1] = (yy // 2 + t) % 256
        frames[t, ..., 2] = 96
        for k, (y, x, side) in enumerate(boxes):
            mask = np.zeros((HEIGHT, WIDTH), np.uint8)
            mask[y : y + side, x + 3 * t : x + 3 * t + side] = 1
            frames[t][mask.astype(bool)] = (255, 255 - 80 * k, 40 * k)
            if t % 4 == 0:  # 16 annotated frames per object
                annotations[k][str(t)] = {"segmentation": encode_mask(mask)}
    path = folder / "clip448.mp4"
    write_video(path, frames, FPS)
    return path, annotations


class OursDataset(Dataset):
    def __init__(self, path: Path, annotations: list[dict], n: int):
        self.path, self.annotations, self.n = path, annotations, n
        self.settings = VideoSettings(num_frames=SAMPLED, max_frames=SAMPLED)
        self.keep = sorted({int(f) for a in annotations for f in a})

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        clip = load_video(self.path, self.settings, keep=self.keep)
        targets = [
            object_group_targets(a, clip.frame_indices, clip.original_hw, clip.resized_hw)[0]
            for a in self.annotations
        ]
        return {"pixel_values": clip.pixel_values, "targets": torch.from_numpy(np.stack(targets))}


class FetchVideoDataset(Dataset):
    def __init__(self, path: Path, n: int):
        self.path, self.n = path, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        from qwen_vl_utils import fetch_video

        return fetch_video({"video": str(self.path), "nframes": SAMPLED})


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
    logging.getLogger("qwen_vl_utils").setLevel(logging.WARNING)


def samples_per_s(dataset: Dataset, workers: int) -> float:
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, worker_init_fn=_worker_init)
    start, n = None, 0
    for _ in loader:
        if start is None:
            start = time.perf_counter()
        else:
            n += 1
    return n / (time.perf_counter() - start)


def fetch_video_available() -> str | None:
    """None if qwen-vl-utils imports (through the torchvision CPU shim where needed), else the reason."""
    os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "decord")
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        importlib.import_module(
            "tv_cpu_shim"
        )  # before torchvision; no-op where it loads or the .pth hook ran
        importlib.import_module("qwen_vl_utils")
    except Exception as e:  # ImportError, or torchvision's RuntimeError without the shim
        return f"{type(e).__name__}: {e}"
    finally:
        sys.path.pop(0)
    return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--samples", type=int, default=24, help="samples per measurement")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    unavailable = fetch_video_available()
    with tempfile.TemporaryDirectory() as tmp:
        path, annotations = make_clip(Path(tmp))
        rows = []
        for workers in (1, 2):
            row = {
                "workers": workers,
                "ours": samples_per_s(OursDataset(path, annotations, args.samples), workers),
            }
            if unavailable is None:
                row["fetch_video"] = samples_per_s(FetchVideoDataset(path, args.samples), workers)
                row["ratio"] = row["ours"] / row["fetch_video"]
            rows.append(row)
    if unavailable:
        logger.warning("fetch_video baseline skipped: %s", unavailable)
    header = f"{'workers':>7} | {'ours (samples/s)':>16} | {'fetch_video (samples/s)':>23} | {'ours/fetch_video':>16}"
    lines = [header, "-" * len(header)]
    for r in rows:
        fv = f"{r['fetch_video']:.2f}" if "fetch_video" in r else "n/a"
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "n/a"
        lines.append(f"{r['workers']:>7} | {r['ours']:>16.2f} | {fv:>23} | {ratio:>16}")
    logger.info(
        "32 of 64 frames, 448x800 -> 448x812, 3 objects x 16 masks, on %s:\n%s",
        platform.node(),
        "\n".join(lines),
    )
    result = {
        "clip": {"height": HEIGHT, "width": WIDTH, "source_frames": SOURCE_FRAMES, "sampled": SAMPLED},
        "samples": args.samples,
        "cpu_count": os.cpu_count(),
        "rows": rows,
        "fetch_video_unavailable": unavailable,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
