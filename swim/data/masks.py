"""Object masks -> per-temporal-group targets on the merged-token grid.

The official code keeps masks at pixel resolution and upsamples the predicted attention to them, pairs each
temporal group with the mask of its *second* frame only, and uses frame 0 as a "no mask" sentinel
(docs/official_release.md §2.5, §3.2, §7 items 7 and 9). Here each mask is area-pooled onto the model's token grid (one value per merged
28x28 token: the fraction of the cell the object covers), both frames of a group are used, and validity is
an explicit flag.

Annotation format (VideoRefer / NL-Refer): one dict per object, `{"<original frame index>": {"segmentation":
RLE or polygons}}`. A `null` segmentation means "not annotated at this frame" and is skipped. Boxes, points and
polylines (`swim.data.geometry`) sit in the same place and become cover maps with the same conventions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from swim.data.geometry import entry_kind, geometry_cover, pool_mask

logger = logging.getLogger(__name__)

PAIR_MODES = ("union", "mean")


class MaskDecodeError(ValueError):
    """A segmentation cannot be decoded, or does not fit the video it belongs to."""


def decode_segmentation(seg: Any, height: int | None = None, width: int | None = None) -> np.ndarray:
    """COCO segmentation -> uint8 [H, W] of 0/1.

    Accepts compressed RLE (`counts` str/bytes), uncompressed RLE (`counts` a list of run lengths) and
    polygons (a list of flat [x0, y0, x1, y1, ...] lists; needs `height`/`width`). For RLE, `size` [h, w] is
    taken from the dict (or from `height`/`width` if absent) and must equal `height`/`width` when given.
    """
    if seg is None:
        raise MaskDecodeError("segmentation is None")
    given = (height, width) if height is not None and width is not None else None
    try:
        if isinstance(seg, Mapping):
            if "counts" not in seg:
                raise MaskDecodeError(f"RLE dict has no 'counts' (keys: {sorted(seg)})")
            size = seg.get("size") or given
            if size is None:
                raise MaskDecodeError("RLE has no 'size' and no height/width was given")
            h, w = int(size[0]), int(size[1])
            if given is not None and (h, w) != given:
                raise MaskDecodeError(f"mask size {(h, w)} != video size {given}")
            counts = seg["counts"]
            if isinstance(counts, list):
                _check_runs([int(c) for c in counts], h, w)
                rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
            elif isinstance(counts, (str, bytes)):
                counts = counts.encode() if isinstance(counts, str) else counts
                _check_runs(compressed_rle_runs(counts), h, w)
                rle = {"size": [h, w], "counts": counts}
            else:
                raise MaskDecodeError(f"RLE 'counts' must be str, bytes or list, got {type(counts).__name__}")
            out = mask_utils.decode(rle)
        elif isinstance(seg, list):
            if given is None:
                raise MaskDecodeError("polygon segmentation needs the frame height and width")
            polys = [[float(v) for v in poly] for poly in seg]
            bad = [i for i, poly in enumerate(polys) if len(poly) < 6 or len(poly) % 2]
            if bad:
                raise MaskDecodeError(f"polygons {bad} need an even number (>= 6) of coordinates")
            if not polys:
                return np.zeros(given, np.uint8)
            out = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, *given)))
        else:
            raise MaskDecodeError(f"unsupported segmentation type {type(seg).__name__}")
    except MaskDecodeError:
        raise
    except Exception as e:  # pycocotools raises bare TypeError/ValueError/IndexError on malformed input
        raise MaskDecodeError(
            f"pycocotools could not decode the segmentation: {type(e).__name__}: {e}"
        ) from e
    return np.ascontiguousarray(out, dtype=np.uint8)


def compressed_rle_runs(counts: bytes) -> list[int]:
    """Run lengths of a COCO compressed RLE string (the inverse of pycocotools' `rleToString`).

    pycocotools decodes corrupt strings without an error (and reads past its buffer), so the runs are checked
    here first. Raises `MaskDecodeError` for a truncated string.
    """
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                raise MaskDecodeError("corrupt RLE: truncated counts string")
            c = counts[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def _check_runs(runs: list[int], h: int, w: int) -> None:
    if any(r < 0 for r in runs) or sum(runs) != h * w:
        raise MaskDecodeError(f"corrupt RLE: run lengths sum to {sum(runs)} (negative runs: "
                              f"{sum(r < 0 for r in runs)}), expected {h}x{w} = {h * w}")  # fmt: skip


def encode_mask(mask: np.ndarray) -> dict:
    """uint8 [H, W] -> compressed COCO RLE with `counts` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def annotated_frames(annotation: Mapping[str, Any]) -> list[int]:
    """Sorted original frame indices with a non-null entry (mask, box, points or polyline) in one object's
    annotation."""
    frames = []
    for key, entry in annotation.items():
        try:
            frame = int(key)
        except ValueError as e:
            raise MaskDecodeError(f"frame key {key!r} is not an integer frame index") from e
        if not isinstance(entry, Mapping):
            raise MaskDecodeError(f"frame {key}: expected an object such as {{'segmentation': ...}}, got "
                                  f"{type(entry).__name__}")  # fmt: skip
        try:
            kind = entry_kind(entry)
        except ValueError as e:
            raise MaskDecodeError(f"frame {key}: {e}") from None
        if entry[kind] is not None:
            frames.append(frame)
    return sorted(frames)


def object_group_targets(
    annotation: Mapping[str, Any],
    frame_indices: Sequence[int],
    original_hw: tuple[int, int],
    resized_hw: tuple[int, int],
    temporal_patch: int = 2,
    pair_mode: str = "union",
    merge_factor: int = 28,
) -> tuple[np.ndarray, np.ndarray]:
    """One object's annotation -> (targets float32 [G, gh*gw], valid bool [G]).

    Group g covers the sampled frames `frame_indices[tp*g : tp*(g+1)]` (original indices, padding repeats
    included; an image is one group of one frame, `temporal_patch=1`) and is valid when at least one of them is
    annotated. Its target is, over those annotated frames,
    - "union": the pooled pixel union of the masks (exact union area, not the max of pooled maps), and the
      per-cell maximum with the cover maps of box / points / polyline entries (`swim.data.geometry`);
    - "mean": the mean of the pooled maps.
    Invalid groups are all zero. Cells are (gh, gw) row-major, matching the vision token order of a group.
    """
    if pair_mode not in PAIR_MODES:
        raise ValueError(f"pair_mode must be one of {PAIR_MODES}, got {pair_mode!r}")
    if len(frame_indices) % temporal_patch:
        raise ValueError(
            f"{len(frame_indices)} frame indices is not a multiple of temporal_patch={temporal_patch}"
        )
    gh, gw = resized_hw[0] // merge_factor, resized_hw[1] // merge_factor
    n_groups = len(frame_indices) // temporal_patch
    available = set(annotated_frames(annotation))
    keys = {int(k): k for k in annotation}
    masks: dict[int, np.ndarray] = {}  # pixel masks (segmentations)
    covers: dict[int, np.ndarray] = {}  # cover maps of geometry entries
    for f in sorted(available.intersection(frame_indices)):
        entry = annotation[keys[f]]
        kind = entry_kind(entry)
        try:
            if kind == "segmentation":
                masks[f] = decode_segmentation(entry["segmentation"], *original_hw)
            else:
                covers[f] = geometry_cover(kind, entry, original_hw, resized_hw, merge_factor)
        except MaskDecodeError as e:
            raise MaskDecodeError(f"frame {f}: {e}") from e

    targets = np.zeros((n_groups, gh * gw), np.float32)
    valid = np.zeros(n_groups, bool)
    for g in range(n_groups):
        group = set(frame_indices[g * temporal_patch : (g + 1) * temporal_patch])
        frames = sorted(f for f in group if f in masks)
        geometry = [covers[f] for f in sorted(group) if f in covers]
        if not frames and not geometry:
            continue
        if pair_mode == "union":
            union = np.logical_or.reduce([masks[f] for f in frames]) if frames else None
            pooled = np.maximum.reduce(
                ([pool_mask(union, resized_hw, merge_factor)] if frames else []) + geometry
            )
        else:
            pooled = np.mean(
                [pool_mask(masks[f], resized_hw, merge_factor) for f in frames] + geometry, axis=0
            )
        targets[g] = pooled.reshape(-1)
        valid[g] = True
    return targets, valid
