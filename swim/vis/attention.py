"""Attention overlays on video frames and images (PNG grids and GIFs), as in the papers' figures.

    swim vis --model DIR --data FILE --index 0 --out DIR [--layers 1 2 3 | all] [--gif]
             [--query answer_last --query-offset -1 --head-fusion renorm_mean]   # KLAL's answer-token maps

For one record, the supervised rows of the first object (the tagged words, or KLAL's answer token) are
teacher-forced; their attention on the vision tokens (heads fused as in training) is renormalised per group (a
video's temporal group, or an image) and drawn over the first frame of each group / each image (bilinear
upsampling of the merged token grid, jet colour map), one row per layer plus the fused map, with the annotation's
outline.
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
    """Attention of one record's first object, per group (a video's temporal group or an image) on its merged grid.

    Arrays are stacked over groups when every group has the same grid (videos, one image); images of different
    sizes give lists, indexed the same way.
    """

    frames: np.ndarray | list[np.ndarray]  # uint8 [G, H, W, 3]: the first frame of each group / each image
    maps: dict[
        str, np.ndarray | list[np.ndarray]
    ]  # name ("layer 2", "fused") -> [G, gh, gw], each summing to 1
    target: np.ndarray | list[np.ndarray]  # float [G, gh, gw] annotation cover fractions
    valid: np.ndarray  # bool [G]: the group is annotated


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
    row also shows the frames (images) alone; annotation outlines are drawn in white.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(label, v if isinstance(v, tuple) else (v, "fused")) for label, v in rows.items()]
    first = items[0][1][0]
    n_groups = len(first.frames)
    fig, axes = plt.subplots(len(items) + 1, n_groups, figsize=(1.8 * n_groups, 1.9 * (len(items) + 1)),
                             squeeze=False)  # fmt: skip
    for g in range(n_groups):
        size = first.frames[g].shape[:2]
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
    return save_grid(fig, axes, path, title)


def save_grid(fig, axes, path: str | Path, title: str = "") -> Path:
    """Finish a grid of image panels (no ticks, optional title) and write it as a PNG; closes the figure."""
    import matplotlib.pyplot as plt

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
    """An animated GIF of the overlay, one frame per group (temporal groups of a video, or same-size images)."""
    from PIL import Image

    size = maps.frames[0].shape[:2]
    images = []
    for g in range(len(maps.frames)):
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


def vision_groups(batch: dict, merge_size: int) -> list[tuple[str, int, tuple[int, int]]]:
    """(kind, index of its image / video, merged grid (h, w)) of every group of a one-sample batch, in sequence
    order: images first, then each video's temporal groups (the layout `swim.data` builds)."""
    groups = []
    for kind, key in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
        for i, (t, h, w) in enumerate(batch.get(key, torch.zeros(0, 3)).tolist()):
            groups += [(kind, i, (int(h) // merge_size, int(w) // merge_size))] * int(t)
    return groups


@torch.no_grad()
def attention_on_vision(
    model,
    batch: dict,
    rows: torch.Tensor,
    layers: list[int] | str | None,
    settings,
    head_fusion: str = "mean",
) -> dict[str, list[np.ndarray]]:
    """Attention of `rows` (Long `[n]`, averaged) of a one-sample `batch` on its images / video, heads fused as
    in training, renormalised per group: name ("layer L", "fused") -> one `[h/2, w/2]` map per group. `layers`:
    indices, "all", or None for the model's default supervised layers."""
    from swim.modeling.capture import AttentionProbe, vision_token_ids, vision_token_positions
    from swim.modeling.losses import group_normalize

    grids = [grid for _, _, grid in vision_groups(batch, settings.merge_size)]
    groups = torch.cat([torch.full((h * w,), g) for g, (h, w) in enumerate(grids)])[None]
    probe = AttentionProbe(model, layers, checkpoint_recompute=False)
    layers = probe.layers
    try:
        with probe.capture(rows[None]):
            model(**batch, use_cache=False, logits_to_keep=1)
        positions = vision_token_positions(batch["input_ids"], vision_token_ids(model.config))
        attn = probe.vision_attention(rows[None], positions, batch.get("attention_mask"), head_fusion=head_fusion,
                                      groups=groups)[:, 0]  # [Λ, n, K]  # fmt: skip
    finally:
        probe.remove()
    per_layer = [group_normalize(a.mean(0)[None, None], groups, len(grids))[0, 0] for a in attn]
    fused = torch.stack(per_layer).mean(0)

    def split(flat: torch.Tensor) -> list[np.ndarray]:
        return [
            part.reshape(grid).numpy() for part, grid in zip(flat.split([h * w for h, w in grids]), grids)
        ]

    maps = {f"layer {layer}": split(p) for layer, p in zip(layers, per_layer)}
    maps["fused"] = split(fused)
    return maps


def _stack(parts: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    return np.stack(parts) if len({p.shape for p in parts}) == 1 else parts


def group_frames(batch: dict, settings) -> list[np.ndarray]:
    """The pixels the model saw, one uint8 `[H, W, 3]` per group (the first frame of each temporal group)."""
    frames = []
    for kind, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        grids = batch.get(f"{kind}_grid_thw")
        if grids is None:
            continue
        parts = batch[key].split([int(t * h * w) for t, h, w in grids.tolist()])
        for pixels, grid in zip(parts, grids.tolist()):
            frames += list(unpatchify(pixels, grid, settings)[:: settings.temporal_patch_size])
    return frames


@torch.no_grad()
def record_maps(
    model,
    dataset,
    index: int,
    layers: list[int] | str | None,
    query_offset: int = 0,
    head_fusion: str = "mean",
) -> RecordMaps:
    """Teacher-forced attention maps of record `index` of a `SwimDataset`: the rows its query selector supervises
    (tagged words, or KLAL's answer tokens) for the first object, shifted by `query_offset`."""
    from swim.data.collator import SwimCollator

    sample = dataset.build(dataset.records[index])
    batch = SwimCollator(dataset.tokenizer.pad_token_id)([sample])
    grounding = batch.pop("grounding")
    batch.pop("labels")
    if grounding is None:
        raise ValueError(f"record {index} has no supervised (queried and annotated) tokens to visualise")
    rows = grounding["query_positions"][0, grounding["query_objects"][0] == 0] + query_offset
    maps = attention_on_vision(model, batch, rows, layers, dataset.settings, head_fusion)
    grids = [m.shape for m in maps["fused"]]
    target = grounding["object_targets"][0, 0].split([h * w for h, w in grids])
    return RecordMaps(
        frames=_stack(group_frames(batch, dataset.settings)),
        maps={name: _stack(parts) for name, parts in maps.items()},
        target=_stack([t.reshape(grid).numpy() for t, grid in zip(target, grids)]),
        valid=grounding["object_group_valid"][0, 0].numpy(),
    )


def main(argv: list[str] | None = None) -> list[Path]:
    from transformers import AutoTokenizer

    from swim.data.dataset import SwimDataset
    from swim.data.records import load_records
    from swim.data.tags import QUERY_MODES, SWIM_SYSTEM_PROMPT
    from swim.modeling.capture import parse_layers, supervised_layers
    from swim.modeling.families import family_of
    from swim.modeling.losses import HEAD_FUSIONS
    from swim.modeling.model import stock_model_class

    parser = argparse.ArgumentParser(prog="swim vis", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--data-root")
    parser.add_argument("--index", type=int, nargs="+", default=[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", nargs="+", help="layer indices or `all`")
    parser.add_argument("--query", default="tags", choices=QUERY_MODES, help="rows to draw (as attn_query)")
    parser.add_argument("--query-offset", type=int, default=0, choices=[0, -1])
    parser.add_argument("--head-fusion", default="mean", choices=HEAD_FUSIONS)
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
                          system_prompt=args.system_prompt, family=family, query=args.query)  # fmt: skip
    model = stock_model_class(args.model).from_pretrained(args.model).eval()
    layers = supervised_layers(model, parse_layers(args.layers))
    written = []
    for index in args.index:
        maps = record_maps(model, dataset, index, layers, args.query_offset, args.head_fusion)
        rows = {name: (maps, name) for name in maps.maps}
        written.append(
            draw_grid(rows, Path(args.out) / f"attention_{index:05d}.png", title=f"record {index}")
        )
        if args.gif:
            written.append(save_gif(maps, Path(args.out) / f"attention_{index:05d}.gif"))
    for path in written:
        logger.info("wrote %s", path)
    return written
