"""Readers for referring video object segmentation layouts: MeViS, Ref-YouTube-VOS, Ref-DAVIS17.

    swim data rvos mevis data/mevis/train runs/mevis_train.json [--query ins_tag|seg_token]
    swim validate data/mevis/valid_u --layout mevis
    swim validate data/ref-youtube-vos --layout ytvos --split train

Layouts (as released; Ref-DAVIS17 in the Ref-YouTube-VOS layout produced by ReferFormer's conversion, which Sa2VA
also reads):
- `mevis`: a split folder with `meta_expressions.json` (`videos → {vid: {frames, expressions: {eid: {exp, obj_id,
  anno_id}}}}`), `JPEGImages/<vid>/<frame>.jpg` and, for `train` / `valid_u`, `mask_dict.json` (`anno_id → one
  COCO RLE or null per frame`). `valid` has no masks (scored on the CodaLab server).
- `ytvos` / `davis`: a root with `meta_expressions/<split>/meta_expressions.json` (`exp`, `obj_id`),
  `<split>/JPEGImages/<vid>/<frame>.jpg` and, where released, `<split>/Annotations/<vid>/<frame>.png` (palette
  PNGs: pixel value = object id). Ref-YouTube-VOS `valid` has no masks (server only).

An expression's ground truth is the union of its objects' masks on every frame (empty where none is visible).
`expression_record` turns an expression into an NL-Refer-style training/evaluation record: the frame folder as the
video, one object whose annotation holds that union on every frame, and a Sa2VA-style exchange — "Please segment
<ins>{expression}</ins>." / "Sure." (`ins_tag`: the query is the expression's last token, having read all of it) or
"Please segment {expression}." / "Sure, [SEG]." (`seg_token`).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from swim.data.masks import MaskDecodeError, decode_segmentation, encode_mask
from swim.data.records import RecordError

logger = logging.getLogger(__name__)

LAYOUTS = ("mevis", "ytvos", "davis")
QUERIES = ("ins_tag", "seg_token")
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class RvosExpression:
    """One referring expression of one video."""

    layout: str
    source: str  # the meta file
    position: int  # 0-based order of the expression in the meta file
    video: str
    exp_id: str
    text: str
    frame_dir: Path
    frame_names: list[str]  # frame file stems, in order
    objects: list  # MeViS: annotation ids; ytvos/davis: object ids (palette values)
    mask_source: Path | None = None  # mask_dict.json (mevis) or the Annotations/<vid> folder (ytvos/davis)
    _mask_dict: dict | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        return f"{self.video}/{self.exp_id}"

    def error(self, field_name: str, reason: str, code: str = "shape") -> RecordError:
        return RecordError(self.source, self.position, field_name, reason, code)

    @cached_property
    def frame_files(self) -> list[Path]:
        files = (
            {p.stem: p for p in self.frame_dir.iterdir() if p.suffix.lower() in FRAME_SUFFIXES}
            if self.frame_dir.is_dir()
            else {}
        )
        return [files.get(name, self.frame_dir / f"{name}.jpg") for name in self.frame_names]

    @property
    def has_masks(self) -> bool:
        return self.mask_source is not None

    def frame_size(self) -> tuple[int, int]:
        with Image.open(self.frame_files[0]) as im:
            return im.height, im.width

    def masks(self) -> list[np.ndarray]:
        """The union of the expression's objects' masks on every frame: bool `[H, W]` per frame."""
        if not self.has_masks:
            raise ValueError(f"{self.key}: this split has no masks")
        h, w = self.frame_size()
        out = []
        for t, name in enumerate(self.frame_names):
            union = np.zeros((h, w), bool)
            if self.layout == "mevis":
                for anno in self.objects:
                    per_frame = self._mask_dict[str(anno)]
                    if per_frame[t] is not None:
                        union |= decode_segmentation(per_frame[t], h, w).astype(bool)
            else:
                path = self.mask_source / f"{name}.png"
                if path.exists():
                    ids = np.asarray(Image.open(path))
                    for obj in self.objects:
                        union |= ids == int(obj)
            out.append(union)
        return out


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise RecordError(path, None, "<file>", "not found", "missing_file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RecordError(path, None, "<file>", f"not JSON: {e}", "shape") from None


def load_layout(path: str | Path, layout: str, split: str | None = None) -> list[RvosExpression]:
    """Every expression of a split (see the module docstring for `path` per layout)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    path = Path(path).resolve()
    if layout == "mevis":
        meta_path, frames_root = path / "meta_expressions.json", path / "JPEGImages"
        mask_path = path / "mask_dict.json"
        mask_dict = _read_json(mask_path) if mask_path.exists() else None
    else:
        split = split or "valid"
        meta_path, frames_root = (
            path / "meta_expressions" / split / "meta_expressions.json",
            path / split / "JPEGImages",
        )
        mask_dict, mask_path = None, path / split / "Annotations"
    meta = _read_json(meta_path)
    if not isinstance(meta.get("videos"), dict):
        raise RecordError(meta_path, None, "videos", "expected a 'videos' object", "shape")
    out = []
    for video, entry in meta["videos"].items():
        for exp_id, exp in (entry.get("expressions") or {}).items():
            objects = exp.get("anno_id") if layout == "mevis" else exp.get("obj_id")
            objects = objects if isinstance(objects, list) else [objects]
            has_masks = mask_dict is not None if layout == "mevis" else (mask_path / video).is_dir()
            out.append(RvosExpression(
                layout=layout, source=str(meta_path), position=len(out), video=video, exp_id=str(exp_id),
                text=str(exp.get("exp", "")).strip(), frame_dir=frames_root / video,
                frame_names=[str(f) for f in entry.get("frames", [])], objects=objects,
                mask_source=(mask_path if layout == "mevis" else mask_path / video) if has_masks else None,
                _mask_dict=mask_dict,
            ))  # fmt: skip
    return out


