"""Attention overlays on video frames (PNG grids and GIFs), as in the paper's figures.

    swim vis --model DIR --data FILE --index 0 --out DIR [--layers 1 2 3] [--gif]

For one record, the tagged words of the first object are teacher-forced; their head-mean attention on the video
tokens is renormalised per temporal group and drawn over the first frame of each group (bilinear upsampling of
the merged token grid, jet colour map), one row per layer plus the fused map, with the mask outline.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)


@dataclass
class RecordMaps:
    """Attention of one record's first object, per temporal group on the merged grid."""

    frames: np.ndarray  # uint8 [G, H, W, 3]: the first frame of each temporal group, at model resolution
    maps: dict[str, np.ndarray]  # name ("layer 2", "fused") -> float [G, gh, gw], each group summing to 1
    target: np.ndarray  # float [G, gh, gw] mask cover fractions
    valid: np.ndarray  # bool [G]: the group has a mask


def heat_overlay(frame: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a `[gh, gw]` map (upsampled bilinearly, min-max scaled, jet) over a uint8 `[H, W, 3]` frame."""
    from matplotlib import colormaps

    h, w = frame.shape[:2]
    up = torch.nn.functional.interpolate(
        torch.as_tensor(heat, dtype=torch.float32)[None, None],
        size=(h, w),
        mode="bilinear",
        align_corners=False,
    )[0, 0].numpy()
    span = up.max() - up.min()
    up = (up - up.min()) / span if span > 0 else np.zeros_like(up)
    colour = colormaps["jet"](up)[..., :3] * 255
    return (alpha * colour + (1 - alpha) * frame).clip(0, 255).astype(np.uint8)


def mask_outline(target: np.ndarray, size: tuple[int, int], threshold: float = 0.05) -> np.ndarray:
    """Boolean `[H, W]` outline of the cells a mask covers (nearest upsampling of the token grid)."""
    inside = torch.as_tensor(target >= threshold, dtype=torch.float32)[None, None]
    up = torch.nn.functional.interpolate(inside, size=size, mode="nearest")[0, 0].numpy() > 0
    edge = np.zeros_like(up)
    edge[1:, :] |= up[1:, :] != up[:-1, :]
    edge[:, 1:] |= up[:, 1:] != up[:, :-1]
    return edge


def draw_grid(
    rows: dict[str, RecordMaps | tuple[RecordMaps, str]], path: str | Path, title: str = ""
) -> Path:
    """A PNG grid: one row per (label -> maps of one method), one column per temporal group.

    `rows` maps a row label to `(RecordMaps, map name)`; a plain `RecordMaps` draws its "fused" map. The first
    row also shows the frames alone; mask outlines are drawn in white.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(label, v if isinstance(v, tuple) else (v, "fused")) for label, v in rows.items()]
    first = items[0][1][0]
    n_groups = first.frames.shape[0]
    fig, axes = plt.subplots(len(items) + 1, n_groups, figsize=(1.8 * n_groups, 1.9 * (len(items) + 1)),
                             squeeze=False)  # fmt: skip
    size = first.frames.shape[1:3]
    for g in range(n_groups):
        axes[0, g].imshow(first.frames[g])
        axes[0, g].set_title(f"group {g}", fontsize=8)
        for r, (label, (maps, name)) in enumerate(items, start=1):
            image = heat_overlay(maps.frames[g], maps.maps[name][g])
            if maps.valid[g]:
                image[mask_outline(maps.target[g], size)] = 255
            axes[r, g].imshow(image)
            if g == 0:
                axes[r, g].set_ylabel(label, fontsize=8)
    axes[0, 0].set_ylabel("frames", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_gif(maps: RecordMaps, path: str | Path, name: str = "fused", ms_per_group: int = 500) -> Path:
    """An animated GIF of the overlay, one frame per temporal group."""
    from PIL import Image

    size = maps.frames.shape[1:3]
    images = []
    for g in range(maps.frames.shape[0]):
        image = heat_overlay(maps.frames[g], maps.maps[name][g])
        if maps.valid[g]:
            image[mask_outline(maps.target[g], size)] = 255
        images.append(Image.fromarray(image).resize((size[1] * 2, size[0] * 2), Image.NEAREST))
    path = Path(path)
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms_per_group, loop=0)
    return path


