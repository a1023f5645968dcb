"""Geometry annotations — boxes, points, polylines — beside COCO masks, and their token-cell cover maps.

An object's annotation maps a frame index (for an image record: the image's index, `"0"` for one image) to one
entry, one of:

- `{"segmentation": RLE or polygons}` (`swim.data.masks`);
- `{"box": [x0, y0, x1, y1]}`: a rectangle in pixels of the original image/frame (x right, y down, pixel edges:
  `0 <= x0 < x1 <= width`, `0 <= y0 < y1 <= height`), as in COCO `bbox` converted to corners or Qwen2.5-VL's
  absolute boxes;
- `{"points": [[x, y], ...]}`: one or more points (PixMo-Points, clicks, a task's key points), `0 <= x <= width`;
- `{"polyline": [[x, y], ...], "width": w}`: a line through two or more points, `w` pixels thick (the line
  tasks).

Each becomes a cover map on the merged-token grid of its frame with the masks' conventions (original pixels
scaled to the model's frame, one value per merged token in [0, 1], row-major): a box covers each cell by the
exact area fraction of their overlap; a polyline is rasterised at the original resolution (pixels whose centre
lies within w/2 of the line) and area-pooled like a mask; a point has no area, so it covers the cell it falls in
entirely (a point on a cell edge belongs to the cell right/below it, the image's far edge to the last cell).

`entry_problem` / `bounds_problem` give the one-line reasons `swim validate` reports (wrong arity, degenerate,
out of bounds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

KINDS = ("segmentation", "box", "points", "polyline")
GEOMETRY_KINDS = KINDS[1:]


def entry_kind(entry: Mapping[str, Any]) -> str:
    """The kind of one annotation entry; raises `ValueError` unless it has exactly one kind key."""
    found = [k for k in KINDS if k in entry]
    if len(found) != 1:
        raise ValueError(f"expected exactly one of {', '.join(KINDS)}; got keys {sorted(entry)}")
    return found[0]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _point_problem(point: Any) -> str | None:
    if not (isinstance(point, list | tuple) and len(point) == 2 and all(_is_number(c) for c in point)):
        return f"a point must be [x, y] (two numbers), got {point!r}"
    return None


def entry_problem(kind: str, entry: Mapping[str, Any]) -> str | None:
    """Why a geometry entry is malformed (arity, types, degenerate), or None. Masks are checked elsewhere."""
    value = entry[kind]
    if kind == "box":
        if not (isinstance(value, list | tuple) and len(value) == 4 and all(_is_number(c) for c in value)):
            return f"box must be [x0, y0, x1, y1] (four numbers), got {value!r}"
        x0, y0, x1, y1 = value
        if x1 <= x0 or y1 <= y0:
            return f"degenerate box {list(value)}: needs x0 < x1 and y0 < y1"
        return None
    if not isinstance(value, list | tuple) or not value:
        return f"{kind} must be a non-empty list of [x, y] points, got {value!r}"
    for point in value:
        if problem := _point_problem(point):
            return problem
    if kind == "points":
        return None
    width = entry.get("width")
    if not (_is_number(width) and width > 0):
        return f"polyline needs a positive 'width' in pixels, got {width!r}"
    if len(value) < 2:
        return f"polyline needs at least 2 points, got {len(value)}"
    if all(tuple(p) == tuple(value[0]) for p in value):
        return "degenerate polyline: all its points are equal (zero length)"
    extra = set(entry) - {"polyline", "width"}
    return f"unexpected keys {sorted(extra)} beside 'polyline'" if extra else None


def bounds_problem(kind: str, entry: Mapping[str, Any], height: int, width: int) -> str | None:
    """Why a well-formed geometry entry does not fit a `height` x `width` image, or None."""
    if kind == "box":
        x0, y0, x1, y1 = entry["box"]
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            return f"box {list(entry['box'])} outside the {width}x{height} image (x in [0, {width}], y in [0, {height}])"
        return None
    outside = [list(p) for p in entry[kind] if not (0 <= p[0] <= width and 0 <= p[1] <= height)]
    if outside:
        return f"{len(outside)} point(s) outside the {width}x{height} image, first {outside[0]}"
    return None


def interval_cover(a: float, b: float, n_in: int, n_out: int) -> np.ndarray:
    """Fraction of each of `n_out` equal cells over `[0, n_in)` that the interval `[a, b)` covers: `[n_out]`."""
    scale = n_in / n_out
    edges = np.arange(n_out + 1) * scale
    return np.clip(np.minimum(b, edges[1:]) - np.maximum(a, edges[:-1]), 0.0, None) / scale


def box_cover(box, original_hw: tuple[int, int], grid_hw: tuple[int, int]) -> np.ndarray:
    """float32 `[gh, gw]`: the exact area fraction of each cell inside the box."""
    x0, y0, x1, y1 = (float(c) for c in box)
    rows = interval_cover(y0, y1, original_hw[0], grid_hw[0])
    cols = interval_cover(x0, x1, original_hw[1], grid_hw[1])
    return np.outer(rows, cols).astype(np.float32)


def points_cover(points, original_hw: tuple[int, int], grid_hw: tuple[int, int]) -> np.ndarray:
    """float32 `[gh, gw]`: 1 on every cell that contains a point, 0 elsewhere."""
    out = np.zeros(grid_hw, np.float32)
    for x, y in points:
        row = min(int(y * grid_hw[0] / original_hw[0]), grid_hw[0] - 1)
        col = min(int(x * grid_hw[1] / original_hw[1]), grid_hw[1] - 1)
        out[row, col] = 1.0
    return out


def polyline_mask(points, width: float, hw: tuple[int, int]) -> np.ndarray:
    """bool `[H, W]`: pixels whose centre lies within `width / 2` of the polyline through `points`."""
    out = np.zeros(hw, bool)
    radius = width / 2
    pts = np.asarray(points, dtype=np.float64)
    for (ax, ay), (bx, by) in zip(pts[:-1], pts[1:]):
        # only the segment's bounding box (grown by the radius) can be within reach
        x0, x1 = max(0, math.floor(min(ax, bx) - radius)), min(hw[1], math.ceil(max(ax, bx) + radius) + 1)
        y0, y1 = max(0, math.floor(min(ay, by) - radius)), min(hw[0], math.ceil(max(ay, by) + radius) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
        dx, dy = bx - ax, by - ay
        length2 = dx * dx + dy * dy
        t = np.clip(((xx - ax) * dx + (yy - ay) * dy) / length2, 0, 1) if length2 > 0 else np.zeros_like(xx)
        out[y0:y1, x0:x1] |= (xx - ax - t * dx) ** 2 + (yy - ay - t * dy) ** 2 <= radius * radius
    return out


def _overlap_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in]: fraction of output cell k (covering n_in/n_out input pixels) that input pixel y fills.
    Rows sum to 1; this is area ("box") resampling along one axis."""
    scale = n_in / n_out
    edges = np.arange(n_out + 1) * scale
    pix = np.arange(n_in)
    lo = np.maximum(pix[None, :], edges[:-1, None])
    hi = np.minimum(pix[None, :] + 1, edges[1:, None])
    return np.clip(hi - lo, 0.0, None) / scale


