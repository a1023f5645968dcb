"""`SwimSFTConfig`: TRL's `SFTConfig` plus the grounding settings, with defaults a video SFT run needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trl import SFTConfig

from swim.modeling.objective import LAYER_FUSIONS, LOSS_TYPES, GroundingConfig


@dataclass
class SwimSFTConfig(SFTConfig):
    """SFT settings plus SWIM's attention-grounding loss. Every field can be set in a recipe YAML or on the CLI.

    Defaults that differ from `SFTConfig`: `remove_unused_columns=False` and
    `dataset_kwargs={"skip_prepare_dataset": True}` (our dataset yields model-ready tensors), `max_length=None`
    (truncating would cut video tokens), and activation checkpointing on with `{"use_reentrant": False}` (either
    mode trains the grounding loss; non-reentrant is the PyTorch recommendation).
    """

    attn_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "Supervised decoder layers; default: the official relative depths ([2,7,12,17,22,27] at 28)."
        },
    )
    attn_loss: str = field(default="kl", metadata={"help": f"Attention loss, one of {LOSS_TYPES}."})
    attn_layer_fusion: str = field(
        default="mean", metadata={"help": f"Layer fusion, one of {LAYER_FUSIONS}."}
    )
    attn_weight: float = field(
        default=1.0, metadata={"help": "λ, weight of the attention loss (0 = NTP only)."}
    )
    text_weight: float = field(default=1.0, metadata={"help": "Weight of the next-token loss (paper: 0.05)."})
    attn_query_offset: int = field(
        default=0,
        metadata={"help": "0: supervise the tagged token's own row; -1: the row before it (official)."},
    )
    freeze_vision_tower: bool = field(
        default=True, metadata={"help": "Freeze the vision tower and the merger (as the paper)."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the grounding columns."})
    dataset_kwargs: dict[str, Any] | str | None = field(
        default_factory=lambda: {"skip_prepare_dataset": True},
        metadata={"help": "Our dataset yields model-ready tensors: skip TRL's text preparation."},
    )
    max_length: int | None = field(
        default=None, metadata={"help": "No truncation (it would cut video tokens)."}
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing`."}
    )
    activation_checkpointing: bool | None = field(
        default=True, metadata={"help": "Recompute decoder layers in backward to save memory."}
    )
    activation_checkpointing_kwargs: dict[str, Any] | str | None = field(
        default_factory=lambda: {"use_reentrant": False},
        metadata={"help": "Checkpointing mode; both reentrant and non-reentrant train the grounding loss."},
    )

    def grounding_config(self) -> GroundingConfig:
        return GroundingConfig(
            layers=self.attn_layers,
            loss_type=self.attn_loss,
            layer_fusion=self.attn_layer_fusion,
            attn_weight=self.attn_weight,
            text_weight=self.text_weight,
            query_offset=self.attn_query_offset,
        )

    def __post_init__(self):
        super().__post_init__()
        self.grounding_config()  # validate early, with the field names in the message
