"""Referring image segmentation on RefCOCO / RefCOCO+ / RefCOCOg: cIoU and gIoU of a checkpoint with `seg_head/`.

    swim eval refcoco --model DIR --data data/refer_seg --dataset refcocog --split val --out eval/refcocog

Each (ref, sentence) is a sample (`swim.data.refcoco`): the image goes to the LLM as a Qwen image, the sentence in
the same Sa2VA-style question the RVOS readers use ("Please segment <ins>{sentence}</ins>." for `ins_tag` heads,
"... {sentence}." → "Sure, [SEG]." for `seg_token` heads), and SAM-2 decodes the image; the mask is compared with
the ground truth at the image's resolution. cIoU = Σ I / Σ U over the split; gIoU = mean per-sample IoU.
Per-sample results are appended to `refcoco[.shard-XX-of-NN].jsonl` (resumable, `--num-shards` / `--merge` as
`swim eval rvos`); the summary goes to `refcoco.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from swim.data.records import Turn
from swim.data.refcoco import REFS_FILE, load_refcoco
from swim.data.rvos import conversation
from swim.data.tags import SWIM_SYSTEM_PROMPT, build_text
from swim.data.video import patchify, resize_frames, smart_resize
from swim.eval.generate import add_video_args, video_settings_from_args
from swim.eval.segmentation import IoUAccumulator
from swim.eval.sharding import (
    JsonlStore,
    Shard,
    all_shard_paths,
    fingerprint,
    read_shard_stores,
    select_shard,
    shard_path,
)
from swim.modeling.families import family_of
from swim.seg.data import expression_positions, query_positions
from swim.seg.inference import Segmenter, upsample
from swim.seg.sam2 import image_size, mask_size, sam2_frames

logger = logging.getLogger(__name__)

STEM = "refcoco"


def image_sample(segmenter: Segmenter, rgb: np.ndarray, text: str) -> dict:
    """The LLM + SAM-2 inputs of one image and expression, in the batch contract (one object, one "frame")."""
    s, head = segmenter.settings, segmenter.head
    family = family_of(segmenter.model)
    hw = smart_resize(rgb.shape[0], rgb.shape[1], s.factor, s.min_pixels, s.max_pixels)
    pixel_values, grid = patchify(resize_frames(rgb[None], hw), s)
    turns = [Turn("user" if c["from"] == "human" else "assistant", c["value"])
             for c in conversation(text, head.config.query, head.config.seg_token)]  # fmt: skip
    t = build_text(segmenter.tokenizer, turns, media=[family.image_span(grid)], n_objects=1,
                   system_prompt=segmenter.system_prompt)  # fmt: skip
    sample = {"input_ids": t.input_ids, "labels": t.labels, "mm_token_type_ids": t.mm_token_type_ids,
              "pixel_values": pixel_values, "image_grid_thw": torch.tensor([grid]),
              "query_positions": t.query_positions, "query_objects": t.query_objects}  # fmt: skip
    k = int((t.mm_token_type_ids == 1).sum())
    sample |= {"object_targets": torch.zeros(1, k), "object_group_valid": torch.ones(1, 1, dtype=torch.bool),
               "vision_token_group": torch.zeros(k, dtype=torch.long)}  # fmt: skip
    queries = query_positions(sample, 1, head.config.query, segmenter.seg_token_id)
    m = mask_size(head.sam.config)
    sample |= {
        "seg_pixel_values": sam2_frames(rgb[None], image_size(head.sam.config)),
        "seg_frame_group": torch.zeros(1, dtype=torch.long),
        "seg_frame_index": torch.zeros(1, dtype=torch.long),
        "seg_masks": torch.zeros(1, 1, m, m),
        "seg_valid": torch.ones(1, 1, dtype=torch.bool),
        "seg_query": queries,
        "seg_expr": expression_positions(sample, queries, head.config.mba_expr_tokens),
        "seg_token_grid": torch.tensor([grid[1] // s.merge_size, grid[2] // s.merge_size]),
    }
    return sample


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swim eval refcoco", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder with seg_head/")
    parser.add_argument(
        "--data", required=True, help="refer_seg root (refcoco/, refcoco+/, refcocog/, images/)"
    )
    parser.add_argument("--dataset", default="refcoco", choices=sorted(REFS_FILE))
    parser.add_argument("--split", default="val")
    parser.add_argument("--images", help="image folder (default: <data>/images/mscoco/images/train2014)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--system-prompt", default=SWIM_SYSTEM_PROMPT, help="as in training")
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--shard-index", type=int, default=0)
    parser.add_argument("--merge", action="store_true")
    add_video_args(parser)
    return parser


def run(argv: list[str] | None = None) -> dict | None:
    args = build_parser().parse_args(argv)
    out_dir = Path(args.out)
    samples = load_refcoco(args.data, args.dataset, args.split, args.images)[: args.limit]
    if not samples:
        raise SystemExit(f"{args.data}: no {args.dataset} {args.split} samples")
    shard = Shard(args.shard_index, args.num_shards)
    if not args.merge:
        config = {"model": str(Path(args.model).resolve()), "data": str(Path(args.data).resolve()),
                  "dataset": args.dataset, "split": args.split, "limit": args.limit,
                  "system_prompt": args.system_prompt, "min_pixels": args.min_pixels,
                  "max_pixels": args.max_pixels}  # fmt: skip
        segmenter = Segmenter.load(
            args.model, video_settings_from_args(args), args.system_prompt, args.device
        )
        header = {"fingerprint": fingerprint(config), "config": config}
        with JsonlStore(shard_path(out_dir, STEM, shard), key_field="key", header=header) as store:
            for s in tqdm(
                [s for s in select_shard(samples, shard) if s.key not in store], desc=f"refcoco{shard.suffix}"
            ):
                rgb = np.asarray(Image.open(s.image).convert("RGB"))
                logits, _ = segmenter.logits(image_sample(segmenter, rgb, s.text), rgb[None])
                pred, gt = upsample(logits[0, 0], rgb.shape[:2]), s.mask()
                i, u = float(np.logical_and(pred, gt).sum()), float(np.logical_or(pred, gt).sum())
                store.append({"key": s.key, "intersection": i, "union": u})
        if shard.count > 1:
            logger.info(
                "shard %d/%d done; run with --merge when all shards are", shard.index + 1, shard.count
            )
            return None
    records, _ = read_shard_stores(all_shard_paths(out_dir, STEM, args.num_shards), key_field="key")
    acc = IoUAccumulator()
    for s in samples:
        if s.key in records:
            r = records[s.key]
            acc.intersection, acc.union = acc.intersection + r["intersection"], acc.union + r["union"]
            acc.per_sample.append(1.0 if r["union"] == 0 else r["intersection"] / r["union"])
    result = {"dataset": args.dataset, "split": args.split, **acc.summary(),
              "missing": sum(s.key not in records for s in samples)}  # fmt: skip
    (out_dir / f"{STEM}.json").write_text(json.dumps(result, indent=1))
    logger.info("%s %s: cIoU %.4f  gIoU %.4f over %d samples", args.dataset, args.split, result["cIoU"],
                result["gIoU"], result["samples"])  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> None:
    run(argv)
