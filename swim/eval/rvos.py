"""Referring video object segmentation: J, F and J&F of a checkpoint trained with the segmentation head.

    swim eval rvos --model DIR --data FILE --out DIR                          # NL-Refer-style records with masks
    swim eval rvos --model DIR --data data/mevis/valid_u --layout mevis --out DIR
    swim eval rvos --model DIR --data data/mevis/valid --layout mevis --out DIR --png   # server format, no scores
    swim eval rvos ... --num-shards 8 --shard-index I ; swim eval rvos ... --merge          # sharded, resumable

Inputs: a record file (every object of every record with masks is an expression, its masks on its annotated
frames are the ground truth: the synthetic set, NL-Refer / VideoRefer-Bench-D), or a MeViS / Ref-YouTube-VOS /
Ref-DAVIS17 split (`swim.data.rvos`: the expression in a Sa2VA-style question, the union of the referred objects on
every frame). The LLM reads the video with the training's frame sampling (`--num-frames` etc.), and the masks are
decoded on every evaluated frame (`--mode per_frame`), or on key frames and tracked by a stock `Sam2VideoModel`
(`--mode propagate --sam2-video DIR`, `--key-frames first|uniform --num-key-frames 5`).

Scores (`--protocol rvos`, the RVOS practice, printed with every result): per expression, J and F averaged over its
frames (no first/last frame dropped), `J&F = (mean J + mean F) / 2` over expressions; Ref-DAVIS17's two annotators
are not averaged (every expression counts once). `--protocol davis` leaves out each expression's first and last
frame, as the DAVIS-2017 semi-supervised evaluation does. Each expression's scores are appended to
`rvos[.shard-XX-of-NN].jsonl` as they come, so an interrupted run resumes; `rvos.json` holds the summary.
`--png` writes the server format of MeViS
`valid` and Ref-YouTube-VOS (`Annotations/<video>/<expression>/<frame>.png`, 0/255) under the output folder.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from swim.data.records import NLReferRecord, load_records
from swim.data.tags import SWIM_SYSTEM_PROMPT
from swim.data.video import read_frames
from swim.eval.generate import add_video_args, video_settings_from_args
from swim.eval.segmentation import expression_scores, summarize
from swim.eval.sharding import (
    JsonlStore,
    Shard,
    all_shard_paths,
    fingerprint,
    read_shard_stores,
    select_shard,
    shard_path,
)
from swim.seg.inference import KEY_FRAMES, Segmenter, key_frames, upsample

logger = logging.getLogger(__name__)

STEM = "rvos"
PROTOCOLS = {
    "rvos": "RVOS practice (Ref-DAVIS17, MeViS, ReVOS as Sa2VA scores them): per expression, J and F averaged "
    "over all "
    "its evaluated frames, ground truth = union of the referred objects, J&F = (mean J + mean F) / 2 over "
    "expressions; annotators are not averaged",
    "davis": "DAVIS-2017 semi-supervised convention: as rvos, but the first and the last evaluated frame of every "
    "expression are left out",
}


@dataclass
class VideoItem:
    """One LLM pass: a record (one or several objects = expressions) and the frames to segment."""

    key: str
    record: NLReferRecord
    frame_indices: list[int]  # source frames to segment (and score, where there is ground truth)
    frame_names: list[str]
    expressions: list[tuple[int, str, str]]  # (object index, expression key, expression id for PNG paths)
    ground_truth: object  # callable -> {object: [bool [H, W] per frame]} or None (server-only split)


def record_items(path: str | Path, data_root: str | None) -> list[VideoItem]:
    """Items of a record file: every record with masks; its objects' annotated frames."""
    records, problems = load_records(path, data_root=data_root, errors="collect")
    for problem in problems:
        logger.warning("skipping %s", problem)
    items = []
    for r in records:
        if not getattr(r, "annotation", None):
            continue
        per_object = [{int(f): e["segmentation"] for f, e in obj.items() if e["segmentation"] is not None}
                      for obj in r.annotation]  # fmt: skip
        frames = sorted(set().union(*per_object))
        if not frames:
            continue
        video = str(r.index if r.index is not None else r.position)

        def truth(per_object=per_object, frames=frames, r=r):
            from swim.data.masks import decode_segmentation

            out = {}
            for o, masks in enumerate(per_object):
                out[o] = {f: decode_segmentation(masks[f]).astype(bool) for f in frames if f in masks}
            return out

        items.append(VideoItem(key=video, record=r, frame_indices=frames, frame_names=[f"{f:05d}" for f in frames],
                               expressions=[(o, f"{video}/{o}", str(o)) for o in range(len(per_object))],
                               ground_truth=truth))  # fmt: skip
    return items


