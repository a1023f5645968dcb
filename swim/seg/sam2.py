"""SAM-2 from transformers 5.23 for the segmentation head: tiny random checkpoints, frame preparation, geometry.

Nothing can be downloaded here, so tests and the CPU demo use tiny random SAM-2 checkpoints built from config
(`build_tiny_sam2`, `build_tiny_sam2_video`); GPU recipes point `seg_sam` at a real SAM-2.1 folder in transformers'
layout (`facebook/sam2.1-hiera-large`). Two gotchas of the 5.23 classes shape the tiny configs
(docs/segmentation.md §5): Hiera needs a window of at least twice the query stride at the first block
of a pooled stage, and `Sam2VideoModel` hard-codes 64-channel memories while splitting object pointers only when
the hidden size is above 64, so the tiny video model has hidden size 128.

Frames: SAM-2 takes a square, aspect-distorting resize (Sa2VA's `DirectResize`) normalised with ImageNet mean/std;
`sam2_frames` does it with a plain tensor resize, so no image processor is needed.

    swim seg tiny-sam2 OUT [--hidden 64 --size 128 --seed 0] [--video]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _tiny_vision_config(size: int, hidden: int):
    from transformers import Sam2HieraDetConfig, Sam2VisionConfig

    if size % 128:
        raise ValueError(f"tiny SAM-2 image size must be a multiple of 128, got {size}")
    hiera = Sam2HieraDetConfig(
        hidden_size=16, num_attention_heads=1, image_size=[size, size], blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[16, 32, 64, 128], num_attention_heads_per_stage=[1, 1, 2, 2],
        window_size_per_stage=[4, 4, 4, 2], global_attention_blocks=[3], window_positional_embedding_background_size=[2, 2],
    )  # fmt: skip
    sides = [size // 4, size // 8, size // 16]
    return Sam2VisionConfig(backbone_config=hiera, backbone_channel_list=[128, 64, 32, 16],
                            backbone_feature_sizes=[[s, s] for s in sides], fpn_hidden_size=hidden)  # fmt: skip


def tiny_sam2_config(size: int = 128, hidden: int = 64):
    """A tiny `Sam2Config`: 4-stage Hiera (16→128 channels), decoder width `hidden`, input `size`² (multiple of 128)."""
    from transformers import Sam2Config, Sam2MaskDecoderConfig, Sam2PromptEncoderConfig

    return Sam2Config(
        vision_config=_tiny_vision_config(size, hidden),
        prompt_encoder_config=Sam2PromptEncoderConfig(hidden_size=hidden, image_size=size, patch_size=16),
        mask_decoder_config=Sam2MaskDecoderConfig(hidden_size=hidden, mlp_dim=2 * hidden, num_attention_heads=2,
                                                  iou_head_hidden_dim=hidden),
    )  # fmt: skip


def tiny_sam2_video_config(size: int = 128, hidden: int = 128):
    """A tiny `Sam2VideoConfig` (hidden > 64 and 64-channel memories: see the module docstring)."""
    from transformers import Sam2VideoConfig, Sam2VideoMaskDecoderConfig, Sam2VideoPromptEncoderConfig

    if hidden <= 64:
        raise ValueError("Sam2VideoModel needs a hidden size above 64 (its memories are 64 channels)")
    side = size // 16
    return Sam2VideoConfig(
        vision_config=_tiny_vision_config(size, hidden), image_size=size, num_maskmem=3,
        prompt_encoder_config=Sam2VideoPromptEncoderConfig(hidden_size=hidden, image_size=size, patch_size=16),
        mask_decoder_config=Sam2VideoMaskDecoderConfig(hidden_size=hidden, mlp_dim=2 * hidden, num_attention_heads=2,
                                                       iou_head_hidden_dim=hidden),
        memory_attention_hidden_size=hidden, memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=2 * hidden, memory_attention_rope_feat_sizes=[side, side],
        memory_encoder_hidden_size=hidden, memory_encoder_output_channels=64, mask_downsampler_embed_dim=hidden,
        memory_fuser_embed_dim=hidden, memory_fuser_intermediate_dim=2 * hidden,
    )  # fmt: skip


def tie_positional_embeddings(model) -> None:
    """Give the prompt encoder the image's random Fourier frequencies, as every released SAM-2 has them.

    SAM-2 encodes a prompt point and each image position with one shared random matrix, so that a point's code
    matches the code of the pixels under it. transformers' `Sam2Model` holds two copies
    (`shared_image_embedding`, `prompt_encoder.shared_embedding`); converted checkpoints load the same tensor into
    both, but a model built from a config draws them independently, and a point or box prompt then names a
    position in a code the image does not use."""
    model.prompt_encoder.shared_embedding.positional_embedding.copy_(
        model.shared_image_embedding.positional_embedding
    )


def build_tiny_sam2(
    out_dir: str | Path, size: int = 128, hidden: int = 64, seed: int = 0, video: bool = False
) -> Path:
    """Write a tiny random `Sam2Model` (or `Sam2VideoModel`) checkpoint folder; returns it."""
    from transformers import Sam2Model, Sam2VideoModel

    torch.manual_seed(seed)
    if video:
        model = Sam2VideoModel(tiny_sam2_video_config(size, max(hidden, 128)))
    else:
        model = Sam2Model(tiny_sam2_config(size, hidden))
    with torch.no_grad():
        tie_positional_embeddings(model)
    out = Path(out_dir)
    model.save_pretrained(out)
    logger.info("wrote a tiny %s (%.2f M params) to %s", type(model).__name__,
                sum(p.numel() for p in model.parameters()) / 1e6, out)  # fmt: skip
    return out


def image_size(sam_config) -> int:
    """SAM-2's square input side S (1024 for the released models)."""
    return int(sam_config.prompt_encoder_config.image_size)


def embedding_size(sam_config) -> int:
    """Side h of the lowest-resolution image embedding, where MBA acts (S / 16)."""
    return image_size(sam_config) // int(sam_config.prompt_encoder_config.patch_size)


def mask_size(sam_config) -> int:
    """Side m of the decoder's low-resolution mask logits (4·h = S / 4)."""
    return 4 * embedding_size(sam_config)


def sam2_frames(frames: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 `[T, H, W, 3]` -> float32 `[T, 3, size, size]`: square bilinear resize (antialiased), ImageNet norm."""
    x = torch.as_tensor(np.asarray(frames)).permute(0, 3, 1, 2).float() / 255.0
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="swim seg tiny-sam2", description="write a tiny random SAM-2 checkpoint"
    )
    parser.add_argument("out_dir")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--video", action="store_true", help="a Sam2VideoModel (for `--propagate`)")
    args = parser.parse_args(argv)
    build_tiny_sam2(args.out_dir, args.size, args.hidden, args.seed, args.video)