def conversation(text: str, query: str, seg_token: str = "[SEG]") -> list[dict]:
    """The Sa2VA-style exchange that asks for the expression's mask (see the module docstring)."""
    if query not in QUERIES:
        raise ValueError(f"query must be one of {QUERIES}, got {query!r}")
    if query == "ins_tag":
        return [
            {"from": "human", "value": f"Please segment <ins>{text}</ins>."},
            {"from": "gpt", "value": "Sure."},
        ]
    return [
        {"from": "human", "value": f"Please segment {text}."},
        {"from": "gpt", "value": f"Sure, {seg_token}."},
    ]


def expression_record(expression: RvosExpression, query: str = "ins_tag", seg_token: str = "[SEG]") -> dict:
    """An NL-Refer-style training record (dict) of one expression, with its masks on every frame."""
    if not expression.has_masks:
        raise ValueError(f"{expression.key}: this split has no masks to train on")
    height, width = expression.frame_size()
    masks = expression.masks()
    return {"video": str(expression.frame_dir), "index": f"rvos_{expression.layout}_{expression.key}",
            "conversations": conversation(expression.text, query, seg_token), "height": height, "width": width,
            "annotation": [{str(t): {"segmentation": encode_mask(m)} for t, m in enumerate(masks)}]}  # fmt: skip


def validate_layout(path: str | Path, layout: str, split: str | None = None) -> tuple[int, list[RecordError]]:
    """(expressions checked, problems): meta shape, empty expressions, frames present and readable, masks present,
    decodable, of the frame size, one per frame, and not empty on every frame."""
    try:
        expressions = load_layout(path, layout, split)
    except RecordError as e:
        return 0, [e]
    problems: list[RecordError] = []
    checked_videos: dict[str, tuple[int, int] | None] = {}
    for e in expressions:
        if not e.text:
            problems.append(e.error("exp", "empty expression"))
        if not e.frame_names:
            problems.append(e.error("frames", "no frames listed", "frame_range"))
            continue
        if e.video not in checked_videos:
            missing = [f.name for f in e.frame_files if not f.exists()]
            if missing:
                reason = f"{len(missing)} frame file(s) missing in {e.frame_dir}, e.g. {missing[0]}"
                problems.append(e.error("frames", reason, "missing_video"))
                checked_videos[e.video] = None
            else:
                checked_videos[e.video] = e.frame_size()
        if checked_videos[e.video] is None or not e.has_masks:
            continue
        if e.layout == "mevis":
            bad = [a for a in e.objects if str(a) not in e._mask_dict]
            if bad:
                problems.append(
                    e.error("anno_id", f"annotation ids {bad} not in mask_dict.json", "mask_decode")
                )
                continue
            wrong = [a for a in e.objects if len(e._mask_dict[str(a)]) != len(e.frame_names)]
            if wrong:
                reason = f"annotations {wrong}: not one mask per frame ({len(e.frame_names)})"
                problems.append(e.error("anno_id", reason, "mask_size"))
                continue
        try:
            masks = e.masks()
        except (MaskDecodeError, ValueError, OSError) as err:
            problems.append(e.error("masks", f"cannot decode: {err}", "mask_decode"))
            continue
        if not any(m.any() for m in masks):
            field_name = "obj_id" if e.layout != "mevis" else "anno_id"
            problems.append(
                e.error(field_name, "the referred objects are empty on every frame", "mask_empty")
            )
    return len(expressions), problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="swim data rvos", description="convert an RVOS split to NL-Refer-style records"
    )
    parser.add_argument("layout", choices=LAYOUTS)
    parser.add_argument("path", help="MeViS split folder, or the Ref-YouTube-VOS / Ref-DAVIS17 root")
    parser.add_argument("out", help="output .json")
    parser.add_argument("--split", help="ytvos / davis split (default: valid)")
    parser.add_argument("--query", default="ins_tag", choices=QUERIES)
    parser.add_argument("--seg-token", default="[SEG]")
    args = parser.parse_args(argv)
    expressions = load_layout(args.path, args.layout, args.split)
    records = [expression_record(e, args.query, args.seg_token) for e in expressions]
    Path(args.out).write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    logger.info("wrote %d records to %s", len(records), args.out)
