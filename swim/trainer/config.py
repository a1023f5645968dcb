"""`SwimSFTConfig`: TRL's `SFTConfig` plus the grounding settings, with defaults a video SFT run needs."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from trl import SFTConfig

from swim.modeling.capture import ALL_LAYERS, duplicate_indices
from swim.modeling.losses import HEAD_FUSIONS
from swim.modeling.objective import LAYER_FUSIONS, LOSS_TYPES, GroundingConfig
from swim.modeling.targets import TARGET_BUILDERS
from swim.trainer.distributed import prepare_cpu_distributed

logger = logging.getLogger(__name__)


@dataclass
class SwimSFTConfig(SFTConfig):
    """SFT settings plus SWIM's attention-grounding loss. Every field can be set in a recipe YAML or on the CLI.

    Defaults that differ from `SFTConfig`: `remove_unused_columns=False` and
    `dataset_kwargs={"skip_prepare_dataset": True}` (our dataset yields model-ready tensors), `max_length=None`
    (truncating would cut video tokens), and activation checkpointing on with `{"use_reentrant": False}`.

    Reentrant checkpointing runs the layers' forward without autograd, so the attention captured inside it would
    carry no gradient: with a non-zero `attn_weight` it is rejected here, before any training starts. Multi-process
    DeepSpeed / FSDP runs without CUDA are set up for gloo here too (`swim.trainer.distributed`).
    """

    # list[str]: the parser then takes both `[2, 7]` and `all`; `grounding_config()` makes the indices ints
    attn_layers: list[str] | None = field(
        default=None,
        metadata={
            "help": "Supervised decoder layers, or `all`; default: the official relative depths ([2,7,12,17,22,27] "
            "at 28)."
        },
    )
    attn_loss: str = field(default="kl", metadata={"help": f"Attention loss, one of {LOSS_TYPES}."})
    attn_layer_fusion: str = field(
        default="mean",
        metadata={
            "help": f"Layer fusion, one of {LAYER_FUSIONS} (per_layer: mean of the per-layer losses, KLAL)."
        },
    )
    attn_head_fusion: str = field(
        default="mean",
        metadata={
            "help": f"Head fusion, one of {HEAD_FUSIONS} (renorm_mean: renormalise each head first, KLAL)."
        },
    )
    attn_weight: float = field(
        default=1.0, metadata={"help": "λ, weight of the attention loss (0 = NTP only)."}
    )
    text_weight: float = field(default=1.0, metadata={"help": "Weight of the next-token loss (paper: 0.05)."})
    attn_query_offset: int = field(
        default=0,
        metadata={
            "help": "0: supervise the query token's own row; -1: the row before it (official; for an answer token "
            "the row that predicts it)."
        },
    )
    attn_target: str = field(
        default="area",
        metadata={
            "help": f"Target builder, one of {tuple(TARGET_BUILDERS)}: SWIM's area map or KLAL's 3 levels."
        },
    )
    attn_target_ring: int = field(
        default=1,
        metadata={"help": "klal target: ring radius around the target cells, in cells (Chebyshev)."},
    )
    attn_target_masses: list[float] = field(
        default_factory=lambda: [0.6, 0.3, 0.1],
        metadata={
            "help": "klal target: masses of the target cells, the ring and the floor (normalised to 1)."
        },
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
        metadata={
            "help": 'Checkpointing mode; must be {"use_reentrant": false} when attn_weight != 0 (the attention '
            "loss takes q/k from inside the checkpointed forward)."
        },
    )

    def grounding_config(self) -> GroundingConfig:
        return GroundingConfig(
            layers=self.attn_layers,
            loss_type=self.attn_loss,
            layer_fusion=self.attn_layer_fusion,
            head_fusion=self.attn_head_fusion,
            attn_weight=self.attn_weight,
            text_weight=self.text_weight,
            query_offset=self.attn_query_offset,
            target=self.attn_target,
            target_ring=self.attn_target_ring,
            target_masses=tuple(self.attn_target_masses),
        )

    def __post_init__(self):
        prepare_cpu_distributed(self)  # before TrainingArguments sets up its devices
        super().__post_init__()
        self.attn_layers = _layers(
            self.attn_layers
        )  # indices as ints (the command line gives strings), or "all"
        self.grounding_config()  # validate early, with the field names in the message
        self._prefer_fsdp_checkpointing()
        self._check_checkpointing()

    def _prefer_fsdp_checkpointing(self) -> None:
        """FSDP's own activation checkpointing (non-reentrant) replaces the Trainer's: both at once is an error."""
        fsdp_ac = (
            self.fsdp
            and str((self.fsdp_config or {}).get("activation_checkpointing", False)).lower() == "true"
        )
        if fsdp_ac and self.activation_checkpointing:
            logger.info(
                "fsdp_config.activation_checkpointing is on: the Trainer's activation_checkpointing is off"
            )
            self.activation_checkpointing = self.gradient_checkpointing = False

    def _check_checkpointing(self) -> None:
        if self.attn_weight == 0 or not self.activation_checkpointing:
            return
        kwargs = self.activation_checkpointing_kwargs
        if isinstance(kwargs, dict) and kwargs.get("use_reentrant") is not False:
            mode = "reentrant" if kwargs.get("use_reentrant") else "reentrant (torch's default when unset)"
            raise ValueError(
                f"activation_checkpointing_kwargs={kwargs} selects {mode} activation checkpointing, under which the "
                'attention loss gets no gradient. Set `activation_checkpointing_kwargs: {"use_reentrant": false}` '
                "in the recipe (or --activation_checkpointing_kwargs '{\"use_reentrant\": false}'), or turn "
                "`activation_checkpointing` off."
            )


def _layers(value) -> list[int] | str | None:
    """`attn_layers` as given in a recipe (`[2, 7]`, `all`) or on the command line (`2 7`, `all`)."""
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value)
    if values == [ALL_LAYERS]:
        return ALL_LAYERS
    try:
        layers = [int(v) for v in values]
    except ValueError:
        raise ValueError(f"attn_layers must be layer indices or {ALL_LAYERS!r}, got {value!r}") from None
    repeated = duplicate_indices(layers)
    if repeated:
        raise ValueError(
            f"attn_layers {layers} list {repeated} more than once, which would weight those layers twice: list each "
            "layer index once"
        )
    return layers