def layout_items(
    path: str | Path, layout: str, split: str | None, query: str, seg_token: str
) -> list[VideoItem]:
    """Items of an RVOS split (`swim.data.rvos`): one per expression, every frame."""
    from swim.data.records import Turn
    from swim.data.rvos import conversation, load_layout
    from swim.seg.data import query_record

    items = []
    for e in load_layout(path, layout, split):
        turns = [Turn("user" if c["from"] == "human" else "assistant", c["value"])
                 for c in conversation(e.text, query, seg_token)]  # fmt: skip
        record = query_record(e.frame_dir, turns, 1, source=e.source, index=e.key)
        truth = (lambda e=e: {0: dict(enumerate(e.masks()))}) if e.has_masks else None
        items.append(VideoItem(key=e.key, record=record, frame_indices=list(range(len(e.frame_names))),
                               frame_names=e.frame_names, expressions=[(0, e.key, e.exp_id)],
                               ground_truth=truth))  # fmt: skip
    return items


def write_pngs(out_dir: Path, video: str, exp_id: str, frame_names: list[str], masks: np.ndarray) -> None:
    folder = out_dir / "Annotations" / video / exp_id
    folder.mkdir(parents=True, exist_ok=True)
    for name, mask in zip(frame_names, masks):
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{name}.png")


def predict(segmenter: Segmenter, item: VideoItem, dataset, args, video_model=None) -> dict[int, np.ndarray]:
    """Boolean masks `[T, H, W]` per object of the item, on its frames."""
    sample = dataset.build(item.record)
    frames = read_frames(item.record.media[1], item.frame_indices, segmenter.settings)
    logits, objects = segmenter.logits(sample, frames, item.frame_indices)
    out = {}
    for row, obj in enumerate(objects):
        if args.mode == "propagate":
            keys = key_frames(len(item.frame_indices), args.num_key_frames, args.key_frames)
            logits_obj = segmenter.propagate(video_model, frames, {k: logits[row, k] for k in keys})
        else:
            logits_obj = logits[row]
        out[obj] = upsample(logits_obj, frames.shape[1:3])
    return out


def run_config(args) -> dict:
    keys = ("layout", "split", "mode", "key_frames", "num_key_frames", "protocol", "sam2_video", "num_frames",
            "max_frames", "min_pixels", "max_pixels", "system_prompt", "limit")  # fmt: skip
    paths = {"model": str(Path(args.model).resolve()), "data": str(Path(args.data).resolve())}
    return paths | {key: getattr(args, key) for key in keys}


def evaluate_shard(args, items: list[VideoItem], shard: Shard, out_dir: Path) -> None:
    config = run_config(args)
    header = {"fingerprint": fingerprint(config), "config": config}
    settings = video_settings_from_args(args)
    segmenter = Segmenter.load(args.model, settings, args.system_prompt, device=args.device)
    dataset = segmenter.dataset([item.record for item in items[:1]])
    video_model = None
    if args.mode == "propagate":
        from transformers import Sam2VideoModel

        video_model = Sam2VideoModel.from_pretrained(args.sam2_video).to(args.device).eval()
    mine = select_shard(items, shard)
    with JsonlStore(shard_path(out_dir, STEM, shard), key_field="key", header=header) as store:
        todo = [it for it in mine if not all(key in store for _, key, _ in it.expressions)]
        logger.info("%d of %d videos of this shard left to evaluate", len(todo), len(mine))
        for item in tqdm(todo, desc=f"rvos{shard.suffix}"):
            masks = predict(segmenter, item, dataset, args, video_model)
            truth = item.ground_truth() if item.ground_truth is not None else None
            for obj, key, exp_id in item.expressions:
                if obj not in masks:
                    store.append({"key": key, "error": "no query token for this object"})
                    continue
                if args.png:
                    write_pngs(out_dir, item.key.split("/")[0], exp_id, item.frame_names, masks[obj])
                entry = {"key": key}
                if truth is not None:
                    frames = [i for i, f in enumerate(item.frame_indices) if f in truth[obj]]
                    if args.protocol == "davis" and len(frames) > 2:
                        frames = frames[1:-1]
                    entry |= expression_scores([masks[obj][i] for i in frames],
                                               [truth[obj][item.frame_indices[i]] for i in frames])  # fmt: skip
                store.append(entry)


