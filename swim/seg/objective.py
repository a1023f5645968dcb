"""The segmentation objective on a collated batch: pairs, prompts, the SWIM attention prior, the loss terms.

`L_seg = seg_weight·(bce_weight·BCE + dice_weight·Dice) + s_aux·(tmc_weight·L_tmc + boundary_weight·L_bound)`,
added by the trainer to SWIM's `text_weight·CE + attn_weight·L_attn` (docs/segmentation.md §6.5).
BCE, Dice and the boundary loss are means over the supervised (frame, object) pairs; TMC is one contrast per
micro-batch over its objects. The unit of each is counted before the step (`step_counts`) so that the trainer can
average over a whole optimiser step, as it does for the attention loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from swim.modeling.capture import vision_token_positions
from swim.modeling.losses import group_normalize
from swim.seg.losses import bce_sum, boundary_sum, dice_sum, tmc_loss

MASK_THRESHOLD = 0.5  # a low-resolution cell is foreground when the mask covers at least half of it


@dataclass
class Pairs:
    """The (sample, object, frame slot) of each pair, its row in the frames tensor and its query (object) index."""

    sample: torch.Tensor  # Long [P]
    obj: torch.Tensor  # Long [P]
    slot: torch.Tensor  # Long [P] frame slot within the sample
    frame: torch.Tensor  # Long [P] row of seg["pixel_values"]
    query: torch.Tensor  # Long [P] index into the queries (objects with a query token)
    query_sample: torch.Tensor  # Long [Q]
    query_object: torch.Tensor  # Long [Q]


def make_pairs(seg: dict, all_frames: bool = False) -> Pairs:
    """The pairs of a collated seg batch: the valid (masked) ones, or every (frame, object with a query) pair
    (`all_frames`, inference). Queries are the (sample, object) slots with a query token, in row-major order."""
    has_query = seg["query"] >= 0  # [B, O]
    qs, qo = has_query.nonzero(as_tuple=True)
    query_id = torch.full_like(seg["query"], -1)
    query_id[qs, qo] = torch.arange(qs.numel(), device=qs.device)
    if all_frames:
        chosen = has_query[:, :, None] & (seg["frame_index"] >= 0)[:, None, :]
    else:
        chosen = seg["valid"] & has_query[:, :, None]
    b, o, f = chosen.nonzero(as_tuple=True)
    return Pairs(sample=b, obj=o, slot=f, frame=seg["frame_index"][b, f], query=query_id[b, o],
                 query_sample=qs, query_object=qo)  # fmt: skip


def step_counts(seg: dict | None) -> tuple[int, int]:
    """(supervised pairs, 1 if the micro-batch has a TMC contrast — two objects with pairs — else 0)."""
    if seg is None:
        return 0, 0
    valid = seg["valid"] & (seg["query"] >= 0)[..., None]
    objects = int(valid.any(-1).sum())
    return int(valid.sum()), int(objects >= 2)


def attention_gate(
    attn: torch.Tensor,
    groups: torch.Tensor,
    token_grid: torch.Tensor,
    frame_group: torch.Tensor,
    pairs: Pairs,
    side: int,
) -> torch.Tensor:
    """SWIM's attention map of each pair's object on its frame's temporal group, as an MBA gate `[P, side, side]`.

    attn: `[B, O, K]` per-object attention on the video tokens (any non-negative scale; rows of objects without
    attention are all zero and give the gate 1); groups: `[B, K]` temporal group of each token (-1 padding);
    token_grid: Long `[B, 2]` (gh, gw); frame_group: Long `[B, F]`. Each group is renormalised to sum to 1 over its
    K_g tokens, resized bilinearly from (gh, gw) to side×side, and `G = clamp(K_g · a, 0, 1)`: uniform attention
    gives 1 everywhere, attention concentrated on a few tokens gives 1 there and ~0 elsewhere.
    """
    n_groups = int(groups.max()) + 1 if groups.numel() else 0
    normed = group_normalize(attn.float(), groups, max(n_groups, 1))  # [B, O, K]
    out = []
    for b, o, f in zip(pairs.sample.tolist(), pairs.obj.tolist(), pairs.slot.tolist()):
        tokens = groups[b] == frame_group[b, f]
        a = normed[b, o, tokens]
        if a.sum() <= 0:
            out.append(attn.new_ones(side, side))
            continue
        gh, gw = (int(v) for v in token_grid[b])
        up = F.interpolate(a.reshape(1, 1, gh, gw), size=(side, side), mode="bilinear", align_corners=False)
        out.append((a.numel() * up[0, 0]).clamp(0, 1))
    return torch.stack(out) if out else attn.new_zeros(0, side, side)


def object_attention(video_attn: torch.Tensor, query_objects: torch.Tensor, n_objects: int) -> torch.Tensor:
    """Mean over each object's rows of layer-fused attention: `[B, n, K]`, query_objects `[B, n]` -> `[B, O, K]`."""
    onehot = (
        F.one_hot(query_objects.clamp(min=0), n_objects).float() * (query_objects >= 0)[..., None]
    )  # [B, n, O]
    total = torch.einsum("bno,bnk->bok", onehot, video_attn.float())
    return total / onehot.sum(1)[..., None].clamp_min(1.0)


def swim_attention(probe, grounding: dict, rows: torch.Tensor, input_ids, attention_mask, vision_token_ids):
    """Per-object SWIM attention `[B, O, K]` (head mean, mean of the group-normalised maps of the supervised layers)
    and the token groups `[B, K]`, from the q/k captured by `probe` for `rows` (no gradient)."""
    with torch.no_grad():
        video_positions = vision_token_positions(input_ids, vision_token_ids)
        attn = probe.vision_attention(rows, video_positions, attention_mask)  # [Λ, B, n, K]
        groups = grounding["vision_token_group"][:, : video_positions.shape[1]].to(attn.device)
        n_groups = max(int(groups.max()) + 1, 1)
        fused = torch.stack([group_normalize(a, groups, n_groups) for a in attn]).mean(0)
        n_objects = grounding["object_targets"].shape[1]
        return object_attention(fused, grounding["query_objects"].to(attn.device), n_objects), groups


def loss_terms(
    out, seg: dict, pairs: Pairs, tmc_impl: str, tmc_tau: float, boundary_norm: str, detach_visual: bool
):
    """Sums over the pairs of BCE, Dice and the boundary loss, and the micro-batch's TMC (0 below two objects).

    out: `SegHeadOutput` for `pairs`; seg: the collated targets. Returns float32 scalars.
    """
    target = (seg["masks"][pairs.sample, pairs.obj, pairs.slot] >= MASK_THRESHOLD).float()
    terms = {
        "bce": bce_sum(out.logits, target),
        "dice": dice_sum(out.logits, target),
        "bound": boundary_sum(out.logits, target, boundary_norm),
    }
    n_queries = out.prompts.shape[0]
    visual = out.pooled.detach() if detach_visual else out.pooled
    counts = torch.zeros(n_queries, device=visual.device).index_add_(
        0, pairs.query, torch.ones_like(pairs.query, dtype=torch.float)
    )
    z_mask = torch.zeros(n_queries, visual.shape[1], device=visual.device, dtype=visual.dtype).index_add_(
        0, pairs.query, visual
    )
    present = counts > 0
    z_mask = z_mask[present] / counts[present, None]
    terms["tmc"] = tmc_loss(out.prompts[present], z_mask, tmc_tau, tmc_impl)
    return terms
