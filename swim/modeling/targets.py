"""Target builders: what distribution a supervised row's attention is compared with, per (row, group) pair.

The data side always ships one thing per object: the area fraction of each vision-token cell the annotation
covers (`object_targets`, docs/batch_contract.md), which the metrics use for "inside". The loss's target is built
from it here by a named builder, selected by the recipe key `attn_target`:

- `area` (SWIM, the default): the area fractions themselves (renormalised per group by the loss): zero outside
  the object.
- `klal` (KLAL, Figure 2 of the paper): three levels on the token grid of each group — the *target cells* (every
  cell the annotation touches), a *ring* of cells within Chebyshev distance `ring` of them, and a fixed low
  *floor* on every other cell. The paper states the shape only; its constants are unknown, so the three
  levels' masses (`attn_target_masses`, default 0.6 / 0.3 / 0.1 of each group's total, spread evenly over the
  level's cells; a level with no cell gives its mass to the others in proportion) and the ring radius
  (`attn_target_ring`, default 1: the 8-neighbourhood) are recipe keys.

Each builder is a small pure function `(target, groups, cells, config) -> [B, n, K]`; a new one is one more entry
in `TARGET_BUILDERS`. Targets are constants of the loss (no gradient).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from swim.modeling.losses import segment_sum


def area_target(
    target: torch.Tensor, groups: torch.Tensor, cells: torch.Tensor | None, config
) -> torch.Tensor:
    """The area fractions as they are: `[B, n, K]`."""
    return target


def dilate_cells(
    inside: torch.Tensor, groups: torch.Tensor, cells: torch.Tensor, radius: int
) -> torch.Tensor:
    """Cells within Chebyshev distance `radius` of an inside cell of the same group (the inside cells included).

    inside: Bool `[B, n, K]`; groups: Long `[B, K]` (-1 padding); cells: Long `[B, K, 2]` (row, column of each
    token in its group's merged grid, -1 padding). Returns Bool `[B, n, K]` (False on padding).
    """
    b, n, k = inside.shape
    if k == 0 or radius <= 0:
        return inside & (groups >= 0)[:, None, :]
    num_groups = int(groups.max()) + 1
    height, width = int(cells[..., 0].max()) + 1, int(cells[..., 1].max()) + 1
    slot = torch.where(groups < 0, num_groups, groups)  # padding -> an extra, empty group
    index = (slot * height + cells[..., 0].clamp(min=0)) * width + cells[..., 1].clamp(min=0)  # [B, K]
    index = index[:, None, :].expand(b, n, k)
    dense = inside.new_zeros((b, n, (num_groups + 1) * height * width), dtype=torch.float32)
    dense = dense.scatter_reduce(2, index, (inside & (groups >= 0)[:, None, :]).float(), "amax")
    grown = torch.nn.functional.max_pool2d(
        dense.view(-1, 1, height, width), kernel_size=2 * radius + 1, stride=1, padding=radius
    )
    return (grown.view(b, n, -1).gather(2, index) > 0) & (groups >= 0)[:, None, :]


def three_level_target(
    inside: torch.Tensor, groups: torch.Tensor, cells: torch.Tensor, ring: int, masses: Sequence[float]
) -> torch.Tensor:
    """KLAL's map: per (row, group), mass `masses[0]` spread evenly over the inside cells, `masses[1]` over the
    ring (within `ring` cells of them, Chebyshev), `masses[2]` over every other cell of the group; a level
    without cells gives its mass to the others in proportion, so each group sums to 1.

    inside: Bool `[B, n, K]`; groups `[B, K]`; cells `[B, K, 2]` -> float32 `[B, n, K]` (0 on padding).
    """
    real = (groups >= 0)[:, None, :].expand_as(inside)
    inside = inside & real
    near = dilate_cells(inside, groups, cells, ring) & ~inside
    levels = torch.stack([inside, near, real & ~inside & ~near]).float()  # [3, B, n, K]
    num_groups = int(groups.max()) + 1 if groups.numel() else 0
    counts = torch.stack([segment_sum(level, groups, num_groups) for level in levels])  # [3, B, n, G]
    mass = torch.as_tensor(list(masses), dtype=torch.float32, device=inside.device)[:, None, None, None]
    mass = mass * (counts > 0)
    per_cell = mass / mass.sum(0, keepdim=True).clamp_min(1e-30) / counts.clamp_min(1.0)  # [3, B, n, G]
    index = groups.clamp(min=0)[None, :, None, :].expand(3, -1, inside.shape[1], -1)
    return (levels * per_cell.gather(3, index)).sum(0)


def klal_target(
    target: torch.Tensor, groups: torch.Tensor, cells: torch.Tensor | None, config
) -> torch.Tensor:
    """KLAL's three-level map around every cell the annotation touches (area fraction > 0)."""
    if cells is None:
        raise ValueError(
            "attn_target 'klal' needs the grid position of every vision token (vision_token_cell)"
        )
    return three_level_target(target > 0, groups, cells, config.target_ring, config.target_masses)


TargetBuilder = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", object], torch.Tensor]
TARGET_BUILDERS: dict[str, TargetBuilder] = {"area": area_target, "klal": klal_target}
