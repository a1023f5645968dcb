"""The SWIM objective: `text_weight · CE + attn_weight · L_attn`, shared by the model forward and the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from swim.modeling.capture import AttentionProbe, video_token_positions
from swim.modeling.losses import LOSSES, fuse_layers, segment_sum, swim_parity_loss

LOSS_TYPES = ("kl", "bce", "dice", "swim_parity")
LAYER_FUSIONS = ("mean", "product")


@dataclass
class GroundingConfig:
    """Settings of the attention-grounding loss (every one of them changes results: set them in a recipe)."""

    layers: list[int] | None = field(
        default=None,
        metadata={"help": "Supervised decoder layers; None = the official relative depths (see capture.py)."},
    )
    loss_type: str = field(default="kl", metadata={"help": f"One of {LOSS_TYPES}."})
    layer_fusion: str = field(
        default="mean", metadata={"help": f"One of {LAYER_FUSIONS} (swim_parity: product)."}
    )
    attn_weight: float = field(default=1.0, metadata={"help": "λ, weight of the attention loss."})
    text_weight: float = field(default=1.0, metadata={"help": "Weight of the next-token loss (paper: 0.05)."})
    query_offset: int = field(
        default=0,
        metadata={
            "help": "Supervised row = tagged token position + offset: 0 its own row, -1 the row before it "
            "(the official code)."
        },
    )

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.layer_fusion not in LAYER_FUSIONS:
            raise ValueError(f"layer_fusion must be one of {LAYER_FUSIONS}, got {self.layer_fusion!r}")
        if self.query_offset not in (0, -1):
            raise ValueError(f"query_offset must be 0 or -1, got {self.query_offset}")


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
    """(target `[B, n, K]`, groups `[B, K]`, valid pairs Bool `[B, n, G]`) of the given samples' rows."""
    objects = grounding["query_objects"].clamp(min=0)
    groups = grounding["video_token_group"]
    k = groups.shape[1]
    target = grounding["object_targets"][..., :k].gather(1, objects[..., None].expand(-1, -1, k))
    num_groups = grounding["object_group_valid"].shape[-1]
    valid = grounding["object_group_valid"].gather(1, objects[..., None].expand(-1, -1, num_groups))
    valid = valid & (rows >= 0)[..., None] & (segment_sum(target.float(), groups, num_groups) > 0)
    return target, groups, valid


def supervised_pair_count(grounding: dict | None, query_offset: int) -> int:
    """Number of supervised (row, temporal group) pairs of a batch: the unit the attention loss averages over."""
    if grounding is None:
        return 0
    return int(_row_targets(grounding, supervised_rows(grounding, query_offset))[2].sum())


def grounding_loss(
    probe: AttentionProbe,
    grounding: dict,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    video_token_id: int,
    config: GroundingConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Attention loss of a batch whose forward ran inside `probe.capture(supervised_rows(grounding, offset))`.

    grounding: the collator's dict (docs/batch_contract.md): query_positions / query_objects Long `[B, n]`,
    object_targets `[B, O, K]`, object_group_valid Bool `[B, O, G]`, video_token_group Long `[B, K]`.
    Only samples with at least one query are computed. Returns the mean over the valid (row, temporal group)
    pairs (0 when there is none) and `{"attn_pairs": their number}`; mean x pairs is the batch's loss sum.
    """
    rows = supervised_rows(grounding, config.query_offset)
    active = (grounding["query_positions"] >= 0).any(-1).nonzero(as_tuple=True)[0]
    if active.numel() == 0:
        return input_ids.new_zeros((), dtype=torch.float32), {"attn_pairs": 0.0}
    subset = {key: value[active] for key, value in grounding.items()}
    rows = rows[active]
    video_positions = video_token_positions(input_ids[active], video_token_id)
    _check_video_tokens(video_positions, subset["video_token_group"])
    subset["video_token_group"] = subset["video_token_group"][:, : video_positions.shape[1]]
    target, groups, valid = _row_targets(subset, rows)
    num_groups = valid.shape[-1]

    mask = attention_mask[active] if attention_mask is not None else None
    attn = probe.video_attention(rows, video_positions, mask, batch_index=active)  # [Λ, B', n, K]
    if config.loss_type == "swim_parity":
        loss = swim_parity_loss(attn, target, groups, valid)
    else:
        log_map = fuse_layers(attn, groups, num_groups, config.layer_fusion)
        loss = LOSSES[config.loss_type](log_map, target, groups, valid)
    return loss, {"attn_pairs": float(valid.sum())}


def _check_video_tokens(video_positions: torch.Tensor, groups: torch.Tensor) -> None:
    n_tokens = (video_positions >= 0).sum(-1)
    n_labelled = (groups >= 0).sum(-1)
    if not torch.equal(n_tokens, n_labelled):
        raise ValueError(
            f"grounding targets do not match the video tokens: {n_tokens.tolist()} video tokens per sample in "
            f"input_ids but {n_labelled.tolist()} labelled in video_token_group"
        )
