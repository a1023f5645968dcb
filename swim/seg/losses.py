"""Segmentation losses of the MBA paper's objective: small pure functions, float32, autocast off.

Shapes used throughout (P = (frame, object) pairs of a batch, m = SAM-2's low-resolution mask side):
- `logits` float `[P, m, m]`: mask logits of each pair;
- `target` float `[P, m, m]`: ground-truth mask (binary, or area fractions thresholded by the caller);
- per-pair results are summed here (`*_sum`) so that the trainer can average them over the pairs of a whole
  optimiser step (every rank, every accumulation micro-step), as it does for the attention loss.

The losses:
- `bce_sum`, `dice_sum`: Sa2VA's `2.0·BCE + 0.5·Dice` (mmdet `CrossEntropyLoss(use_sigmoid)` averaged over a pair's
  pixels; `DiceLoss(naive_dice=True, eps=1)`), on every pixel at `m×m` (Sa2VA samples 12,544 uncertain points);
- `boundary_sum`: the paper gives no formula (§3.3); ours is the later English draft's and the authors' code's
  operator — L1 between 3×3 Sobel gradient magnitudes of `σ(logits)` and of the target — with each map divided by
  its own maximum (`norm="per_sample"`). `norm="parity"` reproduces the released code, which divides every sample by
  the *first* sample's maximum (`amax(...)[0]`, defect D5 of docs/segmentation.md §2.2);
- `tmc_loss`: text–mask contrastive loss, a symmetric InfoNCE between L2-normalised text and mask-pooled visual
  vectors over the objects of a batch, the mean of the two directions (the code's choice; the paper's Eq. 5 writes
  the sum); `parity` returns the released code's constant zero (D4: its shape error is caught and zeroed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BOUNDARY_NORMS = ("per_sample", "parity")
TMC_IMPLS = ("fixed", "parity")

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def bce_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Σ over pairs of the pixel-mean binary cross-entropy with logits: `[P, m, m]` x2 -> scalar."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        per_pixel = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
        return per_pixel.flatten(1).mean(1).sum()


def dice_sum(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Σ over pairs of the naive Dice loss `1 − (2 Σ p·t + eps) / (Σ p + Σ t + eps)`, `p = σ(logits)`.

    eps = 1 as in Sa2VA (mmdet `DiceLoss(naive_dice=True, eps=1)`): an empty target with an all-zero prediction
    costs 0, and a confident empty prediction on a non-empty target costs almost 1.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        p, t = logits.float().sigmoid().flatten(1), target.float().flatten(1)
        return (1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).sum()


def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude `sqrt(gx² + gy²)` of maps `[P, m, m]` with 3×3 Sobel kernels and replicated borders
    (an object touching the frame edge has no edge there)."""
    kx = _SOBEL_X.to(x)
    kernels = torch.stack([kx, kx.T])[:, None]  # [2, 1, 3, 3]: d/dx, d/dy
    grad = F.conv2d(F.pad(x[:, None], (1, 1, 1, 1), mode="replicate"), kernels)
    return grad.pow(2).sum(1).clamp_min(1e-12).sqrt()


def boundary_sum(
    logits: torch.Tensor, target: torch.Tensor, norm: str = "per_sample", eps: float = 1e-6
) -> torch.Tensor:
    """Σ over pairs of the pixel-mean L1 between normalised Sobel magnitudes of `σ(logits)` and the target.

    norm `per_sample`: each map divided by its own maximum (+ eps), so every pair's edges peak at ~1 whatever its
    contrast; `parity`: every map divided by the first pair's maximum, as the released code does (D5).
    """
    if norm not in BOUNDARY_NORMS:
        raise ValueError(f"boundary norm must be one of {BOUNDARY_NORMS}, got {norm!r}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        edges = [sobel_magnitude(logits.float().sigmoid()), sobel_magnitude(target.float())]
        if norm == "per_sample":
            edges = [e / (e.amax(dim=(1, 2), keepdim=True) + eps) for e in edges]
        else:
            edges = [e / (e.amax(dim=(1, 2), keepdim=True)[0] + eps) for e in edges]
        return (edges[0] - edges[1]).abs().flatten(1).mean(1).sum()


def tmc_loss(
    z_text: torch.Tensor, z_mask: torch.Tensor, tau: float = 0.15, impl: str = "fixed"
) -> torch.Tensor:
    """Symmetric InfoNCE between matched rows of `z_text` and `z_mask` (`[N, C]` each; row i of both is object i).

    `fixed`: with `s = norm(z_text) @ norm(z_mask)ᵀ / tau`, the mean of the text→mask and mask→text cross-entropies
    with the diagonal as targets; an exact graph-connected 0 for fewer than two objects (no negative).
    `parity`: the released code's value, a constant 0 (defect D4), kept for bookkeeping.
    """
    if impl not in TMC_IMPLS:
        raise ValueError(f"tmc impl must be one of {TMC_IMPLS}, got {impl!r}")
    if impl == "parity" or z_text.shape[0] < 2:
        return z_text.float().sum() * 0.0
    with torch.autocast(device_type=z_text.device.type, enabled=False):
        sim = F.normalize(z_text.float(), dim=-1) @ F.normalize(z_mask.float(), dim=-1).T / tau
        labels = torch.arange(sim.shape[0], device=sim.device)
        return (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels)) / 2


def masked_average(features: torch.Tensor, weights: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Weighted spatial mean of features `[P, C, h, w]` under non-negative weights `[P, h, w]` -> `[P, C]`."""
    w = weights.to(features.dtype)[:, None]
    return (features * w).sum((2, 3)) / (w.sum((2, 3)) + eps)
