"""Grounding losses between attention on vision tokens and object targets: small pure functions.

Shapes used throughout:
- `attn`    float `[B, n, K]`: attention of n query rows on the K vision tokens (image and video tokens) of each
            sample, heads fused; `[Λ, B, n, K]` before layer fusion, `[B, H, n, K]` before head fusion.
- `target`  float `[B, n, K]`: the row's target on each vision-token cell (the area fraction covered by the
            object, or a target built from it, `swim.modeling.targets`).
- `groups`  long  `[B, K]`: group of each vision token: a video's temporal group or an image (`-1` for padding).
- `valid`   bool  `[B, n, G]`: which (row, group) pairs are supervised.

Every loss is computed per (row, group) pair — the supervision signal lives on the merged token grid of one
temporal group (two frames) or one image — and averaged over the valid pairs. All of them run in float32 with
autocast off, so they are safe under bf16 autocast (unlike `F.binary_cross_entropy`).
"""

from __future__ import annotations

import torch

TINY = torch.finfo(torch.float32).tiny
BCE_EPS = 1e-6
HEAD_FUSIONS = ("mean", "renorm_mean")


def _segment_index(groups: torch.Tensor, num_groups: int, like: torch.Tensor) -> torch.Tensor:
    """Groups `[B, K]` -> index `[B, n, K]` for scatter, with padding columns sent to the extra slot G."""
    index = torch.where(groups < 0, num_groups, groups)
    return index[:, None, :].expand_as(like)


