"""Model families: everything that differs between Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense, MoE) and Qwen3.5, in one
object per family, so that no other module asks "which model is this?".

The method is model-agnostic; the families differ in a handful of facts, all kept here:
- **attention** (`swim.modeling.capture` reads them): where the pre-RoPE query/key states come out (Qwen3 applies
  per-head `q_norm`/`k_norm` after the projections, and Qwen3.5's gated `q_proj` emits `[query | gate]`, so the norms'
  outputs are the capture point there); which attention classes were verified against eager attention;
  whether only some layers are softmax attention (Qwen3.5's hybrid stack). Partial rotary, scaling and sliding
  windows are read off the live modules and rotary tables, so they need no flag.
- **vision geometry**: patch 14 (28-px merged tokens) and CLIP mean/std for Qwen2/2.5-VL; patch 16 (32-px) and
  mean/std 0.5 for Qwen3-VL and Qwen3.5; the qwen-vl-utils pixel budgets scale with the merged-token area.
- **token layout**: one contiguous run of video tokens per video (Qwen2/2.5-VL), or, per temporal group, a text
  timestamp `<t seconds>` and its own `<|vision_start|> … <|vision_end|>` block (Qwen3-VL, Qwen3.5);
  `second_per_grid_ts` exists only for Qwen2.5-VL.
- **checkpoints**: the stock class a checkpoint saves as, and the processor files that make it loadable.

`family_of(model_or_config)` picks the spec; an unsupported model raises, naming the supported ones.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # torch is imported where a model is handled: the data checks run without it
    from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class VisionGeometry:
    """How pixels become vision tokens."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    @property
    def factor(self) -> int:
        """Side in pixels of one merged token: 28 (Qwen2/2.5-VL) or 32 (Qwen3-VL, Qwen3.5)."""
        return self.patch_size * self.merge_size


@dataclass(frozen=True)
class VisionSpan:
    """One image or video in a token sequence: what replaces its placeholder.

    `tokens_per_group`: merged tokens of one temporal group (h·w / merge²); `groups`: temporal groups (1 for an
    image); `timestamps`: seconds of each group for the timestamped layout (None: one contiguous run).
    """

    kind: Literal["video", "image"]
    tokens_per_group: int
    groups: int = 1
    timestamps: tuple[float, ...] | None = None

    @property
    def num_tokens(self) -> int:
        return self.tokens_per_group * self.groups