def merge(out_dir: Path, num_shards: int, items: list[VideoItem], protocol: str) -> dict:
    records, headers = read_shard_stores(all_shard_paths(out_dir, STEM, num_shards), key_field="key")
    keys = [key for item in items for _, key, _ in item.expressions]
    missing = [k for k in keys if k not in records]
    scored = [records[k] for k in keys if k in records and "J" in records[k]]
    summary = summarize(scored)
    present = [records[k] for k in keys if k in records]
    result = {
        "protocol": PROTOCOLS[protocol],
        "config": headers[0]["config"] if headers else None,
        "summary": summary,
        "missing": len(missing),
        "errors": sum("error" in r for r in present),
        "expressions": present,
    }
    (out_dir / f"{STEM}.json").write_text(json.dumps(result, indent=1))
    if missing:
        logger.warning("%d expressions have no result yet (first: %s)", len(missing), missing[0])
    logger.info("J %.4f  F %.4f  J&F %.4f over %d expressions (%s)", summary["J"], summary["F"], summary["JF"],
                summary["expressions"], PROTOCOLS[protocol])  # fmt: skip
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swim eval rvos", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder with seg_head/")
    parser.add_argument("--data", required=True, help="record file, or an RVOS split/root with --layout")
    parser.add_argument(
        "--data-root", help="record file: folder the videos are relative to (default: its folder)"
    )
    parser.add_argument(
        "--layout", choices=["mevis", "ytvos", "davis"], help="read --data as this RVOS layout"
    )
    parser.add_argument("--split", help="ytvos / davis split (default: valid)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", default="per_frame", choices=["per_frame", "propagate"])
    parser.add_argument(
        "--sam2-video", help="Sam2VideoModel folder for --mode propagate (original SAM-2 weights)"
    )
    parser.add_argument("--key-frames", default="first", choices=KEY_FRAMES)
    parser.add_argument("--num-key-frames", type=int, default=5)
    parser.add_argument("--png", action="store_true", help="also write the server PNG format")
    parser.add_argument(
        "--protocol", default="rvos", choices=sorted(PROTOCOLS), help="which frames are scored"
    )
    parser.add_argument("--limit", type=int, help="only the first N videos")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--system-prompt", default=SWIM_SYSTEM_PROMPT, help="as in training")
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--shard-index", type=int, default=0)
    parser.add_argument("--merge", action="store_true", help="only merge the shards' results")
    add_video_args(parser)
    return parser


def run(argv: list[str] | None = None) -> dict | None:
    args = build_parser().parse_args(argv)
    if args.mode == "propagate" and not args.sam2_video:
        raise SystemExit("--mode propagate needs --sam2-video (a Sam2VideoModel folder)")
    out_dir = Path(args.out)
    if args.layout:
        head_config = json.loads((Path(args.model) / "seg_head" / "seg_head.json").read_text())
        items = layout_items(
            args.data, args.layout, args.split, head_config["query"], head_config["seg_token"]
        )
    else:
        items = record_items(args.data, args.data_root)
    items = items[: args.limit]
    if not items:
        raise SystemExit(f"{args.data}: nothing to evaluate")
    shard = Shard(args.shard_index, args.num_shards)
    if not args.merge:
        evaluate_shard(args, items, shard, out_dir)
        if shard.count > 1:
            logger.info(
                "shard %d/%d done; run with --merge when all shards are", shard.index + 1, shard.count
            )
            return None
    return merge(out_dir, args.num_shards, items, args.protocol)


def main(argv: list[str] | None = None) -> None:
    run(argv)
