"""Reader for the RefCOCO / RefCOCO+ / RefCOCOg referring image segmentation layout (the `refer` toolkit's files, as
LISA and Sa2VA read them).

    swim validate data/refer_seg --layout refcoco --split val [--dataset refcocog]
    swim eval refcoco --model CKPT --data data/refer_seg --dataset refcoco --split val --out eval/refcoco

Layout: `<root>/<dataset>/refs(unc).p` (`refs(umd).p` for RefCOCOg: a pickled list of refs with `ref_id`, `ann_id`,
`image_id`, `split`, `sentences: [{"sent": ...}]`), `<root>/<dataset>/instances.json` (COCO: `images` with
`file_name`, `height`, `width`; `annotations` with `segmentation`) and the COCO train2014 images in
`<root>/images/mscoco/images/train2014/`. Each sentence of each ref is one sample.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from swim.data.masks import MaskDecodeError, decode_segmentation
from swim.data.records import RecordError

REFS_FILE = {"refcoco": "refs(unc).p", "refcoco+": "refs(unc).p", "refcocog": "refs(umd).p"}
IMAGES = Path("images/mscoco/images/train2014")


@dataclass
class RefSample:
    source: str
    position: int
    key: str  # "<ref_id>/<sentence index>"
    image: Path
    text: str
    segmentation: object  # COCO polygons or RLE
    height: int
    width: int

    def mask(self) -> np.ndarray:
        return decode_segmentation(self.segmentation, self.height, self.width).astype(bool)

    def error(self, field_name: str, reason: str, code: str = "shape") -> RecordError:
        return RecordError(self.source, self.position, field_name, reason, code)


def load_refcoco(
    root: str | Path, dataset: str = "refcoco", split: str = "val", images: str | Path | None = None
) -> list[RefSample]:
    """Every (ref, sentence) of `split`."""
    if dataset not in REFS_FILE:
        raise ValueError(f"dataset must be one of {sorted(REFS_FILE)}, got {dataset!r}")
    root = Path(root)
    refs_path, instances_path = root / dataset / REFS_FILE[dataset], root / dataset / "instances.json"
    for path in (refs_path, instances_path):
        if not path.is_file():
            raise RecordError(path, None, "<file>", "not found", "missing_file")
    with refs_path.open("rb") as f:
        refs = pickle.load(f)
    instances = json.loads(instances_path.read_text())
    image_info = {im["id"]: im for im in instances["images"]}
    annotations = {a["id"]: a for a in instances["annotations"]}
    images = Path(images) if images is not None else root / IMAGES
    out = []
    for ref in refs:
        if ref.get("split") != split:
            continue
        ann, info = annotations.get(ref["ann_id"]), image_info.get(ref["image_id"])
        for k, sentence in enumerate(ref.get("sentences", [])):
            out.append(RefSample(
                source=str(refs_path), position=len(out), key=f"{ref['ref_id']}/{k}",
                image=images / (info["file_name"] if info else f"<image {ref['image_id']}>"),
                text=sentence["sent"].strip(),
                segmentation=ann["segmentation"] if ann else None, height=info["height"] if info else 0,
                width=info["width"] if info else 0,
            ))  # fmt: skip
    return out


def validate_refcoco(
    root: str | Path, dataset: str = "refcoco", split: str = "val"
) -> tuple[int, list[RecordError]]:
    """(samples checked, problems): missing annotation or image info, missing image, empty sentence, mask decode."""
    try:
        samples = load_refcoco(root, dataset, split)
    except RecordError as e:
        return 0, [e]
    problems = []
    for s in samples:
        if s.segmentation is None or not s.height:
            problems.append(
                s.error("ann_id", "no annotation or image entry in instances.json", "mask_decode")
            )
            continue
        if not s.text:
            problems.append(s.error("sentences", "empty sentence"))
        if not s.image.is_file():
            problems.append(s.error("image", f"not found: {s.image}", "missing_image"))
        try:
            if not s.mask().any():
                problems.append(s.error("segmentation", "empty mask", "mask_empty"))
        except MaskDecodeError as e:
            problems.append(s.error("segmentation", f"cannot decode: {e}", "mask_decode"))
    return len(samples), problems
