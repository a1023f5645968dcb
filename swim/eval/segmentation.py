"""Segmentation metrics in NumPy: J (region similarity), F (boundary F-measure), J&F, DAVIS statistics, cIoU/gIoU.

Definitions follow the DAVIS-2017 evaluation code (`davis2017/metrics.py`; docs/segmentation.md §4),
written anew without OpenCV / scikit-image:

- J = |P ∩ G| / |P ∪ G| per frame; 1 when both masks are empty.
- F: boundaries are 1-px maps (`seg2bmap`: a pixel is boundary when it differs from its E, S or SE neighbour);
  each boundary is dilated with a disk of radius `ceil(0.008 · ‖(H, W)‖)` (8 px at 480×854); precision = predicted
  boundary pixels within the dilated GT boundary / predicted boundary pixels, recall likewise; F = 2PR / (P + R).
  Both empty → 1; exactly one empty → 0.
- RVOS practice (Ref-DAVIS17, MeViS, ReVOS as scored by Sa2VA's tools): per expression, J and F are the means over
  all frames (no first/last-frame drop); `J&F = (mean_expr J + mean_expr F) / 2`.
- DAVIS statistics of a per-frame series: M (mean), R (share of frames > 0.5), D (decay: mean of the first quarter
  of frames minus the last quarter).
- Referring image segmentation: cIoU = Σ intersections / Σ unions over the split, gIoU = mean per-sample IoU (both
  empty → 1, as J).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

BOUND_TH = 0.008


def region_similarity(pred: np.ndarray, gt: np.ndarray) -> float:
    """J of two boolean masks `[H, W]` (1 when both are empty)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, gt).sum() / union)


def seg2bmap(mask: np.ndarray) -> np.ndarray:
    """1-px boundary map of a boolean mask `[H, W]`: pixels that differ from their E, S or SE neighbour (DAVIS)."""
    seg = np.asarray(mask, bool)
    east, south, south_east = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    east[:, :-1], south[:-1, :], south_east[:-1, :-1] = seg[:, 1:], seg[1:, :], seg[1:, 1:]
    boundary = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    boundary[-1, :] = seg[-1, :] ^ east[-1, :]
    boundary[:, -1] = seg[:, -1] ^ south[:, -1]
    boundary[-1, -1] = False
    return boundary


def disk(radius: int) -> np.ndarray:
    """Boolean disk `[2r+1, 2r+1]`: offsets with x² + y² ≤ r² (scikit-image's `disk`)."""
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


def dilate(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Binary dilation of `[H, W]` by a symmetric footprint (zero padding), by shifted ORs of the boundary pixels'
    neighbourhoods."""
    r = footprint.shape[0] // 2
    padded = np.pad(np.asarray(mask, bool), r)
    out = np.zeros_like(padded)
    h, w = mask.shape
    for dy, dx in zip(*np.nonzero(footprint)):
        out[r : r + h, r : r + w] |= padded[dy : dy + h, dx : dx + w]
    return out[r : r + h, r : r + w]


def boundary_f(pred: np.ndarray, gt: np.ndarray, bound_th: float = BOUND_TH) -> float:
    """F of two boolean masks `[H, W]` (see the module docstring)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    radius = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*gt.shape)))
    pred_b, gt_b = seg2bmap(pred), seg2bmap(gt)
    n_pred, n_gt = int(pred_b.sum()), int(gt_b.sum())
    if n_pred == 0 or n_gt == 0:
        return 1.0 if n_pred == n_gt else 0.0
    footprint = disk(radius)
    precision = float((pred_b & dilate(gt_b, footprint)).sum()) / n_pred
    recall = float((gt_b & dilate(pred_b, footprint)).sum()) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def davis_stats(values: list[float] | np.ndarray) -> dict[str, float]:
    """M, R, D of a per-frame series (DAVIS: decay over four equal bins of frames)."""
    values = np.asarray(values, float)
    bins = np.array_split(values, 4) if len(values) >= 4 else [values, values]
    return {"M": float(values.mean()), "R": float((values > 0.5).mean()),
            "D": float(bins[0].mean() - bins[-1].mean())}  # fmt: skip


def expression_scores(preds: list[np.ndarray], gts: list[np.ndarray]) -> dict[str, float]:
    """J, F and J&F of one expression: means over its frames (boolean masks `[H, W]` per frame)."""
    if len(preds) != len(gts) or not preds:
        raise ValueError(f"need one prediction per ground-truth frame, got {len(preds)} and {len(gts)}")
    j = [region_similarity(p, g) for p, g in zip(preds, gts)]
    f = [boundary_f(p, g) for p, g in zip(preds, gts)]
    return {"J": float(np.mean(j)), "F": float(np.mean(f)), "JF": float((np.mean(j) + np.mean(f)) / 2),
            "frames": len(gts), "J_decay": davis_stats(j)["D"], "F_decay": davis_stats(f)["D"]}  # fmt: skip


def summarize(scores: list[dict[str, float]]) -> dict[str, float]:
    """RVOS summary over expressions: mean J, mean F, `J&F = (J + F) / 2`, and the number of expressions."""
    if not scores:
        return {"J": float("nan"), "F": float("nan"), "JF": float("nan"), "expressions": 0}
    j = float(np.mean([s["J"] for s in scores]))
    f = float(np.mean([s["F"] for s in scores]))
    return {"J": j, "F": f, "JF": (j + f) / 2, "expressions": len(scores)}


@dataclass
class IoUAccumulator:
    """cIoU (Σ I / Σ U) and gIoU (mean per-sample IoU) over a split of referring image segmentation."""

    intersection: float = 0.0
    union: float = 0.0
    per_sample: list[float] = field(default_factory=list)

    def add(self, pred: np.ndarray, gt: np.ndarray) -> float:
        pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
        i, u = float(np.logical_and(pred, gt).sum()), float(np.logical_or(pred, gt).sum())
        self.intersection += i
        self.union += u
        iou = 1.0 if u == 0 else i / u
        self.per_sample.append(iou)
        return iou

    def summary(self) -> dict[str, float]:
        return {"cIoU": self.intersection / self.union if self.union else float("nan"),
                "gIoU": float(np.mean(self.per_sample)) if self.per_sample else float("nan"),
                "samples": len(self.per_sample)}  # fmt: skip
