"""Mask overlays on video frames (PNG grid, GIF): what `swim infer --segment` writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from swim.vis.attention import save_grid

COLOURS = ((255, 64, 64), (64, 160, 255), (64, 220, 96), (255, 200, 40), (200, 80, 255))


def mask_overlay(frame: np.ndarray, mask: np.ndarray, colour=COLOURS[0], alpha: float = 0.5) -> np.ndarray:
    """uint8 `[H, W, 3]` frame with a boolean `[H, W]` mask blended in `colour` and its boundary drawn solid."""
    out = frame.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, np.float32)
    edge = np.zeros_like(mask)
    edge[1:, :] |= mask[1:, :] != mask[:-1, :]
    edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    out[edge] = colour
    return out.clip(0, 255).astype(np.uint8)


def overlay_frames(frames: np.ndarray, masks: dict[str, np.ndarray]) -> np.ndarray:
    """uint8 `[T, H, W, 3]` frames with every object's masks (`label -> bool [T, H, W]`) in its own colour."""
    out = frames.copy()
    for k, mask in enumerate(masks.values()):
        out = np.stack([mask_overlay(f, m, COLOURS[k % len(COLOURS)]) for f, m in zip(out, mask)])
    return out


def draw_mask_grid(
    frames: np.ndarray, masks: dict[str, np.ndarray], path: str | Path, title: str = ""
) -> Path:
    """A PNG: the frames (top row) and one row per object with its mask overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(frames)
    fig, axes = plt.subplots(len(masks) + 1, n, figsize=(1.8 * n, 1.9 * (len(masks) + 1)), squeeze=False)
    for t in range(n):
        axes[0, t].imshow(frames[t])
        axes[0, t].set_title(f"frame {t}", fontsize=8)
        for r, (label, mask) in enumerate(masks.items(), start=1):
            axes[r, t].imshow(mask_overlay(frames[t], mask[t], COLOURS[(r - 1) % len(COLOURS)]))
            if t == 0:
                axes[r, t].set_ylabel(label[:30], fontsize=8)
    return save_grid(fig, axes, path, title)


def save_mask_gif(
    frames: np.ndarray, masks: dict[str, np.ndarray], path: str | Path, ms_per_frame: int = 250
) -> Path:
    from PIL import Image

    images = [Image.fromarray(f) for f in overlay_frames(frames, masks)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms_per_frame, loop=0)
    return path
