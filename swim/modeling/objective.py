"""The SWIM objective: `text_weight · CE + attn_weight · L_attn`, shared by the model forward and the trainer.

`GroundingConfig` holds every setting of the attention loss: which layers, how heads and layers are fused
(SWIM: the mean map of the layers; KLAL: each head renormalised, then the mean over layers of each layer's KL),
which loss, and which target (`swim.modeling.targets`: SWIM's area map or KLAL's three-level map).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from swim.modeling.capture import ALL_LAYERS, AttentionProbe, vision_token_positions
from swim.modeling.losses import (
    HEAD_FUSIONS,
    LOSSES,
    fuse_layers,
    per_layer_loss,
    segment_sum,
    swim_parity_loss,
)
from swim.modeling.targets import TARGET_BUILDERS

LOSS_TYPES = ("kl", "bce", "dice", "swim_parity")
LAYER_FUSIONS = ("mean", "product", "per_layer")


@dataclass
class GroundingConfig:
    """Settings of the attention-grounding loss (every one of them changes results: set them in a recipe)."""

    layers: list[int] | str | None = field(
        default=None,
        metadata={
            "help": f"Supervised decoder layers; None = the official relative depths (see capture.py); "
            f"{ALL_LAYERS!r} = every softmax-attention layer."
        },
    )
    loss_type: str = field(default="kl", metadata={"help": f"One of {LOSS_TYPES}."})
    layer_fusion: str = field(
        default="mean",
        metadata={
            "help": f"One of {LAYER_FUSIONS}: the loss against the mean (or product) of the layers' maps, or "
            "the mean over layers of each layer's loss (KLAL). swim_parity: product."
        },
    )
    head_fusion: str = field(
        default="mean",
        metadata={
            "help": f"One of {HEAD_FUSIONS}: average the heads, or renormalise each head first (KLAL)."
        },
    )
    attn_weight: float = field(default=1.0, metadata={"help": "λ, weight of the attention loss."})
    text_weight: float = field(default=1.0, metadata={"help": "Weight of the next-token loss (paper: 0.05)."})
    query_offset: int = field(
        default=0,
        metadata={
            "help": "Supervised row = query token position + offset: 0 its own row, -1 the row before it "
            "(the official code; for an answer token: the row that predicts it)."
        },
    )
    target: str = field(
        default="area",
        metadata={"help": f"Target builder, one of {tuple(TARGET_BUILDERS)} (swim.modeling.targets)."},
    )
    target_ring: int = field(default=1, metadata={"help": "klal target: ring radius in cells (Chebyshev)."})
    target_masses: Sequence[float] = field(
        default=(0.6, 0.3, 0.1),
        metadata={"help": "klal target: masses of the target cells, the ring and the floor (normalised)."},
    )

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.layer_fusion not in LAYER_FUSIONS:
            raise ValueError(f"layer_fusion must be one of {LAYER_FUSIONS}, got {self.layer_fusion!r}")
        if self.head_fusion not in HEAD_FUSIONS:
            raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {self.head_fusion!r}")
        if self.query_offset not in (0, -1):
            raise ValueError(f"query_offset must be 0 or -1, got {self.query_offset}")
        if self.target not in TARGET_BUILDERS:
            raise ValueError(f"target must be one of {tuple(TARGET_BUILDERS)}, got {self.target!r}")
        if isinstance(self.layers, str) and self.layers != ALL_LAYERS:
            raise ValueError(f"layers must be a list of layer indices or {ALL_LAYERS!r}, got {self.layers!r}")
        if self.loss_type == "swim_parity" and (
            self.layer_fusion == "per_layer" or self.head_fusion != "mean"
        ):
            raise ValueError(
                "swim_parity is the official formula (product of the head-mean maps): per_layer / renorm_mean do "
                "not apply"
            )
        if self.target != "area" and self.loss_type != "kl":
            raise ValueError(
                f"target {self.target!r} is a distribution: it needs loss_type 'kl', got {self.loss_type!r}"
            )
        masses = tuple(float(m) for m in self.target_masses)
        if len(masses) != 3 or min(masses) < 0 or masses[0] <= 0:
            raise ValueError(
                f"target_masses must be 3 non-negative masses (target > 0), got {self.target_masses}"
            )
        self.target_masses = masses
        if self.target_ring < 0:
            raise ValueError(f"target_ring must be >= 0, got {self.target_ring}")


def has_queries(grounding: dict | None) -> bool:
    return grounding is not None and bool((grounding["query_positions"] >= 0).any())


def supervised_rows(grounding: dict, query_offset: int) -> torch.Tensor:
    """The sequence rows whose attention is supervised: tagged positions + offset, `-1` where there is none.

    grounding["query_positions"]: Long `[B, n]` (-1 padding) -> Long `[B, n]`. Known before the forward, so it is
    what `AttentionProbe.capture(query_positions=...)` keeps.
    """
    positions = grounding["query_positions"]
    rows = positions + query_offset
    return torch.where((positions >= 0) & (rows >= 0), rows, -1)


def _row_targets(grounding: dict, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(area target `[B, n, K]`, groups `[B, K]`, valid pairs Bool `[B, n, G]`) of the given samples' rows."""
    objects = grounding["query_objects"].clamp(min=0)
    groups = grounding["vision_token_group"]
    k = groups.shape[1]
    target = grounding["object_targets"][..., :k].gather(1, objects[..., None].expand(-1, -1, k))
    num_groups = grounding["object_group_valid"].shape[-1]
    valid = grounding["object_group_valid"].gather(1, objects[..., None].expand(-1, -1, num_groups))
    valid = valid & (rows >= 0)[..., None] & (segment_sum(target.float(), groups, num_groups) > 0)
    return target, groups, valid