@dataclass(frozen=True)
class FamilySpec:
    name: str
    model_types: tuple[str, ...]
    stock_classes: Mapping[str, str]  # model_type -> transformers class saved in config.json "architectures"
    attention_classes: tuple[str, ...]  # text attention classes whose capture was verified against eager
    geometry: VisionGeometry
    qk_norm: bool = False  # per-head q_norm / k_norm before RoPE
    hybrid: bool = False  # only some decoder layers are softmax attention
    timestamps: bool = False  # per temporal group: "<t seconds>" + its own vision_start..vision_end block
    second_per_grid_ts: bool = False  # the forward takes `second_per_grid_ts` (tokens_per_second M-RoPE)
    processor_class: str = "Qwen2_5_VLProcessor"
    image_processor_type: str = "Qwen2VLImageProcessor"
    video_processor_type: str = "Qwen2VLVideoProcessor"
    verified: str = ""  # what was checked, for the README table
    extra: Mapping[str, Any] = field(default_factory=dict)

    # ---- modeling
    def stock_class(self, config) -> type[nn.Module]:
        import transformers

        return getattr(transformers, self.stock_classes[_model_type(config)])

    def pre_rope_modules(self, attn: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The modules whose outputs are the query / key states right before RoPE (see the module docstring)."""
        if type(attn).__name__ not in self.attention_classes:
            raise TypeError(
                f"{self.name}: attention class {type(attn).__name__} is not one whose capture was verified "
                f"({', '.join(self.attention_classes)})"
            )
        return (attn.q_norm, attn.k_norm) if self.qk_norm else (attn.q_proj, attn.k_proj)

    def model_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The batch without inputs this family's forward would silently ignore."""
        drop = () if self.second_per_grid_ts else ("second_per_grid_ts",)
        return {k: v for k, v in batch.items() if k not in drop}

    # ---- data
    def video_settings(self, **overrides):
        """`VideoSettings` with this family's geometry and the qwen-vl-utils budgets (in merged tokens)."""
        from swim.data.video import VideoSettings

        g, area = self.geometry, self.geometry.factor**2
        preset = dict(
            patch_size=g.patch_size, merge_size=g.merge_size, temporal_patch_size=g.temporal_patch_size,
            image_mean=g.image_mean, image_std=g.image_std, min_pixels=128 * area, max_pixels=768 * area,
            total_pixels=int(128000 * area * 0.9),
        )  # fmt: skip
        preset.update({k: v for k, v in overrides.items() if v is not None})
        return VideoSettings(**preset)

    def video_span(
        self, grid_thw: Sequence[int], frame_indices: Sequence[int] = (), source_fps: float | None = None
    ) -> VisionSpan:
        """The token layout of one video: `grid_thw` in patches; frames and fps give Qwen3's timestamps."""
        t, h, w = (int(v) for v in grid_thw)
        per_group = h * w // self.geometry.merge_size**2
        if not self.timestamps:
            return VisionSpan("video", per_group, t)
        if (
            source_fps is None
            or source_fps <= 0
            or len(frame_indices) != t * self.geometry.temporal_patch_size
        ):
            raise ValueError(
                f"{self.name} timestamps need the {t * self.geometry.temporal_patch_size} sampled frame indices "
                f"and the source fps (got {len(frame_indices)} indices, fps {source_fps})"
            )
        return VisionSpan("video", per_group, t, group_timestamps(frame_indices, source_fps, t))

    def image_span(self, grid_thw: Sequence[int]) -> VisionSpan:
        t, h, w = (int(v) for v in grid_thw)
        return VisionSpan("image", t * h * w // self.geometry.merge_size**2)

    def processor_configs(self, min_pixels: int, max_pixels: int) -> dict[str, dict]:
        """`preprocessor_config.json` and `video_preprocessor_config.json` of a checkpoint of this family."""
        g = self.geometry
        common = dict(
            do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True, image_mean=list(g.image_mean),
            image_std=list(g.image_std), merge_size=g.merge_size, patch_size=g.patch_size,
            temporal_patch_size=g.temporal_patch_size, resample=3, rescale_factor=1 / 255, min_pixels=min_pixels,
            max_pixels=max_pixels, size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        )  # fmt: skip
        return {
            "preprocessor_config.json": dict(
                common, image_processor_type=self.image_processor_type, processor_class=self.processor_class
            ),
            "video_preprocessor_config.json": dict(
                common, video_processor_type=self.video_processor_type, processor_class=self.processor_class
            ),
        }


def group_timestamps(frame_indices: Sequence[int], source_fps: float, groups: int) -> tuple[float, ...]:
    """Seconds of each temporal group: the mean source time of its frames (Qwen3-VL's rule, exact for uneven
    spacing such as kept annotated frames). frame_indices: one per frame given to the model."""
    per = len(frame_indices) // groups
    return tuple(
        (frame_indices[g * per] + frame_indices[g * per + per - 1]) / 2 / source_fps for g in range(groups)
    )


def timestamp_text(seconds: float) -> str:
    return f"<{seconds:.1f} seconds>"


QWEN2_GEOMETRY = VisionGeometry(patch_size=14)
QWEN3_GEOMETRY = VisionGeometry(patch_size=16, image_mean=HALF, image_std=HALF)

FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(
            name="qwen2_vl",
            model_types=("qwen2_vl",),
            stock_classes={"qwen2_vl": "Qwen2VLForConditionalGeneration"},
            attention_classes=("Qwen2VLAttention",),
            geometry=QWEN2_GEOMETRY,
            processor_class="Qwen2VLProcessor",
            verified="tiny random checkpoints: capture = eager attention, gradients, training, save/reload, eval",
        ),
        FamilySpec(
            name="qwen2_5_vl",
            model_types=("qwen2_5_vl",),
            stock_classes={"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"},
            attention_classes=("Qwen2_5_VLAttention",),
            geometry=QWEN2_GEOMETRY,
            second_per_grid_ts=True,
            verified="tiny random checkpoints (as qwen2_vl) + 2-rank DDP / ZeRO-3 / FSDP2; the paper's model",
        ),
        FamilySpec(
            name="qwen3_vl",
            model_types=("qwen3_vl", "qwen3_vl_moe"),
            stock_classes={
                "qwen3_vl": "Qwen3VLForConditionalGeneration",
                "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
            },
            attention_classes=("Qwen3VLTextAttention", "Qwen3VLMoeTextAttention"),
            geometry=QWEN3_GEOMETRY,
            qk_norm=True,
            timestamps=True,
            processor_class="Qwen3VLProcessor",
            video_processor_type="Qwen3VLVideoProcessor",
            verified="tiny random checkpoints, dense and MoE (incl. DeepStack image + video batches) + 2-rank ZeRO-3",
        ),
        FamilySpec(
            name="qwen3_5",
            model_types=("qwen3_5", "qwen3_5_moe"),
            stock_classes={
                "qwen3_5": "Qwen3_5ForConditionalGeneration",
                "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
            },
            attention_classes=("Qwen3_5Attention", "Qwen3_5MoeAttention"),
            geometry=QWEN3_GEOMETRY,
            qk_norm=True,
            hybrid=True,
            timestamps=True,
            processor_class="Qwen3VLProcessor",
            video_processor_type="Qwen3VLVideoProcessor",
            verified="tiny random checkpoints (gated q, partial rotary, 1-in-4 softmax layers)",
        ),
    )
}


def supported_model_types() -> list[str]:
    return sorted(t for spec in FAMILIES.values() for t in spec.model_types)


def family_of(model_or_config) -> FamilySpec:
    """The family of a model (stock, subclassed, PEFT/DeepSpeed/FSDP-wrapped), a config, a `model_type` string,
    a family name or a checkpoint folder. Raises `ValueError` naming the supported model types."""
    model_type = _model_type(model_or_config)
    for spec in FAMILIES.values():
        if model_type in spec.model_types or model_type == spec.name:
            return spec
    raise ValueError(
        f"unsupported model type {model_type!r}: SWIM supports {', '.join(supported_model_types())}"
    )


def _model_type(obj) -> str:
    if isinstance(obj, str | Path):
        path = Path(obj)
        if (path / "config.json").is_file():
            return json.loads((path / "config.json").read_text())["model_type"]
        return str(obj)
    config = getattr(obj, "config", obj)
    model_type = getattr(config, "model_type", None)
    from torch import nn

    if model_type is None and isinstance(getattr(obj, "module", None), nn.Module):  # DeepSpeed / DDP wrappers
        return _model_type(obj.module)
    if model_type is None:
        raise ValueError(f"cannot tell the model family of {type(obj).__name__} (no config.model_type)")
    return model_type