def unpatchify(pixel_values: torch.Tensor, grid_thw, settings) -> np.ndarray:
    """Inverse of `swim.data.video.patchify`: `[t*h*w, 3*tp*p*p]` -> uint8 frames `[t*tp, h*p, w*p, 3]`.

    Overlays are drawn on exactly the pixels the model saw (same frames, same resize), with no second decode.
    """
    t, h, w = (int(v) for v in grid_thw)
    p, m, tp = settings.patch_size, settings.merge_size, settings.temporal_patch_size
    x = pixel_values.float().reshape(t, h // m, w // m, m, m, 3, tp, p, p)
    x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t * tp, 3, h * p, w * p)
    mean = torch.tensor(settings.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(settings.image_std).view(1, 3, 1, 1)
    frames = ((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    return frames.permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def attention_on_video(
    model, batch: dict, rows: torch.Tensor, layers: list[int] | None, settings
) -> dict[str, np.ndarray]:
    """Head-mean attention of `rows` (Long `[n]`, averaged) of a one-sample `batch` on its single video,
    renormalised per temporal group: name ("layer L", "fused") -> `[G, h/2, w/2]`. `layers`: None for the
    model's default supervised layers."""
    from swim.modeling.capture import AttentionProbe, vision_token_ids, vision_token_positions
    from swim.modeling.losses import group_normalize

    t, h, w = (int(v) for v in batch["video_grid_thw"][0])
    m = settings.merge_size
    grid = (t, h // m, w // m)
    probe = AttentionProbe(model, layers, checkpoint_recompute=False)
    layers = probe.layers
    try:
        with probe.capture(rows[None]):
            model(**batch, use_cache=False, logits_to_keep=1)
        video_positions = vision_token_positions(batch["input_ids"], vision_token_ids(model.config))
        attn = probe.vision_attention(rows[None], video_positions, batch.get("attention_mask"))[
            :, 0
        ]  # [Λ, n, K]
    finally:
        probe.remove()
    groups = torch.arange(t).repeat_interleave(grid[1] * grid[2])[None]
    per_layer = [group_normalize(a.mean(0)[None, None], groups, t)[0, 0].reshape(grid) for a in attn]
    maps = {f"layer {layer}": p.numpy() for layer, p in zip(layers, per_layer)}
    maps["fused"] = torch.stack(per_layer).mean(0).numpy()
    return maps


@torch.no_grad()
def record_maps(model, dataset, index: int, layers: list[int], query_offset: int = 0) -> RecordMaps:
    """Teacher-forced attention maps of record `index` of a `SwimDataset` (its first object's tagged tokens)."""
    from swim.data.collator import SwimCollator

    sample = dataset.build(dataset.records[index])
    batch = SwimCollator(dataset.tokenizer.pad_token_id)([sample])
    grounding = batch.pop("grounding")
    batch.pop("labels")
    if grounding is None:
        raise ValueError(f"record {index} has no supervised (tagged and masked) tokens to visualise")
    rows = grounding["query_positions"][0, grounding["query_objects"][0] == 0] + query_offset
    maps = attention_on_video(model, batch, rows, layers, dataset.settings)
    frames = unpatchify(batch["pixel_values_videos"], batch["video_grid_thw"][0], dataset.settings)
    grid = maps["fused"].shape
    return RecordMaps(
        frames=frames[:: dataset.settings.temporal_patch_size],
        maps=maps,
        target=grounding["object_targets"][0, 0].reshape(grid).numpy(),
        valid=grounding["object_group_valid"][0, 0].numpy(),
    )


def main(argv: list[str] | None = None) -> list[Path]:
    from transformers import AutoTokenizer

    from swim.data.dataset import SwimDataset
    from swim.data.records import load_records
    from swim.data.tags import SWIM_SYSTEM_PROMPT
    from swim.modeling.capture import supervised_layers
    from swim.modeling.families import family_of
    from swim.modeling.model import stock_model_class

    parser = argparse.ArgumentParser(prog="swim vis", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--data-root")
    parser.add_argument("--index", type=int, nargs="+", default=[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, nargs="+")
    parser.add_argument("--query-offset", type=int, default=0, choices=[0, -1])
    parser.add_argument("--num-frames", type=int, default=32)
    parser.add_argument("--max-pixels", type=int, help="default: the model family's (768 merged tokens)")
    parser.add_argument("--gif", action="store_true")
    parser.add_argument(
        "--system-prompt", default=SWIM_SYSTEM_PROMPT, help="as in training (default: SWIM's)"
    )
    args = parser.parse_args(argv)

    records, _ = load_records(args.data, data_root=args.data_root)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    family = family_of(args.model)
    settings = family.video_settings(num_frames=args.num_frames, max_frames=args.num_frames,
                                     max_pixels=args.max_pixels)  # fmt: skip
    dataset = SwimDataset(records, settings, tokenizer, supervise_qa=True, strict=True,
                          system_prompt=args.system_prompt, family=family)  # fmt: skip
    model = stock_model_class(args.model).from_pretrained(args.model).eval()
    layers = supervised_layers(model, args.layers)
    written = []
    for index in args.index:
        maps = record_maps(model, dataset, index, layers, args.query_offset)
        rows = {name: (maps, name) for name in maps.maps}
        written.append(
            draw_grid(rows, Path(args.out) / f"attention_{index:05d}.png", title=f"record {index}")
        )
        if args.gif:
            written.append(save_gif(maps, Path(args.out) / f"attention_{index:05d}.gif"))
    for path in written:
        logger.info("wrote %s", path)
    return written