def pool_mask(mask: np.ndarray, resized_hw: tuple[int, int], merge_factor: int = 28) -> np.ndarray:
    """uint8/bool [H0, W0] -> float32 [h/f, w/f]: area fraction of each merged-token cell covered by the mask.

    Equal to area-resizing the mask to the model frame size (h, w) and averaging each f x f cell, computed
    directly on the original mask with separable box weights, so it is exact (no interpolation error) and
    cheap even for 1080p masks.
    """
    h, w = resized_hw
    if h % merge_factor or w % merge_factor:
        raise ValueError(f"resized size {resized_hw} is not a multiple of {merge_factor}")
    mask = np.asarray(mask)
    wy = _overlap_weights(mask.shape[0], h // merge_factor)
    wx = _overlap_weights(mask.shape[1], w // merge_factor)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return np.zeros((h // merge_factor, w // merge_factor), np.float32)
    # only the object's bounding box contributes: small products, no multi-threaded BLAS contention
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box = np.asarray(mask[y0:y1, x0:x1], dtype=np.float64)
    return (wy[:, y0:y1] @ box @ wx[:, x0:x1].T).astype(np.float32)


def geometry_cover(
    kind: str, entry: Mapping[str, Any], original_hw: tuple[int, int], resized_hw: tuple[int, int],
    merge_factor: int,
) -> np.ndarray:  # fmt: skip
    """float32 `[h/f, w/f]` cover map of one box / points / polyline entry on the model frame's token grid."""
    grid = (resized_hw[0] // merge_factor, resized_hw[1] // merge_factor)
    if kind == "box":
        return box_cover(entry["box"], original_hw, grid)
    if kind == "points":
        return points_cover(entry["points"], original_hw, grid)
    if kind == "polyline":
        return pool_mask(
            polyline_mask(entry["polyline"], entry["width"], original_hw), resized_hw, merge_factor
        )
    raise ValueError(f"not a geometry kind: {kind!r}")