def segment_sum(x: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Sum of `x [B, n, K]` over the tokens of each group -> `[B, n, G]` (padding columns ignored)."""
    out = x.new_zeros(*x.shape[:-1], num_groups + 1)
    return out.scatter_add(-1, _segment_index(groups, num_groups, x), x)[..., :num_groups]


def segment_max(x: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Max of `x [B, n, K]` over each group -> `[B, n, G]` (`-inf` for empty groups)."""
    out = x.new_full((*x.shape[:-1], num_groups + 1), float("-inf"))
    return out.scatter_reduce(-1, _segment_index(groups, num_groups, x), x, "amax")[..., :num_groups]


def segment_min(x: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Min of `x [B, n, K]` over each group -> `[B, n, G]` (`+inf` for empty groups)."""
    return -segment_max(-x, groups, num_groups)


def broadcast_groups(per_group: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Per-group values `[B, n, G]` back onto the tokens `[B, n, K]` (padding columns get group 0's value)."""
    return per_group.gather(-1, groups.clamp(min=0)[:, None, :].expand(*per_group.shape[:-1], -1))


def group_normalize(x: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Rescale non-negative `x [B, n, K]` so that each temporal group sums to 1 (empty groups stay 0)."""
    total = segment_sum(x, groups, num_groups)
    return x / broadcast_groups(total, groups).clamp_min(TINY) * (groups >= 0)[:, None, :]


def group_log_normalize(log_x: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Log-space renormalisation: `log_x - logsumexp over the group` (`[B, n, K]`, no additive epsilon)."""
    peak = segment_max(log_x, groups, num_groups).clamp_min(torch.finfo(log_x.dtype).min)
    shifted = (log_x - broadcast_groups(peak, groups)).exp() * (groups >= 0)[:, None, :]
    log_total = segment_sum(shifted, groups, num_groups).clamp_min(TINY).log() + peak
    return log_x - broadcast_groups(log_total, groups)


def fuse_heads(attn: torch.Tensor, groups: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Fuse per-head attention `[B, H, n, K]` into `[B, n, K]`.

    mean:        the heads' probabilities averaged (a head that puts more of its mass on the vision tokens weighs
                 more).
    renorm_mean: each head renormalised over the tokens of each group, then averaged (KLAL: every head weighs
                 the same); the result sums to 1 over every group.
    """
    if mode == "mean":
        return attn.mean(1)
    if mode == "renorm_mean":
        b, h, n, k = attn.shape
        num_groups = int(groups.max()) + 1 if groups.numel() else 0
        return group_normalize(attn.reshape(b, h * n, k), groups, num_groups).reshape(b, h, n, k).mean(1)
    raise ValueError(f"unknown head fusion {mode!r}: expected one of {HEAD_FUSIONS}")


def fuse_layers(
    attn: torch.Tensor, groups: torch.Tensor, num_groups: int, mode: str = "mean"
) -> torch.Tensor:
    """Fuse per-layer maps `[Λ, B, n, K]` into one group-normalised log-map `[B, n, K]`.

    mean:    log of the mean over layers of each layer's group-normalised map.
    product: sum over layers of the log maps, renormalised per group in log space (a normalised geometric
             mean; the official code multiplies raw probabilities and divides by `sum + 1e-6`, which leaves ~1e-12).
    """
    if mode == "mean":
        per_layer = torch.stack([group_normalize(a, groups, num_groups) for a in attn])
        return per_layer.mean(0).clamp_min(TINY).log()
    if mode == "product":
        return group_log_normalize(attn.clamp_min(TINY).log().sum(0), groups, num_groups)
    raise ValueError(f"unknown layer fusion {mode!r}: expected 'mean' or 'product'")


def per_layer_loss(loss_fn, attn: torch.Tensor, target: torch.Tensor, groups: torch.Tensor,
                   valid: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Mean over layers of each layer's loss (KLAL's `1/|L| Σ_l KL(P ‖ Q_l)`): attn `[Λ, B, n, K]`.

    Each layer's map is group-normalised and compared with the target on its own; by Jensen this is at least the
    loss against the layer-mean map (`fuse_layers(..., "mean")`), a stronger objective: every layer must look at
    the target, not only their average. Still a mean over the valid pairs (per pair: the mean over layers).
    """
    num_groups = valid.shape[-1]
    per_layer = [loss_fn(group_normalize(a, groups, num_groups).clamp_min(TINY).log(), target, groups, valid)
                 for a in attn]  # fmt: skip
    return torch.stack(per_layer).mean()


def masked_pair_mean(per_pair: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of `per_pair [B, n, G]` over `valid` pairs; an exact, graph-connected 0 when there is none."""
    valid = valid.to(per_pair.dtype)
    return (per_pair * valid).sum() / valid.sum().clamp_min(1.0)


def kl_loss(
    log_attn: torch.Tensor, target: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """KLAL: KL(target ‖ attention) within each temporal group, averaged over valid pairs.

    log_attn: `[B, n, K]` group-normalised log attention; target: `[B, n, K]` non-negative mask mass (normalised
    here per group). Zero when the attention equals the normalised target.
    """
    num_groups = valid.shape[-1]
    with torch.autocast(device_type=log_attn.device.type, enabled=False):
        t = group_normalize(target.float(), groups, num_groups)
        terms = torch.where(t > 0, t * (t.clamp_min(TINY).log() - log_attn.float()), torch.zeros_like(t))
        return masked_pair_mean(segment_sum(terms, groups, num_groups), valid)


def _max_normalized(log_attn: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Per group, attention divided by its maximum: values in [0, 1], the peak token at exactly 1."""
    peak = segment_max(log_attn, groups, num_groups).clamp_min(torch.finfo(log_attn.dtype).min)
    return (log_attn - broadcast_groups(peak, groups)).exp() * (groups >= 0)[:, None, :]


def _bce(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pred = pred.clamp(BCE_EPS, 1 - BCE_EPS)
    return -(target * pred.log() + (1 - target) * (1 - pred).log())


def _group_mean(x: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    ones = (groups >= 0).to(x.dtype)[:, None, :].expand_as(x)
    return segment_sum(x, groups, num_groups) / segment_sum(ones, groups, num_groups).clamp_min(1.0)


def bce_loss(
    log_attn: torch.Tensor, target: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Binary cross-entropy between the max-normalised map of each group and the mask's area fractions.

    Token-mean per pair, then mean over valid pairs. Float32, autocast off, clamped logs.
    """
    num_groups = valid.shape[-1]
    with torch.autocast(device_type=log_attn.device.type, enabled=False):
        pred = _max_normalized(log_attn.float(), groups, num_groups)
        per_token = _bce(pred, target.float()) * (groups >= 0)[:, None, :]
        return masked_pair_mean(_group_mean(per_token, groups, num_groups), valid)


def dice_loss(
    log_attn: torch.Tensor,
    target: torch.Tensor,
    groups: torch.Tensor,
    valid: torch.Tensor,
    smooth: float = 1e-6,
) -> torch.Tensor:
    """Soft Dice (the soft-IoU family) between the max-normalised map and the mask fractions:
    `1 - (2 Σ p·t + s) / (Σ p + Σ t + s)` per pair, mean over valid pairs. Zero for a map equal to a binary mask.
    """
    num_groups = valid.shape[-1]
    with torch.autocast(device_type=log_attn.device.type, enabled=False):
        pred = _max_normalized(log_attn.float(), groups, num_groups)
        t = target.float()
        overlap = segment_sum(pred * t, groups, num_groups)
        total = segment_sum(pred, groups, num_groups) + segment_sum(t, groups, num_groups)
        return masked_pair_mean(1 - (2 * overlap + smooth) / (total + smooth), valid)


def swim_parity_loss(
    attn: torch.Tensor, target: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """The official formula: product of the layers' head-mean maps, per-group min-max, BCE with the mask.

    attn: `[Λ, B, n, K]` raw head-mean probabilities. The product is taken in log space and min-max is scale
    invariant, so this equals the official value without its epsilons — which, in the release, swamp a product
    of six ~1e-5 probabilities and leave BCE inputs near 1e-12 (docs/official_release.md §2.3).
    """
    num_groups = valid.shape[-1]
    with torch.autocast(device_type=attn.device.type, enabled=False):
        log_product = attn.float().clamp_min(TINY).log().sum(0)
        scaled = _max_normalized(log_product, groups, num_groups)  # (0, 1], peak 1: min-max needs no epsilon
        low = broadcast_groups(segment_min(scaled, groups, num_groups), groups)
        pred = (scaled - low) / (1 - low).clamp_min(BCE_EPS)
        per_token = _bce(pred, target.float()) * (groups >= 0)[:, None, :]
        return masked_pair_mean(_group_mean(per_token, groups, num_groups), valid)


LOSSES = {"kl": kl_loss, "bce": bce_loss, "dice": dice_loss}