def supervised_pair_count(grounding: dict | None, query_offset: int) -> int:
    """Number of supervised (row, group) pairs of a batch: the unit the attention loss averages over.

    A group is a video's temporal group or an image; a row is a query token's row (tagged word or answer token,
    chosen by the data side) with one object. The target builder does not change the count: a pair is valid when
    its group is annotated and the object's area target has mass there.
    """
    if grounding is None:
        return 0
    return int(_row_targets(grounding, supervised_rows(grounding, query_offset))[2].sum())


def grounding_loss(
    probe: AttentionProbe,
    grounding: dict,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    vision_token_ids: int | Sequence[int],
    config: GroundingConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Attention loss of a batch whose forward ran inside `probe.capture(supervised_rows(grounding, offset))`.

    grounding: the collator's dict (docs/batch_contract.md): query_positions / query_objects Long `[B, n]`,
    object_targets `[B, O, K]`, object_group_valid Bool `[B, O, G]`, vision_token_group Long `[B, K]`,
    vision_token_cell Long `[B, K, 2]`. vision_token_ids: the ids whose positions are the K columns (image and
    video tokens: `capture.vision_token_ids(config)`). Only samples with at least one query are computed.
    Returns the mean over the valid (row, group) pairs (0 when there is none) and `{"attn_pairs": their
    number}`; mean x pairs is the batch's loss sum.
    """
    rows = supervised_rows(grounding, config.query_offset)
    active = (grounding["query_positions"] >= 0).any(-1).nonzero(as_tuple=True)[0]
    if active.numel() == 0:
        return input_ids.new_zeros((), dtype=torch.float32), {"attn_pairs": 0.0}
    subset = {key: value[active] for key, value in grounding.items()}
    rows = rows[active]
    vision_positions = vision_token_positions(input_ids[active], vision_token_ids)
    _check_vision_tokens(vision_positions, subset["vision_token_group"])
    k = vision_positions.shape[1]
    subset["vision_token_group"] = subset["vision_token_group"][:, :k]
    target, groups, valid = _row_targets(subset, rows)
    cells = subset["vision_token_cell"][:, :k] if "vision_token_cell" in subset else None
    target = TARGET_BUILDERS[config.target](target, groups, cells, config)
    num_groups = valid.shape[-1]

    mask = attention_mask[active] if attention_mask is not None else None
    attn = probe.vision_attention(rows, vision_positions, mask, batch_index=active, head_fusion=config.head_fusion,
                                  groups=groups)  # [Λ, B', n, K]  # fmt: skip
    if config.loss_type == "swim_parity":
        loss = swim_parity_loss(attn, target, groups, valid)
    elif config.layer_fusion == "per_layer":
        loss = per_layer_loss(LOSSES[config.loss_type], attn, target, groups, valid)
    else:
        log_map = fuse_layers(attn, groups, num_groups, config.layer_fusion)
        loss = LOSSES[config.loss_type](log_map, target, groups, valid)
    return loss, {"attn_pairs": float(valid.sum())}


def _check_vision_tokens(vision_positions: torch.Tensor, groups: torch.Tensor) -> None:
    n_tokens = (vision_positions >= 0).sum(-1)
    n_labelled = (groups >= 0).sum(-1)
    if not torch.equal(n_tokens, n_labelled):
        raise ValueError(
            f"grounding targets do not match the vision tokens: {n_tokens.tolist()} image/video tokens per sample "
            f"in input_ids but {n_labelled.tolist()} labelled in vision_token_group"
        )
